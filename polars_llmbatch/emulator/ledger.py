"""The emulator's ledger: what was uploaded, created and billed, per provider and custom_id.

Tests read it to prove that nothing was submitted or billed twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ledger"]


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
    batches: list[dict[str, Any]] = field(default_factory=list)
    billed: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def upload(self, provider: str, file_id: str, size: int) -> None:
        with self._lock:
            self.uploads.append({"provider": provider, "file_id": file_id, "bytes": size})

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
    ) -> None:
        with self._lock:
            self.billed.append(
                {
                    "provider": provider,
                    "batch_id": batch_id,  # None for a sync call
                    "custom_id": custom_id,
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                }
            )

    def billed_twice(self, provider: str | None = None) -> dict[str, int]:
        """custom_ids billed more than once in batches (per provider when given)."""
        with self._lock:
            counts = Counter(
                (b["provider"], b["custom_id"])
                for b in self.billed
                if b["batch_id"] is not None and provider in (None, b["provider"])
            )
        return {cid: n for (_, cid), n in counts.items() if n > 1}

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "uploads": list(self.uploads),
                "batches": list(self.batches),
                "billed": list(self.billed),
            }
