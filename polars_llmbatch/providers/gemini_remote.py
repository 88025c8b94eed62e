"""Gemini Batch Mode calls: submit a shard (inline or as an uploaded file, tagged by its
``displayName``), find it again by its tag, poll, fetch results, cancel. Over
:class:`~polars_llmbatch.run.transport.Transport`; paths are under ``/v1beta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from polars_llmbatch.providers.base import RemoteState

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = [
    "INLINE",
    "cancel",
    "count_tokens",
    "download",
    "find",
    "inline_results",
    "poll",
    "submit",
]

VERSION = "v1beta"
#: ``RemoteState.result_files`` entry for results that live in the batch itself (inline form).
INLINE = "inline"
#: What requests of an ended batch with no result became, by the batch's state.
_UNANSWERED = {"BATCH_STATE_EXPIRED": "expired", "BATCH_STATE_CANCELLED": "canceled"}
_PHASES = {
    "BATCH_STATE_PENDING": "queued",
    "BATCH_STATE_RUNNING": "running",
    "BATCH_STATE_SUCCEEDED": "ended",
    "BATCH_STATE_FAILED": "ended",
    "BATCH_STATE_CANCELLED": "ended",
    "BATCH_STATE_EXPIRED": "ended",
}


def count_tokens(t: Transport, model: str, body: dict[str, Any]) -> int:
    """The prompt tokens Gemini counts for a whole GenerateContentRequest ``body`` (system
    instruction and response schema included), free; ``totalTokens`` of ``countTokens``."""
    whole = {"model": f"models/{model}", **body}
    r = t.request(
        "POST", f"/{VERSION}/models/{model}:countTokens", json={"generateContentRequest": whole}
    )
    return int(r.json().get("totalTokens") or 0)


def submit(t: Transport, data: bytes, kind: str, *, model: str, embed: bool, tag: str) -> str:
    """Create the batch for a shard; its name (``batches/…``). An inline shard (``kind``
    ``"inline"``, :attr:`Framing.kind`) *is* the create body (its ``displayName`` is the tag);
    a file shard is uploaded first."""
    verb = "asyncBatchEmbedContent" if embed else "batchGenerateContent"
    path = f"/{VERSION}/models/{model}:{verb}"
    if kind == "inline":
        op = t.request(
            "POST",
            path,
            content=data,
            headers={"content-type": "application/json"},
            idempotent=False,
        )
        return str(op.json()["name"])
    start = t.request(
        "POST",
        f"/upload/{VERSION}/files",
        json={"file": {"display_name": tag, "mime_type": "application/jsonl"}},
        headers={
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(len(data)),
            "X-Goog-Upload-Header-Content-Type": "application/jsonl",
        },
    )
    url = start.headers["x-goog-upload-url"]
    done = t.request(
        "POST",
        url,
        content=data,
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
    )
    body = {"batch": {"displayName": tag, "inputConfig": {"fileName": done.json()["file"]["name"]}}}
    return str(t.request("POST", path, json=body, idempotent=False).json()["name"])


def find(t: Transport, tag: str, *, max_pages: int = 50) -> str | None:
    """The batch whose ``displayName`` is ``tag``, or ``None``."""
    token: str | None = None
    for _ in range(max_pages):
        params: dict[str, Any] = {"pageSize": 100}
        if token:
            params["pageToken"] = token
        page = t.request("GET", f"/{VERSION}/batches", params=params).json()
        for op in page.get("operations", []):
            if (op.get("metadata") or {}).get("displayName") == tag:
                return str(op["name"])
        token = page.get("nextPageToken")
        if not token:
            return None
    return None


def poll(t: Transport, name: str) -> RemoteState:
    return state(t.request("GET", f"/{VERSION}/{name}").json())


def state(op: dict[str, Any]) -> RemoteState:
    """An Operation as a :class:`RemoteState` (int64 counters arrive as strings, zeros omitted)."""
    meta = op.get("metadata") or {}
    stats = meta.get("batchStats") or {}
    output = meta.get("output") or op.get("response") or {}
    files: tuple[str, ...] = ()
    if output.get("responsesFile"):
        files = (str(output["responsesFile"]),)
    elif output.get("inlinedResponses"):
        files = (INLINE,)
    error = (op.get("error") or {}).get("message")
    status = str(meta.get("state", "BATCH_STATE_UNSPECIFIED"))
    if status == "BATCH_STATE_EXPIRED":
        error = error or "expired after 48 h pending or running: Gemini returns no results"
    return RemoteState(
        remote_id=str(op["name"]),
        phase=_PHASES.get(status, "running"),
        status=status,
        total=int(stats.get("requestCount", 0)),
        done=int(stats.get("successfulRequestCount", 0)),
        failed=int(stats.get("failedRequestCount", 0)),
        result_files=files,
        error=error,
        unanswered=_UNANSWERED.get(status, "errored"),
    )


def download(t: Transport, file_name: str) -> bytes:
    return t.request("GET", f"/{VERSION}/{file_name}:download", params={"alt": "media"}).content


def inline_results(t: Transport, name: str) -> list[dict[str, Any]]:
    """The inlined responses of a finished inline batch, as JSON objects."""
    op = orjson.loads(t.request("GET", f"/{VERSION}/{name}").content)
    output = (op.get("metadata") or {}).get("output") or op.get("response") or {}
    return list((output.get("inlinedResponses") or {}).get("inlinedResponses") or [])


def cancel(t: Transport, name: str) -> None:
    t.request("POST", f"/{VERSION}/{name}:cancel")
