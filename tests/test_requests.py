from __future__ import annotations

import hashlib
import json
import re

import polars as pl
import pytest
from pydantic import BaseModel

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan.requests import ROW_NR, prepare, request_digest

ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
KW = {"provider": "openai", "model": "gpt-4o-mini"}


def test_dedup_mapping_and_skipped_rows(tickets: pl.DataFrame) -> None:
    p = prepare(tickets, "Classify: {body}", id="ticket_id", **KW)
    rows = p.rows
    assert rows.columns == ["ticket_id", "custom_id", "skipped"]
    assert rows["skipped"].to_list() == [False, False, True, False, False]
    assert rows["custom_id"][0] == rows["custom_id"][3]  # identical prompts share a request
    assert rows["custom_id"][2] is None
    assert p.requests.height == 3
    assert p.requests.filter(pl.col("custom_id") == rows["custom_id"][0])["row"].item() == 0
    assert all(ID_PATTERN.match(k) for k in p.requests["custom_id"])
    for body, user in p.requests.select("body", "user").iter_rows():
        assert json.loads(body)["messages"][-1]["content"] == user  # escaping round-trips


def test_ids_stable_across_runs_and_row_order(tickets: pl.DataFrame) -> None:
    a = prepare(tickets, "Classify: {body}", **KW)
    b = prepare(tickets.reverse(), "Classify: {body}", **KW)
    assert a.requests["custom_id"].to_list() == b.requests["custom_id"].to_list()
    assert a.requests["body"].to_list() == b.requests["body"].to_list()
    # a pinned value: the id must not change between releases (it names paid-for results)
    one = prepare(pl.DataFrame({"t": ["hello"]}), "{t}", **KW)
    assert one.requests["custom_id"].item() == "d6bd23e8530024facc8bebfb039ade27"
    # ... and it is the documented definition: MD5 of the shared digest (provider, endpoint,
    # body skeleton) followed by the length-prefixed texts
    skeleton = one.provider.body(one.spec, ("user",))
    assert json.loads(one.requests["body"].item()) == {
        **skeleton,
        "messages": [{"role": "user", "content": "hello"}],
    }
    canonical = request_digest(one.provider, one.spec, skeleton) + "\x1f5:hello"
    assert hashlib.md5(canonical.encode()).hexdigest() == "d6bd23e8530024facc8bebfb039ade27"


def test_ids_change_with_anything_in_the_body(tickets: pl.DataFrame) -> None:
    base = set(prepare(tickets, "Classify: {body}", **KW).requests["custom_id"])
    variants = [
        prepare(tickets, "Classify: {body}", provider="openai", model="gpt-4o"),
        prepare(tickets, "Classify: {body}", options={"temperature": 0.5}, **KW),
        prepare(tickets, "Classify: {body}", system="Be brief.", **KW),
        prepare(tickets, "Classify: {body}", output=["a", "b"], **KW),
        prepare(tickets, "Classify: {body}", api="responses", **KW),
        prepare(tickets, "Classify:  {body}", **KW),
    ]
    for v in variants:
        assert base.isdisjoint(v.requests["custom_id"])


def test_length_prefix_keeps_split_texts_apart() -> None:
    df = pl.DataFrame({"s": ["ab", "a"], "u": ["c", "bc"]})
    p = prepare(df, "{u}", system="{s}", **KW)
    assert p.requests.height == 2


def test_id_column_must_be_unique_and_exist(tickets: pl.DataFrame) -> None:
    dup = tickets.with_columns(pl.Series("ticket_id", ["T1", "T2", "T1", "T4", "T4"]))
    with pytest.raises(LlmBatchError, match=r"repeat: 'T1' \(2 rows\), 'T4' \(2 rows\)"):
        prepare(dup, "{body}", id="ticket_id", **KW)
    with pytest.raises(LlmBatchError, match=r"id= names column 'nope'.*'ticket_id'"):
        prepare(tickets, "{body}", id="nope", **KW)


def test_null_policies(tickets: pl.DataFrame) -> None:
    empty = prepare(tickets, "Classify: {body}", on_null="empty", **KW)
    assert not empty.rows["skipped"].any()
    assert "Classify: " in empty.requests["user"].to_list()
    with pytest.raises(LlmBatchError, match=r"first at row 2 \(ticket_id='T3'\)"):
        prepare(tickets, "Classify: {body}", on_null="error", id="ticket_id", **KW)
    with pytest.raises(LlmBatchError, match="on_null"):
        prepare(tickets, "{body}", on_null="drop", **KW)  # type: ignore[arg-type]


def test_lazyframe_and_row_key(tickets: pl.DataFrame) -> None:
    p = prepare(tickets.lazy(), "{body}", **KW)
    assert p.key == ROW_NR
    assert p.rows[ROW_NR].to_list() == [0, 1, 2, 3, 4]


def test_per_row_system_prompt(tickets: pl.DataFrame) -> None:
    p = prepare(tickets, "{body}", system="Priority {priority}.", **KW)
    assert p.spec.system_per_row
    body = json.loads(p.requests["body"][0])
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][0]["content"].startswith("Priority ")


def test_requests_frame_and_shard_files(tickets: pl.DataFrame, tmp_path) -> None:
    reqs = tickets.llm.requests("{body}", id="ticket_id", write_to=tmp_path, **KW)
    assert reqs.columns == ["ticket_id", "custom_id", "body"]
    assert reqs["ticket_id"].to_list() == tickets["ticket_id"].to_list()
    lines = (tmp_path / "00000.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        obj = json.loads(line)
        assert obj.keys() == {"custom_id", "method", "url", "body"}
        assert obj["url"] == "/v1/chat/completions" and obj["method"] == "POST"
        row = reqs.filter(pl.col("custom_id") == obj["custom_id"]).row(0, named=True)
        assert json.loads(row["body"]) == obj["body"]


def test_bad_arguments_fail_before_reading_data() -> None:
    class Exploding(pl.LazyFrame):  # pragma: no cover - must never be collected
        pass

    df = pl.DataFrame({"body": ["x"]})
    with pytest.raises(LlmBatchError, match=r"unknown provider 'openia'.*anthropic"):
        prepare(df, "{body}", provider="openia", model="m")
    with pytest.raises(LlmBatchError, match="unknown generation option"):
        prepare(df, "{body}", options={"temprature": 1}, **KW)
    with pytest.raises(LlmBatchError, match="model="):
        prepare(df, "{body}", provider="openai", model="")


def test_ids_follow_the_body_not_the_python_objects() -> None:
    class A(BaseModel):
        x: int

    class B(BaseModel):
        x: int

    df = pl.DataFrame({"t": ["same text"]})
    a = prepare(df, "{t}", output=A, **KW)
    b = prepare(df, "{t}", output=B, **KW)
    assert a.requests["body"].item() != b.requests["body"].item()  # the schema's name differs
    assert a.requests["custom_id"].item() != b.requests["custom_id"].item()
    # the target dtype of a field is not part of the request: same body, same id
    i32 = prepare(df, "{t}", output={"x": pl.Int32}, **KW)
    i64 = prepare(df, "{t}", output={"x": pl.Int64}, **KW)
    assert i32.requests["custom_id"].item() == i64.requests["custom_id"].item()


@pytest.mark.parametrize("name", ["user", "system", "row", "row_nr", "_pos"])
def test_columns_named_like_internals_work(name: str) -> None:
    df = pl.DataFrame({name: ["k1", "k2"], "text": ["a", None]})
    p = prepare(df, "{text} {" + name + "}", id=name, **KW)
    assert p.rows[name].to_list() == ["k1", "k2"] and p.requests.height == 1
    with pytest.raises(LlmBatchError, match=r"first at row 1"):
        prepare(df, "{text}", id=name, on_null="error", **KW)


@pytest.mark.parametrize("name", ["custom_id", "skipped", "body"])
def test_reserved_id_names_are_refused(name: str) -> None:
    df = pl.DataFrame({name: ["k1"], "text": ["a"]})
    with pytest.raises(
        LlmBatchError, match=f"id= column '{name}' has a name the request frames use"
    ):
        prepare(df, "{text}", id=name, **KW)


def test_argument_checks() -> None:
    df = pl.DataFrame({"t": ["a"], "lang": ["fr"]})
    with pytest.raises(LlmBatchError, match="task= must be 'generate' or 'embed'"):
        prepare(df, "{t}", task="embedding", **KW)  # type: ignore[arg-type]
    with pytest.raises(LlmBatchError, match="output= applies to generation"):
        prepare(
            df, "{t}", provider="openai", model="text-embedding-3-small", task="embed", output="x"
        )
    with pytest.raises(LlmBatchError, match="dimensions= applies to embeddings"):
        prepare(df, "{t}", dimensions=64, **KW)
    with pytest.raises(LlmBatchError, match="not JSON"):
        prepare(df, "{t}", extra_body={"x": object()}, **KW)
    from polars_llmbatch import Template

    p = prepare(df, "{t}", system=Template.parse("Answer in {lang}"), **KW)
    assert json.loads(p.requests["body"].item())["messages"][0]["content"] == "Answer in fr"


def test_empty_embedding_input_is_refused_early() -> None:
    df = pl.DataFrame({"t": ["a", "", None]})
    kw = {"provider": "openai", "model": "text-embedding-3-small", "task": "embed"}
    with pytest.raises(
        LlmBatchError, match="empty text, which embedding APIs reject, first at row 1"
    ):
        prepare(df, "{t}", **kw)
    with pytest.raises(LlmBatchError, match="first at row 1"):
        prepare(df, "{t}", on_null="empty", **kw)
