"""Anthropic's organisation reports (the Admin API, ``sk-ant-admin...`` keys): usage (``GET
/v1/organizations/usage_report/messages``, grouped by model and service tier) and costs (``GET
/v1/organizations/cost_report``, grouped by description, which carries model, service tier and
token type; amounts are decimal strings of cents), each as a frame in
:data:`polars_llmbatch.providers.base.USAGE_SCHEMA` / ``COST_SCHEMA``.

Shapes: Anthropic's Admin API reference (docs/bill-reports.md). Anthropic marks these two
endpoints "legacy" in favour of a beta analytics API; they are what every admin key reads.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import polars as pl

from polars_llmbatch.providers.base import COST_SCHEMA, USAGE_SCHEMA, report_pages

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["costs", "usage"]

#: Service tiers as the reports name them → ours.
_TIERS = {"standard": "sync", "batch": "batch", "flex": "flex", "flex_discount": "flex"}


def _day(iso: str) -> dt.date:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(dt.timezone.utc).date()


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def usage(t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """Tokens per day, model and tier (``standard`` → ``sync``; priority tiers as named)."""
    params = {
        "starting_at": _iso(start),
        "ending_at": _iso(end),
        "bucket_width": "1d",
        "group_by[]": ["model", "service_tier"],
        "limit": 31,
    }
    rows = []
    for bucket in report_pages(t, "/v1/organizations/usage_report/messages", params):
        day = _day(bucket["starting_at"])
        for r in bucket.get("results") or []:
            creation = r.get("cache_creation") or {}
            write = (creation.get("ephemeral_5m_input_tokens") or 0) + (
                creation.get("ephemeral_1h_input_tokens") or 0
            )
            read = r.get("cache_read_input_tokens") or 0
            tier = r.get("service_tier") or "standard"
            rows.append(
                {
                    "day": day,
                    "model": r.get("model"),
                    "tier": _TIERS.get(tier, tier),
                    "requests": None,  # the report counts tokens, not requests
                    "input_tokens": (r.get("uncached_input_tokens") or 0) + read + write,
                    "cached_tokens": read,
                    "cache_write_tokens": write,
                    "output_tokens": r.get("output_tokens") or 0,
                }
            )
    return pl.DataFrame(rows, schema=USAGE_SCHEMA, orient="row")


def costs(t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """USD per day, model and tier (the report's cents, divided by 100)."""
    params = {
        "starting_at": _iso(start),
        "ending_at": _iso(end),
        "bucket_width": "1d",
        "group_by[]": ["description"],
        "limit": 31,
    }
    rows = []
    for bucket in report_pages(t, "/v1/organizations/cost_report", params):
        day = _day(bucket["starting_at"])
        for r in bucket.get("results") or []:
            if r.get("amount") is None:
                continue
            tier = r.get("service_tier")
            rows.append(
                {
                    "day": day,
                    "model": r.get("model"),
                    "tier": _TIERS.get(tier, tier) if tier else None,
                    "amount": float(r["amount"]) / 100,
                    "line_item": r.get("description"),
                }
            )
    return pl.DataFrame(rows, schema=COST_SCHEMA, orient="row")
