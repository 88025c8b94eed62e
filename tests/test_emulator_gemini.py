"""The emulator's Gemini API, driven by the official google-genai SDK (v1 and v1beta)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator

import httpx
import polars as pl
import pytest
from google import genai
from google.genai import errors, types
from helpers import StepClock

from polars_llmbatch.emulator import Emulator, Faults, model, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers import gemini as gemini_provider

CATS = ["billing", "bug", "feature", "other"]
DONE = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def client(emu: Emulator, version: str = "v1beta") -> genai.Client:
    return genai.Client(
        api_key="test-key", http_options={"base_url": emu.gemini_url, "api_version": version}
    )


def wait(
    c: genai.Client, name: str, timeout: float = 20.0, step: Callable[[], None] = lambda: None
) -> tuple[types.BatchJob, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.batches.get(name=name)
        if not seen or seen[-1] != job.state.value:
            seen.append(job.state.value)
        if job.done:
            return job, seen
        step()
        time.sleep(0.02)
    raise AssertionError(f"{name} did not end within {timeout} s")


def file_shard(
    n: int, monkeypatch: pytest.MonkeyPatch, **kw
) -> tuple[bytes, list[str], dict[str, str]]:
    monkeypatch.setattr(gemini_provider, "INLINE_MAX_BYTES", 10)  # force the file form
    df = pl.DataFrame({"body": [f"ticket {i}: where is my refund" for i in range(n)]})
    args = {"provider": "gemini", "model": "gemini-2.5-flash", "output": CATS}
    p = prepare(df, "Classify: {body}", **(args | kw))
    (s,) = plan(p)
    prompts = dict(zip(p.requests["custom_id"], p.requests["user"], strict=True))
    return shard_bytes(p, s), p.requests["custom_id"].to_list(), prompts


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with serve(batch_seconds=0.3) as e:
        yield e


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_inline_batch_in_order_with_metadata(emu: Emulator, version: str) -> None:
    c = client(emu, version)
    src = [
        types.InlinedRequest(contents=f"question {i}", metadata={"key": f"k{i}"}) for i in range(5)
    ]
    emu.ctx.clock = clock = StepClock()  # 0.03 s of batch time per poll: every state is seen
    job = c.batches.create(model="gemini-2.5-flash", src=src, config={"display_name": "tag-1"})
    assert job.state.value == "JOB_STATE_PENDING" and job.display_name == "tag-1"
    job, seen = wait(c, job.name, step=lambda: clock.advance(0.03))
    assert seen[-1] == "JOB_STATE_SUCCEEDED" and "JOB_STATE_RUNNING" in seen
    got = job.dest.inlined_responses
    assert [r.metadata["key"] for r in got] == [f"k{i}" for i in range(5)]
    assert got[2].response.text == "Emulated answer to: question 2"
    raw = httpx.get(
        f"{emu.gemini_url}/{version}/{job.name}", headers={"x-goog-api-key": "k"}
    ).json()
    assert (
        raw["done"] is True
        and raw["response"]["inlinedResponses"] == raw["metadata"]["output"]["inlinedResponses"]
    )
    assert raw["metadata"]["batchStats"] == {"requestCount": "5", "successfulRequestCount": "5"}


def test_file_batch_and_download(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client(emu)
    data, ids, prompts = file_shard(8, monkeypatch)
    f = c.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl", "display_name": "in"})
    assert int(f.size_bytes) == len(data) and f.state.value == "ACTIVE"
    job, _ = wait(c, c.batches.create(model="gemini-2.5-flash", src=f.name).name)
    assert job.dest.file_name.startswith("files/batch-")
    lines = [json.loads(x) for x in c.files.download(file=job.dest.file_name).decode().splitlines()]
    assert [x["key"] for x in lines] == ids  # input order
    for x in lines:
        resp = types.GenerateContentResponse.model_validate(x["response"])
        assert json.loads(resp.text)["label"] == model.enum_pick(prompts[x["key"]], "label", CATS)
    assert not emu.ledger.billed_twice() and len(emu.ledger.billed) == 8


@pytest.mark.filterwarnings("ignore::Warning")
def test_embeddings_batch_and_sync(emu: Emulator) -> None:
    c = client(emu)
    src = {
        "inlined_requests": types.EmbedContentBatch(
            contents=["alpha", "beta"], config=types.EmbedContentConfig(output_dimensionality=8)
        )
    }
    job, _ = wait(c, c.batches.create_embeddings(model="gemini-embedding-001", src=src).name)
    assert job.state.value == "JOB_STATE_SUCCEEDED"
    vectors = [r.response.embedding.values for r in job.dest.inlined_embed_content_responses]
    sync = c.models.embed_content(
        model="gemini-embedding-001", contents="alpha", config={"output_dimensionality": 8}
    )
    assert vectors[0] == sync.embeddings[0].values and len(vectors[0]) == 8


def test_sync_list_cancel_delete_and_auth(emu: Emulator) -> None:
    c = client(emu)
    r = c.models.generate_content(model="gemini-2.5-flash", contents="hello there")
    assert r.text == "Emulated answer to: hello there" and r.usage_metadata.prompt_token_count == 2
    with serve(batch_seconds=30) as slow:
        cs = client(slow)
        names = [
            cs.batches.create(
                model="gemini-2.5-flash", src=[types.InlinedRequest(contents="x")]
            ).name
            for _ in range(3)
        ]
        assert [j.name for j in cs.batches.list(config={"page_size": 2})] == list(reversed(names))
        cs.batches.cancel(name=names[0])
        assert cs.batches.get(name=names[0]).state.value == "JOB_STATE_CANCELLED"
        cs.batches.delete(name=names[0])
        with pytest.raises(errors.ClientError):
            cs.batches.get(name=names[0])
    r = httpx.get(f"{emu.gemini_url}/v1beta/batches")
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"


def faulty(**kw) -> Iterator[Emulator]:
    return serve(batch_seconds=0.3, faults=Faults(**kw))


def test_quota_errors_on_create() -> None:
    src = [types.InlinedRequest(contents="a long enough question to count")]
    with faulty(rate_limit_creates=1) as emu:
        c = client(emu)
        with pytest.raises(errors.ClientError) as e:
            c.batches.create(model="gemini-2.5-flash", src=src)
        assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"
        assert c.batches.create(model="gemini-2.5-flash", src=src).name
    with faulty(queue_limit_tokens=3) as emu:
        c = client(emu)  # keep a reference: a collected client closes its connection pool
        with pytest.raises(errors.ClientError, match="Enqueued token limit"):
            c.batches.create(model="gemini-2.5-flash", src=src)


def test_request_errors_expiry_and_read_errors() -> None:
    src = [types.InlinedRequest(contents=f"q{i}", metadata={"key": f"k{i}"}) for i in range(20)]
    with faulty(request_errors=0.4, seed=4) as emu:
        c = client(emu)
        job, _ = wait(c, c.batches.create(model="gemini-2.5-flash", src=src).name)
        assert job.state.value == "JOB_STATE_SUCCEEDED"  # even with failed requests
        failed = [r for r in job.dest.inlined_responses if r.error is not None]
        assert 0 < len(failed) < 20 and failed[0].error.code == 400
    with faulty(expire_at=0.5) as emu:
        c = client(emu)
        job, _ = wait(c, c.batches.create(model="gemini-2.5-flash", src=src).name)
        assert job.state.value == "JOB_STATE_EXPIRED" and job.dest is None  # no results at all
    with faulty(read_errors=1) as emu:
        c = client(emu)
        name = c.batches.create(model="gemini-2.5-flash", src=src).name
        with pytest.raises(errors.ServerError):
            c.batches.get(name=name)
        assert c.batches.get(name=name).name == name


def test_line_faults_and_dropped_download(monkeypatch: pytest.MonkeyPatch) -> None:
    with faulty(missing=0.2, duplicates=0.2, malformed=0.2, drop_downloads=1, seed=5) as emu:
        c = client(emu)
        data, ids, _ = file_shard(30, monkeypatch)
        f = c.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl"})
        job, _ = wait(c, c.batches.create(model="gemini-2.5-flash", src=f.name).name)
        with pytest.raises(Exception) as cut:  # the SDK's own httpx raises its own class
            c.files.download(file=job.dest.file_name)
        assert "peer closed connection" in str(cut.value)
        raw = c.files.download(file=job.dest.file_name).decode().splitlines()
        keys = []
        for line in raw:
            try:
                keys.append(json.loads(line)["key"])
            except ValueError:
                continue
        assert len(keys) > len(set(keys)) and len(keys) < len(raw) and set(keys) < set(ids)


@pytest.mark.filterwarnings("ignore::Warning")
def test_embeddings_batch_from_a_file(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemini_provider, "INLINE_MAX_BYTES", 10)
    df = pl.DataFrame({"t": ["alpha", "beta", "gamma"]})
    p = prepare(
        df, "{t}", provider="gemini", model="gemini-embedding-001", task="embed", dimensions=4
    )
    (s,) = plan(p)
    c = client(emu)
    f = c.files.upload(file=io.BytesIO(shard_bytes(p, s)), config={"mime_type": "jsonl"})
    job, _ = wait(
        c, c.batches.create_embeddings(model="gemini-embedding-001", src={"file_name": f.name}).name
    )
    lines = [json.loads(x) for x in c.files.download(file=job.dest.file_name).decode().splitlines()]
    assert [x["key"] for x in lines] == p.requests["custom_id"].to_list()
    for x in lines:
        assert (
            len(types.SingleEmbedContentResponse.model_validate(x["response"]).embedding.values)
            == 4
        )


def test_cancel_keeps_finished_work_and_time_runs_forward(emu: Emulator) -> None:
    with serve(batch_seconds=10) as slow:
        c = client(slow)
        src = [types.InlinedRequest(contents=f"q{i}", metadata={"key": f"k{i}"}) for i in range(10)]
        name = c.batches.create(model="gemini-2.5-flash", src=src).name
        start = time.time()
        slow.ctx.clock = lambda: start + 5  # half way through the run
        c.batches.cancel(name=name)
        job = c.batches.get(name=name)
        assert job.state.value == "JOB_STATE_CANCELLED" and job.end_time >= job.create_time
        done = job.dest.inlined_responses
        assert 0 < len(done) < 10 and len(slow.ledger.billed) == len(done)
    assert emu is not None
