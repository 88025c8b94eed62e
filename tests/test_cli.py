"""The ``llmbatch`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

TEMPLATE = "Classify this ticket: {body}"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polars_llmbatch.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    r = run("sample", "tickets.parquet", "--rows", "3000", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "wrote 3,000 tickets" in r.stdout
    return d


def test_estimate_prints_the_figures(sample: Path) -> None:
    r = run(
        "estimate",
        "tickets.parquet",
        "--prompt",
        TEMPLATE,
        "--provider",
        "openai",
        "--model",
        "gpt-4o-mini",
        "--categories",
        "billing,bug,feature,other",
        "--max-output-tokens",
        "20",
        cwd=sample,
    )
    assert r.returncode == 0, r.stderr
    assert "unique in 1 shard" in r.stdout and "batch $" in r.stdout


def test_estimate_json_and_other_formats(sample: Path) -> None:
    pl.read_parquet(sample / "tickets.parquet").write_csv(sample / "t.csv")
    r = run(
        "estimate",
        "t.csv",
        "--prompt",
        TEMPLATE,
        "--provider",
        "gemini",
        "--model",
        "gemini-2.5-flash",
        "--json",
        cwd=sample,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rows"] == 3000 and d["provider"] == "gemini" and d["output_tokens_worst"] is None


def test_requests_writes_shards(sample: Path) -> None:
    r = run(
        "requests",
        "tickets.parquet",
        "--prompt",
        TEMPLATE,
        "--provider",
        "anthropic",
        "--model",
        "claude-haiku-4-5",
        "--max-output-tokens",
        "50",
        "--id",
        "ticket_id",
        "--write-to",
        "shards",
        "--out",
        "reqs.parquet",
        cwd=sample,
    )
    assert r.returncode == 0, r.stderr
    create = json.loads((sample / "shards" / "00000.json").read_bytes())
    reqs = pl.read_parquet(sample / "reqs.parquet")
    assert len(create["requests"]) == reqs["custom_id"].drop_nulls().n_unique()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--prompt", "{nope}", "--provider", "openai", "--model", "gpt-4o"], 1, "'nope'"),
        (
            ["--prompt", TEMPLATE, "--provider", "acme", "--model", "x"],
            1,
            "unknown provider 'acme'",
        ),
        (
            [
                "--prompt",
                TEMPLATE,
                "--provider",
                "openai",
                "--model",
                "gpt-4o",
                "--max-output-tokens",
                "100",
                "--max-cost",
                "0.001",
            ],
            3,
            "over budget",
        ),
    ],
)
def test_errors_are_one_line_with_distinct_codes(
    sample: Path, args: list[str], code: int, message: str
) -> None:
    r = run("estimate", "tickets.parquet", *args, cwd=sample)
    assert r.returncode == code
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_input_file(tmp_path: Path) -> None:
    r = run(
        "estimate",
        "nope.parquet",
        "--prompt",
        "x",
        "--provider",
        "openai",
        "--model",
        "m",
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_emulator_command_serves_and_stops(tmp_path: Path) -> None:
    import signal

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "polars_llmbatch.cli", "emulator", "--faults", "seed=1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("emulator on http://127.0.0.1:")
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in (proc.stdout.readline() for _ in range(6))
        )
        urls = {"OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL"}
        assert set(exports) == urls | {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
        r = httpx.get(
            f"{exports['OPENAI_BASE_URL']}/batches", headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.json()["data"] == []
        # The README's flow: export what it printed, and nothing else, then run a job.
        pl.DataFrame({"body": ["a refund", "a crash"]}).write_parquet(tmp_path / "t.parquet")
        clean = {k: v for k, v in os.environ.items() if "API_KEY" not in k and "BASE_URL" not in k}
        for provider, model in (("openai", "gpt-4o-mini"), ("gemini", "gemini-2.5-flash")):
            job = subprocess.run(
                [sys.executable, "-m", "polars_llmbatch.cli", "run", "t.parquet", "--prompt",
                 "Classify: {body}", "--provider", provider, "--model", model, "--quiet",
                 "--poll-interval", "0.05", "--checkpoint", f"runs/{provider}"],
                cwd=tmp_path, env={**clean, **exports}, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert job.returncode == 0, job.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_emulator_command_refuses_unknown_faults(tmp_path: Path) -> None:
    r = run("emulator", "--faults", "bogus=1", cwd=tmp_path)
    assert r.returncode == 1 and "unknown fault 'bogus'" in r.stderr


def test_every_command_takes_quiet_and_quiet_keeps_stderr_for_errors(tmp_path: Path) -> None:
    from polars_llmbatch.cli import _parser

    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        assert any("--quiet" in a.option_strings for a in command._actions), name
    r = run("sample", "t.parquet", "--rows", "50", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("wrote 50") and r.stderr == ""
    assert pl.read_parquet(tmp_path / "t.parquet").height == 50
    r = run(
        "requests", "t.parquet", "--prompt", "Say: {body}", "--provider", "openai",
        "--model", "gpt-4o-mini", "--out", "r.parquet", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0 and "unique requests" in r.stdout and r.stderr == ""
    assert (tmp_path / "r.parquet").exists()
    r = run(
        "estimate", "t.parquet", "--prompt", "Say: {body}", "--provider", "openai",
        "--model", "gpt-4o-mini", "--json", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == 50  # the output stays


def test_empty_categories_are_refused_like_an_empty_output_list(tmp_path: Path) -> None:
    for value in ("", ",", " , "):
        r = run(
            "estimate", "t.parquet", "--prompt", "p", "--provider", "openai", "--model",
            "gpt-4o-mini", "--categories", value, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 2 and "give at least two" in r.stderr, value


def test_a_zero_for_a_generation_flag_with_embed_is_still_refused(tmp_path: Path) -> None:
    pl.DataFrame({"t": ["a"]}).write_parquet(tmp_path / "t.parquet")
    r = run(
        "run", "t.parquet", "--prompt", "{t}", "--provider", "openai", "--model",
        "text-embedding-3-small", "--embed", "--temperature", "0", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1 and "--temperature does not apply to --embed" in r.stderr
