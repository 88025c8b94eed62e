"""The ``.llm`` namespace on ``pl.DataFrame`` and ``pl.LazyFrame``: a thin facade, no logic."""

from __future__ import annotations

import contextlib
import inspect
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch import options
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.estimate import Estimate, check_fits, estimate
from polars_llmbatch.plan.prices import check_model, check_override
from polars_llmbatch.plan.requests import OnNull, Prepared, prepare, render_plan, row_ids
from polars_llmbatch.plan.shards import check_caps, check_target, plan, write_shards
from polars_llmbatch.plan.spec import GENERATION_OPTIONS, Task
from polars_llmbatch.plan.stream import Staged, stage
from polars_llmbatch.plan.template import Template
from polars_llmbatch.providers import Provider, get_provider

__all__ = ["LlmNamespace"]


class LlmNamespace:
    """``df.llm``: estimate and build provider batch requests from a frame.

    On a ``LazyFrame``, ``estimate`` and ``requests`` read only the columns the prompt, system
    prompt and ``id=`` use, a slice at a time, and stage the requests on disk (bounded memory
    however many rows: docs/scale-out.md); ``batch`` collects those columns once.
    """

    def __init__(self, frame: pl.DataFrame | pl.LazyFrame) -> None:
        self._frame = frame

    def estimate(
        self,
        prompt: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        output: Any = None,
        system: str | pl.Expr | None = None,
        id: str | None = None,
        task: Task = "generate",
        on_null: OnNull = "skip",
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        reasoning_effort: str | None = None,
        dimensions: int | None = None,
        api: str | None = None,
        extra_body: dict[str, Any] | None = None,
        prices: dict[str, float] | None = None,
        expected_output_tokens: float | None = None,
        exact: bool = False,
        calibrate: bool | int = False,
        pilot: int | None = None,
        max_cost: float | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
        max_shard_tokens: int | None = None,
        checkpoint: str | Path | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> Estimate:
        """Tokens and cost of sending one request per row, at batch and sync rates; nothing is sent.

        Identical prompts share one request (and are paid once). Input tokens are exact for
        OpenAI up to 20,000 unique requests and sampled above that (``exact=True`` counts all);
        Anthropic and Gemini are approximated with an error band, or, with
        ``calibrate=True``, measured: a stratified sample of 200 requests (or ``calibrate=N``)
        is counted by the provider's free token-count endpoint (this needs the key, as
        ``batch`` does) and the offline count is scaled by it. ``pilot=N`` sends N sampled
        requests through the sync endpoints first, at sync prices (the only thing
        ``estimate`` ever pays for): the expected output, with its interval, comes from their
        answers, and the pilot is kept next to ``checkpoint=`` for the batch to reuse.
        ``max_cost`` (USD) raises :class:`~polars_llmbatch.BudgetExceededError` when the worst
        case is over it (the pilot's included).

        Example:
            >>> import polars as pl, polars_llmbatch
            >>> df = pl.DataFrame({"body": ["I was charged twice", "The app crashes"]})
            >>> est = df.llm.estimate("Classify this ticket: {body}", provider="openai",
            ...                       model="gpt-4o-mini", output=["billing", "bug"],
            ...                       max_output_tokens=20)
            >>> est.unique_requests, est.output_tokens_worst, est.cost_batch < est.cost_sync
            (2, 40, True)
        """
        options.check("estimate", locals())
        check_caps(get_provider(provider), max_shard_requests, max_shard_bytes, max_shard_tokens)
        check_override(prices)
        prov = get_provider(provider)
        creds = _credentials_for(prov, bool(calibrate or pilot), api_key, base_url)
        planning = {
            # A budget is a promise: count every request, so the worst case is a bound.
            "exact": exact or max_cost is not None,
            "prices": prices,
            "expected_output_tokens": expected_output_tokens,
            "max_shard_requests": max_shard_requests,
            "max_shard_bytes": max_shard_bytes,
            "max_shard_tokens": max_shard_tokens,
        }
        with contextlib.ExitStack() as stack:
            # a pilot sends requests drawn from the whole job: it needs the job in memory
            prepared = (
                _prepare(self._frame, prompt, locals())
                if pilot
                else _source(self._frame, prompt, locals(), stack)
            )
            calibration: dict[str, Any] = {}
            if creds is not None and calibrate:
                from polars_llmbatch.run.transport import Transport

                transport = stack.enter_context(Transport(creds))
                calibration = _calibration(prepared, calibrate, transport)
            report = None
            if pilot:
                from polars_llmbatch.run.engine import Settings
                from polars_llmbatch.run.pilot import run_pilot

                report = run_pilot(
                    prepared, pilot, checkpoint=checkpoint, creds=creds,
                    settings=Settings(progress=False), tags=None, planning=planning,
                    max_cost=max_cost,
                )  # fmt: skip
            est = estimate(prepared, **planning, **calibration, pilot=report).estimate
        if report is not None:
            from polars_llmbatch.run.pilot import budget_left

            max_cost = budget_left(max_cost, report)
        est.check_budget(max_cost)
        return est

    def requests(
        self,
        prompt: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        output: Any = None,
        system: str | pl.Expr | None = None,
        id: str | None = None,
        task: Task = "generate",
        on_null: OnNull = "skip",
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        reasoning_effort: str | None = None,
        dimensions: int | None = None,
        api: str | None = None,
        extra_body: dict[str, Any] | None = None,
        write_to: str | Path | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
    ) -> pl.DataFrame:
        """The request per row: row key, ``custom_id`` and the exact JSON ``body`` (null if skipped).

        Rows with identical bodies share one ``custom_id``. With ``write_to=DIR`` the unique
        requests are also written as the shard files a batch would upload, byte for byte
        (``DIR/00000.jsonl``, ...), for people who submit by hand.

        Example:
            >>> import polars as pl, polars_llmbatch
            >>> df = pl.DataFrame({"body": ["hi", "hi", None]})
            >>> reqs = df.llm.requests("Say: {body}", provider="openai", model="gpt-4o-mini")
            >>> reqs.columns, reqs["custom_id"].n_unique()
            (['row_nr', 'custom_id', 'body'], 2)
        """
        options.check("requests", locals())
        with contextlib.ExitStack() as stack:
            return _request_rows(_requests(self._frame, prompt, locals(), stack))

    def batch(
        self,
        prompt: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        output: Any = None,
        system: str | pl.Expr | None = None,
        id: str | None = None,
        checkpoint: str | Path | None = None,
        mode: str = "batch",
        max_cost: float | None = None,
        deadline: str | datetime | float | None = None,
        wait: bool = True,
        tags: dict[str, str] | None = None,
        usage: bool = False,
        max_attempts: int = 3,
        progress: bool = True,
        poll_interval: float = 5.0,
        concurrency: int = 8,
        api_key: str | None = None,
        base_url: str | None = None,
        on_null: OnNull = "skip",
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        reasoning_effort: str | None = None,
        api: str | None = None,
        extra_body: dict[str, Any] | None = None,
        prices: dict[str, float] | None = None,
        expected_output_tokens: float | None = None,
        calibrate: bool | int = False,
        pilot: int | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
        max_shard_tokens: int | None = None,
        max_in_flight: int | None = None,
    ) -> Any:
        """Run one request per row through the provider's batch API (half price) and join the
        answers back onto the frame, in the same row order.

        Returns the frame with the output column(s) (free text, an Enum for categories, typed
        columns for a mapping or pydantic model), ``llm_status`` and ``llm_error`` (with
        ``usage=True`` also ``llm_input_tokens``, ``llm_output_tokens`` and ``llm_cost``). With
        ``wait=False`` it returns a :class:`~polars_llmbatch.Job` at once.

        Everything is checkpointed (``checkpoint=``, default: a folder named by the job under
        the user cache directory): re-running the same call reattaches to the job instead of
        paying again, and results of identical requests in sibling checkpoints are reused.
        ``max_cost`` (USD) is checked on the worst case before anything is sent, and again
        before retries. ``mode="sync"`` sends the same requests to the sync endpoints
        (``concurrency`` at a time); ``mode="auto"`` picks sync for small jobs
        (:data:`~polars_llmbatch.run.start.AUTO_SYNC_MAX_REQUESTS`). A ``LazyFrame`` is collected
        for the prompt's columns; the result is the LazyFrame with the new columns (the
        input plan is evaluated again, so it must give its rows in a stable order).

        Example:
            >>> import polars as pl, polars_llmbatch, tempfile
            >>> from polars_llmbatch.emulator import serve
            >>> df = pl.DataFrame({"body": ["I was charged twice", "The app crashes"]})
            >>> with serve(batch_seconds=0.1) as emu:
            ...     out = df.llm.batch("Classify this ticket: {body}", provider="openai",
            ...                        model="gpt-4o-mini", output=["billing", "bug"],
            ...                        checkpoint=tempfile.mkdtemp() + "/tickets",
            ...                        api_key="test", base_url=emu.openai_url,
            ...                        progress=False, poll_interval=0.05)
            >>> out.columns, out["llm_status"].to_list()
            (['body', 'label', 'llm_status', 'llm_error'], ['succeeded', 'succeeded'])
        """
        options.check("batch", locals())
        return _run(self._frame, prompt, "generate", locals())

    def embed(
        self,
        text: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        dimensions: int | None = None,
        name: str = "embedding",
        id: str | None = None,
        checkpoint: str | Path | None = None,
        mode: str = "batch",
        max_cost: float | None = None,
        deadline: str | datetime | float | None = None,
        wait: bool = True,
        tags: dict[str, str] | None = None,
        usage: bool = False,
        max_attempts: int = 3,
        progress: bool = True,
        poll_interval: float = 5.0,
        concurrency: int = 8,
        api_key: str | None = None,
        base_url: str | None = None,
        on_null: OnNull = "skip",
        extra_body: dict[str, Any] | None = None,
        prices: dict[str, float] | None = None,
        calibrate: bool | int = False,
        pilot: int | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
        max_shard_tokens: int | None = None,
        max_in_flight: int | None = None,
    ) -> Any:
        """Embed one text per row (a column name, a template or an expression) into a
        ``pl.Array(pl.Float32, dim)`` column ``name``, through the batch API; the same
        checkpoints, statuses and options as :meth:`batch`.

        Example:
            >>> import polars as pl, polars_llmbatch, tempfile
            >>> from polars_llmbatch.emulator import serve
            >>> df = pl.DataFrame({"title": ["red shoes", "blue hat"]})
            >>> with serve(batch_seconds=0.1) as emu:
            ...     out = df.llm.embed("title", provider="openai", model="text-embedding-3-small",
            ...                        dimensions=8, checkpoint=tempfile.mkdtemp() + "/emb",
            ...                        api_key="test", base_url=emu.openai_url,
            ...                        progress=False, poll_interval=0.05)
            >>> out.schema["embedding"]
            Array(Float32, shape=(8,))
        """
        options.check("embed", locals())
        schema = (
            self._frame.collect_schema()
            if isinstance(self._frame, pl.LazyFrame)
            else self._frame.schema
        )
        if isinstance(text, str) and text in schema:
            text = pl.col(text).cast(pl.String)
        elif (
            isinstance(text, str)
            and not re.fullmatch(r"\w+", text)
            and not Template.parse(text).columns
        ):  # a constant: every row would embed the same text
            raise LlmBatchError(
                f"embed text {text!r} names no column, so every row would embed the same "
                f"text; name a column ({list(schema.names())}) or a template like "
                "'{title}: {body}' (for one fixed text, pass pl.lit(...))"
            )
        args = dict(locals())
        args.update(prompt=text, output=None, system=None, api=None, expected_output_tokens=0)
        args.update({k: None for k in GENERATION_OPTIONS})
        return _run(self._frame, text, "embed", args)


def _run(frame: pl.DataFrame | pl.LazyFrame, prompt: Any, task: Task, args: dict[str, Any]) -> Any:
    """``batch`` and ``embed``: every check that needs no data, then prepare, checkpoint, run."""
    from polars_llmbatch.collect.reconcile import (
        INTERNAL_PREFIX,
        check_output_names,
        output_names,
    )
    from polars_llmbatch.run.engine import Settings
    from polars_llmbatch.run.job import Job, out_of_core_rows
    from polars_llmbatch.run.start import start
    from polars_llmbatch.run.transport import Transport, credentials

    # the options' own checks ran in the method (options.check); these span options
    prov = get_provider(args["provider"])
    check_caps(prov, args["max_shard_requests"], args["max_shard_bytes"], args["max_shard_tokens"])
    check_override(args["prices"])
    check_model(prov, args["model"], task, args["prices"])
    out_of_core_rows()  # a bad POLARS_LLMBATCH_OUT_OF_CORE_ROWS fails now, not after paying
    given = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    ours = [c for c in given if c.startswith(INTERNAL_PREFIX)]
    if ours:  # the results' joins add columns of these names: a clash would fail after paying
        raise LlmBatchError(
            f"the frame has column(s) {ours}: names starting with {INTERNAL_PREFIX!r} are "
            "polars_llmbatch's own; rename them before the call (frame.rename({...}))"
        )
    max_attempts = args["max_attempts"]
    tags = args["tags"]
    # A missing key is an error now, before the frame is read or anything is written.
    creds = credentials(
        prov.name,
        api_key=args["api_key"] or prov.api_key,
        base_url=args["base_url"] or prov.base_url,
    )
    args = {"dimensions": None, **args, "task": task}
    with contextlib.ExitStack() as stack:
        # A LazyFrame is staged on disk (bounded memory) unless a pilot must draw from it whole;
        # the staging folder goes once the checkpoint holds the requests.
        prepared = (
            _source(frame, prompt, args, stack)
            if not args["pilot"]
            else _prepare(frame, prompt, args)
        )
        check_fits(prepared, args["prices"])
        deadline = options.deadline_at(args["deadline"])
        if deadline is not None and args["mode"] not in ("auto", "batch"):
            raise LlmBatchError(
                f"deadline= is for batches (mode='auto' or 'batch'); mode={args['mode']!r} sends "
                "everything at once"
            )
        has_flex = prov.flex_body(prepared.spec, "{}") is not None
        fallback = "flex" if has_flex else "sync"
        if args["mode"] == "flex" and not has_flex:
            what = "embeddings" if task == "embed" else f"{prov.name} requests"
            raise LlmBatchError(
                f"mode='flex': {what} have no flex tier (OpenAI and Gemini chat models do); use "
                "mode='batch' for half price, or mode='sync'"
            )
        name = args.get("name") if task == "embed" else None
        check_output_names(prepared.spec, prepared.key, name)
        clash = [c for c in output_names(prepared.spec, name, args["usage"]) if c in given]
        if clash:
            raise LlmBatchError(
                f"the frame already has column(s) {clash}, which the results would add; rename them "
                "or pick another output= name"
            )
        settings = Settings(
            mode=args["mode"],
            max_attempts=max_attempts,
            max_cost=args["max_cost"],
            poll_interval=args["poll_interval"],
            max_poll_interval=max(args["poll_interval"], Settings.max_poll_interval),
            concurrency=args["concurrency"],
            progress=args["progress"],
            max_shard_requests=args["max_shard_requests"],
            max_shard_bytes=args["max_shard_bytes"],
            max_shard_tokens=args["max_shard_tokens"],
            max_in_flight=args["max_in_flight"],
        )
        max_cost = args["max_cost"]
        report = None
        if args["pilot"] and not _job_exists(args["checkpoint"]):
            planning = {k: args[k] for k in ("prices", "max_shard_requests", "max_shard_bytes")}
            planning.update(
                max_shard_tokens=args["max_shard_tokens"],
                expected_output_tokens=args["expected_output_tokens"],
                exact=max_cost is not None,
            )
            from polars_llmbatch.run.pilot import budget_left, run_pilot

            report = run_pilot(
                prepared, args["pilot"], checkpoint=args["checkpoint"], creds=creds,
                settings=settings, tags=tags, planning=planning, max_cost=max_cost,
            )  # fmt: skip
            max_cost = budget_left(max_cost, report)
            settings = Settings(**{**settings.__dict__, "max_cost": max_cost})
        transport = Transport(creds)
        ckpt, _ = start(
            prepared,
            checkpoint=args["checkpoint"],
            mode=args["mode"],
            settings=settings,
            transport=transport,
            tags=tags,
            estimate_args={
                "prices": args["prices"],
                "expected_output_tokens": args["expected_output_tokens"],
                "max_shard_requests": args["max_shard_requests"],
                "max_shard_bytes": args["max_shard_bytes"],
                "max_shard_tokens": args["max_shard_tokens"],
                **_calibration(prepared, args["calibrate"], transport),
                "pilot": report,
            },
            max_cost=max_cost,
            output_name=name,
            deadline=deadline,
            fallback=fallback,
        )
        # this call's rows (a reattached job may list them in another order); a staged frame's
        # are read from the checkpoint when needed
        rows = prepared.rows if isinstance(prepared, Prepared) else None
        ids = prepared.row_ids if isinstance(prepared, Prepared) else row_ids(prepared.plan)
        del prepared  # the checkpoint holds the requests now; waiting needs none of it in memory
    settings = Settings(**{**settings.__dict__, "mode": ckpt.job()["mode"]})
    job = Job(
        ckpt,
        transport,
        frame=frame,
        settings=settings,
        usage=args["usage"],
        rows=rows,
        row_ids=ids,
    )
    if not args["wait"]:
        job._start_background()  # submitted when this returns; polled in the background
        return job
    with job:  # its connections are closed once the result is read
        return job.wait().result()


def _credentials_for(
    prov: Provider, needed: bool, api_key: str | None, base_url: str | None
) -> Any:
    """The key ``estimate`` needs for calibration or a pilot (it sends nothing else), or
    None when it needs none."""
    if not needed:
        return None
    from polars_llmbatch.run.transport import credentials

    return credentials(
        prov.name, api_key=api_key or prov.api_key, base_url=base_url or prov.base_url
    )


def _calibration(
    prepared: Prepared | Staged, calibrate: bool | int, transport: Any
) -> dict[str, Any]:
    """``estimate``'s calibration arguments for ``calibrate=``: the provider's count
    endpoint over ``transport``, and the sample size."""
    if not calibrate:
        return {}
    from polars_llmbatch.plan.calibrate import SAMPLE, remote_counter

    return {
        "count": remote_counter(prepared.provider, prepared.spec, transport),
        "calibrate_sample": SAMPLE if calibrate is True else int(calibrate),
    }


def _job_exists(checkpoint: str | Path | None) -> bool:
    """Whether ``checkpoint`` already holds a job: a re-run reattaches and pilots nothing."""
    from polars_llmbatch.run.checkpoint import Checkpoint

    return checkpoint is not None and Checkpoint(checkpoint).exists()


_REQUEST_ARGS = ("provider", "model", "output", "system", "id", "task", "on_null")
_REQUEST_ARGS += ("dimensions", "api", "extra_body")


def _prepare(frame: pl.DataFrame | pl.LazyFrame, prompt: Any, args: dict[str, Any]) -> Prepared:
    """``prepare`` with the namespace method's own arguments (its ``locals()``): the methods
    spell every option out for their signatures and docs, and share this one call."""
    return prepare(frame, prompt, **_call(args))


def _call(args: dict[str, Any]) -> dict[str, Any]:
    """The request arguments of a method's ``locals()``, as ``prepare`` / ``render_plan`` take them."""
    options = {name: args[name] for name in GENERATION_OPTIONS}
    return {"options": options, **{k: args[k] for k in _REQUEST_ARGS}}


def _source(
    frame: pl.DataFrame | pl.LazyFrame,
    prompt: Any,
    args: dict[str, Any],
    stack: contextlib.ExitStack,
) -> Prepared | Staged:
    """The call's requests: a DataFrame's prepared in memory; a LazyFrame's staged on disk by
    streaming preparation (:mod:`.plan.stream`), in a temporary folder that ``stack`` removes
    (under ``TMPDIR``; it takes about twice the rendered texts)."""
    if isinstance(frame, pl.DataFrame):
        return _prepare(frame, prompt, args)
    rplan = render_plan(frame.collect_schema(), prompt, **_call(args))
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmbatch-")))
    text = prompt.source if isinstance(prompt, Template) else str(prompt)
    return stage(frame, rplan, folder / "staged", prompt=text)


def _requests(
    frame: pl.DataFrame | pl.LazyFrame,
    prompt: Any,
    args: dict[str, Any],
    stack: contextlib.ExitStack,
) -> Prepared | Staged:
    """``requests``' work but the returned frame: the requests, checked, and the shard files
    written when ``write_to`` is given."""
    check_caps(get_provider(args["provider"]), args["max_shard_requests"], args["max_shard_bytes"])
    if args["write_to"] is not None:
        check_target(args["write_to"])
    source = _source(frame, prompt, args, stack)
    check_fits(source)
    if args["write_to"] is not None:
        caps = {"max_requests": args["max_shard_requests"], "max_bytes": args["max_shard_bytes"]}
        write_shards(source, plan(source, **caps), args["write_to"])
    return source


@contextlib.contextmanager
def request_files(
    frame: pl.DataFrame | pl.LazyFrame, prompt: Any, **kwargs: Any
) -> Iterator[Prepared | Staged]:
    """:meth:`LlmNamespace.requests` (same arguments) without the frame it returns, which
    holds every row's body: the CLI's ``requests --write-to`` on a frame of any size. Yields
    the requests (staged on disk for a LazyFrame, removed on exit)."""
    bound = inspect.signature(LlmNamespace.requests).bind(None, prompt, **kwargs)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k != "self"}
    options.check("requests", args)
    with contextlib.ExitStack() as stack:
        yield _requests(frame, prompt, args, stack)


def _request_rows(source: Prepared | Staged) -> pl.DataFrame:
    """Every row's key, ``custom_id`` and body (null when skipped), in input order."""
    if isinstance(source, Prepared):
        rows, bodies = source.rows, source.requests.select("custom_id", "body")
    else:
        rows = source.row_table().collect()
        bodies = pl.concat(source.pieces(["custom_id", "body"]))
    return rows.join(bodies, on="custom_id", how="left", maintain_order="left").select(
        source.key, "custom_id", "body"
    )


def register() -> None:
    """Register ``.llm`` on DataFrame and LazyFrame (idempotent)."""
    pl.api.register_dataframe_namespace("llm")(LlmNamespace)
    pl.api.register_lazyframe_namespace("llm")(LlmNamespace)
