"""The emulated model for a whole batch at once, in columns: answers, token counts, fault hits.

Per request, the emulator's model (:mod:`model`) costs ~50 µs of Python; a million-row dry run
spent minutes there. These functions give the same answers for a column of prompts with polars
and DuckDB kernels; what stays per item is the tokenizer (one ``encode_ordinary`` per text, the
floor of honest token counting). ``tests/test_emulator_columns.py`` holds them to the
per-request model on the same inputs.
"""

from __future__ import annotations

import random
from typing import Any

import duckdb
import orjson
import polars as pl

from polars_llmbatch.emulator import model, tokenizers
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.plan.tokens.encodings import get_encoding

__all__ = [
    "answers",
    "concat",
    "count_tokens",
    "finish_lines",
    "hits",
    "json_strings",
    "md5_hex",
    "stable_ints",
    "words",
]


def json_typed(i: int, *types: str, absent: bool = False) -> pl.Expr:
    """Whether the ``i``-th (1-based) of the DuckDB JSON types listed in column ``t`` is one
    of ``types`` (``absent``: or missing), per row: a body's shape checked in columns."""
    kind = pl.col("t").list.get(i - 1)
    allowed = kind.is_in(list(types))
    return (allowed | kind.is_null()) if absent else allowed.fill_null(False)


def md5_hex(texts: pl.Series) -> pl.Series:
    """The MD5 of each text's UTF-8 bytes, as 32 lowercase hex digits (DuckDB's kernel)."""
    con = duckdb.connect()
    try:
        con.register("frame", texts.rename("s").to_frame())
        return con.sql("SELECT md5(s) AS h FROM frame").pl()["h"].rename(texts.name)
    finally:
        con.close()


def stable_ints(texts: pl.Series) -> pl.Series:
    """:func:`model.stable_int` of each text (the parts already joined with ``"|"``).

    Example:
        >>> stable_ints(pl.Series(["a|b"])).item() == model.stable_int("a", "b")
        True
    """
    return md5_hex(texts).str.slice(0, 15).str.to_integer(base=16).rename(texts.name)


def hits(seed: int, fault: str, share: float, custom_ids: pl.Series) -> pl.Series:
    """:meth:`Faults.hits` for every custom_id: whether the per-request ``fault`` hits it."""
    if share <= 0:
        return pl.Series(custom_ids.name, [False] * len(custom_ids), pl.Boolean)
    joined = (f"{seed}|{fault}|" + custom_ids.cast(pl.String)).rename("s")
    return (stable_ints(joined) % 1_000_000) < share * 1_000_000


def words(texts: pl.Series, n: int) -> pl.Series:
    """The first ``n`` words of each text joined by one space (:func:`model.words`)."""
    return texts.str.extract_all(model.WORD).list.head(n).list.join(" ")


def json_strings(texts: pl.Series) -> pl.Series:
    """Each text as a JSON string literal, quotes included (the bytes ``orjson.dumps`` gives)."""
    encoded = texts.rename("x").to_frame().select(pl.struct("x").struct.json_encode()).to_series()
    return encoded.str.slice(5).str.head(-1).rename(texts.name)


def count_tokens(texts: pl.Series, encoding: str, *, distinct: bool = True) -> pl.Series:
    """Tokens in each text (null counts 0): one tokenizer call per text, or per distinct text
    (``distinct``: for columns with few values, such as enum answers)."""
    if not distinct:
        counts = tokenizers.lengths(encoding, texts.fill_null("").to_list())
        return pl.Series(texts.name, counts, dtype=pl.Int64)
    distinct = texts.fill_null("").unique()
    counts = pl.Series(tokenizers.lengths(encoding, distinct.to_list()), dtype=pl.Int64)
    table = pl.DataFrame({"t": distinct, "n": counts})
    return (
        texts.fill_null("")
        .rename("t")
        .to_frame()
        .join(table, on="t", how="left", maintain_order="left")
    )["n"].rename(texts.name)


def answers(prompts: pl.Series, schema: dict[str, Any] | None, caps: pl.Series) -> pl.DataFrame:
    """``text``, ``cut`` and ``output_tokens`` per prompt, as :func:`model.answer` gives them
    (``caps``: the request's output-token cap, or null).

    Example:
        >>> answers(pl.Series(["Say hi"]), None, pl.Series([None], dtype=pl.Int64))["text"].item()
        'Emulated answer to: Say hi'
    """
    prompts = prompts.fill_null("")
    if schema is None:
        text = model.PREFIX + words(prompts, 12)
    else:
        text = _instance(schema, prompts, "", schema.get("$defs", {}))
    text = text.rename("text")
    tokens = count_tokens(text, model.ANSWER_ENCODING)
    caps = caps.cast(pl.Int64)
    over = (caps.is_not_null() & (tokens > caps)).fill_null(False)
    if over.any():  # rare: the cap cuts the answer; decode the cut per row, as the model does
        enc = get_encoding(model.ANSWER_ENCODING)
        idx = over.arg_true()
        cut_texts = [
            enc.decode(enc.encode_ordinary(t)[:c])
            for t, c in zip(text.gather(idx).to_list(), caps.gather(idx).to_list(), strict=True)
        ]
        text = text.scatter(idx, pl.Series(cut_texts, dtype=pl.String))
        tokens = _pick(over, caps, tokens)
    return pl.DataFrame({"text": text, "cut": over, "output_tokens": tokens})


def _pick(mask: pl.Series, a: pl.Series, b: pl.Series) -> pl.Series:
    return pl.select(pl.when(mask).then(a).otherwise(b)).to_series().rename(b.name)


def _instance(
    node: dict[str, Any], prompts: pl.Series, path: str, defs: dict[str, Any]
) -> pl.Series:
    """The JSON text of :func:`model._instance` for every prompt, built column-wise."""
    if "$ref" in node:
        return _instance(defs[node["$ref"].rsplit("/", 1)[-1]], prompts, path, defs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if o.get("type") != "null"] or node[key]
            return _instance(options[0], prompts, path, defs)
    if "enum" in node:
        values = pl.Series([orjson.dumps(v).decode() for v in node["enum"]], dtype=pl.String)
        return values.gather(_hash(prompts, path or "value") % len(values))
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        parts: list[pl.Series | str] = []
        for i, (k, v) in enumerate(node.get("properties", {}).items()):
            parts.append(("{" if i == 0 else ",") + orjson.dumps(k).decode() + ":")
            parts.append(_instance(v, prompts, f"{path}.{k}" if path else k, defs))
        return concat(parts or ["{"], len(prompts)) + "}"
    if kind == "array":
        items = node.get("items", {"type": "string"})
        first = _instance(items, prompts, f"{path}[0]", defs)
        second = _instance(items, prompts, f"{path}[1]", defs)
        return concat(["[", first, ",", second, "]"], len(prompts))
    if kind == "null":
        return pl.repeat("null", len(prompts), eager=True, dtype=pl.String)
    h = _hash(prompts, path)
    if kind == "integer":
        return (h % 100).cast(pl.String)
    if kind == "number":
        # k / 10 for k < 1000 prints as "{k // 10}.{k % 10}" (repr's shortest round trip);
        # built as text, since polars' division by 10 can land one ulp off Python's.
        m = h % 1000
        return (m // 10).cast(pl.String) + "." + (m % 10).cast(pl.String)
    if kind == "boolean":
        return _pick(h % 2 == 1, pl.Series(["true"]), pl.Series(["false"]))
    fmt = node.get("format")
    day = (h % 28 + 1).cast(pl.String).str.zfill(2)
    if fmt == "date":
        return '"2026-01-' + day + '"'
    if fmt == "date-time":
        return '"2026-01-' + day + 'T12:00:00Z"'
    return json_strings(f"{path or 'value'} for: " + words(prompts, 5))


def _hash(prompts: pl.Series, path: str) -> pl.Series:
    return stable_ints(prompts + ("|" + path))


def concat(parts: list[pl.Series | str], n: int) -> pl.Series:
    """Literal pieces and columns of ``n`` rows joined row by row.

    Example:
        >>> concat(["<", pl.Series(["a", "b"]), ">"], 2).to_list()
        ['<a>', '<b>']
    """
    rows = pl.int_range(n, eager=True).to_frame()
    return rows.select(pl.concat_str([pl.lit(p) for p in parts])).to_series()


def finish_lines(lines: pl.DataFrame, faults: Faults, *, shuffle: bool) -> bytes:
    """The file of ``(custom_id, line)`` rows after the line faults: ``missing`` drops a line,
    ``malformed`` cuts it in half (so it is no longer JSON), ``duplicates`` writes it twice in
    a row; with ``shuffle`` the order is a seeded permutation (OpenAI and Anthropic return
    results in any order)."""
    cids = lines["custom_id"]
    missing = hits(faults.seed, "missing", faults.missing, cids)
    malformed = hits(faults.seed, "malformed", faults.malformed, cids) & ~missing
    twice = hits(faults.seed, "duplicates", faults.duplicates, cids) & ~missing & ~malformed
    line = pl.col("line")
    out = (
        lines.with_columns(malformed=malformed, copies=twice.cast(pl.UInt32) + 1)
        .filter(~missing)
        .select(
            pl.when("malformed")
            .then(line.str.head(line.str.len_chars() // 2))
            .otherwise(line)
            .repeat_by("copies")
            .explode()
        )
        .to_series()
    )
    if shuffle:  # random.shuffle moves positions, whatever they hold: shuffle the positions
        order = list(range(len(out)))
        random.Random(faults.seed).shuffle(order)
        out = out.gather(order)
    if not len(out):
        return b""
    return (out.str.join("\n").item() + "\n").encode()
