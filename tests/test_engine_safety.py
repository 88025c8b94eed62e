"""The engine's guarantees at the edges: lost replies to a create, cancels, locks, reattaching
in another row order, interrupted starts, wrong keys, queue limits that never clear."""

from __future__ import annotations

from pathlib import Path

import httpx
import polars as pl
import pytest
from helpers import batch

import polars_llmbatch
from polars_llmbatch import LlmBatchError
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.providers import anthropic_remote
from polars_llmbatch.providers.anthropic import Anthropic
from polars_llmbatch.providers.base import AmbiguousBatch
from polars_llmbatch.run.checkpoint import Checkpoint, LockedError
from polars_llmbatch.run.transport import ProviderError, Transport, credentials

CATS = ["billing", "bug"]


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"body": [f"ticket {i}" for i in range(n)]})


def run(df, emu, ckpt, provider="openai", **kw):
    return batch(df, emu, ckpt, provider, **{"output": CATS, "max_output_tokens": 50, **kw})


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_a_lost_reply_to_a_create_is_looked_up_not_resent(
    tmp_path: Path, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = httpx.Client.send
    lost: list[str] = []

    def lose_first_create_reply(self, request, **kw):
        response = real(self, request, **kw)
        path = request.url.path
        creating = request.method == "POST" and (path.endswith("/batches") or "Content" in path)
        if creating and not lost:
            lost.append(path)
            raise httpx.ReadTimeout("the reply was lost; the batch exists")
        return response

    monkeypatch.setattr(httpx.Client, "send", lose_first_create_reply)
    with serve(batch_seconds=0.1) as emu:
        out = run(frame(6), emu, tmp_path / "j", provider)
        assert lost and len(emu.ledger.batches) == 1 and not emu.ledger.billed_twice()
    assert set(out["llm_status"]) == {"succeeded"}


def test_anthropic_find_confirms_a_candidate_by_its_custom_ids(tmp_path: Path) -> None:
    import datetime as dt

    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    with serve(batch_seconds=0.3) as emu:
        t = Transport(credentials("anthropic", api_key="k", base_url=emu.anthropic_url))
        body = (
            b'{"requests":[{"custom_id":"other-1","params":{"model":"claude-haiku-4-5",'
            b'"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}}]}'
        )
        theirs = anthropic_remote.submit(t, body)
        prov = Anthropic()
        with pytest.raises(AmbiguousBatch):  # running: whose it is cannot be told yet
            prov.find(t, tag="x", since=since, requests=1, custom_ids=frozenset({"mine-1"}))
        while not anthropic_remote.poll(t, theirs).ended:
            pass
        assert (
            prov.find(t, tag="x", since=since, requests=1, custom_ids=frozenset({"mine-1"})) is None
        )
        assert (
            prov.find(t, tag="x", since=since, requests=1, custom_ids=frozenset({"other-1"}))
            == theirs
        )
        assert (
            prov.find(
                t,
                tag="x",
                since=since,
                requests=1,
                exclude=frozenset({theirs}),
                custom_ids=frozenset({"other-1"}),
            )
            is None
        )


def test_two_checkpoints_of_one_call_have_their_own_tags(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        run(frame(4), emu, tmp_path / "a")
        run(frame(4), emu, tmp_path / "b", mode="batch")
        tags = [b["tag"] for b in emu.ledger.batches]
    a, b = (Checkpoint(tmp_path / x).job() for x in ("a", "b"))
    assert a["job_id"] == b["job_id"] and a["tag_id"] != b["tag_id"]
    # b reused a's results (the cache), so it sent nothing; a's tag names a's checkpoint only.
    assert len(tags) == 1 and a["tag_id"] in tags[0]


def test_a_second_runner_is_refused(tmp_path: Path) -> None:
    with serve(batch_seconds=0.2) as emu:
        job = run(frame(4), emu, tmp_path / "j", wait=False)
        job._stop_background()  # this test holds the job itself, as another process would
        with Checkpoint(job.path).lock():
            other = polars_llmbatch.Job.open(job.path, api_key="k", base_url=emu.openai_url)
            with pytest.raises(LockedError, match="being run by another process"):
                other.wait()
        job.wait()
        assert len(emu.ledger.batches) == 1


def test_cancel_before_anything_is_sent_sends_nothing(tmp_path: Path, monkeypatch) -> None:
    # A job created but not planned nor sent yet (its process died right after creating it).
    monkeypatch.setattr(polars_llmbatch.Job, "_start_background", lambda self: None)
    with serve(batch_seconds=0.1) as emu:
        job = run(frame(20), emu, tmp_path / "j", wait=False, max_shard_requests=5)
        assert job.status().state == "planning"
        job = polars_llmbatch.Job.open(job.path, api_key="k", base_url=emu.openai_url)
        job.cancel()
        out = job.result()
        assert not emu.ledger.batches
    assert set(out["llm_status"]) == {"canceled"} and job.status().done


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_cancel_after_the_batch_ended_collects_it(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=0.1) as emu:
        job = run(frame(6), emu, tmp_path / "j", provider, wait=False)
        job.wait(timeout=0.01)  # submitted
        (shard,) = Checkpoint(job.path).shards().values()
        t = job._t
        while not job.provider.poll(t, shard.remote_id).ended:
            pass
        job.cancel()  # nothing left to cancel: no error, the results are collected
        out = job.result()
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_cancel_midway_marks_what_never_ran_canceled(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=30) as emu:
        job = run(frame(20), emu, tmp_path / "j", provider, wait=False)
        job.wait(timeout=0.2)
        job.cancel()
        out = job.result()
        assert len(emu.ledger.batches) == 1
    assert "canceled" in set(out["llm_status"])
    assert set(out["llm_status"]) <= {"canceled", "succeeded"}


def test_reattaching_in_another_row_order_keeps_rows_aligned(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": ["say A", "say B", "say C"]})
    with serve(batch_seconds=0.1) as emu:
        first = run(df, emu, tmp_path / "j", output="answer")
        again = run(df.reverse(), emu, tmp_path / "j", output="answer")
        more = run(pl.concat([df, df.head(1)]), emu, tmp_path / "j", output="answer")
        assert len(emu.ledger.batches) == 1
    assert again["answer"].to_list() == first["answer"].reverse().to_list()
    assert more["answer"][3] == first["answer"][0] and more.height == 4
    for out in (first, again, more):
        assert all(a.endswith(b) for a, b in zip(out["answer"], out["body"], strict=True))


def test_an_interrupted_start_is_started_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = Checkpoint.commit

    def interrupted(self, job):
        raise KeyboardInterrupt

    with serve(batch_seconds=0.1) as emu:
        monkeypatch.setattr(Checkpoint, "commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(frame(5), emu, tmp_path / "j")
        assert not (tmp_path / "j" / "job.json").exists() and not emu.ledger.batches
        monkeypatch.setattr(Checkpoint, "commit", commit)
        out = run(frame(5), emu, tmp_path / "j")
        assert len(emu.ledger.batches) == 1
    assert set(out["llm_status"]) == {"succeeded"}


def test_a_wrong_key_stops_the_job_and_a_rerun_sends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polars_llmbatch.providers.openai import OpenAI

    submit = OpenAI.submit

    def unauthorized(self, *a, **kw):
        raise ProviderError("openai", 401, "Incorrect API key provided")

    with serve(batch_seconds=0.1) as emu:
        monkeypatch.setattr(OpenAI, "submit", unauthorized)
        with pytest.raises(ProviderError, match="401"):
            run(frame(5), emu, tmp_path / "j")
        monkeypatch.setattr(OpenAI, "submit", submit)
        out = run(frame(5), emu, tmp_path / "j")
        assert len(emu.ledger.batches) == 1
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_queue_limit_even_one_request_exceeds_ends(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=0.05, faults=Faults(queue_limit_tokens=3)) as emu:
        out = run(frame(4), emu, tmp_path / "j", provider)
    assert set(out["llm_status"]) == {"errored"}
    assert out["llm_error"].str.contains("limit").all()


def test_output_columns_keep_their_dtype_with_no_results(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        skipped = run(
            pl.DataFrame({"body": [None, None]}, schema={"body": pl.String}), emu, tmp_path / "a"
        )
        empty = run(pl.DataFrame(schema={"body": pl.String}), emu, tmp_path / "b")
        assert not emu.ledger.batches
    assert (
        skipped.schema["label"] == pl.Enum(CATS)
        and skipped["llm_status"].to_list() == ["skipped"] * 2
    )
    assert empty.schema["label"] == pl.Enum(CATS) and empty.height == 0


def test_the_cache_never_reuses_another_endpoints_answers(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as one, serve(batch_seconds=0.1) as two:
        run(frame(5), one, tmp_path / "runs" / "a")
        run(frame(5), two, tmp_path / "runs" / "b")
        assert len(two.ledger.batches) == 1


def test_unknown_checkpoint_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "mine.csv").write_text("x")
    with serve(batch_seconds=0.1) as emu, pytest.raises(LlmBatchError, match="other files"):
        run(frame(2), emu, tmp_path / "j")


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_sync_mode_rides_out_rate_limits(
    tmp_path: Path, provider: str, instant_backoff: list[float]
) -> None:
    with serve(batch_seconds=0.1, faults=Faults(rate_limit_sync=5)) as emu:
        out = run(frame(12), emu, tmp_path / "j", provider, mode="sync", concurrency=4)
        sync_bills = [b for b in emu.ledger.billed if b["batch_id"] is None]
        assert len(sync_bills) == 12  # each request answered (and billed) once
    assert set(out["llm_status"]) == {"succeeded"}
    assert len(instant_backoff) >= 5  # every 429 was waited out, honouring Retry-After
    if provider != "gemini":  # Gemini's 429s carry no Retry-After
        assert 1.0 in instant_backoff
