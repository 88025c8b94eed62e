"""The bill, reconciled: what the jobs under a folder recorded, next to what the provider's
organisation reports say it billed, per day, model and tier.

The ledger side is every billed result of the provider's jobs under ``root`` that ran against
the same base URL (reused results aside: they were paid once, where they ran), on the UTC day
its shard finished, at the rate of its tier. The bill side is the provider's usage report
(tokens by day, model and tier) and its cost report (USD): Anthropic's cost report names model
and tier, so its amounts are used as they are; OpenAI's names the model only, so a day's amount
for a model is split over its tiers in proportion to their tokens at list price. Where the cost
report has nothing for a row, its tokens are priced at list price (``cost_source`` says which).

A billed model name may be a dated snapshot of the one a job asked for
(``gpt-4o-mini-2024-07-18`` for ``gpt-4o-mini``): it is matched to the job's model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch.collect.reconcile import cost_of, scan_results
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.prices import cost_expr, lookup_price
from polars_llmbatch.providers import get_provider
from polars_llmbatch.providers.base import Provider, Secret, redact_url
from polars_llmbatch.run.checkpoint import Checkpoint, default_root

__all__ = ["BILL_SCHEMA", "reconcile_bill"]

KEYS = ("day", "model", "tier")
#: The reconciled frame's columns.
BILL_SCHEMA: dict[str, pl.DataType] = {
    "provider": pl.String(),
    "base_url": pl.String(),
    "day": pl.Date(),
    "model": pl.String(),
    "tier": pl.String(),
    "ledger_requests": pl.Int64(),
    "ledger_input_tokens": pl.Int64(),
    "ledger_output_tokens": pl.Int64(),
    "ledger_cost": pl.Float64(),
    "billed_requests": pl.Int64(),
    "billed_input_tokens": pl.Int64(),
    "billed_output_tokens": pl.Int64(),
    "billed_cost": pl.Float64(),
    "billed_list_cost": pl.Float64(),
    "cost_source": pl.String(),
    "diff_input_tokens": pl.Int64(),
    "diff_output_tokens": pl.Int64(),
    "diff_cost": pl.Float64(),
    "note": pl.String(),
}
OUTSIDE = "spend outside these jobs"


def reconcile_bill(
    root: str | Path | None = None,
    *,
    provider: str | Provider,
    start: dt.date | dt.datetime | str,
    end: dt.date | dt.datetime | str | None = None,
    admin_key: str | None = None,
    base_url: str | None = None,
    tolerance: float = 0.01,
    env: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """What the jobs under ``root`` recorded next to what ``provider`` billed, one row per
    UTC day × model × tier (``batch``, ``flex``, ``sync``) from ``start`` to ``end`` (days,
    ``end`` exclusive; default: tomorrow), with the differences (billed − recorded).

    Needs an admin key (``admin_key=``, or ``OPENAI_ADMIN_KEY`` / ``ANTHROPIC_ADMIN_KEY``),
    sent only to ``base_url`` (default: the provider's). ``note`` says ``matches`` (within
    ``tolerance``, relative), ``spend outside these jobs`` (billed above recorded: calls made
    elsewhere; at the sync tier the candidates for batch), or ``not on the bill`` (recorded
    above billed: reports lag by minutes, or the jobs ran under another organisation).

    Example:
        >>> import polars as pl, polars_llmbatch, tempfile, datetime as dt
        >>> from polars_llmbatch.emulator import serve
        >>> root = tempfile.mkdtemp()
        >>> with serve(batch_seconds=0.1) as emu:
        ...     _ = pl.DataFrame({"body": ["refund please", "app crashes"]}).llm.batch(
        ...         "Classify: {body}", provider="openai", model="gpt-4o-mini",
        ...         output=["billing", "bug"], checkpoint=f"{root}/tickets", api_key="k",
        ...         base_url=emu.openai_url, progress=False, poll_interval=0.05)
        ...     bill = polars_llmbatch.reconcile_bill(
        ...         root, provider="openai", start=dt.date.today() - dt.timedelta(days=1),
        ...         admin_key="sk-admin-emulated", base_url=emu.openai_url)
        >>> bill.select("tier", "ledger_input_tokens", "diff_input_tokens", "note").rows()
        [('batch', 84, 0, 'matches')]
    """
    prov = get_provider(provider)
    if not prov.admin_env_key:
        raise LlmBatchError(
            f"{prov.name} has no organisation usage report to reconcile with (Gemini bills "
            "through Google Cloud Billing: export it to BigQuery and compare with spend())"
        )
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise LlmBatchError(f"tolerance= must be a number from 0 to 1, got {tolerance!r}")
    first, last = _day(start, "start"), _day(end, "end") if end is not None else None
    last = last or dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)
    if last <= first:
        raise LlmBatchError(f"end= ({last}) must be after start= ({first})")
    env = os.environ if env is None else env
    key = admin_key or next((env[k] for k in prov.admin_env_key if env.get(k)), None)
    if not key:
        raise LlmBatchError(
            f"reconciling with {prov.name}'s bill needs an admin key: set "
            f"{prov.admin_env_key[0]} or pass admin_key= (an ordinary API key cannot read "
            "the organisation's usage)"
        )
    url = base_url or env.get(prov.env_base_url) or prov.default_base_url
    folder = Path(root) if root is not None else default_root() / "jobs"

    from polars_llmbatch.run.transport import Credentials, ProviderError, Transport

    since = dt.datetime.combine(first, dt.time(), dt.timezone.utc)
    until = dt.datetime.combine(last, dt.time(), dt.timezone.utc)
    try:
        with Transport(Credentials(prov.name, url, Secret(key))) as t:
            usage = prov.billed_usage(t, since, until)
            costs = prov.billed_costs(t, since, until)
    except ProviderError as exc:
        if exc.status in (401, 403):
            raise LlmBatchError(
                f"{prov.name} refused the key for its organisation reports ({exc}): they need "
                f"an admin key (set {prov.admin_env_key[0]}), not an ordinary API key"
            ) from None
        raise
    ledger = _ledger(folder, prov, redact_url(url))
    ledger = ledger.filter(pl.col("day").is_between(first, last, closed="left"))
    usage = usage.filter(pl.col("day").is_between(first, last, closed="left"))
    costs = costs.filter(pl.col("day").is_between(first, last, closed="left"))
    names = _model_names(ledger["model"].unique().to_list())
    usage = usage.with_columns(pl.col("model").map_elements(names, return_dtype=pl.String))
    costs = costs.with_columns(
        pl.col("model").map_elements(names, return_dtype=pl.String, skip_nulls=True)
    )
    out = _compare(ledger, _billed(usage, costs, prov), tolerance)
    return out.with_columns(provider=pl.lit(prov.name), base_url=pl.lit(redact_url(url))).select(
        list(BILL_SCHEMA)
    )


def _day(value: Any, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).date() if value.tzinfo else value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value[:10])
        except ValueError:
            pass
    raise LlmBatchError(f"{name}= must be a date (e.g. '2026-11-01'), got {value!r}")


def _model_names(known: list[str]) -> Any:
    """A billed model name → the job model it is a snapshot of (``<model>-YYYY-MM-DD`` or
    ``<model>-YYYYMMDD``), or itself."""
    snapshot = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")

    def name(billed: str) -> str:
        if billed in known:
            return billed
        base = snapshot.sub("", billed)
        return base if base in known else billed

    return name


_CELLS = {
    "job": pl.String,
    "provider": pl.String,
    "base_url": pl.String,
    "day": pl.Date,
    "model": pl.String,
    "tier": pl.String,
    "requests": pl.Int64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "cost": pl.Float64,
    "cost_at_sync": pl.Float64,
}


def job_cells(
    job_file: Path,
    *,
    job: dict[str, Any] | None = None,
    results: pl.DataFrame | pl.LazyFrame | None = None,
) -> pl.DataFrame:
    """A job's billed results (reused ones aside) per day × model × tier: requests, tokens,
    cost at the rate paid and at the sync rate (the job's recorded prices), with the job's
    folder name, provider and base URL. ``job`` and ``results``: the job.json and results
    the caller has read already."""
    if job is None:
        try:
            job = json.loads(job_file.read_text())
        except (OSError, ValueError):
            return pl.DataFrame(schema=_CELLS)
    ckpt = Checkpoint(job_file.parent)
    scan = scan_results(ckpt) if results is None else results.lazy()  # streamed, not held
    billed = scan.filter((pl.col("mode") != "cached") & pl.col("input_tokens").is_not_null())
    created = dt.datetime.fromisoformat(job["created"]).astimezone(dt.timezone.utc).date()
    days = _shard_days(ckpt)
    price = job.get("price") or {}
    cells = (
        billed.with_columns(
            day=pl.col("shard")
            .replace_strict(days, default=None, return_dtype=pl.Date)
            .fill_null(created),
            tier=pl.col("mode"),
            cost=cost_of(price),
            cost_at_sync=cost_of(price, at_sync=True),
        )
        .group_by("day", "tier")
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("input_tokens").sum().cast(pl.Int64),
            pl.col("output_tokens").fill_null(0).sum().cast(pl.Int64),
            pl.col("cost").sum(),
            pl.col("cost_at_sync").sum(),
        )
        .collect(engine="streaming")
    )
    if cells.is_empty():
        return pl.DataFrame(schema=_CELLS)
    return cells.with_columns(
        job=pl.lit(job_file.parent.name),
        provider=pl.lit(job["spec"]["provider"]),
        base_url=pl.lit(job.get("base_url")),
        model=pl.lit(job["spec"]["model"]),
    ).select(list(_CELLS))


def _ledger(folder: Path, prov: Provider, url: str) -> pl.DataFrame:
    """The provider's billed results under ``folder`` against ``url``, per job and cell."""
    parts = [job_cells(f) for f in sorted(folder.glob("*/job.json"))]
    cells = pl.concat(parts) if parts else pl.DataFrame(schema=_CELLS)
    return cells.filter((pl.col("provider") == prov.name) & (pl.col("base_url") == url))


def _shard_days(ckpt: Checkpoint) -> dict[int, dt.date]:
    """Each shard's UTC day: when its results were fetched (a provider bills a request when
    it runs, which is before that, so a batch that ran across midnight may land a day off)."""
    days: dict[int, dt.date] = {}
    for e in ckpt.events():
        if e.get("event") in ("fetched", "done") and "shard" in e and e.get("at"):
            at = dt.datetime.fromisoformat(e["at"]).astimezone(dt.timezone.utc)
            days.setdefault(int(e["shard"]), at.date())
    return days


def _billed(usage: pl.DataFrame, costs: pl.DataFrame, prov: Provider) -> pl.DataFrame:
    """The usage report per day × model × tier, with its cost from the cost report."""
    tokens = usage.group_by(KEYS).agg(
        pl.when(pl.col("requests").null_count() < pl.len()).then(pl.col("requests").sum()),
        pl.col("input_tokens").sum(),
        pl.col("cached_tokens").sum(),
        pl.col("cache_write_tokens").sum(),
        pl.col("output_tokens").sum(),
    )
    list_costs = []
    for (model,), group in tokens.group_by("model"):
        price = lookup_price(prov, str(model)).to_dict()
        list_costs.append(
            group.with_columns(
                list_cost=cost_expr(
                    price,
                    batch=pl.col("tier").is_in(["batch", "flex"]),
                    input_tokens=pl.col("input_tokens"),
                    output_tokens=pl.col("output_tokens"),
                    cache_read=pl.col("cached_tokens"),
                    cache_write=pl.col("cache_write_tokens"),
                )
            )
        )
    tokens = pl.concat(list_costs) if list_costs else tokens.with_columns(list_cost=pl.lit(0.0))
    by_tier = costs.filter(pl.col("tier").is_not_null()).group_by(KEYS).agg(pl.col("amount").sum())
    by_model = (
        costs.filter(pl.col("tier").is_null() & pl.col("model").is_not_null())
        .group_by("day", "model")
        .agg(pl.col("amount").sum().alias("model_amount"))
    )
    out = (
        tokens.join(by_tier, on=KEYS, how="left")
        .join(by_model, on=["day", "model"], how="left")
        .with_columns(share=pl.col("list_cost") / pl.col("list_cost").sum().over("day", "model"))
    )
    return out.select(
        *KEYS,
        pl.col("requests").alias("billed_requests"),
        pl.col("input_tokens").alias("billed_input_tokens"),
        pl.col("output_tokens").alias("billed_output_tokens"),
        pl.coalesce(
            "amount", pl.col("model_amount") * pl.col("share").fill_nan(0.0), "list_cost"
        ).alias("billed_cost"),
        pl.col("list_cost").alias("billed_list_cost"),
        pl.when(pl.col("amount").is_not_null())
        .then(pl.lit("cost report"))
        .when(pl.col("model_amount").is_not_null())
        .then(pl.lit("cost report, split over tiers at list price"))
        .otherwise(pl.lit("list price"))
        .alias("cost_source"),
    )


def _compare(ledger: pl.DataFrame, billed: pl.DataFrame, tolerance: float) -> pl.DataFrame:
    recorded = ledger.group_by(KEYS).agg(
        pl.col("requests").sum().alias("ledger_requests"),
        pl.col("input_tokens").sum().alias("ledger_input_tokens"),
        pl.col("output_tokens").sum().alias("ledger_output_tokens"),
        pl.col("cost").sum().alias("ledger_cost"),
    )
    both = recorded.join(billed, on=KEYS, how="full", coalesce=True)
    zero = [
        pl.col(c).fill_null(0)
        for c in (
            "ledger_requests",
            "ledger_input_tokens",
            "ledger_output_tokens",
            "billed_input_tokens",
            "billed_output_tokens",
        )
    ] + [pl.col(c).fill_null(0.0) for c in ("ledger_cost", "billed_cost", "billed_list_cost")]
    both = both.with_columns(zero).with_columns(
        diff_input_tokens=pl.col("billed_input_tokens") - pl.col("ledger_input_tokens"),
        diff_output_tokens=pl.col("billed_output_tokens") - pl.col("ledger_output_tokens"),
        diff_cost=pl.col("billed_cost") - pl.col("ledger_cost"),
    )

    def off(diff: str, a: str, b: str) -> pl.Expr:
        # beyond the relative tolerance (and a token, or a millionth of a dollar, of rounding)
        scale = pl.max_horizontal(pl.col(a).abs(), pl.col(b).abs())
        floor = 1e-6 if "cost" in diff else 1
        return pl.col(diff).abs() > pl.max_horizontal(scale * tolerance, pl.lit(floor))

    above = (
        off("diff_input_tokens", "ledger_input_tokens", "billed_input_tokens")
        & (pl.col("diff_input_tokens") > 0)
    ) | (off("diff_cost", "ledger_cost", "billed_cost") & (pl.col("diff_cost") > 0))
    below = (
        off("diff_input_tokens", "ledger_input_tokens", "billed_input_tokens")
        | off("diff_output_tokens", "ledger_output_tokens", "billed_output_tokens")
        | off("diff_cost", "ledger_cost", "billed_cost")
    )
    note = (
        pl.when(above & (pl.col("tier") == "sync"))
        .then(pl.lit(OUTSIDE + " (sync: a candidate for batch)"))
        .when(above)
        .then(pl.lit(OUTSIDE))
        .when(below)
        .then(pl.lit("not on the bill (reports lag by minutes; or another organisation)"))
        .otherwise(pl.lit("matches"))
    )
    return (
        both.with_columns(
            note=note, cost_source=pl.col("cost_source").fill_null("no bill for this row")
        )
        .select([c for c in BILL_SCHEMA if c not in ("provider", "base_url")])
        .cast({k: v for k, v in BILL_SCHEMA.items() if k not in ("provider", "base_url")})
        .sort(KEYS)
    )
