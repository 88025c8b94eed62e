"""Result rows: the one shape every provider's parser returns and every checkpoint stores.

One row per request and attempt::

    custom_id  status  text    embedding      error   retryable  input_tokens  output_tokens  finish
    String     String  String  List[Float32]  String  Boolean    Int64         Int64          String

and ``cache_read_tokens`` / ``cache_write_tokens`` (Int64): the part of ``input_tokens`` (the whole
input, always) served from, or written to, the provider's prompt cache, each billed at its own rate.

``status`` is ``succeeded``, ``errored``, ``expired``, ``canceled`` or ``missing`` here;
``invalid_output`` and ``skipped`` are decided later, when results meet the input rows
(:mod:`polars_llmbatch.collect.reconcile`).
"""

from __future__ import annotations

import polars as pl

__all__ = [
    "RESULT_SCHEMA",
    "STATUSES",
    "all_distinct",
    "empty_results",
    "finish_parse",
    "missing_results",
]

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "custom_id": pl.String(),
    "status": pl.String(),
    "text": pl.String(),
    "embedding": pl.List(pl.Float32()),
    "error": pl.String(),
    "retryable": pl.Boolean(),
    "input_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
    "finish": pl.String(),
    "cache_read_tokens": pl.Int64(),
    "cache_write_tokens": pl.Int64(),
}
#: Every row status, in the order reports list them.
STATUSES = (
    "succeeded",
    "invalid_output",
    "errored",
    "expired",
    "canceled",
    "missing",
    "skipped",
    "pending",
)


def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULT_SCHEMA)


def finish_parse(rows: pl.DataFrame) -> pl.DataFrame:
    """A parser's raw rows in :data:`RESULT_SCHEMA`: embeddings decoded, one row per request.

    ``rows`` may carry ``embedding_b64`` (base64-decoded little-endian float32 bytes) and/or
    ``embedding_floats`` (a list of numbers) instead of ``embedding``. A duplicated request never
    lets an error replace a success.
    """
    parts = []  # only columns that hold a vector (text answers have none: nothing to decode)
    has = {c for c in rows.columns if rows[c].null_count() < rows.height}
    if "embedding_b64" in has:
        parts.append(_float32_lists(rows["embedding_b64"]))
    if "embedding_floats" in has:
        parts.append(rows["embedding_floats"].cast(pl.List(pl.Float32)))
    if "embedding" in has:
        parts.append(rows["embedding"].cast(pl.List(pl.Float32)))
    if parts:
        embedding = pl.select(pl.coalesce(pl.lit(p) for p in parts)).to_series()
        rows = rows.with_columns(embedding.alias("embedding"))
    else:
        rows = rows.drop("embedding", strict=False)
    out = rows.select(
        (pl.col(name) if rows.schema[name] == dtype else pl.col(name).cast(dtype))
        if name in rows.columns
        else pl.lit(None, dtype).alias(name)
        for name, dtype in RESULT_SCHEMA.items()
    )
    if all_distinct(out["custom_id"]):  # the usual case: no duplicated lines
        return out
    first = out.sort(pl.col("status") == "succeeded", descending=True, maintain_order=True)
    return first.unique("custom_id", keep="first", maintain_order=True)


def all_distinct(ids: pl.Series) -> bool:
    """Whether no value repeats. Distinct 64-bit hashes prove it (10x faster than comparing
    the 32-character ids); equal hashes fall back to the exact check."""
    if ids.hash().n_unique() == len(ids):
        return True
    return ids.n_unique() == len(ids)


def _float32_lists(blobs: pl.Series) -> pl.Series:
    """Base64-decoded float32 vectors (one blob per row, null allowed) as ``List(Float32)``,
    without a Python loop over the numbers: the blobs are joined once and viewed as float32,
    then cut by offsets into an Arrow list array (64-bit offsets: a million 1536-d vectors
    hold more values than 32 bits count)."""
    import pyarrow as pa

    lengths = blobs.bin.size().fill_null(0).cast(pl.Int64) // 4
    offsets = pl.concat([pl.Series([0], dtype=pl.Int64), lengths.cum_sum()])
    data = pa.py_buffer(b"".join(blobs.drop_nulls().to_list()))
    flat = pa.Array.from_buffers(pa.float32(), len(data) // 4, [None, data])
    arr = pa.LargeListArray.from_arrays(offsets.to_arrow(), flat, mask=blobs.is_null().to_arrow())
    return pl.Series(blobs.name, arr).cast(pl.List(pl.Float32))


def missing_results(custom_ids: pl.Series) -> pl.DataFrame:
    """Rows for requests that were sent but came back in no result file."""
    return pl.DataFrame({"custom_id": custom_ids}).with_columns(
        pl.lit("missing").alias("status"),
        pl.lit(None, pl.String).alias("text"),
        pl.lit(None, pl.List(pl.Float32)).alias("embedding"),
        pl.lit("absent from every result file the provider returned").alias("error"),
        pl.lit(True).alias("retryable"),
        pl.lit(None, pl.Int64).alias("input_tokens"),
        pl.lit(None, pl.Int64).alias("output_tokens"),
        pl.lit(None, pl.String).alias("finish"),
        pl.lit(None, pl.Int64).alias("cache_read_tokens"),
        pl.lit(None, pl.Int64).alias("cache_write_tokens"),
    )
