"""A huge job's result is joined on disk (collect/spill.py) and gives what the in-memory join
gives on the same rows: every row its own answer, status, error, tokens and cost, in the input's
order, however its rows are cut into buckets and chunks; and each row gets the answer to its
own text even when the plan gives its rows in another order each time."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
import polars_llmbatch.run.job as job_module
from polars_llmbatch.collect import spill
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.errors import LlmBatchError
from tests.helpers import StepClock, batch

BODIES = [f"ticket {i % 37} {'é' * (i % 3)}" for i in range(300)] + [None, "ticket 1 "]


@pytest.fixture
def tiny_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many buckets and chunks on a few hundred rows (and chunks that cut across buckets)."""
    monkeypatch.setattr(spill, "BUCKET_ROWS", 23)
    monkeypatch.setattr(spill, "CHUNK_ROWS", 41)


def _spilled(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(job_module, "OUT_OF_CORE_ROWS", 1 if on else 2**62)


def _frame() -> pl.DataFrame:
    return pl.DataFrame({"body": BODIES, "n": range(len(BODIES))})


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("usage", [False, True])
def test_spilled_result_is_the_in_memory_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None, provider: str, usage: bool
) -> None:
    # Faults on the first two batches only: they expire halfway, lose requests and fail some
    # for good; the expired and missing are sent again and succeed, so requests have several
    # attempts and the best one must be picked.
    faults = Faults(expire_at=0.5, request_errors=0.2, missing=0.2, fault_batches=2, seed=3)
    with serve(batch_seconds=0.05, faults=faults) as emu:
        job = batch(_frame().lazy(), emu, tmp_path / "j", provider, output="answer", usage=usage,
                    max_shard_requests=20, wait=False).wait()  # fmt: skip
    want = job.result()
    assert isinstance(want, pl.LazyFrame)
    _spilled(monkeypatch, True)
    got = job.result().collect()
    want = want.collect()
    attempts = pl.read_parquet(tmp_path / "j" / "results" / "*.parquet")["attempt"]
    assert attempts.max() > 1  # the test is about requests answered on a later attempt
    assert got.equals(want)
    assert {"skipped", "succeeded"} <= set(got["llm_status"]) <= {"skipped", "succeeded", "errored"}
    # Each row its own text's answer (the emulator echoes the prompt's words), not a neighbour's.
    for body, answer, status in zip(got["body"], got["answer"], got["llm_status"], strict=True):
        if status == "succeeded":
            assert answer == f"Emulated answer to: Classify: {' '.join(body.split())}"
    if usage:  # a shared request is paid once, on its first row
        answered = got.filter(pl.col("llm_status") == "succeeded")
        paid = answered.filter(pl.col("llm_input_tokens") > 0)["body"]
        assert paid.is_unique().all() and paid.len() == answered["body"].n_unique()


def test_a_plan_whose_order_changes_gets_its_own_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    n = 400
    base = pl.DataFrame(
        {"customer": [f"c{i}" for i in range(n)], "body": [f"text {i}" for i in range(n)]}
    )
    calls = []

    def shuffled() -> pl.DataFrame:  # a source that gives its rows in another order each time
        calls.append(1)
        return base.sample(fraction=1.0, shuffle=True, seed=len(calls))

    source = pl.defer(shuffled, schema=base.schema)
    _spilled(monkeypatch, True)
    with serve(batch_seconds=0.05) as emu:
        out = batch(source, emu, tmp_path / "j", output="answer", usage=True).collect()
    assert len(calls) >= 2 and out.height == n and set(out["llm_status"]) == {"succeeded"}
    assert out["answer"].to_list() == [f"Emulated answer to: Classify: {b}" for b in out["body"]]
    assert (out["llm_input_tokens"] > 0).all()
    order = [int(c[1:]) for c in out["customer"]]
    assert sorted(order) == list(range(n)) and order != sorted(order)


def test_rows_not_in_the_job_and_structured_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    data = {"body": [f"refund {i}" for i in range(60)] + [None]}
    source = pl.defer(lambda: pl.DataFrame(data), schema={"body": pl.String})
    with serve(batch_seconds=0.05) as emu:
        # two output tokens cut the structured answers short: invalid_output, raw text kept
        job = batch(source, emu, tmp_path / "j", output=["billing", "bug"], max_output_tokens=2,
                    wait=False).wait()  # fmt: skip
    data["body"] = [*data["body"][30:], "new text"]  # the data moved on
    want = job.result().collect()
    _spilled(monkeypatch, True)
    got = job.result().collect()
    assert got.equals(want)
    assert got["llm_status"][-1] is None and "not part of the job" in got["llm_error"][-1]
    assert set(got["llm_status"].drop_nulls()) == {"invalid_output", "skipped"}
    assert got["llm_error"][0].startswith("invalid output")
    assert got["label"].dtype == pl.Enum(["billing", "bug"])


def test_a_reopened_huge_job_returns_a_lazyframe_of_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    with serve(batch_seconds=0.05) as emu:
        frame = batch(_frame(), emu, tmp_path / "j", output="answer", usage=True)
    job = polars_llmbatch.Job.open(tmp_path / "j", progress=False)
    want = job.result(usage=True)
    assert isinstance(want, pl.DataFrame)
    _spilled(monkeypatch, True)
    got = job.result(usage=True)
    assert isinstance(got, pl.LazyFrame)
    got = got.collect()
    assert got.equals(want)
    assert got.drop("row_nr").equals(frame.drop("body", "n"))


def test_embeddings_spill_as_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    df = pl.DataFrame({"body": [f"item {i % 50}" for i in range(120)] + [None]})
    with serve(batch_seconds=0.05) as emu:
        kw = dict(provider="openai", model="text-embedding-3-small", checkpoint=tmp_path / "j",
                  api_key="k", base_url=emu.openai_url, progress=False, poll_interval=0.02)  # fmt: skip
        want = df.lazy().llm.embed("{body}", **kw).collect()
        _spilled(monkeypatch, True)
        got = df.lazy().llm.embed("{body}", **kw).collect()
    assert isinstance(got["embedding"].dtype, pl.Array)
    assert got.equals(want)


def test_results_that_arrive_later_are_decoded_and_old_results_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    _spilled(monkeypatch, True)
    with serve(batch_seconds=0.05) as emu:
        emu.ctx.clock = clock = StepClock()  # no batch ends until the clock moves
        job = batch(_frame().lazy(), emu, tmp_path / "j", output="answer", wait=False,
                    max_shard_requests=10)  # fmt: skip
        first = job.result().collect()
        clock.advance(3600)
        job.wait()
        frames = [job.result() for _ in range(spill.KEEP_RESULTS + 1)]
    assert set(first["llm_status"]) == {"pending", "skipped"}
    last = frames[-1].collect()
    assert set(last["llm_status"]) == {"succeeded", "skipped"}
    assert len(list((tmp_path / "j" / "derived").glob("result-*"))) == spill.KEEP_RESULTS
    assert frames[-spill.KEEP_RESULTS].collect().equals(last)  # the newest ones still read
    # the decoded answers of every results file, one each
    results = sorted(p.name for p in (tmp_path / "j" / "results").glob("*.parquet"))
    decoded = sorted(p.name for p in (tmp_path / "j" / "derived" / "outputs").glob("*.parquet"))
    assert decoded == results


def test_a_huge_jobs_status_counts_as_the_in_memory_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    with serve(batch_seconds=0.05) as emu:
        emu.ctx.clock = clock = StepClock()
        # two output tokens cut the structured answers short: invalid_output
        job = batch(_frame(), emu, tmp_path / "j", output=["billing", "bug"], max_output_tokens=2,
                    wait=False, max_shard_requests=10, max_in_flight=4)  # fmt: skip
        clock.advance(3600)
        job.wait(timeout=0)  # some batches collected, the rest pending or not sent
        job.close()
        counts = []
        for spilled in (False, True):
            _spilled(monkeypatch, spilled)
            counts.append(polars_llmbatch.Job.open(tmp_path / "j").status(refresh=False).rows)
    assert counts[0] == counts[1]
    assert counts[1]["invalid_output"] > 0 and counts[1]["pending"] > 0
    assert counts[1]["skipped"] == 1 and sum(counts[1].values()) == len(BODIES)
    assert not list((tmp_path / "j" / "derived").glob("counts-*"))  # its buckets are gone


def test_a_checkpoint_it_cannot_write_spills_to_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_buckets: None
) -> None:
    with serve(batch_seconds=0.05) as emu:
        want = batch(_frame(), emu, tmp_path / "j", output="answer")
    _spilled(monkeypatch, True)
    (tmp_path / "j" / "derived").write_text("")  # a file in the way: no folder can be made there
    got = polars_llmbatch.Job.open(tmp_path / "j").result().collect()
    assert got.drop("row_nr").equals(want.drop("body", "n"))
    assert (tmp_path / "j" / "derived").read_text() == ""


@pytest.mark.parametrize("value", ["-1", "1.5", "nan", "", "1e6"])
def test_a_bad_row_setting_is_refused_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("POLARS_LLMBATCH_OUT_OF_CORE_ROWS", value)
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match="POLARS_LLMBATCH_OUT_OF_CORE_ROWS"):
            batch(_frame().lazy(), emu, tmp_path / "j", output="answer")
        assert emu.ledger.batches == [] and not (tmp_path / "j").exists()


def test_the_row_setting_chooses_the_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(batch_seconds=0.05) as emu:
        monkeypatch.setenv("POLARS_LLMBATCH_OUT_OF_CORE_ROWS", str(len(BODIES) + 1))
        batch(_frame().lazy(), emu, tmp_path / "j", output="answer").collect()
        assert not (tmp_path / "j" / "derived").exists()  # one row short of huge
        monkeypatch.setenv("POLARS_LLMBATCH_OUT_OF_CORE_ROWS", str(len(BODIES)))
        batch(_frame().lazy(), emu, tmp_path / "j", output="answer").collect()
        assert len(list((tmp_path / "j" / "derived").glob("result-*"))) == 1


_HOLDER = """
import sys
from pathlib import Path
from polars_llmbatch.collect.spill import result_folder
with result_folder(Path(sys.argv[1])) as folder:
    print(folder, flush=True)
    sys.stdin.readline()  # held until the test says so (or kills this process)
"""


@pytest.mark.parametrize("ending", ["finished", "killed"])
def test_a_result_another_process_is_making_is_never_pruned(tmp_path: Path, ending: str) -> None:
    """Two notebooks on one job: results made meanwhile by one leave the other's folder alone
    while it is being made; once its maker is done (or killed -9) it is pruned as usual."""
    import subprocess
    import sys

    derived = tmp_path / "dérivé 'x'"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(derived)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        held = Path(holder.stdout.readline().strip())
        assert held.is_dir()
        made = []
        for _ in range(spill.KEEP_RESULTS + 2):
            with spill.result_folder(derived) as folder:
                (folder / "part").write_text("x")
            made.append(folder)
        assert held.is_dir()  # the oldest, but held
        assert sorted(derived.iterdir()) == sorted([held, *made[-spill.KEEP_RESULTS :]])
        if ending == "finished":
            holder.communicate("\n", timeout=60)
        else:
            holder.kill()
            holder.wait(timeout=60)
    finally:
        holder.kill()
    assert held.is_dir()  # nothing removes a folder before the next result is made
    with spill.result_folder(derived) as newest:
        pass
    assert sorted(derived.iterdir()) == sorted([*made[-(spill.KEEP_RESULTS - 1) :], newest])


def test_a_result_that_fails_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), spill.result_folder(tmp_path) as folder:
        (folder / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_a_column_with_the_internal_prefix_is_refused_before_anything_is_sent(
    tmp_path: Path, lazy: bool
) -> None:
    """The on-disk join numbers and buckets rows in columns of its own: a caller's column of
    such a name would clash after the batch was paid for, so it is refused first."""
    frame = pl.DataFrame({"__llmbatch_row": [1, 2], "body": ["a", "b"]})
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match=r"\['__llmbatch_row'\].*rename them"):
            batch(frame.lazy() if lazy else frame, emu, tmp_path / "j", "openai", output=["a", "b"])
        assert emu.ledger.batches == []
    assert not (tmp_path / "j").exists()
