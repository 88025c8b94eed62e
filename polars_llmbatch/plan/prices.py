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

import polars as pl

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers import Provider

__all__ = ["Price", "check_model", "cost_expr", "lookup_price", "model_hint"]

_KEYS = ("input", "output", "batch_input", "batch_output")
#: Every rate a price carries (USD per 1M tokens), sync then batch. A cache read or write
#: rate that is unknown is priced as plain input: never below what can be billed.
RATES = (
    "input",
    "output",
    "cached_input",
    "cache_write",
    "batch_input",
    "batch_output",
    "batch_cached_input",
    "batch_cache_write",
)


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
    cache_write: float | None = None
    batch_cache_write: float | None = None
    #: Long-context tiers: ``{"above": N, <rate>: ...}``, ascending. A request whose input
    #: tokens exceed ``above`` pays that tier's rates on all its tokens (the providers' "cliff").
    tiers: tuple[dict[str, float | None], ...] = ()

    @property
    def known(self) -> bool:
        return self.input is not None and self.batch_input is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Price:
        """The price :meth:`to_dict` wrote (a checkpoint's record of it)."""
        return cls(
            **{name: d.get(name) for name in RATES},
            source=str(d.get("source", "")),
            as_of=str(d.get("as_of", "")),
            tiers=tuple(dict(t) for t in d.get("tiers") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {name: getattr(self, name) for name in RATES}
        d["tiers"] = [dict(t) for t in self.tiers]
        d["source"] = self.source
        d["as_of"] = self.as_of
        return d


def tiers_of(price: dict[str, Any]) -> list[dict[str, Any]]:
    """The base rates (``above`` 0) and every tier of a price in its ``to_dict`` form. An
    unknown cache-read rate is the plain input rate (a cache hit never costs more); an
    unknown cache-write rate stays unknown (writes cost more than input, by how much the
    price list must say)."""
    levels = [{"above": 0, **{k: price.get(k) for k in RATES}}]
    levels += sorted((dict(t) for t in price.get("tiers") or []), key=lambda t: t["above"])
    for level in levels:
        for prefix in ("", "batch_"):
            if level.get(prefix + "cached_input") is None:
                level[prefix + "cached_input"] = level.get(prefix + "input")
    return levels


#: The modes billed at batch rates: batch itself, and flex (sync calls at batch prices).
HALF_PRICE_MODES = frozenset({"batch", "flex"})


def cost_expr(
    price: dict[str, Any],
    *,
    batch: pl.Expr | bool,
    input_tokens: pl.Expr,
    output_tokens: pl.Expr,
    cache_read: pl.Expr | None = None,
    cache_write: pl.Expr | None = None,
) -> pl.Expr:
    """USD of one request's tokens at the rate it was paid: ``input_tokens`` is its whole
    input (cache reads and writes included), which also picks its price tier; each token class
    at its own rate, batch or sync by ``batch``. Where the price list lacks a rate it is not
    guessed: cache reads without a rate are priced at the input rate (they never cost more),
    cache writes without one make the cost unknown (null), as does a missing input or output
    rate for tokens of that class.

    Example:
        >>> import polars as pl
        >>> price = {"input": 2.0, "output": 8.0, "batch_input": 1.0, "batch_output": 4.0,
        ...          "tiers": [{"above": 100, "input": 4.0, "output": 16.0,
        ...                     "batch_input": 2.0, "batch_output": 8.0}]}
        >>> df = pl.DataFrame({"i": [100, 101], "o": [10, 10]})
        >>> df.select(cost_expr(price, batch=True, input_tokens=pl.col("i"),
        ...                     output_tokens=pl.col("o")) * 1e6).to_series().round(6).to_list()
        [140.0, 282.0]
    """
    read = pl.lit(0) if cache_read is None else cache_read.fill_null(0)
    write = pl.lit(0) if cache_write is None else cache_write.fill_null(0)
    inp = input_tokens.fill_null(0)
    out = output_tokens.fill_null(0)
    plain = (inp - read - write).clip(lower_bound=0)
    is_batch = pl.lit(batch) if isinstance(batch, bool) else batch

    def rate(level: dict[str, Any], name: str, instead: str | None = None) -> pl.Expr:
        def one(key: str) -> pl.Expr:
            value = level.get(key)
            if value is None and instead is not None:
                value = level.get(key.replace(name, instead))
            return pl.lit(float(value) if value is not None else None, pl.Float64)

        return pl.when(is_batch).then(one("batch_" + name)).otherwise(one(name))

    def part(tokens: pl.Expr, r: pl.Expr) -> pl.Expr:
        # no tokens of a class cost nothing, whatever its rate; tokens without a rate: unknown
        return pl.when(tokens == 0).then(pl.lit(0.0)).otherwise(tokens * r)

    def at(level: dict[str, Any]) -> pl.Expr:
        return (
            part(plain, rate(level, "input"))
            + part(read, rate(level, "cached_input", instead="input"))
            + part(write, rate(level, "cache_write"))
            + part(out, rate(level, "output"))
        ) / 1e6

    levels = tiers_of(price)
    cost = at(levels[0])
    for level in levels[1:]:
        cost = pl.when(inp > level["above"]).then(at(level)).otherwise(cost)
    return cost


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
            f"unknown {provider.name} model {model!r} in genai-prices{model_hint(provider, model)}",
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
    source = f"genai-prices {version} ({pid}/{info.id})"
    derived = batch == sync  # no batch variant modelled: the providers' documented 50%
    if derived:
        source += ", batch = 50% of sync (derived)"
    levels = sorted({0, *_starts(sync), *_starts(batch)})
    rates = []
    for above in levels:
        r = {name: _mtok(sync, field, above) for name, field in _FIELDS.items()}
        for name, field in _FIELDS.items():
            value = _mtok(batch, field, above)
            if derived:
                value = r[name] / 2 if r[name] is not None else None
                if name == "cached_input" and not provider.batch_halves_cache_hits:
                    value = r[name]
            r["batch_" + name] = value
        rates.append((above, r))
    base = rates[0][1]
    return Price(
        base["input"],
        base["output"],
        base["batch_input"],
        base["batch_output"],
        source,
        now.date().isoformat(),
        info.context_window,
        base["cached_input"],
        base["batch_cached_input"],
        base["cache_write"],
        base["batch_cache_write"],
        tiers=tuple({"above": above, **r} for above, r in rates[1:]),
    )


#: Our rate names → genai-prices' fields.
_FIELDS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
}


def _starts(price: Any) -> set[int]:
    return {
        int(t.start)
        for field in _FIELDS.values()
        for t in getattr(getattr(price, field, None), "tiers", None) or []
    }


def _mtok(price: Any, field: str, above: int = 0) -> float | None:
    """The rate of ``field`` for a request of more than ``above`` input tokens (the highest
    tier whose start it passes; the base below every tier)."""
    value = getattr(price, field, None)
    if value is None:
        return 0.0 if field == "output_mtok" else None
    if not hasattr(value, "base"):
        return float(value)
    rate = value.base
    for tier in value.tiers:
        if above >= tier.start:
            rate = tier.price
    return float(rate)


def _catalogue(provider: Provider) -> list[str]:
    try:
        import genai_prices
    except ImportError:  # pragma: no cover - a dependency
        return []
    snapshot = genai_prices.data_snapshot.get_snapshot()
    for p in snapshot.providers:
        if p.id == provider.prices_id:
            return [m.id for m in p.models]
    return []


def model_hint(provider: Provider, model: str) -> str:
    """``"; did you mean 'gpt-4o-mini'?"`` from the price catalogue's model names, or ``""``."""
    import difflib

    close = difflib.get_close_matches(model, _catalogue(provider), n=3, cutoff=0.75)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_model(
    provider: Provider, model: str, task: str, prices: Mapping[str, float] | None = None
) -> None:
    """Refuse, before anything is sent, a model the price catalogue does not know (a typo,
    most often: a fine-tuned or brand-new model is run by giving its ``prices=``), and a
    model of the wrong kind (an embedding model asked to generate, or the reverse).

    Example:
        >>> from polars_llmbatch.providers import get_provider
        >>> check_model(get_provider("openai"), "gpt-4o-mnii", "generate")
        Traceback (most recent call last):
        ...
        polars_llmbatch.errors.LlmBatchError: unknown openai model 'gpt-4o-mnii' (not in genai-prices); did you mean 'gpt-4o-mini' ...
    """
    if not isinstance(model, str) or not model:
        return  # the spec refuses it, with its own message
    embedding = "embed" in model.lower()
    if task == "generate" and embedding:
        raise LlmBatchError(
            f"{provider.name} model {model!r} is an embedding model; use df.llm.embed(...) "
            "for embeddings, or a chat model for df.llm.batch(...)"
        )
    if task == "embed" and not embedding and prices is None:
        raise LlmBatchError(
            f"{provider.name} model {model!r} is not an embedding model; pick one such as "
            "'text-embedding-3-small' (openai) or 'gemini-embedding-001' (gemini)"
        )
    if prices is None and _from_genai_prices(provider, model) is None:
        raise LlmBatchError(
            f"unknown {provider.name} model {model!r} (not in genai-prices)"
            f"{model_hint(provider, model)} For a model the catalogue does not know "
            "(fine-tuned, brand new), pass its prices: prices={'input': ..., 'output': ...} "
            "(USD per 1M tokens)"
        )
