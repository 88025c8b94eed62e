"""The spend ledger: what jobs cost, by provider, model, tag or day, from their checkpoints alone.

It reads every ``job.json`` and ``results/*.parquet`` under a root folder (no other store).
Costs are tokens × the prices recorded in each job when it started: the rate actually paid
(batch, or sync for jobs run in sync mode), the same tokens at the sync rate, and the
difference (the realised saving). Results reused from the cache cost nothing again and are left
out; every attempt that came back with usage counts (a retried request is paid per attempt). A
result the provider lost (``missing``) may have been billed without its usage coming back: it
cannot be counted here.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import polars as pl

from polars_llmbatch.collect.reconcile import cost_of, scan_results
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.run.checkpoint import Checkpoint, default_root

__all__ = ["BY", "spend"]

#: What ``by=`` takes (and ``tag:NAME`` for any tag).
BY = ("job", "provider", "model", "mode", "day")

_PER_JOB = {
    "job": pl.String,
    "provider": pl.String,
    "model": pl.String,
    "mode": pl.String,
    "day": pl.Date,
    "tags": pl.Object,
    "billed_by": pl.String,
    "requests": pl.Int64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "cost": pl.Float64,
    "cost_at_sync": pl.Float64,
    "estimated": pl.Float64,
}


def spend(
    root: str | Path | None = None, *, by: str = "job", bill: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Spend of every job checkpointed under ``root`` (default: the user cache folder's jobs),
    one row per ``by`` group: ``job`` (default), ``provider``, ``model``, ``mode``, ``day``
    (UTC, of the job's start) or ``tag:NAME`` (jobs without that tag group under null).

    Columns: the group, ``billed_by`` (``provider``; or ``local`` for a job that ran against
    a base URL on this machine, such as the emulator: never summed with real spend), ``jobs``, ``requests`` (billed results), ``input_tokens``,
    ``output_tokens``, ``cost`` (USD at the rate paid: each token class, plain input, cache
    reads and writes, output, at its own rate and price tier), ``cost_at_sync`` (the same
    tokens at the sync rate), ``savings`` and ``estimated`` (the estimate made before sending,
    at the rate of the job's mode).

    With ``bill=`` (a :func:`~polars_llmbatch.reconcile_bill` frame, or several concatenated)
    the costs are also given *as billed*: each job's cost in a day × model × tier the bill
    covers is scaled by what the provider charged there over the list price of the same
    tokens (so spend outside the jobs is never put on them): ``billed_cost``,
    ``billed_cost_at_sync`` (the same tokens at sync rates, as billed), ``billed_savings`` and
    ``bill_coverage`` (the share of ``cost`` the bill covers; the rest stays at list price).

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
    jobs = sorted(folder.glob("*/job.json"))
    if not jobs:
        raise LlmBatchError(
            f"no checkpoints under {str(folder)!r} (folders holding a job.json); pass the folder "
            "that holds your checkpoint folders"
        )
    # Paths are only ever file names handed to readers, never text in a query: a folder
    # with quotes (or anything else) in its name is read like any other.
    rows, cells = [], []
    for f in jobs:
        row, part = _job_row(f, cells=bill is not None)
        rows.append(row)
        cells.append(part)
    per_job = pl.DataFrame(rows, schema=_PER_JOB, orient="row")
    billed = _as_billed(pl.concat(cells), bill) if bill is not None else None
    if billed is not None:
        per_job = per_job.join(billed, on="job", how="left").with_columns(
            pl.col("billed_cost").fill_null(pl.col("cost")),
            pl.col("billed_cost_at_sync").fill_null(pl.col("cost_at_sync")),
            pl.col("covered").fill_null(0.0),
        )
    label = by[4:] if by.startswith("tag:") else by
    if by.startswith("tag:"):
        present = sorted({k for t in per_job["tags"] for k in t})
        if label not in present:
            warnings.warn(
                f"no job under {str(folder)!r} has a tag {label!r}; the tags there: {present}",
                stacklevel=2,
            )
            per_job = per_job.clear()
    group: pl.Expr
    if by.startswith("tag:"):
        group = pl.col("tags").map_elements(
            lambda t: t.get(label), return_dtype=pl.String, skip_nulls=False
        )
    elif by == "model":
        group = pl.concat_str("provider", pl.lit("/"), "model")
    else:
        group = pl.col(by)
    return (
        per_job.with_columns(group.alias("__group__"))
        .group_by("__group__", "billed_by")
        .agg(
            pl.len().cast(pl.Int64).alias("jobs"),
            pl.col("requests").sum(),
            pl.col("input_tokens").sum(),
            pl.col("output_tokens").sum(),
            pl.col("cost").sum(),
            pl.col("cost_at_sync").sum(),
            (pl.col("cost_at_sync").sum() - pl.col("cost").sum()).alias("savings"),
            pl.col("estimated").sum(),
            *(
                [
                    pl.col("billed_cost").sum(),
                    pl.col("billed_cost_at_sync").sum(),
                    (pl.col("billed_cost_at_sync").sum() - pl.col("billed_cost").sum()).alias(
                        "billed_savings"
                    ),
                    (pl.col("covered").sum() / pl.col("cost").sum())
                    .fill_nan(None)
                    .alias("bill_coverage"),
                ]
                if billed is not None
                else []
            ),
        )
        .rename({"__group__": label})
        .sort(["billed_by", "cost", label], descending=[True, True, False], nulls_last=True)
    )


def _as_billed(cells: pl.DataFrame, bill: pl.DataFrame) -> pl.DataFrame:
    """Per job: its cost and cost at sync as billed, and the part of its cost the bill covers
    (see :func:`spend`); ``cells`` are the jobs' :func:`.bill.job_cells`."""
    from polars_llmbatch.collect.bill import KEYS

    keys = ["provider", "base_url", *KEYS]
    factor = bill.filter(pl.col("billed_list_cost") > 0).select(
        *keys, (pl.col("billed_cost") / pl.col("billed_list_cost")).alias("f")
    )
    cells = cells.join(factor, on=keys, how="left")
    return cells.group_by("job").agg(
        (pl.col("cost") * pl.col("f").fill_null(1.0)).sum().alias("billed_cost"),
        (pl.col("cost_at_sync") * pl.col("f").fill_null(1.0)).sum().alias("billed_cost_at_sync"),
        pl.col("cost").filter(pl.col("f").is_not_null()).sum().alias("covered"),
    )


def _job_row(job_file: Path, *, cells: bool = False) -> tuple[dict[str, Any], pl.DataFrame | None]:
    """A job's spend figures, and with ``cells`` its :func:`.bill.job_cells` from the same
    read of its results."""
    ckpt = Checkpoint(job_file.parent)
    job = json.loads(job_file.read_text())
    everything = scan_results(ckpt)  # summed as the rows stream past: no job is held whole
    results = everything.filter(pl.col("mode") != "cached")
    price = job.get("price") or {}
    unpriced = (
        results.filter(pl.col("input_tokens").is_not_null() & cost_of(price).is_null())
        .select(pl.len())
        .collect(engine="streaming")
        .item()
    )
    if unpriced:
        warnings.warn(
            f"{unpriced:,} result(s) of {job_file.parent.name!r} have tokens of a class the "
            "price list has no rate for (e.g. cache writes): their cost is unknown and left "
            "out of cost",
            stacklevel=3,
        )
    figures = (
        results.select(
            pl.col("input_tokens").is_not_null().sum().cast(pl.Int64).alias("requests"),
            pl.col("input_tokens").sum().cast(pl.Int64),
            pl.col("output_tokens").sum().cast(pl.Int64),
            cost_of(price).sum().alias("cost"),
            cost_of(price, at_sync=True).sum().alias("cost_at_sync"),
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    estimate = job.get("estimate") or {}
    estimated = estimate.get("cost_sync" if job.get("mode") == "sync" else "cost_batch")
    created = dt.datetime.fromisoformat(job["created"]).astimezone(dt.timezone.utc)
    by_cell = None
    if cells:
        from polars_llmbatch.collect.bill import job_cells

        by_cell = job_cells(job_file, job=job, results=everything)
    row = {
        "job": job_file.parent.name,
        "provider": job["spec"]["provider"],
        "model": job["spec"]["model"],
        "mode": job.get("mode"),
        "day": created.date(),
        "tags": dict(job.get("tags") or {}),
        "billed_by": "local" if _is_local(job.get("base_url")) else "provider",
        **figures,
        "estimated": estimated,
    }
    return row, by_cell


def _is_local(base_url: str | None) -> bool:
    """A base URL on this machine (the emulator, a local proxy): not a provider's bill."""
    if not base_url:
        return False
    host = (urlsplit(base_url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")
