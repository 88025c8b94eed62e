"""The emulator's deterministic model: answers tests can predict.

- **Free text**: ``"Emulated answer to: "`` followed by the first 12 words of the prompt (the last
  user message); a word is a run of characters other than ASCII whitespace. Cut to ``max_tokens`` tokens (o200k) with finish reason "length" when longer.
- **JSON schema**: an instance that satisfies the schema. An enum value is picked by a stable hash
  of (prompt, field path): ``enum[md5(prompt + "|" + path) % len(enum)]``; integers are that hash
  mod 100, numbers mod 1000 / 10, booleans mod 2, strings ``"<field> for: <first 5 words>"``,
  dates ``2026-01-DD``; arrays have two items; objects every property.
- **Embeddings**: a unit vector of the model's dimension (or ``dimensions``), from SHAKE-256 of
  the text: the same text always embeds the same.

Output tokens are o200k tokens of the answer (for every provider); input tokens are billed by
:mod:`.tokenizers`, the emulator's own, never the library's estimator.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import struct
from typing import Any

import orjson

from polars_llmbatch.plan.tokens.encodings import get_encoding

__all__ = [
    "answer",
    "embedding",
    "embedding_dims",
    "enum_pick",
    "model_problem",
    "stable_int",
]

PREFIX = "Emulated answer to: "
#: A word of the prompt (the vectorised model, :mod:`columns`, splits the same way).
WORD = r"[^ \t\n\r\f\v]+"
#: The encoding answers are counted (and cut) in.
ANSWER_ENCODING = "o200k_base"
_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "gemini-embedding-001": 3072,
}


def stable_int(*parts: str) -> int:
    return int(hashlib.md5("|".join(parts).encode()).hexdigest()[:15], 16)


def enum_pick(prompt: str, path: str, values: list[Any]) -> Any:
    """The enum value the emulator answers for ``prompt`` at field ``path`` (e.g. ``"label"``)."""
    return values[stable_int(prompt, path) % len(values)]


def answer(
    prompt: str, schema: dict[str, Any] | None, max_tokens: int | None, reasoning: int = 0
) -> tuple[str, bool, int]:
    """(text, truncated, output tokens) for ``prompt``; JSON text when ``schema`` is given.
    With ``reasoning`` thinking tokens first (the ``reasoning`` fault), the cap bounds both,
    as the real services' caps do, and the output tokens count both."""
    if reasoning:
        room = None if max_tokens is None else max(max_tokens - reasoning, 0)
        used = reasoning if max_tokens is None else min(reasoning, max_tokens)
        text, cut, n = answer(prompt, schema, room)
        return text, cut or (max_tokens is not None and reasoning >= max_tokens), n + used
    enc = get_encoding(ANSWER_ENCODING)
    if schema is not None:
        text = orjson.dumps(_instance(schema, prompt, "", schema.get("$defs", {}))).decode()
    else:
        text = PREFIX + words(prompt, 12)
    tokens = enc.encode_ordinary(text)
    if max_tokens is not None and len(tokens) > max_tokens:
        return enc.decode(tokens[:max_tokens]), True, max_tokens
    return text, False, len(tokens)


def _instance(node: dict[str, Any], prompt: str, path: str, defs: dict[str, Any]) -> Any:
    if "$ref" in node:
        return _instance(defs[node["$ref"].rsplit("/", 1)[-1]], prompt, path, defs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if o.get("type") != "null"] or node[key]
            return _instance(options[0], prompt, path, defs)
    if "enum" in node:
        return enum_pick(prompt, path or "value", list(node["enum"]))
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    h = stable_int(prompt, path)
    if kind == "object":
        props = node.get("properties", {})
        return {
            k: _instance(v, prompt, f"{path}.{k}" if path else k, defs) for k, v in props.items()
        }
    if kind == "array":
        items = node.get("items", {"type": "string"})
        return [_instance(items, prompt, f"{path}[{i}]", defs) for i in range(2)]
    if kind == "integer":
        return h % 100
    if kind == "number":
        return (h % 1000) / 10
    if kind == "boolean":
        return bool(h % 2)
    if kind == "null":
        return None
    fmt = node.get("format")
    if fmt == "date":
        return f"2026-01-{h % 28 + 1:02d}"
    if fmt == "date-time":
        return f"2026-01-{h % 28 + 1:02d}T12:00:00Z"
    return f"{path or 'value'} for: {words(prompt, 5)}"


def words(text: str, n: int) -> str:
    """The first ``n`` words of ``text``, joined by one space.

    Example:
        >>> words("  Classify:  my   ticket now ", 3)
        'Classify: my ticket'
    """
    return " ".join(re.findall(WORD, text)[:n])


def embedding_dims(model: str, dimensions: int | None) -> int:
    return dimensions or _DIMS.get(model.removeprefix("models/"), 768)


def embedding_array(text: str, dims: int) -> Any:
    """A deterministic float32 unit vector of ``dims`` values for ``text``, as an Arrow array:
    SHAKE-256 of the text gives ``dims`` uniform numbers, centred and normalised, all in
    Arrow's compute kernels (12x the pure-Python loop it replaces: a big embeddings dry run
    was the emulator's slowest part)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = hashlib.shake_256(text.encode()).digest(4 * dims)
    ints = pa.Array.from_buffers(pa.uint32(), dims, [None, pa.py_buffer(raw)])
    centred = pc.subtract(pc.divide(pc.cast(ints, pa.float64()), 2.0**32), 0.5)
    norm = math.sqrt(pc.sum(pc.multiply(centred, centred)).as_py()) or 1.0
    return pc.cast(pc.divide(centred, norm), pa.float32())


def embedding(text: str, dims: int) -> list[float]:
    """The vector of :func:`embedding_array` as Python floats (float32 values, so the float
    and base64 encodings give the same numbers)."""
    return embedding_array(text, dims).to_pylist()


def embedding_base64(values: Any) -> str:
    """Little-endian float32 bytes, base64: of a list of floats or an :func:`embedding_array`."""
    import base64

    if isinstance(values, list):
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    buf = values.buffers()[1]
    return base64.b64encode(
        memoryview(buf)[values.offset * 4 : (values.offset + len(values)) * 4]
    ).decode()


#: The emulator's model catalogue: the models the real services list (pydantic's
#: genai-prices data, the public price lists), plus fine-tuned OpenAI models (``ft:...``).
_CATALOGUE = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


@functools.lru_cache(maxsize=1024)  # asked once per request: a catalogue lookup is 30 µs
def model_problem(provider: str, model: str, embed: bool) -> str | None:
    """Why the real service would refuse ``model`` (unknown, or the wrong kind for the call:
    an embedding model asked to chat, a chat model asked to embed), or None.

    Example:
        >>> model_problem("openai", "gpt-4o-mnii", embed=False)
        'The model `gpt-4o-mnii` does not exist or you do not have access to it.'
        >>> model_problem("openai", "gpt-4o-mini", embed=True)
        'The model `gpt-4o-mini` does not support embeddings.'
    """
    name = model.removeprefix("models/")
    is_embedding = "embed" in name.lower()
    known = name.startswith("ft:") or _listed(_CATALOGUE[provider], name)
    if not known:
        return f"The model `{name}` does not exist or you do not have access to it."
    if embed and not is_embedding:
        return f"The model `{name}` does not support embeddings."
    if not embed and is_embedding:
        return f"The model `{name}` is an embedding model and does not support generation."
    return None


def _listed(provider_id: str, model: str) -> bool:
    import genai_prices

    try:
        genai_prices.data_snapshot.get_snapshot().find_provider_model(
            model, None, provider_id, None
        )
    except LookupError:
        return False
    return True
