"""Unique requests → shards within a provider's limits, and the exact bytes each shard uploads."""

from __future__ import annotations

import contextlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import polars as pl

from polars_llmbatch import _json
from polars_llmbatch._fs import fsync
from polars_llmbatch.errors import LlmBatchError, RequestTooLargeError
from polars_llmbatch.plan.requests import Prepared
from polars_llmbatch.providers import Framing, Provider

__all__ = ["Shard", "plan", "shard_bytes", "write_shard_files", "write_shards"]


@dataclass(frozen=True)
class Shard:
    """Requests ``start:stop`` of :attr:`Prepared.requests`, framed as one provider batch."""

    index: int
    start: int
    stop: int
    bytes: int
    tokens: int | None
    framing: Framing
    tag: str

    @property
    def n_requests(self) -> int:
        return self.stop - self.start

    @property
    def filename(self) -> str:
        ext = "jsonl" if self.framing.media_type == "application/jsonl" else "json"
        return f"{self.index:05d}.{ext}"


def plan(
    prepared: Prepared,
    *,
    max_requests: int | None = None,
    max_bytes: int | None = None,
    max_tokens: int | None = None,
    tokens: pl.Series | None = None,
    first_index: int = 0,
    job_id: str | None = None,
) -> list[Shard]:
    """Split the unique requests into shards, in ``custom_id`` order.

    The provider's limits always apply; ``max_requests`` / ``max_bytes`` may lower them, and
    ``max_tokens`` (with per-request ``tokens``) caps input tokens per shard for queue limits.
    Shards are numbered from ``first_index`` and tagged with ``job_id`` (default: the
    prepared requests' own), so a job's retry shards continue its numbering.
    A request that can never fit raises :class:`RequestTooLargeError` naming its row.
    """
    limits = prepared.provider.limits
    spec = prepared.spec
    cap_requests = _lower(max_requests, limits.max_requests, "max_shard_requests")
    if spec.task == "embed" and limits.max_embedding_inputs is not None:
        cap_requests = min(cap_requests, limits.max_embedding_inputs)  # one input per request
    cap_bytes = _lower(max_bytes, limits.max_bytes, "max_shard_bytes")
    reqs = prepared.requests
    n = reqs.height
    if n == 0:
        return []
    job_id = job_id or prepared.job_id
    big = prepared.provider.framing(spec, _tag(job_id, first_index), 0, 0)
    budget = cap_bytes - big.size(0, 0)  # bytes left for lines once prefix and suffix are in
    payload = reqs.select(
        (pl.col("custom_id").str.len_bytes() + pl.col("body").str.len_bytes()).cast(pl.Int64)
    ).to_series()
    line = payload + big.line_bytes
    too_big = line.arg_max()
    if too_big is not None and line[too_big] > budget:
        row = int(reqs["row"][too_big])
        raise RequestTooLargeError(
            f"{prepared.describe_row(row)} renders to a {line[too_big]:,}-byte request, over "
            f"{spec.provider}'s {cap_bytes:,}-byte batch limit; shorten that row's text"
        )
    cum_bytes = line.cum_sum()
    cum_tokens = None
    if max_tokens is not None:
        if tokens is None or len(tokens) != n:
            raise ValueError("max_tokens needs per-request token counts")
        worst = tokens.arg_max()
        if worst is not None and tokens[worst] > max_tokens:
            row = int(reqs["row"][worst])
            raise RequestTooLargeError(
                f"{prepared.describe_row(row)} has ~{tokens[worst]:,} input tokens, over "
                f"max_shard_tokens={max_tokens:,}; raise the cap or shorten that row"
            )
        cum_tokens = tokens.cast(pl.Int64).cum_sum()
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < n:
        stop = min(start + cap_requests, n)
        base = cum_bytes[start - 1] if start else 0
        stop = min(stop, int(cum_bytes.search_sorted(base + budget, side="right")))
        if cum_tokens is not None:
            tbase = cum_tokens[start - 1] if start else 0
            stop = min(stop, int(cum_tokens.search_sorted(tbase + max_tokens, side="right")))
        bounds.append((start, stop))
        start = stop
    shards = []
    for i, (a, b) in enumerate(bounds, start=first_index):
        size = int(payload.slice(a, b - a).sum())
        tag = _tag(job_id, i)
        framing = prepared.provider.framing(spec, tag, b - a, size)
        if framing.size(b - a, size) > cap_bytes:  # a form chosen by size must still fit the cap
            framing = big
        tok = (
            int(cum_tokens[b - 1] - (cum_tokens[a - 1] if a else 0))
            if cum_tokens is not None
            else None
        )
        shards.append(Shard(i, a, b, framing.size(b - a, size), tok, framing, tag))
    return shards


def check_caps(
    provider: Provider,
    max_requests: int | None = None,
    max_bytes: int | None = None,
    max_tokens: int | None = None,
) -> None:
    """Refuse shard caps that are not positive integers or that exceed the provider's limits,
    before any data is read."""
    _lower(max_requests, provider.limits.max_requests, "max_shard_requests")
    _lower(max_bytes, provider.limits.max_bytes, "max_shard_bytes")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise LlmBatchError(f"max_shard_tokens must be a positive integer, got {max_tokens!r}")


def _lower(asked: int | None, limit: int, name: str) -> int:
    if asked is None:
        return limit
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
        raise LlmBatchError(f"{name} must be a positive integer, got {asked!r}")
    if asked > limit:
        raise LlmBatchError(f"{name}={asked:,} is over the provider's limit of {limit:,}")
    return asked


def _tag(job_id: str, index: int) -> str:
    # The batch's tag (OpenAI metadata, Gemini displayName) names the job and shard, so that a
    # crash between "create" and "record" can be recovered by listing remote batches.
    return f"llmbatch-{job_id}-{index:05d}"


def _write(prepared: Prepared, shard: Shard, target: Path | BinaryIO) -> None:
    """Write ``shard``'s exact bytes to ``target`` without the texts passing through Python.

    Each line is ``head + body + tail`` where the body slot comes last in the line skeleton.
    Polars writes it as two-column CSV that is never quoted: the head (with the key) and the
    body, separated by the skeleton's character just before the body (``:``), each line ended
    by the skeleton's tail plus the shard separator. The bodies are written from where they lie,
    never copied into lines. The prefix rides on the first head; the last separator is then
    swapped for the suffix.
    """
    f = shard.framing
    text = _json.dumps(f.line)
    key_token, body_token = _json.dumps(_json.slot("key")), _json.dumps(_json.slot("body"))
    before, tail = text.split(body_token)
    head_a, head_b = before[:-1].split(key_token)
    separator = before[-1]
    if key_token in tail or len(separator.encode()) != 1:  # pragma: no cover - provider bug
        raise AssertionError(f"framing {f.line!r}: the body must come last, after one ASCII byte")
    i = pl.int_range(pl.len())
    head = pl.concat_str(
        pl.when(i == 0).then(pl.lit(f.prefix + head_a)).otherwise(pl.lit(head_a)),
        pl.lit('"'),
        pl.col("custom_id"),
        pl.lit('"' + head_b),
    )
    part = prepared.requests.slice(shard.start, shard.n_requests)
    part.select(head.alias("head"), "body").write_csv(
        target,
        include_header=False,
        quote_style="never",
        separator=separator,
        line_terminator=tail + f.sep,
    )
    if f.sep != f.suffix:
        sep, suffix = f.sep.encode(), f.suffix.encode()
        with contextlib.ExitStack() as stack:
            out = (
                target if not isinstance(target, Path) else stack.enter_context(open(target, "r+b"))
            )
            out.seek(-len(sep), os.SEEK_END)
            out.write(suffix)
            out.truncate()


def shard_bytes(prepared: Prepared, shard: Shard) -> bytes:
    """The exact bytes uploaded (or POSTed) for ``shard``."""
    buf = io.BytesIO()
    _write(prepared, shard, buf)
    return buf.getvalue()


def write_shards(prepared: Prepared, shards: list[Shard], directory: str | Path) -> list[Path]:
    """Write each shard's exact bytes to ``directory/NNNNN.jsonl`` (or ``.json``), atomically
    (temp file, fsync, rename), two at a time: polars writes outside the GIL, and two writers
    fill fresh pages about twice as fast as one (benchmarks/README.md)."""
    out = Path(directory)
    check_target(out)
    return write_shard_files(prepared, shards, out)


def write_shard_files(prepared: Prepared, shards: list[Shard], out: Path) -> list[Path]:
    """:func:`write_shards` into a job's own folder, where earlier rounds' shards stay."""
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        paths = list(pool.map(lambda shard: _write_one(prepared, shard, out), shards))
    fsync(out)  # the renames themselves
    return paths


#: Shard files written at once.
WRITERS = 2
_SHARD_FILE = re.compile(r"^\d{5}\.jsonl?$")


def check_target(directory: str | Path) -> None:
    """Refuse a folder that already holds shard files: mixed with a new job's, a stale shard
    would be uploaded (and paid for) by whoever submits the folder."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise LlmBatchError(f"write_to={str(out)!r} is a file; name a folder")
    stale = (
        sorted(p.name for p in out.iterdir() if _SHARD_FILE.match(p.name)) if out.is_dir() else []
    )
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise LlmBatchError(
            f"{out} already holds shard files ({shown}); write to an empty folder or delete them"
        )


def _write_one(prepared: Prepared, shard: Shard, out: Path) -> Path:
    path = out / shard.filename
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write(prepared, shard, tmp)
    fsync(tmp)
    written = tmp.stat().st_size
    if written != shard.bytes:  # the planner's arithmetic must match what is uploaded
        tmp.unlink()
        raise AssertionError(f"shard {shard.index}: planned {shard.bytes} bytes, wrote {written}")
    os.replace(tmp, path)
    return path
