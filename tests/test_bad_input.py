"""Bad input that used to get through: each is a clear error naming the problem and the fix,
before anything is sent (nothing billed, no checkpoint written)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from polars_llmbatch.emulator import serve
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.estimate import _usd
from tests.helpers import batch

DF = pl.DataFrame({"id": ["a", "b"], "body": ["a refund", "a crash"]})


@pytest.fixture(scope="module")
def emu():
    with serve(batch_seconds=0.05) as emu:
        yield emu


def refused(emu, tmp_path: Path, match: str, df: pl.DataFrame = DF, **kw) -> None:
    before = len(emu.ledger.billed), len(emu.ledger.batches), len(emu.ledger.uploads)
    with pytest.raises(LlmBatchError, match=match):
        batch(df, emu, tmp_path / "j", **kw)
    assert (len(emu.ledger.billed), len(emu.ledger.batches), len(emu.ledger.uploads)) == before
    assert not (tmp_path / "j" / "job.json").exists()


def embed(emu, tmp_path: Path, text: str, model: str = "text-embedding-3-small"):
    return DF.llm.embed(
        text,
        provider="openai",
        model=model,
        checkpoint=tmp_path / "e",
        api_key="k",
        base_url=emu.openai_url,
        progress=False,
    )


def test_embedding_a_misspelled_column_is_an_unknown_column(emu, tmp_path: Path) -> None:
    with pytest.raises(LlmBatchError, match=r"'bodyy' is not a column.*did you mean 'body'"):
        embed(emu, tmp_path, "bodyy")
    with pytest.raises(LlmBatchError, match="names no column"):
        embed(emu, tmp_path, "a fixed text")
    assert not (tmp_path / "e").exists()


def test_a_bare_word_prompt_that_is_no_column_is_refused(emu, tmp_path: Path) -> None:
    refused(emu, tmp_path, r"'bdy' is not a column.*did you mean 'body'", prompt="bdy")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stop": 5}, "stop must be a string or a non-empty list"),
        ({"stop": []}, "stop must be a string or a non-empty list"),
        ({"concurrency": 0}, "concurrency= must be a positive integer"),
        ({"concurrency": 2.5}, "concurrency= must be a positive integer"),
        ({"temperature": 5.0}, "temperature must be a number from 0 to 2"),
        ({"temperature": float("nan")}, "temperature must be a number from 0 to 2"),
        ({"top_p": -1}, "top_p must be a number from 0 to 1"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"poll_interval": 0}, "poll_interval= must be a finite number of seconds > 0"),
        ({"poll_interval": float("inf")}, "poll_interval= must be a finite number"),
        ({"wait": "no"}, "wait= must be True or False"),
        ({"output": ["billing"]}, "give at least two"),
        ({"checkpoint": "s3://bucket"}, "needs a bucket and a prefix"),
        ({"checkpoint": "ftp://b/x"}, "not an object store"),
    ],
)
def test_every_option_is_checked_for_type_and_range(emu, tmp_path: Path, kw, match) -> None:
    refused(emu, tmp_path, match, **kw)
    assert not Path("s3:").exists() and not Path("gs:").exists()


def test_a_checkpoint_that_is_a_file_is_refused(emu, tmp_path: Path) -> None:
    (tmp_path / "j").write_text("notes")
    with pytest.raises(LlmBatchError, match="is a file; a checkpoint is a folder"):
        batch(DF, emu, tmp_path / "j")


def test_an_id_column_with_nulls_says_nulls(emu, tmp_path: Path) -> None:
    df = pl.DataFrame({"id": ["a", None, None], "body": ["x", "y", "z"]})
    refused(emu, tmp_path, r"id= column 'id' has 2 null value\(s\), first at row 1", df=df, id="id")


def test_json_braces_in_a_prompt_get_the_double_brace_hint(emu, tmp_path: Path) -> None:
    refused(
        emu, tmp_path, r"double them: '\{\{' and '\}\}'", prompt='Answer as {"label": ...}: {body}'
    )


def test_a_changed_prompt_on_an_old_checkpoint_says_the_prompt_changed(emu, tmp_path) -> None:
    batch(DF, emu, tmp_path / "j", output="answer")
    with pytest.raises(LlmBatchError, match=r"another prompt \('Classify: \{body\}' there"):
        batch(DF, emu, tmp_path / "j", output="answer", prompt="Summarise: {body}")
    with pytest.raises(LlmBatchError, match="rows were added, removed or changed"):
        batch(DF.head(1), emu, tmp_path / "j", output="answer")


def test_tiny_amounts_print_their_digits() -> None:
    assert _usd(0.0000001) == "$0.0000001"
    assert _usd(0.000123) == "$0.000123"
    assert _usd(0.5) == "$0.5" and _usd(12.345) == "$12.35" and _usd(0) == "$0"


@pytest.mark.parametrize(
    ("provider", "model", "hint"),
    [
        ("openai", "gpt-4o-mnii", "gpt-4o-mini"),
        ("anthropic", "claude-haiku-45", "claude-haiku-4-5"),
        ("gemini", "gemini-2.5-flsh", "gemini-2.5-flash"),
    ],
)
def test_an_unknown_model_says_did_you_mean(emu, tmp_path: Path, provider, model, hint) -> None:
    refused(
        emu,
        tmp_path,
        f"unknown {provider} model '{model}'.*did you mean '{hint}'",
        provider=provider,
        model=model,
    )
    est = DF.llm.estimate("x {body}", provider=provider, model=model, max_output_tokens=5)
    assert any(f"did you mean '{hint}'" in n for n in est.notes)


def test_a_model_of_the_wrong_kind_is_refused(emu, tmp_path: Path) -> None:
    refused(
        emu, tmp_path, "is an embedding model; use df.llm.embed", model="text-embedding-3-small"
    )
    with pytest.raises(LlmBatchError, match="is not an embedding model"):
        embed(emu, tmp_path, "body", model="gpt-4o-mini")
    assert not (tmp_path / "e").exists()


PRICES = {"input": 1.0, "output": 2.0}


def test_the_emulator_refuses_an_unknown_model_like_the_real_apis(tmp_path: Path) -> None:
    from polars_llmbatch.run.transport import ProviderError

    # prices= lets an uncatalogued model through the library; the service then refuses it.
    with serve(batch_seconds=0.05) as emu:
        out = batch(DF, emu, tmp_path / "o", model="gpt-4o-mnii", prices=PRICES, output="a")
        assert set(out["llm_status"]) == {"errored"}
        assert "does not exist" in out["llm_error"][0]
        with pytest.raises(ProviderError, match=r"HTTP 404.*does not exist"):
            batch(
                DF, emu, tmp_path / "s", model="gpt-4o-mnii", prices=PRICES, output="a", mode="sync"
            )
        with pytest.raises(ProviderError, match=r"HTTP 404.*not found"):
            batch(
                DF,
                emu,
                tmp_path / "g",
                provider="gemini",
                model="gemini-2.5-flsh",
                prices=PRICES,
                output="a",
            )
        out = batch(
            DF,
            emu,
            tmp_path / "a",
            provider="anthropic",
            model="claude-haiku-45",
            prices=PRICES,
            output="a",
        )
        assert set(out["llm_status"]) == {"errored"} and "not found" in out["llm_error"][0]
        assert emu.ledger.billed == []


def test_a_wait_timeout_that_is_no_duration_is_refused(emu, tmp_path: Path) -> None:
    import polars_llmbatch

    batch(DF, emu, tmp_path / "j", output="answer")
    job = polars_llmbatch.Job.open(tmp_path / "j", api_key="k", base_url=emu.openai_url)
    for bad in (float("nan"), -1, "soon"):
        with pytest.raises(LlmBatchError, match="timeout= must be a finite number of seconds"):
            job.wait(timeout=bad)
    with pytest.raises(LlmBatchError, match="poll_interval= must be"):
        polars_llmbatch.Job.open(tmp_path / "j", poll_interval=0)
