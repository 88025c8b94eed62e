"""The handle on a checkpointed job: reopen it from any process, wait, cancel, read results.

Starting a job is in :mod:`start`, reusing earlier answers in :mod:`cache`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import html
import logging
import math
import os
import secrets
import shlex
import sys
import tempfile
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch import options
from polars_llmbatch._checks import check_bool, check_checkpoint, check_seconds
from polars_llmbatch.collect.decoded import decoded_outputs
from polars_llmbatch.collect.reconcile import (
    CID,
    IN_JOB,
    SKIPPED,
    finish_rows,
    read_results,
    request_outputs,
    spent,
    status_counts,
)
from polars_llmbatch.collect.spill import result_folder, spilled_counts, spilled_result
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.estimate import Estimate
from polars_llmbatch.plan.prices import HALF_PRICE_MODES
from polars_llmbatch.plan.requests import RowIds
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers import Provider, get_provider
from polars_llmbatch.run.checkpoint import Checkpoint, LockedError
from polars_llmbatch.run.engine import ONE_BY_ONE, Engine, Settings
from polars_llmbatch.run.transport import Transport, credentials

__all__ = ["RETRY_STATUSES", "Job", "JobStatus"]

#: A job of this many input rows or more (reopened, or made from a LazyFrame) gets its
#: result joined on disk: a LazyFrame over Parquet files (see :meth:`Job.result`). The
#: environment variable ``POLARS_LLMBATCH_OUT_OF_CORE_ROWS`` sets another (a machine with
#: little memory: lower).
OUT_OF_CORE_ROWS = 1_000_000
_OUT_OF_CORE_VAR = "POLARS_LLMBATCH_OUT_OF_CORE_ROWS"


def out_of_core_rows() -> int:
    """From how many input rows a job is joined and counted on disk: ``OUT_OF_CORE_ROWS``, or
    the ``POLARS_LLMBATCH_OUT_OF_CORE_ROWS`` environment variable (checked here)."""
    text = os.environ.get(_OUT_OF_CORE_VAR)
    if text is None:
        return OUT_OF_CORE_ROWS
    try:
        limit = int(text)
        if limit < 0:
            raise ValueError
    except ValueError:
        raise LlmBatchError(
            f"{_OUT_OF_CORE_VAR}={text!r} is not a row count; set it to a whole number of rows "
            "(0: always join on disk) or unset it"
        ) from None
    return limit


def _huge(rows: int) -> bool:
    return rows >= out_of_core_rows()


#: The row statuses :meth:`Job.retry` sends again (errored: transient errors only).
RETRY_STATUSES = ("expired", "missing", "errored")

log = logging.getLogger("polars_llmbatch.job")


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands: rows by status, shards by state, money spent so far, and in a
    word (``state``): ``done``, ``not submitted`` (nothing has reached the provider yet),
    ``running at the provider``, ``sending`` (sync mode), ``retries due`` (finished batches
    left requests to send again: ``wait()`` or ``llmbatch resume`` sends them),
    ``collecting`` (batches ended, results not read yet) or ``planning`` (shard files still
    being written and none live: the runner submits each as soon as it is written)."""

    rows: dict[str, int]
    shards: dict[str, int]
    spent: float
    done: bool
    state: str = ""
    retries_due: int = 0

    def __repr__(self) -> str:
        rows = ", ".join(f"{k} {v:,}" for k, v in self.rows.items() if v)
        shards = ", ".join(f"{k} {v}" for k, v in self.shards.items())
        return (
            f"JobStatus({self.state or ('done' if self.done else 'running')}; rows: {rows}; "
            f"shards: {shards}; spent ${self.spent:,.4f})"
        )


#: Whose words a job's hints use (see :attr:`Job.interface`).
INTERFACE: contextvars.ContextVar[str] = contextvars.ContextVar("interface", default="python")


class Job:
    """A batch job in a checkpoint directory.

    Create one with ``df.llm.batch(..., wait=False)``, or reopen any job with
    :meth:`Job.open` (another process, another kernel). Nothing is lost by dropping the object:
    the checkpoint holds everything.

    Example:
        >>> import polars as pl, polars_llmbatch, tempfile
        >>> from polars_llmbatch.emulator import serve
        >>> with serve(batch_seconds=0.1) as emu:
        ...     df = pl.DataFrame({"body": ["refund please", "app crashes"]})
        ...     job = df.llm.batch("Classify: {body}", provider="openai", model="gpt-4o-mini",
        ...                        output=["billing", "bug"], wait=False, progress=False,
        ...                        checkpoint=tempfile.mkdtemp() + "/job", poll_interval=0.05,
        ...                        api_key="test", base_url=emu.openai_url)
        ...     job.close()  # submitted; its process lets go, and another one takes over
        ...     again = polars_llmbatch.Job.open(job.path, api_key="test", base_url=emu.openai_url,
        ...                                      progress=False, poll_interval=0.05)
        ...     out = again.wait().result()
        >>> out.columns, again.status().done
        (['row_nr', 'label', 'llm_status', 'llm_error'], True)
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        transport: Transport | None,
        *,
        frame: pl.DataFrame | pl.LazyFrame | None = None,
        settings: Settings | None = None,
        usage: bool = False,
        rows: pl.DataFrame | None = None,
        row_ids: RowIds | None = None,
    ) -> None:
        self._ckpt = ckpt
        # The row → request map of the call that made this object (its frame's rows, in its
        # order); a reopened job uses the checkpoint's.
        self._rows = rows
        self._row_ids = row_ids  # how the frame's rows map to requests (for a LazyFrame)
        self._counts: tuple[Any, dict[str, int]] | None = None  # see _status_counts
        self._job = ckpt.job()
        self._t = transport
        if transport is not None:  # a dropped Job closes its sockets
            weakref.finalize(self, transport.close)
        self._frame = frame
        self._usage = usage
        self.spec = RequestSpec.from_dict(self._job["spec"], self._job.get("output_dtypes"))
        self.provider: Provider = get_provider(self.spec.provider)
        self._settings = settings or Settings(**_kept_settings(self._job))

    # opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        checkpoint: str | Path,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        progress: bool = True,
        poll_interval: float = 5.0,
    ) -> Job:
        """Reopen the job in ``checkpoint``; credentials come from the same environment
        variables as the provider's SDK (or ``api_key=`` / ``base_url=``). Without a key the
        job can still be read (``status``, ``result``); ``wait`` and ``cancel`` need one."""
        check_checkpoint(checkpoint)
        check_seconds("poll_interval", poll_interval)
        ckpt = Checkpoint(checkpoint)
        job = ckpt.job()
        try:
            creds = credentials(job["spec"]["provider"], api_key=api_key, base_url=base_url)
        except LlmBatchError as exc:
            creds, missing = None, str(exc)
        else:
            missing = None
        settings = Settings(
            **_kept_settings(job),
            poll_interval=poll_interval,
            max_poll_interval=max(poll_interval, Settings.max_poll_interval),
            progress=progress,
        )
        opened = cls(ckpt, Transport(creds) if creds else None, settings=settings)
        opened._missing_key = missing
        return opened

    def close(self) -> None:
        """Stop any background runner of this object and close the connections it opened
        (also done when it is garbage collected). The job itself is untouched: reopen it any
        time with :meth:`open`."""
        self._stop_background(raise_error=False)  # an error waits for wait() to raise it
        if self._t is not None:
            self._t.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # facts -----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._ckpt.path

    @property
    def id(self) -> str:
        return str(self._job["job_id"])

    @property
    def mode(self) -> str:
        return str(self._job["mode"])

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._job.get("tags") or {})

    @property
    def estimate(self) -> Estimate:
        """The :class:`~polars_llmbatch.Estimate` made before anything was sent, as
        ``df.llm.estimate`` shows it (``.to_dict()`` for plain data)."""
        return Estimate.from_dict(self._job["estimate"])

    @property
    def interface(self) -> str:
        """Whose words the hints use: "python", or "cli" (the ``llmbatch`` command sets
        :data:`INTERFACE` for the jobs it makes and opens)."""
        return INTERFACE.get()

    _interrupt_said = False

    def _say_interrupted(self) -> None:
        """Say, once, that an interrupted job keeps running and how to go on with it."""
        if self._interrupt_said:
            return
        self._interrupt_said = True
        print(
            "\nInterrupted. The remote batches keep running and the checkpoint is "
            f"consistent:\n  {self._ckpt.location}\n{self._next_steps()}",
            file=sys.stderr,
        )

    def _next_steps(self) -> str:
        """How to go on with this job, in the words of the interface the user is in."""
        if self.interface == "cli":
            quoted = shlex.quote(self._ckpt.location)
            return f"Resume: llmbatch resume {quoted}; cancel: llmbatch cancel {quoted}"
        path = repr(self._ckpt.location)
        return (
            f"Resume: polars_llmbatch.Job.open({path}).wait() (or re-run the same call); "
            f"cancel: polars_llmbatch.Job.open({path}).cancel()"
        )

    _missing_key: str | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event | None = None
    _error: BaseException | None = None

    def _engine(self, *, progress: bool | None = None) -> Engine:
        if self._t is None:
            raise LlmBatchError(self._missing_key or "this Job was opened without credentials")
        settings = self._settings
        if progress is not None:
            settings = Settings(**{**settings.__dict__, "progress": progress})
        est = self._job["estimate"]
        worst = est.get("worst_cost_batch" if self.mode in HALF_PRICE_MODES else "worst_cost_sync")
        n = est.get("unique_requests") or 0
        per_request = worst / n if worst is not None and n and math.isfinite(worst) else None
        return Engine(
            self._ckpt,
            self.provider,
            self.spec,
            self._t,
            settings,
            key=self._job["key"],
            worst_cost_per_request=per_request,
        )

    # running ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> Job:
        """Run the job until it is done (submit, poll, collect, retry); with ``timeout`` (seconds)
        return early, the job still running remotely. Ctrl-C leaves the remote batches running
        and the checkpoint consistent. A job moving in the background of this process
        (``batch(wait=False)``) is taken over here, with its progress bar, and moves on in the
        background again if ``timeout`` comes first."""
        check_seconds("timeout", timeout, zero=True, none=True)
        background = self._thread is not None
        try:
            self._stop_background()  # Ctrl-C may come while it finishes its step
            done = self._engine().run(timeout)
        except KeyboardInterrupt:
            self._say_interrupted()
            raise
        if not done and background:
            self._resume_background()
        return self

    def _start_background(self) -> None:
        """``batch(wait=False)``: send what is planned now (an error raises here, to the
        caller), then go on (poll, collect, retry) in a background thread of this process.
        A kernel that dies leaves a checkpoint any other process can resume."""
        try:
            if not self._engine().run(0):
                self._resume_background()
        except KeyboardInterrupt:  # mid-submission: what was sent is recorded
            self._say_interrupted()
            raise
        except LockedError:
            # Another process (or Job object) runs this job: it sends and collects; this
            # handle reads what it records.
            log.info("%s is run by another process; this Job only reads it", self.path)

    async def wait_async(self, timeout: float | None = None) -> Job:
        """``await job.wait_async()`` (or ``await job``): :meth:`wait` for code that runs an
        event loop (a notebook cell with ``await``, an async service). The job moves on in
        the background of this process and the loop stays free; with ``timeout`` (seconds)
        it returns early, the job still running. Cancelling the await leaves the job running.

        Example:
            >>> import asyncio, polars as pl, polars_llmbatch, tempfile
            >>> from polars_llmbatch.emulator import serve
            >>> async def main(url):
            ...     job = pl.DataFrame({"body": ["refund please"]}).llm.batch(
            ...         "Classify: {body}", provider="openai", model="gpt-4o-mini",
            ...         output=["billing", "bug"], wait=False, progress=False,
            ...         checkpoint=tempfile.mkdtemp() + "/job", poll_interval=0.05,
            ...         api_key="test", base_url=url)
            ...     with job:
            ...         await job
            ...         return job.result()["llm_status"].to_list()
            >>> with serve(batch_seconds=0.1) as emu:
            ...     asyncio.run(main(emu.openai_url))
            ['succeeded']
        """
        import asyncio

        check_seconds("timeout", timeout, zero=True, none=True)
        self._engine()  # no key: the same clear error as wait()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._thread is None or not self._thread.is_alive():
            await asyncio.to_thread(self._start_background)  # submitting may take a while
        while True:
            if self._thread is None or not self._thread.is_alive():
                self._raise_background_error()
                if self.status(refresh=False).done:  # else another process runs it
                    return self
            if deadline is not None and loop.time() >= deadline:
                return self
            await asyncio.sleep(min(self._settings.poll_interval, 0.5))

    def __await__(self) -> Any:
        return self.wait_async().__await__()

    def _resume_background(self) -> None:
        self._stop = stop = threading.Event()
        # No progress bar from a thread nobody is watching; wait() shows one.
        engine = self._engine(progress=False)

        def run() -> None:
            try:
                engine.run(stop=stop)
            except LockedError:
                pass  # another process took the job over: it runs it
            except BaseException as exc:  # kept for wait() to raise in the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"llmbatch-{self.id}", daemon=True)
        self._thread.start()
        _RUNNERS.add(self)

    def _stop_background(self, *, raise_error: bool = True) -> None:
        """Stop the background runner after its current step (the job stays resumable), and
        raise what made it stop, if anything did."""
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
            self._thread = None
        if raise_error:
            self._raise_background_error()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def retry(
        self,
        statuses: Sequence[str] = RETRY_STATUSES,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Job:
        """Send again, on this checkpoint, the requests whose rows ended with one of
        ``statuses`` after ``max_attempts`` (``expired``, ``missing``, or ``errored`` with a
        transient error): one more round for them, within ``max_cost`` as every round is. A
        success is never sent again, nor anything after a cancel. ``wait=False`` sends and
        returns, the job moving on in the background.

        Example: ``job.retry(["expired"])``; from the shell, ``llmbatch retry PATH --status
        expired``."""
        chosen = [statuses] if isinstance(statuses, str) else list(statuses)
        if not chosen or any(s not in RETRY_STATUSES for s in chosen):
            raise LlmBatchError(
                f"retry(statuses=...) takes some of {list(RETRY_STATUSES)}, got {statuses!r}"
            )
        check_bool("wait", wait)
        engine = self._engine()
        if engine.canceled():
            raise LlmBatchError("this job was cancelled: nothing is sent again after a cancel")
        self._stop_background()
        self._ckpt.append("retry_granted", statuses=sorted(set(chosen)))
        log.info("one more round granted for %s rows", ", ".join(sorted(set(chosen))))
        if wait:
            return self.wait(timeout)
        self._start_background()
        return self

    def cancel(self, *, wait: bool = True, timeout: float | None = None) -> Job:
        """Cancel the live batches. Requests already run are paid for, so their results are
        still collected (``wait=True`` waits for that); nothing is retried after a cancel."""
        engine = self._engine()
        n = engine.cancel()
        log.info("asked %d batch(es) to cancel", n)
        if wait:
            self._stop_background()  # it has seen the cancel; collecting goes on here
            try:
                engine.run(timeout, retry=False)
            except LockedError:
                log.info("another runner holds the job; it collects what the batches return")
        return self

    # reading ---------------------------------------------------------------------------------
    def status(self, *, refresh: bool = True) -> JobStatus:
        """Rows by status, shards by state, money spent and the job's ``state``.

        With ``refresh`` (the default) the live batches are asked once where they stand,
        and batches that ended are collected (read-only at the provider: nothing is ever
        submitted, cancelled or retried by a status); skipped when this object has no key or
        another runner holds the job (it records the same). ``refresh=False`` reads the
        checkpoint alone."""
        if refresh:
            self._refresh()
        shards = self._ckpt.shards()
        counts = self._status_counts()
        phases = Counter(
            "done" if s.done else (s.phase or ("submitted" if s.submitted else "planned"))
            for s in shards.values()
        )
        open_shards = [s for s in shards.values() if not s.done]
        planning = not self._ckpt.planning_done()
        retries = 0
        if not open_shards and not planning:
            # Read-only questions of the checkpoint: no transport needed.
            engine = Engine(self._ckpt, self.provider, self.spec, None, self._settings, key="")
            due = engine.due_retries(shards)
            if engine.over_budget(due) is None:
                retries = due.height
        done = not open_shards and counts["pending"] == 0 and retries == 0
        if done:
            state = "done"
        elif retries:
            state = "retries due"
        elif any(s.mode in ONE_BY_ONE and s.intent_at for s in open_shards):
            state = "sending"
        elif any(s.submitted and s.phase != "ended" for s in open_shards):
            state = "running at the provider"
        elif any(s.submitted for s in open_shards):
            state = "collecting"
        elif planning:
            state = "planning"
        else:
            state = "not submitted"
        return JobStatus(
            rows={k: v for k, v in counts.items()},
            shards=dict(phases),
            spent=spent(self._ckpt),
            done=done,
            state=state,
            retries_due=retries,
        )

    def _status_counts(self) -> dict[str, int]:
        """Rows per status as ``result()`` counts them (the answers decoded and checked against
        the schema), remembered until a results file changes: a repr asks often. The
        checkpoint's row table is streamed, never held (it has a row per input row); a huge
        job's is counted a bucket at a time from the decoded answers (:mod:`.collect.spill`)."""
        files = sorted((self._ckpt.path / "results").glob("*.parquet"))
        key = tuple((f.name, st.st_size, st.st_mtime_ns) for f in files if (st := f.stat()))
        which = self._rows.height if self._rows is not None else "checkpoint"
        if self._counts is None or self._counts[0] != (key, which):
            if self._rows is None and _huge(self.estimate.rows):
                counts = self._spilled_counts()
            else:
                rows = self._rows if self._rows is not None else self._ckpt.scan_rows()
                counts = status_counts(rows, read_results(self._ckpt), self.spec)
            self._counts = ((key, which), counts)
        return dict(self._counts[1])

    def _spilled_counts(self) -> dict[str, int]:
        derived = self._derived()
        decoded = decoded_outputs(
            self._ckpt.path,
            self.spec,
            price=self._job.get("price"),
            name=self._job.get("output_name"),
            folder=derived / "outputs",
        )
        frame, with_ids, _ = self._row_source(table=True)  # the job's rows, as status counts
        with result_folder(derived, prefix="counts") as folder:
            return spilled_counts(
                frame,
                with_ids,
                pl.scan_parquet(self._ckpt.path / "requests.parquet"),
                decoded,
                folder,
                n_rows=self.estimate.rows,
            )

    def _derived(self) -> Path:
        """Where derived files go: the checkpoint's ``derived/``, or a temporary folder when
        the checkpoint cannot be written (a shared, read-only copy)."""
        derived = self._ckpt.path / "derived"
        try:
            derived.mkdir(exist_ok=True)
            probe = derived / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.touch()
            probe.unlink()
        except OSError:
            if self._tmp_derived is None:
                self._tmp_derived = Path(tempfile.mkdtemp(prefix="llmbatch-derived-"))
            derived = self._tmp_derived
        return derived

    _tmp_derived: Path | None = None

    def _refresh(self) -> None:
        if self._t is None or (self._thread is not None and self._thread.is_alive()):
            return
        with contextlib.suppress(LockedError):  # another runner holds it: it records the same
            self._engine().refresh()

    def result(self, *, usage: bool | None = None) -> Any:
        """The output frame: the input frame (when this object was made from one) or the row
        key, plus the output column(s), ``llm_status`` and ``llm_error`` (and with ``usage``
        tokens and cost). Rows not finished yet are ``pending``.

        For a job made from a LazyFrame this is a LazyFrame: the input plan with the answers
        joined on each row's request (its rendered text), never on its position, so a plan
        that gives its rows in another order when evaluated again still gets its own answers.

        A job of :data:`OUT_OF_CORE_ROWS` (1,000,000) input rows or more, made from a
        LazyFrame or reopened, is joined on disk instead, in bounded memory: the input is
        evaluated once, here, and the result is a LazyFrame over Parquet files in the
        checkpoint's ``derived/`` folder (``sink_parquet`` it, or collect it, before asking for
        three more: only the newest three are kept).
        """
        usage = self._usage if usage is None else usage
        name = self._job.get("output_name")
        lazy = isinstance(self._frame, pl.LazyFrame) and self._row_ids is not None
        if (lazy or self._frame is None) and _huge(self.estimate.rows):
            return self._spilled_result(usage, name)
        outputs = request_outputs(
            read_results(self._ckpt), self.spec, price=self._job.get("price"), name=name
        )
        if isinstance(self._frame, pl.LazyFrame) and self._row_ids is not None:
            return self._lazy_result(self._frame, self._row_ids, outputs, usage, name)
        rows = self._rows if self._rows is not None else self._ckpt.rows()
        mapped = rows.select(
            pl.col(self._job["key"]),
            pl.col("custom_id").alias(CID),
            pl.col("skipped").alias(SKIPPED),
            pl.lit(True).alias(IN_JOB),
        )
        joined = mapped.join(outputs, on=CID, how="left", maintain_order="left")
        if self._frame is not None:  # a DataFrame: the rows map is in its order
            out = finish_rows(joined, self.spec, usage=usage, name=name)
            return pl.concat([self._frame, out], how="horizontal")
        return finish_rows(joined, self.spec, usage=usage, name=name, keep=[self._job["key"]])

    def _spilled_result(self, usage: bool, name: str | None) -> pl.LazyFrame:
        """A huge job's result joined on disk (:mod:`.collect.spill`): a scan of Parquet files
        in the checkpoint's ``derived/`` folder (a temporary folder if it cannot be written)."""
        derived = self._derived()
        decoded = decoded_outputs(
            self._ckpt.path,
            self.spec,
            price=self._job.get("price"),
            name=name,
            folder=derived / "outputs",
        )
        frame, with_ids, keep = self._row_source()
        with result_folder(derived) as folder:
            return spilled_result(
                frame,
                with_ids,
                pl.scan_parquet(self._ckpt.path / "requests.parquet"),
                decoded,
                self.spec,
                folder,
                n_rows=self.estimate.rows,
                keep=keep,
                usage=usage,
                name=name,
            )

    def _row_source(self, *, table: bool = False) -> tuple[pl.LazyFrame, Any, list[str]]:
        """What a spilled result reads: the rows (the LazyFrame this object was made from,
        or with ``table`` or without one the checkpoint's row table), how a slice of them gets
        its request ids, and the caller's columns."""
        if not table and isinstance(self._frame, pl.LazyFrame) and self._row_ids is not None:
            row_ids = self._row_ids

            def with_ids(lf: pl.LazyFrame) -> pl.LazyFrame:
                return row_ids.attach(lf, CID).with_columns(pl.col(CID).is_null().alias(SKIPPED))

            return self._frame, with_ids, self._frame.collect_schema().names()
        key = self._job["key"]

        def from_table(lf: pl.LazyFrame) -> pl.LazyFrame:
            return lf.select(
                pl.col(key), pl.col("custom_id").alias(CID), pl.col("skipped").alias(SKIPPED)
            )

        return self._ckpt.scan_rows(), from_table, [key]

    def _lazy_result(
        self,
        frame: pl.LazyFrame,
        row_ids: RowIds,
        outputs: pl.DataFrame,
        usage: bool,
        name: str | None,
    ) -> pl.LazyFrame:
        known = (
            pl.scan_parquet(self._ckpt.path / "requests.parquet")
            .select(pl.col("custom_id").alias(CID), pl.lit(True).alias(IN_JOB))
            .join(outputs.lazy(), on=CID, how="left")
        )
        user = frame.collect_schema().names()
        plan = (
            row_ids.attach(frame, CID)
            .join(known, on=CID, how="left", maintain_order="left")
            .with_columns(pl.col(CID).is_null().alias(SKIPPED))
        )
        return finish_rows(plan, self.spec, usage=usage, name=name, keep=user)

    # display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        st = self.status(refresh=False)  # a repr asks no provider
        rows = ", ".join(f"{k} {v:,}" for k, v in st.rows.items() if v)
        shards = ", ".join(f"{k} {v}" for k, v in st.shards.items())
        return (
            f"Job {self.id} ({self.spec.provider} {self.spec.model}, {self.mode}, "
            f"{st.state})\n"
            f"  rows:   {rows}\n  shards: {shards}\n  spent:  ${st.spent:,.4f}\n"
            f"  path:   {self._ckpt.location}"
        )

    def _repr_html_(self) -> str:
        st = self.status(refresh=False)
        right = 'style="text-align:right"'

        def table(title: str, counts: dict[str, int]) -> str:
            cells = "".join(
                f"<tr><td>{html.escape(k)}</td><td {right}>{v:,}</td></tr>"
                for k, v in counts.items()
                if v
            )
            return f"<table><tr><th>{title}</th><th {right}>count</th></tr>{cells}</table>"

        return (
            f"<b>Job {html.escape(self.id)}</b> ({html.escape(self.spec.provider)} "
            f"{html.escape(self.spec.model)}, {html.escape(self.mode)}, "
            f"{html.escape(st.state)}) — spent ${st.spent:,.4f}<br>"
            '<div style="display:flex;gap:2em">'
            f"{table('rows by status', st.rows)}{table('shards by state', st.shards)}</div>"
            f"<small>{html.escape(self._ckpt.location)}</small>"
        )


#: Jobs with a background runner in this process: stopped cleanly when the interpreter exits
#: (a thread killed inside native code at shutdown can crash the process on its way out).
_RUNNERS: weakref.WeakSet[Job] = weakref.WeakSet()


@atexit.register
def _stop_runners() -> None:
    for job in list(_RUNNERS):
        if job._stop is not None:
            job._stop.set()
    for job in list(_RUNNERS):
        if job._thread is not None:
            job._thread.join(timeout=30)  # its current step; the checkpoint stays resumable


def _kept_settings(job: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Settings` a job.json keeps (the options table's recorded options)."""
    kept = options.recorded(job)
    kept.pop("tags")  # a label, not a way of running
    return kept
