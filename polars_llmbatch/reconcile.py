"""Results → the caller's rows: the best result per request, typed output columns, a status for
every row, joined back in the input's order.

A row's ``llm_status`` is one of ``succeeded``, ``invalid_output`` (structured output that does
not parse or fit the schema; the raw text is kept in ``llm_error``), ``errored`` (the provider's
message in ``llm_error``), ``expired``, ``canceled``, ``missing`` (sent, absent from every result
file), ``skipped`` (its prompt rendered to null; never sent) or ``pending`` (not finished yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from polars_llmbatch.results import RESULT_SCHEMA, all_distinct
from polars_llmbatch.spec import RequestSpec

if TYPE_CHECKING:
    from polars_llmbatch.checkpoint import Checkpoint

__all__ = ["STATUS_COLUMN", "best_results", "decode_outputs", "join_rows", "read_results", "spent"]

STATUS_COLUMN = "llm_status"
ERROR_COLUMN = "llm_error"
USAGE_COLUMNS = ("llm_input_tokens", "llm_output_tokens", "llm_cost")
_EXTRA = {"attempt": pl.Int32(), "shard": pl.Int32(), "mode": pl.String()}


def read_results(ckpt: Checkpoint) -> pl.DataFrame:
    """Every result row of the job (every attempt, and reused ones from the result cache)."""
    files = sorted((ckpt.path / "results").glob("*.parquet"))
    schema = {**RESULT_SCHEMA, **_EXTRA}
    if not files:
        return pl.DataFrame(schema=schema)
    return pl.concat([pl.read_parquet(f).select(list(schema)) for f in files])


def best_results(results: pl.DataFrame) -> pl.DataFrame:
    """One row per request: a success if any attempt succeeded, else the latest attempt."""
    if all_distinct(results["custom_id"]):  # one attempt each: nothing to pick
        return results
    return results.sort(
        [pl.col("status") == "succeeded", "attempt", "shard"],
        descending=True,
        maintain_order=True,
    ).unique("custom_id", keep="first", maintain_order=True)


def spent(ckpt: Checkpoint, results: pl.DataFrame | None = None) -> float:
    """USD paid so far by this job: every attempt's billed tokens at the price in ``job.json``
    (batch or sync rate by how each shard ran). Reused (cached) results cost nothing here."""
    if results is None:
        results = read_results(ckpt)
    return float(_costs(results, ckpt.job().get("price") or {}).sum() or 0.0)


def _costs(results: pl.DataFrame, price: dict[str, Any]) -> pl.Series:
    def rate(name: str) -> pl.Expr:
        return pl.lit(float(price.get(name) or 0.0) / 1e6)

    batch = pl.col("mode") == "batch"
    cost = pl.col("input_tokens").fill_null(0) * pl.when(batch).then(rate("batch_input")).otherwise(
        rate("input")
    ) + pl.col("output_tokens").fill_null(0) * pl.when(batch).then(rate("batch_output")).otherwise(
        rate("output")
    )
    return results.select(
        pl.when(pl.col("mode") == "cached").then(0.0).otherwise(cost).alias("cost")
    ).to_series()


# typed outputs ---------------------------------------------------------------------------------
def decode_outputs(best: pl.DataFrame, spec: RequestSpec, name: str | None = None) -> pl.DataFrame:
    """``custom_id``, the output column(s) and ``invalid`` (a reason, or null) for each result.

    Text is kept as is; enum and struct outputs are JSON-decoded into their polars dtypes (Enum,
    numbers, nested structs); embeddings become ``pl.Array(pl.Float32, dim)``. Only succeeded rows
    carry output.
    """
    ok = best["status"] == "succeeded"
    ids = best.select("custom_id")
    if spec.task == "embed":
        vectors = best["embedding"].set(~ok, None) if not ok.all() else best["embedding"]
        lengths = vectors.list.len().drop_nulls().unique()
        if len(lengths) > 1:
            raise AssertionError(f"embeddings of different lengths: {lengths.to_list()}")
        dim = int(lengths[0]) if len(lengths) else (spec.dimensions or 0)
        column = vectors.cast(pl.Array(pl.Float32, dim)) if dim else vectors
        return ids.with_columns(
            column.alias(name or "embedding"), pl.lit(None, pl.String).alias("invalid")
        )
    out = spec.output
    assert out is not None
    text = best["text"].set(~ok, None) if not ok.all() else best["text"]
    if out.kind == "text":
        (column,) = out.columns
        return ids.with_columns(text.alias(column), pl.lit(None, pl.String).alias("invalid"))
    dtype = pl.Struct(out.columns)
    typed, invalid = _decode_json(text, dtype, out.schema or {})
    invalid = pl.select(
        pl.when(pl.lit(ok) & pl.lit(text).is_null())
        .then(pl.lit("the provider returned no text"))
        .otherwise(pl.lit(invalid))
    ).to_series()
    return pl.concat(
        [ids, typed.struct.unnest(), invalid.alias("invalid").to_frame()], how="horizontal"
    )


def _decode_json(
    text: pl.Series, dtype: pl.Struct, schema: dict[str, Any]
) -> tuple[pl.Series, pl.Series]:
    """JSON texts → a struct of ``dtype`` and a per-row reason when a text does not fit.

    Polars decodes the whole column at once, but fails it all for one bad value; so DuckDB
    first marks the texts that are not JSON at all (vectorised), and a decode that still fails
    (a value of the wrong type) is bisected to the rows that cause it.
    """
    loose = _loosen(dtype)
    try:  # the usual case: every text is JSON of the right shape, decoded in one go
        decoded, bad = text.str.json_decode(loose), pl.Series([False] * len(text))
        valid = pl.Series([True] * len(text))
    except pl.exceptions.PolarsError:
        with duckdb.connect() as con:
            con.register("t", pl.DataFrame({"text": text}))
            sql = "SELECT coalesce(json_valid(text), false) AS v FROM t"
            valid = con.sql(sql).pl().to_series()
        candidates = text.set(~valid, None) if not valid.all() else text
        decoded, bad = _decode_bisect(candidates, loose)
    typed = decoded.cast(dtype, strict=False)  # a value outside an Enum becomes null
    required = set(schema.get("required", []))
    props = schema.get("properties", {})
    reasons = [
        pl.when(pl.lit(text).is_not_null() & ~pl.lit(valid)).then(pl.lit("not valid JSON")),
        pl.when(pl.lit(bad)).then(pl.lit("a value has the wrong type")),
    ]
    for field in dtype.fields:
        if field.name in required and not _nullable(props.get(field.name, {})):
            reasons.append(
                pl.when(
                    pl.lit(text).is_not_null() & pl.lit(typed).struct.field(field.name).is_null()
                ).then(pl.lit(f"{field.name!r} is missing or not one of its allowed values"))
            )
    reason = pl.select(pl.coalesce(reasons)).to_series()
    message = pl.select(
        pl.when(pl.lit(reason).is_not_null()).then(
            pl.concat_str(pl.lit("invalid output ("), pl.lit(reason), pl.lit("): "), pl.lit(text))
        )
    ).to_series()
    typed = pl.select(pl.when(pl.lit(message).is_null()).then(pl.lit(typed))).to_series()
    return typed, message


def _decode_bisect(text: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, pl.Series]:
    try:
        return text.str.json_decode(dtype), pl.Series([False] * len(text))
    except pl.exceptions.PolarsError:
        if len(text) == 1:
            return pl.Series([None], dtype=dtype), pl.Series([True])
    half = len(text) // 2
    a, abad = _decode_bisect(text.slice(0, half), dtype)
    b, bbad = _decode_bisect(text.slice(half), dtype)
    return a.append(b), abad.append(bbad)


def _loosen(dtype: pl.DataType) -> pl.DataType:
    """``dtype`` with Enums read as strings (checked after, so a stray value is one bad row)."""
    if isinstance(dtype, pl.Enum):
        return pl.String()
    if isinstance(dtype, pl.Struct):
        return pl.Struct({f.name: _loosen(f.dtype) for f in dtype.fields})
    if isinstance(dtype, pl.List):
        return pl.List(_loosen(dtype.inner))
    if isinstance(dtype, pl.Array):
        return pl.List(_loosen(dtype.inner))
    return dtype


def _nullable(node: dict[str, Any]) -> bool:
    types = node.get("type")
    if types == "null" or (isinstance(types, list) and "null" in types):
        return True
    return any(_nullable(o) for o in node.get("anyOf", []) + node.get("oneOf", []))


# rows ------------------------------------------------------------------------------------------
def join_rows(
    rows: pl.DataFrame,
    results: pl.DataFrame,
    spec: RequestSpec,
    *,
    price: dict[str, Any] | None = None,
    usage: bool = False,
    name: str | None = None,
) -> pl.DataFrame:
    """One row per input row, in input order: the output column(s), ``llm_status``,
    ``llm_error`` and, with ``usage``, tokens and cost. ``rows`` is the checkpoint's row map
    (key, custom_id, skipped); ``results`` every result row of the job.

    A request shared by identical rows is paid once: its tokens and cost show on the first
    row that uses it and are 0 on the others.
    """
    best = best_results(results) if results.height else results
    outputs = decode_outputs(best, spec, name) if best.height else None
    info = best.select(
        "custom_id",
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("__request__"),
        "status",
        "error",
        "input_tokens",
        "output_tokens",
        _costs(best, price or {}).alias("cost") if best.height else pl.lit(None, pl.Float64),
    )
    if outputs is not None:  # one row per result, in the same order: no join needed
        info = pl.concat([info, outputs.drop("custom_id")], how="horizontal")
    joined = rows.join(info, on="custom_id", how="left", maintain_order="left")
    out_cols = _output_columns(spec, name)
    status = (
        pl.when(pl.col("skipped"))
        .then(pl.lit("skipped"))
        .when(pl.col("status").is_null())
        .then(pl.lit("pending"))
        .when(pl.col("invalid").is_not_null() if outputs is not None else pl.lit(False))
        .then(pl.lit("invalid_output"))
        .otherwise(pl.col("status"))
    )
    error = (
        pl.coalesce(pl.col("invalid"), pl.col("error")) if outputs is not None else pl.col("error")
    )
    dtypes = _output_dtypes(spec, name)
    cols: list[pl.Expr] = [
        pl.col(c) if outputs is not None else pl.lit(None, dtypes[c]).alias(c) for c in out_cols
    ]
    cols += [status.alias(STATUS_COLUMN), error.alias(ERROR_COLUMN)]
    if usage:
        # The first row of each request (an integer key: 10x faster than the 32-char id).
        # Pending rows have no figures yet (null); skipped and repeated rows cost nothing (0).
        keep = pl.col("__request__").is_first_distinct() | pl.col("__request__").is_null()
        cols += [
            pl.when(pl.col("skipped"))
            .then(pl.lit(0, dtype))
            .when(keep)
            .then(pl.col(source))
            .otherwise(pl.lit(0, dtype))
            .alias(name)
            for name, source, dtype in (
                ("llm_input_tokens", "input_tokens", pl.Int64),
                ("llm_output_tokens", "output_tokens", pl.Int64),
                ("llm_cost", "cost", pl.Float64),
            )
        ]
    return joined.select(*cols)


def _output_dtypes(spec: RequestSpec, name: str | None) -> dict[str, pl.DataType]:
    """The output columns' dtypes before any result is in (embeddings: an Array when the
    dimension is known from ``dimensions=``)."""
    if spec.task == "embed":
        inner = pl.Float32()
        return {
            name or "embedding": pl.Array(inner, spec.dimensions)
            if spec.dimensions
            else pl.List(inner)
        }
    assert spec.output is not None
    return dict(spec.output.columns)


def _output_columns(spec: RequestSpec, name: str | None) -> list[str]:
    if spec.task == "embed":
        return [name or "embedding"]
    assert spec.output is not None
    return list(spec.output.columns)


def output_names(spec: RequestSpec, name: str | None = None, usage: bool = False) -> list[str]:
    """The columns :func:`join_rows` adds, for checking clashes before anything is sent."""
    names = [*_output_columns(spec, name), STATUS_COLUMN, ERROR_COLUMN]
    return names + list(USAGE_COLUMNS) if usage else names
