"""Benchmark: streaming preparation of a Parquet extract (2.5M / 10M / 25M rows) in bounded
memory, against a bare polars floor over the same files.

Input: ``--data DIR`` holds Parquet files of 2,500,000 synthetic tickets each
(:func:`polars_llmbatch.sample.tickets`, seeds 0, 1, ...; made when missing, which takes a few
minutes); a size of N million rows scans the first N / 2.5 files. Prompt
``"Classify this ticket: {body}"``, OpenAI ``gpt-4o-mini``, a 4-category enum output,
``max_output_tokens=20`` (a strict JSON schema in every body, ~400-byte bodies).

For each size, in fresh child processes (so each peak is its own), alternating ``--repeat``
times (medians):

1. Two floors, each what polars alone takes over the same files:

   - ``Parquet floor``: ``scan_parquet → format(prompt) → struct.json_encode → sink_parquet``
     (the message only, written compressed);
   - ``JSONL floor``: the same, but every row's whole shard line (the request's exact bytes
     around its JSON-encoded message, a hash for its id) sunk as JSONL and fsynced: the bytes
     the shard files hold, for every row. The raw cost of the pipeline's output, so the ratio
     the goal (≤ 2×) is read against.
2. ``pipeline``: :func:`.stream.stage` (render, content-hash ids, dedup by bucket, bodies),
   then :func:`.estimate.estimate` on the staged requests (sampled, as the library does above
   20,000 unique requests) and :func:`.shards.write_shards` (the shard files, fsynced): what
   ``llmbatch estimate`` plus ``llmbatch requests --write-to`` do, staged once. Timed per step.

With ``--sink``, only this, in three processes: the whole job against the emulator, then
``.sink_parquet`` of its LazyFrame result (``run``); the same call again on the finished
checkpoint with the result joined on disk (``spill``, :mod:`.collect.spill`, the default from a
million rows) and with polars' streaming join (``join``, the default below).

With ``--batch``, also:

3. ``batch``: ``scan_parquet(...).llm.batch(..., wait=False, max_in_flight=1)`` against the
   emulator (its own process): staging, the checkpoint's rows and requests, the estimate, the
   whole first round's shard files planned and written by the engine, and one batch submitted
   (the rest held by ``max_in_flight``): what a job holds in memory before its answers come.

Peak RSS is the child's ``VmHWM`` (resident, page-cache mappings included) and ``RssAnon`` at
the end (its own heap). Run by hand::

    python benchmarks/bench_scale.py --sizes 2.5 10 25 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

PROMPT = "Classify this ticket: {body}"
FILE_ROWS = 2_500_000


def _files(data: Path, millions: float) -> list[str]:
    n = max(1, round(millions * 1_000_000 / FILE_ROWS))
    data.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = data / f"{i:02d}.parquet"
        if not path.exists():
            from polars_llmbatch.sample import tickets

            tickets(FILE_ROWS, seed=i).write_parquet(path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
    return [str(data / f"{i:02d}.parquet") for i in range(n)]


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu() -> float:
    """This process's CPU seconds so far (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


def _peak_and_reset() -> float:
    """This process's peak resident set since the last reset (``VmHWM``), then a reset
    (``/proc/self/clear_refs``), so the next phase's peak is its own."""
    peak = _status()["VmHWM"]
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def _floor(files: list[str], out: str, queue: Any) -> None:
    cpu = _cpu()
    started = time.perf_counter()
    pl.scan_parquet(files).select(
        pl.struct(pl.format(PROMPT.replace("{body}", "{}"), pl.col("body")).alias("content"))
        .struct.json_encode()
        .alias("j")
    ).sink_parquet(Path(out) / "floor.parquet")
    queue.put({"seconds": time.perf_counter() - started, "cpu": _cpu() - cpu, **_status()})


#: A shard line of this job, cut where its id and its message go (bytes as the library writes
#: them; the floor below fills them with polars alone).
LINE = (
    '{"custom_id":"',
    '","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":'
    '[{"role":"user",',
    '}],"max_completion_tokens":20,"response_format":{"type":"json_schema","json_schema":'
    '{"name":"output","strict":true,"schema":{"type":"object","properties":{"label":{"type":'
    '"string","enum":["billing","bug","feature","other"]}},"required":["label"],'
    '"additionalProperties":false}}}}}',
)


def _line_floor(files: list[str], out: str, queue: Any) -> None:
    """The same bytes the shard files hold, for every row (no dedup), by polars alone: scan →
    format → json_encode → sink as JSONL, then fsync (the shard files are fsynced too). The id
    is polars' own 64-bit hash, zero-padded to an MD5's 32 characters."""
    cpu = _cpu()
    started = time.perf_counter()
    message = pl.struct(pl.format(PROMPT.replace("{body}", "{}"), pl.col("body")).alias("content"))
    line = pl.concat_str(
        pl.lit(LINE[0]),
        pl.col("body").hash().cast(pl.String).str.zfill(32),
        pl.lit(LINE[1]),
        message.struct.json_encode().str.slice(1).str.head(-1),  # "content":"..."
        pl.lit(LINE[2]),
    )
    target = Path(out) / "floor.jsonl"
    pl.scan_parquet(files).select(line.alias("line")).sink_csv(
        target, include_header=False, quote_style="never"
    )
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    queue.put({"seconds": time.perf_counter() - started, "cpu": _cpu() - cpu,
               "bytes": target.stat().st_size,
               **_status()})  # fmt: skip


def _pipeline(files: list[str], out: str, queue: Any) -> None:
    from polars_llmbatch.plan.estimate import estimate
    from polars_llmbatch.plan.requests import render_plan
    from polars_llmbatch.plan.shards import write_shards
    from polars_llmbatch.plan.stream import stage
    from polars_llmbatch.sample import CATEGORIES

    times: dict[str, float] = {}
    cpu = _cpu()  # the imports above are not the pipeline's
    started = time.perf_counter()
    scan = pl.scan_parquet(files)
    rplan = render_plan(scan.collect_schema(), PROMPT, provider="openai", model="gpt-4o-mini",
                        output=CATEGORIES, options={"max_output_tokens": 20})  # fmt: skip
    staged = stage(scan, rplan, Path(out) / "staged", prompt=PROMPT)
    times["stage"] = time.perf_counter() - started
    t = time.perf_counter()
    planned = estimate(staged)
    times["estimate"] = time.perf_counter() - t
    t = time.perf_counter()
    write_shards(staged, planned.shards, Path(out) / "shards")
    times["shards"] = time.perf_counter() - t
    times["seconds"] = time.perf_counter() - started
    times["cpu"] = _cpu() - cpu
    size = sum(p.stat().st_size for p in (Path(out) / "shards").iterdir())
    staged_bytes = sum(p.stat().st_size for p in (Path(out) / "staged").rglob("*") if p.is_file())
    queue.put({
        **times, **_status(), "rows": staged.n_rows, "requests": staged.n_requests,
        "shard_files": len(planned.shards), "shard_bytes": size, "staged_bytes": staged_bytes,
        "input_tokens": planned.estimate.input_tokens,
    })  # fmt: skip


def _job(files: list[str], out: str, url: str, **kw: Any) -> Any:
    """The benchmark's job (:data:`PROMPT`, a 4-category enum) over ``files`` against the
    emulator at ``url``, checkpointed in ``out/job``."""
    import polars_llmbatch  # noqa: F401
    from polars_llmbatch.sample import CATEGORIES

    return pl.scan_parquet(files).llm.batch(
        PROMPT, provider="openai", model="gpt-4o-mini", output=CATEGORIES,
        max_output_tokens=20, checkpoint=Path(out) / "job", api_key="k", base_url=url,
        progress=False, **kw,
    )  # fmt: skip


def _batch(files: list[str], out: str, queue: Any) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_emulator import start_emulator

    emulator, url = start_emulator(60.0)
    try:
        started = time.perf_counter()
        job = _job(files, out, url, wait=False, max_in_flight=1)
        seconds = time.perf_counter() - started
        memory = _status()  # before anything reads the results or the row table back
        job.close()
    finally:
        emulator.kill()
    ckpt = sum(p.stat().st_size for p in (Path(out) / "job").rglob("*") if p.is_file())
    events = (Path(out) / "job" / "events.jsonl").read_text()
    shards = {
        "planned": events.count('"event":"planned"'),
        "submitted": events.count('"submitted"'),
    }
    queue.put({"seconds": seconds, **memory, "shards": shards, "checkpoint_bytes": ckpt})


def _sink(files: list[str], out: str, queue: Any, join: str = "spill") -> None:
    """The whole job (``join="run"``: submitted, waited on, collected) or its rerun on the
    finished checkpoint, then ``.sink_parquet`` of the LazyFrame result: joined on disk
    (``"spill"``, the default above a million rows) or by polars' streaming join (``"join"``,
    what smaller jobs use), each in its own process."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_emulator import start_emulator

    import polars_llmbatch  # noqa: F401
    import polars_llmbatch.run.job as job_module

    if join == "join":
        job_module.OUT_OF_CORE_ROWS = 2**62
    phases: dict[str, float] = {}
    result = job_module.Job.result

    def timed_result(self: Any, **kw: Any) -> Any:  # each phase's own peak: reset, then read
        phases["before_result"] = _peak_and_reset()
        t = time.perf_counter()
        out = result(self, **kw)
        phases["result_seconds"] = time.perf_counter() - t
        phases["result"] = _peak_and_reset()
        return out

    job_module.Job.result = timed_result  # type: ignore[method-assign]
    emulator, url = start_emulator(0.5)
    try:
        started = time.perf_counter()
        lf = _job(files, out, url, poll_interval=0.5)
        ready = time.perf_counter() - started
        lf.sink_parquet(Path(out) / "result.parquet")
        seconds = time.perf_counter() - started
        phases["sink"] = _peak_and_reset()
    finally:
        emulator.kill()
    memory = {**_status(), **phases}
    written = pl.scan_parquet(Path(out) / "result.parquet")
    counts = dict(written.group_by("llm_status").len().collect().iter_rows())
    queue.put({"join": join, "seconds": seconds, "until_result": ready, **memory,
               "statuses": counts})  # fmt: skip


def _run(
    target: Any, files: list[str], scratch: Path, *extra: Any, out: Path | None = None
) -> dict[str, Any]:
    keep = out is not None
    out = out or Path(tempfile.mkdtemp(dir=scratch))
    # every step starts with no dirty pages of the one before: writing back another step's
    # gigabytes would otherwise be charged to this one (the spread between runs was 2x)
    os.sync()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(files, str(out), queue, *extra))
    proc.start()
    result = queue.get()
    proc.join()
    if not keep:
        shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2.5, 10, 25])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("/work/bench_data/p"))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--batch", action="store_true", help="also time lf.llm.batch's start")
    parser.add_argument(
        "--sink",
        action="store_true",
        help="only run the job through the emulator and time lf.llm.batch(...).sink_parquet",
    )
    args = parser.parse_args()
    if args.sink:
        for millions in args.sizes:
            files = _files(args.data, millions)
            out = Path(tempfile.mkdtemp(dir=args.scratch))
            try:
                runs = [
                    _run(_sink, files, args.scratch, j, out=out) for j in ("run", "spill", "join")
                ]
            finally:
                shutil.rmtree(out)
            print(json.dumps({"millions": millions, "sink": runs}))
            for r in runs:
                print(
                    f"{millions}M rows, {r['join']}: {r['seconds']:.1f} s ({r['until_result']:.1f} s "
                    f"until the result LazyFrame), peak RSS {r['VmHWM'] / 2**20:,.0f} MB, "
                    f"RssAnon {r['RssAnon'] / 2**20:,.0f} MB, {r['statuses']}; peaks: before "
                    f"result() {r['before_result'] / 2**20:,.0f} MB, result() "
                    f"{r['result'] / 2**20:,.0f} MB ({r['result_seconds']:.1f} s), sink "
                    f"{r['sink'] / 2**20:,.0f} MB"
                )
        return
    print(f"polars {pl.__version__}; files of {FILE_ROWS:,} rows in {args.data}")
    rows = []
    for millions in args.sizes:
        files = _files(args.data, millions)
        floors, lines, runs = [], [], []
        for _ in range(args.repeat):  # alternating, so that a slow minute hits all three
            floors.append(_run(_floor, files, args.scratch))
            lines.append(_run(_line_floor, files, args.scratch))
            runs.append(_run(_pipeline, files, args.scratch))
        floor = statistics.median(f["seconds"] for f in floors)
        line_floor = statistics.median(f["seconds"] for f in lines)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        line_cpu = statistics.median(f["cpu"] for f in lines)
        rows.append((millions, floor, line_floor, {**med, "line_cpu": line_cpu}))
        print(json.dumps({"millions": millions, "floor": floors, "line_floor": lines,
                          "pipeline": runs}))  # fmt: skip
        if args.batch:
            started = _run(_batch, files, args.scratch)
            print(json.dumps({"millions": millions, "batch": started}))
            print(
                f"batch start, {millions}M rows: {started['seconds']:.1f} s "
                f"({started['seconds'] / floor:.1f}× the floor), peak RSS "
                f"{started['VmHWM'] / 2**20:,.0f} MB, RssAnon {started['RssAnon'] / 2**20:,.0f} MB, "
                f"checkpoint {started['checkpoint_bytes'] / 1e9:.1f} GB, shards {started['shards']}"
            )
    print()
    print("| rows | Parquet floor | JSONL floor | stage | estimate | shard files | **total** | "
          "× JSONL floor | × Parquet floor | CPU, pipeline / JSONL floor | peak RSS (VmHWM) | "
          "RssAnon at end | staged on disk | shard files |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0][3]["VmHWM"]
    for _, floor, line_floor, m in rows:
        print(
            f"| {m['rows']:,} | {floor:.1f} s | {line_floor:.1f} s | {m['stage']:.1f} s | "
            f"{m['estimate']:.1f} s | {m['shards']:.1f} s | **{m['seconds']:.1f} s** | "
            f"**{m['seconds'] / line_floor:.2f}×** | {m['seconds'] / floor:.2f}× | "
            f"{m['cpu']:.1f} s / {m['line_cpu']:.1f} s | "
            f"{m['VmHWM'] / 2**20:,.0f} MB ({m['VmHWM'] / base:.2f}× the first) | "
            f"{m['RssAnon'] / 2**20:,.0f} MB | {m['staged_bytes'] / 1e9:.1f} GB | "
            f"{m['shard_files']:,} / {m['shard_bytes'] / 1e9:.1f} GB |"
        )


if __name__ == "__main__":
    main()
