"""The emulator's ledger: what was uploaded, created and billed, per provider and custom_id.

Tests read it to prove that nothing was submitted or billed twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl

__all__ = ["Ledger"]

_BILL = {
    "provider": pl.String,
    "batch_id": pl.String,
    "custom_id": pl.String,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "model": pl.String,
    "tier": pl.String,
    "at": pl.Float64,
    "cache_read": pl.Int64,
    "cache_write": pl.Int64,
    "kind": pl.String,
}


@dataclass
class Ledger:
    """Every upload, batch and billed request, per provider.

    Example:
        >>> ledger = Ledger()
        >>> ledger.bill("openai", "batch_1", "r1", 10, 2)
        >>> ledger.bill("openai", "batch_2", "r1", 10, 2)  # the same request, paid again
        >>> ledger.billed_twice()
        {'r1': 2}
    """

    uploads: list[dict[str, Any]] = field(default_factory=list)
    #: Calls of the free token-count endpoints, per provider (counted, never billed).
    counts: Counter[str] = field(default_factory=Counter)
    batches: list[dict[str, Any]] = field(default_factory=list)
    # Bills in order: one dict per sync call, one frame per finished batch (a million-request
    # dry run keeps columns, not a million dicts).
    _bills: list[dict[str, Any] | pl.DataFrame] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def upload(self, provider: str, file_id: str, size: int) -> None:
        with self._lock:
            self.uploads.append({"provider": provider, "file_id": file_id, "bytes": size})

    def counted(self, provider: str) -> None:
        with self._lock:
            self.counts[provider] += 1

    def batch(self, provider: str, batch_id: str, requests: int, tag: str | None) -> None:
        with self._lock:
            self.batches.append(
                {"provider": provider, "batch_id": batch_id, "requests": requests, "tag": tag}
            )

    def bill(
        self,
        provider: str,
        batch_id: str | None,
        custom_id: str,
        input_tokens: int,
        output_tokens: int,
        *,
        model: str = "",
        tier: str | None = None,
        at: float | None = None,
        cache_read: int = 0,
        cache_write: int = 0,
        kind: str = "completion",
    ) -> None:
        """One billed request: its whole input (cache reads and writes included), output,
        the model, the tier it ran in (``batch``, ``sync`` or ``flex``; default by
        ``batch_id``), when (the emulator's clock) and its kind (``completion`` or
        ``embedding``): what the organisation usage and cost reports are made of."""
        with self._lock:
            self._bills.append(
                {
                    "provider": provider,
                    "batch_id": batch_id,  # None for a sync call
                    "custom_id": custom_id,
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "model": model,
                    "tier": tier or ("batch" if batch_id is not None else "sync"),
                    "at": time.time() if at is None else at,
                    "cache_read": cache_read,
                    "cache_write": cache_write,
                    "kind": kind,
                }
            )

    def bill_many(
        self,
        provider: str,
        batch_id: str,
        custom_ids: pl.Series,
        input_tokens: pl.Series,
        output_tokens: pl.Series,
        *,
        model: str | pl.Series = "",
        at: float | None = None,
        cache_read: pl.Series | None = None,
        cache_write: pl.Series | None = None,
        kind: str = "completion",
    ) -> None:
        """Bill every request of a finished batch at once (columns of one length)."""
        n = len(custom_ids)
        zeros = pl.Series([0] * n, dtype=pl.Int64)
        frame = pl.DataFrame(
            {
                "custom_id": custom_ids.cast(pl.String),
                "input_tokens": input_tokens.cast(pl.Int64),
                "output_tokens": output_tokens.cast(pl.Int64),
                "model": model.cast(pl.String)
                if isinstance(model, pl.Series)
                else pl.Series([model] * n, dtype=pl.String),
                "cache_read": (cache_read if cache_read is not None else zeros).cast(pl.Int64),
                "cache_write": (cache_write if cache_write is not None else zeros).cast(pl.Int64),
            }
        ).select(
            pl.lit(provider).alias("provider"),
            pl.lit(batch_id).alias("batch_id"),
            "custom_id",
            "input_tokens",
            "output_tokens",
            "model",
            pl.lit("batch").alias("tier"),
            pl.lit(time.time() if at is None else at, pl.Float64).alias("at"),
            "cache_read",
            "cache_write",
            pl.lit(kind).alias("kind"),
        )
        with self._lock:
            self._bills.append(frame)

    def frame(self, provider: str | None = None) -> pl.DataFrame:
        """Every bill as one frame (of ``provider``, when given)."""
        with self._lock:
            bills = list(self._bills)
        rows = [b for b in bills if isinstance(b, dict)]
        parts = [b for b in bills if not isinstance(b, dict)]
        if rows:
            parts.append(pl.DataFrame(rows, schema=_BILL, orient="row"))
        out = pl.concat(parts) if parts else pl.DataFrame(schema=_BILL)
        return out.filter(pl.col("provider") == provider) if provider else out

    @property
    def billed(self) -> list[dict[str, Any]]:
        """Every billed request in order, as dicts (built on demand: tests read it)."""
        with self._lock:
            bills = list(self._bills)
        out: list[dict[str, Any]] = []
        for b in bills:
            if isinstance(b, dict):
                out.append(b)
            else:
                out.extend(b.to_dicts())
        return out

    def billed_twice(self, provider: str | None = None) -> dict[str, int]:
        """custom_ids billed more than once in batches (per provider when given)."""
        counts = Counter(
            (b["provider"], b["custom_id"])
            for b in self.billed
            if b["batch_id"] is not None and provider in (None, b["provider"])
        )
        return {cid: n for (_, cid), n in counts.items() if n > 1}

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            uploads, batches = list(self.uploads), list(self.batches)
        return {"uploads": uploads, "batches": batches, "billed": self.billed}
