"""Stratified random samples of a job's requests, by size: what calibration counts and what a
pilot sends, so that long and short prompts are both represented."""

from __future__ import annotations

import polars as pl

__all__ = ["STRATA", "strata_of", "stratified"]

#: Strata by size.
STRATA = 10


def strata_of(sizes: pl.Series, size: int, *, strata: int = STRATA) -> pl.DataFrame:
    """Every position of ``sizes`` with its stratum, as :func:`stratified` draws from them:
    ``strata`` of equal count by size (fewer for a small sample: two at least in each).
    Columns ``pos``, ``stratum`` and ``x`` (the size)."""
    n = len(sizes)
    strata = _strata(strata, size)
    return pl.DataFrame({"x": sizes.cast(pl.Float64)}).with_columns(
        stratum=((pl.col("x").rank("ordinal") - 1) * strata // max(n, 1)).cast(pl.Int64),
        pos=pl.int_range(pl.len(), dtype=pl.Int64),
    )


def stratified(sizes: pl.Series, size: int, *, strata: int = STRATA, seed: int = 0) -> pl.DataFrame:
    """A sample of ``size`` positions of ``sizes``: the positions are split into ``strata``
    strata of equal count by size (fewer for a small sample: two at least in each), and the
    same number is drawn at random from each; every position when there are no more than
    ``size``. Columns ``pos`` (sorted), ``stratum``, and ``x`` (the size).

    Example:
        >>> s = stratified(pl.Series([float(i) for i in range(1000)]), 100, seed=1)
        >>> s.height, s.group_by("stratum").len()["len"].unique().to_list()
        (100, [10])
    """
    frame = strata_of(sizes, size, strata=strata)
    strata = _strata(strata, size)
    if len(sizes) > size:
        # ``size`` in all: the remainder goes one each to the first strata
        per = size // strata + (pl.col("stratum") < size % strata).cast(pl.Int64)
        rank = pl.int_range(pl.len()).shuffle(seed=seed).over("stratum")
        frame = frame.filter(rank < per)
    return frame.select("pos", "stratum", "x")


def _strata(strata: int, size: int) -> int:
    """The strata a sample of ``size`` is drawn from: two at least in each, for its variance."""
    return max(1, min(strata, size // 2))
