"""The pilot: a stratified sample of a job's requests sent through the sync endpoints first, at
sync prices, to learn what the batch will give before paying for all of it.

From the pilot's answers: output tokens per request (P50, P95, max, and the mean with its 95%
interval, which makes the expected cost of free text known), the share cut at
``max_output_tokens``, and the shares that failed or gave ``invalid_output``: a malformed
prompt shows up in a minute, not after a day's batch.

The pilot is a job of its own, in sync mode, checkpointed next to the job it pilots
(``<checkpoint>-pilot<N>``): crash-safe like any job, counted in :func:`spend` at the sync
rates it was paid, and found again by the same call (a second pilot of the same requests sends
nothing). The batch reuses its answers through the result cache (same folder, same base URL):
what the pilot paid for is never paid twice.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch.collect.reconcile import (
    COST,
    ERROR,
    INVALID,
    OUT_TOKENS,
    STATUS,
    read_results,
    request_outputs,
)
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.requests import Prepared
from polars_llmbatch.plan.sampling import stratified
from polars_llmbatch.run.engine import Settings

__all__ = ["STOP_SHARE", "WARN_SHARE", "Pilot", "budget_left", "pilot_place", "run_pilot"]

#: A pilot share (cut, failed, invalid) above this is warned about.
WARN_SHARE = 0.05
#: More than this share of the pilot failed or invalid: the job is not sent.
STOP_SHARE = 0.5


@dataclass(frozen=True)
class Pilot:
    """What a pilot of ``requests`` requests showed; shares are of the pilot's requests,
    output figures of those that gave an answer, ``cost`` USD at sync rates as billed."""

    requests: int
    checkpoint: str
    cost: float | None
    answered: int
    output_mean: float | None
    output_ci95: float | None
    output_p50: float | None
    output_p95: float | None
    output_max: int | None
    cut: float
    failed: float
    invalid: float
    first_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pilot_place(checkpoint: str | Path | None, prepared: Prepared, n: int) -> str | Path:
    """Where the pilot of ``n`` requests of a job is kept: next to the job's checkpoint (or
    next to where the job's default checkpoint goes)."""
    from polars_llmbatch.run.checkpoint import default_root
    from polars_llmbatch.run.start import _dirname
    from polars_llmbatch.run.store import check_url, is_remote

    if is_remote(checkpoint):  # an object store's prefix: the pilot's is a sibling
        return f"{check_url(str(checkpoint))}-pilot{n}"

    job = (
        Path(checkpoint)
        if checkpoint is not None
        else default_root() / "jobs" / _dirname(prepared, "batch")
    )
    return job.parent / f"{job.name}-pilot{n}"


def budget_left(max_cost: float | None, pilot: dict[str, Any] | None) -> float | None:
    """What is left of ``max_cost`` once the pilot's cost is paid."""
    if max_cost is None or pilot is None:
        return max_cost
    return max(0.0, max_cost - (pilot.get("cost") or 0.0))


def sample(prepared: Prepared, n: int, *, seed: int = 0) -> Prepared:
    """``prepared`` cut to a stratified sample of ``n`` of its requests (by prompt length)."""
    reqs = prepared.requests
    sizes = sum(reqs[c].str.len_chars().fill_null(0) for c in prepared.text_columns)
    positions = stratified(pl.Series(sizes), n, seed=seed)["pos"]
    ids = reqs["custom_id"].gather(positions)
    keep = pl.col("custom_id").is_in(ids.implode())
    return dataclasses.replace(
        prepared,
        requests=reqs.filter(keep),
        rows=prepared.rows.filter(keep.fill_null(False)),
        row_ids=None,
    )


def run_pilot(
    prepared: Prepared,
    n: int,
    *,
    checkpoint: str | Path | None,
    creds: Any,
    settings: Settings,
    tags: dict[str, str] | None,
    planning: dict[str, Any],
    max_cost: float | None,
) -> dict[str, Any]:
    """Send a stratified sample of ``n`` of ``prepared``'s requests in sync mode, as a job
    kept next to ``checkpoint`` (:func:`pilot_place`; reattached if it exists), wait for it,
    and say what it showed (:class:`Pilot`, as a dict).

    Refused before anything is sent: a pilot not smaller than the job, and one that with the
    whole job at batch rates (``planning``: the estimate's arguments) could go past
    ``max_cost``. Raises :class:`LlmBatchError` when more than :data:`STOP_SHARE` of it
    failed."""
    from polars_llmbatch.errors import BudgetExceededError
    from polars_llmbatch.plan.estimate import estimate
    from polars_llmbatch.run.job import Job
    from polars_llmbatch.run.start import start
    from polars_llmbatch.run.transport import Transport

    total = prepared.requests.height
    if n >= total:
        raise LlmBatchError(
            f"pilot={n} is not smaller than the job ({total:,} unique requests): the pilot "
            "would send all of it at sync prices; pass a smaller pilot= or mode='sync'"
        )
    piloted = sample(prepared, n)
    if max_cost is not None:
        whole = estimate(prepared, **planning).estimate
        alone = estimate(piloted, **planning).estimate
        worst = (whole.worst_cost_batch or 0.0) + (alone.worst_cost_sync or 0.0)
        if worst > max_cost:
            raise BudgetExceededError(
                f"worst-case cost ${worst:,.4f} (the pilot of {n} at sync rates plus the job at "
                f"batch rates) is over max_cost=${max_cost:,.4f}; lower max_output_tokens, "
                "pilot fewer requests, or raise max_cost"
            )
    place = pilot_place(checkpoint, prepared, n)
    pilot_settings = dataclasses.replace(settings, mode="sync", max_cost=max_cost)
    transport = Transport(creds)
    ckpt, _ = start(
        piloted,
        checkpoint=place,
        mode="sync",
        settings=pilot_settings,
        transport=transport,
        tags=tags,
        estimate_args={"prices": planning.get("prices")},
        max_cost=max_cost,
    )
    job = Job(ckpt, transport, settings=pilot_settings, rows=piloted.rows)
    with job:
        job.wait()
        price = ckpt.job().get("price")
    report = _report(piloted, read_results(ckpt), price, place)
    _judge(report, piloted.spec.max_output_tokens)
    return report.to_dict()


def _report(
    piloted: Prepared, results: pl.DataFrame, price: dict[str, Any] | None, place: Path
) -> Pilot:
    out = request_outputs(results, piloted.spec, price=price)
    n = piloted.requests.height
    status = out[STATUS]
    invalid = out[INVALID].is_not_null() & (status == "succeeded")
    answered = out.filter((status == "succeeded") & out[INVALID].is_null())
    tokens = answered[OUT_TOKENS].drop_nulls().cast(pl.Float64)
    finishes = set(piloted.provider.truncated)
    cut = results.filter(pl.col("finish").is_in(list(finishes))) if finishes else results.clear()
    failed = out.filter(status != "succeeded")
    said = pl.concat([failed[ERROR], out.filter(invalid)[INVALID]]).drop_nulls()
    first_error = said[0] if said.len() else None
    k = tokens.len()
    mean = float(tokens.mean()) if k else None
    # the mean's 95% half-width; the estimate scales it to the job (finite population there)
    ci = 1.96 * float(tokens.std(ddof=1)) / math.sqrt(k) if k > 1 else None
    return Pilot(
        requests=n,
        checkpoint=str(place),
        cost=float(out[COST].sum()) if out.height else 0.0,
        answered=k,
        output_mean=mean,
        output_ci95=ci if ci is not None else (0.0 if k else None),
        output_p50=float(tokens.quantile(0.5, "nearest")) if k else None,
        output_p95=float(tokens.quantile(0.95, "nearest")) if k else None,
        output_max=int(tokens.max()) if k else None,
        cut=cut["custom_id"].n_unique() / n if n else 0.0,
        failed=failed.height / n if n else 0.0,
        invalid=int(invalid.sum()) / n if n else 0.0,
        first_error=first_error,
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package: a warning names the
    user's line that asked for the pilot, however deep the call came from."""
    import sys

    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _judge(report: Pilot, cap: int | None) -> None:
    """Warn about a high share cut, failed or invalid; stop when most of the pilot failed."""
    bad = report.failed + report.invalid
    if bad > STOP_SHARE:
        raise LlmBatchError(
            f"pilot: {bad:.0%} of {report.requests} requests failed or gave invalid output "
            f"(first error: {report.first_error}); the job was not sent. Fix the prompt or the "
            f"options and run again (the pilot's answers are kept in {report.checkpoint})"
        )
    if report.cut > WARN_SHARE:
        warnings.warn(
            f"pilot: {report.cut:.0%} of the answers were cut at max_output_tokens={cap}; the "
            "cap is too low for this output: raise it",
            stacklevel=_caller_level(),
        )
    if report.failed > WARN_SHARE or report.invalid > WARN_SHARE:
        warnings.warn(
            f"pilot: {report.failed:.0%} failed and {report.invalid:.0%} gave invalid output "
            f"(first error: {report.first_error}); check the prompt before the batch",
            stacklevel=_caller_level(),
        )
