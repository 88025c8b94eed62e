"""mode="flex" (sync calls at batch prices) and mode="auto" with a deadline=, against the
emulator; expected costs from the emulator's own rates (emulator/reports.py), not the
library's."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest
from helpers import MODELS, batch

from polars_llmbatch import LlmBatchError
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.emulator.reports import rates

CATS = ["billing", "bug"]


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"body": [f"ticket {i}: refund {i}" for i in range(n)]})


def list_cost(emu, provider: str, half: bool) -> float:
    """What the emulator billed, at its own rates (half for batch and flex)."""
    total = 0.0
    for b in emu.ledger.billed:
        r = rates(provider, b["model"], batch=half)
        total += b["input_tokens"] * r["input"] + b["output_tokens"] * r["output"]
    return total


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_flex_is_sync_at_batch_prices_and_waits_out_capacity_refusals(
    tmp_path: Path, provider: str
) -> None:
    with serve(faults=Faults(flex_unavailable=4)) as emu:
        out = batch(frame(30), emu, tmp_path / "j", provider, output=CATS, mode="flex",
                    usage=True)  # fmt: skip
        bills = emu.ledger.billed
        expected = list_cost(emu, provider, half=True)
    assert set(out["llm_status"]) == {"succeeded"}
    assert len(bills) == 30 and {b["tier"] for b in bills} == {"flex"}  # refusals unbilled
    assert len({b["input_tokens"] for b in bills}) >= 1 and not emu.ledger.batches
    assert out["llm_cost"].sum() == pytest.approx(expected, rel=1e-6)
    job = json.loads((tmp_path / "j" / "job.json").read_text())
    assert job["mode"] == "flex"


def test_flex_where_there_is_none_is_refused_before_sending(tmp_path: Path) -> None:
    with serve() as emu:
        with pytest.raises(LlmBatchError, match="anthropic requests have no flex tier"):
            batch(frame(3), emu, tmp_path / "a", "anthropic", output=CATS, mode="flex")
        with pytest.raises(LlmBatchError, match="embeddings have no flex tier"):
            frame(3).llm.embed("body", provider="openai", model="text-embedding-3-small",
                               mode="flex", checkpoint=tmp_path / "e", api_key="k",
                               base_url=emu.openai_url, progress=False)  # fmt: skip
        assert not emu.ledger.billed


@pytest.mark.parametrize(("provider", "fallback"), [("openai", "flex"), ("anthropic", "sync")])
def test_at_the_deadline_running_batches_stop_and_the_rest_goes_by_the_fallback(
    tmp_path: Path, provider: str, fallback: str
) -> None:
    n = 300
    # a batch that takes 20 s (its cancel 2 s more) and a deadline at 3 s: some of it runs
    with serve(batch_seconds=20) as emu:
        out = batch(frame(n), emu, tmp_path / "j", provider, output=CATS, mode="batch",
                    deadline=3.0)  # fmt: skip
        bills = emu.ledger.billed
        tiers = {b["tier"] for b in bills}
    assert set(out["llm_status"]) == {"succeeded"} and out.height == n
    # paid once each: what the batch ran before the cancel, and the rest by the fallback
    ids = [b["custom_id"] for b in bills if b["custom_id"]]
    assert len(bills) == n and len(ids) == len(set(ids))
    assert tiers == {"batch", fallback}
    events = [json.loads(x) for x in (tmp_path / "j" / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("deadline_reached") == 1 and "cancel_sent" in kinds
    planned = [s["mode"] for e in events if e["event"] == "planned" for s in e["shards"]]
    assert planned[0] == "batch" and set(planned[1:]) == {fallback}
    job = json.loads((tmp_path / "j" / "job.json").read_text())
    assert job["mode"] == "batch" and job["fallback"] == fallback and job["deadline"]


def test_a_deadline_too_near_for_a_batch_goes_straight_to_flex(tmp_path: Path) -> None:
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
    with serve() as emu:
        out = batch(frame(250), emu, tmp_path / "j", "openai", output=CATS, mode="auto",
                    deadline=soon)  # fmt: skip
        assert not emu.ledger.batches and {b["tier"] for b in emu.ledger.billed} == {"flex"}
    assert set(out["llm_status"]) == {"succeeded"}
    assert (
        json.loads((tmp_path / "j-flex" / "job.json").read_text())["mode"] == "flex"
        if (tmp_path / "j-flex").exists()
        else json.loads((tmp_path / "j" / "job.json").read_text())["mode"] == "flex"
    )


@pytest.mark.parametrize(
    ("deadline", "message"),
    [
        (-5, "takes an ISO time"),
        (float("nan"), "takes an ISO time"),
        ("tomorrow", "takes an ISO time"),
        ("2020-01-01T00:00:00Z", "has passed"),
        (True, "takes an ISO time"),
        (1e300, "takes an ISO time"),
    ],
)
def test_bad_deadlines_are_refused(tmp_path: Path, deadline: object, message: str) -> None:
    with pytest.raises(LlmBatchError, match=message):
        frame(3).llm.batch("Classify: {body}", provider="openai", model=MODELS["openai"],
                           mode="auto", deadline=deadline, api_key="k",
                           base_url="http://127.0.0.1:9")  # fmt: skip


def test_a_deadline_needs_a_batch(tmp_path: Path) -> None:
    with pytest.raises(LlmBatchError, match="deadline= is for batches"):
        frame(3).llm.batch("Classify: {body}", provider="openai", model=MODELS["openai"],
                           mode="sync", deadline=60, api_key="k",
                           base_url="http://127.0.0.1:9")  # fmt: skip


def test_a_cancel_before_the_deadline_sends_no_fallback_round(tmp_path: Path) -> None:
    with serve(batch_seconds=20) as emu:
        job = batch(frame(300), emu, tmp_path / "j", "openai", output=CATS, mode="batch",
                    deadline=2.0, wait=False)  # fmt: skip
        job.cancel()
        out = job.wait().result()
        assert not [b for b in emu.ledger.billed if b["tier"] != "batch"]  # nothing by flex
    assert set(out["llm_status"]) <= {"canceled", "succeeded"}
    events = (tmp_path / "j" / "events.jsonl").read_text()
    assert '"mode":"flex"' not in events
