"""Reading OpenAI batch output and error files, as the emulator (and OpenAI) writes them."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import polars as pl

from polars_llmbatch.collect.results import RESULT_SCHEMA
from polars_llmbatch.emulator import Faults, model, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers.openai import parse_results

CATS = ["billing", "bug", "feature", "other"]


def run_batch(tmp_path: Path, n: int, faults: Faults, **kw) -> tuple[list[Path], pl.DataFrame]:
    df = pl.DataFrame({"body": [f"ticket {i}: I was charged twice" for i in range(n)]})
    args = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "output": CATS,
        "options": {"max_output_tokens": 20},
    }
    p = prepare(df, "Classify: {body}", **(args | kw))
    (s,) = plan(p)
    with serve(batch_seconds=0.2, faults=faults) as emu:
        c = openai.OpenAI(base_url=emu.openai_url, api_key="k")
        f = c.files.create(file=("s.jsonl", shard_bytes(p, s)), purpose="batch")
        b = c.batches.create(
            input_file_id=f.id, endpoint=p.provider.endpoint(p.spec), completion_window="24h"
        )
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            b = c.batches.retrieve(b.id)
        files = []
        for name, fid in (("out", b.output_file_id), ("err", b.error_file_id)):
            if fid:
                path = tmp_path / f"{name}.jsonl"
                path.write_bytes(c.files.content(fid).content)
                files.append(path)
    return files, p.requests


def test_successes_and_typed_enum_values(tmp_path: Path) -> None:
    files, reqs = run_batch(tmp_path, 12, Faults())
    got = parse_results([str(f) for f in files])
    assert got.schema == RESULT_SCHEMA
    assert sorted(got["custom_id"]) == sorted(reqs["custom_id"])
    assert set(got["status"]) == {"succeeded"} and got["error"].null_count() == 12
    joined = got.join(reqs, on="custom_id")
    labels = joined.select(
        pl.col("text").str.json_decode(pl.Struct({"label": pl.Enum(CATS)})).struct.field("label")
    )
    expected = [model.enum_pick(u, "label", CATS) for u in joined["user"]]
    assert labels.to_series().to_list() == expected
    assert (got["input_tokens"] > 0).all() and (got["finish"] == "stop").all()


def test_errors_expiry_and_broken_lines(tmp_path: Path) -> None:
    faults = Faults(request_errors=0.3, expire_at=0.5, duplicates=0.3, malformed=0.1, seed=2)
    files, reqs = run_batch(tmp_path, 40, faults)
    got = parse_results([str(f) for f in files])
    assert got["custom_id"].n_unique() == got.height  # one row per request, duplicates folded
    status = dict(got.select("custom_id", "status").iter_rows())
    assert {"succeeded", "errored", "expired"} <= set(status.values())
    assert got.filter(pl.col("status") == "errored")["error"].str.contains("request_errors").all()
    assert (
        got.filter(pl.col("status") == "expired")["error"].str.contains("completion window").all()
    )
    malformed = len(reqs) - got.height
    assert 0 < malformed < 10  # broken lines are skipped, the caller reports them missing


def test_responses_api_text(tmp_path: Path) -> None:
    files, _ = run_batch(tmp_path, 3, Faults(), model="gpt-5-mini", api="responses", options={})
    got = parse_results([str(f) for f in files])
    assert (
        got["text"]
        .map_elements(lambda t: json.loads(t)["label"] in CATS, return_dtype=pl.Boolean)
        .all()
    )
    assert set(got["finish"]) == {"completed"}
