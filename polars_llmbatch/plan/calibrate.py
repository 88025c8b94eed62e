"""Calibrated input tokens: a stratified sample of a job's requests counted by the provider's
free count endpoint, and the offline approximation of every request scaled by what it measured.

Anthropic and Gemini publish no offline tokenizer, so the offline count is o200k times a
ratio, good to ±15–20% (reference/tokens.md §4–5). Their count endpoints
(``POST /v1/messages/count_tokens``, ``models/{m}:countTokens``) are free but rate-limited, so
only a sample is counted:

- the requests are split into :data:`STRATA` strata by their offline size (so long and short
  prompts are both represented), and the same number is drawn at random from each;
- each stratum's total is its offline total times the ratio measured in it (the separate ratio
  estimator), and the 95% interval is the estimator's (Cochran, *Sampling Techniques*, §6.9);
- with no more requests than the sample, every request is counted: the total is exact.

Counts go out :data:`CONCURRENCY` at a time; a 429 waits for its ``retry-after`` (the
transport's retries), so a low tier's limit slows calibration down rather than failing it.
Calibration never lowers the worst case that ``max_cost`` is checked against: where the sample
shows a request above its offline bound, every bound is raised by that factor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.sampling import STRATA, strata_of, stratified

if TYPE_CHECKING:
    from polars_llmbatch.plan.spec import RequestSpec
    from polars_llmbatch.providers.base import Provider
    from polars_llmbatch.run.transport import Transport

__all__ = ["CONCURRENCY", "SAMPLE", "STRATA", "Calibration", "calibrate", "remote_counter"]

#: Requests counted by ``calibrate=True`` (an integer asks for another number).
SAMPLE = 200
#: Count calls in flight at once.
CONCURRENCY = 4

#: Counts the input tokens of request bodies (parsed JSON), in order.
Counter = Callable[[list[dict[str, Any]]], list[int]]


@dataclass(frozen=True)
class Calibration:
    """What a calibration measured: ``requests`` counted by the provider (``exact`` when
    that was all of them), their ``ratio`` of counted to offline tokens, the job's calibrated
    ``total`` with its 95% half-width ``ci95``, the factor ``worst_factor`` (≥ 1) by which the
    offline worst-case bounds were raised, and the ``seconds`` it took."""

    requests: int
    exact: bool
    ratio: float
    total: float
    ci95: float
    worst_factor: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    bodies: pl.Series | Callable[[pl.Series], list[str]],
    expected: pl.Series,
    worst: pl.Series,
    count: Counter,
    *,
    sample: int = SAMPLE,
    strata: int = STRATA,
    seed: int = 0,
) -> Calibration:
    """Count a stratified sample of ``bodies`` (JSON text) with ``count`` and scale the
    offline ``expected`` tokens of every request by what it measured. ``bodies`` may be a
    function of the sorted positions to their bodies, for requests read in pieces.

    Example:
        >>> bodies = pl.Series([f'{{"n": {i}}}' for i in range(1000)])
        >>> expected = pl.Series([float(10 + i % 50) for i in range(1000)])
        >>> twice = lambda reqs: [2 * (10 + r["n"] % 50) for r in reqs]  # a provider at 2x
        >>> cal = calibrate(bodies, expected, expected * 3, twice, sample=100)
        >>> cal.requests, round(cal.ratio, 3), round(cal.total) == round(2 * expected.sum())
        (100, 2.0, True)
    """
    started = time.monotonic()
    n = len(expected)
    # the job's strata are the ones the sample is drawn from (one definition, in sampling)
    frame = strata_of(expected, sample, strata=strata)
    exact = n <= sample
    picked = stratified(expected, sample, strata=strata, seed=seed)
    picked = picked.with_columns(w=worst.cast(pl.Float64).gather(picked["pos"]))
    texts = (
        bodies.gather(picked["pos"]).to_list()
        if isinstance(bodies, pl.Series)
        else bodies(picked["pos"])
    )
    counts = count([orjson.loads(t) for t in texts])
    picked = picked.with_columns(y=pl.Series(counts, dtype=pl.Float64))

    x_sum = float(picked["x"].sum())
    ratio = float(picked["y"].sum()) / x_sum if x_sum else 1.0
    over = picked.select((pl.col("y") / pl.col("w")).max()).item() if picked.height else None
    worst_factor = max(1.0, float(over)) if over is not None and math.isfinite(over) else 1.0
    if exact:
        total, ci95 = float(picked["y"].sum()), 0.0
    else:
        total, variance = 0.0, 0.0
        # strata in order, each summed on its own: a float total must be the same every run
        # (a parallel group_by adds in an order of its own)
        measured = picked.partition_by("stratum", as_dict=True)
        none = picked.head(0)
        for key, part in sorted(frame.partition_by("stratum", as_dict=True).items()):
            row = {"X": part["x"].sum(), "N": part.height}
            sample = measured.get(key, none)
            xs, ys = sample["x"].cast(pl.Float64), sample["y"].cast(pl.Float64)
            big_n, n_h = row["N"], len(xs)
            if not n_h:  # pragma: no cover - every stratum is sampled
                total += row["X"] * ratio
                continue
            r_h = ys.sum() / xs.sum() if xs.sum() else None
            if r_h is None:  # nothing offline to scale: the stratum's mean count
                total += big_n * ys.mean()
                d = ys - ys.mean()
            else:
                total += r_h * row["X"]
                d = ys - r_h * xs
            if n_h > 1:
                variance += big_n**2 * (1 - n_h / big_n) * (d.var(ddof=1) or 0.0) / n_h
        ci95 = 1.96 * math.sqrt(variance)
    return Calibration(
        requests=picked.height,
        exact=exact,
        ratio=ratio,
        total=total,
        ci95=ci95,
        worst_factor=worst_factor,
        seconds=time.monotonic() - started,
    )


def remote_counter(
    provider: Provider, spec: RequestSpec, transport: Transport, *, concurrency: int = CONCURRENCY
) -> Counter:
    """A :data:`Counter` over ``provider``'s count endpoint, ``concurrency`` calls at a time.
    A failure is an error naming the endpoint's answer, raised before anything is sent."""
    from polars_llmbatch.run.transport import ProviderError

    def count(bodies: list[dict[str, Any]]) -> list[int]:
        def one(body: dict[str, Any]) -> int:
            return provider.count_tokens(transport, spec, body)

        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                return list(pool.map(one, bodies))
        except ProviderError as exc:
            raise LlmBatchError(
                f"calibrate: {provider.name}'s token-count endpoint failed ({exc}); nothing "
                "was sent. Check the key and base_url, or drop calibrate= for the offline "
                "approximation"
            ) from None

    return count
