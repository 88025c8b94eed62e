from __future__ import annotations

import itertools
import json
from dataclasses import replace

import polars as pl
import pytest

from polars_llmbatch import LlmBatchError, RequestTooLargeError
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes, write_shards
from polars_llmbatch.providers import Anthropic, Gemini, OpenAI


@pytest.fixture(scope="module")
def many() -> pl.DataFrame:
    return pl.select(t=pl.format("r{}", pl.int_range(100_001)))


def test_provider_limits_are_the_documented_ones() -> None:
    assert (OpenAI.limits.max_requests, OpenAI.limits.max_bytes) == (50_000, 200_000_000)
    assert OpenAI.limits.max_embedding_inputs == 50_000
    assert (Anthropic.limits.max_requests, Anthropic.limits.max_bytes) == (100_000, 256_000_000)
    assert Gemini.limits.max_bytes == 2_000_000_000


@pytest.mark.parametrize(
    ("provider", "kw", "sizes"),
    [
        ("openai", {}, [50_000, 50_000, 1]),
        ("openai", {"task": "embed"}, [50_000, 50_000, 1]),
        ("anthropic", {"options": {"max_output_tokens": 5}}, [100_000, 1]),
        ("gemini", {}, [100_000, 1]),
    ],
)
def test_request_count_limits_exactly(
    many: pl.DataFrame, provider: str, kw: dict, sizes: list[int]
) -> None:
    model = "text-embedding-3-small" if kw.get("task") == "embed" else "m"
    p = prepare(many, "{t}", provider=provider, model=model, **kw)
    shards = plan(p)
    assert [s.n_requests for s in shards] == sizes
    assert shards[0].start == 0 and all(a.stop == b.start for a, b in itertools.pairwise(shards))
    one_less = prepare(many.head(sizes[0]), "{t}", provider=provider, model=model, **kw)
    assert len(plan(one_less)) == 1  # exactly at the limit still fits in one batch


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_byte_limit_exactly(provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from polars_llmbatch.providers import gemini

    monkeypatch.setattr(gemini, "INLINE_MAX_BYTES", 10)  # Gemini's file form, sized like the rest
    df = pl.DataFrame({"t": [f"text number {i} " * (i % 5 + 1) for i in range(200)]})
    p = prepare(
        df,
        "{t}",
        provider=provider,
        model="m",
        options={"max_output_tokens": 5} if provider == "anthropic" else {},
    )
    (whole,) = plan(p)
    assert len(shard_bytes(p, whole)) == whole.bytes
    assert len(plan(p, max_bytes=whole.bytes)) == 1  # a shard of exactly the cap is allowed
    split = plan(p, max_bytes=whole.bytes - 1)
    assert len(split) == 2
    for s in split:
        data = shard_bytes(p, s)
        assert len(data) == s.bytes <= whole.bytes - 1
        if s.framing.kind == "file":
            assert all(json.loads(line) for line in data.decode().splitlines())
        else:
            json.loads(data)
    assert sum(s.n_requests for s in split) == p.requests.height


def test_real_byte_cap_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    df = pl.DataFrame({"t": ["short", "x" * 5_000, "y"], "k": ["a", "b", "c"]})
    monkeypatch.setattr(OpenAI, "limits", replace(OpenAI.limits, max_bytes=2_000))
    p = prepare(df, "{t}", provider="openai", model="m", id="k")
    with pytest.raises(RequestTooLargeError, match=r"row 1 \(k='b'\).*over openai's 2,000-byte"):
        plan(p)


def test_token_cap_per_shard() -> None:
    df = pl.DataFrame({"t": [f"row {i}" for i in range(10)]})
    p = prepare(df, "{t}", provider="openai", model="gpt-4o-mini")
    tokens = pl.Series([100] * 10)
    assert [s.n_requests for s in plan(p, max_tokens=300, tokens=tokens)] == [3, 3, 3, 1]
    assert [s.tokens for s in plan(p, max_tokens=300, tokens=tokens)] == [300, 300, 300, 100]
    with pytest.raises(RequestTooLargeError, match="over max_shard_tokens=50"):
        plan(p, max_tokens=50, tokens=tokens)


def test_caps_cannot_exceed_provider_limits(many: pl.DataFrame) -> None:
    p = prepare(many.head(10), "{t}", provider="openai", model="m")
    with pytest.raises(LlmBatchError, match="over the provider's limit of 50,000"):
        plan(p, max_requests=60_000)
    assert [s.n_requests for s in plan(p, max_requests=4)] == [4, 4, 2]


def test_estimate_with_shard_token_cap_and_files(tmp_path) -> None:
    df = pl.DataFrame({"t": [f"ticket {i} " * 20 for i in range(50)]})
    est = df.llm.estimate("{t}", provider="openai", model="gpt-4o-mini", max_shard_tokens=500)
    assert est.shards > 1
    p = prepare(df, "{t}", provider="openai", model="gpt-4o-mini")
    paths = write_shards(p, plan(p, max_requests=20), tmp_path)
    assert [x.name for x in paths] == ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
    assert not list(tmp_path.glob("*.tmp"))
    keys = [json.loads(line)["custom_id"] for x in paths for line in x.read_text().splitlines()]
    assert keys == p.requests["custom_id"].to_list()  # sorted by id, independent of row order


def test_gemini_inline_form_falls_back_to_file_under_a_lower_cap() -> None:
    df = pl.DataFrame({"t": [f"text {i} " * 20 for i in range(40)]})
    p = prepare(df, "{t}", provider="gemini", model="gemini-2.5-flash")
    (inline,) = plan(p)
    assert inline.framing.kind == "inline"
    shards = plan(p, max_bytes=inline.bytes - 1)  # the inline body no longer fits: file form
    assert all(s.framing.kind == "file" for s in shards)
    for s in shards:
        assert len(shard_bytes(p, s)) == s.bytes <= inline.bytes - 1


@pytest.mark.parametrize(
    ("provider", "limit", "options"),
    [("openai", 200_000_000, {}), ("anthropic", 256_000_000, {"max_output_tokens": 5})],
)
def test_real_byte_limits_exactly(provider: str, limit: int, options: dict) -> None:
    """Four texts sized so the batch is exactly 200 MB (256 MB): one shard; one byte more: two."""
    kw = {"provider": provider, "model": "m", "options": options}
    (small,) = plan(prepare(pl.DataFrame({"t": ["a", "b", "c", "d"]}), "{t}", **kw))
    room = limit - (small.bytes - 4)  # what is left for the four texts
    texts = [ch * (room // 4) for ch in "abcd"]
    texts[3] += "d" * (room - 4 * (room // 4))
    assert [s.bytes for s in plan(prepare(pl.DataFrame({"t": texts}), "{t}", **kw))] == [limit]
    texts[3] += "d"
    split = plan(prepare(pl.DataFrame({"t": texts}), "{t}", **kw))
    assert len(split) == 2 and sum(s.bytes for s in split) > limit
    assert all(s.bytes <= limit for s in split)
