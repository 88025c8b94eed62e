"""The progress bar tells the truth: never 100% before the results are in, the phase in words,
and no request rate (a resumed job would show millions per second)."""

from __future__ import annotations

from pathlib import Path

from polars_llmbatch.providers.base import RemoteState
from polars_llmbatch.run.checkpoint import Checkpoint, ShardRecord
from polars_llmbatch.run.progress import Progress


def shard(index: int, requests: int, **kw) -> ShardRecord:
    return ShardRecord(index, 1, requests, "sha", "tag", f"{index}.jsonl", **kw)


def test_the_bar_waits_for_the_results_and_names_the_phase(tmp_path: Path, capsys) -> None:
    p = Progress(Checkpoint(tmp_path), enabled=True)
    shards = {0: shard(0, 100, remote_id="b0"), 1: shard(1, 50, done=True, counts={"ok": 50})}
    # the provider says every request of shard 0 ran; it is finalizing, nothing downloaded
    states = {0: RemoteState("b0", "finalizing", "finalizing", total=100, done=100)}
    p.update(shards, states)
    bar = p._bar
    assert bar.total == 150 and bar.n == 149  # not 100% yet
    assert bar.desc == "llmbatch: finalizing at the provider"
    shards[0] = shard(0, 100, remote_id="b0", done=True, counts={"ok": 100})
    p.update(shards, {})
    assert bar.n == 150 and bar.desc == "llmbatch: done"
    p.close()
    shown = capsys.readouterr().err
    assert "req/s" not in shown and "it/s" not in shown and "100%" in shown
