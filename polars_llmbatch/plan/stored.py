"""Requests read back from a Parquet file a row group at a time: the request source a job's
first round is planned from (the checkpoint's ``requests.parquet``), so planning holds a
shard's bodies at a time, never every body.

The same source protocol as :class:`.requests.Prepared` and :class:`.stream.Staged`
(``n_requests``, ``pieces``, ``span``, ``gather``), over the file's requests in file order
(:class:`.subset.Subset` leaves out those the result cache answered).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from polars_llmbatch.plan.requests import sizes
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers import Provider

__all__ = ["ROW_GROUP", "StoredRequests"]

#: Rows per row group of a job's requests.parquet: the unit read back while planning (about
#: 7 MB of bodies at 800 bytes a request), small enough that a shard's span reads little more
#: than itself.
ROW_GROUP = 8192


@dataclass
class StoredRequests:
    """The requests of the Parquet file at ``path`` (``custom_id``, ``body``, ``row``, ...).

    Example:
        >>> import polars as pl, tempfile, os
        >>> from polars_llmbatch.plan.requests import build_spec
        >>> spec, prov = build_spec(provider="openai", model="gpt-4o-mini")
        >>> path = os.path.join(tempfile.mkdtemp(), "requests.parquet")
        >>> pl.DataFrame({"custom_id": ["a", "b", "c"], "body": ["{}", "{1}", "{22}"],
        ...               "row": [0, 1, 2]}).write_parquet(path, row_group_size=2)
        >>> src = StoredRequests(path, spec, prov)
        >>> src.n_requests, pl.concat(src.span(1, 2, ["custom_id", "payload"])).rows()
        (3, [('b', 4), ('c', 5)])
    """

    path: str | Path
    spec: RequestSpec
    provider: Provider
    key: str = "row_nr"
    # the first request's position in each row group
    _starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        meta = self._meta = pq.ParquetFile(self.path).metadata
        self._starts, total = [], 0
        for i in range(meta.num_row_groups):
            self._starts.append(total)
            total += meta.row_group(i).num_rows
        self._total = total

    @property
    def n_requests(self) -> int:
        return self._total

    @property
    def text_columns(self) -> tuple[str, ...]:
        return ("system", "user") if self.spec.system_per_row else ("user",)

    def pieces(self, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of the requests (``payload``: id and body bytes), a row group at a time."""
        for i in range(len(self._starts)):
            yield self._read(i, columns)

    def span(self, start: int, n: int, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of requests ``start:start + n``, a row group's part at a time."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for i in range(first, len(self._starts)):
            lo = self._starts[i]
            if lo >= start + n:
                break
            part = self._read(i, columns)
            a, b = max(start - lo, 0), min(start + n - lo, part.height)
            if a < b:
                yield part.slice(a, b - a)

    def gather(self, positions: pl.Series, columns: Sequence[str]) -> pl.DataFrame:
        """``columns`` of the requests at sorted ``positions``."""
        parts = []
        for i, lo in enumerate(self._starts):
            hi = self._starts[i + 1] if i + 1 < len(self._starts) else self._total
            inside = positions.filter((positions >= lo) & (positions < hi)) - lo
            if inside.len():
                parts.append(self._read(i, columns)[inside])
        return pl.concat(parts) if parts else self._read(0, columns).head(0)

    def describe_row(self, position: int) -> str:
        return f"row {position}"

    def _read(self, i: int, columns: Sequence[str]) -> pl.DataFrame:
        virtual = {e.meta.output_name(): e for e in sizes(self.text_columns)}
        needed = sorted(
            {c for c in columns if c not in virtual}
            | ({"custom_id", "body"} if "payload" in columns else set())
        )
        return self._group(i, needed).select(virtual.get(c, pl.col(c)) for c in columns)

    def _group(self, i: int, columns: Sequence[str]) -> pl.DataFrame:
        # A reader per call, on the footer read once: shard files are written two at a time,
        # and one ParquetFile is not promised to be safe across threads.
        f = pq.ParquetFile(self.path, metadata=self._meta)
        return pl.from_arrow(f.read_row_group(i, columns=list(columns)))  # type: ignore[return-value]
