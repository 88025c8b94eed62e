"""Anthropic Message Batches calls: submit a shard (its bytes are the create body), poll,
download results, cancel, and list the candidates a crashed submit may have created.

The batch object has no metadata or name field, so a shard cannot be found by a tag: the
engine narrows the candidates (created after its intent, with the shard's request count) and
confirms one by its custom_ids once its results exist; while that is ambiguous it waits rather
than resubmits (design.md, crash safety).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from polars_llmbatch.providers.base import RemoteState

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["cancel", "candidates", "count_tokens", "download", "poll", "submit"]


def submit(t: Transport, data: bytes) -> str:
    """Create the batch; its id (``msgbatch_…``)."""
    r = t.request(
        "POST",
        "/v1/messages/batches",
        content=data,
        headers={"content-type": "application/json"},
        idempotent=False,
    )
    return str(r.json()["id"])


#: What ``POST /v1/messages/count_tokens`` takes (the SDK's MessageCountTokensParams): a
#: Messages body without ``max_tokens`` and the sampling options, which it refuses.
COUNT_PARAMS = frozenset(
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


def count_tokens(t: Transport, body: dict[str, Any]) -> int:
    """The input tokens Anthropic counts for a Messages ``body`` (free, rate-limited on its
    own; a 429 is retried after its ``retry-after``)."""
    params = {k: v for k, v in body.items() if k in COUNT_PARAMS}
    r = t.request("POST", "/v1/messages/count_tokens", json=params)
    return int(r.json()["input_tokens"])


def poll(t: Transport, batch_id: str) -> RemoteState:
    return state(t.request("GET", f"/v1/messages/batches/{batch_id}").json())


def state(b: dict[str, Any]) -> RemoteState:
    """A MessageBatch as a :class:`RemoteState` (counts are final only once it has ended)."""
    c = b.get("request_counts") or {}
    total = sum(int(v or 0) for v in c.values())
    ended = b.get("processing_status") == "ended"
    return RemoteState(
        remote_id=str(b["id"]),
        phase="ended"
        if ended
        else ("finalizing" if b.get("processing_status") == "canceling" else "running"),
        status=str(b.get("processing_status")),
        total=total,
        done=int(c.get("succeeded") or 0),
        failed=int(c.get("errored") or 0)
        + int(c.get("expired") or 0)
        + int(c.get("canceled") or 0),
        result_files=(str(b["results_url"]),) if ended and b.get("results_url") else (),
    )


def download(t: Transport, results_url: str) -> bytes:
    """The results JSONL, from the absolute ``results_url`` the batch names."""
    return t.request("GET", results_url).content


def cancel(t: Transport, batch_id: str) -> RemoteState:
    return state(t.request("POST", f"/v1/messages/batches/{batch_id}/cancel").json())


def candidates(
    t: Transport, *, created_after: dt.datetime, requests: int, max_pages: int = 20
) -> list[str]:
    """Batches created at or after ``created_after`` holding ``requests`` requests, newest
    first: what a submit that crashed before recording its id may have created."""
    found: list[str] = []
    after: str | None = None
    for _ in range(max_pages):
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after_id"] = after
        page = t.request("GET", "/v1/messages/batches", params=params).json()
        for b in page.get("data", []):
            created = dt.datetime.fromisoformat(str(b["created_at"]).replace("Z", "+00:00"))
            if created < created_after:
                return found  # newest first: the rest is older still
            if sum(int(v or 0) for v in (b.get("request_counts") or {}).values()) == requests:
                found.append(str(b["id"]))
        if not page.get("has_more"):
            return found
        after = page.get("last_id")
    return found
