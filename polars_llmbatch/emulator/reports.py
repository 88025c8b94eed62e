"""The organisation usage and cost reports, made from the emulator's ledger: what an admin key
reads from OpenAI (``/v1/organization/usage/completions``, ``/usage/embeddings``, ``/costs``)
and Anthropic (``/v1/organizations/usage_report/messages``, ``/cost_report``), in their shapes
(openai-python's admin types; Anthropic's Admin API reference, docs/bill-reports.md).

Costs are the emulator's own: genai-prices' published rates read here with ``calc_price``
(each token class at its rate, per request, long-context tiers by genai-prices itself; batch
and flex at genai-prices' batch prices, which know that OpenAI's batch cache hits are not
halved again and Gemini's caching and batch discounts do not stack), never the library's
pricing. Every call of the ledger counts, including calls made outside the
library (an SDK pointed at the emulator): that is what a bill reconciliation must find.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import polars as pl

__all__ = ["anthropic_costs", "anthropic_usage", "openai_costs", "openai_usage", "rates"]

WIDTHS = {"1d": 86_400, "1h": 3_600, "1m": 60}
LIMITS = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}
#: Requests above this many input tokens are priced one by one (genai-prices picks the tier).
_LONG = 100_000


class ReportError(ValueError):
    """A query the real endpoint refuses (HTTP 400)."""


@functools.lru_cache(maxsize=256)
def rates(provider: str, model: str, batch: bool = False) -> dict[str, float]:
    """USD per token of ``model`` at the base tier, by class: ``input`` (uncached), ``cached``
    (cache reads), ``write`` (cache writes), ``output``, at sync or batch prices; zeros for a
    model genai-prices lacks."""
    from genai_prices import Usage, calc_price

    context = {"processing": "batch"} if batch else None

    def price(**usage: int) -> Any:
        try:
            return calc_price(
                Usage(**usage),
                model_ref=model,
                provider_id=_PROVIDER_IDS[provider],
                price_context=context,
            )
        except LookupError:
            return None

    n = 1_000
    base = price(input_tokens=n, output_tokens=n)
    if base is None:
        return {"input": 0.0, "cached": 0.0, "write": 0.0, "output": 0.0}
    cached = price(input_tokens=n, cache_read_tokens=n)
    write = price(input_tokens=n, cache_write_tokens=n)
    plain = float(base.input_price) / n
    return {
        "input": plain,
        "cached": float(cached.input_price) / n if cached is not None else plain,
        "write": float(write.input_price) / n if write is not None else plain,
        "output": float(base.output_price) / n,
    }


def _priced(bills: pl.DataFrame, provider: str) -> pl.DataFrame:
    """``bills`` with the USD of each token class: ``usd_input`` (uncached), ``usd_cached``,
    ``usd_write``, ``usd_output``; batch and flex at batch prices."""
    if bills.is_empty():
        return bills.with_columns(
            *(pl.lit(0.0).alias(f"usd_{k}") for k in ("input", "cached", "write", "output"))
        )
    table = pl.DataFrame(
        [{"model": m, "half": b, **{f"r_{k}": v for k, v in rates(provider, m, b).items()}}
         for m in bills["model"].unique().to_list() for b in (False, True)]
    )  # fmt: skip
    plain = (pl.col("input_tokens") - pl.col("cache_read") - pl.col("cache_write")).clip(0)
    out = (
        bills.with_columns(half=pl.col("tier").is_in(["batch", "flex"]))
        .join(table, on=["model", "half"], how="left")
        .with_columns(
            usd_input=plain * pl.col("r_input"),
            usd_cached=pl.col("cache_read") * pl.col("r_cached"),
            usd_write=pl.col("cache_write") * pl.col("r_write"),
            usd_output=pl.col("output_tokens") * pl.col("r_output"),
        )
        .drop("half")
    )
    long = out.with_row_index("_i").filter(pl.col("input_tokens") > _LONG)
    if long.height:  # the rare long request: genai-prices prices it, tiers and all
        fixed = _long_prices(long, provider)
        out = (
            out.with_row_index("_i")
            .join(fixed, on="_i", how="left")
            .with_columns(
                usd_input=pl.coalesce("long_input", "usd_input"),
                usd_cached=pl.when(pl.col("long_input").is_null())
                .then("usd_cached")
                .otherwise(0.0),
                usd_write=pl.when(pl.col("long_input").is_null()).then("usd_write").otherwise(0.0),
                usd_output=pl.coalesce("long_output", "usd_output"),
            )
            .drop("_i", "long_input", "long_output")
        )
    return out.drop("r_input", "r_cached", "r_write", "r_output")


def _long_prices(long: pl.DataFrame, provider: str) -> pl.DataFrame:
    """``_i``, ``long_input`` and ``long_output`` (USD) of each long request, by genai-prices."""
    from genai_prices import Usage, calc_price

    rows = []
    for r in long.iter_rows(named=True):
        try:
            p = calc_price(
                Usage(
                    input_tokens=r["input_tokens"],
                    cache_read_tokens=r["cache_read"],
                    cache_write_tokens=r["cache_write"],
                    output_tokens=r["output_tokens"],
                ),
                model_ref=r["model"],
                provider_id=_PROVIDER_IDS[provider],
                price_context={"processing": "batch"} if r["tier"] in ("batch", "flex") else None,
            )
        except LookupError:
            continue
        rows.append((r["_i"], float(p.input_price), float(p.output_price)))
    return pl.DataFrame(
        rows,
        schema={"_i": pl.UInt32, "long_input": pl.Float64, "long_output": pl.Float64},
        orient="row",
    )


# query helpers -------------------------------------------------------------------------------
def _values(query: dict[str, list[str]], name: str) -> list[str]:
    """A list parameter however it is spelled: ``name=a&name=b``, ``name[]=a``, ``name=a,b``."""
    raw = query.get(name, []) + query.get(name + "[]", [])
    return [v for item in raw for v in item.split(",") if v]


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _window(
    start: float, end: float, width_name: str, page: str | None, limit_text: str | None
) -> tuple[list[float], str | None]:
    if width_name not in WIDTHS:
        raise ReportError(f"bucket_width must be one of {sorted(WIDTHS)}, not {width_name!r}")
    width = WIDTHS[width_name]
    default, most = LIMITS[width_name]
    limit = int(limit_text) if limit_text else default
    if not 1 <= limit <= most:
        raise ReportError(f"limit must be from 1 to {most} for bucket_width={width_name}")
    first = start - start % width  # buckets snap to the width, in UTC
    if page:
        first = float(page)
    starts: list[float] = []
    t = first
    while t < end and len(starts) < limit:
        starts.append(t)
        t += width
    return starts, (str(int(t)) if t < end else None)


def _in_buckets(bills: pl.DataFrame, starts: list[float], width: int) -> pl.DataFrame:
    if not starts:
        return bills.clear().with_columns(pl.lit(0.0).alias("bucket"))
    lo, hi = starts[0], starts[-1] + width
    return bills.filter((pl.col("at") >= lo) & (pl.col("at") < hi)).with_columns(
        bucket=(lo + ((pl.col("at") - lo) // width) * width)
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# OpenAI -------------------------------------------------------------------------------------
_OPENAI_GROUPS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")


def openai_usage(bills: pl.DataFrame, query: dict[str, list[str]], kind: str, now: float) -> dict:
    """``GET /v1/organization/usage/{completions,embeddings}``."""
    start_text = _one(query, "start_time")
    if start_text is None:
        raise ReportError("start_time is required")
    start, end = float(start_text), float(_one(query, "end_time") or now)
    width_name = _one(query, "bucket_width") or "1d"
    starts, next_page = _window(start, end, width_name, _one(query, "page"), _one(query, "limit"))
    group_by = _values(query, "group_by")
    bad = [g for g in group_by if g not in _OPENAI_GROUPS]
    if bad:
        raise ReportError(f"group_by: unknown field(s) {bad}")
    rows = bills.filter(pl.col("kind") == kind).with_columns(
        batch=pl.col("tier") == "batch",
        service_tier=pl.when(pl.col("tier") == "flex")
        .then(pl.lit("flex"))
        .otherwise(pl.lit("default")),
        project_id=pl.lit(None, pl.String),
        user_id=pl.lit(None, pl.String),
        api_key_id=pl.lit(None, pl.String),
    )
    if (b := _one(query, "batch")) is not None:
        rows = rows.filter(pl.col("batch") == (b.lower() == "true"))
    if models := _values(query, "models"):
        rows = rows.filter(pl.col("model").is_in(models))
    rows = _in_buckets(rows, starts, WIDTHS[width_name])
    obj = f"organization.usage.{kind}s.result"
    data = []
    for s in starts:
        part = rows.filter(pl.col("bucket") == s)
        results = []
        if part.height:
            keys = group_by or [pl.lit(0).alias("_all")]
            agg = part.group_by(keys, maintain_order=True).agg(
                pl.col("input_tokens").sum(),
                pl.col("output_tokens").sum(),
                pl.col("cache_read").sum().alias("input_cached_tokens"),
                pl.col("cache_write").sum().alias("input_cache_write_tokens"),
                pl.len().alias("num_model_requests"),
            )
            for r in agg.iter_rows(named=True):
                result: dict[str, Any] = {"object": obj}
                for g in _OPENAI_GROUPS:
                    result[g] = r.get(g) if g in group_by else None
                result["input_tokens"] = r["input_tokens"]
                result["num_model_requests"] = r["num_model_requests"]
                if kind == "completion":
                    result.update(
                        output_tokens=r["output_tokens"],
                        input_cached_tokens=r["input_cached_tokens"],
                        input_cache_write_tokens=r["input_cache_write_tokens"],
                        input_audio_tokens=0,
                        output_audio_tokens=0,
                    )
                results.append(result)
        data.append(
            {"object": "bucket", "start_time": int(s), "end_time": int(s + WIDTHS[width_name]),
             "results": results}
        )  # fmt: skip
    return {"object": "page", "data": data, "has_more": next_page is not None,
            "next_page": next_page}  # fmt: skip


def openai_costs(bills: pl.DataFrame, query: dict[str, list[str]], now: float) -> dict:
    """``GET /v1/organization/costs`` (``1d`` buckets only): amounts per line item
    ``"<model>, input"``, ``", cached input"``, ``", cache writes"``, ``", output"``, which
    do not say whether a token was batch, flex or sync (the usage report does)."""
    start_text = _one(query, "start_time")
    if start_text is None:
        raise ReportError("start_time is required")
    width_name = _one(query, "bucket_width") or "1d"
    if width_name != "1d":
        raise ReportError("bucket_width: only 1d is supported")
    limit = _one(query, "limit")
    if limit and not 1 <= int(limit) <= 180:
        raise ReportError("limit must be from 1 to 180")
    start, end = float(start_text), float(_one(query, "end_time") or now)
    starts, next_page = _window(start, end, "1d", _one(query, "page"), None)
    by_item = "line_item" in _values(query, "group_by")
    rows = _in_buckets(_priced(bills, "openai"), starts, WIDTHS["1d"])
    pieces = {"input": "input", "cached": "cached input", "write": "cache writes",
              "output": "output"}  # fmt: skip
    data = []
    for s in starts:
        part = rows.filter(pl.col("bucket") == s)
        results = []
        if part.height:
            if by_item:
                sums = part.group_by("model", maintain_order=True).agg(
                    *(pl.col(f"usd_{k}").sum() for k in pieces)
                )
                for r in sums.iter_rows(named=True):
                    for k, word in pieces.items():
                        if r[f"usd_{k}"]:
                            results.append(_openai_cost(r[f"usd_{k}"], f"{r['model']}, {word}"))
            else:
                total = float(part.select(pl.sum_horizontal(pl.col("^usd_.*$")).sum()).item())
                results.append(_openai_cost(total, None))
        data.append({"object": "bucket", "start_time": int(s), "end_time": int(s + 86_400),
                     "results": results})  # fmt: skip
    return {"object": "page", "data": data, "has_more": next_page is not None,
            "next_page": next_page}  # fmt: skip


def _openai_cost(value: float, line_item: str | None) -> dict[str, Any]:
    return {
        "object": "organization.costs.result",
        "amount": {"value": value, "currency": "usd"},
        "line_item": line_item,
        "project_id": None,
    }


# Anthropic ------------------------------------------------------------------------------------
_ANTHROPIC_GROUPS = ("api_key_id", "workspace_id", "model", "service_tier", "context_window")


def _anthropic_rows(bills: pl.DataFrame) -> pl.DataFrame:
    return bills.with_columns(
        service_tier=pl.when(pl.col("tier") == "batch").then(pl.lit("batch")).when(
            pl.col("tier") == "flex").then(pl.lit("flex")).otherwise(pl.lit("standard")),
        context_window=pl.when(pl.col("input_tokens") > 200_000).then(pl.lit("200k-1M"))
        .otherwise(pl.lit("0-200k")),
        api_key_id=pl.lit(None, pl.String),
        workspace_id=pl.lit(None, pl.String),
    )  # fmt: skip


def _parse_iso(text: str | None, name: str) -> float:
    if not text:
        raise ReportError(f"{name}: Field required")
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ReportError(f"{name}: Input should be a valid datetime") from None


def anthropic_usage(bills: pl.DataFrame, query: dict[str, list[str]], now: float) -> dict:
    """``GET /v1/organizations/usage_report/messages``."""
    start = _parse_iso(_one(query, "starting_at"), "starting_at")
    end_text = _one(query, "ending_at")
    end = _parse_iso(end_text, "ending_at") if end_text else now
    width_name = _one(query, "bucket_width") or "1d"
    starts, next_page = _window(start, end, width_name, _one(query, "page"), _one(query, "limit"))
    group_by = _values(query, "group_by")
    bad = [g for g in group_by if g not in _ANTHROPIC_GROUPS]
    if bad:
        raise ReportError(f"group_by: unknown value(s) {bad}")
    rows = _anthropic_rows(bills)
    if models := _values(query, "models"):
        rows = rows.filter(pl.col("model").is_in(models))
    if tiers := _values(query, "service_tiers"):
        rows = rows.filter(pl.col("service_tier").is_in(tiers))
    rows = _in_buckets(rows, starts, WIDTHS[width_name])
    data = []
    for s in starts:
        part = rows.filter(pl.col("bucket") == s)
        results = []
        if part.height:
            keys = group_by or [pl.lit(0).alias("_all")]
            agg = part.group_by(keys, maintain_order=True).agg(
                (pl.col("input_tokens") - pl.col("cache_read") - pl.col("cache_write"))
                .sum()
                .alias("uncached"),
                pl.col("cache_read").sum(),
                pl.col("cache_write").sum(),
                pl.col("output_tokens").sum(),
            )
            for r in agg.iter_rows(named=True):
                result: dict[str, Any] = {g: (r.get(g) if g in group_by else None)
                                          for g in _ANTHROPIC_GROUPS}  # fmt: skip
                result.update(
                    uncached_input_tokens=r["uncached"],
                    cache_read_input_tokens=r["cache_read"],
                    cache_creation={
                        "ephemeral_1h_input_tokens": 0,
                        "ephemeral_5m_input_tokens": r["cache_write"],
                    },
                    output_tokens=r["output_tokens"],
                    server_tool_use={"web_search_requests": 0},
                )
                results.append(result)
        width = WIDTHS[width_name]
        data.append({"starting_at": _iso(s), "ending_at": _iso(s + width), "results": results})
    return {"data": data, "has_more": next_page is not None, "next_page": next_page}


def anthropic_costs(bills: pl.DataFrame, query: dict[str, list[str]], now: float) -> dict:
    """``GET /v1/organizations/cost_report`` (``1d``): amounts as decimal strings of cents;
    grouped by ``description``, one result per model, tier and token type."""
    start = _parse_iso(_one(query, "starting_at"), "starting_at")
    end_text = _one(query, "ending_at")
    end = _parse_iso(end_text, "ending_at") if end_text else now
    width_name = _one(query, "bucket_width") or "1d"
    if width_name != "1d":
        raise ReportError("bucket_width: only 1d is supported")
    starts, next_page = _window(start, end, "1d", _one(query, "page"), _one(query, "limit"))
    by_description = "description" in _values(query, "group_by")
    rows = _in_buckets(_anthropic_rows(_priced(bills, "anthropic")), starts, WIDTHS["1d"])
    types = {"input": "uncached_input_tokens", "cached": "cache_read_input_tokens",
             "write": "cache_creation.ephemeral_5m_input_tokens", "output": "output_tokens"}  # fmt: skip
    data = []
    for s in starts:
        part = rows.filter(pl.col("bucket") == s)
        results = []
        if part.height and by_description:
            sums = part.group_by(["model", "service_tier", "context_window"],
                                 maintain_order=True).agg(
                *(pl.col(f"usd_{k}").sum() for k in types)
            )  # fmt: skip
            for r in sums.iter_rows(named=True):
                for k, token_type in types.items():
                    usd = r[f"usd_{k}"]
                    if not usd:
                        continue
                    results.append({
                        "amount": _cents(usd), "currency": "USD", "cost_type": "tokens",
                        "description": f"{r['model']} {token_type} ({r['service_tier']})",
                        "model": r["model"], "service_tier": r["service_tier"],
                        "token_type": token_type, "context_window": r["context_window"],
                        "workspace_id": None, "inference_geo": None,
                    })  # fmt: skip
        elif part.height:
            total = float(part.select(pl.sum_horizontal(pl.col("^usd_.*$")).sum()).item())
            results.append({
                "amount": _cents(total), "currency": "USD", "cost_type": None,
                "description": None, "model": None, "service_tier": None, "token_type": None,
                "context_window": None, "workspace_id": None, "inference_geo": None,
            })  # fmt: skip
        data.append({"starting_at": _iso(s), "ending_at": _iso(s + 86_400), "results": results})
    return {"data": data, "has_more": next_page is not None, "next_page": next_page}


def _cents(usd: float) -> str:
    return f"{usd * 100:.6f}"
