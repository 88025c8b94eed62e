"""OpenAI Batch API calls against the emulator: submit with a tag, find, poll, download, cancel."""

from __future__ import annotations

import time

import polars as pl

from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers import openai_remote as remote
from polars_llmbatch.providers.openai import parse_results
from polars_llmbatch.run.transport import Transport, credentials


def shard(n: int = 10) -> tuple[bytes, list[str], str]:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(n)]})
    p = prepare(df, "Classify: {body}", provider="openai", model="gpt-4o-mini", output=["a", "b"])
    (s,) = plan(p)
    return shard_bytes(p, s), p.requests["custom_id"].to_list(), s.tag


def wait(t: Transport, remote_id: str) -> remote.RemoteState:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = remote.poll(t, remote_id)
        if st.ended:
            return st
        time.sleep(0.02)
    raise AssertionError("batch did not end")


def test_submit_poll_download_parse(tmp_path) -> None:
    with serve(batch_seconds=0.2, faults=Faults(rate_limit_creates=1, read_errors=1)) as emu:
        t = Transport(
            credentials("openai", api_key="k", base_url=emu.openai_url), sleep=lambda s: None
        )
        data, ids, tag = shard()
        rid = remote.submit(
            t, data, endpoint="/v1/chat/completions", tag=tag, filename="00000.jsonl"
        )
        assert remote.poll(t, rid).phase in ("queued", "running", "finalizing", "ended")
        st = wait(t, rid)
        assert st.status == "completed" and st.total == st.done == len(ids) and st.result_files
        paths = []
        for i, fid in enumerate(st.result_files):
            path = tmp_path / f"{i}.jsonl"
            path.write_bytes(remote.download(t, fid))
            paths.append(str(path))
        got = parse_results(paths)
        assert sorted(got["custom_id"]) == sorted(ids) and set(got["status"]) == {"succeeded"}
        assert len(emu.ledger.batches) == 1  # the 429 was retried, not resubmitted


def test_find_by_tag_after_a_crash() -> None:
    with serve(batch_seconds=30) as emu:
        t = Transport(credentials("openai", api_key="k", base_url=emu.openai_url))
        data, _, tag = shard()
        assert remote.find(t, tag) is None
        rid = remote.submit(
            t, data, endpoint="/v1/chat/completions", tag=tag, filename="00000.jsonl"
        )
        for i in range(25):  # other batches, so that the search has to page (3 pages of 10)
            remote.submit(
                t, data, endpoint="/v1/chat/completions", tag=f"other-{i}", filename="x.jsonl"
            )
        assert remote.find(t, tag, page_size=10) == rid
        assert remote.find(t, "nowhere", page_size=10) is None
        st = remote.cancel(t, rid)
        assert st.status == "cancelling" and st.phase == "finalizing"


def test_failed_batch_reports_why() -> None:
    with serve(batch_seconds=0.2, faults=Faults(queue_limit_tokens=10)) as emu:
        t = Transport(credentials("openai", api_key="k", base_url=emu.openai_url))
        data, _, tag = shard()
        st = wait(
            t, remote.submit(t, data, endpoint="/v1/chat/completions", tag=tag, filename="a.jsonl")
        )
        assert (
            st.status == "failed" and st.result_files == () and "token_limit_exceeded" in st.error
        )
