"""Benchmark: an embeddings dry run through the emulator (the slowest dry run there was).

The emulator runs in its own process (``llmbatch emulator --speed 1``); this process runs
``df.llm.embed`` on ``--rows`` distinct ticket texts with ``text-embedding-3-small`` (1,536
float32 values a row, base64 on the wire), twice, each into a fresh checkpoint. It prints the
wall time of each job, the client's and the emulator's CPU seconds, and the emulator's RSS
before and after (finished batches must not keep their inputs).

The vector itself, the emulator's own cost per request, is timed in this process too: the
Arrow-kernel vector now used against the pure-Python Gaussian loop it replaced (the baseline,
copied below), on the same texts.

Run by hand::

    python benchmarks/bench_embed.py --rows 50000
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import polars as pl
from bench_emulator import start_emulator

import polars_llmbatch  # noqa: F401
from polars_llmbatch.emulator import model


def old_embedding(text: str, dims: int) -> list[float]:
    """The emulator's vector before: a seeded Gaussian loop in Python."""
    rng = random.Random(model.stable_int(text))
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in values))))


def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = 100.0
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * 4096 / 1e6
    return cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    texts = [f"ticket {i}: the app crashes when I open settings, please help" for i in range(2000)]
    per = {}
    for name, fn in (
        ("python loop (before)", old_embedding),
        ("arrow kernels (now)", lambda t, d: model.embedding_base64(model.embedding_array(t, d))),
    ):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            for text in texts:
                fn(text, 1536)
            runs.append((time.perf_counter() - t) / len(texts) * 1e6)
        per[name] = statistics.median(runs)
    base = per["python loop (before)"]
    print("one 1,536-d vector, median of 3 over 2,000 texts:")
    for name, us in per.items():
        print(f"  {name:<22} {us:8.0f} µs  ({base / us:.1f}x)")

    proc, url = start_emulator(1.0)
    try:
        df = pl.DataFrame(
            {"body": [f"ticket {i}: {'refund' * (i % 3)} app crash" for i in range(args.rows)]}
        )
        _, rss0 = proc_stat(proc.pid)
        print(f"\nemulator RSS at start {rss0:,.0f} MB")
        for k in range(2):
            me0 = resource.getrusage(resource.RUSAGE_SELF)
            emu0, _ = proc_stat(proc.pid)
            t = time.perf_counter()
            out = df.llm.embed(
                "body",
                provider="openai",
                model="text-embedding-3-small",
                checkpoint=Path(tempfile.mkdtemp()) / "emb",
                api_key="bench",
                base_url=url,
                progress=False,
                poll_interval=0.5,
            )
            wall = time.perf_counter() - t
            me1 = resource.getrusage(resource.RUSAGE_SELF)
            emu1, rss = proc_stat(proc.pid)
            client = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
            assert out["llm_status"].eq("succeeded").all()
            print(
                f"job {k + 1}: {args.rows:,} embeddings in {wall:6.1f} s wall; client CPU "
                f"{client:5.1f} s, emulator CPU {emu1 - emu0:5.1f} s; emulator RSS {rss:,.0f} MB"
            )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
