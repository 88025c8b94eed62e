"""What a job will cost before anything is sent: tokens × prices, at batch and at sync rates."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import polars as pl

from polars_llmbatch._json import dumps
from polars_llmbatch.errors import BudgetExceededError, LlmBatchError, RequestTooLargeError
from polars_llmbatch.plan.calibrate import SAMPLE as CALIBRATE_SAMPLE
from polars_llmbatch.plan.calibrate import Counter, calibrate
from polars_llmbatch.plan.prices import HALF_PRICE_MODES, Price, lookup_price, model_hint, tiers_of
from polars_llmbatch.plan.shards import Shard, Source, plan
from polars_llmbatch.plan.tokens.counting import count_texts, sample_positions, scale_sample
from polars_llmbatch.plan.tokens.encodings import encoding_source, get_encoding
from polars_llmbatch.providers import TokenRule

__all__ = ["EXACT_THRESHOLD", "Estimate", "estimate"]

#: Up to this many unique requests, input tokens are counted exactly; above it, from a sample
#: (unless ``exact=True``).
EXACT_THRESHOLD = 20_000
SAMPLE_SIZE = 10_000


@dataclass(frozen=True)
class Estimate:
    """Tokens and cost of a job, computed offline before anything is sent.

    ``input_tokens_error`` is the half-width of the input-token range: the sample's 95% interval,
    plus the tokenizer approximation band for providers without an offline tokenizer.
    ``output_tokens_worst`` is ``None`` when no ``max_output_tokens`` bounds it ("unbounded").
    Costs are USD; ``None`` where a price or a token figure is unknown.

    Example:
        >>> import polars as pl, polars_llmbatch
        >>> df = pl.DataFrame({"body": ["refund me", "app crashes", None]})
        >>> est = df.llm.estimate("Classify: {body}", provider="openai", model="gpt-4o-mini",
        ...                       output=["billing", "bug"], max_output_tokens=10)
        >>> est.rows, est.skipped_rows, est.unique_requests, est.output_tokens_worst
        (3, 1, 2, 20)
    """

    provider: str
    model: str
    endpoint: str
    task: str
    rows: int
    skipped_rows: int
    unique_requests: int
    shards: int
    input_tokens: float
    input_tokens_error: float
    input_method: str
    sampled: int | None
    output_tokens_expected: float | None
    output_tokens_worst: int | None
    max_output_tokens: int | None
    price: Price
    token_source: str
    notes: tuple[str, ...] = field(default=())
    cacheable_prefix_tokens: int = 0
    #: The upper bound of every request's input tokens, summed (what ``worst_cost_*`` price).
    input_tokens_worst: float = 0.0
    #: How requests fall into the price's long-context tiers: per tier (from the base up),
    #: ``(above, requests, input tokens)`` by expected size, then the same by worst-case size.
    tier_use: tuple[tuple[float, int, float, int, float], ...] = ()
    #: What calibration measured (:class:`.calibrate.Calibration` as a dict), or None.
    calibration: dict[str, Any] | None = None
    #: The half-width of the expected output's 95% interval (from a pilot; 0 otherwise).
    output_tokens_error: float = 0.0
    #: What the pilot showed (:class:`polars_llmbatch.run.pilot.Pilot` as a dict), or None.
    pilot: dict[str, Any] | None = None

    # costs --------------------------------------------------------------------------------
    def _cost(self, out_per_request: float | None, batch: bool, *, worst: bool) -> float | None:
        """Input plus ``out_per_request`` output tokens per request, each request at the
        rates of the tier its input falls in (expected or worst-case size)."""
        prefix = "batch_" if batch else ""
        levels = tiers_of(self.price.to_dict())
        n = self.unique_requests
        uses = self.tier_use or (
            (0.0, n, self.input_tokens, n, self.input_tokens + self.input_tokens_error),
        )
        if out_per_request is None:
            return None
        total = 0.0
        for level, (_above, n_exp, in_exp, n_worst, in_worst) in zip(levels, uses, strict=False):
            n, inp = (n_worst, in_worst) if worst else (n_exp, in_exp)
            p_in, p_out = level.get(prefix + "input"), level.get(prefix + "output")
            if p_in is None or (p_out is None and out_per_request and n):
                return None
            total += inp * p_in + n * out_per_request * (p_out or 0.0)
        return total / 1e6

    def _per_request(self, total: float | None) -> float | None:
        if total is None:
            return None
        return total / self.unique_requests if self.unique_requests else 0.0

    @property
    def cost_batch(self) -> float | None:
        """Expected cost at batch rates (input plus expected output)."""
        return self._cost(self._per_request(self.output_tokens_expected), True, worst=False)

    @property
    def cost_sync(self) -> float | None:
        """Expected cost of the same requests at sync (standard) rates."""
        return self._cost(self._per_request(self.output_tokens_expected), False, worst=False)

    @property
    def worst_cost_batch(self) -> float | None:
        """Upper bound at batch rates: every request's input at the top of its range (a
        sampled count is bounded by the texts' bytes: a token is at least one byte), every
        output at the cap, each request at the price tier that size falls in.

        ``math.inf`` when output is unbounded (no ``max_output_tokens``).
        """
        if self.output_tokens_worst is None:
            return math.inf if self.price.known else None
        return self._cost(self._per_request(self.output_tokens_worst), True, worst=True)

    @property
    def worst_cost_sync(self) -> float | None:
        if self.output_tokens_worst is None:
            return math.inf if self.price.known else None
        return self._cost(self._per_request(self.output_tokens_worst), False, worst=True)

    @property
    def input_cost_batch(self) -> float | None:
        return self._cost(0.0, True, worst=False)

    @property
    def cost_batch_cached(self) -> float | None:
        """Best case at batch rates if the provider serves the shared prefix (the constant system
        prompt) from its prompt cache for every request but the first. Caching is automatic at
        OpenAI and Gemini above a minimum prefix length, but never guaranteed; ``None`` where it
        does not apply."""
        full = self.cost_batch
        rate, base = self.price.batch_cached_input, self.price.batch_input
        if not self.cacheable_prefix_tokens or full is None or rate is None or base is None:
            return None
        cached = self.cacheable_prefix_tokens * max(self.unique_requests - 1, 0)
        return full - cached * (base - rate) / 1e6

    @property
    def cost_batch_error(self) -> float | None:
        """The half-width of the expected batch cost's 95% interval, from the input and
        output intervals at the base tier's rates (0 when both figures are exact)."""
        rate_in, rate_out = self.price.batch_input, self.price.batch_output
        if rate_in is None or (self.output_tokens_error and rate_out is None):
            return None
        return (
            self.input_tokens_error * rate_in + self.output_tokens_error * (rate_out or 0.0)
        ) / 1e6

    @property
    def savings(self) -> float | None:
        """What batch saves over sync on the expected cost (or on input alone if output is unknown)."""
        sync, batch = self.cost_sync, self.cost_batch
        if sync is None or batch is None:
            sync, batch = self._cost(0.0, False, worst=False), self.input_cost_batch
        if sync is None or batch is None:
            return None
        return sync - batch

    def check_budget(self, max_cost: float | None, mode: str = "batch") -> None:
        """Raise :class:`BudgetExceededError` if the worst case is over ``max_cost`` USD."""
        if max_cost is None:
            return
        check_max_cost(max_cost)
        worst = self.worst_cost_batch if mode in HALF_PRICE_MODES else self.worst_cost_sync
        if worst is None:
            raise LlmBatchError(
                f"max_cost={_usd(max_cost)} cannot be checked: no price is known for "
                f"{self.provider} model {self.model!r}; pass prices={{'input': ..., 'output': ...}}"
                " (USD per 1M tokens)"
            )
        if worst > max_cost:
            if math.isinf(worst):
                raise BudgetExceededError(
                    f"max_cost={_usd(max_cost)} cannot be guaranteed: output is unbounded; pass "
                    "max_output_tokens=... to cap every answer"
                )
            basis = (
                f"{self.max_output_tokens:,} max output tokens"
                if self.max_output_tokens is not None
                else "input only"
            )
            raise BudgetExceededError(
                f"worst-case cost {_usd(worst)} ({self.unique_requests:,} requests, {basis}, "
                f"at {mode} rates) is over "
                f"max_cost={_usd(max_cost)}; lower max_output_tokens, filter rows or raise max_cost"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        """The estimate :meth:`to_dict` wrote (a checkpoint's record of it); the costs are
        computed again from its figures and prices.

        Example:
            >>> import polars as pl, polars_llmbatch
            >>> est = pl.DataFrame({"b": ["x"]}).llm.estimate("{b}", provider="openai",
            ...                                              model="gpt-4o-mini")
            >>> again = Estimate.from_dict(est.to_dict())
            >>> again.to_dict() == est.to_dict(), repr(again) == repr(est)
            (True, True)
        """
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["price"] = Price.from_dict(d["price"])
        kw["notes"] = tuple(d.get("notes") or ())
        kw["tier_use"] = tuple(tuple(t) for t in d.get("tier_use") or ())
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Every figure as plain, strict-JSON data; an unbounded worst case is ``None`` with
        ``"output_unbounded": True``."""
        d = asdict(self)
        d["price"] = self.price.to_dict()
        d["notes"] = list(self.notes)
        for name in (
            "cost_batch",
            "cost_sync",
            "worst_cost_batch",
            "worst_cost_sync",
            "input_cost_batch",
            "cost_batch_cached",
            "cost_batch_error",
            "savings",
        ):
            value = getattr(self, name)
            d[name] = None if value is not None and math.isinf(value) else value
        d["output_unbounded"] = self.output_tokens_worst is None
        return d

    # display ------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str]]:
        skipped = f" ({self.skipped_rows:,} skipped: null input)" if self.skipped_rows else ""
        err = ""
        if self.input_tokens_error:
            pct = self.input_tokens_error / self.input_tokens if self.input_tokens else 0
            err = f" ± {self.input_tokens_error:,.0f} ({pct:.1%})"
        how = self.input_method
        if self.sampled:
            how = f"sample of {self.sampled:,}; {how}"
        if self.task == "embed":
            out = "none (embeddings)"
        else:
            spread = f" ± {self.output_tokens_error:,.0f}" if self.output_tokens_error else ""
            out_exp = (
                f"{self.output_tokens_expected:,.0f}{spread} expected"
                if self.output_tokens_expected is not None
                else "expected unknown (pass expected_output_tokens= or pilot=)"
            )
            out_worst = (
                f"{self.output_tokens_worst:,} worst ({self.unique_requests:,} × "
                f"{self.max_output_tokens:,})"
                if self.output_tokens_worst is not None
                else "worst unbounded (set max_output_tokens)"
            )
            out = f"{out_exp} · {out_worst}"
        if self.cost_batch is not None:
            saves = f" · saves {_usd(self.savings)}" if self.savings else ""
            cost_err = self.cost_batch_error
            within = f" ± {_usd(cost_err)}" if cost_err else ""
            expected = f"batch {_usd(self.cost_batch)}{within} · sync {_usd(self.cost_sync)}{saves}"
        elif self.input_cost_batch is not None:
            expected = (
                f"unknown (output length unknown); input alone: batch "
                f"{_usd(self.input_cost_batch)} · sync {_usd(self._cost(0.0, False, worst=False))}"
            )
        else:
            expected = "unknown (no price)"
        rows = [
            ("job", f"{self.provider} · {self.model} · {self.endpoint}"),
            ("rows", f"{self.rows:,}{skipped}"),
            ("requests", f"{self.unique_requests:,} unique in {self.shards:,} shard(s)"),
            ("input tokens", f"{self.input_tokens:,.0f}{err} [{how}]"),
            ("output tokens", out),
            ("cost, expected", expected),
            *(
                [
                    (
                        "cost, cached prefix",
                        f"batch {_usd(self.cost_batch_cached)} if the {self.cacheable_prefix_tokens:,}"
                        "-token shared prefix is served from the prompt cache (best case)",
                    )
                ]
                if self.cost_batch_cached is not None
                else []
            ),
            (
                "cost, worst case",
                f"batch {_usd(self.worst_cost_batch)} · sync {_usd(self.worst_cost_sync)}",
            ),
            *([("pilot", _pilot_line(self.pilot))] if self.pilot else []),
            ("prices", f"{self.price.source}, as of {self.price.as_of}"),
            ("tokenizer", self.token_source),
        ]
        rows += [("note", n) for n in self.notes]
        return rows

    def __repr__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(["Estimate"] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return f"<table><caption>Estimate</caption>{body}</table>"


def _pilot_line(p: dict[str, Any]) -> str:
    cost = _usd(p.get("cost"))
    if p.get("output_max") is not None:
        out = (
            f"output P50 {p['output_p50']:,.0f} · P95 {p['output_p95']:,.0f} · max "
            f"{p['output_max']:,} tokens"
        )
    else:
        out = "no answers"
    return (
        f"{p['requests']:,} requests at sync rates for {cost}: {out}; cut at max_output_tokens "
        f"{p['cut']:.0%} · failed {p['failed']:.0%} · invalid output {p['invalid']:.0%}"
    )


def check_max_cost(max_cost: Any) -> None:
    """Refuse a ``max_cost`` that cannot bound anything: not a number, NaN, infinite or
    negative (a NaN compares false with everything, so it would let any cost through)."""
    if max_cost is None:
        return
    if (
        isinstance(max_cost, bool)
        or not isinstance(max_cost, (int, float))
        or not math.isfinite(max_cost)
        or max_cost < 0
    ):
        raise LlmBatchError(
            f"max_cost= must be a finite, non-negative number of USD (or None for no budget), "
            f"got {max_cost!r}"
        )


def _usd(x: float | None) -> str:
    """``$1,234.57``, ``$0.0123``, ``$0.0000001``: every non-zero amount shows its first
    significant digits (a budget of a ten-millionth of a dollar never prints as ``$0``)."""
    if x is None:
        return "unknown"
    if math.isinf(x):
        return "unbounded"
    if x >= 1:
        return f"${x:,.2f}"
    if not x:
        return "$0"
    digits = max(6, 2 - math.floor(math.log10(abs(x))))
    return f"${x:.{digits}f}".rstrip("0").rstrip(".")


class Planned(NamedTuple):
    """What :func:`estimate` works out: the estimate, the shard plan, and each request's
    worst-case input tokens (a bound, aligned with ``prepared.requests``)."""

    estimate: Estimate
    shards: list[Shard]
    worst_tokens: pl.Series


def estimate(
    source: Source,
    *,
    exact: bool = False,
    prices: dict[str, float] | None = None,
    expected_output_tokens: float | None = None,
    max_shard_requests: int | None = None,
    max_shard_bytes: int | None = None,
    max_shard_tokens: int | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    count: Counter | None = None,
    calibrate_sample: int = CALIBRATE_SAMPLE,
    pilot: dict[str, Any] | None = None,
) -> Planned:
    """Count tokens, price them and plan the shards of ``source`` (requests in memory, or
    streamed from disk: the same figures either way); with ``count`` (the
    provider's count endpoint, :func:`.calibrate.remote_counter`), calibrate the input tokens
    on ``calibrate_sample`` requests (:mod:`.calibrate`)."""
    spec, prov = source.spec, source.provider
    rule = prov.token_rule(spec)
    enc = get_encoding(rule.encoding)
    price = lookup_price(prov, spec.model, prices)
    n = source.n_requests
    texts = source.text_columns
    notes: list[str] = []

    # Constant parts are counted once and multiplied; per-row texts are counted (or sampled).
    per_request, prefix = _constant_tokens(source, rule)
    cache_min = prov.auto_cache_min_tokens(spec)
    cacheable = int(prefix) if cache_min is not None and prefix >= cache_min else 0
    counted = exact or n <= EXACT_THRESHOLD
    cap = _context_cap(source, rule, price.context_window, per_request)
    # One pass over the requests, a piece at a time (one piece in memory, a bucket at a time
    # when streamed): every sum below is of whole numbers, so it is the same however cut.
    variable = 0.0
    col_chars = dict.fromkeys(texts, 0)
    expected_parts: list[pl.Series] = []
    worst_parts: list[pl.Series] = []
    chars_parts: list[pl.Series] = []
    over: list[pl.DataFrame] = []
    # a sampled count reads the texts' sizes only (and the texts of the sample, below)
    stats = ["row", "bytes", *(f"chars_{c}" for c in texts)]
    offset = 0
    for piece in source.pieces([*texts, *stats] if counted else stats):
        if cap is not None:
            over.append(_over_context(source, piece, offset, rule, cap, per_request))
        offset += piece.height
        if counted:
            tokens = None
            for col in texts:
                c = count_texts(piece[col], rule.encoding)
                variable += float(c.sum())
                tokens = c if tokens is None else tokens + c
            assert tokens is not None
            t = tokens.cast(pl.Float64)
            expected_parts.append(t * rule.ratio + per_request)
            worst_parts.append((t * rule.ratio + per_request) * (1.0 + rule.band) + rule.slack)
        else:
            for col in texts:
                col_chars[col] += int(piece[f"chars_{col}"].sum())
            chars_parts.append(sum(piece[f"chars_{c}"].cast(pl.Float64) for c in texts))
            nbytes = piece["bytes"].cast(pl.Float64)
            worst_parts.append((nbytes * rule.ratio + per_request) * (1.0 + rule.band) + rule.slack)
    _refuse_over_context(source, over, spec.model, cap, rule)
    sampling_error = 0.0
    if not counted:
        # the sample is drawn over the whole request order, as :func:`sample_count` draws it
        sample = (
            source.gather(sample_positions(n, sample_size, seed), texts)
            if n > sample_size
            else None
        )
        for col in texts:
            if sample is None:  # no more requests than the sample: every one is counted
                variable += float(sum(c.sum() for c in _counts(source, col, rule.encoding)))
                continue
            scaled = scale_sample(
                sample[col], rule.encoding, total_chars=col_chars[col], population=n
            )
            variable += scaled.total
            sampling_error += scaled.ci95
        total_chars = float(sum(float(c.sum()) for c in chars_parts)) or 1.0
        expected_parts = [
            c * (variable / total_chars) * rule.ratio + per_request for c in chars_parts
        ]
    input_tokens = rule.ratio * variable + per_request * n
    error = rule.ratio * sampling_error + rule.band * input_tokens + rule.slack * n
    calibrating = count is not None and n > 0 and prov.can_count(spec)
    if rule.band and not calibrating:
        notes.append(
            f"{spec.provider} has no offline tokenizer: input tokens are approximate "
            f"(±{rule.band:.0%})"
        )
    if not counted:
        notes.append(
            "sampled count: the worst case bounds every request by its text's bytes "
            "(exact=True, or max_cost=, counts every request for a tighter bound)"
        )
    # Each request's size: expected, and its upper bound. A counted request is bounded by its
    # count (within the tokenizer's band); a sampled one by its bytes (a token is at least
    # one byte), which is a bound where a sample's interval is not.
    expected_each = _concat(expected_parts)
    worst_each = _concat(worst_parts).ceil()

    calibration = None
    method = rule.method
    if calibrating:
        cal = calibrate(
            lambda at: source.gather(at, ["body"])["body"].to_list(),
            expected_each,
            worst_each,
            count,
            sample=calibrate_sample,
            seed=seed,
        )
        calibration = cal.to_dict()
        offline = float(expected_each.sum())
        expected_each = expected_each * (cal.total / offline if offline else 1.0)
        if cal.worst_factor > 1.0:
            worst_each = (worst_each * cal.worst_factor).ceil()
            notes.append(
                f"the provider counted a sampled request {cal.worst_factor - 1:.1%} above its "
                "offline upper bound: every request's bound (the worst case) is raised by that"
            )
        input_tokens, error = cal.total, cal.ci95
        what = "every request" if cal.exact else f"a stratified sample of {cal.requests:,}"
        method = (
            f"calibrated: {what} counted by {spec.provider}'s token-count endpoint, "
            f"{cal.ratio:.3f}× the offline approximation ({rule.method})"
        )
    elif count is not None and n:
        notes.append(
            f"calibrate: {spec.provider} has no token-count endpoint for this request"
            + (
                " (its tokenizer is public: the offline count is the count)"
                if not rule.band
                else ""
            )
        )

    tokens_per_request = None
    if max_shard_tokens is not None:
        # Queue limits are hard: plan on the top of each request's range, not its midpoint.
        tokens_per_request = worst_each.cast(pl.Int64)
    shards = plan(
        source,
        max_requests=max_shard_requests,
        max_bytes=max_shard_bytes,
        max_tokens=max_shard_tokens,
        tokens=tokens_per_request,
    )

    out_error = 0.0
    from_pilot = (
        pilot is not None
        and pilot.get("output_mean") is not None
        and expected_output_tokens is None
        and prov.output_tokens(spec) is None
    )
    if not from_pilot:
        out_expected = _expected_output(source, rule.ratio, enc, expected_output_tokens, notes)
    else:
        assert pilot is not None
        k = pilot["answered"]
        out_expected = pilot["output_mean"] * n
        # the mean's interval, scaled to the job's n requests (finite-population corrected)
        out_error = (pilot["output_ci95"] or 0.0) * n * math.sqrt(max(0.0, 1 - k / max(n, 1)))
        notes.append(
            f"expected output: the pilot's mean of {pilot['output_mean']:,.1f} tokens per "
            f"request over {k:,} answers (reasoning included)"
        )
    if pilot is not None:
        notes.append(
            f"the pilot's {pilot['requests']:,} answers are reused by the batch (paid once, at "
            "sync rates)"
        )
    cap = spec.max_output_tokens
    out_worst = 0 if spec.task == "embed" else (cap * n if cap is not None else None)
    if out_expected is not None and out_worst is not None:
        out_expected = min(out_expected, float(out_worst))
    if not price.known:
        notes.append(
            f"no price for {spec.provider} model {spec.model!r} (unknown to genai-prices"
            f"{model_hint(prov, spec.model)}): costs are unknown; pass "
            "prices={'input': ..., 'output': ...} (USD per 1M tokens)"
        )
    if price.known and spec.task != "embed":
        if price.cached_input is None:
            notes.append(
                f"the price list has no cached-input rate for {spec.model}: prompt-cache hits "
                "are priced at the input rate (the most they can cost)"
            )
        if price.cache_write is None and prov.bills_cache_writes:
            notes.append(
                f"the price list has no cache-write rate for {spec.model}: results with cache "
                "writes get an unknown cost (llm_cost null), not a guess"
            )
    rows = source.n_rows
    levels = tiers_of(price.to_dict())
    tier_use = tuple(
        (
            float(level["above"]),
            *_in_tier(expected_each, levels, i),
            *_in_tier(worst_each, levels, i),
        )
        for i, level in enumerate(levels)
    )
    est = Estimate(
        provider=spec.provider,
        model=spec.model,
        endpoint=prov.endpoint(spec),
        task=spec.task,
        rows=rows,
        skipped_rows=source.n_skipped,
        unique_requests=n,
        shards=len(shards),
        input_tokens=float(round(input_tokens)) if counted and not rule.band else input_tokens,
        input_tokens_error=error,
        input_method=method,
        sampled=None if counted else min(sample_size, n),
        output_tokens_expected=out_expected,
        output_tokens_worst=out_worst,
        max_output_tokens=cap,
        price=price,
        token_source=f"{rule.encoding} from {encoding_source(rule.encoding)}",
        notes=tuple(notes),
        cacheable_prefix_tokens=cacheable,
        input_tokens_worst=float(worst_each.sum()),
        tier_use=tier_use,
        calibration=calibration,
        output_tokens_error=out_error,
        pilot=pilot,
    )
    return Planned(est, shards, worst_each)


def _in_tier(tokens: pl.Series, levels: list[dict[str, Any]], i: int) -> tuple[int, float]:
    """Requests (and their tokens) of ``tokens`` that fall in price level ``i``."""
    above = levels[i]["above"]
    below = levels[i + 1]["above"] if i + 1 < len(levels) else None
    mask = tokens > above if i else tokens >= 0
    if below is not None:
        mask = mask & (tokens <= below)
    return int(mask.sum()), float(tokens.filter(mask).sum())


def _expected_output(
    source: Source, ratio: float, enc: Any, hint: float | None, notes: list[str]
) -> float | None:
    spec = source.spec
    n = source.n_requests
    fixed = source.provider.output_tokens(spec)
    if fixed is not None:
        return fixed * n
    if hint is not None:
        return float(hint) * n
    out = spec.output
    if out is not None and out.kind == "enum":
        # The answer is the JSON object itself: count each category's object, take the mean.
        ((name, dtype),) = out.columns.items()
        sizes = [len(enc.encode_ordinary(dumps({name: c}))) for c in dtype.categories]
        notes.append(
            "expected output: mean size of the category JSON (reasoning tokens not included)"
        )
        return ratio * (sum(sizes) / len(sizes) + 1) * n  # +1 for the end-of-message token
    return None


def check_fits(source: Source, prices: dict[str, float] | None = None) -> None:
    """Refuse a request whose input can never fit the model's context window (or the provider's
    per-input cap), naming its row. Needs no full token count: see :func:`_over_context`."""
    rule = source.provider.token_rule(source.spec)
    price = lookup_price(source.provider, source.spec.model, prices)
    fixed = _constant_tokens(source, rule)[0]
    cap = _context_cap(source, rule, price.context_window, fixed)
    if cap is None:
        return
    over, offset = [], 0
    for piece in source.pieces(["row", "bytes"]):
        over.append(_over_context(source, piece, offset, rule, cap, fixed))
        offset += piece.height
    _refuse_over_context(source, over, source.spec.model, cap, rule)


def _constant_tokens(source: Source, rule: TokenRule) -> tuple[float, float]:
    """Tokens every request carries whatever its row (framing, schema, a constant system
    prompt), and the part of them that is a shared, cacheable prefix (the system prompt)."""
    spec = source.spec
    per_request = rule.per_request + rule.per_message * len(source.text_columns)
    prefix = 0.0
    if spec.system is not None:
        enc = get_encoding(rule.encoding)
        prefix = rule.per_message + rule.ratio * len(enc.encode_ordinary(spec.system))
    return per_request + prefix, prefix


def _context_cap(source: Source, rule: TokenRule, context: int | None, fixed: float) -> int | None:
    """The most input tokens a request may have (the model's context, or the provider's input
    cap), refusing now when the constant part alone is over it."""
    cap = source.provider.max_input_tokens(source.spec) or context
    if cap is not None and fixed > cap:
        raise RequestTooLargeError(
            f"every request carries ~{fixed:,.0f} tokens before its row's text (system prompt, "
            f"framing, output schema), over {source.spec.model}'s limit of {cap:,}; shorten system="
        )
    return cap


def _over_context(
    source: Source, piece: pl.DataFrame, offset: int, rule: TokenRule, cap: int, fixed: float
) -> pl.DataFrame:
    """The requests of ``piece`` (``row`` and ``bytes``, the source's requests from position
    ``offset``) over ``cap`` input tokens: ``row`` and ``tokens``.

    A token is at least one byte, so only rows longer in bytes than what the cap leaves after
    the constant part can break it: those few are counted exactly.
    """
    texts = source.text_columns
    suspect = piece["bytes"] * max(rule.ratio, 1.0) + fixed > cap
    if not suspect.any():
        return pl.DataFrame(schema={"row": piece.schema["row"], "tokens": pl.Float64})
    if all(t in piece.columns for t in texts):
        suspects = piece.filter(suspect)
    else:
        at = suspect.arg_true().cast(pl.Int64) + offset
        suspects = source.gather(at, [*texts, "row"])
    tokens = sum(count_texts(suspects[c], rule.encoding) for c in texts)
    total = suspects.select("row", tokens=(tokens * rule.ratio + fixed).cast(pl.Float64))
    return total.filter(pl.col("tokens") > cap)


def _refuse_over_context(
    source: Source, over: list[pl.DataFrame], model: str, cap: int | None, rule: TokenRule
) -> None:
    found = [o for o in over if o.height]
    if not found:
        return
    every = pl.concat(found)
    first = every.sort("row").row(0, named=True)
    approx = "~" if rule.ratio != 1.0 else ""
    raise RequestTooLargeError(
        f"{source.describe_row(first['row'])} has {approx}{first['tokens']:,.0f} input "
        f"tokens, over {model}'s limit of {cap:,} ({every.height} request(s) in all); "
        "shorten or truncate those rows' text (e.g. with .str.slice(0, n) on the column)"
    )


def _counts(source: Source, col: str, encoding: str) -> Iterator[pl.Series]:
    for piece in source.pieces([col]):
        yield count_texts(piece[col], encoding)


def _concat(parts: list[pl.Series]) -> pl.Series:
    # one chunk: a float sum over chunks adds in another order, and the figures must not
    # depend on how the requests were cut
    return pl.concat(parts, rechunk=True) if parts else pl.Series([], dtype=pl.Float64)
