"""What every provider emulation shares: faults, the ledger, the clock and the batch speed."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.ledger import Ledger
from polars_llmbatch.emulator.timeline import Timeline

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
    _queued: list[tuple[str, int, Timeline]] = field(default_factory=list)

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

    def enqueue(self, model: str | None, tokens: int, timeline: Timeline) -> bool:
        """Whether the ``org_queue_tokens`` limit takes a batch of ``tokens`` input tokens for
        ``model`` now (it then holds them until it ends); always, without that fault."""
        limit = self.faults.org_queue_tokens
        if limit is None:
            return True
        now = self.clock()
        with self._lock:
            self._queued = [
                q for q in self._queued if q[2].at(now).name not in ("done", "cancelled")
            ]
            held = sum(t for m, t, _ in self._queued if m == model)
            if held + tokens > limit:
                return False
            self._queued.append((model or "", tokens, timeline))
            return True

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

    def sync_fails(self, body: bytes) -> bool:
        """Whether the ``request_errors`` fault fails this sync call (by a stable hash of its
        body: the same request fails every time, as a malformed one would)."""
        share = self.faults.request_errors
        return share > 0 and self.faults.hits(
            "request_errors", share, hashlib.md5(body).hexdigest()
        )

    _salt: str = field(default_factory=lambda: secrets.token_hex(16))

    def new_id(self, prefix: str, length: int = 24) -> str:
        """A fresh id: ``prefix`` + ``length`` lowercase hex characters, random per emulator and
        then counted (a batch of 50,000 results needs 150,000 of them, fast)."""
        with self._lock:  # new_ids swaps the counter
            n = f"{next(self._ids):08x}"  # fixed width: ids of one length never collide
        return prefix + self._salt[: max(length - len(n), 0)] + n

    def new_ids(self, prefix: str, n: int, length: int = 24) -> pl.Series:
        """``n`` fresh ids at once, as :meth:`new_id` makes them (a column for a whole batch)."""
        with self._lock:
            start = next(self._ids)
            # the counter moves past the block; itertools.count cannot jump, so rebuild it
            self._ids = itertools.count(start + n)
        counters = pl.int_range(start, start + n, eager=True, dtype=pl.UInt64)
        hexes = _hex8(counters)
        return prefix + self._salt[: max(length - 8, 0)] + hexes


_HEX = pl.Series([f"{i:02x}" for i in range(256)], dtype=pl.String)


def _hex8(counters: pl.Series) -> pl.Series:
    """Counters as 8 lowercase hex digits (what ``f"{n:08x}"`` prints below 2**32), byte by byte."""
    parts = [_HEX.gather(counters // 256**k % 256) for k in (3, 2, 1, 0)]
    return parts[0] + parts[1] + parts[2] + parts[3]
