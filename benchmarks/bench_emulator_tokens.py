"""The emulator's token counting of a shard's prompts: one loop, two threads, tiktoken's batch.

50,000 ticket prompts by ``o200k_base`` (``encode_ordinary`` of each), medians of 5, in one
process: a loop in one thread (the baseline), the list cut in two and a loop per thread
(``emulator.tokenizers.lengths``), and ``encode_ordinary_batch(num_threads=2)``. The counts
must agree; the figure is the time.

Run: ``python benchmarks/bench_emulator_tokens.py``
"""

from __future__ import annotations

import statistics
import time

from polars_llmbatch.emulator.tokenizers import lengths
from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.sample import tickets


def main() -> None:
    texts = ["Classify this ticket: " + (t or "") for t in tickets(50_000)["body"].to_list()]
    enc = get_encoding("o200k_base")
    enc.encode_ordinary("warm up")

    def loop(ts: list[str]) -> list[int]:
        return [len(enc.encode_ordinary(t)) for t in ts]

    def batch(ts: list[str]) -> list[int]:
        return [len(x) for x in enc.encode_ordinary_batch(ts, num_threads=2)]

    results = {}
    for name, fn in [
        ("one loop (baseline)", loop),
        ("two threads (lengths)", lambda ts: lengths("o200k_base", ts)),
        ("encode_ordinary_batch, 2 threads", batch),
    ]:
        times, counts = [], []
        for _ in range(5):
            t = time.perf_counter()
            counts = fn(texts)
            times.append(time.perf_counter() - t)
        results[name] = (statistics.median(times), sum(counts))
    base = results["one loop (baseline)"][0]
    for name, (median, total) in results.items():
        print(f"{name:34s} {median:6.3f} s  {base / median:4.2f}x  ({total:,} tokens)")


if __name__ == "__main__":
    main()
