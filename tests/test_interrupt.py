"""Ctrl-C while waiting: the remote batch keeps running, the checkpoint stays consistent, and the
message says how to resume or cancel; resuming and cancelling then work from another process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars_llmbatch
from polars_llmbatch.emulator import serve

CHILD = textwrap.dedent(
    """
    import sys
    import polars as pl
    import polars_llmbatch
    url, ckpt = sys.argv[1:3]
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(30)]})
    df.llm.batch("Classify: {body}", provider="openai", model="gpt-4o-mini",
                 output=["billing", "bug"], checkpoint=ckpt, api_key="k", base_url=url,
                 progress=False, poll_interval=0.05)
    """
)


def submitted(ckpt: Path, proc: subprocess.Popen[str]) -> None:
    """Wait (polling the event log, within a deadline) until the child has submitted."""
    deadline = time.monotonic() + 60
    events = ckpt / "events.jsonl"
    while not (events.exists() and b'"submitted"' in events.read_bytes()):
        assert time.monotonic() < deadline and proc.poll() is None, "never submitted"
        time.sleep(0.02)


def test_ctrl_c_leaves_the_batch_running_and_says_how_to_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "job"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with serve(batch_seconds=60) as emu:
        proc = subprocess.Popen(
            [sys.executable, str(script), emu.openai_url, str(ckpt)],
            stderr=subprocess.PIPE,
            text=True,
        )
        submitted(ckpt, proc)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
        assert "The remote batches keep running" in err and str(ckpt) in err
        assert ".cancel()" in err

        job = polars_llmbatch.Job.open(
            ckpt, api_key="k", base_url=emu.openai_url, progress=False, poll_interval=0.05
        )
        st = job.status()
        assert not st.done and st.rows["pending"] == 30
        assert list(st.shards) in (["queued"], ["running"], ["submitted"])
        job.cancel()
        out = job.result()
        assert len(emu.ledger.batches) == 1
    assert job.status().done and set(out["llm_status"]) == {"canceled"}


def test_ctrl_c_in_the_cli_says_the_llmbatch_commands(tmp_path: Path) -> None:
    """After Ctrl-C in ``llmbatch run``, the hint names ``llmbatch resume`` / ``cancel``, not
    Python, and the exit code is 130."""
    import polars as pl

    pl.DataFrame({"body": [f"ticket {i}" for i in range(30)]}).write_parquet(tmp_path / "t.parquet")
    ckpt = tmp_path / "it's here"
    with serve(batch_seconds=60) as emu:
        cmd = [sys.executable, "-m", "polars_llmbatch.cli", "run", "t.parquet", "--prompt",
               "Classify: {body}", "--provider", "openai", "--model", "gpt-4o-mini",
               "--categories", "billing,bug", "--checkpoint", str(ckpt), "--api-key", "k",
               "--base-url", emu.openai_url, "--quiet", "--poll-interval", "0.05"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        submitted(ckpt, proc)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "llmbatch resume" in err and "llmbatch cancel" in err and "Job.open" not in err
    assert f"llmbatch resume {shlex.quote(str(ckpt))}" in err  # the path has a quote: quoted
