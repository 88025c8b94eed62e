"""Anthropic emulation: Message Batches and sync Messages, under ``/anthropic``.

Lifecycle ``in_progress → (canceling →) ended``; results (``succeeded``, ``errored``,
``canceled``, ``expired``) stream as JSONL from an absolute ``results_url``, in shuffled order.
Structural problems fail the create call; problems in a request come back as ``errored``.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson
import polars as pl

from polars_llmbatch.emulator import columns, model, reports, tokenizers
from polars_llmbatch.emulator.context import Context
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.http import Request, Response, Router
from polars_llmbatch.emulator.results import outcomes
from polars_llmbatch.emulator.store import BatchStore
from polars_llmbatch.emulator.timeline import Timeline

__all__ = ["AnthropicEmulator"]

PREFIX = "/anthropic/v1"
MAX_REQUESTS = 100_000
MAX_BYTES = 256_000_000
#: Create bodies of at least this many clean requests are read, checked, answered and billed
#: in columns (:func:`parse_batch`, :mod:`columns`), with no Python object per request; in
#: other batches, when at least this many requests ran they are answered in columns. Smaller
#: ones go request by request, which is faster below it.
COLUMNS_FROM = 500
_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": None}
    return Response.json(body, status, headers)


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Batch:
    id: str
    created_at: float
    timeline: Timeline
    requests: list[dict[str, Any]]
    expire_at: float | None
    faults: Faults = field(default_factory=Faults)
    results: bytes | None = None
    final: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: int = 0
    # A big clean batch keeps columns, not ``requests``: its answers (:data:`_WORK`) are
    # computed in a background thread from create on, and the results wait for them.
    work: pl.DataFrame | None = None
    computed: threading.Event | None = None


class AnthropicEmulator(BatchStore[_Batch]):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def routes(self, router: Router) -> None:
        def r(method: str, path: str, handler: Any) -> None:
            router.add(method, path, self.guard(handler))

        r("POST", f"{PREFIX}/messages/batches", self.create)
        r("GET", f"{PREFIX}/messages/batches", self.list)
        r("GET", f"{PREFIX}/messages/batches/{{batch_id}}", self.get)
        r("POST", f"{PREFIX}/messages/batches/{{batch_id}}/cancel", self.cancel)
        r("DELETE", f"{PREFIX}/messages/batches/{{batch_id}}", self.delete)
        r("GET", f"{PREFIX}/messages/batches/{{batch_id}}/results", self.results)
        r("POST", f"{PREFIX}/messages", self.sync)
        r("POST", f"{PREFIX}/messages/count_tokens", self.count_tokens)
        r(
            "GET",
            f"{PREFIX}/organizations/usage_report/messages",
            self.admin(reports.anthropic_usage),
        )
        r("GET", f"{PREFIX}/organizations/cost_report", self.admin(reports.anthropic_costs))

    def admin(self, report: Any) -> Any:
        """An organisation report (:mod:`.reports`), for admin keys (``sk-ant-admin...``)."""

        def handler(request: Request) -> Response:
            if not request.headers.get("x-api-key", "").startswith("sk-ant-admin"):
                return error(
                    401,
                    "authentication_error",
                    "The Admin API requires an admin key (sk-ant-admin...)",
                )
            try:
                body = report(self.ctx.ledger.frame("anthropic"), request.query, self.ctx.clock())
            except (reports.ReportError, ValueError) as exc:
                return error(400, "invalid_request_error", str(exc))
            return Response.json(body)

        return handler

    def guard(self, handler: Any) -> Any:
        def guarded(request: Request) -> Response:
            key = request.headers.get("x-api-key", "")
            auth = request.headers.get("authorization", "")
            if not key.strip() and not (auth.startswith("Bearer ") and auth[7:].strip()):
                return error(401, "authentication_error", "x-api-key header is required")
            return handler(request)

        return guarded

    # batches ------------------------------------------------------------------------------
    def _throttled(self, budget: str) -> Response | None:
        """Anthropic's 429 while the rate-limit fault ``budget`` lasts, else None."""
        if not self.ctx.take(budget):
            return None
        return error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit.",
            {"retry-after": "1"},
        )

    def create(self, request: Request) -> Response:
        if (limited := self._throttled("rate_limit_creates")) is not None:
            return limited
        if len(request.body) > MAX_BYTES:
            return error(
                413,
                "request_too_large",
                f"Request exceeds the maximum allowed number of bytes ({MAX_BYTES:,}).",
            )
        if (fast := self._create_in_columns(request.body)) is not None:
            return fast
        body = request.json() or {}
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not reqs:
            return error(400, "invalid_request_error", "requests: List should have at least 1 item")
        if len(reqs) > MAX_REQUESTS:
            return error(
                400,
                "invalid_request_error",
                f"requests: List should have at most {MAX_REQUESTS} items",
            )
        seen: set[str] = set()
        for i, entry in enumerate(reqs):
            cid = entry.get("custom_id") if isinstance(entry, dict) else None
            if not isinstance(cid, str) or not _ID.match(cid):
                return error(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'",
                )
            if cid in seen:
                return error(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: Duplicate custom_id '{cid}'",
                )
            if not isinstance(entry.get("params"), dict):
                return error(400, "invalid_request_error", f"requests.{i}.params: Field required")
            seen.add(cid)
        limit = self.ctx.faults.queue_limit_tokens
        if limit is not None and sum(input_tokens(e["params"]) for e in reqs) > limit:
            return _queue_full(limit)
        now = self.ctx.clock()
        timeline = Timeline(now, self.ctx.duration)
        if self.ctx.faults.org_queue_tokens is not None and not self.ctx.enqueue(
            str(reqs[0]["params"].get("model")),
            sum(input_tokens(e["params"]) for e in reqs),
            timeline,
        ):
            return _org_refusal()
        faults = self.ctx.batch_faults()
        b = _Batch(
            self.ctx.new_id("msgbatch_"),
            now,
            timeline,
            reqs,
            faults.expire_at,
            faults,
            total=len(reqs),
        )
        self.add(b.id, b)
        self.ctx.ledger.batch("anthropic", b.id, len(reqs), None)
        return Response.json(self.current(b, now))

    def _create_in_columns(self, body: bytes) -> Response | None:
        """The create of a big clean body, read and checked in columns; None when the body
        needs the per-request reading (small, odd or refused: that path gives the errors)."""
        if len(body) < COLUMNS_FROM * _MIN_REQUEST_BYTES or self.ctx.faults.reasoning:
            return None
        frame = parse_batch(body)
        if frame is None or frame.height < COLUMNS_FROM:
            return None
        faults = self.ctx.faults
        inputs = None
        if faults.queue_limit_tokens is not None or faults.org_queue_tokens is not None:
            inputs = _input_tokens(frame)
        limit = faults.queue_limit_tokens
        if limit is not None and inputs is not None and int(inputs.sum()) > limit:
            return _queue_full(limit)
        now = self.ctx.clock()
        timeline = Timeline(now, self.ctx.duration)
        if (
            faults.org_queue_tokens is not None
            and inputs is not None
            and not self.ctx.enqueue(frame["model"][0], int(inputs.sum()), timeline)
        ):
            return _org_refusal()
        batch_faults = self.ctx.batch_faults()
        b = _Batch(
            self.ctx.new_id("msgbatch_"),
            now,
            timeline,
            [],
            batch_faults.expire_at,
            batch_faults,
            total=frame.height,
            computed=threading.Event(),
        )
        self.add(b.id, b)
        self.ctx.ledger.batch("anthropic", b.id, frame.height, None)
        threading.Thread(target=self._compute, args=(b, frame, inputs), daemon=True).start()
        return Response.json(self.current(b, now))

    def _compute(self, b: _Batch, frame: pl.DataFrame, inputs: pl.Series | None) -> None:
        """The model's work for a columnar batch, off the request thread (as the real
        service works asynchronously); an emulator bug errors every request visibly."""
        try:
            b.work = _answer_frame(frame, self.ctx, inputs)
        except Exception as exc:
            b.work = frame.select(
                "custom_id",
                pl.lit(None, pl.String).alias("message"),
                pl.lit(f"Emulator error: {exc!r}").alias("problem"),
                pl.lit(0, pl.Int64).alias("input_tokens"),
                pl.lit(0, pl.Int64).alias("output_tokens"),
                "model",
            )
        finally:
            assert b.computed is not None
            b.computed.set()

    def _batch(self, request: Request) -> _Batch | Response:
        b = self.batches.get(request.params["batch_id"])
        if b is None:
            return error(
                404, "not_found_error", f"No message batch with id {request.params['batch_id']!r}"
            )
        return b

    def get(self, request: Request) -> Response:
        if self.ctx.take("read_errors"):
            return error(529, "overloaded_error", "Overloaded")
        b = self._batch(request)
        return b if isinstance(b, Response) else Response.json(self.current(b, self.ctx.clock()))

    def cancel(self, request: Request) -> Response:
        b = self._batch(request)
        if isinstance(b, Response):
            return b
        now = self.ctx.clock()
        if self.current(b, now)["processing_status"] == "ended":
            return error(
                400, "invalid_request_error", "Batch has already ended and cannot be canceled."
            )
        if b.timeline.cancelled_at is None:
            b.timeline.cancelled_at = now
        return Response.json(self.current(b, now))

    def delete(self, request: Request) -> Response:
        b = self._batch(request)
        if isinstance(b, Response):
            return b
        if self.current(b, self.ctx.clock())["processing_status"] != "ended":
            return error(
                400,
                "invalid_request_error",
                "Batch is still processing; cancel it before deleting it.",
            )
        self.remove(b.id)
        return Response.json({"id": b.id, "type": "message_batch_deleted"})

    def list(self, request: Request) -> Response:
        limit = min(max(int(request.arg("limit", "20") or 20), 1), 1000)
        ids = self.newest_first()
        after, before = request.arg("after_id"), request.arg("before_id")
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
            page = ids[:limit]
        elif before in ids:
            ids = ids[: ids.index(before)]
            page = ids[-limit:]
        else:
            page = ids[:limit]
        now = self.ctx.clock()
        return Response.json(
            {
                "data": [
                    self.current(b, now) for i in page if (b := self.batches.get(i)) is not None
                ],
                "has_more": len(ids) > limit,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    def results(self, request: Request) -> Response:
        b = self._batch(request)
        if isinstance(b, Response):
            return b
        if self.ctx.take("read_errors"):
            return error(500, "api_error", "Internal server error")
        self.current(b, self.ctx.clock())
        if b.results is None:
            return error(
                404, "not_found_error", "Results are not available until the batch has ended."
            )
        response = Response.raw(b.results, "application/binary")
        if self.ctx.take("drop_downloads"):
            response.cut_after = len(b.results) // 2
        return response

    # the batch at a moment ------------------------------------------------------------------
    def current(self, b: _Batch, now: float) -> dict[str, Any]:
        if b.final is not None:
            return b.final
        t = b.timeline
        phase = t.at(now)
        total = b.total
        o: dict[str, Any] = {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {
                "processing": total,
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": None,
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(t.cancelled_at) if t.cancelled_at is not None else None,
            "results_url": None,
        }
        if b.expire_at is not None and phase.progress >= b.expire_at and phase.name != "cancelled":
            return self._finish(b, o, b.expire_at, "expired", t.when(b.expire_at))
        if phase.name == "cancelling":
            o["processing_status"] = "canceling"
        elif phase.name == "cancelled":
            return self._finish(b, o, phase.progress, "canceled", phase.since)
        elif phase.name == "done":
            return self._finish(b, o, 1.0, "", phase.since)
        return o

    def _finish(
        self, b: _Batch, o: dict[str, Any], processed: float, rest: str, when: float
    ) -> dict[str, Any]:
        if b.computed is not None:
            return self._finish_columns(b, o, processed, rest, when)
        with b.lock:
            if b.final is not None:
                return b.final
            counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            cids = [e["custom_id"] for e in b.requests]
            ran = [out.kind == "ok" for out in outcomes(cids, processed, b.faults)]
            done = int(len(cids) * processed + 1e-9)
            # What ran is answered in columns when there is enough of it; whatever the
            # columns cannot take (odd params, a refused model) comes back as None and is
            # answered one by one, as the reference does.
            answered = (
                _answer_columns(
                    [e["params"] for e, r in zip(b.requests, ran, strict=True) if r], self.ctx
                )
                if sum(ran) >= COLUMNS_FROM and not self.ctx.faults.reasoning
                else None
            )
            lines: list[str] = []
            bills: list[tuple[str, int, int, str]] = []
            k = 0
            for i, (cid, ok) in enumerate(zip(cids, ran, strict=True)):
                answer: Any = None
                if ok:
                    if answered is not None and answered[k] is not None:
                        answer = answered[k]
                    else:
                        try:
                            message, inp, outp = respond(
                                b.requests[i]["params"], self.ctx.new_id, faults=self.ctx.faults
                            )
                            answer = (orjson.dumps(message).decode(), inp, outp)
                        except Exception as exc:  # invalid params: errored, not a crash
                            answer = f"Invalid request params: {exc!r}"
                    k += 1
                if isinstance(answer, tuple):
                    message_json, inp, outp = answer
                    bills.append((cid, inp, outp, str(b.requests[i]["params"].get("model", ""))))
                    counts["succeeded"] += 1
                    lines.append(
                        '{"custom_id":'
                        + orjson.dumps(cid).decode()
                        + ',"result":{"type":"succeeded","message":'
                        + message_json
                        + "}}"
                    )
                    continue
                if i < done:
                    result: dict[str, Any] = {
                        "type": "errored",
                        "error": {
                            "type": "error",
                            "error": {
                                "type": "invalid_request_error",
                                "message": answer
                                or "Emulated invalid request (request_errors fault).",
                            },
                            "request_id": None,
                        },
                    }
                    counts["errored"] += 1
                else:
                    result = {"type": rest}
                    counts[rest] += 1
                lines.append(orjson.dumps({"custom_id": cid, "result": result}).decode())
            if bills:
                billed = pl.DataFrame(bills, schema=["c", "i", "o", "m"], orient="row")
                f = self.ctx.faults
                self.ctx.ledger.bill_many(
                    "anthropic",
                    b.id,
                    billed["c"],
                    billed["i"],
                    billed["o"],
                    model=billed["m"],
                    at=self.ctx.clock(),
                    cache_read=(billed["i"] * f.cache_read).floor(),
                    cache_write=(billed["i"] * f.cache_write).floor(),
                )
            frame = pl.DataFrame({"custom_id": cids, "line": lines}, schema=_LINES)
            b.results = columns.finish_lines(frame, b.faults, shuffle=True)
            b.requests = []  # frozen: only the results file is read from now on
            return self._ended(b, o, counts, when)

    def _finish_columns(
        self, b: _Batch, o: dict[str, Any], processed: float, rest: str, when: float
    ) -> dict[str, Any]:
        """:meth:`_finish` of a columnar batch: the same lines, counts and bills, in columns."""
        assert b.computed is not None
        b.computed.wait()  # a terminal state needs the model's work done
        with b.lock:
            if b.final is not None:
                return b.final
            work = b.work if b.work is not None else pl.DataFrame(schema=_WORK)
            n = work.height
            done = int(n * processed + 1e-9)
            f = b.faults
            ran = pl.int_range(n, eager=True) < done
            hit = columns.hits(f.seed, "request_errors", f.request_errors, work["custom_id"])
            ok = ran & ~hit & work["problem"].is_null()
            errored = ran & ~ok
            lines = _result_lines(work, ok, errored, rest)
            billed = work.filter(ok)
            if billed.height:
                inp = billed["input_tokens"]
                self.ctx.ledger.bill_many(
                    "anthropic",
                    b.id,
                    billed["custom_id"],
                    inp,
                    billed["output_tokens"],
                    model=billed["model"],
                    at=self.ctx.clock(),
                    cache_read=(inp * self.ctx.faults.cache_read).floor(),
                    cache_write=(inp * self.ctx.faults.cache_write).floor(),
                )
            b.results = columns.finish_lines(lines, f, shuffle=True)
            counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            counts["succeeded"] = int(ok.sum())
            counts["errored"] = int(errored.sum())
            if n - done:
                counts[rest] = n - done
            b.work = None  # frozen: only the results file is read from now on
            return self._ended(b, o, counts, when)

    def _ended(
        self, b: _Batch, o: dict[str, Any], counts: dict[str, int], when: float
    ) -> dict[str, Any]:
        """``o`` as the ended batch's final state (kept: it never changes again)."""
        o.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=rfc3339(when),
            results_url=f"{self.ctx.base_url}{PREFIX}/messages/batches/{b.id}/results",
        )
        b.final = o
        return o

    # sync ---------------------------------------------------------------------------------
    def sync(self, request: Request) -> Response:
        if (limited := self._throttled("rate_limit_sync")) is not None:
            return limited
        params = request.json()
        if not isinstance(params, dict) or "max_tokens" not in params:
            return error(400, "invalid_request_error", "max_tokens: Field required")
        if self.ctx.sync_fails(request.body):
            return error(
                400, "invalid_request_error", "Emulated invalid request (request_errors fault)."
            )
        try:
            message, inp, outp = respond(params, self.ctx.new_id, "standard", self.ctx.faults)
        except ValueError as exc:
            return error(404, "not_found_error", str(exc))
        f = self.ctx.faults
        self.ctx.ledger.bill(
            "anthropic",
            None,
            "",
            inp,
            outp,
            model=str(params.get("model", "")),
            at=self.ctx.clock(),
            cache_read=int(inp * f.cache_read),
            cache_write=int(inp * f.cache_write),
        )
        return Response.json(message)

    def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: the input tokens a Messages body would be
        billed, free (its own rate limit, the ``rate_limit_counts`` fault). It takes the
        SDK's count parameters only: ``max_tokens`` and the sampling options are refused,
        as extra inputs."""
        if (limited := self._throttled("rate_limit_counts")) is not None:
            return limited
        params = request.json()
        if not isinstance(params, dict):
            return error(400, "invalid_request_error", "body: Input should be an object")
        for name in ("model", "messages"):
            if name not in params:
                return error(400, "invalid_request_error", f"{name}: Field required")
        extra = sorted(set(params) - _COUNT_PARAMS)
        if extra:
            return error(
                400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted"
            )
        problem = model.model_problem("anthropic", str(params.get("model", "")), embed=False)
        if problem is not None:
            return error(404, "not_found_error", f"model: {params.get('model')!r} ({problem})")
        self.ctx.ledger.counted("anthropic")
        return Response.json({"input_tokens": input_tokens(params)})


#: What ``count_tokens`` takes (the SDK's MessageCountTokensParams).
_COUNT_PARAMS = frozenset(
    {
        "messages",
        "model",
        "cache_control",
        "context_management",
        "mcp_servers",
        "output_config",
        "output_format",
        "speed",
        "system",
        "thinking",
        "tool_choice",
        "tools",
    }
)

_LINES = {"custom_id": pl.String, "line": pl.String}


def _answer_columns(
    params: list[dict[str, Any]], ctx: Context
) -> list[tuple[str, int, int] | None]:
    """For each request, (message JSON, input tokens, output tokens) as :func:`respond` gives
    them, computed in columns; None where a request needs :func:`respond` itself (params the
    columns do not read, a model the service refuses)."""
    rows: list[tuple[int, str, str, str, str | None, int | None]] = []
    schemas: dict[str, dict[str, Any]] = {}
    refused: dict[str, bool] = {}
    for i, p in enumerate(params):
        try:
            model_name = p.get("model", "")
            cap = p.get("max_tokens")
            schema = (((p.get("output_config") or {}).get("format")) or {}).get("schema")
            system, user = _texts(p)
        except Exception:
            continue
        if not isinstance(model_name, str) or not isinstance(system, str):
            continue
        if not isinstance(user, str) or (cap is not None and type(cap) is not int):
            continue
        if schema is not None and not isinstance(schema, dict):
            continue
        if model_name not in refused:
            refused[model_name] = (
                model.model_problem("anthropic", model_name, embed=False) is not None
            )
        if refused[model_name]:
            continue
        key = None
        if schema is not None:
            key = orjson.dumps(schema).decode()
            schemas.setdefault(key, schema)
        rows.append((i, model_name, system, user, key, cap))
    out: list[tuple[str, int, int] | None] = [None] * len(params)
    if not rows:
        return out
    frame = pl.DataFrame(
        rows,
        schema={
            "i": pl.Int64,
            "model": pl.String,
            "system": pl.String,
            "user": pl.String,
            "schema": pl.String,
            "cap": pl.Int64,
        },
        orient="row",
    )
    done = _answer_frame(frame.rename({"i": "custom_id"}), ctx, schemas=schemas)
    for i, m, n_in, n_out in zip(
        done["custom_id"].to_list(),
        done["message"].to_list(),
        done["input_tokens"].to_list(),
        done["output_tokens"].to_list(),
        strict=True,
    ):
        out[int(i)] = (m, n_in, n_out)
    return out


#: A columnar batch's work, one row per request in input order: the message as JSON text (or
#: the ``problem`` that errors it), the whole input and the output it bills, its model.
_WORK = {
    "custom_id": pl.String,
    "message": pl.String,
    "problem": pl.String,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "model": pl.String,
}


def _input_tokens(frame: pl.DataFrame) -> pl.Series:
    """:func:`input_tokens` of every request of a frame of one model (``model``, ``system``,
    ``user``, ``schema`` as text or null)."""
    fam = tokenizers.family("anthropic", str(frame["model"][0]))
    system = frame["system"].fill_null("")
    system_tokens = fam.count_series(system, distinct=True)
    extra = pl.select(
        pl.when(system != "").then(fam.per_system + system_tokens).otherwise(0)
    ).to_series()
    schema = pl.select(
        pl.when(frame["schema"].is_not_null()).then(fam.per_schema).otherwise(0)
    ).to_series()
    return (fam.frame + fam.count_series(frame["user"]) + extra + schema).cast(pl.Int64)


def _answer_frame(
    frame: pl.DataFrame,
    ctx: Context,
    inputs: pl.Series | None = None,
    schemas: dict[str, dict[str, Any]] | None = None,
) -> pl.DataFrame:
    """The work (:data:`_WORK`) of requests in columns (``custom_id``, ``model``, ``system``,
    ``user``, ``schema`` as JSON text or null, ``cap``): what :func:`respond` gives each, in
    the frame's order (``inputs``: their input tokens, when already counted; ``schemas``: the
    schema of each text, else parsed from it)."""
    frame = frame.with_row_index("row")
    if inputs is not None:
        frame = frame.with_columns(inp=inputs)
    parts = []
    for (_, key), group in frame.group_by(["model", "schema"], maintain_order=True):
        if "inp" not in group.columns:
            group = group.with_columns(inp=_input_tokens(group))
        schema = None
        if key is not None:
            schema = schemas[key] if schemas is not None else orjson.loads(key)
        said = columns.answers(group["user"], schema, group["cap"])
        parts.append(group.select("row", "custom_id", "model", "inp").hstack(said))
    done = pl.concat(parts).sort("row")
    inp = done["inp"]
    read = (inp * ctx.faults.cache_read).floor().cast(pl.Int64)
    write = (inp * ctx.faults.cache_write).floor().cast(pl.Int64)
    message = columns.concat(
        [
            '{"id":"',
            ctx.new_ids("msg_", done.height),
            '","type":"message","role":"assistant","model":',
            columns.json_strings(done["model"]),
            ',"content":[{"type":"text","text":',
            columns.json_strings(done["text"]),
            '}],"stop_reason":',
            done["cut"].replace_strict(
                {True: '"max_tokens"', False: '"end_turn"'}, return_dtype=pl.String
            ),
            ',"stop_sequence":null,"usage":{"input_tokens":',
            (inp - read - write).cast(pl.String),
            ',"output_tokens":',
            done["output_tokens"].cast(pl.String),
            ',"cache_creation_input_tokens":',
            write.cast(pl.String),
            ',"cache_read_input_tokens":',
            read.cast(pl.String),
            ',"service_tier":"batch"}}',
        ],
        done.height,
    )
    return pl.DataFrame(
        {
            "custom_id": done["custom_id"].cast(pl.String),
            "message": message,
            "problem": pl.Series([None] * done.height, dtype=pl.String),
            "input_tokens": inp.cast(pl.Int64),
            "output_tokens": done["output_tokens"].cast(pl.Int64),
            "model": done["model"],
        },
        schema=_WORK,
    )


_ERRORED = (
    ',"result":{"type":"errored","error":{"type":"error","error":{"type":'
    '"invalid_request_error","message":'
)


def _result_lines(work: pl.DataFrame, ok: pl.Series, errored: pl.Series, rest: str) -> pl.DataFrame:
    """(custom_id, line) of every request in input order, as :meth:`_finish` writes them: the
    message of what succeeded, the error of what errored, ``rest`` for what never ran."""
    head = '{"custom_id":' + columns.json_strings(work["custom_id"])
    problem = columns.json_strings(work["problem"].fill_null(_FAULT_MESSAGE))
    line = (
        pl.select(
            pl.when(ok)
            .then(head + ',"result":{"type":"succeeded","message":' + work["message"] + "}}")
            .when(errored)
            .then(head + _ERRORED + problem + '},"request_id":null}}}')
            .otherwise(head + ',"result":{"type":' + orjson.dumps(rest).decode() + "}}")
        )
        .to_series()
        .rename("line")
    )
    return pl.DataFrame({"custom_id": work["custom_id"], "line": line}, schema=_LINES)


_FAULT_MESSAGE = "Emulated invalid request (request_errors fault)."
#: Bodies below COLUMNS_FROM times this many bytes cannot hold that many requests (the
#: smallest request is longer), so they skip the columnar reader's fixed costs.
_MIN_REQUEST_BYTES = 40


def _queue_full(limit: int) -> Response:
    return error(
        429,
        "rate_limit_error",
        f"Batch queue full: this batch would exceed the limit of {limit:,} enqueued tokens.",
        {"retry-after": "1"},
    )


def _org_refusal() -> Response:
    return error(
        429,
        "rate_limit_error",
        "Number of request tokens in the batch queue has exceeded your organization's rate limit.",
        {"retry-after": "1"},
    )


_ID_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"  # _ID's, without the newline `$` lets through
# The fields of a request the columnar reader reads, in one parse per request; their JSON
# types are checked before any is used.
_PATHS = (
    "$.custom_id",
    "$.params",
    "$.params.model",
    "$.params.max_tokens",
    "$.params.system",
    "$.params.messages",
    "$.params.output_config",
    "$.params.output_config.format",
    "$.params.output_config.format.schema",
)
# Not an object, or "requests" not an array: no requests, and the per-request path refuses it.
_SPLIT_SQL = "SELECT json_extract(b, '$.requests[*]') AS e FROM body"
_REQUESTS_SQL = f"""
WITH f AS (SELECT n, e, json_extract(e, {list(_PATHS)}) AS v FROM requests)
SELECT n, list_transform(v, lambda x: json_type(x)) AS t,
    v[1]->>'$' AS custom_id, v[3]->>'$' AS model, (v[4]->>'$')::BIGINT AS cap,
    v[5]->>'$' AS system,
    json_transform(v[6], '[{{"role":"VARCHAR","content":"VARCHAR"}}]') AS messages,
    list_transform(json_extract(v[6], '$[*]'),
        lambda m: list_transform(json_type(m, ['$.role', '$.content']),
            lambda x: coalesce(x, 'ABSENT')))
        AS t_messages,
    v[9]::VARCHAR AS schema
FROM f ORDER BY n
"""


def parse_batch(body: bytes) -> pl.DataFrame | None:
    """The requests of a create body in columns (custom_id, model, system, user, schema as
    JSON text, cap), or None when the body needs the per-request reading: anything the create
    refuses, or a shape the columns do not cover (content blocks, several models, a refused
    model, ...). None is always safe; a frame only for bodies the per-request path takes whole
    and answers without a per-request error."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    con = duckdb.connect()
    try:
        con.register("body", pl.DataFrame({"b": [text]}))
        if not _one_requests_key(body, con):
            return None
        split = con.sql(_SPLIT_SQL).pl()
        requests = split.select(pl.col("e").explode()).with_row_index("n")
        if not 0 < requests.height <= MAX_REQUESTS or requests["e"].null_count():
            return None
        con.register("requests", requests)
        r = con.sql(_REQUESTS_SQL).pl()
    except duckdb.Error:  # not JSON: the per-request path says how
        return None
    finally:
        con.close()
    return _clean(r)


def _one_requests_key(body: bytes, con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the body has one top-level "requests" (DuckDB reads the first of duplicate keys,
    orjson the last). Inside a JSON string its quotes are escaped, so one unescaped
    ``"requests"`` in the bytes is one key, and only a body with more needs a second parse."""
    if body.count(b'"requests"') == 1:
        return True
    keys = con.sql("SELECT json_keys(b) AS k FROM body").pl()["k"][0]
    return keys is not None and list(keys).count("requests") == 1


def _clean(r: pl.DataFrame) -> pl.DataFrame | None:
    """The frame :func:`parse_batch` gives, if every request has the covered shape."""
    typed = columns.json_typed
    clean = r.select(
        typed(1, "VARCHAR").all()
        & pl.col("custom_id").str.contains(_ID_PATTERN).fill_null(False).all()
        & (pl.col("custom_id").n_unique() == pl.len())
        & typed(2, "OBJECT").all()
        & typed(3, "VARCHAR").all()
        & (pl.col("model").n_unique() == 1)
        & typed(4, "UBIGINT", "BIGINT", "NULL", absent=True).all()
        & typed(5, "VARCHAR", "NULL", absent=True).all()
        & typed(6, "ARRAY", absent=True).all()
        & typed(7, "OBJECT", "NULL", absent=True).all()
        & typed(8, "OBJECT", "NULL", absent=True).all()
        & typed(9, "OBJECT", "NULL", absent=True).all()
        & pl.col("t_messages")
        .list.eval(pl.element() == pl.lit(["VARCHAR", "VARCHAR"]))
        .list.all()
        .fill_null(True)
        .all()
    ).item()
    if not clean:
        return None
    model_name = r["model"][0]
    if model.model_problem("anthropic", model_name, embed=False) is not None:
        return None
    user = (
        r.select("n", pl.col("messages").fill_null([]))
        .explode("messages")
        .unnest("messages")
        .filter(pl.col("role") == "user")
        .group_by("n")
        .agg(pl.col("content").last().alias("user"))
    )
    return r.join(user, on="n", how="left", maintain_order="left").select(
        "custom_id",
        "model",
        pl.col("system").replace("", None),
        pl.col("user").fill_null(""),
        pl.col("schema").replace("null", None),
        "cap",
    )


def _texts(params: dict[str, Any]) -> tuple[str, str]:
    """(system text, last user text) of a Messages body."""
    system = params.get("system") or ""
    if isinstance(system, list):
        system = "".join(p.get("text", "") for p in system if isinstance(p, dict))
    user = ""
    for m in params.get("messages", []):
        if m.get("role") == "user":
            c = m.get("content", "")
            user = (
                c
                if isinstance(c, str)
                else "".join(p.get("text", "") for p in c if isinstance(p, dict))
            )
    return system, user


def input_tokens(params: dict[str, Any]) -> int:
    """Input tokens by the emulated Claude tokenizer of the model (:mod:`.tokenizers`): the
    system prompt and the last user message, the frame, and a structured-output preamble."""
    fam = tokenizers.family("anthropic", str(params.get("model", "")))
    system, user = _texts(params)
    n = fam.frame + fam.count(user)
    if system:
        n += fam.per_system + fam.count(system)
    if (((params.get("output_config") or {}).get("format")) or {}).get("schema") is not None:
        n += fam.per_schema
    return n


def respond(
    params: dict[str, Any], new_id: Any, tier: str = "batch", faults: Faults | None = None
) -> tuple[dict[str, Any], int, int]:
    """The message for ``params`` with its whole input and its output tokens; with
    ``faults`` (:attr:`Faults.cache_read`, ``cache_write``) part of the input is reported as
    cache reads and writes, and ``input_tokens`` is the rest (as the real API reports it)."""
    problem = model.model_problem("anthropic", str(params.get("model", "")), embed=False)
    if problem is not None:
        raise ValueError(f"model: {params.get('model')!r} not found ({problem})")
    _, user = _texts(params)
    schema = (((params.get("output_config") or {}).get("format")) or {}).get("schema")
    text, cut, out_tokens = model.answer(
        user, schema, params.get("max_tokens"), faults.reasoning if faults is not None else 0
    )
    inp = input_tokens(params)
    read = int(inp * faults.cache_read) if faults is not None else 0
    write = int(inp * faults.cache_write) if faults is not None else 0
    message = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": params.get("model", ""),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": inp - read - write,
            "output_tokens": out_tokens,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
            "service_tier": tier,
        },
    }
    return message, inp, out_tokens
