"""df.llm.batch / embed end to end against the emulator's Anthropic and Gemini batch APIs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from helpers import batch

from polars_llmbatch.emulator import Faults, model, serve
from polars_llmbatch.providers import gemini

CATS = ["billing", "bug", "feature", "other"]


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"body": [f"ticket {i}: {'refund' if i % 3 else 'crash'}" for i in range(n)]}
    )


def run(df: pl.DataFrame, emu, provider: str, ckpt: Path, **kw):
    return batch(df, emu, ckpt, provider, **{"output": CATS, **kw})


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_enum_struct_and_text_land_on_the_right_rows(tmp_path: Path, provider: str) -> None:
    df = frame(120)
    with serve(batch_seconds=0.2) as emu:
        out = run(df, emu, provider, tmp_path / "enum", max_shard_requests=50)
        struct = run(
            df.head(10),
            emu,
            provider,
            tmp_path / "struct",
            output={"category": pl.Enum(CATS), "urgency": pl.Int64, "summary": pl.String},
        )
        text = run(df.head(5), emu, provider, tmp_path / "text", output="answer")
        assert len(emu.ledger.batches) == 5 and not emu.ledger.billed_twice()
    expected = [model.enum_pick(f"Classify: {b}", "label", CATS) for b in df["body"]]
    assert out.schema["label"] == pl.Enum(CATS)
    assert out["label"].cast(pl.String).to_list() == expected
    assert set(out["llm_status"]) == {"succeeded"}
    assert struct.schema["urgency"] == pl.Int64 and set(struct["llm_status"]) == {"succeeded"}
    assert struct["summary"][1] == "summary for: Classify: ticket 1: refund"
    assert text["answer"][0] == "Emulated answer to: Classify: ticket 0: crash"


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "file"])
def test_gemini_embeddings_inline_and_file(
    tmp_path: Path, inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not inline:
        monkeypatch.setattr(gemini, "INLINE_MAX_BYTES", 100)  # every shard is uploaded
    df = pl.DataFrame({"title": ["red shoes", "blue hat", "red shoes", None]})
    with serve(batch_seconds=0.1) as emu:
        out = df.llm.embed(
            "title",
            provider="gemini",
            model="gemini-embedding-001",
            dimensions=8,
            checkpoint=tmp_path / "emb",
            api_key="k",
            base_url=emu.gemini_url,
            progress=False,
            poll_interval=0.02,
            usage=True,
        )
        assert bool(emu.ledger.uploads) is not inline
    assert out.schema["embedding"] == pl.Array(pl.Float32, 8)
    assert out["embedding"][1].to_list() == pytest.approx(model.embedding("blue hat", 8), rel=1e-6)
    assert out["llm_status"].to_list() == ["succeeded", "succeeded", "succeeded", "skipped"]
    assert out["llm_input_tokens"][0] > 0


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
@pytest.mark.parametrize(
    "faults",
    [
        Faults(rate_limit_creates=2),
        Faults(read_errors=3),
        Faults(duplicates=0.3, seed=1),
        Faults(drop_downloads=1),
    ],
    ids=["rate_limit_creates", "read_errors", "duplicates", "drop_downloads"],
)
def test_transient_faults(tmp_path: Path, provider: str, faults: Faults) -> None:
    with serve(batch_seconds=0.1, faults=faults) as emu:
        out = run(frame(40), emu, provider, tmp_path / "j")
        assert len(emu.ledger.batches) == 1 and not emu.ledger.billed_twice()
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_expired_requests_are_retried(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=0.1, faults=Faults(expire_at=0.5, fault_batches=1)) as emu:
        out = run(frame(40), emu, provider, tmp_path / "j")
        sizes = [b["requests"] for b in emu.ledger.batches]
        assert not emu.ledger.billed_twice()
    # Anthropic returns the expired half; Gemini returns nothing for an expired batch.
    assert sizes == ([40, 20] if provider == "anthropic" else [40, 40])
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize(
    ("provider", "faults"),
    [
        ("anthropic", Faults(missing=0.3, seed=3, fault_batches=1)),
        ("anthropic", Faults(malformed=0.3, seed=4, fault_batches=1)),
        ("gemini", Faults(missing=0.3, seed=3, fault_batches=1)),
    ],
    ids=["anthropic-missing", "anthropic-malformed", "gemini-missing"],
)
def test_lost_results_are_bought_again_once(tmp_path: Path, provider: str, faults: Faults) -> None:
    with serve(batch_seconds=0.1, faults=faults) as emu:
        out = run(frame(40), emu, provider, tmp_path / "j")
        sizes = [b["requests"] for b in emu.ledger.batches]
        assert len(sizes) == 2 and 0 < sizes[1] < 40
        assert len(emu.ledger.billed_twice()) == sizes[1]  # only the lost ones, once more
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_errors_keep_the_message(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=0.1, faults=Faults(request_errors=0.25, seed=2)) as emu:
        out = run(frame(40), emu, provider, tmp_path / "j")
        assert len(emu.ledger.batches) == 1
    errored = out.filter(pl.col("llm_status") == "errored")
    assert errored.height > 0 and errored["llm_error"].str.contains("request_errors").all()


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_queue_limit_on_create_resubmits_smaller(
    tmp_path: Path, provider: str, instant_backoff: list[float]
) -> None:
    waits = instant_backoff  # the transport's backoff, recorded without the wait
    # Over the limit, a create is refused with a 429: the shard comes back in halves.
    with serve(batch_seconds=0.1, faults=Faults(queue_limit_tokens=250)) as emu:
        out = run(frame(40), emu, provider, tmp_path / "j")
        sizes = [b["requests"] for b in emu.ledger.batches]
    assert max(sizes) <= 20 and sum(sizes) == 40
    assert waits  # each refused create was retried with backoff before the shard was split
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_sync_mode_matches_batch(tmp_path: Path, provider: str) -> None:
    df = frame(12)
    with serve(batch_seconds=0.1) as emu:
        batch = run(df, emu, provider, tmp_path / "b")
        sync = run(df, emu, provider, tmp_path / "s", mode="sync")
        assert len(emu.ledger.batches) == 1
    assert batch.equals(sync)
