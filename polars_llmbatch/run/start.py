"""Starting a job from a frame, or reattaching to the one already on its checkpoint: the mode,
the estimate and budget check, the plan and the first events; then the :class:`Job` handle."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from polars_llmbatch import options
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.estimate import Estimate, estimate
from polars_llmbatch.plan.requests import Prepared
from polars_llmbatch.plan.stored import ROW_GROUP
from polars_llmbatch.plan.stream import Staged
from polars_llmbatch.plan.subset import Subset
from polars_llmbatch.run.cache import cached_results, subset
from polars_llmbatch.run.checkpoint import Checkpoint, default_root
from polars_llmbatch.run.engine import Settings
from polars_llmbatch.run.store import is_remote
from polars_llmbatch.run.transport import Transport

__all__ = ["AUTO_SYNC_MAX_REQUESTS", "AUTO_SYNC_MAX_SAVINGS", "choose_mode", "start"]

# the logger's name is the one users configure, kept from before job.py was split
log = logging.getLogger("polars_llmbatch.job")

#: ``mode="auto"`` runs a job in sync mode when it sends at most this many requests and batch
#: would save less than :data:`AUTO_SYNC_MAX_SAVINGS` USD: a few hundred calls finish in
#: seconds at sync rates, while a batch can take minutes to hours for cents saved.
AUTO_SYNC_MAX_REQUESTS = 200
AUTO_SYNC_MAX_SAVINGS = 0.25
#: ``mode="auto"`` with a deadline nearer than this (seconds) skips the batch: most batches
#: finish within the hour, but a deadline this close would cancel most of them.
AUTO_MIN_BATCH_SECONDS = 1800


def start(
    prepared: Prepared | Staged,
    *,
    checkpoint: str | Path | None,
    mode: str,
    settings: Settings,
    transport: Transport,
    tags: dict[str, str] | None,
    estimate_args: dict[str, Any],
    max_cost: float | None,
    output_name: str | None = None,
    deadline: dt.datetime | None = None,
    fallback: str = "sync",
) -> tuple[Checkpoint, Estimate | None]:
    """Create (or reattach to) the checkpoint for ``prepared`` and plan its first round.

    Reattaching needs the same spec and the same requests; anything else is refused. A new
    job first reuses succeeded results of identical requests from its sibling checkpoints (the
    result cache), then estimates and budget-checks only what is left to send. Staged
    requests are copied into the checkpoint a piece at a time, never held whole.
    """
    if mode not in ("batch", "sync", "flex", "auto"):
        raise LlmBatchError(f"mode= must be 'batch', 'sync', 'flex' or 'auto', not {mode!r}")
    remote = is_remote(checkpoint)
    root = Path(checkpoint).parent if checkpoint is not None else default_root() / "jobs"
    # Creation holds the job folder's lock (waiting for another creator): two processes
    # starting the same call make one job, and the second reattaches to it.
    place: str | Path = (
        str(checkpoint)
        if remote
        else Path(checkpoint)
        if checkpoint is not None
        else root / _dirname(prepared, "batch")
    )
    with _creating(place):
        modes = ("batch", "sync", "flex") if mode == "auto" else (mode,)
        places = (
            [place] if checkpoint is not None else [root / _dirname(prepared, m) for m in modes]
        )
        for candidate in places:  # reattach: the same call finds its job again
            found = Checkpoint(candidate)
            if found.exists():
                _check_same(found, prepared, found.job()["mode"] if mode == "auto" else mode)
                return found, None
        # The result cache reads the local sibling folders; an object-store job has none.
        cache = (
            pl.DataFrame()
            if remote
            else cached_results(
                prepared,
                root,
                exclude=Path(checkpoint) if checkpoint else None,
                base_url=transport.base_url,
            )
        )
        todo: Prepared | Staged | Subset = prepared
        if cache.height:
            todo = (
                subset(prepared, cache["custom_id"])
                if isinstance(prepared, Prepared)
                else Subset(prepared, cache["custom_id"])
            )
        # A budget is a promise: every request is counted, so the worst case is a bound.
        planned = estimate(todo, **{"exact": max_cost is not None, **estimate_args})
        est = planned.estimate
        if mode == "auto":
            mode = choose_mode(est, max_cost, deadline=deadline, fallback=fallback)
            log.info("mode='auto' runs this job in %s mode (%d requests)", mode, todo.n_requests)
        path = place if checkpoint is not None else root / _dirname(prepared, mode)
        ckpt = Checkpoint(path)
        est.check_budget(max_cost, mode)
        if ckpt.occupied():
            raise LlmBatchError(
                f"checkpoint={ckpt.location!r} is a folder with other files in it; name a new "
                "or empty folder (a checkpoint holds one job)"
            )
        ckpt.check_writable()
        price = est.price
        job = {
            "job_id": prepared.job_id,
            # Batches are tagged with the job id and this checkpoint's own nonce: two checkpoints
            # of the same call never take each other's batches for their own after a crash.
            "tag_id": f"{prepared.job_id}-{secrets.token_hex(4)}",
            "base_url": transport.base_url,
            "spec": prepared.spec.to_dict(),
            "spec_digest": prepared.spec.digest(),
            "output_dtypes": prepared.spec.output.dtypes_blob() if prepared.spec.output else None,
            "output_name": output_name,
            "prompt": prepared.prompt,
            "endpoint": prepared.provider.endpoint(prepared.spec),
            "key": prepared.key,
            # the run options a reopened job runs with, as the options table marks them
            **options.recorded(
                {
                    "mode": mode,
                    "tags": dict(tags or {}),
                    "max_attempts": settings.max_attempts,
                    "max_cost": max_cost,
                    "concurrency": settings.concurrency,
                    "max_shard_requests": settings.max_shard_requests,
                    "max_shard_bytes": settings.max_shard_bytes,
                    "max_shard_tokens": settings.max_shard_tokens,
                    "max_in_flight": settings.max_in_flight,
                }
            ),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            # batches until then; at it, the rest in ``fallback`` mode (engine.Engine)
            "deadline": deadline.isoformat() if deadline is not None and mode == "batch" else None,
            "fallback": fallback,
            "rows": prepared.n_rows,
            "requests": prepared.n_requests,
            "cached": cache.height,
            "price": price.to_dict(),
            "estimate": est.to_dict(),
        }
        # Data and cached results first, job.json last: a folder without job.json was
        # interrupted before anything was sent, and is started afresh. The engine then plans
        # the first round from requests.parquet, submitting each shard as it is written
        # ("rolling"). Each request's worst-case input tokens go with it: the shards' queue
        # share and the retries' budget are counted on them.
        if isinstance(prepared, Prepared):
            worst = todo.requests.select(  # type: ignore[union-attr]
                "custom_id", planned.worst_tokens.alias("worst_input_tokens")
            )
            requests = prepared.requests.select("custom_id", "body", "row").join(
                worst, on="custom_id", how="left", maintain_order="left"
            )
            ckpt.begin(prepared.rows, requests)
        else:
            excluded = cache["custom_id"] if cache.height else None
            ckpt.begin(
                prepared.row_table(),
                lambda path: _write_requests(path, prepared, planned.worst_tokens, excluded),
            )
        if cache.height:
            ckpt.write_parquet(ckpt.cached_file, cache)
        ckpt.commit({**job, "rolling": True})
        return ckpt, est


@contextlib.contextmanager
def _creating(place: str | Path) -> Iterator[None]:
    """Hold ``place``'s lock, waiting for another creator; a folder this made and left with
    nothing but the lock (a start refused over budget, say) is removed again."""
    if not isinstance(place, Path):  # an object store's: nothing made here to remove
        ckpt = Checkpoint(place)
        ckpt.check_writable()
        with ckpt.lock(blocking=True):
            yield
        return
    made = not place.exists()
    try:
        Checkpoint(place.parent).check_writable()
        with Checkpoint(place).lock(blocking=True):
            yield
    finally:
        if made and place.is_dir() and {p.name for p in place.iterdir()} <= {".lock"}:
            shutil.rmtree(place, ignore_errors=True)


def choose_mode(
    est: Estimate,
    max_cost: float | None,
    *,
    deadline: dt.datetime | None = None,
    fallback: str = "sync",
) -> str:
    """``mode="auto"``: sync for a small job where batch saves little, else batch; never a
    mode whose worst case is over ``max_cost`` when another fits it. With a ``deadline``
    too near for a batch (:data:`AUTO_MIN_BATCH_SECONDS`), the ``fallback`` (flex where the
    provider has it, at batch prices; else sync) at once.

    The saving is the expected one, or, where the output's length is unknown, the saving on
    the worst case (the whole cost, output included, not the input alone).

    Example:
        >>> from types import SimpleNamespace as E
        >>> est = E(unique_requests=100, savings=0.01, output_tokens_expected=None,
        ...         worst_cost_sync=1.0, worst_cost_batch=0.5)
        >>> choose_mode(est, None), choose_mode(est, 0.75)
        ('batch', 'batch')
        >>> soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
        >>> choose_mode(est, None, deadline=soon, fallback="flex")
        'flex'
    """
    savings = est.savings if est.output_tokens_expected is not None else None
    ws, wb = est.worst_cost_sync, est.worst_cost_batch
    if savings is None and ws is not None and wb is not None and math.isfinite(ws - wb):
        savings = ws - wb
    small = est.unique_requests <= AUTO_SYNC_MAX_REQUESTS
    prefer = "sync" if small and (savings is None or savings < AUTO_SYNC_MAX_SAVINGS) else "batch"
    if deadline is not None:
        left = (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
        if left < AUTO_MIN_BATCH_SECONDS:
            prefer = fallback
    if max_cost is None:
        return prefer
    worst = {"sync": ws, "batch": wb, "flex": wb}
    fits = {m: w is not None and w <= max_cost for m, w in worst.items()}
    if fits[prefer]:
        return prefer
    for other in ([fallback] if deadline is not None else []) + ["batch", "sync"]:
        if fits[other]:
            return other
    # Nothing fits: batch, whose (lower) worst case the budget error then names.
    return "batch"


def _write_requests(
    path: Path, staged: Staged, worst: pl.Series, excluded: pl.Series | None
) -> None:
    """The checkpoint's requests.parquet from staged requests, a piece at a time: ``custom_id``,
    ``body``, ``row`` and each request's ``worst`` input tokens (given for those not
    ``excluded``, in order; null for the excluded, reused from the result cache)."""
    writer: pq.ParquetWriter | None = None
    offset = 0
    try:
        for piece in staged.pieces(["custom_id", "body", "row"]):
            kept = None if excluded is None else ~piece["custom_id"].is_in(excluded.implode())
            n = piece.height if kept is None else int(kept.sum())
            tokens, offset = worst.slice(offset, n), offset + n
            if kept is not None:  # the excluded ones' place held by a null
                empty = pl.repeat(None, piece.height, dtype=worst.dtype, eager=True)
                tokens = empty.scatter(kept.arg_true(), tokens)
            table = piece.with_columns(tokens.alias("worst_input_tokens")).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no requests at all: an empty file of the same columns
        pl.DataFrame(
            schema={"custom_id": pl.String, "body": pl.String, "row": pl.Int64,
                    "worst_input_tokens": worst.dtype}
        ).write_parquet(path)  # fmt: skip


def _dirname(prepared: Prepared | Staged, mode: str) -> str:
    return prepared.job_id if mode == "batch" else f"{prepared.job_id}-{mode}"


def _check_same(ckpt: Checkpoint, prepared: Prepared | Staged, mode: str) -> None:
    job = ckpt.job()
    if job["spec_digest"] != prepared.spec.digest():
        theirs, ours = job["spec"], prepared.spec.to_dict()
        diff = [k for k in ours if ours[k] != theirs.get(k)]
        shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in diff[:3])
        raise LlmBatchError(
            f"checkpoint {ckpt.location!r} holds a job with a different spec ({shown}); "
            "use another checkpoint= for this call (results of identical requests are reused)"
        )
    if job["job_id"] != prepared.job_id and job.get("prompt", prepared.prompt) != prepared.prompt:
        raise LlmBatchError(
            f"checkpoint {ckpt.location!r} holds a job with another prompt "
            f"({job['prompt']!r} there, {prepared.prompt!r} now); use another checkpoint= for "
            "this call (results of identical requests are reused)"
        )
    if job["job_id"] != prepared.job_id:
        raise LlmBatchError(
            f"checkpoint {ckpt.location!r} holds the same spec over different rows "
            f"({job['requests']:,} unique requests there, {prepared.n_requests:,} now: "
            "rows were added, removed or changed); use another checkpoint= in the same folder: "
            "results already paid for are reused"
        )
    if job["mode"] != mode:
        raise LlmBatchError(
            f"checkpoint {ckpt.location!r} runs in {job['mode']} mode, not {mode}; pass "
            f"mode={job['mode']!r} to reattach, or another checkpoint="
        )
