"""Model prices (USD per million tokens) at sync and batch rates, from genai-prices or the caller.

genai-prices models batch rates for many models (``price_context={"processing": "batch"}``);
where it has none, the batch rate is derived as 50% of sync, which is the documented discount at
OpenAI, Anthropic and Gemini (reference/providers.md §5), and the price says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers import Provider

__all__ = ["Price", "lookup_price"]

_KEYS = ("input", "output", "batch_input", "batch_output")


@dataclass(frozen=True)
class Price:
    """Per-million-token prices. ``None`` fields are unknown.

    ``cached_input`` / ``batch_cached_input`` are the rates of input tokens served from the
    provider's prompt cache (sync and batch), where the provider has one.
    """

    input: float | None
    output: float | None
    batch_input: float | None
    batch_output: float | None
    source: str
    as_of: str
    context_window: int | None = None
    cached_input: float | None = None
    batch_cached_input: float | None = None

    @property
    def known(self) -> bool:
        return self.input is not None and self.batch_input is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "batch_input": self.batch_input,
            "batch_output": self.batch_output,
            "cached_input": self.cached_input,
            "batch_cached_input": self.batch_cached_input,
            "source": self.source,
            "as_of": self.as_of,
        }


def check_override(prices: Mapping[str, float] | None) -> None:
    """Refuse a malformed ``prices=`` before any data is read."""
    if prices is None:
        return
    unknown = sorted(set(prices) - set(_KEYS))
    bad = [k for k, v in prices.items() if not isinstance(v, (int, float)) or v < 0]
    if unknown or "input" not in prices or bad:
        raise LlmBatchError(
            f"prices= takes keys {list(_KEYS)} with non-negative numbers (USD per 1M tokens; "
            f"'input' required), got {dict(prices)}"
        )


def lookup_price(
    provider: Provider, model: str, prices: Mapping[str, float] | None = None
) -> Price:
    """Prices for ``model``: the caller's ``prices=`` override, else genai-prices.

    ``prices`` takes ``input`` and ``output`` (sync, USD per 1M tokens) and optionally
    ``batch_input`` / ``batch_output`` (default: half of sync). Without ``output`` the output
    price is unknown (fine for embeddings, which have no output).

    Example:
        >>> from polars_llmbatch.providers import get_provider
        >>> p = lookup_price(get_provider("openai"), "my-ft", {"input": 0.3, "output": 1.2})
        >>> p.batch_input, p.batch_output, p.source
        (0.15, 0.6, 'prices= override')
    """
    today = dt.date.today().isoformat()
    found = _from_genai_prices(provider, model)
    if prices is not None:
        check_override(prices)
        inp = float(prices["input"])
        out = float(prices["output"]) if "output" in prices else None
        b_out = prices.get("batch_output", out / 2 if out is not None else None)
        return Price(
            inp,
            out,
            float(prices.get("batch_input", inp / 2)),
            float(b_out) if b_out is not None else None,
            "prices= override",
            today,
            found.context_window if found else None,
        )
    if found is None:
        return Price(
            None,
            None,
            None,
            None,
            f"unknown {provider.name} model {model!r} in genai-prices",
            today,
        )
    return found


def _from_genai_prices(provider: Provider, model: str) -> Price | None:
    try:
        import genai_prices
    except ImportError:  # pragma: no cover - a dependency
        return None
    pid = provider.prices_id
    version = metadata.version("genai-prices")
    try:
        snapshot = genai_prices.data_snapshot.get_snapshot()
        _provider, info = snapshot.find_provider_model(model, None, pid, None)
    except LookupError:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    sync = info.get_prices(now)
    batch = info.get_prices(now, {"processing": "batch"})
    inp, out = _mtok(sync, "input_mtok"), _mtok(sync, "output_mtok")
    b_inp, b_out = _mtok(batch, "input_mtok"), _mtok(batch, "output_mtok")
    cached, b_cached = _mtok(sync, "cache_read_mtok"), _mtok(batch, "cache_read_mtok")
    source = f"genai-prices {version} ({pid}/{info.id})"
    if batch == sync:  # no batch variant modelled: the providers' documented 50%
        b_inp = inp / 2 if inp is not None else None
        b_out = out / 2 if out is not None else None
        if cached is not None and provider.batch_halves_cache_hits:
            b_cached = cached / 2
        source += ", batch = 50% of sync (derived)"
    return Price(
        inp,
        out,
        b_inp,
        b_out,
        source,
        now.date().isoformat(),
        info.context_window,
        cached,
        b_cached,
    )


def _mtok(price: Any, field: str) -> float | None:
    value = getattr(price, field, None)
    if value is None:
        return 0.0 if field == "output_mtok" else None
    base = getattr(value, "base", value)  # tiered (long-context) prices: the base tier
    return float(base)
