"""What happens to each request of a finished batch, and the faults applied to result lines.

Shared by the three providers; each formats the outcomes in its own wire format.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from polars_llmbatch.emulator.faults import Faults

__all__ = ["Outcome", "finish_lines", "outcomes"]

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


def finish_lines(lines: Sequence[tuple[str, str]], faults: Faults, *, shuffle: bool) -> list[str]:
    """Apply the line faults to ``(custom_id, line)`` pairs and return the lines to write.

    ``missing`` drops a line, ``duplicates`` writes it twice, ``malformed`` cuts it in half so it
    is no longer JSON. With ``shuffle`` the order is a seeded permutation (OpenAI and Anthropic
    return results in any order).
    """
    out: list[str] = []
    for cid, line in lines:
        if faults.hits("missing", faults.missing, cid):
            continue
        if faults.hits("malformed", faults.malformed, cid):
            out.append(line[: len(line) // 2])
            continue
        out.append(line)
        if faults.hits("duplicates", faults.duplicates, cid):
            out.append(line)
    if shuffle:
        random.Random(faults.seed).shuffle(out)
    return out
