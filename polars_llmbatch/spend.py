"""The spend ledger: what jobs cost, by provider, model, tag or day, from their checkpoints alone.

DuckDB reads every ``job.json`` and ``results/*.parquet`` under a root folder (no other store).
Costs are tokens × the prices recorded in each job when it started: the rate actually paid
(batch, or sync for jobs run in sync mode), the same tokens at the sync rate, and the
difference (the realised saving). Results reused from the cache cost nothing again and are left
out; every attempt that came back with usage counts (a retried request is paid per attempt). A
result the provider lost (``missing``) may have been billed without its usage coming back: it
cannot be counted here.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from polars_llmbatch.checkpoint import default_root
from polars_llmbatch.errors import LlmBatchError

__all__ = ["BY", "spend"]

#: What ``by=`` takes (and ``tag:NAME`` for any tag).
BY = ("job", "provider", "model", "mode", "day")

_JOBS = """
SELECT
    regexp_replace(filename, '[/\\\\]job\\.json$', '') AS folder,
    job_id, spec ->> '$.provider' AS provider, spec ->> '$.model' AS model, mode,
    CAST(created AS TIMESTAMPTZ) AS created, tags,
    coalesce(TRY_CAST(price ->> '$.input' AS DOUBLE), 0) AS p_in,
    coalesce(TRY_CAST(price ->> '$.output' AS DOUBLE), 0) AS p_out,
    coalesce(TRY_CAST(price ->> '$.batch_input' AS DOUBLE), 0) AS p_bin,
    coalesce(TRY_CAST(price ->> '$.batch_output' AS DOUBLE), 0) AS p_bout,
    TRY_CAST(estimate ->> (CASE WHEN mode = 'sync' THEN '$.cost_sync' ELSE '$.cost_batch' END)
             AS DOUBLE) AS estimated
FROM read_json({files}, filename = true, format = 'auto',
               columns = {{job_id: 'VARCHAR', spec: 'JSON', mode: 'VARCHAR', created: 'VARCHAR',
                          tags: 'JSON', price: 'JSON', estimate: 'JSON'}})
"""

_USAGE = """
SELECT
    regexp_replace(filename, '[/\\\\]results[/\\\\][^/\\\\]+$', '') AS folder,
    mode AS paid_as,
    count(*) FILTER (WHERE input_tokens IS NOT NULL) AS requests,
    coalesce(sum(input_tokens), 0) AS input_tokens,
    coalesce(sum(output_tokens), 0) AS output_tokens
FROM read_parquet({files}, filename = true, union_by_name = true)
WHERE mode <> 'cached'
GROUP BY ALL
"""


def spend(root: str | Path | None = None, *, by: str = "job") -> pl.DataFrame:
    """Spend of every job checkpointed under ``root`` (default: the user cache folder's jobs),
    one row per ``by`` group: ``job`` (default), ``provider``, ``model``, ``mode``, ``day``
    (UTC, of the job's start) or ``tag:NAME`` (jobs without that tag group under null).

    Columns: the group, ``jobs``, ``requests`` (billed results), ``input_tokens``,
    ``output_tokens``, ``cost`` (USD at the rate paid), ``cost_at_sync`` (the same tokens at the
    sync rate), ``savings`` and ``estimated`` (the estimate made before sending, at the rate of
    the job's mode).

    Example:
        >>> import polars as pl, polars_llmbatch, tempfile
        >>> from polars_llmbatch.emulator import serve
        >>> root = tempfile.mkdtemp()
        >>> with serve(batch_seconds=0.1) as emu:
        ...     _ = pl.DataFrame({"body": ["refund please", "app crashes"]}).llm.batch(
        ...         "Classify: {body}", provider="openai", model="gpt-4o-mini",
        ...         output=["billing", "bug"], checkpoint=f"{root}/tickets",
        ...         tags={"team": "support"}, api_key="k", base_url=emu.openai_url,
        ...         progress=False, poll_interval=0.05)
        >>> s = polars_llmbatch.spend(root, by="tag:team")
        >>> s["team"].to_list(), s["requests"].to_list(), bool(s["savings"][0] > 0)
        (['support'], [2], True)
    """
    folder = Path(root) if root is not None else default_root() / "jobs"
    if not isinstance(by, str) or not (by in BY or (by.startswith("tag:") and len(by) > 4)):
        raise LlmBatchError(f"by= must be one of {list(BY)} or 'tag:NAME', not {by!r}")
    jobs = sorted(str(p) for p in folder.glob("*/job.json"))
    if not jobs:
        raise LlmBatchError(
            f"no checkpoints under {str(folder)!r} (folders holding a job.json); pass the folder "
            "that holds your checkpoint folders"
        )
    results = sorted(str(p) for p in folder.glob("*/results/*.parquet"))
    group, label = _group(by)
    with duckdb.connect() as con:
        con.execute(f"CREATE TEMP VIEW jobs AS {_JOBS.format(files=jobs)}")
        if results:
            con.execute(f"CREATE TEMP VIEW usage AS {_USAGE.format(files=results)}")
        else:
            con.execute(
                "CREATE TEMP VIEW usage AS SELECT NULL::VARCHAR AS folder, NULL::VARCHAR AS "
                "paid_as, 0::BIGINT AS requests, 0::HUGEINT AS input_tokens, "
                "0::HUGEINT AS output_tokens WHERE false"
            )
        sql = f"""
        WITH per_job AS (
            SELECT j.*,
                coalesce(sum(u.requests), 0) AS requests,
                coalesce(sum(u.input_tokens), 0) AS input_tokens,
                coalesce(sum(u.output_tokens), 0) AS output_tokens,
                coalesce(sum(CASE WHEN u.paid_as = 'sync'
                    THEN u.input_tokens * j.p_in + u.output_tokens * j.p_out
                    ELSE u.input_tokens * j.p_bin + u.output_tokens * j.p_bout END), 0) / 1e6
                    AS cost,
                coalesce(sum(u.input_tokens * j.p_in + u.output_tokens * j.p_out), 0) / 1e6
                    AS cost_at_sync
            FROM jobs j LEFT JOIN usage u USING (folder)
            GROUP BY ALL
        )
        SELECT {group} AS "{label}",
            count(*) AS jobs,
            sum(requests)::BIGINT AS requests,
            sum(input_tokens)::BIGINT AS input_tokens,
            sum(output_tokens)::BIGINT AS output_tokens,
            sum(cost) AS cost,
            sum(cost_at_sync) AS cost_at_sync,
            sum(cost_at_sync) - sum(cost) AS savings,
            sum(estimated) AS estimated
        FROM per_job
        GROUP BY 1
        ORDER BY cost DESC, 1
        """
        return con.sql(sql).pl()


def _group(by: str) -> tuple[str, str]:
    if by.startswith("tag:"):
        name = by[4:].replace("'", "''")
        return f"tags ->> '$.\"{name}\"'", by[4:]
    return {
        "job": ("regexp_replace(folder, '^.*[/\\\\]', '')", "job"),
        "provider": ("provider", "provider"),
        "model": ("provider || '/' || model", "model"),
        "mode": ("mode", "mode"),
        "day": ("CAST(created AT TIME ZONE 'UTC' AS DATE)", "day"),
    }[by]
