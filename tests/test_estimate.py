from __future__ import annotations

import json
import math

import polars as pl
import pytest

from polars_llmbatch import BudgetExceededError, Estimate, LlmBatchError, RequestTooLargeError
from polars_llmbatch.plan import estimate as estimate_module
from polars_llmbatch.providers.openai import count_chat_tokens

CATS = ["billing", "bug", "feature", "other"]
PRICES = {"input": 2.0, "output": 8.0}  # USD per 1M tokens; batch defaults to half


def test_arithmetic_of_tokens_and_costs(tickets: pl.DataFrame) -> None:
    est = tickets.llm.estimate(
        "Classify: {body}", provider="openai", model="gpt-4o", max_output_tokens=50, prices=PRICES
    )
    bodies = tickets["body"].drop_nulls().unique()
    expected_in = sum(
        count_chat_tokens([{"role": "user", "content": f"Classify: {b}"}], "gpt-4o") for b in bodies
    )
    assert (est.rows, est.skipped_rows, est.unique_requests, est.shards) == (5, 1, 3, 1)
    assert est.input_tokens == expected_in and est.input_tokens_error == 0
    assert est.output_tokens_expected is None and est.output_tokens_worst == 3 * 50
    assert est.cost_batch is None  # free text: output length unknown without a hint
    assert est.input_cost_batch == pytest.approx(expected_in * 1.0 / 1e6)
    assert est.worst_cost_batch == pytest.approx((expected_in * 1.0 + 150 * 4.0) / 1e6)
    assert est.worst_cost_sync == pytest.approx(2 * est.worst_cost_batch)
    assert est.savings == pytest.approx(expected_in * 1.0 / 1e6)  # on input, since output unknown

    hinted = tickets.llm.estimate(
        "Classify: {body}",
        provider="openai",
        model="gpt-4o",
        max_output_tokens=50,
        prices=PRICES,
        expected_output_tokens=10,
    )
    assert hinted.output_tokens_expected == 30
    assert hinted.cost_batch == pytest.approx((expected_in * 1.0 + 30 * 4.0) / 1e6)
    assert hinted.cost_sync == pytest.approx(2 * hinted.cost_batch)
    assert hinted.savings == pytest.approx(hinted.cost_sync - hinted.cost_batch)


def test_enum_output_expected_tokens_and_real_prices(tickets: pl.DataFrame) -> None:
    est = tickets.llm.estimate(
        "Classify: {body}",
        provider="openai",
        model="gpt-4o-mini",
        output=CATS,
        max_output_tokens=20,
    )
    assert 3 * 4 < est.output_tokens_expected < 3 * 10
    assert est.price.input == 0.15 and est.price.batch_input == 0.075
    assert "genai-prices" in est.price.source and est.price.as_of
    assert est.cost_batch == pytest.approx(est.cost_sync / 2)


def test_unknown_model_keeps_tokens_but_cost_is_unknown(tickets: pl.DataFrame) -> None:
    est = tickets.llm.estimate(
        "{body}", provider="openai", model="my-private-model", max_output_tokens=5
    )
    assert est.input_tokens > 0 and est.cost_batch is None and est.worst_cost_batch is None
    assert "unknown" in repr(est) and any("prices=" in n for n in est.notes)
    with pytest.raises(LlmBatchError, match=r"cannot be checked.*prices=") as e:
        est.check_budget(1.0)
    assert not isinstance(e.value, BudgetExceededError)  # bad input, not over budget


def test_max_cost(tickets: pl.DataFrame) -> None:
    kw = {"provider": "openai", "model": "gpt-4o", "prices": PRICES}
    ok = tickets.llm.estimate("{body}", max_output_tokens=50, max_cost=1.0, **kw)
    assert ok.worst_cost_batch < 1.0
    with pytest.raises(BudgetExceededError, match=r"worst-case cost \$.* over max_cost=\$0\.0001"):
        tickets.llm.estimate("{body}", max_output_tokens=50, max_cost=0.0001, **kw)
    with pytest.raises(BudgetExceededError, match=r"unbounded.*max_output_tokens"):
        tickets.llm.estimate("{body}", max_cost=100.0, **kw)


def test_embeddings_have_no_output(tickets: pl.DataFrame) -> None:
    est = tickets.llm.estimate(
        "{body}", provider="openai", model="text-embedding-3-small", task="embed"
    )
    assert est.output_tokens_expected == 0 and est.output_tokens_worst == 0
    assert est.worst_cost_batch == pytest.approx(est.input_cost_batch)
    assert "cl100k_base" in est.token_source and "(derived)" in est.price.source
    assert "none (embeddings)" in repr(est)


def test_approximate_providers_show_their_band(tickets: pl.DataFrame) -> None:
    openai = tickets.llm.estimate("{body}", provider="openai", model="gpt-4o", max_output_tokens=9)
    claude = tickets.llm.estimate(
        "{body}", provider="anthropic", model="claude-haiku-4-5", max_output_tokens=9
    )
    gemini = tickets.llm.estimate("{body}", provider="gemini", model="gemini-2.5-flash")
    assert claude.input_tokens_error == pytest.approx(0.15 * claude.input_tokens)
    assert claude.input_tokens > openai.input_tokens  # Claude counts ~15% more than o200k
    assert gemini.input_tokens_error == pytest.approx(0.15 * gemini.input_tokens)
    assert "±15%" in claude.input_method and gemini.output_tokens_worst is None
    assert math.isinf(gemini.worst_cost_batch)


def test_sample_mode_is_within_one_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    from polars_llmbatch.sample import tickets

    df = tickets(12_000)
    monkeypatch.setattr(estimate_module, "EXACT_THRESHOLD", 2_000)
    kw = {"provider": "openai", "model": "gpt-4o-mini", "max_output_tokens": 5}
    sampled = df.llm.estimate("Classify: {body}", **kw)
    exact = df.llm.estimate("Classify: {body}", exact=True, **kw)
    assert sampled.sampled and exact.sampled is None
    assert abs(sampled.input_tokens - exact.input_tokens) / exact.input_tokens < 0.01
    assert abs(sampled.input_tokens - exact.input_tokens) <= sampled.input_tokens_error
    assert "sample of" in repr(sampled)


def test_request_over_the_context_names_the_row() -> None:
    df = pl.DataFrame({"doc": ["short", "word " * 9_000, "also short"], "k": ["a", "b", "c"]})
    with pytest.raises(
        RequestTooLargeError,
        match=r"row 1 \(k='b'\) has 9,00\d input tokens, over text-embedding-3-small's limit of 8,192",
    ):
        df.llm.estimate(
            "{doc}", provider="openai", model="text-embedding-3-small", task="embed", id="k"
        )
    big = pl.DataFrame({"doc": ["x", "lorem ipsum " * 70_000]})
    with pytest.raises(
        RequestTooLargeError,
        match=r"row 1 has 1\d\d,\d{3} input tokens, over gpt-4o-mini's limit of 128,000",
    ):
        big.llm.estimate("{doc}", provider="openai", model="gpt-4o-mini")


def test_repr_html_and_to_dict(tickets: pl.DataFrame) -> None:
    est = tickets.llm.estimate(
        "{body}", provider="openai", model="gpt-4o-mini", output=CATS, max_output_tokens=20
    )
    assert isinstance(est, Estimate)
    text = repr(est)
    for piece in (
        "gpt-4o-mini",
        "5 (1 skipped",
        "3 unique in 1 shard",
        "batch $",
        "sync $",
        "genai-prices",
    ):
        assert piece in text
    assert est._repr_html_().startswith("<table>") and "gpt-4o-mini" in est._repr_html_()
    d = est.to_dict()
    json.dumps(d)
    assert d["unique_requests"] == 3 and d["cost_batch"] == est.cost_batch
    assert d["price"]["batch_input"] == 0.075


def test_lazyframe_estimate(tickets: pl.DataFrame) -> None:
    a = tickets.lazy().llm.estimate(
        "{body}", provider="openai", model="gpt-4o", max_output_tokens=5
    )
    b = tickets.llm.estimate("{body}", provider="openai", model="gpt-4o", max_output_tokens=5)
    assert a == b


def test_cached_shared_prefix_best_case() -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(50)]})
    system = "You are a careful support triage assistant. " * 150
    kw = {"output": CATS, "max_output_tokens": 30, "system": system}
    est = df.llm.estimate("{body}", provider="openai", model="gpt-5-mini", **kw)
    prefix = est.cacheable_prefix_tokens
    assert prefix >= 1024
    p = est.price
    assert p.batch_cached_input == pytest.approx(p.batch_input / 10)
    saved = prefix * 49 * (p.batch_input - p.batch_cached_input) / 1e6
    assert est.cost_batch_cached == pytest.approx(est.cost_batch - saved)
    assert "cached prefix" in repr(est)
    short = df.llm.estimate(
        "{body}",
        provider="openai",
        model="gpt-5-mini",
        output=CATS,
        max_output_tokens=30,
        system="Be brief.",
    )
    assert short.cacheable_prefix_tokens == 0 and short.cost_batch_cached is None
    claude = df.llm.estimate("{body}", provider="anthropic", model="claude-haiku-4-5", **kw)
    assert claude.cost_batch_cached is None  # Anthropic caches only with an explicit cache_control


def never_read() -> pl.LazyFrame:
    """A LazyFrame that fails if its data is ever computed: for errors that must come first."""

    def boom(_: pl.DataFrame) -> pl.DataFrame:
        raise AssertionError("the data was read before the bad argument was refused")

    return pl.LazyFrame({"body": ["x"]}).map_batches(boom, schema={"body": pl.String})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_shard_requests": 60_000}, "over the provider's limit of 50,000"),
        ({"max_shard_bytes": 0}, "max_shard_bytes must be a positive integer"),
        ({"max_shard_tokens": -5}, "max_shard_tokens must be a positive integer"),
        ({"prices": {"inptu": 1.0}}, "prices= takes keys"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"output": ["a", "a"]}, "unique"),
        ({"task": "embedding"}, "task="),
    ],
)
def test_bad_arguments_are_refused_before_reading_data(kw: dict, match: str) -> None:
    with pytest.raises(LlmBatchError, match=match):
        never_read().llm.estimate("{body}", provider="openai", model="gpt-4o-mini", **kw)


def test_requests_refuses_a_folder_with_shards_before_reading(tmp_path) -> None:
    df = pl.DataFrame({"body": ["a", "b"]})
    df.llm.requests("{body}", provider="openai", model="gpt-4o-mini", write_to=tmp_path)
    with pytest.raises(LlmBatchError, match=r"already holds shard files \(00000.jsonl\)"):
        never_read().llm.requests(
            "{body}", provider="openai", model="gpt-4o-mini", write_to=tmp_path
        )
    with pytest.raises(LlmBatchError, match="over the provider's limit"):
        never_read().llm.requests("{body}", provider="openai", model="m", max_shard_requests=10**6)


def test_context_counts_the_constant_part_and_requests_checks_it_too() -> None:
    df = pl.DataFrame({"body": ["hi", "word " * 9_000]})  # 9,001 tokens: fits on its own
    system = "lorem ipsum " * 60_000  # 120,002 tokens: fits on its own
    with pytest.raises(RequestTooLargeError, match=r"every request carries ~140,0\d\d tokens"):
        df.llm.estimate(
            "{body}", provider="openai", model="gpt-4o-mini", system="lorem ipsum " * 70_000
        )
    with pytest.raises(RequestTooLargeError, match=r"row 1 has 129,0\d\d input tokens"):
        df.llm.estimate("{body}", provider="openai", model="gpt-4o-mini", system=system)
    with pytest.raises(RequestTooLargeError, match="row 1"):
        df.llm.requests("{body}", provider="openai", model="gpt-4o-mini", system=system)
    with pytest.raises(RequestTooLargeError, match="limit of 8,192"):
        pl.DataFrame({"t": ["word " * 9_000]}).llm.requests(
            "{t}", provider="openai", model="text-embedding-3-small", task="embed"
        )


def test_price_override_without_output_price() -> None:
    df = pl.DataFrame({"body": ["some text to embed", "more"]})
    emb = df.llm.estimate(
        "{body}",
        provider="openai",
        model="text-embedding-3-small",
        task="embed",
        prices={"input": 0.02},
    )
    assert emb.cost_batch == pytest.approx(emb.input_tokens * 0.01 / 1e6)
    gen = df.llm.estimate(
        "{body}", provider="openai", model="gpt-4o", prices={"input": 2.0}, max_output_tokens=10
    )
    assert gen.worst_cost_batch is None and gen.input_cost_batch is not None
    with pytest.raises(LlmBatchError, match="cannot be checked"):
        gen.check_budget(1.0)


def test_unbounded_to_dict_is_strict_json() -> None:
    est = pl.DataFrame({"body": ["x"]}).llm.estimate(
        "{body}", provider="gemini", model="gemini-2.5-flash"
    )
    d = est.to_dict()
    assert d["worst_cost_batch"] is None and d["output_unbounded"] is True
    json.dumps(d, allow_nan=False)


def test_empty_generate_job_is_not_called_embeddings() -> None:
    est = pl.DataFrame({"body": [None, None]}, schema={"body": pl.String}).llm.estimate(
        "{body}", provider="openai", model="gpt-4o", max_output_tokens=5
    )
    assert est.unique_requests == 0 and est.skipped_rows == 2 and est.shards == 0
    assert "embeddings" not in repr(est)


def test_gpt41_is_not_claimed_exact() -> None:
    df = pl.DataFrame({"body": ["hello there"]})
    est = df.llm.estimate("{body}", provider="openai", model="gpt-4.1-mini", max_output_tokens=5)
    assert est.input_tokens_error == 2 and "±2" in est.input_method


def test_token_capped_shards_plan_on_the_upper_bound() -> None:
    df = pl.DataFrame({"body": [f"ticket {i} " * 30 for i in range(40)]})
    kw = {"max_output_tokens": 5, "max_shard_tokens": 1_000}
    claude = df.llm.estimate("{body}", provider="anthropic", model="claude-haiku-4-5", **kw)
    per_request = claude.input_tokens / claude.unique_requests  # ~115
    # planned at +15% (7 a shard, 6 shards), not on the point estimate (8 a shard, 5 shards)
    assert claude.shards == -(-40 // int(1_000 // (per_request * 1.15))) == 6
