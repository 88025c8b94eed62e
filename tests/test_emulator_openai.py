"""The emulator's OpenAI API, driven by the official openai SDK with strict response validation."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import polars as pl
import pytest
from helpers import StepClock
from openai.types import Batch, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response as ResponsesResponse

from polars_llmbatch.emulator import Emulator, Faults, model, serve
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.providers.openai import count_chat_tokens

CATS = ["billing", "bug", "feature", "other"]
TERMINAL = ("completed", "failed", "expired", "cancelled")


def client(emu: Emulator, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=emu.openai_url, api_key="test-key", _strict_response_validation=True, **kw
    )


def shard(n: int = 12, **kw) -> tuple[bytes, list[str]]:
    df = pl.DataFrame({"body": [f"ticket {i}: I was charged twice" for i in range(n)]})
    args = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "output": CATS,
        "options": {"max_output_tokens": 20},
    }
    p = prepare(df, "Classify: {body}", **(args | kw))
    (s,) = plan(p)
    return shard_bytes(p, s), p.requests["custom_id"].to_list()


def wait(
    c: openai.OpenAI,
    batch_id: str,
    timeout: float = 20.0,
    step: Callable[[], None] = lambda: None,
) -> tuple[Batch, list[str]]:
    """Poll until the batch ends; returns it and the statuses seen, in order. ``step``
    runs between polls (e.g. moves a :class:`StepClock`)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = c.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in TERMINAL:
            return b, seen
        step()
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end within {timeout} s (seen {seen})")


def run(
    c: openai.OpenAI,
    data: bytes,
    endpoint: str = "/v1/chat/completions",
    step: Callable[[], None] = lambda: None,
) -> tuple[Batch, list[str]]:
    f = c.files.create(file=("shard.jsonl", data), purpose="batch")
    b = c.batches.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", metadata={"job": "j1"}
    )
    assert b.status == "validating" and b.request_counts.total == 0
    return wait(c, b.id, step=step)


def lines(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with serve(batch_seconds=0.3) as e:
        yield e


def test_chat_batch_lifecycle_and_results(emu: Emulator) -> None:
    c = client(emu)
    data, ids = shard()
    emu.ctx.clock = clock = StepClock()

    def step() -> None:
        # The emulator validates and computes in a background thread: let it finish, then move
        # 0.03 s of batch time per poll, so every state is seen however slow the machine is.
        for batch in emu.openai.batches.values():
            batch.computed.wait(10)
        clock.advance(0.03)

    b, seen = run(c, data, step=step)
    assert seen[-1] == "completed" and "in_progress" in seen
    assert b.request_counts.total == b.request_counts.completed == len(ids)
    assert b.completed_at and b.in_progress_at and b.finalizing_at and b.error_file_id is None
    out = lines(c, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(ids)
    requests = {
        json.loads(x)["custom_id"]: json.loads(x)["body"] for x in data.decode().splitlines()
    }
    for x in out:
        resp = ChatCompletion.model_validate(x["response"]["body"], strict=False)
        assert x["response"]["status_code"] == 200 and x["error"] is None
        prompt = requests[x["custom_id"]]["messages"][-1]["content"]
        label = json.loads(resp.choices[0].message.content)["label"]
        assert label == model.enum_pick(prompt, "label", CATS)  # predictable answers
    assert [x["custom_id"] for x in out] != ids  # results come back in another order
    assert b.usage.input_tokens > 0 and b.usage.output_tokens > 0
    assert not emu.ledger.billed_twice() and len(emu.ledger.billed) == len(ids)


def test_usage_follows_the_cookbook_rules(emu: Emulator) -> None:
    c = client(emu)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there!"},
    ]
    r = c.chat.completions.create(model="gpt-4o", messages=messages, max_completion_tokens=3)
    assert r.usage.prompt_tokens == count_chat_tokens(messages, "gpt-4o")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_embeddings_batch_and_sync(emu: Emulator) -> None:
    c = client(emu)
    df = pl.DataFrame({"t": ["alpha", "beta", "gamma"]})
    p = prepare(
        df, "{t}", provider="openai", model="text-embedding-3-small", task="embed", dimensions=16
    )
    (s,) = plan(p)
    b, _ = run(c, shard_bytes(p, s), "/v1/embeddings")
    out = lines(c, b.output_file_id)
    assert len(out) == 3
    sync = c.embeddings.create(
        model="text-embedding-3-small", input="alpha", dimensions=16, encoding_format="float"
    )
    vec = sync.data[0].embedding
    assert len(vec) == 16 and abs(sum(v * v for v in vec) - 1) < 1e-5
    # the batch asked for base64: the same vector, as float32 bytes
    loose = openai.OpenAI(base_url=emu.openai_url, api_key="k")  # the SDK decodes base64 itself
    assert (
        loose.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=16)
        .data[0]
        .embedding
        == vec
    )
    for x in out:  # base64 float32, as the request asked: decoded, it is the SDK's own type
        body = x["response"]["body"]
        for item in body["data"]:
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        parsed = CreateEmbeddingResponse.model_validate(body)
        assert len(parsed.data[0].embedding) == 16


def test_responses_api(emu: Emulator) -> None:
    c = client(emu)
    r = c.responses.create(
        model="gpt-5-mini", input="Say hi", instructions="Be brief.", store=False
    )
    assert isinstance(r, ResponsesResponse) and r.output_text.startswith(
        "Emulated answer to: Say hi"
    )


def test_list_pagination_and_files(emu: Emulator) -> None:
    c = client(emu)
    data, _ = shard(2)
    f = c.files.create(file=("shard.jsonl", data), purpose="batch")
    assert c.files.retrieve(f.id).bytes == len(data)
    created = [
        c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    listed = [b.id for b in c.batches.list(limit=2)]  # the SDK pages with after=
    assert listed == list(reversed(created))
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_cancel(emu: Emulator) -> None:
    c = client(emu)
    with serve(batch_seconds=30) as slow:
        cs = client(slow)
        data, ids = shard()
        f = cs.files.create(file=("s.jsonl", data), purpose="batch")
        b = cs.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert cs.batches.cancel(b.id).status == "cancelling"
        slow.ctx.clock = lambda: time.time() + 60  # let the cancel finish without waiting
        # "cancelling" lasts until the requests that ran have their answers: wait for it
        b, seen = wait(cs, b.id)
        assert set(seen) <= {"cancelling", "cancelled"}
        assert b.status == "cancelled" and b.cancelled_at
        errs = lines(cs, b.error_file_id)
        assert {x["error"]["code"] for x in errs} == {"batch_cancelled"}
        assert len(errs) + b.request_counts.completed == len(ids)
    assert c is not None


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda ls: [*ls, ls[0]], "duplicate_custom_id"),
        (
            lambda ls: [ls[0].replace("/v1/chat/completions", "/v1/embeddings"), *ls[1:]],
            "url_mismatch",
        ),
        (
            lambda ls: (
                [
                    *ls,
                    ls[0]
                    .replace('"gpt-4o-mini"', '"gpt-4o"')
                    .replace(json.loads(ls[0])["custom_id"], "other"),
                ]
            ),
            "model_mismatch",
        ),
        (lambda ls: [*ls, "{not json"], "invalid_json_line"),
        (lambda ls: [], "empty_file"),
    ],
)
def test_validation_failures(emu: Emulator, mutate, code: str) -> None:
    c = client(emu)
    data, _ = shard(3)
    bad = "".join(x + "\n" for x in mutate(data.decode().splitlines())).encode()
    b, seen = run(c, bad)
    assert seen[-1] == "failed" and b.failed_at and b.output_file_id is None
    assert code in {e.code for e in b.errors.data}
    assert not emu.ledger.billed


def test_auth_and_bad_create(emu: Emulator) -> None:
    r = httpx.get(f"{emu.openai_url}/batches")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    c = client(emu, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        c.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="48h"
        )  # type: ignore[arg-type]


# faults -----------------------------------------------------------------------------------
def faulty(**kw) -> Iterator[Emulator]:
    return serve(batch_seconds=0.3, faults=Faults(**kw))


def test_rate_limited_create_honours_retry_after() -> None:
    with faulty(rate_limit_creates=1) as emu:
        data, _ = shard(2)
        strict = client(emu, max_retries=0)
        f = strict.files.create(file=("s.jsonl", data), purpose="batch")
        with pytest.raises(openai.RateLimitError) as e:
            strict.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert e.value.response.headers["retry-after"] == "1"
        b = strict.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert b.status == "validating"


def test_read_errors_then_recovery() -> None:
    with faulty(read_errors=2) as emu:
        c0 = client(emu, max_retries=0)
        data, _ = shard(2)
        f = c0.files.create(file=("s.jsonl", data), purpose="batch")
        b = c0.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        with pytest.raises(openai.InternalServerError):
            c0.batches.retrieve(b.id)
        assert client(emu, max_retries=2).batches.retrieve(b.id).id == b.id  # retried past it


def test_request_errors_go_to_the_error_file() -> None:
    with faulty(request_errors=0.5, seed=1) as emu:
        c = client(emu)
        data, _ids = shard(20)
        b, _ = run(c, data)
        ok, bad = lines(c, b.output_file_id), lines(c, b.error_file_id)
        assert b.status == "completed" and 0 < len(bad) < 20 and len(ok) + len(bad) == 20
        assert b.request_counts.failed == len(bad)
        for x in bad:
            assert x["response"]["status_code"] == 400 and x["error"] is None
            assert x["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert len(emu.ledger.billed) == len(ok)  # failed requests are not billed


def test_expiry_keeps_partial_output() -> None:
    with faulty(expire_at=0.5) as emu:
        c = client(emu)
        data, _ids = shard(20)
        b, seen = run(c, data)
        assert seen[-1] == "expired" and b.expired_at
        ok, bad = lines(c, b.output_file_id), lines(c, b.error_file_id)
        assert len(ok) == 10 and len(bad) == 10
        assert {x["error"]["code"] for x in bad} == {"batch_expired"}


def test_queue_limit_fails_the_batch() -> None:
    with faulty(queue_limit_tokens=100) as emu:
        c = client(emu)
        b, _ = run(c, shard(20)[0])
        assert b.status == "failed" and b.errors.data[0].code == "token_limit_exceeded"
        assert "Enqueued token limit reached for gpt-4o-mini" in b.errors.data[0].message


def test_missing_duplicated_and_malformed_lines() -> None:
    with faulty(missing=0.2, duplicates=0.2, malformed=0.2, seed=7) as emu:
        c = client(emu)
        data, ids = shard(40)
        b, _ = run(c, data)
        raw = c.files.content(b.output_file_id).text.splitlines()
        good = []
        for x in raw:
            try:
                good.append(json.loads(x)["custom_id"])
            except ValueError:
                continue
        assert len(raw) != len(ids)
        assert len(good) > len(set(good))  # duplicated lines
        assert len(good) < len(raw)  # malformed lines
        assert set(good) < set(ids)  # missing (and malformed) ids


def test_dropped_download() -> None:
    with faulty(drop_downloads=1) as emu:
        c = client(emu, max_retries=0)
        b, _ = run(c, shard(30)[0])
        with pytest.raises((httpx.HTTPError, openai.APIConnectionError)):
            c.files.content(b.output_file_id).read()
        assert len(lines(c, b.output_file_id)) == 30  # the next download is whole


def test_slow_batches() -> None:
    with faulty(slow=1000) as emu:
        c = client(emu)
        f = c.files.create(file=("s.jsonl", shard(2)[0]), purpose="batch")
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        time.sleep(0.05)
        assert c.batches.retrieve(b.id).status == "validating"


def test_ledger_over_http() -> None:
    with faulty() as emu:
        c = client(emu)
        run(c, shard(3)[0])
        ledger = httpx.get(f"{emu.url}/_emulator/ledger").json()
        assert (
            len(ledger["billed"]) == 3
            and len(ledger["batches"]) == 1
            and len(ledger["uploads"]) == 1
        )


def test_responses_batch_lines_parse_as_sdk_types(emu: Emulator) -> None:
    c = client(emu)
    df = pl.DataFrame({"body": ["alpha", "beta"]})
    p = prepare(df, "{body}", provider="openai", model="gpt-5-mini", api="responses", output=CATS)
    (s,) = plan(p)
    b, _ = run(c, shard_bytes(p, s), "/v1/responses")
    for x in lines(c, b.output_file_id):
        r = ResponsesResponse.model_validate(x["response"]["body"])
        assert json.loads(r.output_text)["label"] in CATS


def test_too_many_requests_fails_validation(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from polars_llmbatch.emulator import openai as emulated

    monkeypatch.setattr(emulated, "MAX_REQUESTS", 5)
    b, _ = run(client(emu), shard(6)[0])
    assert b.status == "failed" and b.errors.data[0].code == "too_many_tasks"


def test_a_body_the_model_cannot_take_is_a_400_line_not_a_stuck_batch(emu: Emulator) -> None:
    c = client(emu)
    data, _ids = shard(3)
    bad = json.loads(data.decode().splitlines()[0])
    bad["custom_id"], bad["body"]["messages"] = "bad-one", ["not a message"]
    b, seen = run(c, data + (json.dumps(bad) + "\n").encode())
    assert seen[-1] == "completed" and b.request_counts.failed == 1
    (err,) = lines(c, b.error_file_id)
    assert err["custom_id"] == "bad-one" and err["response"]["status_code"] == 400


def test_finished_batches_are_billed_without_being_polled(emu: Emulator) -> None:
    c = client(emu)
    data, ids = shard(3)
    f = c.files.create(file=("s.jsonl", data), purpose="batch")
    orphan = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    again, _ = run(c, data)  # a "resubmission" after a crash: only this one is polled
    assert orphan.id != again.id
    assert emu.ledger.billed_twice() == {cid: 2 for cid in ids}  # both batches ran and billed


def test_request_counts_never_go_backwards() -> None:
    with faulty(request_errors=0.5, seed=1) as emu:
        c = client(emu)
        f = c.files.create(file=("s.jsonl", shard(20)[0]), purpose="batch")
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        last = (0, 0)
        while b.status not in TERMINAL:
            counts = (b.request_counts.completed, b.request_counts.failed)
            assert counts[0] >= last[0] and counts[1] >= last[1]
            last = counts
            time.sleep(0.01)
            b = c.batches.retrieve(b.id)
        assert b.request_counts.completed >= last[0] and b.request_counts.failed >= last[1]
