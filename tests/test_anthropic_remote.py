"""Anthropic Message Batches calls against the emulator: submit, poll, results, candidates."""

from __future__ import annotations

import datetime as dt
import json
import time

import polars as pl

from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers import anthropic_remote as remote
from polars_llmbatch.run.transport import Transport, credentials


def shard(n: int = 6, word: str = "ticket") -> tuple[bytes, list[str]]:
    df = pl.DataFrame({"body": [f"{word} {i}" for i in range(n)]})
    p = prepare(
        df,
        "Classify: {body}",
        provider="anthropic",
        model="claude-haiku-4-5",
        options={"max_output_tokens": 20},
    )
    (s,) = plan(p)
    return shard_bytes(p, s), p.requests["custom_id"].to_list()


def transport(emu) -> Transport:
    return Transport(
        credentials("anthropic", api_key="k", base_url=emu.anthropic_url), sleep=lambda s: None
    )


def test_submit_poll_download() -> None:
    with serve(batch_seconds=0.2, faults=Faults(read_errors=1, rate_limit_creates=1)) as emu:
        t = transport(emu)
        data, ids = shard()
        bid = remote.submit(t, data)
        deadline = time.monotonic() + 20
        st = remote.poll(t, bid)
        while not st.ended and time.monotonic() < deadline:
            time.sleep(0.02)
            st = remote.poll(t, bid)
        assert st.status == "ended" and st.done == st.total == len(ids)
        (url,) = st.result_files
        got = [json.loads(x) for x in remote.download(t, url).decode().splitlines()]
        assert sorted(x["custom_id"] for x in got) == sorted(ids)
        assert len(emu.ledger.batches) == 1  # the 429 was retried, not resubmitted


def test_candidates_after_a_crash() -> None:
    with serve(batch_seconds=30) as emu:
        t = transport(emu)
        remote.submit(t, shard(6, "older")[0])  # before the intent
        intent = dt.datetime.now(dt.timezone.utc) - dt.timedelta(microseconds=1)
        lost = remote.submit(t, shard(6)[0])  # the crash happened before this id was recorded
        remote.submit(t, shard(4, "other")[0])  # another shard, another size
        assert remote.candidates(t, created_after=intent, requests=6) == [lost]
        assert remote.cancel(t, lost).status == "canceling"
