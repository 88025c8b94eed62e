"""Rows get their own answers, whatever the caller names columns and however a LazyFrame
orders its rows when evaluated again; paid results stay readable."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.errors import LlmBatchError
from tests.helpers import batch

CATS = ["billing", "bug"]


@pytest.mark.parametrize(
    "output",
    [
        {"status": pl.String, "reply": pl.String},
        {"error": pl.String},
        {"cost": pl.Float64, "invalid": pl.String},
        {"custom_id": pl.String, "skipped": pl.Boolean},
    ],
)
def test_output_fields_named_like_internal_columns_come_back(tmp_path: Path, output) -> None:
    df = pl.DataFrame({"body": ["a refund", "a crash", None]})
    with serve(batch_seconds=0.05) as emu:
        out = batch(df, emu, tmp_path / "j", output=output, usage=True)
        reopened = polars_llmbatch.Job.open(tmp_path / "j").result(usage=True)
    assert out.columns == [
        "body",
        *output,
        "llm_status",
        "llm_error",
        "llm_input_tokens",
        "llm_output_tokens",
        "llm_cost",
    ]
    assert out["llm_status"].to_list() == ["succeeded", "succeeded", "skipped"]
    assert reopened.columns[0] == "row_nr" and reopened["llm_status"].to_list()[2] == "skipped"
    # The emulator fills a string field with "<field> for: <the prompt's first 5 words>".
    for field, dtype in output.items():
        if dtype == pl.String:
            assert out[field].to_list() == [
                f"{field} for: Classify: a refund",
                f"{field} for: Classify: a crash",
                None,
            ]
            assert reopened[field].to_list() == out[field].to_list()


def test_free_text_named_skipped_or_custom_id_holds_the_answer(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": ["a refund", None]})
    with serve(batch_seconds=0.05) as emu:
        a = batch(df, emu, tmp_path / "a", output="skipped")
        b = batch(df, emu, tmp_path / "b", output="custom_id")
    assert a["skipped"].to_list() == ["Emulated answer to: Classify: a refund", None]
    assert b["custom_id"].to_list() == ["Emulated answer to: Classify: a refund", None]


@pytest.mark.parametrize("key", ["status", "error", "llm_cost"])
def test_an_id_column_named_like_internal_columns_keeps_its_values(tmp_path: Path, key) -> None:
    df = pl.DataFrame({key: ["k1", "k2"], "body": ["a refund", "a crash"]})
    with serve(batch_seconds=0.05) as emu:
        out = batch(df, emu, tmp_path / "j", id=key, output=CATS)
        reopened = polars_llmbatch.Job.open(tmp_path / "j").result()
    assert out[key].to_list() == ["k1", "k2"]
    assert out["llm_status"].to_list() == ["succeeded", "succeeded"]
    assert reopened[key].to_list() == ["k1", "k2"] and reopened["llm_error"].null_count() == 2


@pytest.mark.parametrize(
    ("kw", "bad"),
    [
        ({"output": "llm_status"}, "llm_status"),
        ({"output": {"llm_cost": pl.Float64}}, "llm_cost"),
        ({"output": "ticket", "id": "ticket"}, "ticket"),
        ({"output": "row_nr"}, "row_nr"),
        ({"output": {"__llmbatch_x": pl.String}}, "__llmbatch_x"),
    ],
)
def test_names_that_cannot_be_honoured_are_refused_before_sending(tmp_path, kw, bad) -> None:
    df = pl.DataFrame({"ticket": ["t1"], "body": ["a refund"]})
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match=bad):
            batch(df, emu, tmp_path / "j", **kw)
        assert emu.ledger.batches == [] and not (tmp_path / "j").exists()


def _grouped(path: Path) -> pl.LazyFrame:
    # group_by without maintain_order: each evaluation may give the groups in another order.
    return pl.scan_parquet(path).group_by("customer").agg(pl.col("body").first())


def test_a_lazyframe_whose_order_changes_gets_answers_on_its_own_rows(tmp_path: Path) -> None:
    n = 3000
    src = tmp_path / "in.parquet"
    pl.DataFrame(
        {"customer": [f"c{i}" for i in range(n)], "body": [f"ticket text {i}" for i in range(n)]}
    ).write_parquet(src)
    with serve(batch_seconds=0.05) as emu:
        lazy = batch(_grouped(src), emu, tmp_path / "j", output="answer", usage=True)
        keyed = batch(_grouped(src), emu, tmp_path / "k", output="answer", id="customer")
    assert isinstance(lazy, pl.LazyFrame)
    orders = set()
    for plan in (lazy, keyed, lazy, keyed):
        out = plan.collect()
        orders.add(tuple(out["customer"].head(20)))
        assert out.height == n and set(out["llm_status"]) == {"succeeded"}
        expected = [f"Emulated answer to: Classify: {b}" for b in out["body"]]
        assert out["answer"].to_list() == expected
    if "llm_cost" in out.columns:
        assert out["llm_cost"].sum() > 0
    assert len(orders) > 1, "the plan was expected to reorder its rows between evaluations"


def test_a_lazyframe_row_that_was_not_in_the_job_is_not_given_an_answer(tmp_path: Path) -> None:
    data = {"body": ["one", "two", None]}
    # A source read afresh at every evaluation (as a warehouse table or a nightly export).
    source = pl.defer(lambda: pl.DataFrame(data), schema={"body": pl.String})
    with serve(batch_seconds=0.05) as emu:
        out = batch(source, emu, tmp_path / "j", output="answer")
        data["body"] = ["two", "three", None]  # the data moved on
        got = out.collect()
    assert got["answer"].to_list() == ["Emulated answer to: Classify: two", None, None]
    assert got["llm_status"].to_list() == ["succeeded", None, "skipped"]
    assert "not part of the job" in got["llm_error"][1]


def test_gemini_inline_responses_without_metadata_land_on_their_requests(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(40)] + ["ticket 3"]})
    with serve(batch_seconds=0.05, faults=Faults(no_inline_keys=1)) as emu:
        out = batch(df, emu, tmp_path / "g", provider="gemini", output="answer")
        assert len(emu.ledger.batches) == 1  # one inline batch, never sent again
        assert len(emu.ledger.billed) == 40 and not emu.ledger.billed_twice()
    assert set(out["llm_status"]) == {"succeeded"}
    assert out["answer"].to_list() == [f"Emulated answer to: Classify: {b}" for b in df["body"]]


def test_status_counts_rows_as_result_does(tmp_path: Path) -> None:
    """One definition of a row's status: an answer cut at the token cap is ``invalid_output``
    in ``status()`` exactly as in ``result()`` (status once counted it as succeeded)."""
    df = pl.DataFrame({"body": ["a refund please", "the app crashes", None, "a refund please"]})
    with serve(batch_seconds=0.05) as emu:
        out = batch(df, emu, tmp_path / "j", output=["billing", "bug"], max_output_tokens=2)
        job = polars_llmbatch.Job.open(tmp_path / "j")
        counts = job.status(refresh=False).rows
    from_result = out["llm_status"].value_counts()
    expected = dict(from_result.iter_rows())
    assert expected == {"invalid_output": 3, "skipped": 1}
    assert {k: v for k, v in counts.items() if v} == expected
