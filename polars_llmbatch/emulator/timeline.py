"""Batch progress as a pure function of the clock: no background threads.

A batch created at ``t0`` with a processing time ``T`` is validating for the first 10% of ``T``,
running until 80% (its requests completing evenly), finalizing until 100%, then done. A cancel
at ``c`` freezes the progress at ``c`` and ends ``0.1 T`` later.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Phase", "Timeline"]

VALIDATING_END = 0.1
RUNNING_END = 0.8
CANCEL_TIME = 0.1


@dataclass(frozen=True)
class Phase:
    name: str  # "validating", "running", "finalizing", "done", "cancelling", "cancelled"
    progress: float  # share of requests processed, 0..1
    since: float  # when this phase began (clock seconds)


@dataclass
class Timeline:
    t0: float
    duration: float
    cancelled_at: float | None = None

    def at(self, now: float) -> Phase:
        T = max(self.duration, 1e-6)
        if self.cancelled_at is not None:
            frozen = self.progress(self.cancelled_at)
            end = self.cancelled_at + CANCEL_TIME * T
            if now < end:
                return Phase("cancelling", frozen, self.cancelled_at)
            return Phase("cancelled", frozen, end)
        e = now - self.t0
        if e < VALIDATING_END * T:
            return Phase("validating", 0.0, self.t0)
        if e < RUNNING_END * T:
            return Phase("running", self.progress(now), self.t0 + VALIDATING_END * T)
        if e < T:
            return Phase("finalizing", 1.0, self.t0 + RUNNING_END * T)
        return Phase("done", 1.0, self.t0 + T)

    def progress(self, now: float) -> float:
        T = max(self.duration, 1e-6)
        run = (now - self.t0 - VALIDATING_END * T) / ((RUNNING_END - VALIDATING_END) * T)
        return min(max(run, 0.0), 1.0)

    def when(self, progress: float) -> float:
        """The clock time at which ``progress`` of the requests had run."""
        T = max(self.duration, 1e-6)
        return self.t0 + VALIDATING_END * T + progress * (RUNNING_END - VALIDATING_END) * T
