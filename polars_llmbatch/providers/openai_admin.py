"""OpenAI's organisation reports, read with an admin key: usage (``GET
/organization/usage/completions`` and ``/usage/embeddings``, grouped by model, batch and
service tier) and costs (``GET /organization/costs``, grouped by line item), each as a frame in
:data:`polars_llmbatch.providers.base.USAGE_SCHEMA` / ``COST_SCHEMA``.

Shapes: openai-python's admin types (``UsageCompletionsResponse``, ``UsageCostsResponse``);
notes in docs/bill-reports.md. A cost line item is ``"<model>, <piece>"`` (``input``,
``cached input``, ``cache writes``, ``output``, maybe ``", long context"`` or a
``"priority | "`` prefix); it does not say batch or not, so costs are per (day, model) and the
usage report says which tier the tokens ran in.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING

import polars as pl

from polars_llmbatch.providers.base import COST_SCHEMA, USAGE_SCHEMA, report_pages

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["costs", "usage"]

_LINE_ITEM = re.compile(
    r"^(?:priority \| )?(?P<model>.+?), (?:input|output|cached input|cache writes)"
    r"(?:, long context)?$",
    re.IGNORECASE,
)


def _day(seconds: int) -> dt.date:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).date()


def usage(t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """Tokens per day, model and tier (``batch`` when ``batch`` is true, ``flex`` for the
    flex service tier, else ``sync``), completions and embeddings together."""
    rows = []
    params = {
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        "bucket_width": "1d",
        "limit": 31,
    }
    for kind, groups in (
        ("completions", ["model", "batch", "service_tier"]),
        ("embeddings", ["model", "batch"]),
    ):
        for bucket in report_pages(
            t, f"/organization/usage/{kind}", {**params, "group_by": groups}
        ):
            day = _day(bucket["start_time"])
            for r in bucket.get("results") or []:
                tier = (
                    "batch"
                    if r.get("batch")
                    else ("flex" if r.get("service_tier") == "flex" else "sync")
                )
                rows.append(
                    {
                        "day": day,
                        "model": r.get("model"),
                        "tier": tier,
                        "requests": r.get("num_model_requests"),
                        "input_tokens": r.get("input_tokens") or 0,
                        "cached_tokens": r.get("input_cached_tokens") or 0,
                        "cache_write_tokens": r.get("input_cache_write_tokens") or 0,
                        "output_tokens": r.get("output_tokens") or 0,
                    }
                )
    return pl.DataFrame(rows, schema=USAGE_SCHEMA, orient="row")


def costs(t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """USD per day and model (from the line items; tier unknown: null)."""
    rows = []
    params = {
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        "bucket_width": "1d",
        "group_by": ["line_item"],
        "limit": 180,
    }
    for bucket in report_pages(t, "/organization/costs", params):
        day = _day(bucket["start_time"])
        for r in bucket.get("results") or []:
            amount = (r.get("amount") or {}).get("value")
            if amount is None:
                continue
            m = _LINE_ITEM.match(r.get("line_item") or "")
            rows.append(
                {
                    "day": day,
                    "model": m["model"] if m else None,
                    "tier": None,
                    "amount": float(amount),
                    "line_item": r.get("line_item"),
                }
            )
    return pl.DataFrame(rows, schema=COST_SCHEMA, orient="row")
