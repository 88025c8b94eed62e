"""What every provider's batch emulation keeps: its batches, newest last, behind one lock."""

from __future__ import annotations

import threading
from typing import Any, Generic, TypeVar

__all__ = ["BatchStore"]

B = TypeVar("B")


class BatchStore(Generic[B]):
    """Batches by id, in creation order; ``sweep`` brings them all up to date."""

    def __init__(self) -> None:
        self.batches: dict[str, B] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()

    def add(self, batch_id: str, batch: B) -> None:
        with self.lock:
            self.batches[batch_id] = batch
            self.order.append(batch_id)

    def remove(self, batch_id: str) -> None:
        with self.lock:
            if self.batches.pop(batch_id, None) is not None:
                self.order.remove(batch_id)

    def newest_first(self) -> list[str]:
        with self.lock:
            return list(reversed(self.order))

    def current(self, batch: B, now: float) -> Any:
        """The batch as the provider shows it at ``now`` (finishing it when it is due)."""
        raise NotImplementedError

    def sweep(self, now: float) -> None:
        """Bring every batch up to date: finished ones produce their results and bills, as at
        the real services, whether or not anyone polls."""
        with self.lock:
            batches = list(self.batches.values())
        for batch in batches:
            self.current(batch, now)
