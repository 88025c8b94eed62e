"""Results → the caller's rows: the best result per request, typed output columns, a status for
every row, joined back in the input's order.

A row's ``llm_status`` is one of ``succeeded``, ``invalid_output`` (structured output that does
not parse or fit the schema; the raw text is kept in ``llm_error``), ``errored`` (the provider's
message in ``llm_error``), ``expired``, ``canceled``, ``missing`` (sent, absent from every result
file), ``skipped`` (its prompt rendered to null; never sent) or ``pending`` (not finished yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from polars_llmbatch.collect.results import RESULT_SCHEMA, STATUSES, all_distinct
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.prices import HALF_PRICE_MODES, cost_expr
from polars_llmbatch.plan.spec import RequestSpec

if TYPE_CHECKING:
    from polars_llmbatch.run.checkpoint import Checkpoint

__all__ = [
    "BOOKKEEPING",
    "STATUS_COLUMN",
    "best_results",
    "check_output_names",
    "decode_outputs",
    "finish_rows",
    "join_rows",
    "read_results",
    "request_outputs",
    "row_status",
    "scan_results",
    "spent",
    "status_counts",
    "unsettled",
]

STATUS_COLUMN = "llm_status"
ERROR_COLUMN = "llm_error"
USAGE_COLUMNS = ("llm_input_tokens", "llm_output_tokens", "llm_cost")
#: Every column this module makes for itself starts with this; no caller's name may.
INTERNAL_PREFIX = "__llmbatch_"
CID = INTERNAL_PREFIX + "custom_id"
SKIPPED = INTERNAL_PREFIX + "skipped"
IN_JOB = INTERNAL_PREFIX + "in_job"
STATUS = INTERNAL_PREFIX + "status"
ERROR = INTERNAL_PREFIX + "error"
INVALID = INTERNAL_PREFIX + "invalid"
IN_TOKENS = INTERNAL_PREFIX + "input_tokens"
OUT_TOKENS = INTERNAL_PREFIX + "output_tokens"
COST = INTERNAL_PREFIX + "cost"
NOT_IN_JOB = (
    "this row's request is not part of the job: the frame gave a row (or a text) that was not "
    "there when the job was created; run the job again on the new rows"
)
_EXTRA = {"attempt": pl.Int32(), "shard": pl.Int32(), "mode": pl.String()}
#: The result columns bookkeeping reads (retries, spend, budgets): no texts, errors or vectors,
#: which at millions of rows are nearly all of the bytes.
BOOKKEEPING = tuple(c for c in (*RESULT_SCHEMA, *_EXTRA) if c not in ("text", "embedding", "error"))


def read_results(
    ckpt: Checkpoint | None = None,
    *,
    files: Sequence[Path] | None = None,
    columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Every result row of the job (every attempt, and reused ones from the result cache), or
    of ``files``; only ``columns`` when given (the engine's bookkeeping never needs the texts
    or vectors, which at millions of rows are most of the bytes)."""
    return _results(ckpt, files, columns).collect()


def scan_results(ckpt: Checkpoint, columns: Sequence[str] = BOOKKEEPING) -> pl.LazyFrame:
    """:func:`read_results` as a plan, for sums and filters that need not hold the rows."""
    return _results(ckpt, None, columns)


def _results(
    ckpt: Checkpoint | None, files: Sequence[Path] | None, columns: Sequence[str] | None
) -> pl.LazyFrame:
    if files is None:
        assert ckpt is not None
        files = sorted((ckpt.path / "results").glob("*.parquet"))
    full = {**RESULT_SCHEMA, **_EXTRA}
    schema = full if columns is None else {c: full[c] for c in columns}
    if not files:
        return pl.LazyFrame(schema=schema)
    parts = []
    for f in files:
        names = pl.read_parquet_schema(f)
        # Files written before a column existed (e.g. the cache token classes) read as null.
        parts.append(
            pl.scan_parquet(f).select(
                pl.col(c) if c in names else pl.lit(None, dtype).alias(c)
                for c, dtype in schema.items()
            )
        )
    return pl.concat(parts)


#: The statuses of an attempt that ended without an answer: only a request with one of these,
#: and no success, can be sent again.
UNANSWERED = ("canceled", "expired", "missing", "errored")


def unsettled(ckpt: Checkpoint) -> pl.DataFrame:
    """Every result row (:data:`BOOKKEEPING`, in :func:`read_results`' order) of the requests
    with no success yet and some attempt that ended unanswered: all a retry round can pick
    from, and all :func:`best_results` needs to pick it. At millions of rows the settled rest
    (nearly all of them) stays on disk: only the ids are streamed past, twice."""
    scan = scan_results(ckpt).with_row_index("__order")
    failed = scan.filter(pl.col("status").is_in(UNANSWERED)).select("custom_id").unique().collect()
    if failed.is_empty():
        return pl.DataFrame(schema=scan.drop("__order").collect_schema())
    won = (
        scan.filter(pl.col("status") == "succeeded")
        .select("custom_id")
        .join(failed.lazy(), on="custom_id", how="semi")  # the small side is the table
        .collect()
    )
    open_ = failed.join(won, on="custom_id", how="anti")
    return (
        scan.join(open_.lazy(), on="custom_id", how="semi")
        .collect()
        .sort("__order")
        .drop("__order")
    )


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
    price = ckpt.job().get("price") or {}
    if results is None:  # summed as the rows stream past
        total = scan_results(ckpt).select(cost_of(price).sum()).collect(engine="streaming")
        return float(total.item() or 0.0)
    return float(_costs(results, price).sum() or 0.0)


def cost_of(price: dict[str, Any], *, at_sync: bool = False) -> pl.Expr:
    """Each result row's USD: every token class at its own rate (plain input, cache reads,
    cache writes, output), in the price tier its input falls in, at the batch or sync rate by
    how its shard ran (``at_sync``: at the sync rate whatever it ran as). Reused (cached)
    results cost nothing."""
    batch = pl.lit(False) if at_sync else pl.col("mode").is_in(list(HALF_PRICE_MODES))
    cost = cost_expr(
        price,
        batch=batch,
        input_tokens=pl.col("input_tokens"),
        output_tokens=pl.col("output_tokens"),
        cache_read=pl.col("cache_read_tokens"),
        cache_write=pl.col("cache_write_tokens"),
    )
    return pl.when(pl.col("mode") == "cached").then(0.0).otherwise(cost)


def _costs(results: pl.DataFrame, price: dict[str, Any]) -> pl.Series:
    return results.select(cost_of(price).alias("cost")).to_series()


# typed outputs ---------------------------------------------------------------------------------
def decode_outputs(best: pl.DataFrame, spec: RequestSpec, name: str | None = None) -> pl.DataFrame:
    """The request id (:data:`CID`), the output column(s) under the caller's names and
    :data:`INVALID` (a reason, or null) for each result.

    Text is kept as is; enum and struct outputs are JSON-decoded into their polars dtypes (Enum,
    numbers, nested structs); embeddings become ``pl.Array(pl.Float32, dim)``. Only succeeded rows
    carry output.
    """
    ok = best["status"] == "succeeded"
    ids = best.select(pl.col("custom_id").alias(CID))
    if spec.task == "embed":
        vectors = best["embedding"].set(~ok, None) if not ok.all() else best["embedding"]
        lengths = vectors.list.len().drop_nulls().unique()
        if len(lengths) > 1:
            raise AssertionError(f"embeddings of different lengths: {lengths.to_list()}")
        dim = int(lengths[0]) if len(lengths) else (spec.dimensions or 0)
        column = vectors.cast(pl.Array(pl.Float32, dim)) if dim else vectors
        return ids.with_columns(
            column.alias(name or "embedding"), pl.lit(None, pl.String).alias(INVALID)
        )
    out = spec.output
    assert out is not None
    text = best["text"].set(~ok, None) if not ok.all() else best["text"]
    if out.kind == "text":
        (column,) = out.columns
        return ids.with_columns(text.alias(column), pl.lit(None, pl.String).alias(INVALID))
    dtype = pl.Struct(out.columns)
    typed, invalid = _decode_json(text, dtype, out.schema or {})
    invalid = pl.select(
        pl.when(pl.lit(ok) & pl.lit(text).is_null())
        .then(pl.lit("the provider returned no text"))
        .otherwise(pl.lit(invalid))
    ).to_series()
    return pl.concat(
        [ids, typed.struct.unnest(), invalid.alias(INVALID).to_frame()], how="horizontal"
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
    reasons.append(pl.lit(_schema_errors(text, valid & ~bad, schema)))  # whatever is left
    reason = pl.select(pl.coalesce(reasons)).to_series()
    message = pl.select(
        pl.when(pl.lit(reason).is_not_null()).then(
            pl.concat_str(pl.lit("invalid output ("), pl.lit(reason), pl.lit("): "), pl.lit(text))
        )
    ).to_series()
    typed = pl.select(pl.when(pl.lit(message).is_null()).then(pl.lit(typed))).to_series()
    return typed, message


def _schema_errors(text: pl.Series, check: pl.Series, schema: dict[str, Any]) -> pl.Series:
    """Each answer checked against the JSON schema that was sent (a Rust validator: about a
    microsecond an answer, benchmarks/bench_validate.py): an enum value inside a list, a
    nested field missing, ``7.5`` for an integer, a number outside ``minimum``/``maximum``.
    The reason for those that do not fit (the validator's first message), else null."""
    import jsonschema_rs
    import orjson

    validator = jsonschema_rs.validator_for(schema)
    is_valid = validator.is_valid
    reasons: list[str | None] = []
    for answer, ok in zip(text.to_list(), check.to_list(), strict=True):
        if answer is None or not ok or is_valid(obj := orjson.loads(answer)):
            reasons.append(None)
            continue
        first = next(iter(validator.iter_errors(obj)))
        where = "/".join(str(p) for p in first.instance_path)
        reasons.append(f"does not fit the schema{' at ' + where if where else ''}: {first.message}")
    return pl.Series(reasons, dtype=pl.String)


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
def request_outputs(
    results: pl.DataFrame,
    spec: RequestSpec,
    *,
    price: dict[str, Any] | None = None,
    name: str | None = None,
) -> pl.DataFrame:
    """One row per request that has a result: :data:`CID`, the output column(s) under the
    caller's names, and the internal status, error, token, cost and invalid columns.

    Every column of ours has a reserved name (:data:`INTERNAL_PREFIX`), so whatever the caller
    names an output (``status``, ``error``, ``custom_id``, ``skipped``...) nothing collides.
    """
    best = best_results(results) if results.height else results
    info = best.select(
        pl.col("custom_id").alias(CID),
        pl.col("status").alias(STATUS),
        pl.col("error").alias(ERROR),
        pl.col("input_tokens").alias(IN_TOKENS),
        pl.col("output_tokens").alias(OUT_TOKENS),
        (_costs(best, price or {}) if best.height else pl.Series([], dtype=pl.Float64)).alias(COST),
    )
    if best.height:  # one row per result, in the same order: no join needed
        outputs = decode_outputs(best, spec, name)
        return pl.concat([info, outputs.drop(CID)], how="horizontal")
    dtypes = _output_dtypes(spec, name)
    return info.with_columns(
        *(pl.lit(None, dtypes[c]).alias(c) for c in _output_columns(spec, name)),
        pl.lit(None, pl.String).alias(INVALID),
    )


def row_status() -> pl.Expr:
    """A row's ``llm_status``: the one definition (``result()``, ``status()`` and the CLI all
    count with it), over :data:`SKIPPED`, :data:`IN_JOB` and the request's :data:`STATUS` and
    :data:`INVALID`: ``skipped`` (never sent), ``pending`` (no result yet), ``invalid_output``
    (an answer that is not what the schema asked for), else the result's status; null for a
    row that is not part of the job."""
    return (
        pl.when(pl.col(SKIPPED))
        .then(pl.lit("skipped"))
        .when(pl.col(STATUS).is_null() & pl.col(IN_JOB))
        .then(pl.lit("pending"))
        .when(pl.col(STATUS).is_null())
        .then(pl.lit(None, pl.String))
        .when(pl.col(INVALID).is_not_null())
        .then(pl.lit("invalid_output"))
        .otherwise(pl.col(STATUS))
    )


def status_counts(
    rows: pl.DataFrame | pl.LazyFrame, results: pl.DataFrame, spec: RequestSpec
) -> dict[str, int]:
    """Rows per ``llm_status`` (every status, zeros included) for the checkpoint's row map (a
    frame, or a scan streamed through) and result rows, by :func:`row_status`: the counts
    ``result()`` would show."""
    outputs = request_outputs(results, spec).select(CID, STATUS, INVALID)
    joined = _row_map(rows).lazy().join(outputs.lazy(), on=CID, how="left")
    tally = joined.group_by(row_status().alias("s")).len().collect(engine="streaming")
    counts = {s: 0 for s in STATUSES}
    counts.update(dict(tally.iter_rows()))
    return counts


def _row_map(rows: pl.DataFrame | pl.LazyFrame) -> Any:
    """The checkpoint's row map (custom_id, skipped) under our internal names."""
    return rows.select(
        pl.col("custom_id").alias(CID), pl.col("skipped").alias(SKIPPED), pl.lit(True).alias(IN_JOB)
    )


def finish_rows(
    frame: pl.DataFrame | pl.LazyFrame,
    spec: RequestSpec,
    *,
    usage: bool = False,
    name: str | None = None,
    keep: Sequence[str] = (),
) -> Any:
    """The caller's columns from ``frame`` (rows joined to :func:`request_outputs`, with
    :data:`CID`, :data:`SKIPPED` and :data:`IN_JOB`): ``keep``, the output column(s),
    ``llm_status``, ``llm_error`` and, with ``usage``, tokens and cost.

    A request shared by identical rows is paid once: its tokens and cost show on the first
    row that uses it and are 0 on the others. A row whose request is not part of the job (a
    LazyFrame that gives other rows when evaluated again) has a null status and says so.
    """
    status = row_status()
    error = (
        pl.when(~pl.col(SKIPPED) & ~pl.col(IN_JOB).fill_null(False))
        .then(pl.lit(NOT_IN_JOB))
        .otherwise(pl.coalesce(pl.col(INVALID), pl.col(ERROR)))
    )
    cols: list[pl.Expr] = [pl.col(c) for c in keep]
    cols += [pl.col(c) for c in _output_columns(spec, name)]
    cols += [status.alias(STATUS_COLUMN), error.alias(ERROR_COLUMN)]
    if usage:
        # The first row of each request; skipped and repeated rows cost nothing (0), pending
        # rows have no figures yet (null).
        first = pl.col(CID).is_first_distinct() | pl.col(STATUS).is_null()
        cols += [
            pl.when(pl.col(SKIPPED))
            .then(pl.lit(0, dtype))
            .when(first)
            .then(pl.col(source))
            .otherwise(pl.lit(0, dtype))
            .alias(column)
            for column, source, dtype in (
                ("llm_input_tokens", IN_TOKENS, pl.Int64),
                ("llm_output_tokens", OUT_TOKENS, pl.Int64),
                ("llm_cost", COST, pl.Float64),
            )
        ]
    return frame.select(*cols)


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
    """
    outputs = request_outputs(results, spec, price=price, name=name)
    mapped = _row_map(rows)
    joined = mapped.join(outputs, on=CID, how="left", maintain_order="left")
    return finish_rows(joined, spec, usage=usage, name=name)


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


def check_output_names(spec: RequestSpec, key: str, name: str | None = None) -> None:
    """Refuse, before anything is sent, an output name the result frame cannot honour: one of
    the status, error and usage columns, the row key (a reopened job's result carries it), or
    a name with the reserved internal prefix."""
    reserved = {STATUS_COLUMN, ERROR_COLUMN, *USAGE_COLUMNS, key}
    bad = [c for c in _output_columns(spec, name) if c in reserved or c.startswith(INTERNAL_PREFIX)]
    if bad:
        what = "embedding name=" if spec.task == "embed" else "output="
        raise LlmBatchError(
            f"{what} names column(s) {bad}, which the result frame uses itself "
            f"({sorted(reserved - {key})} and the row key {key!r}; nothing may start with "
            f"{INTERNAL_PREFIX!r}); pick another name"
        )
