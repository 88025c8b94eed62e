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
