"""Calibrated input tokens (``calibrate=``) against the emulator's count endpoints, whose
tokenizers the library cannot know offline (emulator/tokenizers.py): the expected totals are
what the emulator bills, in its ledger, never the library's own count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anthropic
import polars as pl
import pytest
from google import genai
from helpers import MODELS, batch, url_for

from polars_llmbatch import BudgetExceededError, LlmBatchError
from polars_llmbatch.cli import main
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.emulator.tokenizers import family
from polars_llmbatch.plan import calibrate as calibrate_module
from polars_llmbatch.plan.estimate import estimate
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.sample import varied

PROMPT = "Summarise in one line: {text}"


def o200k(text: str) -> int:
    return len(get_encoding("o200k_base").encode_ordinary(text))


def billed_input(emu) -> int:
    return sum(b["input_tokens"] for b in emu.ledger.billed)


def test_the_emulated_tokenizers_by_hand() -> None:
    """Each family is o200k plus one token per N characters of a class (per text, rounded
    down): checked here by counting the classes by hand."""
    claude = family("anthropic", "claude-haiku-4-5")
    text = "abcdefghij" * 6 + "\n12345678901234567\n"  # 60 lowercase, 2 newlines, 17 digits
    assert claude.count(text) == o200k(text) + 60 // 30 + 2 + 17 // 9
    gem = family("gemini", "gemini-2.5-flash")
    assert gem.count("ORDER 123456789012 PAID") == o200k("ORDER 123456789012 PAID") + 12 // 12
    assert family("anthropic", "claude-opus-4-7").name == "claude-v4.7"
    assert family("anthropic", "claude-sonnet-5").name == "claude-v5"
    assert family("gemini", "models/gemini-3-flash-preview").name == "gemini-3"


def test_count_endpoints_speak_the_sdks_and_match_what_is_billed() -> None:
    with serve() as emu:
        a = anthropic.Anthropic(base_url=emu.anthropic_url, api_key="k")
        msg = [{"role": "user", "content": "Tag this: refund of 12.50 EUR\nplease"}]
        counted = a.messages.count_tokens(
            model="claude-haiku-4-5", system="Answer briefly.", messages=msg
        )
        made = a.messages.create(
            model="claude-haiku-4-5", system="Answer briefly.", messages=msg, max_tokens=20
        )
        assert counted.input_tokens == made.usage.input_tokens
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            a.messages.count_tokens(
                model="claude-haiku-4-5", messages=msg, extra_body={"max_tokens": 20}
            )

        g = genai.Client(api_key="k", http_options={"base_url": emu.gemini_url})
        text = "Invoice 2026-11-30 TXN00001234 SEPA 450.00 EUR"
        n = g.models.count_tokens(model="gemini-2.5-flash", contents=text).total_tokens
        made = g.models.generate_content(model="gemini-2.5-flash", contents=text)
        assert n == made.usage_metadata.prompt_token_count
        assert emu.ledger.counts == {"anthropic": 1, "gemini": 1}  # counted, never billed
        assert len(emu.ledger.billed) == 2  # the two real calls


@pytest.mark.parametrize(
    ("provider", "kind"), [("anthropic", "json"), ("anthropic", None), ("gemini", "numbers")]
)
def test_calibrated_estimate_is_within_two_percent_of_the_bill(
    tmp_path: Path, provider: str, kind: str | None
) -> None:
    """On a mix of texts, and on one kind the offline ratio misjudges (JSON for Claude,
    digits for Gemini)."""
    df = varied(3_000 if kind is None else 6_000, seed=1)
    if kind is not None:
        df = df.filter(pl.col("kind") == kind)
    with serve(batch_seconds=0.2) as emu:
        kw = dict(
            provider=provider,
            model=MODELS[provider],
            max_output_tokens=30,
            api_key="k",
            base_url=url_for(emu, provider),
        )
        offline = df.llm.estimate(PROMPT, provider=provider, model=MODELS[provider],
                                  max_output_tokens=30)  # fmt: skip
        est = df.llm.estimate(PROMPT, **kw, calibrate=True)
        assert emu.ledger.counts[provider] == calibrate_module.SAMPLE
        assert not emu.ledger.billed and not emu.ledger.batches  # counting is free
        out = batch(df, emu, tmp_path / "job", provider, prompt=PROMPT, max_output_tokens=30)
        billed = billed_input(emu)
    assert set(out["llm_status"]) == {"succeeded"}
    error = abs(est.input_tokens - billed) / billed
    assert error <= 0.02, (est.input_tokens, billed)
    assert abs(est.input_tokens - billed) <= est.input_tokens_error  # the interval holds it
    assert est.input_tokens_error / est.input_tokens < 0.03
    assert est.calibration["requests"] == 200 and not est.calibration["exact"]
    assert "calibrated: a stratified sample of 200" in est.input_method
    assert not any("no offline tokenizer" in n for n in est.notes)
    # the offline approximation was further off (where the kind misleads it), and the worst
    # case still bounds the bill
    if kind is not None:
        assert abs(offline.input_tokens - billed) / billed > max(0.03, error)
    assert est.input_tokens_worst >= billed and offline.input_tokens_worst >= billed


def test_a_job_no_bigger_than_the_sample_is_counted_exactly() -> None:
    df = varied(150, seed=2)
    with serve() as emu:
        est = df.llm.estimate(
            PROMPT,
            provider="anthropic",
            model="claude-opus-4-7",
            max_output_tokens=30,
            system="You are terse.",
            output=["short", "long"],
            api_key="k",
            base_url=emu.anthropic_url,
            calibrate=True,
        )
        assert emu.ledger.counts["anthropic"] == 150
    fam = family("anthropic", "claude-opus-4-7")
    by_hand = sum(
        fam.frame
        + fam.per_system
        + fam.count("You are terse.")
        + fam.per_schema
        + fam.count(PROMPT.replace("{text}", t))
        for t in df["text"]
    )
    assert est.input_tokens == by_hand and est.input_tokens_error == 0
    assert est.calibration["exact"] and "every request" in est.input_method


def test_rate_limited_counts_wait_and_go_on() -> None:
    df = varied(400, seed=3)
    for provider in ("anthropic", "gemini"):
        with serve(faults=Faults(rate_limit_counts=5)) as emu:
            est = df.llm.estimate(
                PROMPT,
                provider=provider,
                model=MODELS[provider],
                max_output_tokens=10,
                api_key="k",
                base_url=url_for(emu, provider),
                calibrate=50,
            )
            assert emu.ledger.counts[provider] == 50  # the 5 refused calls were sent again
        assert est.calibration["requests"] == 50


def test_a_refused_count_says_so_before_anything_is_sent(tmp_path: Path) -> None:
    df = varied(300, seed=4)
    with serve() as emu:
        with pytest.raises(LlmBatchError, match=r"calibrate: .*HTTP 404.*nothing was sent"):
            batch(
                df,
                emu,
                tmp_path / "job",
                "anthropic",
                prompt=PROMPT,
                model="claude-nonexistent-1",
                prices={"input": 1.0, "output": 1.0},
                calibrate=True,
            )
        assert not emu.ledger.batches and not emu.ledger.billed
    with pytest.raises(LlmBatchError, match="ANTHROPIC_API_KEY"):
        df.llm.estimate(
            PROMPT, provider="anthropic", model=MODELS["anthropic"], max_output_tokens=5,
            calibrate=True,
        )  # fmt: skip
    with pytest.raises(LlmBatchError, match="calibrate= takes True"):
        df.llm.estimate(PROMPT, provider="openai", model="gpt-4o-mini", calibrate=3)


def test_openai_and_gemini_embeddings_have_nothing_to_count() -> None:
    df = varied(100, seed=5)
    with serve() as emu:
        est = df.llm.estimate(
            PROMPT,
            provider="openai",
            model="gpt-4o-mini",
            api_key="k",
            base_url=emu.openai_url,
            calibrate=True,
        )
        emb = df.llm.estimate(
            "{text}",
            provider="gemini",
            model="gemini-embedding-001",
            task="embed",
            api_key="k",
            base_url=emu.gemini_url,
            calibrate=True,
        )
        assert not emu.ledger.counts
    assert est.calibration is None and any("tokenizer is public" in n for n in est.notes)
    assert emb.calibration is None and any("no token-count endpoint" in n for n in emb.notes)


def test_a_sample_above_the_offline_bound_raises_every_bound() -> None:
    """A provider that counts 3x the offline approximation (beyond its band): the worst case
    that max_cost is checked on grows with it; calibration never lowers it."""
    df = varied(500, seed=6)
    p = prepare(df, PROMPT, provider="anthropic", model="claude-haiku-4-5",
                options={"max_output_tokens": 10})  # fmt: skip
    plain = estimate(p, exact=True)
    enc = get_encoding("o200k_base")

    def triple(bodies: list[dict]) -> list[int]:
        return [3 * len(enc.encode_ordinary(b["messages"][0]["content"])) + 30 for b in bodies]

    cal = estimate(p, exact=True, count=triple, calibrate_sample=100)
    est = cal.estimate
    assert est.calibration["worst_factor"] > 1.5
    assert est.input_tokens_worst >= plain.estimate.input_tokens_worst * 1.5
    assert (cal.worst_tokens >= plain.worst_tokens).all()
    assert any("above its offline upper bound" in n for n in est.notes)
    budget = (plain.estimate.worst_cost_batch + est.worst_cost_batch) / 2
    plain.estimate.check_budget(budget)  # would have passed offline
    with pytest.raises(BudgetExceededError):
        est.check_budget(budget)


def test_the_ratio_estimator_on_known_populations() -> None:
    """Hand-made populations: a constant ratio is found exactly; a ratio that differs by
    stratum is found by the strata, with an interval that covers the true total."""
    n = 5_000
    bodies = pl.Series([json.dumps({"i": i}) for i in range(n)])
    x = pl.Series([float(5 + i % 400) for i in range(n)])
    cal = calibrate_module.calibrate(
        bodies, x, x * 2, lambda bs: [3 * (5 + b["i"] % 400) for b in bs]
    )
    assert math.isclose(cal.ratio, 3.0) and math.isclose(cal.total, 3 * x.sum())
    assert cal.ci95 == pytest.approx(0.0, abs=1e-6) and cal.worst_factor == 1.5

    # long requests count 1.5x, short ones 1.0x: one overall ratio would be biased
    def count(bs: list[dict]) -> list[int]:
        return [int((5 + b["i"] % 400) * (1.5 if b["i"] % 400 > 200 else 1.0)) for b in bs]

    truth = sum(count([{"i": i} for i in range(n)]))
    cal = calibrate_module.calibrate(bodies, x, x * 2, count, sample=200, seed=7)
    assert abs(cal.total - truth) <= cal.ci95 and abs(cal.total - truth) / truth < 0.02


def test_batch_records_the_calibration_and_a_rerun_counts_nothing(tmp_path: Path) -> None:
    df = varied(600, seed=8)
    with serve(batch_seconds=0.1) as emu:
        run = dict(prompt=PROMPT, max_output_tokens=20, calibrate=100)
        batch(df, emu, tmp_path / "job", "gemini", **run)
        assert emu.ledger.counts["gemini"] == 100
        batch(df, emu, tmp_path / "job", "gemini", **run)  # reattaches: no new counts
        assert emu.ledger.counts["gemini"] == 100
        billed = billed_input(emu)
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["estimate"]["calibration"]["requests"] == 100
    assert abs(job["estimate"]["input_tokens"] - billed) / billed < 0.02


def test_the_cli_calibrates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    varied(300, seed=9).write_parquet(tmp_path / "t.parquet")
    with serve() as emu:
        args = ["estimate", str(tmp_path / "t.parquet"), "--prompt", PROMPT,
                "--provider", "anthropic", "--model", "claude-haiku-4-5",
                "--max-output-tokens", "10", "--api-key", "k", "--base-url", emu.anthropic_url]  # fmt: skip
        assert main([*args, "--calibrate", "--json"]) == 0
        assert emu.ledger.counts["anthropic"] == 200
        shown = json.loads(capsys.readouterr().out)
        assert shown["calibration"]["requests"] == 200
        assert main([*args, "--calibrate", "40"]) == 0
        assert emu.ledger.counts["anthropic"] == 240
        assert "calibrated: a stratified sample of 40" in capsys.readouterr().out


def test_a_small_sample_uses_the_same_strata_for_the_sample_and_the_job() -> None:
    """calibrate=10 draws from 5 strata (two in each), and the job's totals are taken per
    those same 5 strata (one definition, in plan/sampling.py)."""
    n = 1_000
    bodies = pl.Series([json.dumps({"i": i}) for i in range(n)])
    x = pl.Series([float(1 + i) for i in range(n)])

    def count(bs: list[dict]) -> list[int]:  # long requests count 3x, short ones 1x
        return [(1 + b["i"]) * (3 if b["i"] >= n // 2 else 1) for b in bs]

    truth = sum(count([{"i": i} for i in range(n)]))
    cal = calibrate_module.calibrate(bodies, x, x * 5, count, sample=10, seed=3)
    assert cal.requests == 10
    assert abs(cal.total - truth) / truth < 0.05
