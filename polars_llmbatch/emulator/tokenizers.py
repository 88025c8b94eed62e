"""How the emulated providers count the input tokens they bill: their own rules, written
here and nowhere else, never the library's estimator (``polars_llmbatch.plan`` and the
provider modules' token rules are not imported).

- **OpenAI** bills with the real tokenizers: tiktoken's encoding for the model, picked by
  tiktoken's own model table (``tiktoken.model.encoding_name_for_model``, o200k for names it
  does not know), and the chat format's published framing (openai-cookbook, "How to count
  tokens with tiktoken"): 3 tokens per message plus its role and content, 3 to prime the
  reply; a structured-output schema adds its compact JSON (without ``required``,
  ``additionalProperties`` and ``$schema``) plus 9. Embeddings bill their texts' tokens. This
  is a second implementation of the same published rules: the library's OpenAI estimate
  agreeing with it checks both.
- **Anthropic and Gemini** have no public offline tokenizer, and the emulator gives them ones
  the library cannot know either (:data:`FAMILIES`): o200k tokens plus surcharges on character
  classes (lowercase letters, newlines, digits, non-ASCII characters), different per model
  family, plus a per-request frame. A job's ratio to o200k then depends on its text (prose,
  code, numbers, CJK) as with the real tokenizers, and only the count endpoints
  (``/v1/messages/count_tokens``, ``models/{m}:countTokens``) reveal it: that is what the
  library's calibration is tested against. The ratios stay inside the library's published
  offline bands (Claude 3–4.6 about 1.05–1.3× o200k, Opus 4.7 and later 1.35–1.75×, Gemini
  1.0–1.15×), as the real ones were measured to (reference/tokens.md §4–5).

Example:
    >>> family("anthropic", "claude-haiku-4-5").name, family("gemini", "gemini-2.5-flash").name
    ('claude-v3', 'gemini-2')
    >>> family("anthropic", "claude-haiku-4-5").count("Hello, world!")
    4
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import polars as pl

from polars_llmbatch.plan.tokens.encodings import get_encoding

__all__ = [
    "FAMILIES",
    "Family",
    "chat_tokens",
    "family",
    "lengths",
    "openai_encoding",
    "schema_tokens",
]

#: Texts counted in one thread; more are split between two (tiktoken encodes outside the
#: GIL: 1.15-1.5x on this machine's 2 cores, where ``encode_ordinary_batch`` (a task per text) is
#: 3x slower than one loop; benchmarks/README.md).
_SPLIT_FROM = 10_000
_POOL: ThreadPoolExecutor | None = None


def lengths(encoding: str, texts: list[str]) -> list[int]:
    """The number of tokens of each text by the tiktoken ``encoding`` (no special tokens).

    Example:
        >>> lengths("o200k_base", ["hello world", ""])
        [2, 0]
    """
    enc = get_encoding(encoding)
    if len(texts) < _SPLIT_FROM:
        return [len(enc.encode_ordinary(t)) for t in texts]
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-tokens")
    half = len(texts) // 2
    first, second = _POOL.map(
        lambda part: [len(enc.encode_ordinary(t)) for t in part], (texts[:half], texts[half:])
    )
    return first + second


@dataclass(frozen=True)
class Family:
    """One emulated tokenizer: ``base`` tokens of a text plus, per ``(pattern, per)`` in
    ``extras``, one token for every ``per`` matches of ``pattern`` in it (rounded down, per
    text); a request adds ``frame``, ``per_system`` when it has a system prompt and
    ``per_schema`` when it asks for structured output."""

    name: str
    base: str
    extras: tuple[tuple[str, int], ...]
    frame: int
    per_system: int
    per_schema: int

    def count(self, text: str) -> int:
        """Tokens of one text by this family (no frame)."""
        if not text:
            return 0
        n = len(get_encoding(self.base).encode_ordinary(text))
        for pattern, per in self.extras:
            n += len(_compiled(pattern).findall(text)) // per
        return n

    def count_series(self, texts: pl.Series, *, distinct: bool = False) -> pl.Series:
        """:meth:`count` of each text (null counts 0): one tokenizer call per text (per
        distinct text with ``distinct``, for columns of few values such as a system prompt),
        the surcharges in polars' regex kernels."""
        filled = texts.fill_null("")
        if distinct:
            values = filled.unique()
            table = pl.DataFrame({"t": values, "n": self.count_series(values)})
            joined = (
                filled.rename("t").to_frame().join(table, on="t", how="left", maintain_order="left")
            )
            return joined["n"].rename(texts.name)
        total = pl.Series(texts.name, lengths(self.base, filled.to_list()), dtype=pl.Int64)
        for pattern, per in self.extras:
            total = total + (filled.str.count_matches(pattern).cast(pl.Int64) // per)
        return total


#: The emulated Anthropic and Gemini tokenizers. On :func:`polars_llmbatch.sample.varied`
#: (prose, code, numbers, CJK, JSON) their ratios to o200k are: claude-v3 1.08–1.27 (1.16
#: overall), claude-v4.7 1.20–1.50 (1.31), claude-v5 1.19–1.45 (1.30), gemini-2 1.00–1.11
#: (1.04), gemini-3 1.00–1.13 (1.07); by kind, text, never one constant.
FAMILIES = {
    "claude-v3": Family(
        "claude-v3",
        "o200k_base",
        (("[a-z]", 30), ("\n", 1), ("[0-9]", 9), ("[^\\x00-\\x7f]", 5)),
        frame=9,
        per_system=4,
        per_schema=40,
    ),
    "claude-v4.7": Family(
        "claude-v4.7",
        "o200k_base",
        (("[a-z]", 8), ("\n", 1), ("[0-9]", 6), ("[^\\x00-\\x7f]", 3)),
        frame=12,
        per_system=5,
        per_schema=46,
    ),
    "claude-v5": Family(
        "claude-v5",
        "o200k_base",
        (("[a-z]", 9), ("\n", 1), ("[0-9]", 6), ("[^\\x00-\\x7f]", 3)),
        frame=6,
        per_system=3,
        per_schema=36,
    ),
    "gemini-2": Family(
        "gemini-2",
        "o200k_base",
        (("[0-9]", 12), ("[A-Z]", 20)),
        frame=0,
        per_system=0,
        per_schema=0,
    ),
    "gemini-3": Family(
        "gemini-3",
        "o200k_base",
        (("[0-9]", 10), ("[^\\x00-\\x7f]", 10)),
        frame=0,
        per_system=0,
        per_schema=0,
    ),
}

_CLAUDE_47 = re.compile(r"claude-opus-4-7")
_CLAUDE_5 = re.compile(r"claude-(?:[a-z]+-)?(?:4-[89]|[5-9])|claude-(?:fable|mythos)")


def family(provider: str, model: str) -> Family:
    """The emulated tokenizer of an Anthropic or Gemini ``model``."""
    name = model.removeprefix("models/")
    if provider == "anthropic":
        if _CLAUDE_47.match(name):
            return FAMILIES["claude-v4.7"]
        if _CLAUDE_5.match(name):
            return FAMILIES["claude-v5"]
        return FAMILIES["claude-v3"]
    return FAMILIES["gemini-3"] if name.startswith("gemini-3") else FAMILIES["gemini-2"]


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# OpenAI: the real tokenizer, the published chat rules ---------------------------------------
@functools.lru_cache(maxsize=256)
def openai_encoding(model: str) -> str:
    """tiktoken's encoding for ``model`` by tiktoken's own table (o200k where it has none)."""
    import tiktoken.model

    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"


def chat_tokens(messages: list[dict[str, str]], model: str) -> int:
    """Input tokens of chat ``messages`` (``role``/``content`` strings): 3 to prime the reply,
    and per message 3 plus the tokens of its role and its content."""
    enc = get_encoding(openai_encoding(model))
    total = 3
    for m in messages:
        total += 3 + len(enc.encode_ordinary(m.get("role", "user")))
        total += len(enc.encode_ordinary(m.get("content", "")))
    return total


@functools.lru_cache(maxsize=256)
def _schema_tokens_of(schema_json: str, encoding: str) -> int:
    def bare(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: bare(v)
                for k, v in node.items()
                if k not in ("required", "additionalProperties", "$schema")
            }
        if isinstance(node, list):
            return [bare(v) for v in node]
        return node

    text = orjson.dumps(bare(orjson.loads(schema_json))).decode()
    return len(get_encoding(encoding).encode_ordinary(text)) + 9


def schema_tokens(schema: dict[str, Any], encoding: str) -> int:
    """What a structured-output ``schema`` adds to an OpenAI request's input."""
    return _schema_tokens_of(orjson.dumps(schema).decode(), encoding)
