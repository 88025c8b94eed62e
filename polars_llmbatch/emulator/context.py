"""What every provider emulation shares: faults, the ledger, the clock and the batch speed."""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.ledger import Ledger

__all__ = ["Context"]


@dataclass
class Context:
    faults: Faults = field(default_factory=Faults)
    ledger: Ledger = field(default_factory=Ledger)
    #: Seconds a batch takes from create to done (before the ``slow`` fault): ~1 s is "fast".
    batch_seconds: float = 1.0
    clock: Callable[[], float] = time.time
    base_url: str = ""
    _spent: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count = field(default_factory=itertools.count)

    def batch_faults(self) -> Faults:
        """The faults a batch created now gets: all of them, or past ``fault_batches`` only
        the server-wide ones (rate limits, read errors, cut downloads, slowness)."""
        limit = self.faults.fault_batches
        if not limit:
            return self.faults
        with self._lock:
            created = self._spent.get("_batches", 0)
            self._spent["_batches"] = created + 1
        if created < limit:
            return self.faults
        return dataclasses.replace(
            self.faults,
            request_errors=0.0,
            expire_at=None,
            missing=0.0,
            duplicates=0.0,
            malformed=0.0,
        )

    @property
    def duration(self) -> float:
        return self.batch_seconds * self.faults.slow

    def take(self, budget: str) -> bool:
        """Consume one unit of the fault budget ``budget`` (e.g. ``"rate_limit_creates"``);
        true while the fault still applies."""
        limit = getattr(self.faults, budget)
        with self._lock:
            used = self._spent.get(budget, 0)
            if used >= limit:
                return False
            self._spent[budget] = used + 1
            return True

    _salt: str = field(default_factory=lambda: secrets.token_hex(16))

    def new_id(self, prefix: str, length: int = 24) -> str:
        """A fresh id: ``prefix`` + ``length`` lowercase hex characters, random per emulator and
        then counted (a batch of 50,000 results needs 150,000 of them, fast)."""
        n = f"{next(self._ids):08x}"  # fixed width: ids of one length never collide
        return prefix + self._salt[: max(length - len(n), 0)] + n
