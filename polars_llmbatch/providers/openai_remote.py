"""OpenAI Batch API calls: submit a shard (tagged), find it again by its tag, poll, download the
result files, cancel. Everything goes through :class:`~polars_llmbatch.run.transport.Transport`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polars_llmbatch.providers.base import RemoteState

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["TAG_KEY", "cancel", "download", "find", "poll", "submit"]

#: The metadata key that carries a shard's tag (job id + shard index), for crash recovery.
TAG_KEY = "llmbatch_tag"
#: What requests of an ended batch with no result line became, by the batch's status.
_UNANSWERED = {"expired": "expired", "cancelled": "canceled", "cancelling": "canceled"}
_PHASES = {
    "validating": "queued",
    "in_progress": "running",
    "finalizing": "finalizing",
    "cancelling": "finalizing",
    "completed": "ended",
    "failed": "ended",
    "expired": "ended",
    "cancelled": "ended",
}


def submit(t: Transport, data: bytes, *, endpoint: str, tag: str, filename: str) -> str:
    """Upload ``data`` (a shard file) and create its batch, tagged; the batch id.

    The caller records an intent before and the returned id after: a crash in between is found
    again by :func:`find` with the same tag, never submitted twice.
    """
    f = t.request(
        "POST",
        "/files",
        files={"file": (filename, data, "application/jsonl")},
        data={"purpose": "batch"},
    ).json()
    body = {
        "input_file_id": f["id"],
        "endpoint": endpoint,
        "completion_window": "24h",
        "metadata": {TAG_KEY: tag},
    }
    return str(t.request("POST", "/batches", json=body, idempotent=False).json()["id"])


def find(
    t: Transport,
    tag: str,
    *,
    since: float | None = None,
    max_pages: int = 1_000,
    page_size: int = 100,
) -> str | None:
    """The newest batch created with ``tag``, or ``None``. Pages through the batches newest
    first, down to those created before ``since`` (a Unix time: the intent's, so the search
    covers every batch the crashed create could have made however busy the account is), or
    ``max_pages`` × ``page_size`` batches (100: the API's largest page)."""
    after: str | None = None
    for _ in range(max_pages):
        params: dict[str, Any] = {"limit": page_size}
        if after:
            params["after"] = after
        page = t.request("GET", "/batches", params=params).json()
        for b in page.get("data", []):
            if (b.get("metadata") or {}).get(TAG_KEY) == tag:
                return str(b["id"])
            if since is not None and int(b.get("created_at") or 0) < since:
                return None  # newest first: everything further is older still
        if not page.get("has_more") or not page.get("last_id"):
            return None
        after = page["last_id"]
    return None


def poll(t: Transport, remote_id: str) -> RemoteState:
    b = t.request("GET", f"/batches/{remote_id}").json()
    return state(b)


def state(b: dict[str, Any]) -> RemoteState:
    """A Batch object as a :class:`RemoteState`."""
    counts = b.get("request_counts") or {}
    files = tuple(f for f in (b.get("output_file_id"), b.get("error_file_id")) if f)
    errors = ((b.get("errors") or {}).get("data")) or []
    error = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or None
    return RemoteState(
        remote_id=str(b["id"]),
        phase=_PHASES.get(b.get("status", ""), "running"),
        status=str(b.get("status")),
        total=int(counts.get("total") or 0),
        done=int(counts.get("completed") or 0),
        failed=int(counts.get("failed") or 0),
        result_files=files,
        error=error,
        unanswered=_UNANSWERED.get(str(b.get("status")), "errored"),
    )


def download(t: Transport, file_id: str) -> bytes:
    """A result file's bytes (a cut download is retried by the transport)."""
    return t.request("GET", f"/files/{file_id}/content").content


def cancel(t: Transport, remote_id: str) -> RemoteState:
    return state(t.request("POST", f"/batches/{remote_id}/cancel").json())
