"""A progress bar over a running job: requests finished, and shards by state.

``tqdm.auto`` picks a notebook widget in Jupyter and a text bar in a terminal; ``progress=False``
turns it off. Details go to the ``polars_llmbatch`` logger, not the bar.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from polars_llmbatch.providers.base import RemoteState
from polars_llmbatch.run.checkpoint import Checkpoint, ShardRecord

__all__ = ["Progress"]


class Progress:
    def __init__(self, ckpt: Checkpoint, *, enabled: bool = True) -> None:
        self.ckpt = ckpt
        self.enabled = enabled
        self._bar: Any = None

    def update(self, shards: dict[int, ShardRecord], states: dict[int, RemoteState]) -> None:
        if not self.enabled or not shards:
            return
        total = sum(s.requests for s in shards.values())
        finished = 0
        phases: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        for s in shards.values():
            if s.done:
                finished += s.requests
                phases["done"] += 1
                statuses.update(s.counts)
                continue
            st = states.get(s.index)
            if st is not None:
                finished += min(st.done + st.failed, s.requests)
            phases[
                (st.phase if st else s.phase) or ("submitted" if s.submitted else "planned")
            ] += 1
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="req", desc="llmbatch", dynamic_ncols=True)
        self._bar.total = total
        self._bar.n = finished
        rows = ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items()))
        shards_by_state = ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
        self._bar.set_postfix_str(
            (f"{rows} | " if rows else "") + f"shards {shards_by_state}", refresh=False
        )
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
