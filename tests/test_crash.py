"""Kill -9 at every stage of a job, re-run the same call: nothing billed twice, no row lost.

The job runs in a child process that SIGKILLs itself at the chosen moment (a wrapper around the
transport or the checkpoint writer; the library has no crash hooks). The emulator runs in the
test process, so its ledger sees every upload, create and bill across both runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from polars_llmbatch.emulator import model, serve

CATS = ["billing", "bug", "feature", "other"]

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import polars as pl
    import polars_llmbatch
    from polars_llmbatch.run import checkpoint, transport
    from polars_llmbatch.providers import PROVIDERS

    url, ckpt, stage, provider, model, mode = sys.argv[1:7]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    cls = PROVIDERS[provider]
    request = transport.Transport.request
    def crashing_request(self, method, path, **kw):
        creating = method == "POST" and (path.endswith("/batches") or "Content" in path)
        if stage == "after_upload" and creating:
            die()  # the file is uploaded, the batch not created
        return request(self, method, path, **kw)
    transport.Transport.request = crashing_request

    def after(name, when):
        original = getattr(cls, name)
        def wrapped(*args, **kw):
            if stage == when + ":before":
                die()
            result = original(*args, **kw)
            if stage == when:
                die()
            return result
        setattr(cls, name, wrapped)
    after("submit", "after_create")    # the batch exists, its id is not recorded
    after("poll", "polling:before")
    after("fetch", "downloading")      # results downloaded, not written

    from polars_llmbatch.run import engine
    write_shards = engine.write_shard_files
    def crashing_shards(source, shards, out):
        if stage == "planning" and shards[0].index >= 2:
            die()  # shards 0 and 1 written and submitted, shard 2 half-written
        return write_shards(source, shards, out)
    engine.write_shard_files = crashing_shards

    write = checkpoint.Checkpoint.write_parquet
    def crashing_write(self, path, frame, **kw):
        if stage == "writing_results" and path.parent.name == "results":
            die()  # raw results on disk, parsed rows not
        return write(self, path, frame, **kw)
    checkpoint.Checkpoint.write_parquet = crashing_write

    df = pl.DataFrame({"body": [f"ticket {i}: {'refund' if i % 3 else 'crash'}" for i in range(90)]})
    out = df.llm.batch("Classify: {body}", provider=provider, model=model,
                       output=["billing", "bug", "feature", "other"], checkpoint=ckpt,
                       api_key="k", base_url=url, progress=False, poll_interval=0.02,
                       max_shard_requests=40, max_output_tokens=100, mode=mode)
    out.select("label", "llm_status").with_columns(pl.col("label").cast(pl.String)).write_json(
        ckpt + ".out.json")
    """
)
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}


def child(
    tmp: Path, url: str, ckpt: Path, stage: str, provider: str = "openai", mode: str = "batch"
) -> int:
    script = tmp / "child.py"
    script.write_text(CHILD)
    run = subprocess.run(
        [sys.executable, str(script), url, str(ckpt), stage, provider, MODELS[provider], mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(run.stderr)
    return run.returncode


STAGES = ["after_upload", "after_create", "polling:before", "downloading", "writing_results"]
STAGES += ["planning"]  # the first round is planned while its first shards are submitted
CASES = [("openai", stage) for stage in STAGES]
CASES += [("anthropic", s) for s in STAGES if s != "after_upload"]  # no upload: one create call
CASES += [("gemini", s) for s in STAGES if s != "after_upload"]  # inline shards: no upload


@pytest.mark.parametrize(("provider", "stage"), CASES)
def test_kill_9_then_rerun_pays_once_and_loses_nothing(
    tmp_path: Path, provider: str, stage: str
) -> None:
    ckpt = tmp_path / "job"
    with serve(batch_seconds=0.3) as emu:
        url = {"openai": emu.openai_url, "anthropic": emu.anthropic_url}.get(
            provider, emu.gemini_url
        )
        assert child(tmp_path, url, ckpt, stage, provider) == -signal.SIGKILL
        if stage == "planning":  # killed mid-preparation, with two batches live already
            assert len(emu.ledger.batches) == 2
        assert child(tmp_path, url, ckpt, "none", provider) == 0
        ledger = emu.ledger
        assert not ledger.billed_twice()
        assert len(ledger.batches) == 3  # 90 requests in shards of 40: created once each
    out = pl.DataFrame(json.loads((tmp_path / "job.out.json").read_text()))
    assert out.height == 90 and set(out["llm_status"]) == {"succeeded"}
    bodies = [f"ticket {i}: {'refund' if i % 3 else 'crash'}" for i in range(90)]
    assert out["label"].to_list() == [
        model.enum_pick(f"Classify: {b}", "label", CATS) for b in bodies
    ]


def test_kill_9_in_sync_mode_pays_each_request_once(tmp_path: Path) -> None:
    ckpt = tmp_path / "job"
    with serve(batch_seconds=0.3) as emu:
        assert child(tmp_path, emu.openai_url, ckpt, "writing_results", mode="sync") == -9
        assert child(tmp_path, emu.openai_url, ckpt, "none", mode="sync") == 0
        # Each of the 90 rows' unique requests was answered by exactly one sync call.
        sync_bills = [b for b in emu.ledger.billed if b["batch_id"] is None]
        assert len(sync_bills) == 90 and not emu.ledger.batches
    out = pl.DataFrame(json.loads((tmp_path / "job.out.json").read_text()))
    assert set(out["llm_status"]) == {"succeeded"}


def test_a_crashed_checkpoint_never_takes_another_checkpoints_batch(tmp_path: Path) -> None:
    # Checkpoint a finishes; b (the same call, elsewhere) dies after its intent, before its
    # create. On restart b must send its own batches, not adopt a's (same job, same shards).
    with serve(batch_seconds=0.3) as emu:
        assert child(tmp_path, emu.openai_url, tmp_path / "x" / "a", "none") == 0
        assert child(tmp_path, emu.openai_url, tmp_path / "y" / "b", "after_upload") == -9
        assert child(tmp_path, emu.openai_url, tmp_path / "y" / "b", "none") == 0
        assert len(emu.ledger.batches) == 6  # three shards each
    out = pl.DataFrame(json.loads((tmp_path / "y" / "b.out.json").read_text()))
    assert set(out["llm_status"]) == {"succeeded"}
