"""Prompt templates: ``"Classify: {body}"`` → one polars String expression, rendered without a row loop."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from polars_llmbatch._json import json_text
from polars_llmbatch.errors import LlmBatchError

__all__ = ["Template"]

# `{{` and `}}` are literal braces; `{name}` is a column; anything else with a brace is an error.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class Template:
    """A parsed prompt template: literal text and column references, in order.

    Example:
        >>> import polars as pl
        >>> t = Template.parse("Classify: {body} ({{json}})")
        >>> t.columns
        ('body',)
        >>> pl.DataFrame({"body": ["late refund"]}).select(t.expr()).item()
        'Classify: late refund ({json})'
    """

    source: str
    parts: tuple[str | tuple[str], ...]  # a str is literal text, a 1-tuple names a column

    @classmethod
    def parse(cls, source: str) -> Template:
        parts: list[str | tuple[str]] = []
        literal: list[str] = []
        pos = 0
        for m in _TOKEN.finditer(source):
            literal.append(source[pos : m.start()])
            pos = m.end()
            tok = m.group(0)
            if tok in ("{{", "}}"):
                literal.append(tok[0])
            elif tok in ("{", "}"):
                raise LlmBatchError(
                    f"prompt template {source!r} has an unmatched {tok!r} at position {m.start()}; "
                    f"write {tok * 2!r} for a literal brace"
                )
            else:
                name = m.group(1)
                if not name.strip():
                    raise LlmBatchError(
                        f"prompt template {source!r} has an empty placeholder '{{}}' at position "
                        f"{m.start()}; name a column, e.g. '{{body}}', or write '{{{{}}}}' for "
                        "literal braces"
                    )
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append((name,))
        literal.append(source[pos:])
        if "".join(literal):
            parts.append("".join(literal))
        return cls(source, tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        """The referenced columns, in order of first use."""
        seen: dict[str, None] = {}
        for p in self.parts:
            if isinstance(p, tuple):
                seen.setdefault(p[0], None)
        return tuple(seen)

    def check(self, schema: pl.Schema, what: str = "prompt") -> None:
        """Raise if a referenced column is not in ``schema``, listing the columns that exist."""
        missing = [c for c in self.columns if c not in schema]
        if missing:
            hint = ""
            if any(not c.isidentifier() for c in missing):
                hint = (
                    "; if the braces are meant literally (e.g. JSON in the prompt), double them: "
                    "'{{' and '}}'"
                )
            close = _close_names(missing, list(schema.names()))
            raise LlmBatchError(
                f"{what} template {self.source!r} refers to column(s) {missing} that the frame "
                f"does not have{close}; the columns are {list(schema.names())}{hint}"
            )

    def expr(self, schema: pl.Schema | None = None, *, fill_null: bool = False) -> pl.Expr:
        """The rendered text as a String expression: null where any referenced value is null,
        unless ``fill_null``, which renders a null value as empty text."""
        if not self.columns:  # a constant prompt still yields one value per row
            text = "".join(p for p in self.parts if isinstance(p, str))
            return pl.repeat(pl.lit(text, pl.String), pl.len())
        pieces = [
            pl.lit(p, pl.String)
            if isinstance(p, str)
            else _as_text(p[0], schema).fill_null("")
            if fill_null
            else _as_text(p[0], schema)
            for p in self.parts
        ]
        return pl.concat_str(pieces, ignore_nulls=False)


def _close_names(missing: list[str], names: list[str]) -> str:
    import difflib

    close = [m for c in missing for m in difflib.get_close_matches(c, names, n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_text(column: str, schema: pl.Schema | None) -> pl.Expr:
    """A column as prompt text: strings as they are, nested values as JSON, the rest cast."""
    dtype = schema.get(column) if schema is not None else None
    col = pl.col(column)
    if dtype is None or dtype == pl.String:
        return col
    if isinstance(dtype, (pl.Struct, pl.List, pl.Array)):
        # JSON, not polars' repr: a model reads `{"a": 1}` better than `{1}`.
        return json_text(col)
    return col.cast(pl.String)


def prompt_expr(
    prompt: str | pl.Expr | Template,
    schema: pl.Schema,
    what: str = "prompt",
    *,
    fill_null: bool = False,
) -> pl.Expr:
    """Accept a template string, a parsed template or a polars expression; return a String expression."""
    if isinstance(prompt, pl.Expr):
        missing = [n for n in prompt.meta.root_names() if n not in schema]
        if missing:
            raise LlmBatchError(
                f"{what} expression reads column(s) {missing} that the frame does not have; "
                f"the columns are {list(schema.names())}"
            )
        text = prompt.cast(pl.String)
        return text.fill_null("") if fill_null else text
    if isinstance(prompt, str):
        if re.fullmatch(r"\w+", prompt) and prompt not in schema:
            # A bare word is a column name gone wrong far more often than a prompt.
            raise LlmBatchError(
                f"{what} {prompt!r} is not a column of the frame"
                f"{_close_names([prompt], list(schema.names()))}; the columns are "
                f"{list(schema.names())}. Name a column in braces, e.g. '{{body}}', or pass "
                f"pl.lit({prompt!r}) to send that one word for every row"
            )
        prompt = Template.parse(prompt)
    if not isinstance(prompt, Template):
        raise LlmBatchError(
            f"{what} must be a template string like 'Classify: {{body}}' or a polars expression, "
            f"not {type(prompt).__name__}"
        )
    prompt.check(schema, what)
    return prompt.expr(schema, fill_null=fill_null)
