"""Each results file's answers decoded once, kept beside it: what a result over millions of rows
reads instead of decoding every answer in memory.

``results/NNNNN.parquet`` → ``derived/outputs/NNNNN.parquet``: one row per request of that file,
as :func:`.reconcile.request_outputs` makes it (the typed output columns, status, error, tokens,
cost, the invalid reason) plus the attempt and shard the best pick across files ranks by. A
results file is decoded on its own (a shard's worth of answers in memory, never the job's),
and again only when it changed: the decoded file records the size and modification time of
the one it came from, and the job's output settings. ``derived/`` holds nothing that cannot be
made again from ``results/``: deleting it loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch.collect.reconcile import (
    CID,
    COST,
    ERROR,
    IN_TOKENS,
    INTERNAL_PREFIX,
    INVALID,
    OUT_TOKENS,
    STATUS,
    _output_dtypes,
    best_results,
    read_results,
    request_outputs,
)
from polars_llmbatch.plan.spec import RequestSpec

__all__ = ["ATTEMPT", "SHARD", "Decoded", "best_pick", "decoded_outputs"]

ATTEMPT = INTERNAL_PREFIX + "attempt"
SHARD = INTERNAL_PREFIX + "shard"
_SOURCE = "llmbatch_source"  # Parquet key-value metadata: which results file, in which state
_DIM = "llmbatch_dim"  # the embeddings' length in this file (0: none succeeded)


class Decoded:
    """The decoded outputs of a job: one file per results file, and the embeddings' length."""

    def __init__(self, files: list[Path], dtypes: dict[str, pl.DataType]) -> None:
        self.files = files
        #: The output columns' dtypes across every file (an embedding's Array length known).
        self.dtypes = dtypes

    def frames(self, columns: list[str] | None = None) -> Iterator[pl.DataFrame]:
        """Every decoded row (all attempts), a file at a time, in the dtypes of
        :attr:`schema` (``columns`` only, when given)."""
        schema = self.schema if columns is None else {c: self.schema[c] for c in columns}
        for path in self.files:
            yield pl.read_parquet(path, columns=list(schema)).cast(schema)  # type: ignore[arg-type]

    @property
    def schema(self) -> dict[str, pl.DataType]:
        info = {
            CID: pl.String(),
            STATUS: pl.String(),
            ERROR: pl.String(),
            IN_TOKENS: pl.Int64(),
            OUT_TOKENS: pl.Int64(),
            COST: pl.Float64(),
        }
        return {**info, **self.dtypes, INVALID: pl.String(), ATTEMPT: pl.Int32(), SHARD: pl.Int32()}


def decoded_outputs(
    ckpt_path: Path,
    spec: RequestSpec,
    *,
    price: dict[str, Any] | None,
    name: str | None,
    folder: Path | None = None,
) -> Decoded:
    """The decoded outputs of every results file in ``ckpt_path/results``, made where missing
    or stale (in ``folder``, default ``ckpt_path/derived/outputs``).

    Two processes may decode at once: each writes its own temporary file and renames it in,
    and both files are the same.
    """
    folder = folder or ckpt_path / "derived" / "outputs"
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(spec, price, name)
    files, dims = [], set()
    for source in sorted((ckpt_path / "results").glob("*.parquet")):
        st = source.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{settings}"
        target = folder / source.name
        meta = _metadata(target)
        if meta.get(_SOURCE) != stamp:
            meta = _decode(source, target, stamp, spec, price, name)
        files.append(target)
        if int(meta.get(_DIM, 0)):
            dims.add(int(meta[_DIM]))
    if len(dims) > 1:
        raise AssertionError(f"embeddings of different lengths: {sorted(dims)}")
    dtypes = _output_dtypes(spec, name)
    if spec.task == "embed" and dims:
        (column,) = dtypes
        dtypes[column] = pl.Array(pl.Float32, dims.pop())
    return Decoded(files, dtypes)


def best_pick(outputs: pl.DataFrame | pl.LazyFrame) -> Any:
    """One row per request: a success if any attempt succeeded, else the latest attempt (as
    :func:`.reconcile.best_results` picks among result rows)."""
    ranked = outputs.sort(
        [pl.col(STATUS) == "succeeded", ATTEMPT, SHARD], descending=True, maintain_order=True
    )
    return ranked.unique(CID, keep="first", maintain_order=True).drop(ATTEMPT, SHARD)


def _decode(
    source: Path,
    target: Path,
    stamp: str,
    spec: RequestSpec,
    price: dict[str, Any] | None,
    name: str | None,
) -> dict[str, str]:
    results = read_results(files=[source])
    results = best_results(results) if results.height else results  # a file lists each once
    outputs = request_outputs(results, spec, price=price, name=name)
    dim = 0
    if spec.task == "embed":  # stored as lists: files without a success know no length
        (column,) = _output_dtypes(spec, name)
        if isinstance(outputs.schema[column], pl.Array):
            dim = outputs.schema[column].size  # type: ignore[union-attr]
        outputs = outputs.with_columns(pl.col(column).cast(pl.List(pl.Float32)))
    outputs = outputs.with_columns(
        results["attempt"].alias(ATTEMPT) if results.height else pl.lit(None, pl.Int32),
        results["shard"].alias(SHARD) if results.height else pl.lit(None, pl.Int32),
    )
    meta = {_SOURCE: stamp, _DIM: str(dim)}
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    outputs.write_parquet(tmp, metadata=meta)
    os.replace(tmp, target)  # derived data: no fsync, a torn file is simply made again
    return meta


def _metadata(path: Path) -> dict[str, str]:
    try:
        return pl.read_parquet_metadata(path)
    except (OSError, pl.exceptions.PolarsError):  # missing or torn: decode it again
        return {}


def _settings(spec: RequestSpec, price: dict[str, Any] | None, name: str | None) -> str:
    """What the decoded columns depend on besides the results: the spec, price and name."""
    text = json.dumps([spec.digest(), price, name], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
