"""The emulator's Anthropic API, driven by the official anthropic SDK with strict validation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import polars as pl
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from polars_llmbatch.emulator import Emulator, Faults, model, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes

CATS = ["billing", "bug", "feature", "other"]


def client(emu: Emulator, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=emu.anthropic_url, api_key="test-key", _strict_response_validation=True, **kw
    )


def requests(n: int = 12) -> list[dict]:
    df = pl.DataFrame({"body": [f"ticket {i}: the app crashes" for i in range(n)]})
    p = prepare(
        df,
        "Classify: {body}",
        provider="anthropic",
        model="claude-haiku-4-5",
        output=CATS,
        options={"max_output_tokens": 30},
    )
    (s,) = plan(p)
    return json.loads(shard_bytes(p, s))["requests"]


def wait(
    c: anthropic.Anthropic, batch_id: str, timeout: float = 20.0
) -> tuple[MessageBatch, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = c.messages.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.processing_status:
            seen.append(b.processing_status)
        if b.processing_status == "ended":
            return b, seen
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end within {timeout} s")


def results(c: anthropic.Anthropic, batch_id: str) -> list[MessageBatchIndividualResponse]:
    return list(c.messages.batches.results(batch_id))


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with serve(batch_seconds=0.3) as e:
        yield e


def test_lifecycle_and_results(emu: Emulator) -> None:
    c = client(emu)
    reqs = requests()
    b = c.messages.batches.create(requests=reqs)
    assert b.processing_status == "in_progress" and b.request_counts.processing == len(reqs)
    b, seen = wait(c, b.id)
    assert seen[-1] == "ended" and b.ended_at and b.results_url.startswith(emu.anthropic_url)
    assert b.request_counts.succeeded == len(reqs) and b.request_counts.processing == 0
    got = results(c, b.id)
    assert sorted(r.custom_id for r in got) == sorted(e["custom_id"] for e in reqs)
    assert [r.custom_id for r in got] != [e["custom_id"] for e in reqs]  # any order
    prompts = {e["custom_id"]: e["params"]["messages"][0]["content"] for e in reqs}
    for r in got:
        assert r.result.type == "succeeded" and r.result.message.usage.service_tier == "batch"
        label = json.loads(r.result.message.content[0].text)["label"]
        assert label == model.enum_pick(prompts[r.custom_id], "label", CATS)
    assert not emu.ledger.billed_twice() and len(emu.ledger.billed) == len(reqs)


def test_sync_messages_and_both_auth_headers(emu: Emulator) -> None:
    c = client(emu)
    m = c.messages.create(
        model="claude-haiku-4-5",
        max_tokens=3,
        messages=[{"role": "user", "content": "hello there friend"}],
    )
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    r = httpx.post(
        f"{emu.anthropic_url}/v1/messages",
        headers={"x-api-key": "k"},
        json={
            "model": "claude-haiku-4-5",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert r.status_code == 200
    r = httpx.get(f"{emu.anthropic_url}/v1/messages/batches")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_list_cancel_and_delete(emu: Emulator) -> None:
    with serve(batch_seconds=30) as slow:
        c = client(slow)
        ids = [c.messages.batches.create(requests=requests(2)).id for _ in range(3)]
        assert [b.id for b in c.messages.batches.list(limit=2)] == list(reversed(ids))
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.delete(ids[0])  # still processing
        assert c.messages.batches.cancel(ids[0]).processing_status == "canceling"
        slow.ctx.clock = lambda: time.time() + 60
        b = c.messages.batches.retrieve(ids[0])
        assert b.processing_status == "ended" and b.cancel_initiated_at
        assert {r.result.type for r in results(c, b.id)} == {"canceled"}
        assert c.messages.batches.delete(ids[0]).type == "message_batch_deleted"
    assert emu is not None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rs: [*rs, rs[0]], "Duplicate custom_id"),
        (lambda rs: [{**rs[0], "custom_id": "bad id!"}], "should match pattern"),
        (lambda rs: [], "at least 1 item"),
    ],
)
def test_create_validation(emu: Emulator, mutate, message: str) -> None:
    c = client(emu, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match=message):
        c.messages.batches.create(requests=mutate(requests(2)))
    assert not emu.ledger.batches


def faulty(**kw) -> Iterator[Emulator]:
    return serve(batch_seconds=0.3, faults=Faults(**kw))


def test_rate_limit_and_queue_limit_on_create() -> None:
    with faulty(rate_limit_creates=1) as emu:
        c0 = client(emu, max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as e:
            c0.messages.batches.create(requests=requests(2))
        assert e.value.response.headers["retry-after"] == "1"
        assert client(emu).messages.batches.create(requests=requests(2)).id
    with (
        faulty(queue_limit_tokens=50) as emu,
        pytest.raises(anthropic.RateLimitError, match="enqueued tokens"),
    ):
        client(emu, max_retries=0).messages.batches.create(requests=requests(5))


def test_errored_expired_and_overloaded() -> None:
    with faulty(request_errors=0.4, seed=2) as emu:
        c = client(emu)
        b, _ = wait(c, c.messages.batches.create(requests=requests(20)).id)
        types = [r.result.type for r in results(c, b.id)]
        assert 0 < types.count("errored") < 20 and b.request_counts.errored == types.count(
            "errored"
        )
        assert len(emu.ledger.billed) == types.count("succeeded")
    with faulty(expire_at=0.25) as emu:
        c = client(emu)
        b, _ = wait(c, c.messages.batches.create(requests=requests(20)).id)
        assert b.request_counts.expired == 15 and b.request_counts.succeeded == 5
    with faulty(read_errors=1) as emu:
        with pytest.raises(anthropic.InternalServerError):
            client(emu, max_retries=0).messages.batches.retrieve("msgbatch_x")
        with pytest.raises(anthropic.NotFoundError):
            client(emu, max_retries=0).messages.batches.retrieve("msgbatch_x")


def test_line_faults_and_dropped_download() -> None:
    with faulty(missing=0.2, duplicates=0.2, malformed=0.2, drop_downloads=1, seed=3) as emu:
        c = client(emu)
        reqs = requests(30)
        b, _ = wait(c, c.messages.batches.create(requests=reqs).id)
        url = b.results_url
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, headers={"x-api-key": "k"}).raise_for_status()
        raw = httpx.get(url, headers={"x-api-key": "k"}).text.splitlines()
        ids = []
        for line in raw:
            try:
                ids.append(json.loads(line)["custom_id"])
            except ValueError:
                continue
        assert len(ids) > len(set(ids)) and len(ids) < len(raw)
        assert set(ids) < {e["custom_id"] for e in reqs}


def test_create_limits(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from polars_llmbatch.emulator import anthropic as emulated

    c = client(emu, max_retries=0)
    monkeypatch.setattr(emulated, "MAX_REQUESTS", 3)
    with pytest.raises(anthropic.BadRequestError, match="at most 3 items"):
        c.messages.batches.create(requests=requests(4))
    monkeypatch.setattr(emulated, "MAX_BYTES", 100)
    with pytest.raises(anthropic.APIStatusError) as e:
        c.messages.batches.create(requests=requests(2))
    assert e.value.status_code == 413 and "request_too_large" in str(e.value.body)


def test_invalid_params_come_back_errored(emu: Emulator) -> None:
    c = client(emu)
    reqs = requests(2)
    reqs.append({"custom_id": "bad", "params": {"model": "m", "max_tokens": 5, "messages": "nope"}})
    b, _ = wait(c, c.messages.batches.create(requests=reqs).id)
    got = {r.custom_id: r.result.type for r in results(c, b.id)}
    assert (
        got["bad"] == "errored"
        and b.request_counts.errored == 1
        and b.request_counts.succeeded == 2
    )


def test_list_before_id_pages_back(emu: Emulator) -> None:
    with serve(batch_seconds=30) as slow:
        c = client(slow)
        ids = [c.messages.batches.create(requests=requests(1)).id for _ in range(5)]
        page = c.messages.batches.list(limit=2, before_id=ids[0])
        assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
    assert emu is not None
