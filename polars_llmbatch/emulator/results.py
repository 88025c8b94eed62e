"""What happens to each request of a finished batch: ran (ok or errored) or never ran.

Shared by the three providers; each formats the outcomes in its own wire format, and the
line faults are applied by :func:`columns.finish_lines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from polars_llmbatch.emulator.faults import Faults

__all__ = ["Outcome", "outcomes"]

Kind = Literal["ok", "error", "unprocessed"]


@dataclass(frozen=True)
class Outcome:
    index: int
    custom_id: str
    kind: Kind


def outcomes(custom_ids: Sequence[str], processed: float, faults: Faults) -> list[Outcome]:
    """Requests in input order: the first ``processed`` share ran (ok, or error where the
    ``request_errors`` fault hits), the rest did not (expired or cancelled)."""
    done = int(len(custom_ids) * processed + 1e-9)
    result = []
    for i, cid in enumerate(custom_ids):
        if i >= done:
            kind: Kind = "unprocessed"
        elif faults.hits("request_errors", faults.request_errors, cid):
            kind = "error"
        else:
            kind = "ok"
        result.append(Outcome(i, cid, kind))
    return result
