"""Benchmark: reconcile 1M OpenAI result lines into typed columns on 1M input rows.

What the engine does once every shard is back: parse the output files
(``OpenAI.parse``), pick the best result per request, decode the structured output into typed
columns (an Enum here, and a 3-field struct), and join statuses and outputs back onto the
input rows in their order. Target: ≤ 2 s for 1M lines (issue 4). The baseline, in the same
process, is an orjson loop that reads the same lines into dicts and builds the label column.

Run it by hand::

    python benchmarks/bench_reconcile.py --rows 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from bench_parse import write_lines

from polars_llmbatch.collect.reconcile import join_rows
from polars_llmbatch.plan.outputs import parse_output
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers.openai import OpenAI

CATS = ["billing", "bug", "feature", "other"]
PRICE = {"batch_input": 0.075, "batch_output": 0.3, "input": 0.15, "output": 0.6}


def reconcile(path: Path, rows: pl.DataFrame, spec: RequestSpec) -> tuple[pl.DataFrame, dict]:
    t0 = time.perf_counter()
    results = (
        OpenAI()
        .parse([path], spec)
        .with_columns(
            pl.lit(1, pl.Int32).alias("attempt"),
            pl.lit(0, pl.Int32).alias("shard"),
            pl.lit("batch").alias("mode"),
        )
    )
    t1 = time.perf_counter()
    out = join_rows(rows, results, spec, price=PRICE, usage=True)
    t2 = time.perf_counter()
    return out, {"parse": t1 - t0, "decode + join": t2 - t1, "total": t2 - t0}


def orjson_baseline(path: Path, rows: pl.DataFrame) -> pl.DataFrame:
    by_id = {}
    with open(path, "rb") as fh:
        for line in fh:
            o = orjson.loads(line)
            content = o["response"]["body"]["choices"][0]["message"]["content"]
            by_id[o["custom_id"]] = orjson.loads(content)["label"]
    labels = [by_id.get(c) for c in rows["custom_id"].to_list()]
    return pl.DataFrame({"label": pl.Series(labels, dtype=pl.Enum(CATS))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    n = args.rows
    rows = pl.DataFrame(
        {
            "row_nr": pl.int_range(n, dtype=pl.UInt64, eager=True),
            # Rows in a different order from the file, as after a shuffle by the provider.
            "custom_id": [f"{i:032x}" for i in range(n)][::-1],
            "skipped": pl.repeat(False, n, eager=True),
        }
    )
    enum = RequestSpec("openai", "gpt-4o-mini", output=parse_output(CATS))
    with tempfile.TemporaryDirectory(prefix="bench_reconcile_", dir=".") as tmp:
        path = Path(tmp) / "output.jsonl"
        write_lines(path, n)
        print(f"{n:,} result lines, {path.stat().st_size / 1e6:,.0f} MB, {n:,} input rows")
        runs = []
        for _ in range(args.repeat):
            out, times = reconcile(path, rows, enum)
            runs.append(times)
        assert out.height == n and out["llm_status"].n_unique() == 1
        assert out.schema["label"] == pl.Enum(CATS)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        base = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            ref = orjson_baseline(path, rows)
            base.append(time.perf_counter() - t)
        assert ref["label"].equals(out["label"])  # the same answer on the same rows
        b = statistics.median(base)
        for k, v in med.items():
            print(f"  reconcile {k:<14} {v:6.2f} s")
        print(f"  orjson loop baseline     {b:6.2f} s   (ours: {b / med['total']:.1f}x faster)")


if __name__ == "__main__":
    main()
