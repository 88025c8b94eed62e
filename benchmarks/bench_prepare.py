"""Benchmark: rows → OpenAI batch files and token estimates, against plain-Python baselines.

What is measured, on ``--rows`` synthetic support tickets from
:func:`polars_llmbatch.sample.tickets` (~17% duplicate bodies, ~1% null bodies), prompt
``"Classify this ticket: {body}"``, OpenAI ``gpt-4o-mini`` with a 4-category enum output and
``max_output_tokens=20``:

1. ``prepare``: ``prepare()`` + ``plan()`` (render, ids, dedup, bodies, shard plan, in memory),
   then ``write_shards()`` into a fresh temp dir (the files, with fsync), then a raw write of
   the same number of bytes from memory (the disk's floor); medians of ``--repeat`` runs.
2. ``estimate (sample)``: ``estimate(prepared)``, which samples when there are more than
   ``EXACT_THRESHOLD`` unique requests; median of ``--repeat`` runs, and its relative error
   against the exact count of step 3.
3. ``estimate (exact)``: ``estimate(prepared, exact=True)`` (spawned worker processes).
4. ``baseline A``: the same unique prompt texts counted with a 2-process fork pool, each worker
   calling tiktoken's ``encode_ordinary`` in a plain loop over 2,000-text chunks. Its total must
   equal the exact estimate's variable-text tokens. Steps 3 and 4 alternate ``--repeat`` times
   (medians), so that drifts in machine speed hit both alike.
5. ``baseline B``: what a per-row Python tool does: for every non-null row (no dedup), a
   ``json.dumps`` of the whole batch line (sha256 custom_id) written to a file, plus
   ``len(encode_ordinary(prompt))``; 1 run.
6. Peak RSS (``ru_maxrss``) of this process after each step; for the exact-mode workers, their
   ``VmHWM`` polled from ``/proc`` (``RUSAGE_CHILDREN`` inherits the parent's peak).

Generating the sample frame happens in a child process (timed separately, part of no other
figure), so that this process's peak RSS starts from the frame itself.

Run it by hand (it takes a few minutes at 1M rows)::

    python benchmarks/bench_prepare.py --rows 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from polars_llmbatch.plan.estimate import EXACT_THRESHOLD, SAMPLE_SIZE, Estimate, estimate
from polars_llmbatch.plan.requests import Prepared, prepare
from polars_llmbatch.plan.shards import Shard, plan, write_shards
from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.sample import CATEGORIES, tickets

PROMPT = "Classify this ticket: {body}"
PROVIDER = "openai"
MODEL = "gpt-4o-mini"
OPTIONS: dict[str, Any] = {"max_output_tokens": 20}
ENCODING = "o200k_base"
BASELINE_PROCESSES = 2
BASELINE_CHUNK = 2_000

# Targets (at 1M rows).
TARGET_PREPARE_S = 3.0
TARGET_SAMPLE_S = 1.0
TARGET_SAMPLE_ERROR = 0.01
TARGET_EXACT_RATIO = 1.2
TARGET_RSS_MB = 2048.0
#: Shard files go to the current folder's disk (the tmpfs-free choice), not /tmp.
BENCH_DIR = os.environ.get("BENCH_DIR", ".")

T = TypeVar("T")


@dataclass
class Row:
    """One line of the results table."""

    step: str
    seconds: float
    runs: int
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall-clock seconds of one call of ``fn``, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


class ChildPeaks:
    """Poll ``/proc`` for this process's children and keep each one's peak RSS (``VmHWM``).

    ``RUSAGE_CHILDREN`` is no use for spawned workers: a child started by fork/vfork + exec
    inherits the parent's high-water mark, so it reports the parent's size, not its own.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peaks: dict[int, float] = {}  # pid -> peak MB, over every session
        self.session_sums: list[float] = []  # per ``with`` block: sum of its children's peaks
        self._session: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ChildPeaks:
        self._stop.clear()
        self._session = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.session_sums.append(sum(self._session.values()))
        for pid, mb in self._session.items():
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), mb)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    self._sample(int(entry), me)
            self._stop.wait(self.interval)

    def _sample(self, pid: int, parent: int) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                return
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
                        self._session[pid] = max(self._session.get(pid, 0.0), mb)

    @property
    def largest(self) -> float:
        return max(self.peaks.values(), default=0.0)

    @property
    def total(self) -> float:
        """The largest sum of the children's peaks within one session (an upper bound)."""
        return max(self.session_sums, default=0.0)


def run_prepare(frame: pl.DataFrame) -> tuple[Prepared, list[Shard]]:
    """Render, ids, dedup, bodies, shard plan: everything up to the files, in memory."""
    prepared = prepare(
        frame,
        PROMPT,
        provider=PROVIDER,
        model=MODEL,
        output=CATEGORIES,
        options=OPTIONS,
    )
    return prepared, plan(prepared)


def raw_write(n_bytes: int, path: Path) -> None:
    """The disk's floor: write ``n_bytes`` already in memory to one file, then fsync."""
    data = b"x" * n_bytes
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def bench_prepare(
    frame: pl.DataFrame, repeat: int
) -> tuple[list[float], list[float], list[float], Prepared, int, int]:
    """Time :func:`run_prepare`, then ``write_shards`` into a fresh temp dir, then a raw write of
    the same number of bytes, ``repeat`` times each (cleanup untimed).

    Returns (prepare times, write times, raw-write times, prepared, shards, bytes written).
    """
    prep_times: list[float] = []
    write_times: list[float] = []
    raw_times: list[float] = []
    prepared: Prepared | None = None
    n_shards = 0
    total_bytes = 0
    for _ in range(repeat):
        prepared = None  # drop the previous run's result so runs do not stack in memory
        seconds, (prepared, shards) = timed(lambda: run_prepare(frame))
        prep_times.append(seconds)
        n_shards = len(shards)
        with tempfile.TemporaryDirectory(prefix="bench_prepare_", dir=BENCH_DIR) as tmp:
            seconds, _paths = timed(lambda d=Path(tmp), p=prepared, s=shards: write_shards(p, s, d))
            write_times.append(seconds)
            total_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        with tempfile.TemporaryDirectory(prefix="bench_raw_", dir=BENCH_DIR) as tmp:
            seconds, _ = timed(lambda d=Path(tmp), b=total_bytes: raw_write(b, d / "raw"))
            raw_times.append(seconds)
    assert prepared is not None
    return prep_times, write_times, raw_times, prepared, n_shards, total_bytes


def _make_frame(n: int, path: str) -> None:
    tickets(n).write_parquet(path)


def load_frame(n: int, path: Path) -> tuple[float, pl.DataFrame]:
    """Generate the sample into ``path`` in a child process and read it here, so that this
    process's peak RSS starts from the frame itself, not from the generator's temporaries."""
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    proc = ctx.Process(target=_make_frame, args=(n, str(path)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError("generating the sample frame failed")
    frame = pl.read_parquet(path)
    return time.perf_counter() - t0, frame


def hwm_mb() -> float:
    """This process's own peak RSS (``VmHWM``). ``ru_maxrss`` survives exec on Linux, so a
    spawned child would report its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _one_pass(path: str, out: Any) -> None:
    frame = pl.read_parquet(path)
    peaks = {"frame read": hwm_mb()}
    prepared, shards = run_prepare(frame)
    peaks["prepare + plan"] = hwm_mb()
    with tempfile.TemporaryDirectory(prefix="bench_mem_", dir=BENCH_DIR) as tmp:
        write_shards(prepared, shards, Path(tmp))
    peaks["write shard files"] = hwm_mb()
    estimate(prepared)
    peaks["sample estimate"] = hwm_mb()
    estimate(prepared, exact=True)
    peaks["exact estimate (workers apart)"] = hwm_mb()
    out.put(peaks)


def one_pass_peaks(path: Path) -> dict[str, float]:
    """Peak RSS of a fresh process that does each step once: what a user's job would see
    (repeated runs in one process inflate the peak with allocator fragmentation)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_one_pass, args=(str(path), queue))
    proc.start()
    peaks = queue.get()
    proc.join()
    return peaks


def _count_chunk(texts: list[str]) -> int:
    encode = get_encoding(ENCODING).encode_ordinary
    total = 0
    for text in texts:
        total += len(encode(text))
    return total


def baseline_a(texts: pl.Series) -> int:
    """Total tokens of ``texts`` with a 2-process fork pool over 2,000-text chunks."""
    values: list[str] = texts.to_list()
    chunks = [values[i : i + BASELINE_CHUNK] for i in range(0, len(values), BASELINE_CHUNK)]
    with multiprocessing.get_context("fork").Pool(BASELINE_PROCESSES) as pool:
        return sum(pool.imap_unordered(_count_chunk, chunks))


def baseline_b(frame: pl.DataFrame, path: Path) -> tuple[int, int]:
    """Per-row Python: one ``json.dumps`` batch line and one token count per non-null row.

    Returns (lines written, total prompt tokens).
    """
    encode = get_encoding(ENCODING).encode_ordinary
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "output",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(CATEGORIES)}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }
    lines = 0
    tokens = 0
    with open(path, "w", encoding="utf-8") as fh:
        for body in frame["body"]:
            if body is None:
                continue
            prompt = PROMPT.format(body=body)
            line = {
                "custom_id": hashlib.sha256(body.encode()).hexdigest(),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_completion_tokens": OPTIONS["max_output_tokens"],
                    "response_format": response_format,
                },
            }
            fh.write(json.dumps(line) + "\n")
            tokens += len(encode(prompt))
            lines += 1
    return lines, tokens


def variable_tokens(prepared: Prepared, est: Estimate) -> int:
    """The estimate's input tokens minus the constant per-request part: the user texts' tokens."""
    rule = prepared.provider.token_rule(prepared.spec)
    per_request = rule.per_request + rule.per_message * len(prepared.text_columns)
    return round(est.input_tokens - per_request * est.unique_requests)


def status(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISSED")


def print_table(rows: list[Row], n_rows: int) -> None:
    header = f"{'step':<22} {'runs':>4} {'median s':>9} {'rows/s':>11} {'ratio':>16}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = f"{n_rows / r.seconds:,.0f}" if r.seconds else "-"
        target = f"{r.target} {status(r.ok)}".strip()
        print(f"{r.step:<22} {r.runs:>4} {r.seconds:>9.3f} {rate:>11} {r.ratio:>16}  {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="input rows (default 1M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step (median)")
    args = parser.parse_args(argv)
    n, repeat = args.rows, max(1, args.repeat)
    cores = multiprocessing.cpu_count()
    print(f"polars {pl.__version__}, {cores} cores, {n:,} rows, {repeat} run(s) per step")

    frame_dir = tempfile.TemporaryDirectory(prefix="bench_frame_")
    frame_path = Path(frame_dir.name) / "tickets.parquet"
    gen_s, frame = load_frame(n, frame_path)
    nulls = frame["body"].null_count()
    print(f"sample frame: {gen_s:.2f} s (not timed below), {nulls:,} null bodies")
    get_encoding(ENCODING)  # load the rank file once, outside every timing
    rss = {"after sample frame": rss_mb()}

    prep_times, write_times, raw_times, prepared, n_shards, n_bytes = bench_prepare(frame, repeat)
    prep_s = statistics.median(prep_times)
    write_s = statistics.median(write_times)
    raw_s = statistics.median(raw_times)
    total_times = [a + b for a, b in zip(prep_times, write_times, strict=True)]
    total_s = statistics.median(total_times)
    rss["after prepare + write"] = rss_mb()
    uniq = prepared.requests.height
    print(
        f"prepare: {uniq:,} unique requests, {n_shards} shard(s), {n_bytes / 1e6:,.0f} MB written;"
        f" prepare runs {', '.join(f'{t:.2f}' for t in prep_times)} s,"
        f" write runs {', '.join(f'{t:.2f}' for t in write_times)} s,"
        f" raw write of the same bytes {', '.join(f'{t:.2f}' for t in raw_times)} s"
    )

    sample_times: list[float] = []
    for _ in range(repeat):
        seconds, (sampled, _shards) = timed(lambda: estimate(prepared))
        sample_times.append(seconds)
    sample_s = statistics.median(sample_times)
    rss["after sample estimate"] = rss_mb()

    # Exact mode and baseline A alternate, so that drifts in machine speed hit both alike.
    exact_times: list[float] = []
    a_times: list[float] = []
    children = ChildPeaks()
    for _ in range(repeat):
        with children:
            seconds, (exact, _shards) = timed(lambda: estimate(prepared, exact=True))
        exact_times.append(seconds)
        seconds, a_total = timed(lambda: baseline_a(prepared.requests["user"]))
        a_times.append(seconds)
    exact_s, a_s = statistics.median(exact_times), statistics.median(a_times)
    print(
        f"exact runs {', '.join(f'{t:.2f}' for t in exact_times)} s; "
        f"baseline A runs {', '.join(f'{t:.2f}' for t in a_times)} s"
    )
    rss["after exact estimate"] = rss_mb()
    exact_var = variable_tokens(prepared, exact)
    if a_total != exact_var:
        raise AssertionError(f"baseline A counted {a_total:,} tokens, exact mode {exact_var:,}")

    with tempfile.TemporaryDirectory(prefix="bench_baseline_b_") as tmp:
        b_s, (b_lines, b_tokens) = timed(lambda: baseline_b(frame, Path(tmp) / "batch.jsonl"))

    error = (sampled.input_tokens - exact.input_tokens) / exact.input_tokens
    var_error = (variable_tokens(prepared, sampled) - exact_var) / exact_var
    exact_ratio = exact_s / a_s
    ours = total_s + sample_s
    print(
        f"estimate: sample {sampled.input_tokens:,.0f} ± {sampled.input_tokens_error:,.0f} "
        f"(sample of {SAMPLE_SIZE:,}; samples above {EXACT_THRESHOLD:,} unique), "
        f"exact {exact.input_tokens:,.0f}, relative error {error:+.3%} "
        f"({var_error:+.3%} on the variable-text part alone)"
    )
    print(
        f"variable-text tokens: exact mode {exact_var:,} = baseline A {a_total:,}; "
        f"baseline B {b_tokens:,} over {b_lines:,} rows (no dedup)"
    )
    print()
    rows = [
        Row(
            "prepare+plan (memory)",
            prep_s,
            repeat,
            f"B/this {b_s / prep_s:.1f}x",
            f"<= {TARGET_PREPARE_S:g} s",
            prep_s <= TARGET_PREPARE_S,
        ),
        Row("write shard files", write_s, repeat, f"raw/this {raw_s / write_s:.2f}x"),
        Row("raw write, same bytes", raw_s, repeat, "disk floor"),
        Row(
            "prepare+plan+write",
            total_s,
            repeat,
            f"B/this {b_s / total_s:.1f}x",
            f"<= {TARGET_PREPARE_S:g} s",
            total_s <= TARGET_PREPARE_S,
        ),
        Row(
            "estimate (sample)",
            sample_s,
            repeat,
            f"err {error:+.3%}",
            f"<= {TARGET_SAMPLE_S:g} s, |err| <= {TARGET_SAMPLE_ERROR:.0%}",
            sample_s <= TARGET_SAMPLE_S and abs(error) <= TARGET_SAMPLE_ERROR,
        ),
        Row(
            "estimate (exact)",
            exact_s,
            repeat,
            f"exact/A {exact_ratio:.2f}x",
            f"<= {TARGET_EXACT_RATIO:g}x baseline A",
            exact_ratio <= TARGET_EXACT_RATIO,
        ),
        Row("baseline A (2 procs)", a_s, repeat, "1.00x"),
        Row(
            "baseline B (per row)",
            b_s,
            1,
            f"B/ours {b_s / ours:.1f}x",
            "(ours = prep+write+sample)",
        ),
    ]
    print_table(rows, n)
    print()
    peak = max(rss.values())
    for name, mb in rss.items():
        print(f"peak RSS {name:<26} {mb:>8,.0f} MB")
    print(
        f"peak RSS exact-mode children: largest {children.largest:,.0f} MB, "
        f"sum in one run {children.total:,.0f} MB ({len(children.peaks)} processes in all) "
        f"(RUSAGE_CHILDREN says {rss_mb(resource.RUSAGE_CHILDREN):,.0f} MB: inherited, not real)"
    )
    print(f"(this process, after {repeat} runs of each step: {peak:,.0f} MB)")
    fresh = one_pass_peaks(frame_path)
    frame_dir.cleanup()
    print("peak RSS of a fresh process doing each step once:")
    for name, mb in fresh.items():
        print(f"  after {name:<32} {mb:>8,.0f} MB")
    fresh_peak = max(fresh.values())
    print(
        f"peak RSS target <= {TARGET_RSS_MB:,.0f} MB: {fresh_peak:,.0f} MB {status(fresh_peak <= TARGET_RSS_MB)}"
    )


if __name__ == "__main__":
    main()
