"""Build JSON text with polars expressions: wire bodies for a million rows without a Python loop.

A body is a fixed skeleton (model, options, schema: serialised once by the stdlib ``json``) with
"slots" where per-row text goes. Each slot's text is JSON-escaped by polars' own encoder and
spliced between the skeleton's fixed pieces with ``concat_str``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any

import polars as pl

_SLOT = "\u0000slot:{}\u0000"
_SLOT_RE = re.compile(r'"\\u0000slot:([A-Za-z0-9_]+)\\u0000"')
_WRAP = 5  # len('{"s":'): polars encodes struct {s: value} as {"s":<value>}


def dumps(obj: Any) -> str:
    """Compact, deterministic JSON (sorted keys are *not* used: key order is part of the wire form)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def slot(name: str) -> str:
    """A placeholder to put in a skeleton where the per-row text ``name`` goes."""
    return _SLOT.format(name)


def json_text(expr: pl.Expr) -> pl.Expr:
    """``expr`` as JSON text (a quoted, escaped literal for strings); null stays null.

    Polars encodes a one-field struct as ``{"s":<value>}``; the value is what is left after cutting
    the five leading and one trailing characters.
    """
    encoded = pl.struct(expr.alias("s")).struct.json_encode().str.head(-1).str.tail(-_WRAP)
    return pl.when(expr.is_not_null()).then(encoded)


#: U+2028/U+2029 are valid raw in JSON, but many line readers (Python's ``splitlines`` among
#: them) break lines there; escaped, a JSONL line is always one line.
LINE_SEPARATORS = ("\u2028", "\u2029")
_ESCAPED = ("\\u2028", "\\u2029")


def has_line_separators(frame: pl.DataFrame, columns: Collection[str]) -> bool:
    """Whether any text in ``columns`` holds U+2028/U+2029 (a cheap scan, to skip the escape)."""
    pattern = "[" + "".join(LINE_SEPARATORS) + "]"
    return bool(
        frame.select(
            pl.any_horizontal(pl.col(c).str.contains(pattern).any() for c in columns)
        ).item()
    )


def template(
    skeleton: Any,
    slots: Mapping[str, pl.Expr],
    *,
    raw: Collection[str] = (),
    escape_line_separators: bool = True,
) -> pl.Expr:
    """The JSON text of ``skeleton`` with each ``slot(name)`` replaced by ``slots[name]``.

    Slot values are JSON-escaped, except those named in ``raw``, which already hold JSON text.
    ``escape_line_separators=False`` skips escaping U+2028/U+2029 in slot values, for callers
    that know there are none (:func:`has_line_separators`): the escape is a full extra pass.

    Example:
        >>> import polars as pl
        >>> body = template({"m": "x", "p": slot("user")}, {"user": pl.col("t")})
        >>> pl.DataFrame({"t": ['say "hi"']}).select(body).item()
        '{"m":"x","p":"say \\\\"hi\\\\""}'
    """
    pieces = _pieces(skeleton, slots, raw, escape_line_separators)
    exprs = [pl.lit(p, pl.String) if isinstance(p, str) else p for p in pieces]
    return pl.concat_str(exprs, ignore_nulls=False)


def template_length(
    skeleton: Any,
    slots: Mapping[str, pl.Expr],
    *,
    raw: Collection[str] = (),
    escape_line_separators: bool = True,
) -> pl.Expr:
    """The length in bytes of :func:`template` (the same arguments), without building the
    text: the skeleton's fixed pieces are counted once, each slot's JSON text per row.

    Example:
        >>> import polars as pl
        >>> n = template_length({"m": "x", "p": slot("user")}, {"user": pl.col("t")})
        >>> pl.DataFrame({"t": ['say "hi"']}).select(n).item()  # the example above's 26 bytes
        26
    """
    pieces = _pieces(skeleton, slots, raw, escape_line_separators)
    fixed = sum(len(p.encode()) for p in pieces if isinstance(p, str))
    varying = [p.str.len_bytes().cast(pl.Int64) for p in pieces if not isinstance(p, str)]
    return pl.sum_horizontal(pl.lit(fixed, pl.Int64), *varying, ignore_nulls=False)


def _pieces(
    skeleton: Any,
    slots: Mapping[str, pl.Expr],
    raw: Collection[str],
    escape_line_separators: bool,
) -> list[str | pl.Expr]:
    """The skeleton's text cut at its slots: fixed text, then each slot's JSON text."""
    text = dumps(skeleton)
    for sep, esc in zip(LINE_SEPARATORS, _ESCAPED, strict=True):
        text = text.replace(sep, esc)
    pieces: list[str | pl.Expr] = []
    pos = 0
    for m in _SLOT_RE.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        name = m.group(1)
        if name not in slots:
            raise KeyError(f"no expression for slot {name!r}")
        if name in raw:
            pieces.append(slots[name])
        elif escape_line_separators:
            pieces.append(json_text(slots[name]).str.replace_many(LINE_SEPARATORS, _ESCAPED))
        else:
            pieces.append(json_text(slots[name]))
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces
