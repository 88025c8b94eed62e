"""The job engine: shards → provider → results, driven by the checkpoint's event log.

Per shard: ``intent`` (fsynced) → submit, tagged → ``submitted`` (remote id) → poll →
``fetched`` (result files on disk) → results Parquet → ``done``. On a restart, a shard with an
intent but no remote id is looked up by its tag before anything is sent again, so a crash at any
instant costs nothing twice. When every shard is done, the retryable failures (expired, missing,
errored with a transient error) go into a new round of shards, up to ``max_attempts``.

The engine knows the provider only through :class:`~polars_llmbatch.providers.Provider`'s
remote methods; it never reads a wire format.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch import options
from polars_llmbatch._fs import fsync
from polars_llmbatch.collect.reconcile import best_results, scan_results, spent, unsettled
from polars_llmbatch.collect.results import RESULT_SCHEMA, missing_results
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.prices import HALF_PRICE_MODES, cost_expr
from polars_llmbatch.plan.requests import Prepared
from polars_llmbatch.plan.shards import WRITERS, Shard, plan, write_shard_files
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.plan.stored import StoredRequests
from polars_llmbatch.plan.subset import Subset
from polars_llmbatch.providers import Provider
from polars_llmbatch.providers.base import AmbiguousBatch, RemoteState
from polars_llmbatch.run.checkpoint import Checkpoint, ShardRecord
from polars_llmbatch.run.progress import Progress
from polars_llmbatch.run.transport import ProviderError, Transport, UncertainError

__all__ = ["Engine", "Settings", "plan_round"]

log = logging.getLogger("polars_llmbatch.engine")

#: The modes whose shards are sent request by request (sync endpoints; flex is their tier at
#: batch prices).
ONE_BY_ONE = ("sync", "flex")
#: Seconds a flex call may take: the flex guides raise the SDKs' timeout to 15 minutes.
FLEX_TIMEOUT = 900.0
#: Requests per shard in sync mode: the unit that is checkpointed together.
SYNC_SHARD_REQUESTS = 1_000
#: In an object store, a sync shard's answers so far are uploaded after this many more
#: answers or seconds, whichever comes first.
PART_UPLOAD = (50, 2.0)


@dataclass(frozen=True)
class Settings:
    """How a job runs. ``poll_interval`` grows ×1.5 per quiet poll up to ``max_poll_interval``;
    ``max_in_flight``: batches live at once (None: as many as the provider's queue takes)."""

    mode: str = "batch"
    max_attempts: int = 3
    max_cost: float | None = None
    poll_interval: float = 5.0
    max_poll_interval: float = 60.0
    concurrency: int = 8
    progress: bool = True
    max_shard_requests: int | None = None
    max_shard_bytes: int | None = None
    max_shard_tokens: int | None = None
    max_in_flight: int | None = None


def plan_round(
    ckpt: Checkpoint,
    prepared: Prepared,
    *,
    attempt: int,
    first_index: int,
    job_id: str,
    mode: str,
    max_requests: int | None = None,
    max_bytes: int | None = None,
    max_tokens: int | None = None,
    tokens: pl.Series | None = None,
) -> int:
    """Plan ``prepared.requests`` (a retry round) into shards numbered from ``first_index``:
    write their files, then record the whole round in one ``planned`` event (a crash before it
    re-plans the same bytes). ``tokens``: each request's worst-case input tokens (in request
    order), kept per shard; with ``max_tokens`` each shard's sum to at most it. Returns the
    number of shards."""
    round_ = 1 + max((r.round for r in ckpt.shards().values()), default=0)
    shards = plan(
        prepared,
        max_requests=_shard_cap(mode, max_requests),
        max_bytes=max_bytes,
        max_tokens=max_tokens,
        tokens=tokens if max_tokens is not None else None,
        first_index=first_index,
        job_id=job_id,
    )
    if not shards:
        return 0
    records = _write_planned(
        ckpt, prepared, shards, round_=round_, attempt=attempt, mode=mode, tokens=tokens
    )
    ckpt.append("planned", shards=records)
    return len(shards)


def _ids(source: Prepared | StoredRequests | Subset, start: int, n: int) -> pl.Series:
    return pl.concat([p["custom_id"] for p in source.span(start, n, ["custom_id"])])


def _shard_cap(mode: str, max_requests: int | None) -> int | None:
    if mode in ONE_BY_ONE:
        return min(max_requests or SYNC_SHARD_REQUESTS, SYNC_SHARD_REQUESTS)
    return max_requests


def _write_planned(
    ckpt: Checkpoint,
    source: Prepared | StoredRequests | Subset,
    shards: list[Shard],
    *,
    round_: int,
    attempt: int,
    mode: str,
    tokens: pl.Series | None,
) -> list[dict[str, Any]]:
    """Write ``shards``' files and id lists; their ``planned`` records."""
    for path in write_shard_files(source, shards, ckpt.path / "shards"):
        ckpt.keep(path)
    records = []
    for s in shards:
        ids = _ids(source, s.start, s.n_requests)
        ckpt.write_parquet(ckpt.ids_file(s.index), pl.DataFrame({"custom_id": ids}))
        held = tokens.slice(s.start, s.n_requests).fill_null(0).sum() if tokens is not None else 0
        records.append(
            {
                "shard": s.index,
                "round": round_,
                "attempt": attempt,
                "requests": s.n_requests,
                "tokens": int(held),
                "sha256": _sha256(ckpt.shard_file(s.filename)),
                "tag": s.tag,
                "filename": s.filename,
                "kind": s.framing.kind,
                "mode": mode,
            }
        )
    return records


class Engine:
    """Drives one checkpointed job to the end (or to a deadline)."""

    def __init__(
        self,
        ckpt: Checkpoint,
        provider: Provider,
        spec: RequestSpec,
        transport: Transport | None,
        settings: Settings,
        *,
        key: str,
        worst_cost_per_request: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ckpt = ckpt
        self.provider = provider
        self.spec = spec
        self.t = transport
        self.settings = settings
        self.key = key
        self.worst_cost_per_request = worst_cost_per_request
        self.sleep = sleep
        self._states: dict[int, RemoteState] = {}
        self._ambiguous = False
        self._canceled_at = (-1.0, False)  # (when last read, canceled then)
        self._canceled = False
        self._events_read = 0  # bytes of the event log already searched for a cancel
        self._events_lock = threading.Lock()
        job = ckpt.job() if ckpt.job_file.exists() else {}
        # mode="auto" with a deadline: batches until then; at it, what still runs is
        # cancelled and the rest is sent in ``fallback`` mode (flex, else sync)
        self._deadline = (
            dt.datetime.fromisoformat(job["deadline"]).timestamp() if job.get("deadline") else None
        )
        self.fallback: str = job.get("fallback") or "sync"
        self._deadline_said = False
        self._not_found: set[int] = set()  # intents looked up by this runner: never created

    # the loop ------------------------------------------------------------------------------
    def run(
        self,
        timeout: float | None = None,
        *,
        retry: bool = True,
        stop: threading.Event | None = None,
    ) -> bool:
        """Work until every shard is done and no retry is due (True), or ``timeout`` seconds
        have passed (and the first round is wholly planned) or ``stop`` is set (False). Safe
        to interrupt at any point; the next run resumes. Sync shards stop sending at the
        deadline too (what is in flight lands)."""
        with self.ckpt.lock(patient=True):
            return self._run(timeout, retry=retry, stop=stop)

    def _run(self, timeout: float | None, *, retry: bool, stop: threading.Event | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout

        def due() -> bool:
            return (deadline is not None and time.monotonic() >= deadline) or (
                stop is not None and stop.is_set()
            )

        def stop_sending() -> bool:  # sync mode: also a cancel from another process
            return due() or self._canceled_lately()

        def leave() -> bool:
            # A timeout waits for the first round's plan to be whole (local work, and what a
            # restart would read again); a stop does not.
            return (stop is not None and stop.is_set()) or (due() and planner is None)

        interval = self.settings.poll_interval
        progress = Progress(self.ckpt, enabled=self.settings.progress)
        # The first round is planned here, a few shards per pass, each submitted as soon as
        # its file is written; the live batches are polled meanwhile, once per interval.
        planner = None if self.ckpt.planning_done() else self._first_round()
        next_poll = 0.0
        try:
            while True:
                if planner is not None and next(planner, None) is None:
                    planner = None  # the round is wholly planned (or was stopped)
                shards = self.ckpt.shards()
                if self.past_deadline() and self._at_deadline(shards):
                    shards = self.ckpt.shards()
                pending = [s for s in shards.values() if not s.done]
                if not pending and planner is None:
                    if retry and self._plan_retries(shards):
                        continue
                    progress.update(shards, self._states)
                    return True
                moved = planner is not None
                queue = _Queue(self, shards)
                for s in pending:
                    # Asked before every create: a cancel from another process stops the
                    # submission at once, not after this pass.
                    canceled = not s.submitted and self.canceled()
                    if s.mode in ONE_BY_ONE:
                        if not due():
                            moved |= self._run_sync(s, stop_sending)
                    elif canceled:
                        moved |= self._cancel_unsent(s)
                    elif not s.submitted:
                        moved |= self._submit(s, queue)
                if self.canceled():
                    # The canceller knew only the batches recorded when it asked: cancel every
                    # live one this runner knows, including any created since.
                    self._cancel_live()
                if planner is None or time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + interval
                    for s in pending:
                        if s.mode == "batch" and s.remote_id is not None:
                            moved |= self._poll(s)
                progress.update(self.ckpt.shards(), self._states)
                if moved and not leave():
                    if planner is None:
                        interval = self.settings.poll_interval
                    continue
                if leave():
                    return False
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                if stop is not None:
                    if stop.wait(max(wait, 0.0)):  # woken at once by a stop
                        return False
                else:
                    self.sleep(max(wait, 0.0))
                interval = min(interval * 1.5, self.settings.max_poll_interval)
        finally:
            progress.close()

    def _first_round(self) -> Iterator[int]:
        """Plan the first round :data:`WRITERS` shards at a time, yielding once they are
        recorded, so the loop submits each as soon as its file is written. A restart plans
        again from the checkpoint's own requests: the same shards, the recorded ones kept.
        A cancel or the deadline stops it: the requests left unplanned end ``canceled`` (the
        deadline's round then sends them in its fallback mode)."""
        job = self.ckpt.job()
        cached = None
        if self.ckpt.cached_file.exists():  # reused from the result cache: never sent
            cached = pl.read_parquet(self.ckpt.cached_file, columns=["custom_id"])["custom_id"]
        todo: StoredRequests | Subset = StoredRequests(
            self.ckpt.path / "requests.parquet", self.spec, self.provider
        )
        if cached is not None:
            todo = Subset(todo, cached)
        held = [p["worst_input_tokens"] for p in todo.pieces(["worst_input_tokens"])]
        tokens = pl.concat(held, rechunk=True) if held else pl.Series([], dtype=pl.Int64)
        mode = job["mode"]
        # The bounds the job was created with, whatever this run was given: a restart must cut
        # the very shards recorded before it, or requests would be sent twice or never.
        caps = options.recorded(job)
        shards = plan(
            todo,
            max_requests=_shard_cap(mode, caps["max_shard_requests"]),
            max_bytes=caps["max_shard_bytes"],
            max_tokens=caps["max_shard_tokens"],
            tokens=tokens if caps["max_shard_tokens"] is not None else None,
            job_id=job["tag_id"],
        )
        known = self.ckpt.shards()
        for s in shards:
            rec = known.get(s.index)
            if rec is not None and (rec.requests, rec.tag) != (s.n_requests, s.tag):
                raise LlmBatchError(
                    f"checkpoint {str(self.ckpt.path)!r}: shard {s.index} was planned with "
                    f"{rec.requests:,} requests, and planning again gives {s.n_requests:,}; "
                    "its requests.parquet or job.json changed since: restore them, or start a "
                    "new checkpoint"
                )
        left = [s for s in shards if s.index not in known]
        while left:
            if self.canceled() or self.deadline_reached():
                start, stop = left[0].start, left[-1].stop
                self._end_unplanned(_ids(todo, start, stop - start), mode)
                break
            some, left = left[:WRITERS], left[WRITERS:]
            records = _write_planned(
                self.ckpt, todo, some, round_=1, attempt=1, mode=mode, tokens=tokens
            )
            for r in records:
                self.ckpt.append("planned", shards=[r])
            yield len(records)
        self.ckpt.append("planned_round", round=1, shards=len(shards) - len(left))

    def _end_unplanned(self, ids: pl.Series, mode: str) -> None:
        """Requests a cancel or the deadline left unplanned: ``canceled``, never sent."""
        rows = _unanswered(ids, "canceled", "canceled before it was sent", retryable=False)
        self.ckpt.write_parquet(
            self.ckpt.path / "results" / "unplanned.parquet", _stamped(rows, 1, -1, mode)
        )

    def refresh(self) -> int:
        """Poll every live batch once and record what it says; collect those that ended
        (their results, downloaded and parsed). Never submits, cancels or retries anything:
        what :meth:`~polars_llmbatch.Job.status` does. Returns the batches that ended."""
        ended = 0
        with self.ckpt.lock():
            for s in self.ckpt.shards().values():
                if not s.done and s.mode == "batch" and s.remote_id is not None:
                    ended += self._poll(s)
        return ended

    # the provider's queue -------------------------------------------------------------------
    def learn_ceiling(
        self, s: ShardRecord, tokens: int | None, requests: int
    ) -> tuple[int | None, int]:
        """Record a queue refusal of ``s`` with ``tokens`` / ``requests`` (its own included,
        less one; tokens None when a shard's are unknown) live: the queue's limit is under
        that, for this job's model. Returns the ceiling from now on."""
        old = self.ckpt.queue_ceiling()
        t = None if tokens is None else max(tokens, 0)
        if old is not None and old[0] is not None:
            t = old[0] if t is None else min(old[0], t)
        new = (t, max(requests, 0) if old is None else min(old[1], max(requests, 0)))
        if new != old:
            log.info(
                "shard %d: the provider's queue is full; keeping live batches under %s tokens "
                "and %s requests",
                s.index,
                "?" if new[0] is None else f"{new[0]:,}",
                f"{new[1]:,}",
            )
        # recorded even when unchanged: a refusal starts the wait for the next probe anew
        self.ckpt.append("queue_full", shard=s.index, tokens=new[0], requests=new[1])
        return new

    # batch mode ----------------------------------------------------------------------------
    def _submit(self, s: ShardRecord, queue: _Queue) -> bool:
        """Create ``s``'s batch, unless ``queue`` holds it back; True if anything moved."""
        if s.intent_at is not None and s.index not in self._not_found:
            # A previous run recorded the intent and may have created the batch before dying:
            # look it up before sending anything again.
            found = self._find(s)
            if found is not None:
                log.info("shard %d: found batch %s from an earlier run", s.index, found)
                self.ckpt.append("submitted", shard=s.index, remote_id=found, recovered=True)
                queue.took(s)
                return True
            if self._ambiguous:
                return False
            # Not created: this runner (it holds the job) need not ask again while the
            # queue holds the shard back.
            self._not_found.add(s.index)
        if queue.holds(s):
            return False
        data = self.ckpt.shard_file(s.filename).read_bytes()
        if hashlib.sha256(data).hexdigest() != s.sha256:
            raise LlmBatchError(
                f"shard file {self.ckpt.shard_file(s.filename)} changed since it was planned; "
                "restore it or start a new checkpoint"
            )
        self.ckpt.append("intent", shard=s.index, tag=s.tag, sha256=s.sha256, attempt=s.attempt)
        self._not_found.discard(s.index)  # from now on the create may have happened
        try:
            remote_id = self.provider.submit(self.t, self.spec, data, tag=s.tag, kind=s.kind)
        except UncertainError as exc:
            # The create may have happened: the intent stays, and the next pass looks the
            # batch up by its tag before sending anything again.
            log.warning("shard %d: %s; will look it up before resubmitting", s.index, exc)
            return False
        except ProviderError as exc:
            if self.provider.stops_job(exc.status, str(exc)):
                raise
            if exc.status == 429:
                if queue.live:
                    # The provider's queue is full (or we are rate limited past our retries):
                    # leave the shard for a later pass, and keep the live batches under what
                    # was refused until then, so the passes do not knock again and again.
                    log.warning("shard %d: not accepted yet (%s); will retry", s.index, exc)
                    queue.refused(s)
                    return False
                # Refused with nothing else queued: the shard itself is over the queue limit.
                # Its requests come back in a round of half-size shards (one request alone
                # that is still refused cannot be split further).
                splittable = s.requests > 1
                self._fail_shard(
                    s,
                    f"over the queue limit: {exc}",
                    retryable=splittable,
                    limited=splittable,
                )
                return True
            if 400 <= exc.status < 500:
                self._fail_shard(s, f"rejected: {exc}", retryable=False)
                return True
            raise
        self.ckpt.append("submitted", shard=s.index, remote_id=remote_id)
        log.info("shard %d: submitted as %s (%d requests)", s.index, remote_id, s.requests)
        queue.took(s)
        return True

    def _find(self, s: ShardRecord) -> str | None:
        """The batch an earlier create for ``s`` may have made (``_ambiguous`` while the
        provider cannot tell yet)."""
        assert s.intent_at is not None
        self._ambiguous = False
        since = dt.datetime.fromisoformat(s.intent_at) - dt.timedelta(minutes=2)
        taken = frozenset(
            r.remote_id for r in self.ckpt.shards().values() if r.remote_id is not None
        )
        ids = pl.read_parquet(self.ckpt.ids_file(s.index))["custom_id"].to_list()
        try:
            return self.provider.find(
                self.t,
                tag=s.tag,
                since=since,
                requests=s.requests,
                exclude=taken,
                custom_ids=frozenset(ids),
            )
        except AmbiguousBatch as exc:
            log.warning("shard %d: %s; waiting before deciding", s.index, exc)
            self._ambiguous = True
            return None

    def _poll(self, s: ShardRecord) -> bool:
        assert s.remote_id is not None
        st = self.provider.poll(self.t, s.remote_id)
        self._states[s.index] = st
        if (st.phase, st.status) != (s.phase, s.status):
            self.ckpt.append(
                "state", shard=s.index, phase=st.phase, status=st.status, error=st.error
            )
        if not st.ended:
            return False
        self._collect(s, st)
        return True

    def _collect(self, s: ShardRecord, st: RemoteState) -> None:
        """Results of an ended batch: raw files to disk first, then parsed rows, then done."""
        files = [self.ckpt.path / f for f in s.files]  # relative: the folder may move
        ids = pl.read_parquet(self.ckpt.ids_file(s.index))["custom_id"]
        if not files and st.result_files:
            for k, data in enumerate(self.provider.fetch(self.t, st, ids.to_list())):
                path = self.ckpt.raw_file(s.index, k)
                self.ckpt.write_bytes(path, data)
                files.append(path)
            self.ckpt.append(
                "fetched", shard=s.index, files=[str(f.relative_to(self.ckpt.path)) for f in files]
            )
        if files:
            got = self.provider.parse(files, self.spec)
            got = got.filter(pl.col("custom_id").is_in(ids.implode()))  # never a foreign row
            absent = missing_results(ids.filter(~ids.is_in(got["custom_id"].implode())))
            status = st.unanswered
            if status != "errored":  # a cancelled (or expired) batch that never ran them
                absent = absent.with_columns(
                    pl.lit(status).alias("status"),
                    pl.lit(f"the batch ended {st.status} before it ran").alias("error"),
                    pl.lit(status == "expired").alias("retryable"),
                )
            rows = pl.concat([got, absent])
            queue_limited = False
        else:
            if self.provider.queue_limited(st):
                self._refused_while_queued(s)
            queue_limited = self.provider.queue_limited(st) and s.requests > 1
            status = st.unanswered
            rows = missing_results(ids).with_columns(
                pl.lit(status).alias("status"),
                pl.lit(st.error or f"the batch ended {st.status} with no results").alias("error"),
                pl.lit(status == "expired" or queue_limited).alias("retryable"),
            )
        self._write_results(s, rows)
        self.ckpt.append("done", shard=s.index, queue_limited=queue_limited, counts=_counts(rows))

    def _refused_while_queued(self, s: ShardRecord) -> None:
        """A batch that failed for a full queue (OpenAI validates after the create): with
        others live, the queue holds less than they and it did together."""
        others = {i: r for i, r in self.ckpt.shards().items() if i != s.index}
        queue = _Queue(self, others)
        if queue.live:
            queue.refused(s)

    def _fail_shard(
        self,
        s: ShardRecord,
        error: str,
        *,
        retryable: bool,
        limited: bool = False,
        status: str = "errored",
    ) -> None:
        ids = pl.read_parquet(self.ckpt.ids_file(s.index))["custom_id"]
        rows = _unanswered(ids, status, error, retryable=retryable)
        self._write_results(s, rows)
        self.ckpt.append("done", shard=s.index, queue_limited=limited, counts=_counts(rows))

    def _write_results(self, s: ShardRecord, rows: pl.DataFrame) -> None:
        self.ckpt.write_parquet(
            self.ckpt.result_file(s.index), _stamped(rows, s.attempt, s.index, s.mode)
        )

    def cancel(self) -> int:
        """Stop the job: nothing more is sent, and every live batch is asked to cancel; the
        number asked. What already ran is paid for, so the next :meth:`run` still collects it
        (shards never sent end ``canceled``)."""
        self.ckpt.append("canceled")  # first: a run in another process stops sending at once
        return self._cancel_live()

    def _cancel_live(self) -> int:
        """Ask every live batch not asked yet to cancel (each is recorded, so none is asked
        twice, whichever process asks)."""
        n = 0
        for s in self.ckpt.shards().values():
            if s.done or s.remote_id is None or s.mode != "batch" or s.cancel_sent:
                continue
            n += self._cancel_remote(s.index, s.remote_id)
            self.ckpt.append("cancel_sent", shard=s.index, remote_id=s.remote_id)
        return n

    def canceled(self) -> bool:
        """Whether the job was cancelled (by any process). Asked before every create, so only
        the part of the event log written since the last call is read."""
        if self._canceled:
            return True
        if self.ckpt.remote is not None:
            self.ckpt.sync()  # a cancel from another machine reaches the mirror first
        with self._events_lock:  # sync senders ask from several threads: one reader at a time
            try:
                with open(self.ckpt.events_file, "rb") as f:
                    f.seek(self._events_read)
                    new = f.read()
            except FileNotFoundError:
                return False
            done = new.rfind(b"\n") + 1  # a line still being written is read next time
            self._events_read += done
            self._canceled = b'"event":"canceled"' in new[:done]
            return self._canceled

    def _canceled_lately(self) -> bool:
        """:meth:`canceled`, read again at most every 0.2 s: asked before every sync request,
        so a cancel from another process stops the sending too, without reading the event
        log a thousand times a second."""
        now = time.monotonic()
        if now - self._canceled_at[0] >= 0.2:
            self._canceled_at = (now, self.canceled())
        return self._canceled_at[1]

    # the deadline ----------------------------------------------------------------------------
    def past_deadline(self) -> bool:
        """Whether the job has a deadline and it has passed (by this machine's clock)."""
        return self._deadline is not None and time.time() >= self._deadline

    def deadline_reached(self) -> bool:
        """Whether a run (in any process) has recorded the deadline as reached."""
        if not self._deadline_said:
            self._deadline_said = any(
                e.get("event") == "deadline_reached" for e in self.ckpt.events()
            )
        return self._deadline_said

    def _at_deadline(self, shards: dict[int, ShardRecord]) -> bool:
        """Record the deadline once; cancel every batch still running (what ran is kept and
        collected as usual) and end the batch shards never sent. True if anything moved."""
        if not self.deadline_reached():
            log.info("the deadline has passed: cancelling running batches, then %s", self.fallback)
            self.ckpt.append("deadline_reached", fallback=self.fallback)
            self._deadline_said = True
        moved = False
        for s in shards.values():
            if s.done or s.mode != "batch" or s.cancel_sent:
                continue
            if s.remote_id is not None:
                self._cancel_remote(s.index, s.remote_id)
                self.ckpt.append("cancel_sent", shard=s.index, remote_id=s.remote_id)
                moved = True
            else:
                moved |= self._cancel_unsent(s)
        return moved

    def _round_mode(self) -> str:
        """The mode a new round is sent in: the job's, or past the deadline its fallback."""
        return self.fallback if self.deadline_reached() else self.settings.mode

    def _cancel_remote(self, index: int, remote_id: str) -> int:
        try:
            if self.provider.poll(self.t, remote_id).ended:
                return 0  # finished already: its results are collected as usual
            self.provider.cancel(self.t, remote_id)
        except ProviderError as exc:  # e.g. it ended in between: nothing left to cancel
            log.warning("shard %d: cancel of %s not taken (%s)", index, remote_id, exc)
            return 0
        return 1

    def _cancel_unsent(self, s: ShardRecord) -> bool:
        """After a cancel, a shard without a recorded batch: one a crash may have created is
        looked up and cancelled; otherwise the shard ends ``canceled``, never sent."""
        if s.intent_at is not None:
            found = self._find(s)
            if found is None and self._ambiguous:
                return False
            if found is not None:
                self.ckpt.append("submitted", shard=s.index, remote_id=found, recovered=True)
                self._cancel_remote(s.index, found)
                self.ckpt.append("cancel_sent", shard=s.index, remote_id=found)
                return True
        self._fail_shard(s, "canceled before it was sent", status="canceled", retryable=False)
        return True

    # sync mode -----------------------------------------------------------------------------
    def _run_sync(self, s: ShardRecord, due: Callable[[], bool] = lambda: False) -> bool:
        """Send a shard's requests one by one (``concurrency`` at a time). Each answer is
        appended to a ``.part`` file as it arrives, so a crash loses none that were paid for;
        a restart sends only the requests without one. Once ``due()`` (a deadline, a stop),
        nothing more is sent and the shard stays open (False); True once it is done."""
        final = self.ckpt.raw_file(s.index, 0)
        ids = pl.read_parquet(self.ckpt.ids_file(s.index))
        canceled = self.canceled()
        if not s.files and not self._send_sync(s, final, ids, send=not canceled, due=due):
            return False
        rows = self.provider.parse([final], self.spec)
        absent = ids["custom_id"].filter(~ids["custom_id"].is_in(rows["custom_id"].implode()))
        lost = missing_results(absent)
        if canceled:
            lost = lost.with_columns(
                pl.lit("canceled").alias("status"),
                pl.lit("canceled before it was sent").alias("error"),
                pl.lit(False).alias("retryable"),
            )
        rows = pl.concat([rows, lost])
        self._write_results(s, rows)
        self.ckpt.append("done", shard=s.index, queue_limited=False, counts=_counts(rows))
        return True

    def _send_sync(
        self,
        s: ShardRecord,
        final: Path,
        ids: pl.DataFrame,
        *,
        send: bool,
        due: Callable[[], bool],
    ) -> bool:
        part = final.with_suffix(".part")
        if final.exists() and not part.exists():  # renamed, then killed before the event
            os.replace(final, part)
        if self.ckpt.remote is not None:  # answers another machine had sent, kept in the store
            _merge_part(part, self.ckpt.fetch_part(part), self.provider)
        done_ids = _part_ids(part, self.provider)
        if s.intent_at is None:
            self.ckpt.append("intent", shard=s.index, tag=s.tag, sha256=s.sha256, attempt=s.attempt)
        todo = (
            pl.scan_parquet(self.ckpt.path / "requests.parquet")
            .join(ids.lazy(), on="custom_id", how="semi")
            .filter(~pl.col("custom_id").is_in(list(done_ids)))
            .select("custom_id", "body")
            .collect()
        )
        if not send:
            todo = todo.clear()
        path = self.provider.sync_path(self.spec)
        lock = threading.Lock()
        flex = s.mode == "flex"
        extra: dict[str, Any] = {"timeout": FLEX_TIMEOUT} if flex else {}

        skipped = threading.Event()
        # In an object store, the answers so far are uploaded every PART_UPLOAD answers or
        # seconds: a resume on another machine sends again only those since.
        uploaded = [time.monotonic(), 0]

        def send_one(item: tuple[str, str]) -> None:
            custom_id, body = item
            if flex:
                body = self.provider.flex_body(self.spec, body) or body
            if due():  # past the deadline (or stopped): leave it for the next run
                skipped.set()
                return
            try:
                r = self.t.request(
                    "POST",
                    path,
                    content=body.encode(),
                    headers={"content-type": "application/json"},
                    **extra,
                )
                status, payload = r.status_code, r.content
            except ProviderError as exc:
                if self.provider.stops_job(exc.status, str(exc)):
                    raise
                status = exc.status or 503  # a connection that never answered: transient
                payload = self.provider.error_body(str(exc))
            line = self.provider.sync_line(custom_id, status, payload) + b"\n"
            with lock:
                with open(part, "ab") as f:
                    f.write(line)
                    f.flush()
                uploaded[1] += 1
                if self.ckpt.remote is not None and (
                    uploaded[1] >= PART_UPLOAD[0]
                    or time.monotonic() - uploaded[0] >= PART_UPLOAD[1]
                ):
                    self.ckpt.keep(part)  # under the lock: no answer is written meanwhile
                    uploaded[:] = [time.monotonic(), 0]

        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            list(pool.map(send_one, todo.iter_rows()))
        if not part.exists():
            part.touch()
        fsync(part)
        if skipped.is_set():
            return False  # the answers so far are in the .part file; the rest come next run
        part.replace(final)
        self.ckpt.keep(final)
        self.ckpt.append("fetched", shard=s.index, files=[str(final.relative_to(self.ckpt.path))])
        return True

    # retries -------------------------------------------------------------------------------
    def due_retries(
        self, shards: dict[int, ShardRecord], results: pl.DataFrame | None = None
    ) -> pl.DataFrame:
        """The requests a retry round would send now (expired, missing, transiently errored,
        under ``max_attempts`` plus the rounds :meth:`Job.retry` granted their status; none
        after a cancel), with their ``attempts`` so far; the budget is not asked here.
        ``results``: :func:`.reconcile.unsettled` (read when not given) or any superset."""
        if results is None:
            results = unsettled(self.ckpt)
        if self.canceled() or results.is_empty():
            return pl.DataFrame(schema={"custom_id": pl.String, "attempts": pl.UInt32})
        best = best_results(results)
        limited = {s.index for s in shards.values() if s.queue_limited}
        attempts = (
            results.filter(~pl.col("shard").is_in(list(limited)))
            .group_by("custom_id")
            .agg(pl.len().alias("attempts"))
        )
        return (
            best.join(attempts, on="custom_id", how="left")
            .filter(
                pl.col("status").is_in(["expired", "missing"])
                | ((pl.col("status") == "errored") & pl.col("retryable"))
            )
            .filter(
                pl.col("attempts").fill_null(0)
                < self.settings.max_attempts
                + pl.col("status").replace_strict(
                    self.ckpt.retry_grants(), default=0, return_dtype=pl.UInt32
                )
            )
        )

    def over_budget(self, due: pl.DataFrame, mode: str | None = None) -> tuple[float, float] | None:
        """``(spent, retries' worst case)`` when sending ``due`` (in ``mode``, default the
        job's) could take the job past ``max_cost``, else None."""
        if self.settings.max_cost is None or due.is_empty():
            return None
        # A missing result may still have been billed, unseen: count it at its worst case
        # (every attempt's, a later success or not), so max_cost stays a bound on what the
        # provider can charge.
        unseen = (
            scan_results(self.ckpt, ["custom_id", "status"])
            .filter(pl.col("status") == "missing")
            .select("custom_id")
            .collect()
        )
        paid = spent(self.ckpt) + self._worst(unseen)
        more = self._worst(due.select("custom_id"), mode)
        return (paid, more) if paid + more > self.settings.max_cost else None

    def _plan_retries(self, shards: dict[int, ShardRecord]) -> bool:
        results = unsettled(self.ckpt)
        due = self.due_retries(shards, results)
        mode = self._round_mode()
        if (
            self.deadline_reached()
            and not self.canceled()  # a cancel stops the deadline's round too
            and not any(s.mode == mode for s in shards.values())
        ):
            # the deadline's round: everything without an answer, whatever its attempts
            best = best_results(results) if results.height else results
            unanswered = pl.col("status").is_in(["canceled", "expired", "missing"]) | (
                (pl.col("status") == "errored") & pl.col("retryable")
            )
            due = best.filter(unanswered).select(
                "custom_id", pl.lit(0, pl.UInt32).alias("attempts")
            )
        if due.is_empty():
            return False
        over = self.over_budget(due, mode)
        if over is not None:
            paid, more = over
            log.warning(
                "not retrying %d request(s): spent $%.4f, retries could cost up to $%.4f "
                "more, over max_cost=$%.4f",
                due.height,
                paid,
                more,
                self.settings.max_cost,
            )
            self.ckpt.append("retries_skipped", requests=due.height, reason="max_cost")
            return False
        requests = (
            pl.scan_parquet(self.ckpt.path / "requests.parquet")
            .join(due.lazy().select("custom_id"), on="custom_id", how="semi")
            .sort("custom_id")
            .collect()
        )
        # Shards a full queue refused in the last round come back at half their size, so they
        # fit once it drains.
        last = max(s.round for s in shards.values())
        sizes = [s.requests for s in shards.values() if s.queue_limited and s.round == last]
        max_requests = max(1, min(sizes) // 2) if sizes else self.settings.max_shard_requests
        attempt = int(due["attempts"].fill_null(0).max() or 0) + 1  # type: ignore[arg-type]
        prepared = Prepared(
            spec=self.spec,
            provider=self.provider,
            key=self.key,
            rows=pl.DataFrame(),
            requests=requests,
        )
        job = self.ckpt.job()
        log.info("retrying %d request(s), attempt %d", requests.height, attempt)
        plan_round(
            self.ckpt,
            prepared,
            attempt=attempt,
            first_index=max(shards) + 1,
            job_id=job["tag_id"],
            mode=mode,
            max_requests=max_requests,
            max_bytes=self.settings.max_shard_bytes,
            # the bounds stored with the requests when the job started
            max_tokens=self.settings.max_shard_tokens,
            tokens=requests.get_column("worst_input_tokens", default=None),
        )
        return True

    def _worst(self, sends: pl.DataFrame, mode: str | None = None) -> float:
        """The most the provider can bill for ``sends`` (one ``custom_id`` row per send):
        each request's worst-case input tokens (recorded when the job was planned) and every
        output at the cap, in the price tier that size falls in."""
        if sends.is_empty():
            return 0.0
        requests = pl.scan_parquet(self.ckpt.path / "requests.parquet")
        if "worst_input_tokens" not in requests.collect_schema().names():
            # A checkpoint from before per-request bounds: the estimate's average.
            return sends.height * (self.worst_cost_per_request or 0.0)
        cap = 0 if self.spec.task == "embed" else (self.spec.max_output_tokens or 0)
        bounds = sends.lazy().join(
            requests.select("custom_id", "worst_input_tokens"), on="custom_id", how="left"
        )
        cost = cost_expr(
            self.ckpt.job().get("price") or {},
            batch=(mode or self.settings.mode) in HALF_PRICE_MODES,
            input_tokens=pl.col("worst_input_tokens"),
            output_tokens=pl.lit(cap),
        )
        return float(bounds.select(cost.sum()).collect().item() or 0.0)


class _Queue:
    """The batches a pass sees live at the provider, and what may join them: at most
    ``max_in_flight``, and (once the provider has refused one for a full queue) no more
    worst-case tokens or requests than were live when it refused, less one (raised as the
    queue turns over: :meth:`.Checkpoint.queue_ceiling`). With nothing live
    a shard is always sent: alone, a refusal means it is over the limit by itself (split)."""

    def __init__(self, engine: Engine, shards: dict[int, ShardRecord]) -> None:
        self.engine = engine
        live = [
            r for r in shards.values() if r.submitted and not r.done and r.mode not in ONE_BY_ONE
        ]
        self.live = len(live)
        self.tokens = sum(r.tokens for r in live)
        self.requests = sum(r.requests for r in live)
        # a shard recorded before shards kept their tokens counts 0: the token sum is unknown
        self.tokens_known = all(r.tokens for r in live)
        # what the provider's queue refused, less one (raised once the queue turns over)
        self.ceiling = engine.ckpt.queue_ceiling()

    def holds(self, s: ShardRecord) -> bool:
        limit = self.engine.settings.max_in_flight
        if limit is not None and self.live >= limit:
            return True
        if self.ceiling is None or not self.live:
            return False
        tokens, requests = self.ceiling
        over_tokens = tokens is not None and self.tokens + s.tokens > tokens
        return over_tokens or self.requests + s.requests > requests

    def took(self, s: ShardRecord) -> None:
        self.live += 1
        self.tokens += s.tokens
        self.requests += s.requests
        self.tokens_known &= s.tokens > 0

    def refused(self, s: ShardRecord) -> None:
        known = self.tokens_known and s.tokens > 0
        self.ceiling = self.engine.learn_ceiling(
            s, self.tokens + s.tokens - 1 if known else None, self.requests + s.requests - 1
        )


def _unanswered(ids: pl.Series, status: str, error: str, *, retryable: bool) -> pl.DataFrame:
    """A result row of ``status`` for each of ``ids``, none of which was answered."""
    return missing_results(ids).with_columns(
        pl.lit(status).alias("status"),
        pl.lit(error).alias("error"),
        pl.lit(retryable).alias("retryable"),
    )


def _stamped(rows: pl.DataFrame, attempt: int, shard: int, mode: str) -> pl.DataFrame:
    """Result rows as a results file holds them: the attempt, shard and mode they came by."""
    return rows.select(list(RESULT_SCHEMA)).with_columns(
        pl.lit(attempt, pl.Int32).alias("attempt"),
        pl.lit(shard, pl.Int32).alias("shard"),
        pl.lit(mode).alias("mode"),
    )


def _counts(rows: pl.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in rows["status"].value_counts().iter_rows()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _merge_part(part: Path, stored: bytes | None, provider: Provider) -> None:
    """Add to the local ``.part`` the answers in the store's copy it lacks (sent from another
    machine, or before this mirror was made); either may hold answers the other does not."""
    if not stored:
        return
    have = _part_ids(part, provider)
    extra = []
    for custom_id, line in _answer_lines(stored, provider):
        if custom_id not in have:
            have.add(custom_id)
            extra.append(line)
    if extra:
        with open(part, "ab") as f:
            f.write(b"".join(extra))
        fsync(part)


def _part_ids(part: Path, provider: Provider) -> set[str]:
    """custom_ids already answered in a sync ``.part`` file (a torn last line is dropped)."""
    if not part.exists():
        return set()
    data = part.read_bytes()
    answered = list(_answer_lines(data, provider))
    keep = sum(len(line) for _, line in answered)
    if keep != len(data):  # cut the torn tail so new lines start clean
        with open(part, "r+b") as f:
            f.truncate(keep)
    return {custom_id for custom_id, _ in answered}


def _answer_lines(data: bytes, provider: Provider) -> Iterator[tuple[str, bytes]]:
    """``(custom_id, line)`` of a ``.part`` file's whole lines, up to a torn or cut one."""
    import orjson

    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        yield str(provider.line_id(obj)), line
