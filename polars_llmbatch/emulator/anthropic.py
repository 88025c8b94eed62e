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
#: Batches where at least this many requests ran are answered in columns (see :mod:`columns`);
#: smaller ones request by request, which is faster below it.
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
            return error(
                429,
                "rate_limit_error",
                f"Batch queue full: this batch would exceed the limit of {limit:,} enqueued tokens.",
                {"retry-after": "1"},
            )
        now = self.ctx.clock()
        timeline = Timeline(now, self.ctx.duration)
        if self.ctx.faults.org_queue_tokens is not None and not self.ctx.enqueue(
            str(reqs[0]["params"].get("model")),
            sum(input_tokens(e["params"]) for e in reqs),
            timeline,
        ):
            return error(
                429,
                "rate_limit_error",
                "Number of request tokens in the batch queue has exceeded your organization's "
                "rate limit.",
                {"retry-after": "1"},
            )
        faults = self.ctx.batch_faults()
        b = _Batch(
            self.ctx.new_id("msgbatch_"),
            now,
            timeline,
            reqs,
            faults.expire_at,
            faults,
        )
        self.add(b.id, b)
        self.ctx.ledger.batch("anthropic", b.id, len(reqs), None)
        return Response.json(self.current(b, now))

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
        total = len(b.requests)
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
            o.update(
                processing_status="ended",
                request_counts=counts,
                ended_at=rfc3339(when),
                results_url=f"{self.ctx.base_url}{PREFIX}/messages/batches/{b.id}/results",
            )
            b.final = o
            b.requests = []  # frozen: only the results file is read from now on
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
    parts = []
    for (model_name, key), group in frame.group_by(["model", "schema"], maintain_order=True):
        fam = tokenizers.family("anthropic", str(model_name))
        system_tokens = fam.count_series(group["system"], distinct=True)
        user_tokens = fam.count_series(group["user"])
        has_system = group["system"].fill_null("") != ""
        inputs = (
            fam.frame
            + user_tokens
            + pl.select(pl.when(has_system).then(fam.per_system + system_tokens).otherwise(0))
            .to_series()
            .cast(pl.Int64)
            + (fam.per_schema if key is not None else 0)
        )
        said = columns.answers(
            group["user"], schemas[key] if key is not None else None, group["cap"]
        )
        parts.append(
            group.select("i", "model").hstack(said).with_columns(inp=inputs.cast(pl.Int64))
        )
    done = pl.concat(parts).sort("i")
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
    for i, m, n_in, n_out in zip(
        done["i"].to_list(),
        message.to_list(),
        inp.to_list(),
        done["output_tokens"].to_list(),
        strict=True,
    ):
        out[i] = (m, n_in, n_out)
    return out


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
