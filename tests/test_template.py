from __future__ import annotations

import polars as pl
import pytest

from polars_llmbatch import LlmBatchError, Template
from polars_llmbatch.plan.template import prompt_expr


def render(frame: pl.DataFrame, prompt: str | pl.Expr) -> list[str | None]:
    return frame.select(prompt_expr(prompt, frame.schema)).to_series().to_list()


def test_columns_and_literal_braces() -> None:
    t = Template.parse("A {x} and {{literal}} {y} {x}")
    assert t.columns == ("x", "y")
    df = pl.DataFrame({"x": ["1"], "y": ["2"]})
    assert render(df, t.source) == ["A 1 and {literal} 2 1"]


def test_template_without_columns_and_empty() -> None:
    df = pl.DataFrame({"x": ["a", "b"]})
    assert render(df, "a constant") == ["a constant", "a constant"]
    assert render(df, "{{}}") == ["{}", "{}"]


@pytest.mark.parametrize("bad", ["open { brace", "close } brace", "empty {} here", "{ }"])
def test_malformed_templates(bad: str) -> None:
    with pytest.raises(LlmBatchError, match=r"brace|placeholder"):
        Template.parse(bad)


def test_unknown_column_names_it_and_lists_columns() -> None:
    df = pl.DataFrame({"body": ["x"], "title": ["y"]})
    with pytest.raises(LlmBatchError) as e:
        df.llm.estimate("Classify {bdy}", provider="openai", model="gpt-4o-mini")
    msg = str(e.value)
    assert "'bdy'" in msg and "['body', 'title']" in msg


def test_expression_prompt_and_missing_column_in_expression() -> None:
    df = pl.DataFrame({"a": ["x", "y"]})
    assert render(df, pl.col("a").str.to_uppercase()) == ["X", "Y"]
    with pytest.raises(LlmBatchError, match=r"\['nope'\]"):
        prompt_expr(pl.col("nope"), df.schema)


def test_non_string_and_nested_columns_render_as_text() -> None:
    df = pl.DataFrame(
        {
            "n": [1, None],
            "f": [1.5, 2.0],
            "b": [True, False],
            "s": [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}],
            "l": [["p", "q"], []],
        }
    )
    out = render(df, "{n}|{f}|{b}|{s}|{l}")
    assert out[0] == '1|1.5|true|{"k":1,"v":"a"}|["p","q"]'
    assert out[1] is None  # a null input renders to null (the row is skipped)


def test_wrong_prompt_type() -> None:
    with pytest.raises(LlmBatchError, match="template string"):
        prompt_expr(42, pl.Schema({"a": pl.String}))  # type: ignore[arg-type]


@pytest.mark.parametrize("escape", [True, False])
def test_a_templates_length_is_the_length_of_its_text(escape: bool) -> None:
    """template_length counts without building: against the built text's own length, for
    every character JSON escapes (controls, quotes, backslash), multi-byte text, the line
    separators, an empty text, a null and two slots."""
    from polars_llmbatch import _json

    texts = [chr(c) for c in range(0x20)] + ['"', "\\", "\x7f", "é", "日本", "🎉", "", None]
    texts += ["\u2028", "a\u2029b", 'mixed "\n\t" \\ é 🎉 \u2028']
    df = pl.DataFrame({"a": texts, "b": list(reversed(texts))})
    skeleton = {"m": "gpt\u2028x", "messages": [{"c": _json.slot("a")}, {"c": _json.slot("b")}]}
    slots = {"a": pl.col("a"), "b": pl.col("b")}
    built = df.select(_json.template(skeleton, slots, escape_line_separators=escape).alias("t"))
    length = df.select(
        _json.template_length(skeleton, slots, escape_line_separators=escape).alias("n")
    )
    assert length["n"].to_list() == built["t"].str.len_bytes().cast(pl.Int64).to_list()
    assert length["n"].null_count() == 2  # a null text: no body, no length
