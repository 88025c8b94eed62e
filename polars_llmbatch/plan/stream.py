"""A frame too large to hold → its unique requests on disk, in bounded memory.

Two passes, neither of which holds more than a few batches or buckets:

1. **Render.** The frame is read a slice of ``batch_rows`` at a time (:func:`slices`) and
   each slice goes through :func:`.render.render`, the same pure function another engine
   would run on its partitions; two slices at once, since polars and DuckDB work outside the
   GIL. Each row's key, ``custom_id`` and ``skipped`` go to ``rows/NNNNN.parquet``, in input
   order; each slice's requests (first row of each id) go to one of ``B`` bucket files by the
   id's first hex digits. MD5 ids are uniform, so the buckets come out even, and since each
   holds a contiguous range of ids, the buckets in order are the requests in ``custom_id``
   order.
2. **Deduplicate.** Each bucket is sorted by (``custom_id``, row), the first row of each id
   kept, and written as ``requests/BBBB.arrow``: the rows of
   :attr:`.requests.Prepared.requests` less their bodies, cut into pieces (two buckets at
   once). A body is built again from its texts wherever it is read (the shard files, the
   checkpoint's requests): cheaper than converting, compressing and reading back bodies that
   are mostly the same skeleton (benchmarks/README.md).

What comes out (:class:`Staged`) is what the estimate and the shard files read a piece at a
time: the same requests, ids, bodies and order as :func:`.requests.prepare` on the same rows,
which the tests check.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from polars_llmbatch.plan.render import RenderPlan, render
from polars_llmbatch.plan.requests import check_unique, sizes
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers import Provider

__all__ = ["BATCH_ROWS", "BUCKET_BYTES", "Staged", "plain_scan", "slices", "stage"]

#: Rows rendered at once: large enough that per-slice costs vanish, small enough that a few
#: slices and their copies stay well under the memory goal (benchmarks/README.md).
BATCH_ROWS = 200_000
#: What one bucket should hold (its texts, before deduplication): a bucket is sorted in memory.
BUCKET_BYTES = 96 * 2**20
#: At most this many buckets (open files while rendering); 1024 × 96 MiB ≈ 100 GB of texts.
MAX_BUCKETS = 1024
#: Slices rendered (and buckets deduplicated) at once.
WORKERS = 2
#: Requests per record batch of a staged requests file, the unit read back.
RECORD_ROWS = 8192
#: Staged requests are compressed: LZ4 costs little CPU and halves the disk they take.
_LZ4 = ipc.IpcWriteOptions(compression="lz4")


@dataclass(frozen=True)
class Staged:
    """A frame's requests prepared on disk under ``directory`` (see the module docstring): the
    streamed counterpart of :class:`.requests.Prepared`, read a piece at a time.

    ``counts[i]`` is the number of unique requests in bucket ``i``; their sum is
    :attr:`n_requests`. ``n_rows`` / ``n_skipped`` count the input rows.
    """

    plan: RenderPlan
    directory: Path
    n_rows: int
    n_skipped: int
    counts: tuple[int, ...]
    prompt: str

    @property
    def spec(self) -> RequestSpec:
        return self.plan.spec

    @property
    def provider(self) -> Provider:
        return self.plan.provider

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def text_columns(self) -> tuple[str, ...]:
        return self.plan.text_columns

    @property
    def n_requests(self) -> int:
        return sum(self.counts)

    @cached_property
    def job_id(self) -> str:
        """As :attr:`.requests.Prepared.job_id`: the spec and every id, in order."""
        h = hashlib.sha256(self.spec.digest().encode())
        for piece in self.pieces(["custom_id"]):
            h.update("".join(piece["custom_id"].to_list()).encode())
        return h.hexdigest()[:16]

    def row_table(self) -> pl.LazyFrame:
        """Every input row, in input order: the row key, ``custom_id`` and ``skipped``."""
        return pl.scan_parquet(self.directory / "rows" / "*.parquet")

    def pieces(self, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of the unique requests in ``custom_id`` order, a bucket at a time (of
        ``custom_id``, ``body``, the texts, ``row`` and the sizes of :func:`.requests.sizes`)."""
        for i, n in enumerate(self.counts):
            if n:
                yield self._with_body(self._read(i, self._stored(columns)), columns)

    def span(self, start: int, n: int, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of requests ``start:start + n``, a bucket's part at a time."""
        first = 0
        for i, count in enumerate(self.counts):
            a, b = max(start, first), min(start + n, first + count)
            if a < b:
                part = self._read(i, self._stored(columns), range(a - first, b - first))
                yield self._with_body(part, columns)
            first += count

    def gather(self, positions: pl.Series, columns: Sequence[str]) -> pl.DataFrame:
        """``columns`` of the requests at sorted ``positions`` (in the whole request order)."""
        stored = self._stored(columns)
        parts = []
        first = 0
        for i, n in enumerate(self.counts):
            inside = positions.filter((positions >= first) & (positions < first + n)) - first
            if inside.len():
                lo, hi = int(inside[0]), int(inside[-1]) + 1
                part = self._read(i, stored, range(lo - lo % RECORD_ROWS, hi))
                parts.append(part[inside - (lo - lo % RECORD_ROWS)])
            first += n
        if not parts:
            return self._with_body(self._read(0, stored).head(0), columns)
        return self._with_body(pl.concat(parts), columns)

    def _stored(self, columns: Sequence[str]) -> list[str]:
        """The stored columns ``columns`` are read from: a body is built from the texts."""
        stored = [c for c in columns if c != "body"]
        if "body" in columns:
            stored += [t for t in self.text_columns if t not in stored]
        return stored

    def _with_body(self, frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
        """``columns`` of ``frame`` (stored columns), building the bodies if asked: the exact
        bytes :func:`.requests.prepare` gives, from the texts they hold."""
        if "body" in columns:
            frame = frame.with_columns(
                self.plan.body(frame.select(self.text_columns)).alias("body")
            )
        return frame.select(columns)

    def describe_row(self, position: int) -> str:
        """``row 17`` or ``row 17 (ticket_id='T-9')`` for error messages."""
        if self.plan.id is None:
            return f"row {position}"
        value = self.row_table().select(self.key).slice(position, 1).collect().item()
        return f"row {position} ({self.key}={value!r})"

    def _read(self, i: int, columns: Sequence[str], rows: range | None = None) -> pl.DataFrame:
        """``columns`` of bucket ``i`` (its ``rows`` only: the record batches they lie in)."""
        with pa.memory_map(str(self.directory / "requests" / f"{i:04d}.arrow")) as source:
            reader = ipc.open_file(source)
            names = reader.schema.names
            wanted = [names.index(c) for c in columns]
            reader = ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=wanted))
            if rows is None:
                table = reader.read_all()
                skip = 0
            else:
                first, last = rows.start // RECORD_ROWS, (rows.stop - 1) // RECORD_ROWS
                batches = [reader.get_batch(j) for j in range(first, last + 1)]
                table = pa.Table.from_batches(batches, schema=reader.schema)
                skip = first * RECORD_ROWS
        frame = pl.DataFrame(pl.from_arrow(table.select(list(columns))))
        if rows is None:
            return frame
        return frame.slice(rows.start - skip, len(rows))


def stage(
    frame: pl.DataFrame | pl.LazyFrame,
    plan: RenderPlan,
    directory: str | Path,
    *,
    prompt: str,
    batch_rows: int = BATCH_ROWS,
    bucket_bytes: int = BUCKET_BYTES,
) -> Staged:
    """Render every row of ``frame`` into requests under ``directory`` (made empty first), in
    bounded memory: see the module docstring."""
    out = Path(directory)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("rows", "buckets", "requests"):
        (out / sub).mkdir(parents=True)
    total, parts = slices(frame, plan.columns, batch_rows)
    writers: list[ipc.RecordBatchFileWriter] = []
    rows = skipped = 0

    def one(index: int, offset: int, read: Callable[[], pl.DataFrame]) -> pl.DataFrame:
        part = render(plan, read(), offset=offset, bodies=False)
        part.select(plan.key, "custom_id", "skipped").write_parquet(
            out / "rows" / f"{index:05d}.parquet", statistics=False
        )
        return part

    def take(part: pl.DataFrame) -> None:
        nonlocal writers, rows, skipped
        if not writers:
            n = _buckets(total, part.select(map(plan.output, plan.text_columns)), bucket_bytes)
            writers = _open(out, n, part, plan)
        rows, skipped = rows + part.height, skipped + _spill(part, plan, writers)

    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            # a window of slices in flight: the oldest is taken (in order) as the next starts
            window: deque[Future[pl.DataFrame]] = deque()
            for index, (offset, read) in enumerate(parts):
                window.append(pool.submit(one, index, offset, read))
                if len(window) > WORKERS:
                    take(window.popleft().result())
            while window:
                take(window.popleft().result())
    finally:
        for w in writers:
            w.close()
    if rows == 0:  # an empty frame still has its (empty) row table
        key_type = pl.UInt64 if plan.id is None else frame.collect_schema()[plan.id]
        pl.DataFrame(
            schema={plan.key: key_type, "custom_id": pl.String, "skipped": pl.Boolean}
        ).write_parquet(out / "rows" / "00000.parquet")
    if plan.id is not None:
        check_unique(pl.scan_parquet(out / "rows" / "*.parquet"), plan.id)
    with ThreadPoolExecutor(WORKERS) as pool:
        counts = tuple(pool.map(lambda i: _dedup(plan, out, i), range(len(writers))))
    shutil.rmtree(out / "buckets")
    (out / "staged.json").write_text(
        json.dumps({"rows": rows, "skipped": skipped, "counts": list(counts)})
    )
    return Staged(plan, out, rows, skipped, counts, prompt)


def slices(
    frame: pl.DataFrame | pl.LazyFrame, columns: list[str], batch_rows: int
) -> tuple[int, Iterator[tuple[int, Callable[[], pl.DataFrame]]]]:
    """The row count and ``(offset, read)`` of each slice of ``batch_rows`` rows.

    A DataFrame is sliced in place (no copy). A LazyFrame that is a plain scan is read a
    slice at a time, which polars pushes down into the files: memory stays flat however many
    rows there are, where ``collect_batches`` reads ahead and grows (benchmarks/README.md).
    Any other LazyFrame (a filter, a join: slicing would evaluate it again per slice) is read
    through ``collect_batches``, each batch at once.
    """
    if isinstance(frame, pl.DataFrame):
        df = frame.select(columns)
        return df.height, (
            (off, lambda off=off: df.slice(off, batch_rows))  # type: ignore[misc]
            for off in range(0, df.height, batch_rows)
        )
    lazy = frame.select(columns)
    total = lazy.select(pl.len()).collect().item()
    if plain_scan(lazy):
        return total, (
            (off, lambda off=off: lazy.slice(off, batch_rows).collect())  # type: ignore[misc]
            for off in range(0, total, batch_rows)
        )

    def batches() -> Iterator[tuple[int, Callable[[], pl.DataFrame]]]:
        offset = 0
        for batch in lazy.collect_batches(chunk_size=batch_rows, maintain_order=True):
            yield offset, lambda batch=batch: batch  # type: ignore[misc]
            offset += batch.height

    return total, batches()


#: Plan nodes that make a slice cost more than its rows (the whole plan is evaluated again).
_NOT_PLAIN = ("SELECTION:", "FILTER", "JOIN", "SORT", "GROUP", "UNIQUE", "SLICE", "UNION",
              "CONCAT", "PYTHON", "DF [", "EXPLODE", "PIVOT", "UNPIVOT", "CACHE", "WITH_COLUMNS")  # fmt: skip


def plain_scan(lazy: pl.LazyFrame) -> bool:
    """Whether ``lazy`` is one file scan, projected: a slice of it reads only its rows."""
    text = lazy.explain()
    return (
        text.startswith(("Parquet SCAN", "Ipc SCAN"))
        and text.count("SCAN") == 1
        and not any(word in text for word in _NOT_PLAIN)
    )


def _open(
    out: Path, n_buckets: int, part: pl.DataFrame, plan: RenderPlan
) -> list[ipc.RecordBatchFileWriter]:
    # uncompressed: the buckets are read once, right after, from the page cache
    schema = _arrow(_requests_of(part.head(0), plan)).schema
    return [ipc.new_file(str(out / "buckets" / f"{i:04d}.arrow"), schema) for i in range(n_buckets)]


def _spill(part: pl.DataFrame, plan: RenderPlan, writers: list[ipc.RecordBatchFileWriter]) -> int:
    """Write a slice's requests to their buckets; its skipped rows."""
    todo = (
        _requests_of(part.filter(~pl.col("skipped")), plan)
        .unique("custom_id", keep="first", maintain_order=True)
        .with_columns(_bucket_of(pl.col("custom_id"), len(writers)).alias("__bucket__"))
    )
    for (b,), group in todo.partition_by("__bucket__", as_dict=True).items():
        writers[int(b)].write_table(_arrow(group.drop("__bucket__")))
    return int(part["skipped"].sum())


def _requests_of(part: pl.DataFrame, plan: RenderPlan) -> pl.DataFrame:
    """A rendered slice's request columns, under their own names (the key is left out)."""
    own = {plan.output(n): n for n in ("row", *plan.text_columns) if plan.output(n) != n}
    return part.drop(plan.key, "skipped").rename(own)


def _dedup(plan: RenderPlan, out: Path, i: int) -> int:
    """Bucket ``i``: the first row of each id, sorted by id, with its body's length; its
    count."""
    path = out / "buckets" / f"{i:04d}.arrow"
    with pa.memory_map(str(path)) as source:
        raw = pl.DataFrame(pl.from_arrow(ipc.open_file(source).read_all()))
    unique = raw.sort("custom_id", "row").unique("custom_id", keep="first", maintain_order=True)
    # The sort moves only polars' string views; the texts are copied into id order once, here,
    # and the bodies then built from them in memory order. Built straight from the sorted
    # views, every text was read at random twice (bodies, then Arrow): twice as slow in all.
    texts = plan.text_columns
    base = _arrow(unique.select("custom_id", *texts, pl.col("row").cast(pl.UInt32)).rechunk())
    del raw, unique
    # Bodies are not kept: a reader builds them from the texts (:meth:`Staged._read`), and
    # only their lengths are needed here. Storing them cost more (converted, compressed,
    # decompressed) than building them again where they are read.
    in_order = pl.DataFrame(pl.from_arrow(base))
    own = in_order.select(
        (pl.col("custom_id").str.len_bytes().cast(pl.Int64) + plan.body_length(in_order)).alias(
            "payload"
        ),
        *sizes(texts)[1:],
    )
    del in_order
    # Record batches of RECORD_ROWS: a shard or a sample reads the batches it needs, not the
    # bucket (compressed columns are read whole)
    table = pa.Table.from_arrays(
        [*base.columns, *_arrow(own).columns], names=[*base.column_names, *own.columns]
    )
    with ipc.new_file(str(out / "requests" / f"{i:04d}.arrow"), table.schema, options=_LZ4) as w:
        w.write_table(table, max_chunksize=RECORD_ROWS)
    n = table.num_rows
    del base, own, table
    path.unlink()
    return n


def _buckets(total: int, first: pl.DataFrame, bucket_bytes: int) -> int:
    """Buckets for ``total`` rows, judged by the first slice's texts (``first``) per row: a
    power of two, so that each is a range of ids' leading hex digits."""
    per_row = first.select(
        pl.sum_horizontal(pl.col(c).str.len_bytes().fill_null(0).sum() for c in first.columns)
    ).item() / max(first.height, 1)
    want = math.ceil(total * (per_row + 64) / bucket_bytes)
    return min(MAX_BUCKETS, 1 << max(0, math.ceil(math.log2(max(want, 1)))))


def _bucket_of(custom_id: pl.Expr, n_buckets: int) -> pl.Expr:
    """The bucket of an id: its first three hex digits (4096 ranges), scaled to ``n_buckets``."""
    lead = custom_id.str.slice(0, 3).str.to_integer(base=16).cast(pl.UInt32)
    return (lead * n_buckets // 4096).cast(pl.UInt32)


def _arrow(frame: pl.DataFrame) -> pa.Table:
    # one Arrow string type for every slice, whatever polars picked for it
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest())
