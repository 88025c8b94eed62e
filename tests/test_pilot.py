"""``pilot=N``: sampled requests sent through the sync endpoints first, against the emulator.
Expected figures come from the emulator's ledger (what it billed), never from the library."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl
import pytest
from helpers import MODELS, url_for

import polars_llmbatch
from polars_llmbatch import BudgetExceededError, LlmBatchError
from polars_llmbatch.cli import main
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.sample import varied

PROMPT = "Summarise: {text}"


def kw(emu, provider: str = "openai", **more) -> dict:
    return dict(
        provider=provider,
        model=MODELS[provider],
        max_output_tokens=400,
        api_key="k",
        base_url=url_for(emu, provider),
        **more,
    )


def run_kw(emu, ckpt: Path, provider: str = "openai", **more) -> dict:
    return kw(emu, provider, checkpoint=ckpt, progress=False, poll_interval=0.02, **more)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_the_pilot_predicts_the_output_and_is_never_paid_twice(
    tmp_path: Path, provider: str
) -> None:
    df = varied(1_500, seed=1)
    ckpt = tmp_path / "job"
    with serve(batch_seconds=0.1) as emu:
        est = df.llm.estimate(PROMPT, **kw(emu, provider, pilot=100, checkpoint=ckpt))
        sync_bills = [b for b in emu.ledger.billed if b["batch_id"] is None]
        assert len(sync_bills) == 100 and not emu.ledger.batches
        outputs = [b["output_tokens"] for b in sync_bills]
        out = df.llm.batch(PROMPT, **run_kw(emu, ckpt, provider, pilot=100, usage=True))
        bills = emu.ledger.billed
        assert len(emu.ledger.batches) == 1
    # the pilot's figures are the billed ones
    p = est.pilot
    assert (p["requests"], p["answered"], p["output_max"]) == (100, 100, max(outputs))
    assert p["output_mean"] == pytest.approx(statistics.mean(outputs))
    assert p["cut"] == 0 and p["failed"] == 0 and p["invalid"] == 0
    # paid once: 100 at sync, the other 1,400 in the batch, nothing twice
    assert len(bills) == 1_500 and sum(b["batch_id"] is None for b in bills) == 100
    assert set(out["llm_status"]) == {"succeeded"}
    # the expected output is within 10% of what the whole job was billed, the interval holds it
    billed_out = sum(b["output_tokens"] for b in bills)
    assert abs(est.output_tokens_expected - billed_out) / billed_out < 0.10
    assert abs(est.output_tokens_expected - billed_out) <= est.output_tokens_error
    assert est.cost_batch is not None and est.cost_batch_error > 0  # free text has a cost now
    # the pilot is a sync job of its own, counted at sync rates in spend
    s = polars_llmbatch.spend(tmp_path).sort("job")
    assert s["job"].to_list() == ["job", "job-pilot100"]
    assert s.filter(pl.col("job") == "job-pilot100")["requests"].item() == 100
    pilot_job = json.loads((tmp_path / "job-pilot100" / "job.json").read_text())
    assert pilot_job["mode"] == "sync"
    # the batch's rows that the pilot answered cost nothing there: the pilot paid for them
    assert out["llm_cost"].sum() == pytest.approx(s.filter(pl.col("job") == "job")["cost"].item())
    assert s.filter(pl.col("job") == "job-pilot100")["cost"].item() == pytest.approx(p["cost"])


def test_a_cap_that_cuts_most_answers_is_warned_about(tmp_path: Path) -> None:
    df = varied(500, seed=2)
    cut = r"cut at max_output_tokens=4; the cap is too low"
    with serve() as emu, pytest.warns(UserWarning, match=cut) as caught:
        est = df.llm.estimate(
            PROMPT, **{**kw(emu, pilot=40, checkpoint=tmp_path / "j"), "max_output_tokens": 4}
        )
    assert caught[0].filename == __file__  # the warning names the caller's line
    assert est.pilot["cut"] == 1.0 and est.pilot["output_max"] == 4
    assert "cut at max_output_tokens 100%" in repr(est)


def test_a_pilot_that_mostly_fails_stops_the_job_before_the_batch(tmp_path: Path) -> None:
    df = varied(600, seed=3)
    with serve(faults=Faults(request_errors=0.9, seed=1)) as emu:
        with pytest.raises(LlmBatchError, match=r"pilot: \d+% of 50 requests failed .*not sent"):
            df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "job", pilot=50))
        assert not emu.ledger.batches  # nothing beyond the pilot was sent
        assert not (tmp_path / "job").exists()
    faults = Faults(request_errors=0.15, seed=1)
    with serve(faults=faults) as emu, pytest.warns(UserWarning, match=r"pilot: \d+% failed"):
        est = df.llm.estimate(PROMPT, **kw(emu, pilot=50, checkpoint=tmp_path / "other"))
    assert 0.05 < est.pilot["failed"] < 0.5 and "request_errors fault" in est.pilot["first_error"]


def test_pilot_and_batch_fit_max_cost_together(tmp_path: Path) -> None:
    df = varied(400, seed=4)
    prices = {"input": 10.0, "output": 10.0}  # batch at half
    with serve() as emu:
        whole = df.llm.estimate(PROMPT, **kw(emu), prices=prices)
        # room for the batch, not for the pilot at sync rates on top of it
        budget = whole.worst_cost_batch * 1.001
        with pytest.raises(BudgetExceededError, match="the pilot of 40 at sync rates"):
            df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "a", pilot=40, max_cost=budget,
                                          prices=prices))  # fmt: skip
        assert not emu.ledger.billed  # refused before anything was sent
        roomy = whole.worst_cost_batch * 1.5
        out = df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "b", pilot=40, max_cost=roomy,
                                            prices=prices, usage=True))  # fmt: skip
    assert out["llm_cost"].sum() <= roomy
    job = json.loads((tmp_path / "b" / "job.json").read_text())
    pilot_cost = json.loads((tmp_path / "b-pilot40" / "job.json").read_text())
    assert pilot_cost["mode"] == "sync"
    assert job["max_cost"] < roomy  # the batch got what the pilot left


def test_a_pilot_as_big_as_the_job_is_refused(tmp_path: Path) -> None:
    df = varied(30, seed=5)
    with serve() as emu:
        with pytest.raises(LlmBatchError, match="pilot=30 is not smaller than the job"):
            df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "j", pilot=30))
        assert not emu.ledger.billed
    with pytest.raises(LlmBatchError, match="pilot"):
        df.llm.estimate(PROMPT, provider="openai", model="gpt-4o-mini", pilot=0)


def test_a_rerun_pilots_nothing_again(tmp_path: Path) -> None:
    df = varied(300, seed=6)
    with serve(batch_seconds=0.1) as emu:
        first = df.llm.estimate(PROMPT, **kw(emu, pilot=20, checkpoint=tmp_path / "j"))
        again = df.llm.estimate(PROMPT, **kw(emu, pilot=20, checkpoint=tmp_path / "j"))
        assert len(emu.ledger.billed) == 20  # the pilot's checkpoint was found again
        df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "j", pilot=20))
        df.llm.batch(PROMPT, **run_kw(emu, tmp_path / "j", pilot=20))  # reattaches
        assert len(emu.ledger.billed) == 300 and not emu.ledger.billed_twice()
    assert first.pilot == again.pilot


def test_embeddings_pilot_checks_failures_only(tmp_path: Path) -> None:
    df = varied(200, seed=7)
    with serve(batch_seconds=0.1) as emu:
        out = df.llm.embed(
            "text",
            provider="openai",
            model="text-embedding-3-small",
            dimensions=4,
            pilot=10,
            checkpoint=tmp_path / "e",
            api_key="k",
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
        )
        assert len(emu.ledger.billed) == 200
    assert out["embedding"].null_count() == 0
    job = json.loads((tmp_path / "e" / "job.json").read_text())
    assert job["estimate"]["pilot"]["requests"] == 10
    assert job["estimate"]["output_tokens_expected"] == 0  # embeddings have no output


def test_the_cli_pilots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    varied(300, seed=8).write_parquet(tmp_path / "t.parquet")
    with serve() as emu:
        code = main(["estimate", str(tmp_path / "t.parquet"), "--prompt", PROMPT,
                     "--provider", "openai", "--model", "gpt-4o-mini",
                     "--max-output-tokens", "400", "--pilot", "25", "--checkpoint",
                     str(tmp_path / "job"), "--api-key", "k", "--base-url", emu.openai_url,
                     "--json"])  # fmt: skip
        assert code == 0 and len(emu.ledger.billed) == 25
    shown = json.loads(capsys.readouterr().out)
    assert shown["pilot"]["requests"] == 25 and shown["cost_batch"] is not None
