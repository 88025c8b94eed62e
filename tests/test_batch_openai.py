"""df.llm.batch / embed end to end against the emulator's OpenAI Batch API, over HTTP."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import polars_llmbatch
from polars_llmbatch.collect.reconcile import read_results, spent
from polars_llmbatch.emulator import Faults, model, serve

CATS = ["billing", "bug", "feature", "other"]


def frame(n: int) -> pl.DataFrame:
    bodies = [f"ticket {i}: {'refund' if i % 3 else 'crash'} number {i}" for i in range(n)]
    return pl.DataFrame({"ticket_id": [f"T{i}" for i in range(n)], "body": bodies})


def run(df: pl.DataFrame, emu, tmp: Path, **kw):
    args = dict(
        provider="openai",
        model="gpt-4o-mini",
        output=CATS,
        checkpoint=tmp / "job",
        api_key="test-key",
        base_url=emu.openai_url,
        progress=False,
        poll_interval=0.02,
    )
    args.update(kw)
    return df.llm.batch(kw.pop("prompt", "Classify: {body}"), **args)


def test_enum_classification_lands_on_the_right_rows(tmp_path: Path) -> None:
    df = frame(300)
    with serve(batch_seconds=0.2) as emu:
        out = run(df, emu, tmp_path, max_shard_requests=70)  # 5 shards, output shuffled
        assert len(emu.ledger.batches) == 5 and not emu.ledger.billed_twice()
    assert out.columns == ["ticket_id", "body", "label", "llm_status", "llm_error"]
    assert out.schema["label"] == pl.Enum(CATS)
    assert out["ticket_id"].to_list() == df["ticket_id"].to_list()
    expected = [model.enum_pick(f"Classify: {b}", "label", CATS) for b in df["body"]]
    assert out["label"].cast(pl.String).to_list() == expected
    assert set(out["llm_status"]) == {"succeeded"} and out["llm_error"].null_count() == 300


def test_struct_output_free_text_and_usage(tmp_path: Path) -> None:
    df = pl.DataFrame({"body": ["a refund", "a crash", "a refund", None]})
    with serve(batch_seconds=0.1) as emu:
        out = run(
            df,
            emu,
            tmp_path,
            output={"category": pl.Enum(CATS), "urgency": pl.Int64, "summary": pl.String},
            usage=True,
        )
        text = run(df, emu, tmp_path / "t", output="answer", max_output_tokens=50)
        assert len(emu.ledger.batches) == 2  # identical prompts shared one request each time
    assert out.schema["category"] == pl.Enum(CATS) and out.schema["urgency"] == pl.Int64
    assert out["llm_status"].to_list() == ["succeeded", "succeeded", "succeeded", "skipped"]
    assert out["summary"][0] == "summary for: Classify: a refund"
    assert out["category"][0] == model.enum_pick("Classify: a refund", "category", CATS)
    # The shared request is paid once: tokens on its first row, 0 on the copy.
    assert out["llm_input_tokens"][0] > 0 and out["llm_input_tokens"][2] == 0
    assert out["llm_cost"].sum() > 0 and out["llm_cost"][3] == 0
    assert text["answer"][1] == "Emulated answer to: Classify: a crash"
    assert text["answer"][3] is None and text["llm_status"][3] == "skipped"


def test_embeddings_decode_into_a_float32_array(tmp_path: Path) -> None:
    df = pl.DataFrame({"title": ["red shoes", "blue hat", "red shoes"]})
    with serve(batch_seconds=0.1) as emu:
        out = df.llm.embed(
            "title",
            provider="openai",
            model="text-embedding-3-small",
            dimensions=16,
            checkpoint=tmp_path / "emb",
            api_key="k",
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
        )
    assert out.schema["embedding"] == pl.Array(pl.Float32, 16)
    want = model.embedding("blue hat", 16)
    assert out["embedding"][1].to_list() == pytest.approx(want, rel=1e-6)
    assert out["embedding"][0].to_list() == out["embedding"][2].to_list()


def test_rerunning_the_same_call_reattaches_and_pays_nothing(tmp_path: Path) -> None:
    df = frame(40)
    with serve(batch_seconds=0.1) as emu:
        first = run(df, emu, tmp_path)
        again = run(df, emu, tmp_path)
        assert len(emu.ledger.batches) == 1
    assert first.equals(again)


def test_result_cache_sends_only_new_rows(tmp_path: Path) -> None:
    df = frame(100)
    more = pl.concat([df, frame(110).tail(10)])
    with serve(batch_seconds=0.1) as emu:
        run(df, emu, tmp_path, checkpoint=tmp_path / "runs" / "v1")
        out = run(more, emu, tmp_path, checkpoint=tmp_path / "runs" / "v2", usage=True)
        sent = [b for b in emu.ledger.batches]
        assert len(sent) == 2 and sent[1]["requests"] == 10
    assert set(out["llm_status"]) == {"succeeded"}
    assert out["llm_cost"].head(100).sum() == 0 and out["llm_cost"].tail(10).sum() > 0


def test_wait_false_gives_a_job_to_reopen_anywhere(tmp_path: Path) -> None:
    df = frame(20)
    with serve(batch_seconds=0.3) as emu:
        job = run(df, emu, tmp_path, wait=False)
        assert isinstance(job, polars_llmbatch.Job)
        st = job.status()
        assert not st.done and st.rows["pending"] == 20
        assert "Job " in repr(job) and "<table>" in job._repr_html_()
        assert st.state == "running at the provider" and len(emu.ledger.batches) == 1
        job.close()  # as if its kernel ended: another one takes the job over
        again = polars_llmbatch.Job.open(
            job.path, api_key="k", base_url=emu.openai_url, progress=False, poll_interval=0.02
        )
        assert again.wait(timeout=0.01) is again  # returns early, still running
        out = again.wait().result()
        assert again.status().done and again.status().rows["succeeded"] == 20
        assert out.columns == ["row_nr", "label", "llm_status", "llm_error"]
        assert job.result()["label"].to_list() == out["label"].to_list()
        assert job.estimate.unique_requests == 20 and isinstance(
            job.estimate, polars_llmbatch.Estimate
        )
        assert len(emu.ledger.batches) == 1


def test_cancel_collects_what_ran_and_retries_nothing(tmp_path: Path) -> None:
    df = frame(50)
    with serve(batch_seconds=30) as emu:
        job = run(df, emu, tmp_path, wait=False)
        job.wait(timeout=0.2)  # submitted, still running
        job.cancel()
        out = job.result()
        assert len(emu.ledger.batches) == 1
    assert job.status().done
    assert set(out["llm_status"]) <= {"canceled", "succeeded"} and "canceled" in set(
        out["llm_status"]
    )


def test_lazyframe_batch_returns_a_lazyframe(tmp_path: Path) -> None:
    lf = frame(10).lazy().with_columns(pl.col("body").str.to_uppercase())
    with serve(batch_seconds=0.1) as emu:
        out = lf.llm.batch(
            "Classify: {body}",
            provider="openai",
            model="gpt-4o-mini",
            output=CATS,
            checkpoint=tmp_path / "lazy",
            api_key="k",
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
        )
    assert isinstance(out, pl.LazyFrame)
    got = out.collect()
    assert got["body"][0] == "TICKET 0: CRASH NUMBER 0" and got.height == 10
    assert got["label"][0] == model.enum_pick("Classify: TICKET 0: CRASH NUMBER 0", "label", CATS)


def test_sync_and_auto_modes_give_the_same_frame(tmp_path: Path) -> None:
    df = frame(30)
    with serve(batch_seconds=0.1) as emu:
        batch = run(df, emu, tmp_path, checkpoint=tmp_path / "b")
        sync = run(df, emu, tmp_path / "s", checkpoint=tmp_path / "s" / "j", mode="sync")
        auto = run(df, emu, tmp_path / "a", checkpoint=tmp_path / "a" / "j", mode="auto")
        assert len(emu.ledger.batches) == 1  # sync and auto (small: sync) made no batch
    assert batch.equals(sync) and batch.equals(auto)
    assert polars_llmbatch.Job.open(tmp_path / "a" / "j", api_key="k").mode == "sync"


@pytest.mark.parametrize(
    "faults",
    [
        Faults(rate_limit_creates=2),
        Faults(read_errors=3),
        Faults(drop_downloads=1),
        Faults(duplicates=0.3, seed=1),
        Faults(slow=2.0),
    ],
    ids=["rate_limit_creates", "read_errors", "drop_downloads", "duplicates", "slow"],
)
def test_transient_faults_cost_nothing_twice(tmp_path: Path, faults: Faults) -> None:
    df = frame(60)
    with serve(batch_seconds=0.1, faults=faults) as emu:
        out = run(df, emu, tmp_path)
        assert len(emu.ledger.batches) == 1 and not emu.ledger.billed_twice()
    assert set(out["llm_status"]) == {"succeeded"}


@pytest.mark.parametrize(
    "faults",
    [
        Faults(expire_at=0.5, seed=2, fault_batches=1),
        Faults(missing=0.2, seed=3, fault_batches=1),
        Faults(malformed=0.2, seed=4, fault_batches=1),
    ],
    ids=["expire_at", "missing", "malformed"],
)
def test_lost_requests_are_retried_until_they_succeed(tmp_path: Path, faults: Faults) -> None:
    df = frame(60)
    with serve(batch_seconds=0.1, faults=faults) as emu:
        out = run(df, emu, tmp_path)
        batches = emu.ledger.batches
        assert len(batches) == 2
        # Retries carry only what failed. Expired requests never ran (nothing billed twice); a
        # missing or garbled line was billed and must be bought again, and only those are.
        assert 0 < batches[1]["requests"] < batches[0]["requests"]
        twice = emu.ledger.billed_twice()
        assert len(twice) == (0 if faults.expire_at else batches[1]["requests"])
    assert set(out["llm_status"]) == {"succeeded"}
    expected = [model.enum_pick(f"Classify: {b}", "label", CATS) for b in df["body"]]
    assert out["label"].cast(pl.String).to_list() == expected


def test_errors_keep_the_provider_message_and_are_not_retried(tmp_path: Path) -> None:
    df = frame(60)
    with serve(batch_seconds=0.1, faults=Faults(request_errors=0.2, seed=5)) as emu:
        out = run(df, emu, tmp_path)
        assert len(emu.ledger.batches) == 1  # a 400 is not worth sending again
    errored = out.filter(pl.col("llm_status") == "errored")
    assert 0 < errored.height < 60 and errored["label"].null_count() == errored.height
    assert errored["llm_error"].str.contains("request_errors fault").all()


def test_retries_stop_at_max_attempts(tmp_path: Path) -> None:
    df = frame(30)
    with serve(batch_seconds=0.1, faults=Faults(missing=1.0)) as emu:
        out = run(df, emu, tmp_path, max_attempts=2)
        assert len(emu.ledger.batches) == 2
    assert set(out["llm_status"]) == {"missing"}


def test_queue_limit_resubmits_smaller(tmp_path: Path) -> None:
    df = frame(40)
    with serve(batch_seconds=0.1, faults=Faults(queue_limit_tokens=1200)) as emu:
        out = run(df, emu, tmp_path)
        sizes = [b["requests"] for b in emu.ledger.batches]
    assert sizes[0] == 40 and max(sizes[1:]) <= 20
    assert set(out["llm_status"]) == {"succeeded"}


def test_float_embeddings_decode_too(tmp_path: Path) -> None:
    df = pl.DataFrame({"title": ["red shoes", "blue hat"]})
    with serve(batch_seconds=0.1) as emu:
        out = df.llm.embed(
            "title",
            provider="openai",
            model="text-embedding-3-small",
            dimensions=4,
            extra_body={"encoding_format": "float"},
            checkpoint=tmp_path / "emb",
            api_key="k",
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
        )
    assert out.schema["embedding"] == pl.Array(pl.Float32, 4)
    assert out["embedding"][0].to_list() == pytest.approx(model.embedding("red shoes", 4), rel=1e-6)


def test_retries_stop_at_max_cost(tmp_path: Path) -> None:
    # With output free, the worst case is the input bill: the first round spends all of
    # max_cost, so no retry round fits, and the missing rows stay missing.
    df = frame(40)
    prices = {"input": 10.0, "output": 0.0}
    kw = dict(provider="openai", model="gpt-4o-mini", output=CATS, max_output_tokens=10)
    worst = df.llm.estimate("Classify: {body}", prices=prices, **kw).worst_cost_batch
    faults = Faults(missing=0.3, seed=1, fault_batches=1)
    with serve(batch_seconds=0.1, faults=faults) as emu:
        job = run(
            df,
            emu,
            tmp_path,
            prices=prices,
            max_cost=worst * 1.001,
            max_output_tokens=10,
            wait=False,
        )
        out = job.wait().result()
        assert len(emu.ledger.batches) == 1
    assert "missing" in set(out["llm_status"]) and "succeeded" in set(out["llm_status"])
    events = (job.path / "events.jsonl").read_text()
    assert '"retries_skipped"' in events and '"reason":"max_cost"' in events


def test_a_missing_answer_counts_at_its_worst_case_after_a_later_success(tmp_path: Path) -> None:
    """The provider may have billed a result it never returned: the budget counts every
    missing attempt at its worst case, even of a request a later attempt answered."""
    from polars_llmbatch.run.engine import Engine, Settings

    df = frame(40)
    prices = {"input": 10.0, "output": 0.0}
    faults = Faults(missing=0.3, seed=1, fault_batches=1)
    with serve(batch_seconds=0.1, faults=faults) as emu:
        job = run(df, emu, tmp_path, prices=prices, max_output_tokens=10, wait=False)
        out = job.wait().result()
        assert len(emu.ledger.batches) == 2  # the missing ones came back on the retry
    assert set(out["llm_status"]) == {"succeeded"}
    ckpt = job._ckpt
    first = read_results(ckpt).filter(pl.col("attempt") == 1)
    lost = first.filter(pl.col("status") == "missing").select("custom_id")
    assert 0 < lost.height < 40
    spent_so_far = spent(ckpt)
    due = first.filter(pl.col("status") == "succeeded").head(1).select("custom_id")

    def over(budget: float) -> tuple[float, float] | None:
        engine = Engine(ckpt, job.provider, job.spec, None, Settings(max_cost=budget), key="")
        return engine.over_budget(due)

    per_request = Engine(ckpt, job.provider, job.spec, None, Settings(), key="")._worst(due)
    unseen = Engine(ckpt, job.provider, job.spec, None, Settings(), key="")._worst(lost)
    assert per_request > 0 and unseen >= lost.height * per_request * 0.5
    # room for the one request and the paid bill, not for the answers never seen
    assert over(spent_so_far + per_request * 1.01) == pytest.approx(
        (spent_so_far + unseen, per_request)
    )
    assert over(spent_so_far + unseen + per_request * 1.01) is None


def test_progress_bar_reports_rows_and_shards(tmp_path: Path, capsys) -> None:
    with serve(batch_seconds=0.1) as emu:
        run(frame(30), emu, tmp_path, progress=True, max_shard_requests=10)
    err = capsys.readouterr().err
    assert "30/30" in err and "succeeded 30 | shards done 3" in err


def test_a_checkpoint_can_be_moved_and_reopened(tmp_path: Path) -> None:
    with serve(batch_seconds=0.3) as emu:
        job = run(frame(20), emu, tmp_path, wait=False)
        job.wait(timeout=0.05)
        job.close()  # its process lets go of the job (its background runner stops)
        moved = tmp_path / "elsewhere"
        job.path.rename(moved)
        again = polars_llmbatch.Job.open(
            moved, api_key="k", base_url=emu.openai_url, progress=False, poll_interval=0.02
        )
        out = again.wait().result()
        assert len(emu.ledger.batches) == 1
    assert set(out["llm_status"]) == {"succeeded"}
    reopened = polars_llmbatch.Job.open(moved, api_key="k")
    assert reopened.result().equals(out) and reopened.status().done


def test_a_cut_structured_answer_is_invalid_output_with_its_raw_text(tmp_path: Path) -> None:
    # max_output_tokens cuts the JSON answer short: the row says so and keeps the text.
    df = pl.DataFrame({"body": ["a refund please, and quickly"]})
    with serve(batch_seconds=0.1) as emu:
        out = run(df, emu, tmp_path, output={"summary": pl.String}, max_output_tokens=3)
    assert out["llm_status"].to_list() == ["invalid_output"] and out["summary"][0] is None
    error = out["llm_error"][0]
    assert error.startswith("invalid output (not valid JSON): {")


def test_responses_api_end_to_end(tmp_path: Path) -> None:
    df = frame(6)
    with serve(batch_seconds=0.1) as emu:
        out = run(df, emu, tmp_path, api="responses")
        text = run(df, emu, tmp_path / "t", api="responses", output="answer")
    expected = [model.enum_pick(f"Classify: {b}", "label", CATS) for b in df["body"]]
    assert out["label"].cast(pl.String).to_list() == expected
    assert text["answer"][0] == "Emulated answer to: Classify: ticket 0: crash number 0"
