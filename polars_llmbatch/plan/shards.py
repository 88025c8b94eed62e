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
from polars_llmbatch.plan.stored import StoredRequests
from polars_llmbatch.plan.stream import Staged
from polars_llmbatch.plan.subset import Subset
from polars_llmbatch.providers import Framing, Provider

__all__ = ["Shard", "plan", "shard_bytes", "write_shard_files", "write_shards"]

#: The requests shards are cut from: in memory, staged on disk by streaming preparation, or
#: read back from a job's requests.parquet (any of them less the cached ones).
Source = Prepared | Staged | StoredRequests | Subset


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
    source: Source,
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
    requests' own), so a job's retry shards continue its numbering.
    A request that can never fit raises :class:`RequestTooLargeError` naming its row.

    The requests are read a piece at a time (their sizes only) and each shard is filled
    greedily across pieces, so the shards are the same however the requests are cut.
    """
    limits = source.provider.limits
    spec = source.spec
    cap_requests = _lower(max_requests, limits.max_requests, "max_shard_requests")
    if spec.task == "embed" and limits.max_embedding_inputs is not None:
        cap_requests = min(cap_requests, limits.max_embedding_inputs)  # one input per request
    cap_bytes = _lower(max_bytes, limits.max_bytes, "max_shard_bytes")
    n = source.n_requests
    if n == 0:
        return []
    job_id = job_id or source.job_id
    big = source.provider.framing(spec, _tag(job_id, first_index), 0, 0)
    budget = cap_bytes - big.size(0, 0)  # bytes left for lines once prefix and suffix are in
    # each request's line in the shard, a piece at a time; the largest line (the first of its
    # size) is the one a refusal names
    lines: list[pl.Series] = []
    top, top_row = -1, 0
    for piece in source.pieces(["payload", "row"]):
        line = piece["payload"] + big.line_bytes
        lines.append(line)
        at = line.arg_max()
        if at is not None and int(line[at]) > top:
            top, top_row = int(line[at]), int(piece["row"][at])
    if top > budget:
        raise RequestTooLargeError(
            f"{source.describe_row(top_row)} renders to a {top:,}-byte request, over "
            f"{spec.provider}'s {cap_bytes:,}-byte batch limit; shorten that row's text"
        )
    if max_tokens is not None:
        if tokens is None or len(tokens) != n:
            raise ValueError("max_tokens needs per-request token counts")
        worst = tokens.arg_max()
        if worst is not None and tokens[worst] > max_tokens:
            row = int(source.gather(pl.Series([worst]), ["row"]).item())
            raise RequestTooLargeError(
                f"{source.describe_row(row)} has ~{tokens[worst]:,} input tokens, over "
                f"max_shard_tokens={max_tokens:,}; raise the cap or shorten that row"
            )
    bounds: list[tuple[int, int, int]] = []  # start, stop, payload bytes
    start = count = used = 0  # the shard being filled: its first request, requests, bytes
    offset = 0  # position of the piece's first request

    def close() -> None:
        nonlocal start, count, used
        bounds.append((start, start + count, used - count * big.line_bytes))
        start, count, used = start + count, 0, 0

    for line in lines:
        cum = line.cum_sum()
        cum_tokens = None
        if max_tokens is not None and tokens is not None:
            cum_tokens = tokens.slice(offset, len(line)).cast(pl.Int64).cum_sum()
        at, m = 0, len(line)
        while at < m:
            base = int(cum[at - 1]) if at else 0
            k = min(m - at, cap_requests - count)
            k = min(k, int(cum.search_sorted(base + budget - used, side="right")) - at)
            if cum_tokens is not None:
                tbase = int(cum_tokens[at - 1]) if at else 0
                room = max_tokens - _tokens_in(tokens, start, offset + at)  # type: ignore[operator]
                k = min(k, int(cum_tokens.search_sorted(tbase + room, side="right")) - at)
            if k > 0:
                used += int(cum[at + k - 1]) - base
                count += k
                at += k
            if at < m or count == cap_requests:  # full: the next request does not fit
                close()
        offset += m
    if count:
        close()
    shards = []
    for i, (a, b, size) in enumerate(bounds, start=first_index):
        tag = _tag(job_id, i)
        framing = source.provider.framing(spec, tag, b - a, size)
        if framing.size(b - a, size) > cap_bytes:  # a form chosen by size must still fit the cap
            framing = big
        tok = _tokens_in(tokens, a, b) if max_tokens is not None else None
        shards.append(Shard(i, a, b, framing.size(b - a, size), tok, framing, tag))
    return shards


def _tokens_in(tokens: pl.Series | None, a: int, b: int) -> int:
    assert tokens is not None
    return int(tokens.slice(a, b - a).cast(pl.Int64).sum())


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


def _write(source: Source, shard: Shard, target: Path | BinaryIO) -> None:
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
    head_rest = pl.concat_str(pl.lit(head_a + '"'), pl.col("custom_id"), pl.lit('"' + head_b))
    with contextlib.ExitStack() as stack:
        out = target if not isinstance(target, Path) else stack.enter_context(open(target, "w+b"))
        # a shard of streamed requests spans pieces: each is written after the last, and only
        # the shard's first line carries the prefix
        for k, part in enumerate(source.span(shard.start, shard.n_requests, ["custom_id", "body"])):
            first = head if k == 0 else head_rest
            part.select(first.alias("head"), "body").write_csv(
                out,
                include_header=False,
                quote_style="never",
                separator=separator,
                line_terminator=tail + f.sep,
            )
        if f.sep != f.suffix:
            sep, suffix = f.sep.encode(), f.suffix.encode()
            out.seek(-len(sep), os.SEEK_END)
            out.write(suffix)
            out.truncate()


def shard_bytes(source: Source, shard: Shard) -> bytes:
    """The exact bytes uploaded (or POSTed) for ``shard``."""
    buf = io.BytesIO()
    _write(source, shard, buf)
    return buf.getvalue()


def write_shards(source: Source, shards: list[Shard], directory: str | Path) -> list[Path]:
    """Write each shard's exact bytes to ``directory/NNNNN.jsonl`` (or ``.json``), atomically
    (temp file, fsync, rename), two at a time: polars writes outside the GIL, and two writers
    fill fresh pages about twice as fast as one (benchmarks/README.md)."""
    out = Path(directory)
    check_target(out)
    return write_shard_files(source, shards, out)


def write_shard_files(source: Source, shards: list[Shard], out: Path) -> list[Path]:
    """:func:`write_shards` into a job's own folder, where earlier rounds' shards stay."""
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        paths = list(pool.map(lambda shard: _write_one(source, shard, out), shards))
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


def _write_one(source: Source, shard: Shard, out: Path) -> Path:
    path = out / shard.filename
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write(source, shard, tmp)
    fsync(tmp)
    written = tmp.stat().st_size
    if written != shard.bytes:  # the planner's arithmetic must match what is uploaded
        tmp.unlink()
        raise AssertionError(f"shard {shard.index}: planned {shard.bytes} bytes, wrote {written}")
    os.replace(tmp, path)
    return path
