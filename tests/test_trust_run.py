"""Running a job from more than one process, and cleaning up after it: a cancel from another
process stops a submission under way, two processes starting the same call make one job,
sockets are closed, and any checkpoint path works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch.emulator import serve
from polars_llmbatch.providers.openai import OpenAI
from tests.helpers import batch


def test_a_cancel_from_another_process_stops_the_submission(tmp_path: Path, monkeypatch) -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(32)]})
    path = tmp_path / "j"
    creates: list[str] = []
    submit = OpenAI.submit

    def submit_and_cancel_at_the_third(self, t, spec, data, *, tag, kind):
        if len(creates) == 2:  # meanwhile, someone else cancels the job
            polars_llmbatch.Job.open(path, api_key="k", base_url=emu.openai_url).cancel(wait=False)
        remote_id = submit(self, t, spec, data, tag=tag, kind=kind)
        creates.append(remote_id)
        return remote_id

    monkeypatch.setattr(OpenAI, "submit", submit_and_cancel_at_the_third)
    with serve(batch_seconds=60) as emu:
        job = batch(df, emu, path, output="answer", max_shard_requests=1, wait=False)
        job.wait(timeout=5)
        # The third create was under way when the cancel came; nothing was created after it,
        # and that batch too was asked to cancel (the canceller did not know it).
        assert len(creates) == 3 and len(emu.ledger.batches) == 3
        t = job._t
        states = {job.provider.poll(t, b).status for b in creates}
        assert states <= {"cancelling", "cancelled"}, states
        out = job.result()
        assert emu.ledger.billed == []  # nothing ran: every batch was stopped in time
    assert set(out["llm_status"]) <= {"canceled", "pending"}  # pending: still cancelling


def test_jobs_close_their_connections(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": ["a refund"]})
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    with serve(batch_seconds=0.01) as emu:
        batch(df, emu, tmp_path / "warm", output="answer")
        before = fds()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            for i in range(12):  # each used to leave two sockets open
                batch(df, emu, tmp_path / f"j{i}", output="answer")
            with polars_llmbatch.Job.open(
                tmp_path / "j0", api_key="k", base_url=emu.openai_url
            ) as j:
                j.wait()
        after = fds()
    assert after - before <= 3, (before, after)


CHILD = """
import sys
import polars as pl
import polars_llmbatch
url, path = sys.argv[1], sys.argv[2]
df = pl.DataFrame({"body": [f"ticket {i} " * 5 for i in range(30_000)]})
print("ready", flush=True)
sys.stdin.readline()
job = df.llm.batch("Classify: {body}", provider="openai", model="gpt-4o-mini",
                   output="answer", max_output_tokens=5, checkpoint=path, api_key="k",
                   base_url=url, wait=False, progress=False)
print(job.id, flush=True)
"""


def test_two_processes_starting_the_same_call_make_one_job(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with serve(batch_seconds=60) as emu:
        for round_ in range(3):
            path = tmp_path / f"j{round_}"
            kids = [
                subprocess.Popen(
                    [sys.executable, str(script), emu.openai_url, str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for _ in range(2)
            ]
            for k in kids:
                assert k.stdout.readline().strip() == "ready"
            for k in kids:  # both go at once
                k.stdin.write("go\n")
                k.stdin.flush()
            results = [k.communicate(timeout=120) for k in kids]
            for k, (_, err) in zip(kids, results, strict=True):
                assert k.returncode == 0, err
            ids = {out.strip() for out, _ in results}
            assert len(ids) == 1
            events = (path / "events.jsonl").read_text().splitlines()
            assert sum('"planned"' in e for e in events) == 1


def test_a_checkpoint_path_with_quotes_and_unicode_works(tmp_path: Path) -> None:
    root = tmp_path / 'it\'s a "test" — ü'
    df = pl.DataFrame({"body": ["a refund", "a crash"]})
    more = pl.concat([df, pl.DataFrame({"body": ["a question"]})])
    with serve(batch_seconds=0.05) as emu:
        for provider in ("openai", "anthropic", "gemini"):
            a = batch(df, emu, root / f"{provider}-a", provider=provider, output="answer")
            # The sibling's results are found by the result cache (a query over their paths).
            b = batch(more, emu, root / f"{provider}-b", provider=provider, output="answer")
            assert set(a["llm_status"]) == set(b["llm_status"]) == {"succeeded"}
        assert len(emu.ledger.billed) == 3 * 3
    spend = polars_llmbatch.spend(root, by="provider")
    assert spend["requests"].sum() == 9 and spend["jobs"].sum() == 6


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_results_stay_readable_when_the_checkpoint_moves_to_a_quoted_path(
    tmp_path: Path, provider: str
) -> None:
    df = pl.DataFrame({"body": ["a refund"]})
    with serve(batch_seconds=0.05) as emu:
        batch(df, emu, tmp_path / "j", provider=provider, output="answer")
    moved = tmp_path / 'it\'s "moved"'
    (tmp_path / "j").rename(moved)
    out = polars_llmbatch.Job.open(moved).result()
    assert out["llm_status"].to_list() == ["succeeded"]


def test_a_cancel_from_another_process_stops_sync_sending(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": [f"question {i}" for i in range(5000)]})
    with serve(batch_seconds=0.05) as emu:
        job = batch(df, emu, tmp_path / "j", output="answer", mode="sync", wait=False)
        polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url).cancel(
            wait=False
        )
        job.wait()
        out = job.result()
        sent = len(emu.ledger.billed)
    counts = out["llm_status"].value_counts().to_dict(as_series=False)
    by = dict(zip(counts["llm_status"], counts["count"], strict=True))
    assert by.get("canceled", 0) > 0 and set(by) <= {"succeeded", "canceled"}
    assert by.get("succeeded", 0) == sent < 5000  # what was sent is kept, nothing more went


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_finished_emulator_batches_keep_only_their_results(tmp_path: Path, provider) -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(50)]})
    with serve(batch_seconds=0.05) as emu:
        out = batch(df, emu, tmp_path / "j", provider=provider, output="answer")
        store = {"openai": emu.openai, "anthropic": emu.anthropic, "gemini": emu.gemini}[provider]
        (b,) = store.batches.values()
        assert b.final is not None
        inputs = {
            "openai": lambda: (b.data, b.work is not None, b.failing is not None),
            "anthropic": lambda: (b.requests,),
            "gemini": lambda: (b.entries,),
        }[provider]()
        assert not any(inputs)  # what the batch was made from is freed
        again = polars_llmbatch.Job.open(tmp_path / "j").result()  # still readable
    assert set(out["llm_status"]) == set(again["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_every_provider_retries_the_same_transient_statuses(provider: str, status: int) -> None:
    import json as _json

    from polars_llmbatch.plan.spec import RequestSpec
    from polars_llmbatch.providers import get_provider

    prov = get_provider(provider)
    spec = RequestSpec(provider, "m", options={"max_output_tokens": 5})
    line = prov.sync_line("cid", status, _json.dumps({"error": {"message": "busy"}}).encode())
    path = tmp_line(line)
    (row,) = prov.parse([path], spec).iter_rows(named=True)
    assert row["status"] == "errored" and row["retryable"], (provider, status, row)
    assert status in prov.retryable_http


def tmp_line(line: bytes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "r.jsonl"
    path.write_bytes(line + b"\n")
    return path


def test_concurrent_writability_probes_do_not_trip_each_other(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from polars_llmbatch.run.checkpoint import Checkpoint

    def probe(_: int) -> None:
        Checkpoint(tmp_path).check_writable()  # two creators probing one parent folder

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(probe, range(400)))
    assert list(tmp_path.iterdir()) == []
