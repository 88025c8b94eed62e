"""Benchmark: which of polars' streaming reads and sinks streaming preparation is built on.

Issue 12 asks to measure which of ``sink_*``, ``collect_batches`` and partitioned sinks is
fastest and exact enough for the byte caps. Two questions, over the same Parquet extract as
``bench_scale.py`` (files of 2,500,000 synthetic tickets, made when missing):

1. **Reading the frame a slice at a time** (the render pass of :func:`.stream.stage`), in
   three ways, each in a fresh child process, alternating ``--repeat`` times (medians):

   - ``slice``: ``lazy.slice(offset, n).collect()`` per slice (what ``stage`` does for a plain
     scan, :func:`.stream.slices`);
   - ``collect_batches``: ``lazy.collect_batches(chunk_size=n, maintain_order=True)`` (what
     ``stage`` does for any other LazyFrame);
   - ``sink_batches``: ``lazy.sink_batches(callback, chunk_size=n)``.

   Each is run with two consumers: ``read`` (a cheap sum over the slice: the read's own cost)
   and ``render`` (:func:`.plan.render.render` of the slice, one at a time: a consumer as slow
   as the library's, so read-ahead shows). The floor is one streaming aggregate over the same
   columns (``scan → str.len_bytes().sum()``): the raw cost of reading those bytes.

2. **Cutting shard files at a byte cap.** polars can cut files itself
   (``sink_csv(pl.PartitionBy(dir, max_rows_per_file=, approximate_bytes_per_file=))``). The
   providers refuse a file over their byte cap, so a cut is only usable if no file exceeds it.
   Both are run with a cap low enough to bind (``--cap`` bytes; the 2.5M rows' lines are ~390
   bytes, so 50,000 requests are ~20 MB, under OpenAI's 200 MB): polars partitioning the shard
   lines of every row (the JSONL floor's lines from ``bench_scale.py``), and the library's
   :func:`.estimate.estimate` (``max_shard_bytes=cap``) plus :func:`.shards.write_shards` over
   staged requests. Reported: the shard step's wall time and the largest file against the cap.

Peak RSS is the child's ``VmHWM``. Run by hand::

    python benchmarks/bench_stream_choices.py --sizes 2.5 10 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import LINE, PROMPT, _cpu, _files, _run, _status

from polars_llmbatch.plan.stream import BATCH_ROWS

COLUMNS = ["body"]  # the prompt's only column


def _consumer(kind: str, schema: pl.Schema) -> Any:
    """A function of (slice, offset) → a number, so that nothing is optimised away."""
    if kind == "read":
        return lambda df, offset: df["body"].str.len_bytes().sum() or 0
    from polars_llmbatch.plan.render import render
    from polars_llmbatch.plan.requests import render_plan
    from polars_llmbatch.sample import CATEGORIES

    plan = render_plan(schema, PROMPT, provider="openai", model="gpt-4o-mini",
                       output=CATEGORIES, options={"max_output_tokens": 20})  # fmt: skip
    return lambda df, offset: render(plan, df, offset=offset).height


def _read(files: list[str], out: str, queue: Any, how: str, kind: str, rows: int) -> None:
    lazy = pl.scan_parquet(files).select(COLUMNS)
    consume = _consumer(kind, lazy.collect_schema())
    cpu = _cpu()
    started = time.perf_counter()
    total = 0
    if how == "floor":
        total = lazy.select(pl.col("body").str.len_bytes().sum()).collect().item()
    elif how == "slice":
        n = lazy.select(pl.len()).collect().item()
        for off in range(0, n, rows):
            total += consume(lazy.slice(off, rows).collect(), off)
    elif how == "collect_batches":
        off = 0
        for batch in lazy.collect_batches(chunk_size=rows, maintain_order=True):
            total += consume(batch, off)
            off += batch.height
    elif how == "sink_batches":
        state = {"off": 0, "total": 0}

        def each(batch: pl.DataFrame) -> None:
            state["total"] += consume(batch, state["off"])
            state["off"] += batch.height

        lazy.sink_batches(each, chunk_size=rows)
        total = state["total"]
    else:
        raise ValueError(how)
    queue.put({"how": how, "kind": kind, "seconds": time.perf_counter() - started,
               "cpu": _cpu() - cpu, "total": total, **_status()})  # fmt: skip


def _polars_cut(files: list[str], out: str, queue: Any, cap: int) -> None:
    message = pl.struct(pl.format(PROMPT.replace("{body}", "{}"), pl.col("body")).alias("content"))
    line = pl.concat_str(
        pl.lit(LINE[0]),
        pl.col("body").hash().cast(pl.String).str.zfill(32),
        pl.lit(LINE[1]),
        message.struct.json_encode().str.slice(1).str.head(-1),
        pl.lit(LINE[2]),
    )
    target = Path(out) / "cut"
    started = time.perf_counter()
    pl.scan_parquet(files).select(line.alias("line")).sink_csv(
        pl.PartitionBy(target, max_rows_per_file=50_000, approximate_bytes_per_file=cap),
        include_header=False,
        quote_style="never",
    )
    seconds = time.perf_counter() - started
    sizes = [p.stat().st_size for p in target.iterdir()]
    queue.put({"how": "polars PartitionBy", "seconds": seconds, "files": len(sizes),
               "largest": max(sizes), "over_cap": sum(s > cap for s in sizes),
               **_status()})  # fmt: skip


def _library_cut(files: list[str], out: str, queue: Any, cap: int) -> None:
    from polars_llmbatch.plan.estimate import estimate
    from polars_llmbatch.plan.requests import render_plan
    from polars_llmbatch.plan.shards import write_shards
    from polars_llmbatch.plan.stream import stage
    from polars_llmbatch.sample import CATEGORIES

    scan = pl.scan_parquet(files)
    rplan = render_plan(scan.collect_schema(), PROMPT, provider="openai", model="gpt-4o-mini",
                        output=CATEGORIES, options={"max_output_tokens": 20})  # fmt: skip
    staged = stage(scan, rplan, Path(out) / "staged", prompt=PROMPT)
    planned = estimate(staged, max_shard_bytes=cap)
    started = time.perf_counter()
    paths = write_shards(staged, planned.shards, Path(out) / "shards")
    seconds = time.perf_counter() - started
    sizes = [p.stat().st_size for p in paths]
    queue.put({"how": "library (estimate + write_shards)", "seconds": seconds,
               "files": len(sizes), "largest": max(sizes),
               "over_cap": sum(s > cap for s in sizes), **_status()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[2.5, 10])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("/work/bench_data/p"))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--rows", type=int, default=BATCH_ROWS, help="rows per slice")
    parser.add_argument("--cap", type=int, default=8_000_000, help="shard byte cap for part 2")
    args = parser.parse_args()
    print(f"polars {pl.__version__}; slices of {args.rows:,} rows")
    ways = [("floor", "read")] + [
        (how, kind)
        for kind in ("read", "render")
        for how in ("slice", "collect_batches", "sink_batches")
    ]
    for millions in args.sizes:
        files = _files(args.data, millions)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {w: [] for w in ways}
        for _ in range(args.repeat):  # alternating, so that a slow minute hits all of them
            for how, kind in ways:
                runs[(how, kind)].append(_run(_read, files, args.scratch, how, kind, args.rows))
        for (how, kind), rs in runs.items():
            assert len({r["total"] for r in rs}) == 1
            sec = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            peak = statistics.median(r["VmHWM"] for r in rs)
            each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
            print(f"{millions}M rows, {kind:6} {how:15}: {sec:6.2f} s (runs {each}), "
                  f"CPU {cpu:6.2f} s, peak RSS {peak / 2**20:,.0f} MB")  # fmt: skip
        print(
            json.dumps(
                {"millions": millions, "read": {f"{h}/{k}": v for (h, k), v in runs.items()}}
            )
        )
    files = _files(args.data, args.sizes[0])
    for target in (_polars_cut, _library_cut):
        r = _run(target, files, args.scratch, args.cap)
        print(f"{args.sizes[0]}M rows, cap {args.cap:,} B, {r['how']}: {r['seconds']:.2f} s, "
              f"{r['files']} files, largest {r['largest']:,} B "
              f"({r['largest'] / args.cap:.3f}x the cap), {r['over_cap']} over the cap, "
              f"peak RSS {r['VmHWM'] / 2**20:,.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
