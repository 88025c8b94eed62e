"""Results → typed columns and row statuses, without a provider: invalid output, duplicates,
pending rows, and the checkpoint's event log surviving a torn line."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from polars_llmbatch.collect.reconcile import CID as CID_COLUMN
from polars_llmbatch.collect.reconcile import (
    INVALID,
    best_results,
    decode_outputs,
    join_rows,
    unsettled,
)
from polars_llmbatch.collect.results import RESULT_SCHEMA, finish_parse
from polars_llmbatch.plan.outputs import parse_output
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.run.checkpoint import Checkpoint

CATS = ["billing", "bug"]


def results(rows: list[tuple[str, str, str | None]], attempt: int = 1) -> pl.DataFrame:
    df = pl.DataFrame(
        {
            "custom_id": [r[0] for r in rows],
            "status": [r[1] for r in rows],
            "text": [r[2] for r in rows],
        }
    )
    return finish_parse(df).with_columns(
        pl.lit(attempt, pl.Int32).alias("attempt"),
        pl.lit(attempt - 1, pl.Int32).alias("shard"),
        pl.lit("batch").alias("mode"),
    )


def spec(output) -> RequestSpec:
    return RequestSpec("openai", "gpt-4o-mini", output=parse_output(output))


def test_struct_outputs_are_typed_and_bad_ones_are_invalid_output() -> None:
    out = {"category": pl.Enum(CATS), "urgency": pl.Int64, "tags": pl.List(pl.String)}
    got = decode_outputs(
        results(
            [
                ("a", "succeeded", '{"category": "bug", "urgency": 3, "tags": ["x"]}'),
                ("b", "succeeded", '{"category": "bug", "urgency": "high", "tags": []}'),
                ("c", "succeeded", '{"category": "refund", "urgency": 1, "tags": []}'),
                ("d", "succeeded", '{"category": "bug", "urg'),
                ("e", "succeeded", '{"urgency": 1, "tags": []}'),
                ("f", "errored", None),
            ]
        ),
        spec(out),
    )
    assert got.schema["category"] == pl.Enum(CATS) and got.schema["urgency"] == pl.Int64
    assert got.row(0) == ("a", "bug", 3, ["x"], None)
    reasons = got[INVALID].to_list()
    assert "wrong type" in reasons[1] and '"urgency": "high"' in reasons[1]
    assert "'category' is missing or not one of its allowed values" in reasons[2]
    assert "not valid JSON" in reasons[3] and reasons[3].endswith('{"category": "bug", "urg')
    assert "'category' is missing" in reasons[4]
    assert reasons[5] is None and got.row(5)[1:4] == (None, None, None)
    assert got["category"][1:5].null_count() == 4  # an invalid row carries no half-output


def test_optional_fields_may_be_null() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Ticket(pydantic.BaseModel):
        category: str
        note: str | None

    got = decode_outputs(
        results([("a", "succeeded", '{"category": "x", "note": null}')]), spec(Ticket)
    )
    assert got.row(0) == ("a", "x", None, None)


def test_join_rows_statuses_and_first_row_usage() -> None:
    rows = pl.DataFrame(
        {
            "row_nr": [0, 1, 2, 3, 4],
            "custom_id": ["a", "b", None, "a", "c"],
            "skipped": [False, False, True, False, False],
        }
    )
    res = pl.concat(
        [
            results([("a", "succeeded", '{"label": "bug"}'), ("b", "succeeded", '{"label": "x"}')]),
        ]
    ).with_columns(
        pl.lit(10, pl.Int64).alias("input_tokens"), pl.lit(2, pl.Int64).alias("output_tokens")
    )
    price = {"batch_input": 1.0, "batch_output": 2.0}
    out = join_rows(rows, res, spec(CATS), price=price, usage=True)
    assert out["llm_status"].to_list() == [
        "succeeded",
        "invalid_output",
        "skipped",
        "succeeded",
        "pending",
    ]
    assert out["label"].to_list() == ["bug", None, None, "bug", None]
    assert out["llm_input_tokens"].to_list() == [10, 10, 0, 0, None]
    assert out["llm_cost"][0] == pytest.approx(14e-6)


def test_a_later_success_wins_over_an_earlier_failure_and_never_the_reverse() -> None:
    first = results([("a", "expired", None), ("b", "succeeded", "ok")], attempt=1)
    second = results([("a", "succeeded", "late"), ("b", "errored", None)], attempt=2)
    best = best_results(pl.concat([first, second]))
    assert best.select("custom_id", "status", "text").rows() == [
        ("a", "succeeded", "late"),
        ("b", "succeeded", "ok"),
    ]


def test_unsettled_keeps_every_attempt_of_the_requests_a_retry_can_pick(tmp_path: Path) -> None:
    """Hand-made results over three files: a request is unsettled when none of its attempts
    succeeded and one ended unanswered; all its rows come back, in file order."""
    folder = tmp_path / "results"
    folder.mkdir()
    rounds = [
        [("a", "expired"), ("b", "succeeded"), ("c", "missing"), ("d", "errored"), ("e", "errored")],
        [("a", "succeeded"), ("c", "missing"), ("d", "canceled")],
        [("c", "errored"), ("f", "succeeded")],
    ]  # fmt: skip
    for n, rows in enumerate(rounds, 1):
        frame = results([(cid, status, "x" if status == "succeeded" else None)
                         for cid, status in rows], attempt=n)  # fmt: skip
        frame.write_parquet(folder / f"{n:05d}.parquet")
    got = unsettled(Checkpoint(tmp_path))
    # a and b and f succeeded at some attempt; c, d and e never did
    assert got.select("custom_id", "attempt", "status").rows() == [
        ("c", 1, "missing"), ("d", 1, "errored"), ("e", 1, "errored"),
        ("c", 2, "missing"), ("d", 2, "canceled"),
        ("c", 3, "errored"),
    ]  # fmt: skip
    (folder / "00001.parquet").unlink()
    (folder / "00002.parquet").unlink()
    assert unsettled(Checkpoint(tmp_path)).select("custom_id").to_series().to_list() == ["c"]
    (folder / "00003.parquet").unlink()
    assert unsettled(Checkpoint(tmp_path)).is_empty()


def test_duplicate_lines_keep_the_success() -> None:
    raw = pl.DataFrame(
        {
            "custom_id": ["a", "a", "b"],
            "status": ["errored", "succeeded", "errored"],
            "text": [None, "x", None],
        }
    )
    got = finish_parse(raw)
    assert got.schema == RESULT_SCHEMA
    assert sorted(got.select("custom_id", "status").rows()) == [
        ("a", "succeeded"),
        ("b", "errored"),
    ]


def test_a_torn_last_event_is_ignored(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path)
    ck.append(
        "planned",
        shards=[
            {
                "shard": 0,
                "attempt": 1,
                "requests": 3,
                "sha256": "x",
                "tag": "t",
                "filename": "00000.jsonl",
            }
        ],
    )
    ck.append("submitted", shard=0, remote_id="batch_1")
    with open(ck.events_file, "ab") as f:
        f.write(b'{"at": "2026", "event": "done", "sha')  # killed mid-write
    (rec,) = ck.shards().values()
    assert rec.remote_id == "batch_1" and not rec.done
    ck.append("done", shard=0)  # the next run's events start on a line of their own
    assert ck.shards()[0].done


def test_fsync_opens_files_writable_on_windows_and_skips_directories(tmp_path, monkeypatch):
    import os
    import sys

    from polars_llmbatch import _fs

    f = tmp_path / "a.parquet"
    f.write_bytes(b"x")
    opened: list[tuple[str, int]] = []
    real = os.open
    monkeypatch.setattr(
        os, "open", lambda p, flags, *a: opened.append((str(p), flags)) or real(p, flags, *a)
    )
    monkeypatch.setattr(sys, "platform", "win32")
    _fs.fsync(f)
    _fs.fsync(tmp_path)
    assert opened == [(str(f), os.O_RDWR)]  # os.fsync needs a writable handle there
    monkeypatch.setattr(sys, "platform", "linux")
    _fs.fsync(tmp_path)
    assert opened[-1] == (str(tmp_path), os.O_RDONLY)


def test_every_answer_is_checked_against_the_schema_sent() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Score(pydantic.BaseModel):
        score: int = pydantic.Field(ge=1, le=5)

    out = {
        "tags": pl.List(pl.Enum(["a", "b"])),
        "customer": pl.Struct({"name": pl.String, "vip": pl.Boolean}),
        "count": pl.Int64,
    }
    good = '{"tags": ["a"], "customer": {"name": "x", "vip": true}, "count": 7}'
    got = decode_outputs(
        results(
            [
                ("ok", "succeeded", good),
                ("enum", "succeeded", good.replace('["a"]', '["a", "zzz"]')),
                ("nested", "succeeded", good.replace(', "vip": true', "")),
                ("float", "succeeded", good.replace('"count": 7', '"count": 7.5')),
            ]
        ),
        spec(out),
    )
    reasons = dict(zip(got[CID_COLUMN], got[INVALID], strict=True))
    assert reasons["ok"] is None and got["count"][0] == 7
    assert "zzz" in reasons["enum"] and "not one of" in reasons["enum"]
    assert 'at customer: "vip" is a required property' in reasons["nested"]
    assert "7.5 is not of type" in reasons["float"]
    assert got["count"][3] is None  # never silently truncated to 7
    scored = decode_outputs(
        results([("in", "succeeded", '{"score": 4}'), ("out", "succeeded", '{"score": 9}')]),
        spec(Score),
    )
    assert scored[INVALID].to_list()[0] is None
    assert "9 is greater than the maximum of 5" in scored[INVALID][1]
