"""A request source less some requests: a job's requests without those the result cache
already answered (never estimated, planned or sent again), read a piece at a time from any
source (:class:`.requests.Prepared`, :class:`.stream.Staged`, :class:`.stored.StoredRequests`).

Positions are the kept requests' own (0 is the first request not excluded); the order is the
source's. Only the kept requests' positions in the source are held (8 bytes each), never
their texts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import polars as pl

__all__ = ["Subset"]


@dataclass
class Subset:
    """``source``'s requests whose ``custom_id`` is not in ``exclude``.

    Example:
        >>> import polars as pl
        >>> from polars_llmbatch.plan.requests import prepare
        >>> df = pl.DataFrame({"body": ["a", "b", "c"]})
        >>> whole = prepare(df, "Say {body}", provider="openai", model="gpt-4o-mini")
        >>> first = whole.requests["custom_id"][:1]
        >>> todo = Subset(whole, first)
        >>> todo.n_requests, pl.concat(todo.span(0, 2, ["custom_id"]))["custom_id"].to_list() == (
        ...     whole.requests["custom_id"][1:].to_list())
        (2, True)
    """

    source: Any
    exclude: pl.Series
    #: the kept requests' positions in ``source``, in order
    positions: pl.Series = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kept, offset = [], 0
        for piece in self.source.pieces(["custom_id"]):
            keep = ~piece["custom_id"].is_in(self.exclude.implode())
            kept.append(keep.arg_true().cast(pl.Int64) + offset)
            offset += piece.height
        self.positions = pl.concat(kept, rechunk=True) if kept else pl.Series([], dtype=pl.Int64)

    # what the source says of the job as a whole
    @property
    def spec(self) -> Any:
        return self.source.spec

    @property
    def provider(self) -> Any:
        return self.source.provider

    @property
    def key(self) -> str:
        return self.source.key

    @property
    def text_columns(self) -> tuple[str, ...]:
        return self.source.text_columns

    @property
    def n_rows(self) -> int:
        return self.source.n_rows

    @property
    def n_skipped(self) -> int:
        return self.source.n_skipped

    @cached_property
    def job_id(self) -> str:
        return self.source.job_id

    def describe_row(self, position: int) -> str:
        return self.source.describe_row(position)

    # the kept requests
    @property
    def n_requests(self) -> int:
        return len(self.positions)

    def pieces(self, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of the kept requests, a piece of the source at a time."""
        extra = [] if "custom_id" in columns else ["custom_id"]
        for piece in self.source.pieces([*columns, *extra]):
            yield piece.filter(~pl.col("custom_id").is_in(self.exclude.implode())).select(columns)

    def span(self, start: int, n: int, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of kept requests ``start:start + n``: the source's span from the first
        to the last of them, less the excluded ones."""
        if n <= 0:
            return
        at = self.positions.slice(start, n)
        lo, hi = int(at[0]), int(at[-1]) + 1
        extra = [] if "custom_id" in columns else ["custom_id"]
        for piece in self.source.span(lo, hi - lo, [*columns, *extra]):
            yield piece.filter(~pl.col("custom_id").is_in(self.exclude.implode())).select(columns)

    def gather(self, positions: pl.Series, columns: Sequence[str]) -> pl.DataFrame:
        """``columns`` of the kept requests at sorted ``positions``."""
        return self.source.gather(self.positions.gather(positions), columns)
