"""Bad input to df.llm.batch: a clear error, before anything is sent or written."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch import BudgetExceededError, LlmBatchError
from polars_llmbatch.emulator import serve

CATS = ["billing", "bug"]


@pytest.fixture
def emu():
    with serve(batch_seconds=0.1) as emu:
        yield emu


def batch(df: pl.DataFrame, emu, ckpt: Path, **kw):
    args = dict(
        provider="openai",
        model="gpt-4o-mini",
        output=CATS,
        checkpoint=ckpt,
        api_key="sk-secret-key-123",
        base_url=emu.openai_url,
        progress=False,
        poll_interval=0.02,
    )
    args.update(kw)
    return df.llm.batch("Classify: {body}", **args)


DF = pl.DataFrame({"body": ["refund", "crash"]})


def nothing_sent(emu) -> bool:
    ledger = emu.ledger
    return not ledger.uploads and not ledger.batches


def test_missing_key_names_the_variable(emu, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LlmBatchError, match="set OPENAI_API_KEY"):
        batch(DF, emu, tmp_path / "j", api_key=None)
    assert nothing_sent(emu) and not (tmp_path / "j").exists()


def test_unknown_provider(emu, tmp_path: Path) -> None:
    with pytest.raises(LlmBatchError, match="unknown provider 'openia'"):
        batch(DF, emu, tmp_path / "j", provider="openia")
    assert nothing_sent(emu)


def test_over_budget_sends_and_writes_nothing(emu, tmp_path: Path) -> None:
    with pytest.raises(BudgetExceededError, match="over max_cost"):
        batch(DF, emu, tmp_path / "j", max_cost=1e-9, max_output_tokens=10)
    with pytest.raises(BudgetExceededError, match="unbounded"):
        batch(DF, emu, tmp_path / "j", max_cost=1.0)
    assert nothing_sent(emu) and not (tmp_path / "j").exists()


def test_checkpoint_of_another_spec_or_other_rows_is_refused(emu, tmp_path: Path) -> None:
    batch(DF, emu, tmp_path / "j")
    with pytest.raises(LlmBatchError, match=r"different spec \(model: 'gpt-4o-mini' there"):
        batch(DF, emu, tmp_path / "j", model="gpt-4.1-mini")
    with pytest.raises(LlmBatchError, match="same spec over different rows"):
        batch(pl.DataFrame({"body": ["other"]}), emu, tmp_path / "j")
    with pytest.raises(LlmBatchError, match="runs in batch mode, not sync"):
        batch(DF, emu, tmp_path / "j", mode="sync")
    assert len(emu.ledger.batches) == 1


def test_unwritable_checkpoint(emu, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LlmBatchError, match="is not writable"):
        batch(DF, emu, tmp_path / "a-file" / "job")
    assert nothing_sent(emu)


def test_a_folder_with_other_files_is_refused(emu, tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "notes.txt").write_text("mine")
    with pytest.raises(LlmBatchError, match="other files in it"):
        batch(DF, emu, tmp_path / "j")
    assert nothing_sent(emu)


def test_output_columns_must_not_clash(emu, tmp_path: Path) -> None:
    df = DF.with_columns(pl.lit("x").alias("label"))
    with pytest.raises(LlmBatchError, match=r"already has column\(s\) \['label'\]"):
        batch(df, emu, tmp_path / "j")
    assert nothing_sent(emu)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "fast"}, "mode= must be"),
        ({"max_attempts": 0}, "max_attempts= must be a positive integer"),
        ({"tags": {"team": 1}}, "tags= must map strings to strings"),
        ({"max_shard_requests": 60_000}, "over the provider's limit"),
    ],
)
def test_bad_options(emu, tmp_path: Path, kw, message: str) -> None:
    with pytest.raises(LlmBatchError, match=message):
        batch(DF, emu, tmp_path / "j", **kw)
    assert nothing_sent(emu)


def test_the_key_is_never_written_or_shown(emu, tmp_path: Path) -> None:
    job = batch(DF, emu, tmp_path / "j", wait=False)
    job.wait()
    for f in (tmp_path / "j").rglob("*"):
        if f.is_file():
            assert b"sk-secret-key-123" not in f.read_bytes(), f
    assert "sk-secret" not in repr(job) + job._repr_html_() + repr(job.status())
    assert "sk-secret" not in repr(job._t)


def test_job_open_on_a_non_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(LlmBatchError, match="not a polars_llmbatch checkpoint"):
        polars_llmbatch.Job.open(tmp_path, api_key="k")


def test_credentials_on_an_explicit_provider_object(emu, tmp_path: Path) -> None:
    from polars_llmbatch.providers import OpenAI

    prov = OpenAI(api_key="sk-secret-key-123", base_url=emu.openai_url)
    assert "sk-secret" not in repr(prov)
    out = DF.llm.batch(
        "Classify: {body}",
        provider=prov,
        model="gpt-4o-mini",
        output=CATS,
        checkpoint=tmp_path / "j",
        progress=False,
        poll_interval=0.02,
    )
    assert set(out["llm_status"]) == {"succeeded"} and len(emu.ledger.batches) == 1
