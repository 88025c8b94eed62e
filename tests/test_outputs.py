from __future__ import annotations

import polars as pl
import pytest
from pydantic import BaseModel

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan.outputs import parse_output


def test_text_output_default_and_named() -> None:
    assert parse_output(None).columns == {"label": pl.String()}
    spec = parse_output("summary")
    assert spec.kind == "text" and spec.schema is None and spec.columns == {"summary": pl.String()}


def test_categories_and_enum_give_a_strict_enum_schema() -> None:
    for out in (["a", "b"], pl.Enum(["a", "b"])):
        spec = parse_output(out)
        assert spec.kind == "enum"
        assert spec.columns == {"label": pl.Enum(["a", "b"])}
        assert spec.schema == {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
            "required": ["label"],
            "additionalProperties": False,
        }


def test_mapping_of_dtypes() -> None:
    spec = parse_output(
        {
            "label": ["x", "y"],
            "score": pl.Float64,
            "n": int,
            "ok": pl.Boolean(),
            "when": pl.Date,
            "tags": pl.List(pl.String),
            "who": pl.Struct({"name": pl.String, "age": pl.Int32}),
        }
    )
    props = spec.schema["properties"]
    assert props["label"] == {"type": "string", "enum": ["x", "y"]}
    assert props["score"] == {"type": "number"} and props["n"] == {"type": "integer"}
    assert props["when"] == {"type": "string", "format": "date"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["who"]["required"] == ["name", "age"]
    assert props["who"]["additionalProperties"] is False
    assert spec.columns["n"] == pl.Int64() and spec.columns["who"] == pl.Struct(
        {"name": pl.String, "age": pl.Int32}
    )


class Address(BaseModel):
    city: str
    zip_code: str


class Ticket(BaseModel):
    category: str
    urgency: int
    address: Address
    tags: list[str]


class Loose(BaseModel):
    note: str | None = None


def test_pydantic_model() -> None:
    spec = parse_output(Ticket)
    assert spec.kind == "struct" and spec.strict and spec.name == "Ticket"
    assert spec.columns == {
        "category": pl.String(),
        "urgency": pl.Int64(),
        "address": pl.Struct({"city": pl.String, "zip_code": pl.String}),
        "tags": pl.List(pl.String),
    }
    assert spec.schema["additionalProperties"] is False
    assert spec.schema["$defs"]["Address"]["additionalProperties"] is False
    assert not parse_output(Loose).strict  # optional fields: strict mode would reject the schema


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([], "give at least two"),
        (["a", "a"], "unique; repeated: \\['a'\\]"),
        (["a", 3], "non-empty strings"),
        ({}, "mapping is empty"),
        ({"x": pl.Binary}, "no JSON-schema form"),
        ({"x": "int"}, "not a polars dtype"),
        ("", "non-empty column name"),
        (3.5, "must be a column name"),
    ],
)
def test_bad_outputs(bad: object, match: str) -> None:
    with pytest.raises(LlmBatchError, match=match):
        parse_output(bad)


class Article(BaseModel):
    title: str
    default: int
    score: float


def test_fields_named_like_schema_keywords_survive() -> None:
    spec = parse_output(Article)
    assert spec.columns == {"title": pl.String(), "default": pl.Int64(), "score": pl.Float64()}
    assert set(spec.schema["properties"]) == {"title", "default", "score"}
    assert spec.strict and "title" not in spec.schema  # the model's own title is dropped
