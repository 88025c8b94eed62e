"""Every price tier, as billed: cached input (OpenAI cached_tokens; Anthropic cache reads and
writes, which the batch discount halves too; Gemini, whose cache and batch discounts do not
stack) and a long-context tier, in llm_cost against the emulator. Expected costs come from
genai-prices' ``calc_price`` on the emulator's billed tokens, not from the library's pricing."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from genai_prices import Usage, calc_price
from helpers import batch

from polars_llmbatch.emulator import Faults, serve

PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}


def priced(bill: dict, provider: str, batch_rates: bool) -> float:
    p = calc_price(
        Usage(
            input_tokens=bill["input_tokens"],
            cache_read_tokens=bill["cache_read"],
            cache_write_tokens=bill["cache_write"],
            output_tokens=bill["output_tokens"],
        ),
        model_ref=bill["model"],
        provider_id=PROVIDER_IDS[provider],
        price_context={"processing": "batch"} if batch_rates else None,
    )
    return float(p.total_price)


@pytest.mark.parametrize(
    ("provider", "faults"),
    [
        ("openai", Faults(cache_read=0.5)),
        ("anthropic", Faults(cache_read=0.3, cache_write=0.2)),
        ("gemini", Faults(cache_read=0.4)),
    ],
)
def test_cached_tokens_are_priced_at_their_own_batch_rates(
    tmp_path: Path, provider: str, faults: Faults
) -> None:
    long = " ".join(["context"] * 1500)  # long enough for the providers to cache
    df = pl.DataFrame({"body": [f"{long} ticket {i}" for i in range(20)]})
    with serve(batch_seconds=0.1, faults=faults) as emu:
        out = batch(df, emu, tmp_path / "j", provider, output=["billing", "bug"], usage=True)
        bills = emu.ledger.billed
    assert sum(b["cache_read"] for b in bills) > 0
    expected = sum(priced(b, provider, batch_rates=True) for b in bills)
    assert out["llm_cost"].sum() == pytest.approx(expected, rel=1e-6)
    # not what the same tokens cost without the cache (at OpenAI a batch's cache hits cost
    # what its input does: genai-prices' batch rates say so)
    uncached = sum(priced({**b, "cache_read": 0, "cache_write": 0}, provider, True) for b in bills)
    if provider != "openai":
        assert out["llm_cost"].sum() != pytest.approx(uncached, rel=1e-3)


def test_a_request_past_the_long_context_threshold_is_priced_in_its_tier(tmp_path: Path) -> None:
    # gemini-2.5-pro: above 200k input tokens, every token of the request at the higher rate
    text = "word " * 205_000
    df = pl.DataFrame({"body": [text, "short one"]})
    with serve(batch_seconds=0.1) as emu:
        out = batch(df, emu, tmp_path / "j", "gemini", model="gemini-2.5-pro", usage=True,
                    max_output_tokens=50)  # fmt: skip
        bills = {b["input_tokens"] > 200_000: b for b in emu.ledger.billed}
    assert set(bills) == {True, False}
    costs = dict(zip(out["llm_input_tokens"].to_list(), out["llm_cost"].to_list(), strict=True))
    for b in bills.values():
        assert costs[b["input_tokens"]] == pytest.approx(priced(b, "gemini", True), rel=1e-6)
    # the long request's input is at the tier's higher rate (genai-prices: 2x above 200k)
    rate = {
        k: priced({**b, "output_tokens": 0}, "gemini", True) / b["input_tokens"]
        for k, b in bills.items()
    }
    assert rate[True] == pytest.approx(2 * rate[False])


def test_rates_the_price_list_lacks_are_not_guessed(tmp_path: Path) -> None:
    """prices= with no cache rates: cache reads are priced at the input rate (they never cost
    more); cache writes have no rate, so those rows' cost is unknown, and said so."""
    import warnings

    import polars_llmbatch

    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(10)]})
    prices = {"input": 2.0, "output": 4.0}  # batch: half
    with serve(batch_seconds=0.1, faults=Faults(cache_read=0.5)) as emu:
        est = df.llm.estimate("Classify: {body}", provider="anthropic", model="claude-haiku-4-5",
                              max_output_tokens=20, prices=prices)  # fmt: skip
        out = batch(df, emu, tmp_path / "reads", "anthropic", usage=True, prices=prices)
        bills = emu.ledger.billed
    assert any("no cached-input rate" in n for n in est.notes)
    assert any("no cache-write rate" in n for n in est.notes)
    by_hand = sum((b["input_tokens"] * 1.0 + b["output_tokens"] * 2.0) / 1e6 for b in bills)
    assert out["llm_cost"].sum() == pytest.approx(by_hand)  # reads at the input rate
    with serve(batch_seconds=0.1, faults=Faults(cache_write=0.3)) as emu:
        out = batch(df, emu, tmp_path / "writes", "anthropic", usage=True, prices=prices,
                    prompt="Tag: {body}")  # fmt: skip
    assert out["llm_cost"].null_count() == 10  # unknown, not 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        polars_llmbatch.spend(tmp_path)
    assert any("price list has no rate" in str(w.message) for w in caught)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_reasoning_tokens_are_output_in_the_cap_and_the_cost(tmp_path: Path, provider: str) -> None:
    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(12)]})
    with serve(batch_seconds=0.1, faults=Faults(reasoning=7)) as emu:
        out = batch(df, emu, tmp_path / "j", provider, output=["billing", "bug"], usage=True)
        bills = {b["custom_id"]: b for b in emu.ledger.billed}
    # every answer thought 7 tokens: billed as output (OpenAI reasoning_tokens inside
    # completion_tokens, Gemini thoughtsTokenCount apart, Anthropic inside output_tokens)
    assert all(b["output_tokens"] > 7 for b in bills.values())
    assert out["llm_output_tokens"].sum() == sum(b["output_tokens"] for b in bills.values())
    expected = sum(priced(b, provider, batch_rates=True) for b in bills.values())
    assert out["llm_cost"].sum() == pytest.approx(expected, rel=1e-6)
    with serve(batch_seconds=0.1, faults=Faults(reasoning=7)) as emu:
        capped = batch(df, emu, tmp_path / "cap", provider, output=["billing", "bug"],
                       usage=True, max_output_tokens=5)  # fmt: skip
    # the cap bounds thinking too: 5 tokens billed, nothing left to answer with
    assert capped["llm_output_tokens"].to_list() == [5] * 12
    assert set(capped["llm_status"]) == {"invalid_output"}
