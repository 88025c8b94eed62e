"""Faults the emulator injects, chosen per server and deterministic for a seed.

Per-request faults pick their victims by a stable hash of (seed, fault, custom_id), so the same
seed hits the same requests in every run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from polars_llmbatch.emulator.model import stable_int

__all__ = ["Faults"]


@dataclass(frozen=True)
class Faults:
    """What goes wrong. Every field defaults to "nothing".

    - ``rate_limit_creates``: the first N batch-create calls get 429 (with ``Retry-After`` at
      OpenAI and Anthropic; Gemini's quota errors carry none).
    - ``rate_limit_sync``: the first N sync calls (chat, messages, generate, embed) get 429,
      as ``rate_limit_creates`` does for batch creates.
    - ``rate_limit_counts``: the first N calls of the token-count endpoints (Anthropic
      ``count_tokens``, Gemini ``countTokens``) get 429, as ``rate_limit_creates`` does.
    - ``flex_unavailable``: the first N flex calls (OpenAI ``service_tier: "flex"``, Gemini
      ``service_tier: "FLEX"``) get 429 "resource unavailable", unbilled, as flex does when
      capacity is short.
    - ``reasoning``: every answer thinks this many tokens first, reported as OpenAI
      ``reasoning_tokens`` (inside ``completion_tokens``), Gemini ``thoughtsTokenCount``, Anthropic
      output tokens; billed as output, and inside the output cap. Not a fault, a billing case.
    - ``read_errors``: the first N reads of a batch's state or results get a server error
      (OpenAI 500/503, Anthropic 529 overloaded or 500, Gemini 503).
    - ``request_errors``: the share of requests that fail individually (4xx in the error file,
      ``errored`` results; a 400 for a sync call, picked by its body).
    - ``expire_at``: the batch expires once this share of its requests has run; the rest are
      ``batch_expired`` / ``expired`` (Gemini: no results at all).
    - ``queue_limit_tokens``: a batch whose own input tokens exceed it fails as over the
      enqueued-token limit (OpenAI ``token_limit_exceeded``; Anthropic and Gemini 429 on create).
      It is per batch: other queued batches do not count against it.
    - ``org_queue_tokens``: the organisation's enqueued-token limit per model, shared by the
      batches still validating, running or finalizing: one whose input tokens would take the
      model's total over it is refused as ``queue_limit_tokens`` refuses (OpenAI fails it at
      validation; Anthropic and Gemini 429 on create). A refused batch holds nothing.
    - ``missing``: the share of requests silently absent from the output.
    - ``duplicates``: the share of output lines written twice.
    - ``malformed``: the share of output lines written as broken JSON.
    - ``slow``: a factor on every batch's processing time.
    - ``drop_downloads``: the first N result downloads are cut mid-stream.
    - ``no_inline_keys``: Gemini inline responses come back without their ``metadata`` (our
      key), as the real API has been seen to do (python-genai #2008): only their order tells.
    - ``cache_read`` / ``cache_write``: the share of each request's input tokens reported as
      read from (written to) the provider's prompt cache: OpenAI ``cached_tokens`` (reads
      only) and Anthropic ``cache_read_input_tokens`` / ``cache_creation_input_tokens``, Gemini
      ``cachedContentTokenCount`` (reads only); rounded down. Not a fault, a billing case.
    - ``fault_batches``: the per-request faults and ``expire_at`` hit only the first N batches
      created (0: every batch), so a client's retries of what failed can succeed.

    Example:
        >>> f = Faults.parse("request_errors=0.1,expire_at=0.5,seed=3")
        >>> f.seed, f.request_errors, f.expire_at
        (3, 0.1, 0.5)
    """

    seed: int = 0
    rate_limit_creates: int = 0
    rate_limit_sync: int = 0
    rate_limit_counts: int = 0
    flex_unavailable: int = 0
    reasoning: int = 0
    read_errors: int = 0
    request_errors: float = 0.0
    expire_at: float | None = None
    queue_limit_tokens: int | None = None
    org_queue_tokens: int | None = None
    missing: float = 0.0
    duplicates: float = 0.0
    malformed: float = 0.0
    slow: float = 1.0
    drop_downloads: int = 0
    no_inline_keys: int = 0
    cache_read: float = 0.0
    cache_write: float = 0.0
    fault_batches: int = 0

    def hits(self, fault: str, share: float, custom_id: str) -> bool:
        """Whether the per-request ``fault`` hits request ``custom_id``."""
        if share <= 0:
            return False
        return stable_int(str(self.seed), fault, custom_id) % 1_000_000 < share * 1_000_000

    @classmethod
    def parse(cls, text: str | None) -> Faults:
        """``"request_errors=0.1,expire_at=0.5,seed=3"`` (the CLI's ``--faults``)."""
        if not text:
            return cls()
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in text.split(","):
            name, _, raw = part.partition("=")
            name = name.strip()
            if name not in types:
                raise ValueError(f"unknown fault {name!r}; the faults are {sorted(types)}")
            kind = str(types[name])
            values[name] = float(raw) if "float" in kind else int(raw)
        return cls(**values)
