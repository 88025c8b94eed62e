"""The spend ledger equals the usage in the results × each job's price table, by any grouping."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch import LlmBatchError
from polars_llmbatch.emulator import Faults, serve

CATS = ["billing", "bug"]


def frame(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"body": [f"ticket {i}" for i in range(start, start + n)]})


def expected(root: Path) -> pl.DataFrame:
    """By hand, from the files: every non-cached result × its job's prices."""
    rows = []
    for job_file in root.glob("*/job.json"):
        job = json.loads(job_file.read_text())
        p = job["price"]
        for f in (job_file.parent / "results").glob("*.parquet"):
            for r in pl.read_parquet(f).filter(pl.col("mode") != "cached").iter_rows(named=True):
                if r["input_tokens"] is None:
                    continue
                paid = (
                    (p["input"], p["output"])
                    if r["mode"] == "sync"
                    else (p["batch_input"], p["batch_output"])
                )
                rows.append(
                    {
                        "team": job["tags"].get("team"),
                        "cost": (r["input_tokens"] * paid[0] + r["output_tokens"] * paid[1]) / 1e6,
                        "sync": (r["input_tokens"] * p["input"] + r["output_tokens"] * p["output"])
                        / 1e6,
                        "tokens": r["input_tokens"] + r["output_tokens"],
                    }
                )
    return (
        pl.DataFrame(rows)
        .group_by("team")
        .agg(pl.len().alias("requests"), pl.sum("cost"), pl.sum("sync"), pl.sum("tokens"))
        .sort("team", nulls_last=True)
    )


def test_spend_by_tag_equals_usage_times_prices(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    kw = dict(model="gpt-4o-mini", output=CATS, api_key="k", progress=False, poll_interval=0.02)
    faults = Faults(missing=0.2, seed=2, fault_batches=1)  # a retry round
    with serve(batch_seconds=0.1, faults=faults) as emu:
        kw["base_url"] = emu.openai_url
        frame(30).llm.batch(
            "Classify: {body}",
            provider="openai",
            checkpoint=root / "a",
            tags={"team": "support"},
            **kw,
        )
        frame(10, 100).llm.batch(
            "Classify: {body}",
            provider="openai",
            checkpoint=root / "b",
            tags={"team": "growth"},
            mode="sync",
            **kw,
        )
        frame(5, 200).llm.batch("Say: {body}", provider="openai", checkpoint=root / "c", **kw)
        # Reuses a's answers from the cache: costs nothing again.
        frame(30).llm.batch(
            "Classify: {body}",
            provider="openai",
            checkpoint=root / "d",
            tags={"team": "support"},
            **kw,
        )
    got = polars_llmbatch.spend(root, by="tag:team").sort("team", nulls_last=True)
    want = expected(root)
    assert got["team"].to_list() == want["team"].to_list() == ["growth", "support", None]
    assert got["requests"].to_list() == want["requests"].to_list()
    # The first attempt lost some results (no usage came back: not countable); their retry is.
    assert got["requests"].to_list()[1] == 30
    assert got["cost"].to_list() == pytest.approx(want["cost"].to_list())
    assert got["cost_at_sync"].to_list() == pytest.approx(want["sync"].to_list())
    assert (got["input_tokens"] + got["output_tokens"]).to_list() == want["tokens"].to_list()
    growth = got.row(0, named=True)
    assert growth["savings"] == pytest.approx(0.0)  # sync mode: paid at the sync rate
    support = got.row(1, named=True)
    assert support["jobs"] == 2 and support["savings"] == pytest.approx(support["cost"])
    assert support["estimated"] > 0


def test_spend_groupings(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with serve(batch_seconds=0.1) as emu:
        for name, mode in (("a", "batch"), ("b", "sync")):
            frame(4).llm.batch(
                "Classify: {body}",
                provider="openai",
                model="gpt-4o-mini",
                output=CATS,
                checkpoint=root / name,
                mode=mode,
                api_key="k",
                base_url=emu.openai_url,
                progress=False,
                poll_interval=0.02,
            )
    by_job = polars_llmbatch.spend(root)
    assert sorted(by_job["job"]) == ["a", "b"]
    assert polars_llmbatch.spend(root, by="mode").sort("mode")["mode"].to_list() == [
        "batch",
        "sync",
    ]
    assert polars_llmbatch.spend(root, by="model")["model"].to_list() == ["openai/gpt-4o-mini"]
    day = polars_llmbatch.spend(root, by="day")
    assert day.height == 1 and day["jobs"][0] == 2
    total = by_job["cost"].sum()
    assert polars_llmbatch.spend(root, by="provider")["cost"][0] == pytest.approx(total)


def test_spend_errors(tmp_path: Path) -> None:
    with pytest.raises(LlmBatchError, match="no checkpoints under"):
        polars_llmbatch.spend(tmp_path)
    with pytest.raises(LlmBatchError, match="by= must be one of"):
        polars_llmbatch.spend(tmp_path, by="team")


def test_spend_keeps_local_runs_apart_and_warns_on_an_unknown_tag(tmp_path: Path) -> None:
    import json
    import shutil

    root = tmp_path / "runs"
    with serve(batch_seconds=0.05) as emu:
        frame(4).llm.batch(
            "Classify: {body}", provider="openai", model="gpt-4o-mini", output=CATS,
            checkpoint=root / "dry", tags={"team": "a"}, api_key="k", base_url=emu.openai_url,
            progress=False, poll_interval=0.02,
        )  # fmt: skip
    # the same job as if it had run at the provider (its results, another base URL)
    shutil.copytree(root / "dry", root / "real")
    job_file = root / "real" / "job.json"
    job = json.loads(job_file.read_text())
    job_file.write_text(json.dumps({**job, "base_url": "https://provider.invalid/v1"}))
    by_team = polars_llmbatch.spend(root, by="tag:team")
    assert by_team.select("team", "billed_by", "requests").rows() == [
        ("a", "provider", 4),
        ("a", "local", 4),
    ]  # never one row of 8: the emulator's "spend" is not the bill
    assert set(polars_llmbatch.spend(root)["billed_by"]) == {"local", "provider"}
    with pytest.warns(UserWarning, match=r"no job .* has a tag 'tema'.*\['team'\]"):
        unknown = polars_llmbatch.spend(root, by="tag:tema")
    assert unknown.height == 0 and "tema" in unknown.columns
