"""What a job does between "submitted" and "done": wait=False sends and moves on in the
background, status asks the provider (read-only), and sync mode honours timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.errors import LlmBatchError
from tests.helpers import StepClock, batch

DF = pl.DataFrame({"body": [f"ticket {i}" for i in range(12)]})


def test_wait_false_submits_and_the_job_moves_on_in_the_background(tmp_path: Path) -> None:
    with serve(batch_seconds=10) as emu:
        emu.ctx.clock = clock = StepClock()
        job = batch(DF, emu, tmp_path / "j", output="answer", wait=False, max_shard_requests=4)
        # Submitted when the call returns: three batches at the provider, nothing done yet.
        assert len(emu.ledger.batches) == 3
        assert job.status(refresh=False).state == "running at the provider"
        assert "running at the provider" in repr(job)
        clock.advance(60)  # the batches finish at the provider; nobody calls wait()
        job._thread.join(timeout=60)  # the background runner polls, collects and ends
        assert not job._thread.is_alive()
        st = job.status(refresh=False)
        assert st.done and st.state == "done" and st.rows["succeeded"] == 12
    assert job.result()["answer"][0] == "Emulated answer to: Classify: ticket 0"


def test_status_asks_the_provider_and_never_submits(tmp_path: Path) -> None:
    with serve(batch_seconds=10) as emu:
        emu.ctx.clock = clock = StepClock()
        job = batch(DF, emu, tmp_path / "j", output="answer", wait=False)
        job.close()  # the process that ran it is gone
        clock.advance(60)
        unkeyed = polars_llmbatch.Job.open(tmp_path / "j")
        assert unkeyed.status().state == "running at the provider"  # no key: checkpoint only
        keyed = polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url)
        st = keyed.status()
        assert st.done and st.rows["succeeded"] == 12
        assert len(emu.ledger.batches) == 1  # status submitted nothing
        assert polars_llmbatch.Job.open(tmp_path / "j").status().done  # recorded
        out = polars_llmbatch.Job.open(tmp_path / "j").result()
    assert set(out["llm_status"]) == {"succeeded"}


def test_status_of_a_job_never_submitted_sends_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(polars_llmbatch.Job, "_start_background", lambda self: None)
    with serve(batch_seconds=0.05) as emu:
        batch(DF, emu, tmp_path / "j", output="answer", wait=False)
        job = polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url)
        st = job.status()
        assert st.state == "planning" and not st.done  # created; its shards not yet written
        assert emu.ledger.batches == [] and emu.ledger.uploads == []


def test_sync_mode_honours_a_timeout(tmp_path: Path, monkeypatch) -> None:
    df = pl.DataFrame({"body": [f"question {i}" for i in range(1100)]})  # two sync shards
    with serve(batch_seconds=0.05) as emu, monkeypatch.context() as m:
        m.setattr(polars_llmbatch.Job, "_start_background", lambda self: None)  # created only
        batch(df, emu, tmp_path / "j", output="answer", mode="sync", wait=False)
        m.undo()
        job = polars_llmbatch.Job.open(
            tmp_path / "j", api_key="k", base_url=emu.openai_url, progress=False
        )
        job.wait(timeout=0)  # nothing may be sent at a deadline already passed
        assert len(emu.ledger.billed) == 0 and not job.status(refresh=False).done
        job.wait()
        assert len(emu.ledger.billed) == 1100  # each request paid once
    assert set(job.result()["llm_status"]) == {"succeeded"}


def test_a_sync_shard_stops_sending_at_the_deadline_and_resumes(
    tmp_path: Path, monkeypatch
) -> None:
    df = pl.DataFrame({"body": [f"question {i}" for i in range(300)]})
    with serve(batch_seconds=0.05) as emu, monkeypatch.context() as m:
        m.setattr(polars_llmbatch.Job, "_start_background", lambda self: None)  # created only
        batch(df, emu, tmp_path / "j", output="answer", mode="sync", wait=False)
        m.undo()
        job = polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url)
        engine = job._engine(progress=False)
        with job._ckpt.lock():
            assert list(engine._first_round()) == [1]  # planned, one shard, nothing sent
        (shard,) = job._ckpt.shards().values()
        sent = []

        def due() -> bool:  # the deadline passes after 50 answers
            sent.append(1)
            return len(sent) > 50

        with job._ckpt.lock():
            assert engine._run_sync(shard, due) is False  # the shard stays open
        assert 40 <= len(emu.ledger.billed) <= 58  # in flight when the deadline came: kept
        first = len(emu.ledger.billed)
        job.wait()
        assert len(emu.ledger.billed) == 300 and first < 300  # the rest sent, none twice
    assert set(job.result()["llm_status"]) == {"succeeded"}


def cli(emu, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmbatch ARGS`` as a subprocess, keyed and pointed at the emulator's OpenAI API."""
    env = {**os.environ, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": emu.openai_url}
    return subprocess.run(
        [sys.executable, "-m", "polars_llmbatch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


RUN = ["run", "t.parquet", "--prompt", "Q: {body}", "--provider", "openai"]
RUN += ["--model", "gpt-4o-mini", "--column", "answer", "--quiet", "--checkpoint", "ck"]


def test_cli_no_wait_in_sync_mode_says_what_is_true(tmp_path: Path) -> None:
    pl.DataFrame({"body": [f"q {i}" for i in range(30)]}).write_parquet(tmp_path / "t.parquet")
    with serve(batch_seconds=0.05) as emu:
        r = cli(emu, tmp_path, *RUN, "--mode", "sync", "--no-wait")
        assert r.returncode == 4, r.stderr
        assert "sync mode sends from this process" in r.stderr and "llmbatch resume" in r.stderr
        r = cli(emu, tmp_path, "resume", "ck", "--quiet")
        assert r.returncode == 0, r.stderr
        assert len(emu.ledger.billed) == 30  # each request paid once
        r = cli(emu, tmp_path, "status", "ck")
        assert r.returncode == 0 and "done" in r.stdout


def test_cli_status_of_a_finished_batch_exits_0(tmp_path: Path) -> None:
    pl.DataFrame({"body": [f"q {i}" for i in range(10)]}).write_parquet(tmp_path / "t.parquet")
    with serve(batch_seconds=10) as emu:
        emu.ctx.clock = clock = StepClock()
        r = cli(emu, tmp_path, *RUN, "--no-wait")
        assert r.returncode == 4 and "submitted" in r.stderr, r.stderr
        r = cli(emu, tmp_path, "status", "ck")
        assert r.returncode == 4 and "running at the provider" in r.stdout
        clock.advance(60)  # long ago, the batch finished
        r = cli(emu, tmp_path, "status", "ck")
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
        assert len(emu.ledger.batches) == 1


def test_an_error_in_the_background_is_raised_by_wait(tmp_path: Path) -> None:
    from polars_llmbatch.run.transport import ProviderError

    with serve(batch_seconds=60) as emu:
        job = batch(DF, emu, tmp_path / "j", output="answer", wait=False)
    # The provider is gone: the background runner's polls fail past their retries.
    job._thread.join(timeout=60)
    assert not job._thread.is_alive()
    try:
        job.wait()
    except ProviderError as exc:
        assert "connection failed" in str(exc)
    else:
        raise AssertionError("wait() should raise what stopped the background runner")
    job.close()  # closing never raises


def test_await_a_job_keeps_the_event_loop_free(tmp_path: Path) -> None:
    import asyncio

    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(20)]})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main(url: str) -> list[str]:
        job = df.llm.batch(
            "Classify: {body}", provider="openai", model="gpt-4o-mini",
            output=["billing", "bug"], wait=False, progress=False,
            checkpoint=tmp_path / "j", poll_interval=0.05, api_key="k", base_url=url,
        )  # fmt: skip
        beat = asyncio.create_task(ticker())
        with job:
            early = await job.wait_async(timeout=0)  # returns at once, the job still running
            assert early is job and not job.status(refresh=False).done
            await job
            beat.cancel()
            return job.result()["llm_status"].to_list()

    with serve(batch_seconds=0.5) as emu:
        statuses = asyncio.run(main(emu.openai_url))
    assert statuses == ["succeeded"] * 20
    assert ticks >= 20  # the loop ran other work while the job was awaited


def test_retry_sends_only_what_ended_unfinished_and_never_a_success(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(40)]})
    faults = Faults(expire_at=0.5, fault_batches=1)  # the first batch expires half-way
    with serve(batch_seconds=0.05, faults=faults) as emu:
        out = batch(df, emu, tmp_path / "j", max_attempts=1, output=["billing", "bug"])
        expired = out.filter(pl.col("llm_status") == "expired").height
        assert 0 < expired < 40
        job = polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url,
                                       progress=False, poll_interval=0.02)  # fmt: skip
        with pytest.raises(LlmBatchError, match="takes some of"):
            job.retry(["succeeded"])
        job.retry(["missing"])  # none missing: nothing is sent
        assert len(emu.ledger.batches) == 1
        job.retry()  # the expired ones, once more
        again = job.result()
        job.close()
        assert set(again["llm_status"]) == {"succeeded"}
        assert len(emu.ledger.batches) == 2
        assert emu.ledger.batches[1]["requests"] == expired  # just those
        assert not emu.ledger.billed_twice()  # no success was bought again


def test_cli_retry_writes_the_output_run_was_given(tmp_path: Path) -> None:
    pl.DataFrame({"body": [f"ticket {i}" for i in range(30)]}).write_parquet(tmp_path / "t.parquet")
    faults = Faults(expire_at=0.5, fault_batches=1)
    with serve(batch_seconds=0.05, faults=faults) as emu:
        args = ["--prompt", "Classify: {body}", "--provider", "openai", "--model", "gpt-4o-mini",
                "--categories", "billing,bug", "--max-attempts", "1", "--quiet",
                "--poll-interval", "0.02", "--checkpoint", "runs/t"]  # fmt: skip
        first = cli(emu, tmp_path, "run", "t.parquet", *args, "--output", "out.parquet")
        assert first.returncode == 0, first.stderr
        assert "expired" in set(pl.read_parquet(tmp_path / "out.parquet")["llm_status"])
        retried = cli(emu, tmp_path, "retry", "runs/t", "--status", "expired", "--quiet")
        assert retried.returncode == 0, retried.stderr
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == ["body", "label", "llm_status", "llm_error"]
    assert set(out["llm_status"]) == {"succeeded"}
