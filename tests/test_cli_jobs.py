"""``llmbatch run / status / resume / cancel / results / spend / demo`` as real subprocesses
against the emulator (in this process), with the SDKs' environment variables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from polars_llmbatch.emulator import serve
from polars_llmbatch.sample import tickets

PROMPT = "Classify this ticket: {body}"
RUN = ["--prompt", PROMPT, "--provider", "openai", "--model", "gpt-4o-mini"]
RUN += ["--categories", "billing,bug,feature,other", "--max-output-tokens", "20"]
RUN += ["--quiet", "--poll-interval", "0.05"]


def llmbatch(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "polars_llmbatch.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tickets(200).write_parquet(tmp_path / "t.parquet")
    return tmp_path


def env_for(emu) -> dict[str, str]:
    return {"OPENAI_API_KEY": "test", "OPENAI_BASE_URL": emu.openai_url}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".ndjson"])
def test_run_writes_the_rows_with_their_results(workdir: Path, suffix: str) -> None:
    with serve(batch_seconds=0.1) as emu:
        r = llmbatch(
            "run",
            "t.parquet",
            *RUN,
            "--output",
            f"out{suffix}",
            "--checkpoint",
            "runs/t",
            "--tag",
            "team=support",
            cwd=workdir,
            env=env_for(emu),
        )
        assert r.returncode == 0, r.stderr
        df = pl.read_parquet(workdir / "t.parquet")
        nulls = df["body"].null_count()
        assert f"done: succeeded {200 - nulls}, skipped {nulls}" in r.stdout
        assert len(emu.ledger.batches) == 1
    path = workdir / f"out{suffix}"
    out = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".ndjson": pl.read_ndjson}[suffix](
        path
    )
    assert out.height == 200 and {"ticket_id", "label", "llm_status"} <= set(out.columns)
    # sunk in the input's order, through a temporary name that is gone once it is whole
    assert out["ticket_id"].to_list() == df["ticket_id"].to_list()
    assert not list(workdir.glob("*.tmp"))


def test_embeddings_to_csv_as_json_arrays(workdir: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        r = llmbatch(
            "run",
            "t.parquet",
            "--prompt",
            "{body}",
            "--embed",
            "--provider",
            "openai",
            "--model",
            "text-embedding-3-small",
            "--dimensions",
            "4",
            "--output",
            "e.csv",
            "--checkpoint",
            "runs/e",
            "--quiet",
            "--poll-interval",
            "0.05",
            cwd=workdir,
            env=env_for(emu),
        )
        assert r.returncode == 0, r.stderr
    first = pl.read_csv(workdir / "e.csv").filter(pl.col("llm_status") == "succeeded")["embedding"][
        0
    ]
    assert len(json.loads(first)) == 4


def test_no_wait_status_resume_results_spend(workdir: Path) -> None:
    with serve(batch_seconds=0.5) as emu:
        env = env_for(emu)
        r = llmbatch(
            "run", "t.parquet", *RUN, "--checkpoint", "runs/t", "--no-wait", cwd=workdir, env=env
        )
        assert r.returncode == 4 and "llmbatch status runs/t" in r.stderr
        s = llmbatch("status", "runs/t", cwd=workdir, env={})  # no key needed to look
        assert s.returncode == 4 and "running" in s.stdout
        r = llmbatch(
            "resume",
            "runs/t",
            "--output",
            "out.parquet",
            "--quiet",
            "--poll-interval",
            "0.05",
            cwd=workdir,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert llmbatch("status", "runs/t", cwd=workdir, env={}).returncode == 0
        r = llmbatch("results", "runs/t", "--output", "res.ndjson", "--usage", cwd=workdir, env={})
        assert r.returncode == 0 and "wrote 200 rows" in r.stdout
        assert len(emu.ledger.batches) == 1
    res = pl.read_ndjson(workdir / "res.ndjson")
    assert res.columns[:2] == ["row_nr", "label"] and "llm_cost" in res.columns
    s = llmbatch("spend", "runs", "--by", "model", "--json", cwd=workdir, env={})
    (row,) = json.loads(s.stdout)
    unique = pl.read_parquet(workdir / "t.parquet")["body"].drop_nulls().n_unique()
    assert row["model"] == "openai/gpt-4o-mini" and row["requests"] == unique
    assert row["cost"] == pytest.approx(res["llm_cost"].sum())


def test_kill_then_resume_pays_once(workdir: Path) -> None:
    with serve(batch_seconds=2) as emu:
        env = env_for(emu)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "polars_llmbatch.cli",
                "run",
                "t.parquet",
                *RUN,
                "--checkpoint",
                "runs/t",
            ],
            cwd=workdir,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        events = workdir / "runs" / "t" / "events.jsonl"
        deadline = time.monotonic() + 60
        while not (events.exists() and b'"submitted"' in events.read_bytes()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = llmbatch(
            "resume",
            "runs/t",
            "--output",
            "out.parquet",
            "--quiet",
            "--poll-interval",
            "0.05",
            cwd=workdir,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert len(emu.ledger.batches) == 1 and not emu.ledger.billed_twice()
    assert pl.read_parquet(workdir / "out.parquet")["llm_status"].value_counts().height == 2


def test_cancel(workdir: Path) -> None:
    with serve(batch_seconds=30) as emu:
        env = env_for(emu)
        r = llmbatch(
            "run", "t.parquet", *RUN, "--checkpoint", "runs/t", "--no-wait", cwd=workdir, env=env
        )
        assert r.returncode == 4
        r = llmbatch("cancel", "runs/t", "--quiet", cwd=workdir, env=env)
        assert r.returncode == 0, r.stderr
        assert "done" in r.stdout and "canceled" in r.stdout
        assert len(emu.ledger.batches) == 1


def test_exit_codes_for_errors(workdir: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        env = env_for(emu)
        over = llmbatch("run", "t.parquet", *RUN, "--max-cost", "0.000001", cwd=workdir, env=env)
        assert over.returncode == 3 and "over budget" in over.stderr
        nokey = llmbatch("run", "t.parquet", *RUN, cwd=workdir, env={"OPENAI_API_KEY": ""})
        assert nokey.returncode == 1 and "set OPENAI_API_KEY" in nokey.stderr
        assert len(nokey.stderr.strip().splitlines()) == 1
        bad = llmbatch("run", "t.parquet", *RUN, "--tag", "team", cwd=workdir, env=env)
        assert bad.returncode == 2 and "--tag takes KEY=VALUE" in bad.stderr  # a usage error
        out = llmbatch("run", "t.parquet", *RUN, "--output", "x.xlsx", cwd=workdir, env=env)
        assert out.returncode == 1 and ".parquet, .csv or .ndjson" in out.stderr
        missing = llmbatch("status", "nowhere", cwd=workdir, env=env)
        assert missing.returncode == 1 and "not a polars_llmbatch checkpoint" in missing.stderr
        (workdir / "torn").mkdir()
        (workdir / "torn" / "job.json").write_text('{"format": 1, "spe')
        torn = llmbatch("status", "torn", cwd=workdir, env=env)
        assert torn.returncode == 1 and "is not valid JSON" in torn.stderr
        assert len(torn.stderr.strip().splitlines()) == 1 and "Traceback" not in torn.stderr
        assert not emu.ledger.batches


def test_an_unexpected_error_is_one_line(workdir: Path, monkeypatch, capsys) -> None:
    from polars_llmbatch import cli
    from polars_llmbatch.run import job

    def broken(*args, **kwargs):
        raise KeyError("spec")

    monkeypatch.setattr(job.Job, "open", broken)
    assert cli.main(["status", str(workdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmbatch: unexpected KeyError: 'spec'") and len(err.splitlines()) == 1


def test_help_has_examples(capsys) -> None:
    from polars_llmbatch import cli

    for command in ("run", "status", "resume", "cancel", "results", "spend", "demo"):
        with pytest.raises(SystemExit) as done:  # argparse prints the help and exits 0
            cli.main([command, "--help"])
        assert done.value.code == 0 and "example" in capsys.readouterr().out, command


def test_demo_runs_end_to_end(workdir: Path) -> None:
    r = llmbatch("demo", "--rows", "500", "--dir", "demo", cwd=workdir, env={}, timeout=120)
    assert r.returncode == 0, r.stderr
    for text in (
        "1. The estimate",
        "2. The category backfill",
        "3. Embeddings",
        "4. What it cost",
        "OPENAI_API_KEY",
    ):
        assert text in r.stdout
    assert (workdir / "demo" / "runs" / "tickets" / "job.json").exists()


def test_quiet_run_writes_nothing_on_stderr_but_errors(workdir: Path) -> None:
    with serve(batch_seconds=0.05) as emu:
        env = env_for(emu)
        loud_args = [a for a in RUN if a != "--quiet"]
        loud = llmbatch(
            "run", "t.parquet", *loud_args, "--checkpoint", "runs/a", cwd=workdir, env=env
        )
        quiet = llmbatch("run", "t.parquet", *RUN, "--checkpoint", "runs/b", cwd=workdir, env=env)
    assert loud.returncode == quiet.returncode == 0
    assert "checkpoint runs/a" in loud.stderr and quiet.stderr == ""
    assert quiet.stdout.startswith("done: ")


@pytest.mark.parametrize("spilled", [False, True])
@pytest.mark.parametrize("id_args", [[], ["--id", "ticket_id"]])
def test_resume_writes_what_run_would_have_to_the_output_run_was_given(
    workdir: Path, id_args: list[str], spilled: bool
) -> None:
    """Ctrl-C (or --no-wait) after `run --output`, then `resume` without --output: the same
    file, with the input rows and their results, as an uninterrupted run writes (also when
    the results are joined on disk, as a huge job's are)."""
    with serve(batch_seconds=0.3) as emu:
        env = env_for(emu)
        # every job counts as huge when spilled; the plain run (whole.parquet) never does
        env_huge = {**env, "POLARS_LLMBATCH_OUT_OF_CORE_ROWS": "0"} if spilled else env
        first = llmbatch(
            "run", "t.parquet", *RUN, *id_args, "--output", "out.parquet", "--no-wait",
            "--checkpoint", "runs/t", cwd=workdir, env=env,
        )  # fmt: skip
        assert first.returncode == 4 and not (workdir / "out.parquet").exists()
        sub = workdir / "elsewhere"
        sub.mkdir()
        resumed = llmbatch("resume", str(workdir / "runs" / "t"), cwd=sub, env=env_huge)
        assert resumed.returncode == 0, resumed.stderr
        assert (workdir / "runs" / "t" / "derived").exists() == spilled
        whole = llmbatch(
            "run", "t.parquet", *RUN, *id_args, "--output", "whole.parquet",
            "--checkpoint", "runs/w", cwd=workdir, env=env,
        )  # fmt: skip
        assert whole.returncode == 0, whole.stderr
    got = pl.read_parquet(workdir / "out.parquet")
    expected = pl.read_parquet(workdir / "whole.parquet")
    assert got.columns == expected.columns == [*pl.read_parquet(workdir / "t.parquet").columns,
                                               "label", "llm_status", "llm_error"]  # fmt: skip
    assert got.equals(expected)


def test_run_joins_a_huge_jobs_results_on_disk(workdir: Path) -> None:
    """`run --output` of a job that counts as huge writes what the in-memory join writes; a
    bad setting of the variable is refused, naming it."""
    with serve(batch_seconds=0.05) as emu:
        env = env_for(emu)
        huge = {**env, "POLARS_LLMBATCH_OUT_OF_CORE_ROWS": "0"}
        args = ["run", "t.parquet", *RUN]
        a = llmbatch(
            *args, "--output", "a.parquet", "--checkpoint", "runs/a", cwd=workdir, env=huge
        )
        b = llmbatch(*args, "--output", "b.parquet", "--checkpoint", "runs/b", cwd=workdir, env=env)
        assert a.returncode == b.returncode == 0, a.stderr + b.stderr
        sent = len(emu.ledger.batches)
        bad = {**env, "POLARS_LLMBATCH_OUT_OF_CORE_ROWS": "lots"}
        c = llmbatch(*args, "--output", "c.parquet", "--checkpoint", "runs/c", cwd=workdir, env=bad)
        assert len(emu.ledger.batches) == sent  # the bad setting was refused before sending
    assert list((workdir / "runs" / "a" / "derived").glob("result-*"))
    assert not (workdir / "runs" / "b" / "derived").exists()
    assert pl.read_parquet(workdir / "a.parquet").equals(pl.read_parquet(workdir / "b.parquet"))
    assert c.returncode != 0 and "POLARS_LLMBATCH_OUT_OF_CORE_ROWS='lots'" in c.stderr
    assert not (workdir / "runs" / "c").exists()
