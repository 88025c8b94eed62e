"""A result too big for memory, joined on disk: the input rows and the answers are each cut
into buckets by request id, each bucket joined in memory, and the joined rows put back in
input order a chunk at a time.

Polars' streaming join holds its build side in a hash table of about six times the answers'
bytes (10M label answers: ~3.7 GB, benchmarks/README.md), so a huge job's result cannot be a
plain lazy join. Here memory holds one bucket (:data:`BUCKET_ROWS` rows) or one chunk
(:data:`CHUNK_ROWS` rows) at a time, whatever the job's size; disk holds about two copies of
the input's columns while it runs, and one (the returned result) after.

The input is evaluated exactly once, with each row numbered as it comes: the answers are
joined on each row's request id, and the number only restores that one evaluation's order, so
a plan that gives its rows in another order each time still gets each row its own answer.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch._fs import lock_fd
from polars_llmbatch.collect.decoded import ATTEMPT, SHARD, Decoded, best_pick
from polars_llmbatch.collect.reconcile import (
    CID,
    IN_JOB,
    INTERNAL_PREFIX,
    INVALID,
    SKIPPED,
    STATUS,
    finish_rows,
    row_status,
)
from polars_llmbatch.collect.results import STATUSES
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.plan.stream import slices

__all__ = [
    "BUCKET_ROWS",
    "CHUNK_ROWS",
    "KEEP_RESULTS",
    "result_folder",
    "spilled_counts",
    "spilled_result",
]

#: Input rows per bucket (about; ids hash evenly), and rows per chunk of the ordered output.
BUCKET_ROWS = 200_000
CHUNK_ROWS = 250_000
#: Rows of the input read at once (a plain scan is read by row ranges: flat memory).
SLICE_ROWS = 100_000
WORKERS = 2
ROW = INTERNAL_PREFIX + "row"
_BUCKET = INTERNAL_PREFIX + "bucket"
_CHUNK = INTERNAL_PREFIX + "chunk"
#: Spilled results kept in a checkpoint's ``derived/`` (the newest; older ones are removed
#: when a new one is made, unless another process is still making them; so a LazyFrame
#: from long ago may find its files gone).
KEEP_RESULTS = 3


@contextlib.contextmanager
def result_folder(derived: Path, prefix: str = "result") -> Iterator[Path]:
    """A new folder for a spilled result under ``derived``, held while the block runs (the
    OS's lock on its ``.lock``: a killed process lets go) and removed if the block fails.
    Earlier folders of the same ``prefix`` beyond the newest :data:`KEEP_RESULTS` are removed
    first, except those another process holds: its result is still being made."""
    derived.mkdir(parents=True, exist_ok=True)
    folder = derived / f"{prefix}-{time.time_ns():020d}-{secrets.token_hex(4)}"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        lock_fd(fd)  # a new file: nobody else can hold it yet
        earlier = sorted(p for p in derived.glob(f"{prefix}-*") if p != folder)  # by time
        for old in earlier[: max(0, len(earlier) - (KEEP_RESULTS - 1))]:
            _remove_unless_held(old)
        yield folder
    except BaseException:  # a half-made result is no result: nothing is left to read it by
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _remove_unless_held(folder: Path) -> None:
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # gone already (another process pruned it), or not ours to touch
        return
    try:
        lock_fd(fd)
    except OSError:
        os.close(fd)
        return  # being made right now
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def spilled_result(
    frame: pl.LazyFrame,
    with_ids: Callable[[pl.LazyFrame], pl.LazyFrame],
    requests: pl.LazyFrame,
    decoded: Decoded,
    spec: RequestSpec,
    folder: Path,
    *,
    n_rows: int,
    keep: list[str],
    usage: bool = False,
    name: str | None = None,
) -> pl.LazyFrame:
    """The result rows of ``frame`` (its ``keep`` columns) as a scan of Parquet files in
    ``folder/parts``, in the order of the one evaluation of ``frame`` made here.
    ``with_ids`` adds each row's :data:`CID` and :data:`SKIPPED` to a slice of it;
    ``requests``: the job's requests (``custom_id``); ``n_rows``: about how many rows
    ``frame`` gives (it sizes the buckets); ``folder``: from :func:`result_folder`."""
    k = max(1, math.ceil(n_rows / BUCKET_ROWS))
    schema = with_ids(frame).collect_schema()
    inputs = _partition(_numbered(frame, with_ids), k, folder / "in")
    known = _partition(_in_job(requests), k, folder / "ids")
    answers = _partition(decoded.frames(), k, folder / "answers")
    result_schema = _finish(
        pl.DataFrame(schema={ROW: pl.UInt64, **schema}), decoded, spec, usage, name, keep
    ).schema
    chunks = folder / "chunks"
    for b in range(k):
        part = _read(inputs.get(b), {ROW: pl.UInt64(), **schema})
        if part.height:
            done = _finish(
                part.join(_known(known.get(b), answers.get(b), decoded), on=CID, how="left"),
                decoded,
                spec,
                usage,
                name,
                keep,
            )
            for (c,), piece in (
                done.with_columns((pl.col(ROW) // CHUNK_ROWS).alias(_CHUNK))
                .partition_by(_CHUNK, as_dict=True, include_key=False)
                .items()
            ):
                (chunks / f"{c:06d}").mkdir(parents=True, exist_ok=True)
                piece.write_parquet(chunks / f"{c:06d}" / f"{b:05d}.parquet", compression="lz4")
        for path in (inputs.get(b), known.get(b), answers.get(b)):
            if path is not None:
                path.unlink()
    parts = folder / "parts"
    parts.mkdir()
    files = []
    for c in sorted(chunks.iterdir()) if chunks.exists() else []:
        ordered = pl.read_parquet(sorted(c.iterdir())).sort(ROW).drop(ROW)
        files.append(parts / f"{c.name}.parquet")
        ordered.write_parquet(files[-1], compression="lz4")
        shutil.rmtree(c)
    if not files:  # no rows at all: one empty file keeps the schema
        files.append(parts / "000000.parquet")
        pl.DataFrame(schema=result_schema).drop(ROW).write_parquet(files[-1])
    for sub in ("in", "ids", "answers", "chunks"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    return pl.scan_parquet(files)


def spilled_counts(
    frame: pl.LazyFrame,
    with_ids: Callable[[pl.LazyFrame], pl.LazyFrame],
    requests: pl.LazyFrame,
    decoded: Decoded,
    folder: Path,
    *,
    n_rows: int,
) -> dict[str, int]:
    """Rows per ``llm_status`` (every status, zeros included) of ``frame`` (``with_ids`` as
    in :func:`spilled_result`), as :func:`.reconcile.status_counts` counts them, a bucket at
    a time in ``folder`` (removed after)."""
    k = max(1, math.ceil(n_rows / BUCKET_ROWS))
    narrow = [CID, STATUS, INVALID, ATTEMPT, SHARD]
    try:
        inputs = _partition(
            _numbered(frame, lambda lf: with_ids(lf).select(CID, SKIPPED)), k, folder / "in"
        )
        known = _partition(_in_job(requests), k, folder / "ids")
        answers = _partition(decoded.frames(narrow), k, folder / "answers")
        counts = dict.fromkeys(STATUSES, 0)
        for b in inputs:
            part = _read(inputs[b], {ROW: pl.UInt64(), CID: pl.String(), SKIPPED: pl.Boolean()})
            ids = _read(known.get(b), {CID: pl.String(), IN_JOB: pl.Boolean()})
            best = best_pick(_read(answers.get(b), {c: decoded.schema[c] for c in narrow}))
            tally = (
                part.join(ids.join(best, on=CID, how="left"), on=CID, how="left")
                .group_by(row_status().alias("s"))
                .len()
            )
            for status, n in tally.iter_rows():
                counts[status] = counts.get(status, 0) + n
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return counts


def _numbered(
    frame: pl.LazyFrame, with_ids: Callable[[pl.LazyFrame], pl.LazyFrame]
) -> Iterator[pl.DataFrame]:
    """``frame`` a slice at a time (:func:`.stream.slices`: a plain scan by row ranges, any
    other plan evaluated once through its batches), each row with its ids and its number;
    two slices are read and hashed at once (polars and DuckDB work outside the GIL)."""
    _, parts = slices(frame, frame.collect_schema().names(), SLICE_ROWS)

    def one(offset: int, read: Callable[[], pl.DataFrame]) -> pl.DataFrame:
        numbered = with_ids(read().lazy()).with_row_index(ROW, offset=offset)
        return numbered.collect().with_columns(pl.col(ROW).cast(pl.UInt64))

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        window: deque[Future[pl.DataFrame]] = deque()
        for offset, read in parts:
            window.append(pool.submit(one, offset, read))
            if len(window) > WORKERS:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _in_job(requests: pl.LazyFrame) -> Iterator[pl.DataFrame]:
    """The job's request ids (:data:`IN_JOB`), a slice at a time."""
    _, parts = slices(requests.select("custom_id"), ["custom_id"], SLICE_ROWS)
    for _, read in parts:
        yield read().select(pl.col("custom_id").alias(CID), pl.lit(True).alias(IN_JOB))


def _known(ids: Path | None, answers: Path | None, decoded: Decoded) -> pl.DataFrame:
    """A bucket's requests (:data:`IN_JOB`) with their best answer, if any yet."""
    requests = _read(ids, {CID: pl.String(), IN_JOB: pl.Boolean()})
    best = best_pick(_read(answers, decoded.schema))
    return requests.join(best, on=CID, how="left")


def _finish(
    joined: pl.DataFrame,
    decoded: Decoded,
    spec: RequestSpec,
    usage: bool,
    name: str | None,
    keep: list[str],
) -> pl.DataFrame:
    if set(decoded.schema) - set(joined.columns):  # the empty frame of the schema
        joined = joined.join(
            pl.DataFrame(schema={IN_JOB: pl.Boolean(), **decoded.schema}), on=CID, how="left"
        )
    # A row's number orders the chunk: the first row of a request (the one its tokens and
    # cost show on) is then the first in input order.
    ordered = joined.sort(ROW)
    return finish_rows(ordered, spec, usage=usage, name=name, keep=[ROW, *keep])


def _partition(parts: Iterable[pl.DataFrame], k: int, folder: Path) -> dict[int, Path]:
    """``parts`` streamed into ``k`` Parquet files by a hash of :data:`CID` (one writer each,
    a part appended at a time: memory holds one part). Returns the files that got rows."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    bucket = (pl.col(CID).hash(seed=7) % k).cast(pl.UInt32).alias(_BUCKET)
    writers: dict[int, Any] = {}
    files: dict[int, Path] = {}
    try:
        for frame in parts:
            split = frame.with_columns(bucket).partition_by(
                _BUCKET, as_dict=True, include_key=False
            )
            for (b,), part in split.items():
                table = part.to_arrow()
                if b not in writers:
                    files[b] = folder / f"{b:05d}.parquet"
                    writers[b] = pq.ParquetWriter(files[b], table.schema, compression="lz4")
                writers[b].write_table(table.cast(writers[b].schema))
    finally:
        for w in writers.values():
            w.close()
    return files


def _read(path: Path | None, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """A bucket file in the exact dtypes it was written from (Arrow's dictionary columns come
    back as categoricals; an Enum's categories, say, are the schema's)."""
    if path is None:
        return pl.DataFrame(schema=schema)
    return pl.read_parquet(path).cast(schema)  # type: ignore[arg-type]
