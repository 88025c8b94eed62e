"""OpenAI emulation: Files, Batches and the sync endpoints, under ``/openai/v1``.

Lifecycle ``validating → in_progress → finalizing → completed`` (or ``failed`` with
``errors.data``, ``expired`` with partial output and ``batch_expired`` lines, ``cancelling →
cancelled``), results split into an output file and an error file, lines in shuffled order.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson
import polars as pl

from polars_llmbatch.emulator import columns, model, reports, tokenizers
from polars_llmbatch.emulator.context import Context
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.http import Request, Response, Router, multipart
from polars_llmbatch.emulator.store import BatchStore
from polars_llmbatch.emulator.timeline import Phase, Timeline
from polars_llmbatch.plan.tokens.encodings import get_encoding

__all__ = ["OpenAIEmulator"]

PREFIX = "/openai/v1"
ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)
SUPPORTED = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
MAX_EMBEDDING_INPUTS = 50_000
#: Files of at least this many requests are validated and answered in columns (fixed costs of
#: ~70 ms, then ~15 µs a request); smaller ones line by line (~50 µs a request).
COLUMNS_FROM = 500


def error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response.json(body, status, headers)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_at: int | None = None

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: float
    timeline: Timeline
    data: bytes
    total: int = 0  # requests in the file, once validated
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    # Validation and the model's work run in a background thread from create on, as the real
    # service validates asynchronously; the states wait for them.
    validated: threading.Event = field(default_factory=threading.Event)
    computed: threading.Event = field(default_factory=threading.Event)
    # What the model made of each request, in input order (see :func:`_WORK`): computed in
    # columns, never as one Python object per request.
    work: pl.DataFrame | None = None
    failing: pl.Series | None = None  # the request_errors fault, per request
    expire_at: float | None = None
    faults: Faults = field(default_factory=Faults)
    output_file_id: str | None = None
    error_file_id: str | None = None
    final: dict[str, Any] | None = None  # the terminal object, frozen once results exist
    usage: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAIEmulator(BatchStore[_Batch]):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.files: dict[str, _File] = {}

    def routes(self, router: Router) -> None:
        def r(method: str, path: str, handler: Any) -> None:
            router.add(method, path, self.guard(handler))

        r("POST", f"{PREFIX}/files", self.upload)
        r("GET", f"{PREFIX}/files", self.list_files)
        r("GET", f"{PREFIX}/files/{{file_id}}", self.get_file)
        r("DELETE", f"{PREFIX}/files/{{file_id}}", self.delete_file)
        r("GET", f"{PREFIX}/files/{{file_id}}/content", self.file_content)
        r("POST", f"{PREFIX}/batches", self.create_batch)
        r("GET", f"{PREFIX}/batches", self.list_batches)
        r("GET", f"{PREFIX}/batches/{{batch_id}}", self.get_batch)
        r("POST", f"{PREFIX}/batches/{{batch_id}}/cancel", self.cancel_batch)
        r("POST", f"{PREFIX}/chat/completions", self.sync("/v1/chat/completions"))
        r("POST", f"{PREFIX}/responses", self.sync("/v1/responses"))
        r("POST", f"{PREFIX}/embeddings", self.sync("/v1/embeddings"))
        admin = self.admin
        r("GET", f"{PREFIX}/organization/usage/completions", admin("completion"))
        r("GET", f"{PREFIX}/organization/usage/embeddings", admin("embedding"))
        r("GET", f"{PREFIX}/organization/costs", admin("costs"))

    def admin(self, report: str) -> Any:
        """The organisation reports (:mod:`.reports`), for admin keys (``sk-admin-...``) only."""

        def handler(request: Request) -> Response:
            key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not key.startswith("sk-admin-"):
                return error(
                    401,
                    "This endpoint requires an admin API key (sk-admin-...); create one in "
                    "the organization settings.",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
            bills = self.ctx.ledger.frame("openai")
            now = self.ctx.clock()
            try:
                if report == "costs":
                    return Response.json(reports.openai_costs(bills, request.query, now))
                return Response.json(reports.openai_usage(bills, request.query, report, now))
            except (reports.ReportError, ValueError) as exc:
                return error(400, str(exc), "invalid_request_error")

        return handler

    def guard(self, handler: Any) -> Any:
        def guarded(request: Request) -> Response:
            return self.authorised(request) or handler(request)

        return guarded

    @staticmethod
    def authorised(request: Request) -> Response | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        return None

    # files --------------------------------------------------------------------------------
    def upload(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error(400, "Expected multipart/form-data", "invalid_request_error")
        fields, files = multipart(request.body, ctype)
        content, filename = None, "upload.jsonl"
        if "file" in files:
            filename, content = files["file"]
            filename = filename or "upload.jsonl"
        if content is None:
            return error(400, "Missing file", "invalid_request_error", param="file")
        purpose = fields.get("purpose")
        if purpose not in ("batch", "assistants", "fine-tune", "vision", "user_data", "evals"):
            return error(
                400, f"Invalid purpose: {purpose!r}", "invalid_request_error", param="purpose"
            )
        now = int(self.ctx.clock())
        seconds = int(fields.get("expires_after[seconds]", 30 * 86400 if purpose == "batch" else 0))
        f = _File(
            self.ctx.new_id("file-"),
            filename,
            purpose,
            content,
            now,
            now + seconds if seconds else None,
        )
        with self.lock:
            self.files[f.id] = f
        self.ctx.ledger.upload("openai", f.id, len(content))
        return Response.json(f.obj())

    def _file(self, request: Request) -> _File | Response:
        f = self.files.get(request.params["file_id"])
        if f is None:
            return error(
                404,
                f"No such File object: {request.params['file_id']}",
                "invalid_request_error",
                param="id",
            )
        return f

    def get_file(self, request: Request) -> Response:
        f = self._file(request)
        return f if isinstance(f, Response) else Response.json(f.obj())

    def delete_file(self, request: Request) -> Response:
        f = self._file(request)
        if isinstance(f, Response):
            return f
        with self.lock:
            self.files.pop(f.id, None)
        return Response.json({"id": f.id, "object": "file", "deleted": True})

    def list_files(self, request: Request) -> Response:
        purpose = request.arg("purpose")
        with self.lock:
            files = [f for f in self.files.values() if purpose in (None, f.purpose)]
        files.sort(key=lambda f: f.created_at, reverse=request.arg("order", "desc") == "desc")
        data = [f.obj() for f in files]
        return Response.json(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            }
        )

    def file_content(self, request: Request) -> Response:
        f = self._file(request)
        if isinstance(f, Response):
            return f
        if f.purpose == "batch_output" and self.ctx.take("read_errors"):
            return error(503, "The server is overloaded. Please retry.", "server_error")
        response = Response.raw(f.data, "application/octet-stream")
        if f.purpose == "batch_output" and self.ctx.take("drop_downloads"):
            response.cut_after = len(f.data) // 2
        return response

    # batches ------------------------------------------------------------------------------
    def _throttled(self, budget: str) -> Response | None:
        """OpenAI's 429 while the rate-limit fault ``budget`` lasts, else None."""
        if not self.ctx.take(budget):
            return None
        return error(
            429,
            "Rate limit reached for requests. Please try again in 1s.",
            "requests",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )

    def create_batch(self, request: Request) -> Response:
        if (limited := self._throttled("rate_limit_creates")) is not None:
            return limited
        body = request.json() or {}
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        if body.get("completion_window") != "24h":
            return error(
                400,
                "Invalid completion_window: only '24h' is supported.",
                "invalid_request_error",
                param="completion_window",
            )
        if endpoint not in ENDPOINTS:
            return error(
                400, f"Invalid endpoint: {endpoint!r}", "invalid_request_error", param="endpoint"
            )
        metadata = body.get("metadata")
        if metadata is not None and (
            len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items())
        ):
            return error(
                400,
                "metadata: at most 16 pairs, keys ≤64 and values ≤512 characters",
                "invalid_request_error",
                param="metadata",
            )
        f = self.files.get(file_id or "")
        if f is None:
            return error(
                404,
                f"No such File object: {file_id}",
                "invalid_request_error",
                param="input_file_id",
            )
        if f.purpose != "batch":
            return error(
                400,
                "The input file must be uploaded with purpose 'batch'.",
                "invalid_request_error",
                param="input_file_id",
            )
        now = self.ctx.clock()
        b = _Batch(
            id=self.ctx.new_id("batch_"),
            endpoint=endpoint,
            input_file_id=f.id,
            metadata=metadata,
            created_at=now,
            timeline=Timeline(now, self.ctx.duration),
            data=f.data,
        )
        b.faults = self.ctx.batch_faults()
        b.expire_at = b.faults.expire_at
        self.add(b.id, b)
        n = sum(1 for line in f.data.splitlines() if line.strip())
        self.ctx.ledger.batch("openai", b.id, n, json.dumps(metadata) if metadata else None)
        threading.Thread(target=self._work, args=(b,), daemon=True).start()
        return Response.json(self.current(b, now))

    def _work(self, b: _Batch) -> None:
        queue_limit = self.ctx.faults.queue_limit_tokens
        work: pl.DataFrame | None = None
        try:
            # thinking is answered request by request (the columns model none)
            chat = None if self.ctx.faults.reasoning else parse_chat(b.data, b.endpoint)
            if chat is not None:  # a clean chat file: validated and answered in columns
                b.total, b.model = chat.height, chat["model"][0]
                work = answer_chat(chat, self.ctx)
                tokens = int(work["input_tokens"].sum())
                if queue_limit is not None and tokens > queue_limit:
                    b.errors = [_queue_error(b.model, queue_limit)]
            else:  # anything else, line by line, with the errors the real validator gives
                lines, b.errors = validate(b.data, b.endpoint, queue_limit)
                b.total = len(lines)
                b.model = next((line["body"].get("model") for line in lines), None)
                if not b.errors:
                    work = self._work_per_line(b.endpoint, lines)
            org = self.ctx.faults.org_queue_tokens
            if (
                work is not None
                and not b.errors
                and org is not None
                and not self.ctx.enqueue(b.model, int(work["input_tokens"].sum()), b.timeline)
            ):
                b.errors = [_queue_error(b.model, org)]
        except Exception as exc:  # an emulator bug: fail the batch visibly
            b.errors = [
                {"code": "emulator_error", "message": repr(exc), "param": None, "line": None}
            ]
        finally:
            b.validated.set()
        try:
            if not b.errors and work is not None:
                f = b.faults
                b.failing = columns.hits(
                    f.seed, "request_errors", f.request_errors, work["custom_id"]
                )
                b.work = work
        finally:
            b.computed.set()

    def _respond_one(self, endpoint: str, body: Any) -> tuple[dict[str, Any], int, int] | str:
        """The response, or the message of the 400 the real API would give a bad request."""
        try:
            return respond(endpoint, body, self.ctx.new_id, self.ctx.faults)
        except ModelError as exc:
            return str(exc)
        except Exception as exc:
            return f"Invalid request body: {exc!r}"

    def _work_per_line(self, endpoint: str, lines: list[dict[str, Any]]) -> pl.DataFrame:
        """The work frame (:data:`_WORK`) of validated lines, one request at a time."""
        bodies: list[str | None] = []
        messages: list[str | None] = []
        inputs: list[int] = []
        outputs: list[int] = []
        for line in lines:
            answer = self._respond_one(endpoint, line["body"])
            if isinstance(answer, str):
                bodies.append(None)
                messages.append(answer)
                inputs.append(0)
                outputs.append(0)
            else:
                resp, inp, outp = answer
                bodies.append(orjson.dumps(resp).decode())
                messages.append(None)
                inputs.append(inp)
                outputs.append(outp)
        return pl.DataFrame(
            {
                "custom_id": [str(line["custom_id"]) for line in lines],
                "body": bodies,
                "message": messages,
                "input_tokens": inputs,
                "output_tokens": outputs,
            },
            schema=_WORK,
        )

    def _batch(self, request: Request) -> _Batch | Response:
        b = self.batches.get(request.params["batch_id"])
        if b is None:
            return error(
                404,
                f"No batch found with id '{request.params['batch_id']}'.",
                "invalid_request_error",
                param="batch_id",
            )
        return b

    def get_batch(self, request: Request) -> Response:
        if self.ctx.take("read_errors"):
            return error(
                500, "The server had an error while processing your request.", "server_error"
            )
        b = self._batch(request)
        return b if isinstance(b, Response) else Response.json(self.current(b, self.ctx.clock()))

    def cancel_batch(self, request: Request) -> Response:
        b = self._batch(request)
        if isinstance(b, Response):
            return b
        now = self.ctx.clock()
        current = self.current(b, now)
        if current["status"] in ("completed", "failed", "expired", "cancelled"):
            return error(
                409,
                f"Cannot cancel a batch with status '{current['status']}'.",
                "invalid_request_error",
            )
        if b.timeline.cancelled_at is None:
            b.timeline.cancelled_at = now
        return Response.json(self.current(b, now))

    def list_batches(self, request: Request) -> Response:
        limit = min(max(int(request.arg("limit", "20") or 20), 1), 100)
        ids = self.newest_first()
        after = request.arg("after")
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        page, now = ids[:limit], self.ctx.clock()
        data = [self.current(b, now) for i in page if (b := self.batches.get(i)) is not None]
        return Response.json(
            {
                "object": "list",
                "data": data,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": len(ids) > limit,
            }
        )

    # the batch object at a moment -----------------------------------------------------------
    def current(self, b: _Batch, now: float) -> dict[str, Any]:
        if b.final is not None:
            return b.final
        t = b.timeline
        phase = t.at(now)
        total = b.total
        o: dict[str, Any] = {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(b.created_at),
            "in_progress_at": None,
            "expires_at": int(b.created_at) + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": b.metadata,
            "model": b.model,
            "usage": None,
        }
        if not b.validated.is_set():
            if t.cancelled_at is not None:
                o.update(status="cancelling", cancelling_at=int(t.cancelled_at))
            return o  # still validating, whatever the clock says
        validated = t.t0 + 0.1 * t.duration
        if b.errors and phase.name != "validating":
            # Validation failed: the whole batch fails, whatever happened after.
            o.update(status="failed", failed_at=int(validated))
            o["errors"] = {"object": "list", "data": b.errors}
            b.final = o
            return o
        if phase.name != "validating":
            o["in_progress_at"] = int(validated)
        expire_at = b.expire_at
        ready = b.computed.is_set()  # a terminal state needs the model's work done
        if expire_at is not None and phase.progress >= expire_at and phase.name != "cancelled":
            if ready:
                return self._finish(b, o, "expired", expire_at, t.when(expire_at))
            phase = Phase("running", expire_at, phase.since)
        if phase.name == "validating":
            return o
        done = int(total * phase.progress)
        failed = int(b.failing.head(done).sum()) if b.failing is not None else 0
        o["request_counts"] = {"total": total, "completed": done - failed, "failed": failed}
        if phase.name == "running":
            o["status"] = "in_progress"
        elif phase.name == "finalizing":
            o.update(status="finalizing", finalizing_at=int(phase.since))
        elif phase.name == "cancelling":
            o.update(status="cancelling", cancelling_at=int(t.cancelled_at or now))
        elif phase.name == "cancelled":
            o["cancelling_at"] = int(t.cancelled_at or now)
            if not ready:
                o["status"] = "cancelling"
                return o
            return self._finish(b, o, "cancelled", phase.progress, phase.since)
        else:
            o.update(finalizing_at=int(t.t0 + 0.8 * t.duration))
            if not ready:
                o["status"] = "finalizing"
                return o
            return self._finish(b, o, "completed", 1.0, phase.since)
        return o

    def _finish(
        self, b: _Batch, o: dict[str, Any], status: str, processed: float, when: float
    ) -> dict[str, Any]:
        """Write the output and error files of the requests that ran, bill them, and freeze the
        terminal object."""
        with b.lock:
            if b.final is not None:
                return b.final
            work = b.work if b.work is not None else pl.DataFrame(schema=_WORK)
            n = work.height
            done = int(n * processed + 1e-9)
            failing = b.failing if b.failing is not None else pl.Series([False] * n)
            ran = pl.int_range(n, eager=True) < done
            ok = ran & ~failing & work["message"].is_null()
            errored = ran & ~ok
            skipped = ~ran
            ids = self.ctx.new_ids("batch_req_", n)
            request_ids = self.ctx.new_ids("req_", n)
            frame = work.with_columns(
                id=ids, request_id=request_ids, ok=ok, errored=errored, skipped=skipped
            )
            unprocessed = (
                ("batch_expired", _EXPIRED)
                if status == "expired"
                else ("batch_cancelled", _CANCELLED)
            )
            ok_lines, err_lines = _result_lines(frame, unprocessed)
            billed = frame.filter("ok")
            self.ctx.ledger.bill_many(
                "openai",
                b.id,
                billed["custom_id"],
                billed["input_tokens"],
                billed["output_tokens"],
                model=b.model or "",
                at=when,
                cache_read=(billed["input_tokens"] * self.ctx.faults.cache_read).floor(),
                kind="embedding" if b.endpoint == "/v1/embeddings" else "completion",
            )
            now_i = int(when)
            for lines, attr in ((ok_lines, "output_file_id"), (err_lines, "error_file_id")):
                if lines.height:
                    data = columns.finish_lines(lines, b.faults, shuffle=True)
                    f = _File(
                        self.ctx.new_id("file-"),
                        f"{b.id}_{attr[:-8]}.jsonl",
                        "batch_output",
                        data,
                        now_i,
                        now_i + 30 * 86400,
                    )
                    with self.lock:
                        self.files[f.id] = f
                    o[attr] = f.id
            n_ok = int(ok.sum())
            inp, outp = int(billed["input_tokens"].sum()), int(billed["output_tokens"].sum())
            o["status"] = status
            o[f"{status}_at"] = now_i
            o["request_counts"] = {"total": b.total, "completed": n_ok, "failed": n - n_ok}
            o["usage"] = {
                "input_tokens": inp,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": outp,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": inp + outp,
            }
            b.final = o
            # Frozen: what it was made from is not needed again (a long dry run keeps only
            # the result files, as the real service does).
            b.work, b.failing, b.data = None, None, b""
            return o

    # sync ---------------------------------------------------------------------------------
    def sync(self, endpoint: str):
        def handler(request: Request) -> Response:
            if (limited := self._throttled("rate_limit_sync")) is not None:
                return limited
            body = request.json()
            if not isinstance(body, dict) or "model" not in body:
                return error(
                    400,
                    "you must provide a model parameter",
                    "invalid_request_error",
                    param="model",
                )
            if self.ctx.sync_fails(request.body):
                return error(400, _FAULT_MESSAGE, "invalid_request_error")
            flex = body.get("service_tier") == "flex"
            if flex and self.ctx.take("flex_unavailable"):
                return error(
                    429,
                    "Resource Unavailable: flex processing lacks capacity right now; retry "
                    "later or use another service tier. You were not charged.",
                    "rate_limit_error",
                    code="resource_unavailable",
                )
            try:
                resp, inp, outp = respond(endpoint, body, self.ctx.new_id, self.ctx.faults)
            except ModelError as exc:
                return error(404, str(exc), "invalid_request_error", code="model_not_found")
            if flex and endpoint != "/v1/embeddings":
                resp["service_tier"] = "flex"  # the tier that served it
            self.ctx.ledger.bill(
                "openai",
                None,
                request.headers.get("x-request-key", ""),
                inp,
                outp,
                model=str(body.get("model", "")),
                tier="flex" if flex else "sync",
                at=self.ctx.clock(),
                cache_read=int(inp * self.ctx.faults.cache_read),
                kind="embedding" if endpoint == "/v1/embeddings" else "completion",
            )
            return Response.json(resp)

        return handler


_FAULT_MESSAGE = "Emulated invalid request (request_errors fault)."
_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed because the batch was cancelled."

#: A batch's work, one row per request in input order: the response body as JSON text, or the
#: message of the 400 the real API gives a request it cannot take, and the tokens it bills.
_WORK = {
    "custom_id": pl.String,
    "body": pl.String,
    "message": pl.String,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
}


def _queue_error(model_name: str | None, limit: int) -> dict[str, Any]:
    return {
        "code": "token_limit_exceeded",
        "message": f"Enqueued token limit reached for {model_name or '?'} in organization "
        f"org-emulator. Limit: {limit:,} enqueued tokens. Please try again once some "
        "in_progress batches have been completed.",
        "param": None,
        "line": None,
    }


# The fields of a chat line the columnar path reads, in one parse per line (DuckDB's list form
# of json_extract); their JSON types are checked before any is used.
_CHAT_PATHS = (
    "$.custom_id",
    "$.url",
    "$.method",
    "$.body",
    "$.body.model",
    "$.body.messages",
    "$.body.response_format",
    "$.body.response_format.json_schema",
    "$.body.response_format.json_schema.schema",
    "$.body.max_completion_tokens",
    "$.body.max_tokens",
)
_CHAT_SQL = f"""
WITH f AS (
    SELECT n, json_valid(line) AS ok,
        CASE WHEN json_valid(line) THEN json_type(line) END AS t_line,
        CASE WHEN json_valid(line) THEN json_extract(line, {list(_CHAT_PATHS)}) END AS v
    FROM lines
)
SELECT n, ok, t_line, list_transform(v, lambda x: json_type(x)) AS t,
    v[1]->>'$' AS custom_id, v[2]->>'$' AS url, v[3]->>'$' AS method, v[5]->>'$' AS model,
    json_transform(v[6], '[{{"role":"VARCHAR","content":"VARCHAR"}}]') AS messages,
    list_transform(json_extract(v[6], '$[*]'),
        lambda m: [json_type(m), coalesce(json_type(m, '$.role'), 'VARCHAR'), json_type(m, '$.content')])
        AS t_messages,
    v[9]::VARCHAR AS schema, (v[10]->>'$')::BIGINT AS mct, (v[11]->>'$')::BIGINT AS mt
FROM f ORDER BY n
"""
_ABSENT_OR = ("NULL",)  # JSON null, which the API reads as absent for these fields


def parse_chat(data: bytes, endpoint: str) -> pl.DataFrame | None:
    """The requests of a chat-completions input file in columns (custom_id, model, messages,
    schema, cap), or None when the file needs :func:`validate`'s line-by-line reading: a line
    the real validator refuses, or a shape the columns do not cover (content parts, CR line
    ends, ...). None is always safe; a frame only for files :func:`validate` accepts whole."""
    if endpoint != "/v1/chat/completions" or len(data) > MAX_BYTES:
        return None
    if b"\r" in data or b"\x1f" in data:  # \x1f never occurs in valid JSON: our separator
        return None
    lines = pl.read_csv(
        io.BytesIO(data),
        has_header=False,
        separator="\x1f",
        quote_char=None,
        new_columns=["line"],
        schema={"line": pl.String},
    ).filter(pl.col("line").str.strip_chars() != "")
    if not COLUMNS_FROM <= lines.height <= MAX_REQUESTS or not lines.height:
        return None
    lines = lines.with_row_index("n")
    con = duckdb.connect()
    try:
        con.register("lines", lines)
        r = con.sql(_CHAT_SQL).pl()
    finally:
        con.close()
    t, typed = pl.col("t"), columns.json_typed
    clean = r.select(
        pl.col("ok").all()
        & (pl.col("t_line") == "OBJECT").all()
        & typed(1, "VARCHAR").all()
        & typed(2, "VARCHAR").all()
        & (pl.col("url") == endpoint).all()
        & (t.list.get(2).is_null() | (pl.col("method") == "POST")).fill_null(False).all()
        & typed(4, "OBJECT").all()
        & typed(5, "VARCHAR").all()
        & typed(6, "ARRAY", absent=True).all()
        & typed(7, "OBJECT", *_ABSENT_OR, absent=True).all()
        & typed(8, "OBJECT", *_ABSENT_OR, absent=True).all()
        & typed(9, "OBJECT", *_ABSENT_OR, absent=True).all()
        & typed(10, "UBIGINT", "BIGINT", *_ABSENT_OR, absent=True).all()
        & typed(11, "UBIGINT", "BIGINT", *_ABSENT_OR, absent=True).all()
        & pl.col("t_messages")
        .list.eval(pl.element() == pl.lit(["OBJECT", "VARCHAR", "VARCHAR"]))
        .list.all()
        .fill_null(True)
        .all()
        & (pl.col("custom_id").n_unique() == pl.len())
        & (pl.col("model").n_unique() == 1)
    ).item()
    if not clean:
        return None
    return r.select(
        "custom_id",
        "model",
        pl.col("messages").fill_null([]),
        pl.col("schema").replace("null", None),
        # the reader's `max_completion_tokens or max_tokens`: 0 counts as absent
        pl.when(pl.col("mct") != 0).then("mct").otherwise("mt").alias("cap"),
    )


def answer_chat(chat: pl.DataFrame, ctx: Context) -> pl.DataFrame:
    """The work frame (:data:`_WORK`) for :func:`parse_chat`'s requests: the model's answers,
    the input tokens by the chat format's rules, and the response bodies as JSON text."""
    model_name = chat["model"][0]
    problem = model.model_problem("openai", model_name, embed=False)
    if problem is not None:
        return chat.select(
            "custom_id",
            pl.lit(None, pl.String).alias("body"),
            pl.lit(problem).alias("message"),
            pl.lit(0, pl.Int64).alias("input_tokens"),
            pl.lit(0, pl.Int64).alias("output_tokens"),
        )
    encoding = tokenizers.openai_encoding(model_name)
    enc = get_encoding(encoding)
    frame = chat.with_row_index("row")
    # Input tokens: 3 to prime the reply, and per message 3 + its role + its content.
    flat = frame.select("row", pl.col("messages")).explode("messages").unnest("messages")
    flat = flat.filter(pl.col("content").is_not_null() | pl.col("role").is_not_null())
    roles = {r: len(enc.encode_ordinary(r)) for r in flat["role"].fill_null("user").unique()}
    flat = flat.with_columns(
        prompt_part=columns.count_tokens(flat["content"], encoding, distinct=False)
        + flat["role"].fill_null("user").replace_strict(roles, return_dtype=pl.Int64)
        + 3
    )
    per_row = flat.group_by("row").agg(pl.col("prompt_part").sum())
    user = (
        flat.filter(pl.col("role").fill_null("user") == "user")
        .group_by("row")
        .agg(pl.col("content").last().alias("prompt"))
    )
    frame = (
        frame.join(per_row, on="row", how="left")
        .join(user, on="row", how="left")
        .with_columns(
            input_tokens=3 + pl.col("prompt_part").fill_null(0),
            prompt=pl.col("prompt").fill_null(""),
        )
    )
    parts = []
    for (schema_text,), group in frame.group_by("schema", maintain_order=True):
        schema = orjson.loads(schema_text) if schema_text is not None else None
        overhead = tokenizers.schema_tokens(schema, encoding) if schema is not None else 0
        said = columns.answers(group["prompt"], schema, group["cap"])
        parts.append(
            group.select("row", "custom_id", (pl.col("input_tokens") + overhead)).hstack(said)
        )
    done = pl.concat(parts).sort("row")
    cached = (done["input_tokens"] * ctx.faults.cache_read).floor().cast(pl.Int64)
    total = done["input_tokens"] + done["output_tokens"]
    body = columns.concat(
        [
            '{"id":"',
            ctx.new_ids("chatcmpl-", done.height),
            '","object":"chat.completion","created":0,"model":'
            + orjson.dumps(model_name).decode()
            + ',"choices":[{"index":0,"message":{"role":"assistant","content":',
            columns.json_strings(done["text"]),
            ',"refusal":null},"logprobs":null,"finish_reason":',
            done["cut"].replace_strict({True: '"length"', False: '"stop"'}, return_dtype=pl.String),
            '}],"usage":{"prompt_tokens":',
            done["input_tokens"].cast(pl.String),
            ',"completion_tokens":',
            done["output_tokens"].cast(pl.String),
            ',"total_tokens":',
            total.cast(pl.String),
            ',"prompt_tokens_details":{"cached_tokens":',
            cached.cast(pl.String),
            '},"completion_tokens_details":{"reasoning_tokens":0}},'
            '"service_tier":"default","system_fingerprint":"fp_emulator"}',
        ],
        done.height,
    )
    return pl.DataFrame(
        {
            "custom_id": done["custom_id"],
            "body": body,
            "message": pl.Series([None] * done.height, dtype=pl.String),
            "input_tokens": done["input_tokens"],
            "output_tokens": done["output_tokens"],
        },
        schema=_WORK,
    )


def _result_lines(
    frame: pl.DataFrame, unprocessed: tuple[str, str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(custom_id, line) frames of the output file and of the error file, in input order: a
    200 line for what ran, a 400 line for what the model refused or the request_errors fault
    hit, and the ``unprocessed`` (code, message) for what never ran."""
    code, text = unprocessed
    head = columns.concat(
        ['{"id":"', frame["id"], '","custom_id":', columns.json_strings(frame["custom_id"])],
        frame.height,
    )
    refused = columns.json_strings(frame["message"].fill_null(_FAULT_MESSAGE))
    lines = frame.select(
        "custom_id",
        "ok",
        line=pl.when("ok")
        .then(
            pl.concat_str(
                pl.lit(head),
                pl.lit(',"response":{"status_code":200,"request_id":"'),
                "request_id",
                pl.lit('","body":'),
                "body",
                pl.lit('},"error":null}'),
            )
        )
        .when("errored")
        .then(
            pl.concat_str(
                pl.lit(head),
                pl.lit(',"response":{"status_code":400,"request_id":"'),
                "request_id",
                pl.lit('","body":{"error":{"message":'),
                pl.lit(refused),
                pl.lit(',"type":"invalid_request_error","param":null,"code":null}}},"error":null}'),
            )
        )
        .otherwise(
            pl.concat_str(
                pl.lit(head),
                pl.lit(
                    ',"response":null,"error":{"code":'
                    + orjson.dumps(code).decode()
                    + ',"message":'
                    + orjson.dumps(text).decode()
                    + "}}"
                ),
            )
        ),
    )
    return (
        lines.filter("ok").select("custom_id", "line"),
        lines.filter(~pl.col("ok")).select("custom_id", "line"),
    )


class ModelError(ValueError):
    """The request names a model the service would refuse (see :func:`model.model_problem`)."""


def validate(
    data: bytes, endpoint: str, queue_limit: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse an input file as the Batch API validates it; (lines, errors)."""
    errors: list[dict[str, Any]] = []

    def fail(code: str, message: str, line: int | None = None) -> None:
        errors.append({"code": code, "message": message, "param": None, "line": line})

    if len(data) > MAX_BYTES:
        fail("file_too_large", f"The input file is larger than the {MAX_BYTES:,}-byte limit.")
        return [], errors
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    inputs = 0
    tokens = 0
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
            cid, url, body = line["custom_id"], line["url"], line["body"]
        except (ValueError, KeyError, TypeError):
            fail("invalid_json_line", "This line is not parseable as valid JSON.", n)
            continue
        if cid in seen:
            fail(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The custom_id parameter must be unique for each request in a batch.",
                n,
            )
            continue
        seen.add(cid)
        if url != endpoint:
            fail(
                "url_mismatch",
                f"The URL provided for this request does not match the batch endpoint: {url!r} vs {endpoint!r}.",
                n,
            )
            continue
        if line.get("method", "POST") != "POST":
            fail("invalid_method", "Only POST is supported.", n)
            continue
        models.add(str(body.get("model")))
        if len(models) > 1:
            fail("model_mismatch", "All requests in a batch must use the same model.", n)
            models = {next(iter(models))}
            continue
        if endpoint == "/v1/embeddings":
            inp = body.get("input")
            inputs += len(inp) if isinstance(inp, list) else 1
        lines.append(line)
        if queue_limit is not None:
            tokens += input_tokens(endpoint, body)
    if not lines and not errors:
        fail("empty_file", "The input file is empty.")
    if len(lines) > MAX_REQUESTS:
        fail(
            "too_many_tasks",
            f"The batch has {len(lines):,} requests; the limit is {MAX_REQUESTS:,}.",
        )
    if inputs > MAX_EMBEDDING_INPUTS:
        fail(
            "too_many_tasks",
            f"The batch has {inputs:,} embedding inputs; the limit is {MAX_EMBEDDING_INPUTS:,}.",
        )
    if queue_limit is not None and tokens > queue_limit and not errors:
        errors.append(_queue_error(next(iter(models), None), queue_limit))
    return lines, errors


def _prompt(body: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """The last user text and the messages as plain {role, content} strings."""
    messages = []
    for m in body.get("messages", []):
        content = m.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        messages.append({"role": m.get("role", "user"), "content": content})
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return user, messages


def input_tokens(endpoint: str, body: dict[str, Any]) -> int:
    model_name = str(body.get("model", ""))
    if endpoint == "/v1/embeddings":
        inp = body.get("input", "")
        texts = inp if isinstance(inp, list) else [inp]
        enc = get_encoding(tokenizers.openai_encoding(model_name))
        return sum(len(enc.encode_ordinary(t)) for t in texts if isinstance(t, str))
    if endpoint == "/v1/responses":
        messages = (
            [{"role": "system", "content": body["instructions"]}]
            if body.get("instructions")
            else []
        )
        inp = body.get("input", "")
        messages.append(
            {"role": "user", "content": inp if isinstance(inp, str) else json.dumps(inp)}
        )
        schema = ((body.get("text") or {}).get("format") or {}).get("schema")
    else:
        _, messages = _prompt(body)
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    total = tokenizers.chat_tokens(messages, model_name)
    if schema is not None:
        total += tokenizers.schema_tokens(schema, tokenizers.openai_encoding(model_name))
    return total


def respond(
    endpoint: str, body: dict[str, Any], new_id: Any, faults: Faults | None = None
) -> tuple[dict[str, Any], int, int]:
    """The sync response body for ``body``, with its input and output tokens (``faults``:
    the share of input reported as a prompt-cache hit, :attr:`Faults.cache_read`)."""
    model_name = str(body.get("model", ""))
    problem = model.model_problem("openai", model_name, embed=endpoint == "/v1/embeddings")
    if problem is not None:
        raise ModelError(problem)
    inp_tokens = input_tokens(endpoint, body)
    cached = int(inp_tokens * faults.cache_read) if faults is not None else 0
    if endpoint == "/v1/embeddings":
        inp = body.get("input", "")
        texts = inp if isinstance(inp, list) else [inp]
        dims = model.embedding_dims(model_name, body.get("dimensions"))
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, t in enumerate(texts):
            vec = model.embedding_array(str(t), dims)
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": model.embedding_base64(vec) if b64 else vec.to_pylist(),
                }
            )
        usage = {"prompt_tokens": inp_tokens, "total_tokens": inp_tokens}
        return {"object": "list", "data": data, "model": model_name, "usage": usage}, inp_tokens, 0
    if endpoint == "/v1/responses":
        inp = body.get("input", "")
        prompt = inp if isinstance(inp, str) else json.dumps(inp)
        schema = ((body.get("text") or {}).get("format") or {}).get("schema")
        thinking = faults.reasoning if faults is not None else 0
        text, cut, out_tokens = model.answer(
            prompt, schema, body.get("max_output_tokens"), thinking
        )
        resp = {
            "id": new_id("resp_"),
            "object": "response",
            "created_at": 0,
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "model": model_name,
            "output": [
                {
                    "type": "message",
                    "id": new_id("msg_"),
                    "status": "incomplete" if cut else "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": inp_tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": min(thinking, out_tokens)},
                "total_tokens": inp_tokens + out_tokens,
            },
        }
        return resp, inp_tokens, out_tokens
    user, _ = _prompt(body)
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    thinking = faults.reasoning if faults is not None else 0
    text, cut, out_tokens = model.answer(user, schema, cap, thinking)
    resp = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": 0,
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if cut else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": inp_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": inp_tokens + out_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": min(thinking, out_tokens)},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }
    return resp, inp_tokens, out_tokens
