"""The result cache: answers this job's requests already got in other checkpoints under the same
root, against the same base URL, reused instead of paid for again."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl

from polars_llmbatch.plan.requests import Prepared
from polars_llmbatch.plan.stream import Staged

__all__ = ["cached_results", "subset"]


def cached_results(
    prepared: Prepared | Staged, root: Path, *, exclude: Path | None, base_url: str
) -> pl.DataFrame:
    """Succeeded results of this job's requests found in other checkpoints under ``root`` that
    ran against the same base URL (an emulator's answers are never reused as a provider's)."""
    if not root.is_dir():
        return pl.DataFrame()
    files = []
    for job_file in root.glob("*/job.json"):
        folder = job_file.parent
        if exclude is not None and folder.resolve() == exclude.resolve():
            continue
        try:
            if json.loads(job_file.read_text()).get("base_url") != base_url:
                continue
        except (OSError, ValueError):
            continue
        files += [str(f) for f in (folder / "results").glob("*.parquet")]
    if not files:
        return pl.DataFrame()
    # the job's ids (staged requests: read a piece at a time, only their ids held)
    ids = (
        pl.concat(prepared.pieces(["custom_id"]))
        if prepared.n_requests
        else pl.DataFrame(schema={"custom_id": pl.String})
    )
    with duckdb.connect() as con:
        con.register("ids", ids)
        # The paths are a bound parameter, never SQL text: any folder name is safe.
        found = con.sql(
            """SELECT * EXCLUDE (attempt, shard, mode) FROM read_parquet($files,
                union_by_name = true)
            WHERE status = 'succeeded' AND custom_id IN (SELECT custom_id FROM ids)""",
            params={"files": files},
        ).pl()
    if found.is_empty():
        return found
    return found.unique("custom_id", keep="first").with_columns(
        pl.lit(0, pl.Int32).alias("attempt"),
        pl.lit(-1, pl.Int32).alias("shard"),
        pl.lit("cached").alias("mode"),
    )


def subset(prepared: Prepared, cached_ids: pl.Series) -> Prepared:
    requests = prepared.requests.filter(~pl.col("custom_id").is_in(cached_ids.implode()))
    return Prepared(
        spec=prepared.spec,
        provider=prepared.provider,
        key=prepared.key,
        rows=prepared.rows,
        requests=requests,
    )
