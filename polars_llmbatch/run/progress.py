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

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} req [{elapsed}{postfix}]"


def _phase(phases: Counter[str]) -> str:
    """The job's phase in a word, from its shards' states (the least advanced one wins)."""
    for state, word in (
        ("planned", "sending"),
        ("submitted", "submitted"),
        ("queued", "queued at the provider"),
        ("running", "running at the provider"),
        ("finalizing", "finalizing at the provider"),
        ("ended", "collecting results"),
    ):
        if phases.get(state):
            return word
    return "done"


class Progress:
    def __init__(self, ckpt: Checkpoint, *, enabled: bool = True) -> None:
        self.ckpt = ckpt
        self.enabled = enabled
        self._bar: Any = None

    def update(self, shards: dict[int, ShardRecord], states: dict[int, RemoteState]) -> None:
        """Requests whose results are in (collected shards), plus the provider's progress on
        live ones, held one short of each live shard's size: the bar never reads 100% while a
        batch is still finalizing or its results are still to be downloaded. The description
        says which phase the job is in."""
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
                finished += min(st.done + st.failed, max(s.requests - 1, 0))
            phases[
                (st.phase if st else s.phase) or ("submitted" if s.submitted else "planned")
            ] += 1
        if self._bar is None:
            from tqdm.auto import tqdm

            # No rate: a resumed job starts with thousands of requests already done, which
            # tqdm would show as millions per second.
            self._bar = tqdm(
                total=total, unit="req", desc="llmbatch", dynamic_ncols=True, bar_format=_FORMAT
            )
        self._bar.total = total
        self._bar.n = finished
        self._bar.set_description_str(f"llmbatch: {_phase(phases)}", refresh=False)
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
