"""Gemini (Developer API) emulation: Batch Mode, Files and the sync calls, under ``/gemini``.

Served under both ``/v1`` and ``/v1beta`` (the SDK defaults to ``v1``, the docs use ``v1beta``).
States ``BATCH_STATE_PENDING → RUNNING → SUCCEEDED`` (or ``FAILED``, ``CANCELLED``, ``EXPIRED``
with no results at all); int64 counters as strings with zero counters left out; the output in
both ``metadata.output`` and ``response``; results in input order, keyed by ``key``/``metadata``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl

from polars_llmbatch.emulator import columns, gemini_columns, model, tokenizers
from polars_llmbatch.emulator.context import Context
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.http import Request, Response, Router
from polars_llmbatch.emulator.results import outcomes
from polars_llmbatch.emulator.store import BatchStore
from polars_llmbatch.emulator.timeline import Timeline

__all__ = ["GeminiEmulator"]

PREFIX = "/gemini"
VERSIONS = ("v1", "v1beta")
INLINE_MAX_BYTES = 20_000_000
#: Batches where at least this many generate requests ran are answered in columns (see
#: :mod:`columns`); smaller ones request by request, which is faster below it.
COLUMNS_FROM = 500
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main."


def error(status: int, code: str, message: str) -> Response:
    return Response.json({"error": {"code": status, "message": message, "status": code}}, status)


def _queue_full(model_name: str, limit: int) -> Response:
    return error(
        429,
        "RESOURCE_EXHAUSTED",
        f"Enqueued token limit exceeded for model {model_name}: limit {limit:,}.",
    )


def rfc3339(t: float) -> str:
    whole = dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{int((t % 1) * 1e9):09d}Z"


def _get(obj: dict[str, Any], *names: str) -> Any:
    """A field by its camelCase or snake_case name (proto-JSON accepts both)."""
    for name in names:
        if name in obj:
            return obj[name]
    return None


@dataclass
class _File:
    name: str
    display_name: str
    mime_type: str
    data: bytes
    created_at: float
    source: str = "UPLOADED"

    def obj(self, base: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "displayName": self.display_name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": rfc3339(self.created_at),
            "updateTime": rfc3339(self.created_at),
            "expirationTime": rfc3339(self.created_at + 48 * 3600),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).digest()).decode(),
            "uri": f"{base}/v1beta/{self.name}",
            "downloadUri": f"{base}/download/v1beta/{self.name}:download?alt=media",
            "state": "ACTIVE",
            "source": self.source,
        }


@dataclass
class _Batch:
    id: str
    model: str
    kind: str  # "generate" or "embed"
    display_name: str | None
    created_at: float
    timeline: Timeline
    entries: list[tuple[str, dict[str, Any], dict[str, Any] | None]]  # (key, request, metadata)
    inline: bool
    input_file: str | None
    expire_at: float | None
    faults: Faults = field(default_factory=Faults)
    final: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: int = 0  # its requests
    # A file read in columns (gemini_columns): no entries; the answers (``work``) computed
    # in a background thread from create on, and the results wait for them.
    work: pl.DataFrame | None = None
    computed: threading.Event | None = None


class GeminiEmulator(BatchStore[_Batch]):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.files: dict[str, _File] = {}
        self.uploads: dict[str, dict[str, Any]] = {}

    @property
    def base(self) -> str:
        return f"{self.ctx.base_url}{PREFIX}"

    def routes(self, router: Router) -> None:
        def r(method: str, path: str, handler: Any) -> None:
            router.add(method, PREFIX + path, self.guard(handler))

        for v in VERSIONS:
            r("POST", f"/upload/{v}/files", self.upload)
            r("GET", f"/{v}/files/{{file_id}}:download", self.download)
            r("GET", f"/download/{v}/files/{{file_id}}:download", self.download)
            r("GET", f"/{v}/files/{{file_id}}", self.get_file)
            r("DELETE", f"/{v}/files/{{file_id}}", self.delete_file)
            r("POST", f"/{v}/models/{{model_verb}}", self.model_call)
            r("GET", f"/{v}/batches", self.list)
            r("POST", f"/{v}/batches/{{batch_verb}}", self.batch_verb)
            r("GET", f"/{v}/batches/{{batch_id}}", self.get)
            r("DELETE", f"/{v}/batches/{{batch_id}}", self.delete)

    def guard(self, handler: Any) -> Any:
        def guarded(request: Request) -> Response:
            # The resumable upload URL is itself the credential of the second step.
            if request.arg("upload_id") in self.uploads:
                return handler(request)
            if not (request.headers.get("x-goog-api-key", "").strip() or request.arg("key")):
                return error(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call "
                    "this API.",
                )
            return handler(request)

        return guarded

    # files --------------------------------------------------------------------------------
    def upload(self, request: Request) -> Response:
        command = request.headers.get("x-goog-upload-command", "")
        upload_id = request.arg("upload_id")
        if upload_id is None:
            if "start" not in command:
                return error(400, "INVALID_ARGUMENT", "Expected X-Goog-Upload-Command: start")
            meta = _get(request.json() or {}, "file") or {}
            upload_id = self.ctx.new_id("", 32)
            self.uploads[upload_id] = {
                "display_name": _get(meta, "displayName", "display_name") or "",
                "mime_type": _get(meta, "mimeType", "mime_type")
                or request.headers.get(
                    "x-goog-upload-header-content-type", "application/octet-stream"
                ),
                "data": bytearray(),
            }
            url = f"{self.base}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
            return Response(
                200,
                b"",
                {
                    "x-goog-upload-url": url,
                    "x-goog-upload-status": "active",
                    "content-type": "application/json",
                },
            )
        pending = self.uploads.get(upload_id)
        if pending is None:
            return error(404, "NOT_FOUND", "Unknown upload")
        pending["data"] += request.body
        if "finalize" not in command:
            return Response(200, b"", {"x-goog-upload-status": "active"})
        del self.uploads[upload_id]
        f = _File(
            f"files/{self.ctx.new_id('', 12)}",
            pending["display_name"],
            pending["mime_type"],
            bytes(pending["data"]),
            self.ctx.clock(),
        )
        with self.lock:
            self.files[f.name] = f
        self.ctx.ledger.upload("gemini", f.name, len(f.data))
        return Response.json({"file": f.obj(self.base)}, headers={"x-goog-upload-status": "final"})

    def _file(self, request: Request) -> _File | Response:
        f = self.files.get("files/" + request.params["file_id"])
        if f is None:
            return error(404, "NOT_FOUND", f"File files/{request.params['file_id']} not found")
        return f

    def get_file(self, request: Request) -> Response:
        f = self._file(request)
        return f if isinstance(f, Response) else Response.json(f.obj(self.base))

    def delete_file(self, request: Request) -> Response:
        f = self._file(request)
        if isinstance(f, Response):
            return f
        with self.lock:
            self.files.pop(f.name, None)
        return Response.json({})

    def download(self, request: Request) -> Response:
        f = self._file(request)
        if isinstance(f, Response):
            return f
        if f.source == "GENERATED" and self.ctx.take("read_errors"):
            return error(503, "UNAVAILABLE", "The service is currently unavailable.")
        response = Response.raw(f.data, "application/octet-stream")
        if f.source == "GENERATED" and self.ctx.take("drop_downloads"):
            response.cut_after = len(f.data) // 2
        return response

    # models/{model}:{verb} ----------------------------------------------------------------
    def model_call(self, request: Request) -> Response:
        model_name, _, verb = request.params["model_verb"].partition(":")
        body = request.json() or {}
        sync_call = verb in ("generateContent", "embedContent")
        if sync_call and (limited := self._throttled("rate_limit_sync")) is not None:
            return limited
        embeds = verb in ("embedContent", "batchEmbedContents", "asyncBatchEmbedContent")
        problem = model.model_problem("gemini", model_name, embed=embeds)
        if problem is not None:
            return error(
                404,
                "NOT_FOUND",
                f"models/{model_name} is not found, or is not supported for {verb}. ({problem})",
            )
        if verb == "countTokens":
            return self.count_tokens(model_name, body)
        if sync_call and self.ctx.sync_fails(request.body):
            return error(
                400, "INVALID_ARGUMENT", "Emulated invalid request (request_errors fault)."
            )
        flex = str(_get(body, "service_tier", "serviceTier") or "").upper() == "FLEX"
        if flex and verb == "generateContent" and self.ctx.take("flex_unavailable"):
            return error(
                429,
                "RESOURCE_EXHAUSTED",
                "Flex inference is at capacity; retry later or use the standard tier.",
            )
        if verb == "generateContent":
            resp, inp, outp = respond(model_name, body, self.ctx.faults)
            self.ctx.ledger.bill(
                "gemini",
                None,
                "",
                inp,
                outp,
                model=model_name,
                tier="flex" if flex else "sync",
                at=self.ctx.clock(),
                cache_read=int(inp * self.ctx.faults.cache_read),
            )
            return Response.json(resp)
        if verb == "embedContent":
            resp, inp = embed(model_name, body)
            self.ctx.ledger.bill(
                "gemini", None, "", inp, 0, model=model_name, at=self.ctx.clock(), kind="embedding"
            )
            return Response.json(resp)
        if verb == "batchEmbedContents":
            out = [embed(model_name, r) for r in body.get("requests", [])]
            return Response.json({"embeddings": [r["embedding"] for r, _ in out]})
        if verb in ("batchGenerateContent", "asyncBatchEmbedContent"):
            return self.create(
                model_name, "generate" if verb == "batchGenerateContent" else "embed", body
            )
        return error(404, "NOT_FOUND", f"Unknown method {verb!r}")

    def count_tokens(self, model_name: str, body: dict[str, Any]) -> Response:
        """``models/{m}:countTokens``: the prompt tokens of ``contents`` or of a whole
        ``generateContentRequest`` (system instruction and response schema included), free
        (its own quota, the ``rate_limit_counts`` fault)."""
        if (limited := self._throttled("rate_limit_counts")) is not None:
            return limited
        whole = _get(body, "generateContentRequest", "generate_content_request")
        contents = _get(body, "contents")
        if whole is not None and contents is not None:
            return error(
                400,
                "INVALID_ARGUMENT",
                "contents and generateContentRequest are mutually exclusive.",
            )
        if whole is not None:
            if not isinstance(whole, dict) or not _get(whole, "model"):
                return error(
                    400, "INVALID_ARGUMENT", "generateContentRequest.model: field is required."
                )
            req = whole
        elif isinstance(contents, list):
            req = {"contents": contents}
        else:
            return error(400, "INVALID_ARGUMENT", "Either contents or generateContentRequest.")
        self.ctx.ledger.counted("gemini")
        n = input_tokens(model_name, req)
        details = [{"modality": "TEXT", "tokenCount": n}]
        return Response.json({"totalTokens": n, "promptTokensDetails": details})

    # batches ------------------------------------------------------------------------------
    def _throttled(self, budget: str) -> Response | None:
        """Gemini's 429 (no Retry-After) while the rate-limit fault ``budget`` lasts."""
        if not self.ctx.take(budget):
            return None
        return error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
        )

    def create(self, model_name: str, kind: str, body: dict[str, Any]) -> Response:
        if (limited := self._throttled("rate_limit_creates")) is not None:
            return limited
        batch = _get(body, "batch")
        if not isinstance(batch, dict):
            return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Missing 'batch'.")
        config = _get(batch, "inputConfig", "input_config") or {}
        file_name = _get(config, "fileName", "file_name")
        entries: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
        if file_name:
            f = self.files.get(file_name)
            if f is None:
                return error(404, "NOT_FOUND", f"File {file_name} not found")
            if (fast := self._create_in_columns(model_name, kind, batch, f)) is not None:
                return fast
            for n, raw in enumerate(f.data.splitlines(), start=1):
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                    entries.append((str(line["key"]), line["request"], None))
                except (ValueError, KeyError, TypeError):
                    return error(
                        400, "INVALID_ARGUMENT", f"Invalid JSON on line {n} of {file_name}."
                    )
        else:
            reqs = _get(_get(config, "requests") or {}, "requests")
            if not isinstance(reqs, list) or not reqs:
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    "Invalid JSON payload received. inputConfig needs fileName or requests.",
                )
            for i, item in enumerate(reqs):
                meta = item.get("metadata")
                key = str((meta or {}).get("key", i))
                entries.append((key, item.get("request", {}), meta))
        limit = self.ctx.faults.queue_limit_tokens
        if (
            limit is not None
            and sum(input_tokens(model_name, req) for _, req, _ in entries) > limit
        ):
            return _queue_full(model_name, limit)
        b = self._admit(
            model_name,
            kind,
            batch,
            lambda: sum(input_tokens(model_name, req) for _, req, _ in entries),
            entries=entries,
            input_file=file_name,
            total=len(entries),
        )
        return b if isinstance(b, Response) else Response.json(self.operation(b, b.created_at))

    def _admit(
        self,
        model_name: str,
        kind: str,
        batch: dict[str, Any],
        tokens: Any,
        *,
        entries: list[tuple[str, dict[str, Any], dict[str, Any] | None]],
        input_file: str | None,
        total: int,
        computed: threading.Event | None = None,
    ) -> _Batch | Response:
        """A created batch, once the organisation's queue (``org_queue_tokens``) takes its
        ``tokens()``; the refusal otherwise."""
        now = self.ctx.clock()
        timeline = Timeline(now, self.ctx.duration)
        if self.ctx.faults.org_queue_tokens is not None and not self.ctx.enqueue(
            model_name, tokens(), timeline
        ):
            return _queue_full(model_name, self.ctx.faults.org_queue_tokens)
        b = _Batch(
            id=self.ctx.new_id("", 36),
            model=model_name,
            kind=kind,
            display_name=_get(batch, "displayName", "display_name"),
            created_at=now,
            timeline=timeline,
            entries=entries,
            inline=input_file is None,
            input_file=input_file,
            expire_at=None,
            total=total,
            computed=computed,
        )
        b.faults = self.ctx.batch_faults()
        b.expire_at = b.faults.expire_at
        self.add(b.id, b)
        self.ctx.ledger.batch("gemini", f"batches/{b.id}", total, b.display_name)
        return b

    def _create_in_columns(
        self, model_name: str, kind: str, batch: dict[str, Any], f: _File
    ) -> Response | None:
        """The create of a big clean file of generate requests, read in columns; None when
        the file needs the per-request reading (small, odd or refused: that path gives the
        errors)."""
        faults = self.ctx.faults
        if kind != "generate" or faults.reasoning or f.data.count(b"\n") < COLUMNS_FROM:
            return None
        frame = gemini_columns.parse_file(f.data, model_name)
        if frame is None or frame.height < COLUMNS_FROM:
            return None
        inputs = None
        if faults.queue_limit_tokens is not None or faults.org_queue_tokens is not None:
            inputs = gemini_columns.input_tokens(model_name, frame)
        limit = faults.queue_limit_tokens
        if limit is not None and inputs is not None and int(inputs.sum()) > limit:
            return _queue_full(model_name, limit)
        b = self._admit(
            model_name,
            kind,
            batch,
            lambda: int(inputs.sum()) if inputs is not None else 0,
            entries=[],
            input_file=f.name,
            total=frame.height,
            computed=threading.Event(),
        )
        if isinstance(b, Response):
            return b
        threading.Thread(target=self._compute, args=(b, frame, inputs), daemon=True).start()
        return Response.json(self.operation(b, b.created_at))

    def _compute(self, b: _Batch, frame: pl.DataFrame, inputs: pl.Series | None) -> None:
        """The model's work for a columnar batch, off the request thread (as the real
        service works asynchronously); an emulator bug errors every request visibly."""
        try:
            b.work = gemini_columns.answer_frame(b.model, frame, b.faults.cache_read, inputs)
        except Exception as exc:
            b.work = frame.select(
                "key",
                pl.lit(None, pl.String).alias("response"),
                pl.lit(0, pl.Int64).alias("input_tokens"),
                pl.lit(0, pl.Int64).alias("output_tokens"),
                pl.lit(f"Emulator error: {exc!r}").alias("problem"),
            )
        finally:
            assert b.computed is not None
            b.computed.set()

    def _batch(self, request: Request, param: str = "batch_id") -> _Batch | Response:
        b = self.batches.get(request.params[param].partition(":")[0])
        if b is None:
            return error(404, "NOT_FOUND", f"Batch batches/{request.params[param]} not found")
        return b

    def get(self, request: Request) -> Response:
        if self.ctx.take("read_errors"):
            return error(503, "UNAVAILABLE", "The service is currently unavailable.")
        b = self._batch(request)
        return b if isinstance(b, Response) else Response.json(self.operation(b, self.ctx.clock()))

    def batch_verb(self, request: Request) -> Response:
        b = self._batch(request, "batch_verb")
        if isinstance(b, Response):
            return b
        verb = request.params["batch_verb"].partition(":")[2]
        if verb == "cancel":
            now = self.ctx.clock()
            if self.operation(b, now).get("done"):
                return error(400, "FAILED_PRECONDITION", "The batch has already finished.")
            if b.timeline.cancelled_at is None:
                b.timeline.cancelled_at = now
            return Response.json({})
        if verb == "delete":
            return self._delete(b)
        return error(404, "NOT_FOUND", f"Unknown method {verb!r}")

    def delete(self, request: Request) -> Response:
        b = self._batch(request)
        return b if isinstance(b, Response) else self._delete(b)

    def _delete(self, b: _Batch) -> Response:
        self.remove(b.id)
        return Response.json({})

    def list(self, request: Request) -> Response:
        size = min(max(int(request.arg("pageSize", "50") or 50), 1), 1000)
        start = int(request.arg("pageToken", "0") or 0)
        ids = self.newest_first()
        page, now = ids[start : start + size], self.ctx.clock()
        # Like the real list, without inlined responses.
        ops = [
            self.operation(b, now, with_output=False)
            for i in page
            if (b := self.batches.get(i)) is not None
        ]
        out: dict[str, Any] = {"operations": ops}
        if start + size < len(ids):
            out["nextPageToken"] = str(start + size)
        return Response.json(out)

    def current(self, batch: _Batch, now: float) -> dict[str, Any]:
        return self.operation(batch, now)

    # the operation at a moment --------------------------------------------------------------
    def operation(self, b: _Batch, now: float, with_output: bool = True) -> dict[str, Any]:
        if b.final is None:
            self._advance(b, now)
        if b.final is not None:
            op = orjson.loads(orjson.dumps(b.final))
            if not with_output:
                op["metadata"].pop("output", None)
                op.pop("response", None)
            return op
        t = b.timeline
        phase = t.at(now)
        total = b.total
        done = int(total * phase.progress)
        stats = {"requestCount": str(total)}
        if done:
            stats["successfulRequestCount"] = str(done)
        if total - done:
            stats["pendingRequestCount"] = str(total - done)
        meta = self._meta(
            b,
            "BATCH_STATE_PENDING" if phase.name == "validating" else "BATCH_STATE_RUNNING",
            now,
            stats,
        )
        return {"name": f"batches/{b.id}", "metadata": meta}

    def _meta(self, b: _Batch, state: str, now: float, stats: dict[str, str]) -> dict[str, Any]:
        resource = "GenerateContentBatch" if b.kind == "generate" else "EmbedContentBatch"
        meta: dict[str, Any] = {
            "@type": _TYPE + resource,
            "model": f"models/{b.model}",
            "createTime": rfc3339(b.created_at),
            "updateTime": rfc3339(now),
            "batchStats": stats,
            "state": state,
            "name": f"batches/{b.id}",
        }
        if b.display_name:
            meta["displayName"] = b.display_name
        if b.input_file:
            meta["inputConfig"] = {"fileName": b.input_file}
        return meta

    def _advance(self, b: _Batch, now: float) -> None:
        t = b.timeline
        phase = t.at(now)
        if b.expire_at is not None and phase.progress >= b.expire_at and t.cancelled_at is None:
            self._finish(b, "BATCH_STATE_EXPIRED", b.expire_at, t.when(b.expire_at))
        elif phase.name in ("cancelling", "cancelled"):
            # Gemini has no "cancelling" state: the cancel takes effect at once.
            self._finish(b, "BATCH_STATE_CANCELLED", phase.progress, t.cancelled_at or now)
        elif phase.name == "done":
            self._finish(b, "BATCH_STATE_SUCCEEDED", 1.0, phase.since)

    def _finish(self, b: _Batch, state: str, processed: float, when: float) -> None:
        if b.computed is not None:
            self._finish_columns(b, state, processed, when)
            return
        with b.lock:
            if b.final is not None:
                return
            faults = b.faults
            total = len(b.entries)
            ok = failed = 0
            responses: list[tuple[str, dict[str, Any]]] = []
            expired = state == "BATCH_STATE_EXPIRED"
            runs = outcomes([key for key, _, _ in b.entries], processed, faults)
            ran = [b.entries[out.index][1] for out in runs if out.kind == "ok"]
            # Enough generate requests are answered in columns (None: answer that one alone).
            answered = (
                _answer_columns(b.model, ran, faults)
                if b.kind == "generate"
                and len(ran) >= COLUMNS_FROM
                and not expired
                and not faults.reasoning
                else [None] * len(ran)
            )
            bills: list[tuple[str, int, int]] = []
            k = 0
            for out in runs:
                key, req, meta = b.entries[out.index]
                if out.kind == "unprocessed":
                    continue
                answer: Any = None
                if out.kind == "ok":
                    answer = answered[k]
                    k += 1
                    if answer is None:
                        try:
                            answer = self._answer(b, req)
                        except Exception as exc:  # a request the model could not take
                            answer = f"Invalid request: {exc!r}"
                if isinstance(answer, tuple):
                    resp, inp, outp = answer
                    if not expired:  # an expired job delivers nothing, so bills nothing
                        bills.append((key, inp, outp))
                    # a response from the columns is JSON text already
                    item: dict[str, Any] = (
                        {"response_json": resp} if isinstance(resp, str) else {"response": resp}
                    )
                    ok += 1
                else:
                    message = answer or "Emulated invalid request (request_errors fault)."
                    item = {
                        "error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}
                    }
                    failed += 1
                responses.append((key, {"meta": meta, **item}))
            if bills:
                billed = pl.DataFrame(bills, schema=["k", "i", "o"], orient="row")
                self.ctx.ledger.bill_many(
                    "gemini",
                    f"batches/{b.id}",
                    billed["k"],
                    billed["i"],
                    billed["o"],
                    model=b.model,
                    at=self.ctx.clock(),
                    cache_read=None
                    if b.kind == "embed"
                    else (billed["i"] * self.ctx.faults.cache_read).floor(),
                    kind="embedding" if b.kind == "embed" else "completion",
                )
            output = None if expired else self._output(b, responses)
            self._close(b, state, when, (total, ok, failed), output)
            b.entries = []  # frozen: what it was made from is not needed again

    def _close(
        self,
        b: _Batch,
        state: str,
        when: float,
        counts: tuple[int, int, int],
        output: dict[str, Any] | None,
    ) -> None:
        """The ended batch's operation (kept: it never changes again) from its ``counts``
        (requests, succeeded, failed); an expired job has no ``output`` at all."""
        total, ok, failed = counts
        stats = {"requestCount": str(total)}  # zero counters are left out, as Gemini does
        if ok:
            stats["successfulRequestCount"] = str(ok)
        if failed:
            stats["failedRequestCount"] = str(failed)
        if total - ok - failed:
            stats["pendingRequestCount"] = str(total - ok - failed)
        meta = self._meta(b, state, when, stats)
        meta["endTime"] = rfc3339(when)
        op: dict[str, Any] = {"name": f"batches/{b.id}", "metadata": meta, "done": True}
        if output is not None:
            out_type = (
                "GenerateContentBatchOutput" if b.kind == "generate" else "EmbedContentBatchOutput"
            )
            meta["output"] = output
            op["response"] = {"@type": _TYPE + out_type, **output}
        b.final = op

    def _finish_columns(self, b: _Batch, state: str, processed: float, when: float) -> None:
        """:meth:`_finish` of a batch read in columns: the same file, counts and bills."""
        assert b.computed is not None
        b.computed.wait()  # a terminal state needs the model's work done
        with b.lock:
            if b.final is not None:
                return
            work = b.work
            assert work is not None
            n, f = work.height, b.faults
            expired = state == "BATCH_STATE_EXPIRED"
            ran = pl.int_range(n, eager=True) < int(n * processed + 1e-9)
            hit = columns.hits(f.seed, "request_errors", f.request_errors, work["key"])
            problem = work["problem"] if "problem" in work.columns else None
            ok = ran & ~hit if problem is None else ran & ~hit & problem.is_null()
            errored = ran & ~ok
            billed = work.filter(ok)
            if billed.height and not expired:  # an expired job delivers nothing: no bill
                inp = billed["input_tokens"]
                self.ctx.ledger.bill_many(
                    "gemini",
                    f"batches/{b.id}",
                    billed["key"],
                    inp,
                    billed["output_tokens"],
                    model=b.model,
                    at=self.ctx.clock(),
                    cache_read=(inp * self.ctx.faults.cache_read).floor(),
                    kind="completion",
                )
            output = None
            if not expired:
                message = "Emulated invalid request (request_errors fault)."
                if problem is not None:  # the emulator's own failure, said on every line
                    message = problem.drop_nulls().first() or message
                error_body = {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}
                lines = gemini_columns.result_lines(work, ok, errored, error_body)
                output = self._responses_file(b, lines)
            self._close(b, state, when, (n, int(ok.sum()), int(errored.sum())), output)
            b.work = None  # frozen: only the results file is read from now on

    @staticmethod
    def _answer(b: _Batch, req: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        if b.kind == "embed":
            resp, inp = embed(b.model, req)
            return {"embedding": resp["embedding"], "tokenCount": str(inp)}, inp, 0
        return respond(b.model, req, b.faults)

    def _output(self, b: _Batch, responses: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        faults = b.faults
        if b.inline:
            items = []
            for key, r in responses:
                if faults.hits("missing", faults.missing, key):
                    continue
                if "response_json" in r:
                    r = {"meta": r["meta"], "response": orjson.loads(r["response_json"])}
                entry = {k: v for k, v in r.items() if k != "meta"}
                if r["meta"] is not None and not faults.no_inline_keys:
                    entry = {"metadata": r["meta"], **entry}
                items.append(entry)
                if faults.hits("duplicates", faults.duplicates, key):
                    items.append(entry)
            return {"inlinedResponses": {"inlinedResponses": items}}
        lines = [
            '{"key":' + orjson.dumps(key).decode() + ',"response":' + r["response_json"] + "}"
            if "response_json" in r
            else orjson.dumps({"key": key, **{k: v for k, v in r.items() if k != "meta"}}).decode()
            for key, r in responses
        ]
        frame = pl.DataFrame(
            {"custom_id": [key for key, _ in responses], "line": lines},
            schema={"custom_id": pl.String, "line": pl.String},
        )
        return self._responses_file(b, frame)

    def _responses_file(self, b: _Batch, frame: pl.DataFrame) -> dict[str, Any]:
        """The responses file of ``(custom_id, line)`` rows, after the line faults."""
        data = columns.finish_lines(frame, b.faults, shuffle=False)
        name = f"files/batch-{b.id}"
        f = _File(name, name, "application/jsonl", data, self.ctx.clock(), source="GENERATED")
        with self.lock:
            self.files[name] = f
        return {"responsesFile": name}


def _answer_columns(
    model_name: str, reqs: list[dict[str, Any]], faults: Faults
) -> list[tuple[str, int, int] | None]:
    """For each generate request, (response JSON, input tokens, output tokens) as
    :func:`respond` gives them, computed in columns; None where a request needs
    :func:`respond` itself (fields the columns do not read, a model the service refuses)."""
    out: list[tuple[str, int, int] | None] = [None] * len(reqs)
    if model.model_problem("gemini", model_name, embed=False) is not None:
        return out
    rows: list[tuple[int, str, str | None, int | None]] = []
    texts: list[tuple[int, str]] = []  # every text of a request, each counted on its own
    schemas: dict[str, dict[str, Any]] = {}
    for i, req in enumerate(reqs):
        try:
            contents = _get(req, "contents") or []
            user = _text(
                next((c for c in reversed(contents) if c.get("role", "user") == "user"), {})
            )
            config = _get(req, "generationConfig", "generation_config") or {}
            schema = _get(config, "responseJsonSchema", "response_json_schema")
            cap = _get(config, "maxOutputTokens", "max_output_tokens")
            every = [_text(c) for c in (contents or [_get(req, "content")])]
            every.append(_text(_get(req, "systemInstruction", "system_instruction")))
        except Exception:
            continue
        if (cap is not None and (type(cap) is not int or not -(2**63) <= cap < 2**63)) or (
            schema is not None and not isinstance(schema, dict)
        ):
            continue
        key = None
        if schema is not None:
            key = orjson.dumps(schema).decode()
            schemas.setdefault(key, schema)
        rows.append((i, user, key, cap))
        texts.extend((i, t) for t in every if t)
    if not rows:
        return out
    frame = pl.DataFrame(
        rows,
        schema={"i": pl.Int64, "user": pl.String, "schema": pl.String, "cap": pl.Int64},
        orient="row",
    )
    flat = pl.DataFrame(texts, schema={"i": pl.Int64, "t": pl.String}, orient="row")
    fam = tokenizers.family("gemini", model_name)
    flat = flat.with_columns(n=fam.count_series(flat["t"]))
    prompt = flat.group_by("i").agg(pl.col("n").sum().alias("inp"))
    parts = []
    for (key,), group in frame.group_by("schema", maintain_order=True):
        said = columns.answers(
            group["user"], schemas[key] if key is not None else None, group["cap"]
        )
        schema_n = fam.count(key) if key is not None else 0
        parts.append(group.select("i").hstack(said).with_columns(schema_n=pl.lit(schema_n)))
    done = (
        pl.concat(parts)
        .sort("i")
        .join(prompt, on="i", how="left", maintain_order="left")
        .with_columns(inp=pl.col("inp").fill_null(0) + pl.col("schema_n"))
    )
    inp, n_out = done["inp"], done["output_tokens"]
    resp = gemini_columns.response_json(model_name, done, faults.cache_read)
    for i, r, a, z in zip(
        done["i"].to_list(), resp.to_list(), inp.to_list(), n_out.to_list(), strict=True
    ):
        out[i] = (r, a, z)
    return out


def _text(content: Any) -> str:
    parts = (content or {}).get("parts", []) if isinstance(content, dict) else []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def input_tokens(model_name: str, req: dict[str, Any]) -> int:
    """Prompt tokens by the model's emulated Gemini tokenizer (:mod:`.tokenizers`): every
    text of the request, the system instruction's too, and a response schema's JSON (the
    schema counts toward the input, as Gemini's structured-output docs say)."""
    fam = tokenizers.family("gemini", model_name)
    contents = _get(req, "contents") or [_get(req, "content")]
    texts = [_text(c) for c in contents] + [
        _text(_get(req, "systemInstruction", "system_instruction"))
    ]
    n = sum(fam.count(t) for t in texts if t)
    config = _get(req, "generationConfig", "generation_config") or {}
    schema = _get(config, "responseJsonSchema", "response_json_schema")
    if isinstance(schema, dict):
        n += fam.count(orjson.dumps(schema).decode())
    return n


def respond(
    model_name: str, req: dict[str, Any], faults: Faults | None = None
) -> tuple[dict[str, Any], int, int]:
    contents = _get(req, "contents") or []
    user = _text(next((c for c in reversed(contents) if c.get("role", "user") == "user"), {}))
    config = _get(req, "generationConfig", "generation_config") or {}
    schema = _get(config, "responseJsonSchema", "response_json_schema")
    cap = _get(config, "maxOutputTokens", "max_output_tokens")
    thinking = faults.reasoning if faults is not None else 0
    text, cut, out_tokens = model.answer(user, schema, cap, thinking)
    inp = input_tokens(model_name, req)
    usage: dict[str, Any] = {"promptTokenCount": inp, "totalTokenCount": inp + out_tokens}
    cached = int(inp * faults.cache_read) if faults is not None else 0
    if cached:  # part of promptTokenCount, as the real API reports it
        usage["cachedContentTokenCount"] = cached
    thought = min(thinking, out_tokens)
    if out_tokens - thought:
        usage["candidatesTokenCount"] = out_tokens - thought
    if thought:  # billed as output, reported apart
        usage["thoughtsTokenCount"] = thought
    resp = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "MAX_TOKENS" if cut else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": model_name,
        "responseId": hashlib.md5(text.encode()).hexdigest()[:22],
    }
    return resp, inp, out_tokens


def embed(model_name: str, req: dict[str, Any]) -> tuple[dict[str, Any], int]:
    text = _text(_get(req, "content"))
    dims = model.embedding_dims(
        model_name, _get(req, "outputDimensionality", "output_dimensionality")
    )
    tokens = tokenizers.family("gemini", model_name).count(text)
    return {"embedding": {"values": model.embedding(text, dims)}}, tokens
