"""Gemini Batch Mode calls against the emulator: inline and file shards, find, poll, results."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest

from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers import gemini as gemini_provider
from polars_llmbatch.providers import gemini_remote as remote
from polars_llmbatch.run.transport import Transport, credentials


def shard(n: int = 8):
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(n)]})
    p = prepare(
        df, "Classify: {body}", provider="gemini", model="gemini-2.5-flash", output=["a", "b"]
    )
    (s,) = plan(p)
    return shard_bytes(p, s), s, p.requests["custom_id"].to_list()


def wait(t: Transport, name: str) -> remote.RemoteState:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = remote.poll(t, name)
        if st.ended:
            return st
        time.sleep(0.02)
    raise AssertionError("batch did not end")


def transport(emu) -> Transport:
    return Transport(
        credentials("gemini", api_key="k", base_url=emu.gemini_url), sleep=lambda s: None
    )


def test_inline_shard_end_to_end() -> None:
    with serve(batch_seconds=0.2) as emu:
        t = transport(emu)
        data, s, ids = shard()
        assert s.framing.kind == "inline"
        name = remote.submit(
            t, data, s.framing.kind, model="gemini-2.5-flash", embed=False, tag=s.tag
        )
        assert remote.find(t, s.tag) == name
        st = wait(t, name)
        assert st.status == "BATCH_STATE_SUCCEEDED" and st.done == st.total == len(ids)
        assert st.result_files == (remote.INLINE,)
        got = remote.inline_results(t, name)
        assert [r["metadata"]["key"] for r in got] == ids


def test_file_shard_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemini_provider, "INLINE_MAX_BYTES", 10)
    with serve(batch_seconds=0.2, faults=Faults(read_errors=1)) as emu:
        t = transport(emu)
        data, s, ids = shard()
        assert s.framing.kind == "file"
        name = remote.submit(
            t, data, s.framing.kind, model="gemini-2.5-flash", embed=False, tag=s.tag
        )
        st = wait(t, name)
        (file_name,) = st.result_files
        lines = [json.loads(x) for x in remote.download(t, file_name).decode().splitlines()]
        assert [x["key"] for x in lines] == ids
        assert emu.ledger.uploads[0]["bytes"] == len(data)


def test_expired_and_cancelled() -> None:
    with serve(batch_seconds=0.2, faults=Faults(expire_at=0.5)) as emu:
        t = transport(emu)
        data, s, _ = shard()
        st = wait(
            t,
            remote.submit(
                t, data, s.framing.kind, model="gemini-2.5-flash", embed=False, tag=s.tag
            ),
        )
        assert (
            st.status == "BATCH_STATE_EXPIRED"
            and st.result_files == ()
            and "no results" in st.error
        )
    with serve(batch_seconds=30) as emu:
        t = transport(emu)
        data, s, _ = shard()
        name = remote.submit(
            t, data, s.framing.kind, model="gemini-2.5-flash", embed=False, tag=s.tag
        )
        remote.cancel(t, name)
        assert remote.poll(t, name).status == "BATCH_STATE_CANCELLED"
