"""reconcile_bill against the emulator's organisation reports, which it makes from its own
ledger (every call it billed, the library's or not) and prices with genai-prices on its own."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import anthropic
import openai
import polars as pl
import pytest
from helpers import MODELS, batch

import polars_llmbatch
from polars_llmbatch import LlmBatchError
from polars_llmbatch.cli import main
from polars_llmbatch.collect.bill import _model_names
from polars_llmbatch.emulator import serve

ADMIN = {"openai": "sk-admin-test", "anthropic": "sk-ant-admin01-test"}
YESTERDAY = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
TODAY = dt.datetime.now(dt.timezone.utc).date()


def frame(n: int, first: int = 0) -> pl.DataFrame:
    bodies = [f"ticket {i}: refund of {i}.50 EUR please" for i in range(first, first + n)]
    return pl.DataFrame({"body": bodies})


def bill(root: Path, emu, provider: str, **kw) -> pl.DataFrame:
    url = emu.openai_url if provider == "openai" else emu.anthropic_url
    return polars_llmbatch.reconcile_bill(
        root, provider=provider, start=YESTERDAY, admin_key=ADMIN[provider], base_url=url, **kw
    )


def outside_call(emu, provider: str) -> tuple[int, int]:
    """A sync call made with the SDK, not the library: (input, output) tokens it reported."""
    text = [{"role": "user", "content": "Classify this one by hand: app crashes"}]
    if provider == "openai":
        r = openai.OpenAI(base_url=emu.openai_url, api_key="k").chat.completions.create(
            model=MODELS["openai"], messages=text, max_completion_tokens=50
        )
        return r.usage.prompt_tokens, r.usage.completion_tokens
    m = anthropic.Anthropic(base_url=emu.anthropic_url, api_key="k").messages.create(
        model=MODELS["anthropic"], messages=text, max_tokens=50
    )
    return m.usage.input_tokens, m.usage.output_tokens


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_sync_call_outside_the_library_shows_on_its_day_model_and_tier(
    tmp_path: Path, provider: str
) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(40), emu, tmp_path / "tickets", provider, output=["billing", "bug"])
        billed_batch = sum(b["input_tokens"] for b in emu.ledger.billed)
        extra_in, extra_out = outside_call(emu, provider)
        out = bill(tmp_path, emu, provider)
    assert out["day"].unique().to_list() == [TODAY]
    rows = {r["tier"]: r for r in out.iter_rows(named=True)}
    assert set(rows) == {"batch", "sync"}
    b, s = rows["batch"], rows["sync"]
    # the jobs' batch: recorded as billed, token for token, and at the same cost
    assert b["ledger_requests"] == 40 and b["ledger_input_tokens"] == billed_batch
    assert b["diff_input_tokens"] == 0 and b["diff_output_tokens"] == 0
    assert b["billed_cost"] == pytest.approx(b["ledger_cost"], rel=0.01)
    assert b["note"] == "matches" and b["model"] == MODELS[provider]
    # the call made outside: on the bill, not in the ledger, flagged as a candidate for batch
    assert (s["ledger_input_tokens"], s["billed_input_tokens"]) == (0, extra_in)
    assert (s["diff_input_tokens"], s["diff_output_tokens"]) == (extra_in, extra_out)
    assert (
        s["diff_cost"] > 0 and s["note"] == "spend outside these jobs (sync: a candidate for batch)"
    )
    source = "cost report" if provider == "anthropic" else "cost report, split over tiers"
    assert b["cost_source"].startswith(source)


def test_results_missing_from_the_bill_are_shown_as_such(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(10), emu, tmp_path / "tickets", "openai", output=["billing", "bug"])
        emu.ledger._bills.clear()  # the report has not caught up yet
        out = bill(tmp_path, emu, "openai")
    (row,) = out.iter_rows(named=True)
    assert row["ledger_requests"] == 10 and row["billed_input_tokens"] == 0
    assert (
        row["note"].startswith("not on the bill") and row["cost_source"] == "no bill for this row"
    )


def test_only_jobs_against_the_same_base_url_and_provider_count(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as first:
        batch(frame(5), first, tmp_path / "elsewhere", "openai", output=["billing", "bug"])
    with serve(batch_seconds=0.1) as emu:
        batch(frame(6), emu, tmp_path / "here", "openai", output=["billing", "bug"])
        batch(frame(7), emu, tmp_path / "claude", "anthropic", output=["billing", "bug"])
        out = bill(tmp_path, emu, "openai")
    assert out["ledger_requests"].to_list() == [6] and out["note"].to_list() == ["matches"]


def test_a_long_range_is_read_page_by_page(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(3), emu, tmp_path / "t", "anthropic", output=["billing", "bug"])
        out = polars_llmbatch.reconcile_bill(
            tmp_path, provider="anthropic", start=TODAY - dt.timedelta(days=70),
            end=TODAY + dt.timedelta(days=1), admin_key=ADMIN["anthropic"],
            base_url=emu.anthropic_url,
        )  # fmt: skip
    assert out.height == 1 and out["note"].item() == "matches"  # today's bucket is on page 3


def test_keys_and_providers_that_cannot_be_reconciled(tmp_path: Path) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(3), emu, tmp_path / "t", "openai", output=["billing", "bug"])
        with pytest.raises(LlmBatchError, match="OPENAI_ADMIN_KEY") as err:
            polars_llmbatch.reconcile_bill(
                tmp_path, provider="openai", start=YESTERDAY, base_url=emu.openai_url, env={}
            )
        with pytest.raises(LlmBatchError, match="need an admin key") as err:
            polars_llmbatch.reconcile_bill(
                tmp_path, provider="openai", start=YESTERDAY, admin_key="sk-proj-secret123",
                base_url=emu.openai_url,
            )  # fmt: skip
        assert "sk-proj-secret123" not in str(err.value)
        via_env = polars_llmbatch.reconcile_bill(
            tmp_path, provider="openai", start=YESTERDAY, base_url=emu.openai_url,
            env={"OPENAI_ADMIN_KEY": ADMIN["openai"]},
        )  # fmt: skip
        assert via_env.height == 1
    with pytest.raises(LlmBatchError, match="Cloud Billing"):
        polars_llmbatch.reconcile_bill(tmp_path, provider="gemini", start=YESTERDAY)
    with pytest.raises(LlmBatchError, match="must be after"):
        polars_llmbatch.reconcile_bill(tmp_path, provider="openai", start=TODAY, end=YESTERDAY)
    with pytest.raises(LlmBatchError, match="must be a date"):
        polars_llmbatch.reconcile_bill(tmp_path, provider="openai", start="last week")


def test_snapshot_names_match_the_model_asked_for() -> None:
    name = _model_names(["gpt-4o-mini", "claude-haiku-4-5"])
    assert name("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert name("claude-haiku-4-5-20251001") == "claude-haiku-4-5"
    assert name("gpt-4o-mini") == "gpt-4o-mini"
    assert name("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"  # another model stays itself


def test_the_cli_reconciles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(4), emu, tmp_path / "t", "openai", output=["billing", "bug"])
        outside_call(emu, "openai")
        monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN["openai"])
        code = main(["spend", str(tmp_path), "--reconcile", "openai", "--start",
                     YESTERDAY.isoformat(), "--base-url", emu.openai_url, "--json"])  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    notes = {r["tier"]: r["note"] for r in rows}
    assert notes == {
        "batch": "matches",
        "sync": "spend outside these jobs (sync: a candidate for batch)",
    }


def test_spend_as_billed_per_tag(tmp_path: Path) -> None:
    """The savings a finance owner asks for: paid vs the same tokens at sync rates, as the
    provider billed them; a call outside the jobs is never put on them."""
    with serve(batch_seconds=0.1) as emu:
        batch(frame(30), emu, tmp_path / "a", "openai", output=["billing", "bug"],
              tags={"team": "support"})  # fmt: skip
        batch(frame(12, first=100), emu, tmp_path / "b", "openai", output=["billing", "bug"],
              tags={"team": "growth"}, mode="sync")  # fmt: skip
        outside_call(emu, "openai")
        reconciled = bill(tmp_path, emu, "openai")
    plain = polars_llmbatch.spend(tmp_path, by="tag:team").sort("team")
    billed = polars_llmbatch.spend(tmp_path, by="tag:team", bill=reconciled).sort("team")
    assert billed["bill_coverage"].to_list() == pytest.approx([1.0, 1.0])
    # the emulator's own prices agree with the library's: as billed ≈ as recorded
    for col, ref in (("billed_cost", "cost"), ("billed_cost_at_sync", "cost_at_sync")):
        assert billed[col].to_list() == pytest.approx(plain[ref].to_list(), rel=0.01)
    growth = billed.filter(pl.col("team") == "growth").row(0, named=True)
    assert growth["billed_savings"] == pytest.approx(0.0, abs=1e-12)  # sync saves nothing
    support = billed.filter(pl.col("team") == "support").row(0, named=True)
    assert support["billed_savings"] == pytest.approx(support["billed_cost"], rel=0.01)
    # a provider that charged twice its list price for the batch cell: that job's billed cost
    # doubles, the other job's does not move
    doubled = reconciled.with_columns(
        pl.when(pl.col("tier") == "batch").then(pl.col("billed_cost") * 2).otherwise(
            pl.col("billed_cost")).alias("billed_cost")
    )  # fmt: skip
    twice = polars_llmbatch.spend(tmp_path, by="tag:team", bill=doubled).sort("team")
    assert twice["billed_cost"][1] == pytest.approx(2 * billed["billed_cost"][1])
    assert twice["billed_cost"][0] == pytest.approx(billed["billed_cost"][0])


def test_the_cli_gives_savings_as_billed_by_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(batch_seconds=0.1) as emu:
        batch(frame(8), emu, tmp_path / "t", "openai", output=["billing", "bug"],
              tags={"team": "support"})  # fmt: skip
        monkeypatch.setenv("OPENAI_ADMIN_KEY", ADMIN["openai"])
        code = main(["spend", str(tmp_path), "--reconcile", "openai", "--start",
                     YESTERDAY.isoformat(), "--base-url", emu.openai_url, "--by", "tag:team",
                     "--json"])  # fmt: skip
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["team"] == "support" and row["bill_coverage"] == pytest.approx(1.0)
    assert row["billed_savings"] == pytest.approx(row["savings"], rel=0.01)
