"""Token counts: exact counts of many texts (in worker processes when large), and sampled estimates.

Counting uses ``encode_ordinary`` (user text may contain ``<|endoftext|>``, which ``encode``
refuses) in a plain loop, which beats tiktoken's batch functions on short texts
(reference/tokens.md §7.2); large exact counts are spread over processes.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.plan.tokens.worker import read_frame, write_frame

__all__ = ["SampleCount", "count_texts", "sample_count"]

#: Above this many texts an exact count runs in worker processes (one per core).
PARALLEL_MIN = 50_000
_CHUNK = 20_000


def count_texts(texts: pl.Series, encoding: str, *, processes: int | None = None) -> pl.Series:
    """Exact token count of each text (null counts 0), in worker processes for large inputs.

    Example:
        >>> count_texts(pl.Series(["Hello, world!", None]), "o200k_base").to_list()
        [4, 0]
    """
    n = len(texts)
    workers = processes if processes is not None else (os.cpu_count() or 1)
    if n < PARALLEL_MIN or workers < 2:
        return _count_list(encoding, texts.to_list())
    chunk = max(_CHUNK, math.ceil(n / (workers * 8)))
    return _count_in_workers(texts, encoding, workers, chunk)


def _count_in_workers(texts: pl.Series, encoding: str, workers: int, chunk: int) -> pl.Series:
    """Count in ``workers`` subprocesses (see :mod:`.worker`), one feeding thread each; each
    thread takes the next chunk when its worker answers, so at most one chunk per worker is
    in flight."""
    starts = iter(range(0, len(texts), chunk))
    lock = threading.Lock()
    results: dict[int, pl.Series] = {}
    failures: list[BaseException] = []

    def feed(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            while not failures:
                with lock:
                    start = next(starts, None)
                if start is None:
                    break
                sink = io.BytesIO()
                batch = pa.record_batch([texts.slice(start, chunk).to_arrow()], names=["t"])
                with pa.ipc.new_stream(sink, batch.schema) as writer:
                    writer.write_batch(batch)
                write_frame(proc.stdin, sink.getvalue())
                answer = read_frame(proc.stdout)
                if answer is None:
                    raise RuntimeError(f"token-count worker exited with code {proc.wait()}")
                counts = array("q")
                counts.frombytes(answer)
                results[start] = pl.Series("tokens", counts, dtype=pl.Int64)
        except BaseException as exc:  # surfaced in the calling thread below
            failures.append(exc)
        finally:
            proc.stdin.close()

    entry = "import sys; from polars_llmbatch.plan.tokens.worker import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", entry, encoding]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(workers)
    ]
    threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in procs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in procs:
            if p.poll() is None and failures:
                p.kill()
            p.wait()
    if failures:
        raise RuntimeError("counting tokens in worker processes failed") from failures[0]
    if not results:
        return pl.Series("tokens", [], dtype=pl.Int64)
    return pl.concat([results[s] for s in sorted(results)])


def _count_list(encoding: str, texts: Iterable[str | None]) -> pl.Series:
    encode = get_encoding(encoding).encode_ordinary
    counts = [len(encode(t)) if t is not None else 0 for t in texts]
    return pl.Series("tokens", counts, dtype=pl.Int64)


@dataclass(frozen=True)
class SampleCount:
    """A token total estimated from a random sample by the ratio estimator (tokens per character).

    ``total`` is the point estimate, ``ci95`` the half-width of its 95% confidence interval.
    """

    total: float
    ci95: float
    sample_size: int
    population: int


def sample_count(
    texts: pl.Series, encoding: str, *, sample_size: int = 10_000, seed: int = 0
) -> SampleCount:
    """Estimate the total tokens of ``texts`` from ``sample_size`` of them, scaled by characters.

    Characters predict tokens far better than row counts do (reference/tokens.md §7.3): the
    estimate is ``Σ chars × (sample tokens / sample chars)``, with the ratio estimator's standard
    error for the interval.
    """
    n = len(texts)
    total_chars = int(texts.str.len_chars().fill_null(0).cast(pl.Int64).sum())
    if n <= sample_size:
        total = int(count_texts(texts, encoding).sum())
        return SampleCount(float(total), 0.0, n, n)
    idx = sample_positions(n, sample_size, seed)
    return scale_sample(texts.gather(idx), encoding, total_chars=total_chars, population=n)


def sample_positions(n: int, sample_size: int, seed: int = 0) -> pl.Series:
    """The sorted positions :func:`sample_count` counts among ``n`` texts (``n > sample_size``):
    a source read in pieces gathers these same texts."""
    return pl.int_range(n, eager=True).sample(sample_size, seed=seed).sort()


def scale_sample(
    sample: pl.Series, encoding: str, *, total_chars: int, population: int
) -> SampleCount:
    """The token total of ``population`` texts of ``total_chars`` characters, from the sampled
    texts ``sample`` (:func:`sample_count` once the sample is drawn)."""
    n, sample_size = population, len(sample)
    y = _count_list(encoding, sample.to_list()).cast(pl.Float64)
    x = sample.str.len_chars().fill_null(0).cast(pl.Float64)
    ratio = y.sum() / x.sum() if x.sum() else 0.0
    total = ratio * total_chars
    # Var(R̂ X) ≈ N² (1 - f) s²_d / n, with d = y - R x (Cochran, ratio estimator).
    d = y - ratio * x
    f = sample_size / n
    se = n * math.sqrt((1 - f) * (d.var(ddof=1) or 0.0) / sample_size)
    return SampleCount(float(total), 1.96 * se, sample_size, n)
