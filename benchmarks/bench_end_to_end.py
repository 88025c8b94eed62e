"""Benchmark: df.llm.batch end to end on 1M rows through the emulator in fast mode.

The emulator runs in its own process (``llmbatch emulator --speed 1``: each batch takes about a
second of emulated time once its requests are computed in columns). The client is this
process: ``df.llm.batch`` on ``sample.tickets(rows)`` (support tickets with 17% duplicates and
1% nulls), OpenAI ``gpt-4o-mini`` (or ``--provider anthropic`` / ``gemini``), a 4-category Enum
output, a fresh checkpoint. It reports the wall time, the client's CPU time (its share of the wall), and the
stages from the checkpoint's event log: prepare + estimate + shard files (until ``planned``),
uploads and creates, waiting on the provider, and results (from the first fetch to the end,
reconciled into the output frame). Stages overlap in time (shards finish while others are
uploaded), so the client's own work is also summed per activity by timing the calls the engine
makes: submit, poll, fetch, parse, the results Parquet, and the final join.

Run it by hand::

    python benchmarks/bench_end_to_end.py --rows 1000000 [--provider anthropic]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_emulator import start_emulator

import polars_llmbatch  # noqa: F401
from polars_llmbatch.run.engine import Settings
from polars_llmbatch.sample import CATEGORIES, tickets

SPENT: dict[str, float] = {}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}


def timed(owner: object, name: str, label: str) -> None:
    """Wrap ``owner.name`` to add its wall time to ``SPENT[label]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] = SPENT.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--provider", choices=sorted(MODELS), default="openai")
    args = parser.parse_args(argv)
    # Poll at most every 2 s (the library backs off to 60 s, right for real batches that take
    # hours, but it would blur a wall time measured in minutes).
    Settings.max_poll_interval = 2.0
    from polars_llmbatch import namespace
    from polars_llmbatch.providers.anthropic import Anthropic
    from polars_llmbatch.providers.gemini import Gemini
    from polars_llmbatch.providers.openai import OpenAI
    from polars_llmbatch.run import job, start
    from polars_llmbatch.run.engine import Engine

    cls = {"openai": OpenAI, "anthropic": Anthropic, "gemini": Gemini}[args.provider]

    timed(namespace, "_prepare", "render, bodies, ids (prepare)")
    timed(start, "start", "estimate + shard files (start)")
    timed(cls, "submit", "upload + create")
    timed(cls, "poll", "poll")
    timed(cls, "fetch", "download")
    timed(cls, "parse", "parse")
    timed(Engine, "_write_results", "results parquet")
    timed(job, "request_outputs", "decode + validate the answers")
    timed(job, "finish_rows", "join back onto the rows")
    proc, openai_url = start_emulator(args.speed)
    root = openai_url.removesuffix("/openai/v1")
    url = {"openai": openai_url, "anthropic": f"{root}/anthropic", "gemini": f"{root}/gemini"}[
        args.provider
    ]
    try:
        df = tickets(args.rows)
        with tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=".") as tmp:
            ckpt = Path(tmp) / "job"
            cpu0, t0 = time.process_time(), time.perf_counter()
            emu0 = _cpu_of(proc.pid)
            start = dt.datetime.now(dt.timezone.utc)
            out = df.llm.batch(
                "Classify this ticket: {body}",
                provider=args.provider,
                model=MODELS[args.provider],
                output=CATEGORIES,
                max_output_tokens=20,
                checkpoint=ckpt,
                api_key="bench",
                base_url=url,
                progress=False,
                poll_interval=0.5,
            )
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            emu_cpu = _cpu_of(proc.pid) - emu0
            end = dt.datetime.now(dt.timezone.utc)
            events = [json.loads(x) for x in (ckpt / "events.jsonl").read_text().splitlines()]
            at = {}
            for e in events:
                at.setdefault(e["event"], dt.datetime.fromisoformat(e["at"]))
                if e["event"] == "submitted":
                    at["last_submitted"] = dt.datetime.fromisoformat(e["at"])
            counts = out["llm_status"].value_counts().sort("llm_status").rows()
            shards = sum(1 for e in events if e["event"] == "submitted")
    finally:
        proc.terminate()
        proc.wait()

    def span(a: dt.datetime, b: dt.datetime) -> float:
        return (b - a).total_seconds()

    print(f"{args.provider}: {args.rows:,} rows, {shards} shards, statuses {counts}")
    print(f"  wall                               {wall:7.1f} s")
    print(f"  client CPU (all threads)           {cpu:7.1f} s   ({cpu / wall:.0%} of wall)")
    print(f"  emulator CPU (all threads)         {emu_cpu:7.1f} s   ({emu_cpu / wall:.0%} of wall)")
    print(f"  prepare + estimate + shard files   {span(start, at['planned']):7.1f} s")
    print(
        f"  uploads + creates                  {span(at['planned'], at['last_submitted']):7.1f} s"
    )
    print(
        f"  waiting on the provider            {span(at['last_submitted'], at['fetched']):7.1f} s"
    )
    print(f"  results: first fetch → frame       {span(at['fetched'], end):7.1f} s")
    print("  client time by activity (summed wall time of the calls):")
    for label, seconds in SPENT.items():
        print(f"    {label:<38} {seconds:7.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  client peak RSS                    {peak:7.0f} MB")


if __name__ == "__main__":
    main()
