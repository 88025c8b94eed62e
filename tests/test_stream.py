"""Streaming preparation gives what the in-memory path gives on the same rows: the same row
table, requests, estimate, shard plan and shard bytes, however the frame is cut into slices and
the requests into buckets, and from every kind of source (a DataFrame, a Parquet scan, a
LazyFrame with a filter)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan import stream
from polars_llmbatch.plan.estimate import estimate
from polars_llmbatch.plan.requests import prepare, render_plan
from polars_llmbatch.plan.shards import plan, shard_bytes

PROMPT = "Classify this ticket: {body}"
COLUMNS = ["custom_id", "body", "user", "row", "payload"]
CATS = ["billing", "bug", "feature"]


def _tickets(n: int, seed: int = 0) -> pl.DataFrame:
    """Tickets with repeats (shared requests across slices), nulls, unicode and line
    separators, of varied length."""
    words = ["refund", "crash", "naïve", "“quoted”", "line\u2028sep", "emoji 🎉", "tab\there"]
    bodies = []
    for i in range(n):
        k = (i * 7919 + seed) % 97
        if k == 5:
            bodies.append(None)
        else:
            tail = f" {k}" if i % 3 == 0 else f" #{i}"  # a third repeat, the rest are unique
            bodies.append(" ".join(words[(k + j) % len(words)] for j in range(1 + k % 13)) + tail)
    return pl.DataFrame({"ticket_id": [f"T-{i:05d}" for i in range(n)], "body": bodies})


def _stage(tmp_path: Path, frame: Any, **call: Any) -> stream.Staged:
    lazy = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    rplan = render_plan(lazy.collect_schema(), call.pop("prompt", PROMPT), **call)
    # small slices and buckets: many of both, on a few thousand rows
    return stream.stage(frame, rplan, tmp_path / "staged", prompt=PROMPT, batch_rows=333,
                        bucket_bytes=20_000)  # fmt: skip


def _requests(staged: stream.Staged) -> pl.DataFrame:
    return pl.concat(staged.pieces(COLUMNS))


@pytest.fixture(scope="module")
def tickets() -> pl.DataFrame:
    return _tickets(3_000)


@pytest.mark.parametrize("source", ["frame", "scan", "filtered"])
@pytest.mark.parametrize("id", [None, "ticket_id"])
def test_staged_requests_are_the_prepared_ones(
    tmp_path: Path, tickets: pl.DataFrame, source: str, id: str | None
) -> None:
    tickets.write_parquet(tmp_path / "t.parquet", row_group_size=500)
    scan = pl.scan_parquet(tmp_path / "t.parquet")
    frame = {
        "frame": tickets,
        "scan": scan,
        "filtered": scan.filter(pl.col("ticket_id") != "T-00007"),
    }[source]
    kw = {"provider": "openai", "model": "gpt-4o-mini", "id": id}
    staged = _stage(tmp_path, frame, **kw)
    whole = prepare(frame, PROMPT, **kw)
    assert len(staged.counts) > 4  # the test is about many buckets...
    assert staged.n_rows == whole.n_rows and staged.n_skipped == whole.n_skipped
    assert staged.row_table().collect().equals(whole.rows)
    assert _requests(staged).equals(pl.concat(whole.pieces(COLUMNS)))
    assert staged.job_id == whole.job_id


def test_the_slices_are_read_as_the_source_allows(tmp_path: Path, tickets: pl.DataFrame) -> None:
    tickets.write_parquet(tmp_path / "t.parquet")
    scan = pl.scan_parquet(tmp_path / "t.parquet")
    assert stream.plain_scan(scan.select("body"))
    assert not stream.plain_scan(scan.filter(pl.col("body").is_null()).select("body"))
    assert not stream.plain_scan(scan.join(scan, on="ticket_id").select("body"))
    assert not stream.plain_scan(pl.scan_csv(tmp_path / "none.csv", schema={"body": pl.String}))


@pytest.mark.parametrize(
    ("provider", "model", "extra"),
    [
        ("openai", "gpt-4o-mini", {}),
        (
            "anthropic",
            "claude-3-5-haiku-latest",
            {"system": "Be brief.", "options": {"max_output_tokens": 50}},
        ),
        ("gemini", "gemini-2.0-flash", {"output": ["billing", "bug"]}),
    ],
)
@pytest.mark.parametrize("exact", [True, False])
def test_the_estimate_and_shards_of_staged_requests_are_the_same(
    tmp_path: Path, provider: str, model: str, extra: dict[str, Any], exact: bool
) -> None:
    df = _tickets(2_500, seed=3)
    kw = {"provider": provider, "model": model, **extra}
    staged = _stage(tmp_path, df, **kw)
    whole = prepare(df, PROMPT, **kw)
    # a cap that cuts shards across buckets; sampled mode with a sample smaller than the job
    args = {"exact": exact, "sample_size": 700, "max_shard_bytes": 30_000, "max_shard_tokens": 900}
    a, b = estimate(staged, **args), estimate(whole, **args)
    assert a.estimate.to_dict() == b.estimate.to_dict()
    assert a.shards == b.shards and len(a.shards) > 10
    assert a.worst_tokens.equals(b.worst_tokens)
    for shard in a.shards:
        assert shard_bytes(staged, shard) == shard_bytes(whole, shard)
    assert plan(staged) == plan(whole)


def test_calibration_reads_the_same_sample(tmp_path: Path) -> None:
    df = _tickets(2_000, seed=5)
    kw = {
        "provider": "anthropic",
        "model": "claude-3-5-haiku-latest",
        "options": {"max_output_tokens": 50},
    }
    staged, whole = _stage(tmp_path, df, **kw), prepare(df, PROMPT, **kw)
    seen: list[list[str]] = []

    def count(bodies: list[dict[str, Any]]) -> list[int]:  # a provider counting 4 chars a token
        seen.append([json.dumps(b) for b in bodies])
        return [len(json.dumps(b)) // 4 for b in bodies]

    a = estimate(staged, count=count, calibrate_sample=50).estimate
    b = estimate(whole, count=count, calibrate_sample=50).estimate
    assert a.calibration is not None and b.calibration is not None
    a.calibration.pop("seconds"), b.calibration.pop("seconds")  # how long the counts took
    assert a.to_dict() == b.to_dict()
    assert seen[0] == seen[1] and len(seen[0]) == 50


def test_a_duplicate_id_across_slices_is_refused(tmp_path: Path, tickets: pl.DataFrame) -> None:
    df = tickets.with_columns(
        pl.when(pl.int_range(pl.len()) == 2_900).then(pl.lit("T-00001")).otherwise("ticket_id")
        .alias("ticket_id")
    )  # fmt: skip
    with pytest.raises(LlmBatchError, match=r"'T-00001' \(2 rows\)"):
        _stage(tmp_path, df, provider="openai", model="gpt-4o-mini", id="ticket_id")


def test_a_null_row_is_named_by_its_place_in_the_whole_frame(
    tmp_path: Path, tickets: pl.DataFrame
) -> None:
    first_null = int(tickets["body"].is_null().arg_true()[0])
    with pytest.raises(LlmBatchError, match=rf"first at row {first_null} \(row_nr={first_null}\)"):
        _stage(tmp_path, tickets, provider="openai", model="gpt-4o-mini", on_null="error")


def test_an_empty_frame_stages_nothing(tmp_path: Path) -> None:
    df = _tickets(0)
    staged = _stage(tmp_path, df, provider="openai", model="gpt-4o-mini")
    assert staged.n_requests == 0 and staged.row_table().collect().height == 0
    assert plan(staged) == [] and estimate(staged).estimate.unique_requests == 0


def test_killed_mid_preparation_the_next_run_starts_clean(tmp_path: Path) -> None:
    """kill -9 while slices are rendered: nothing half-written is taken for staged requests;
    staging again gives the whole result."""
    df = _tickets(40_000, seed=9)
    df.write_parquet(tmp_path / "t.parquet")
    script = textwrap.dedent(f"""
        import os, polars as pl
        from polars_llmbatch.plan import stream
        from polars_llmbatch.plan.requests import render_plan
        scan = pl.scan_parquet({str(tmp_path / "t.parquet")!r})
        rplan = render_plan(scan.collect_schema(), {PROMPT!r}, provider="openai",
                            model="gpt-4o-mini")
        real = stream._spill
        def spill(*a):
            n = real(*a)
            if len(os.listdir({str(tmp_path / "staged" / "rows")!r})) >= 5:
                print("rendering", flush=True)
                import time; time.sleep(60)
            return n
        stream._spill = spill
        stream.stage(scan, rplan, {str(tmp_path / "staged")!r}, prompt="p", batch_rows=2_000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "rendering\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "staged" / "staged.json").exists()
    staged = _stage(tmp_path, pl.scan_parquet(tmp_path / "t.parquet"), provider="openai",
                    model="gpt-4o-mini")  # fmt: skip
    whole = prepare(df, PROMPT, provider="openai", model="gpt-4o-mini")
    assert _requests(staged).equals(pl.concat(whole.pieces(COLUMNS)))
    assert staged.row_table().collect().equals(whole.rows)


@pytest.mark.parametrize("exact", [True, False])
def test_a_row_over_the_context_is_named_alike(tmp_path: Path, exact: bool) -> None:
    df = _tickets(2_500).with_columns(
        pl.when(pl.int_range(pl.len()) == 1_234).then(pl.lit("word " * 140_000))
        .otherwise("body").alias("body")
    )  # fmt: skip
    kw = {"provider": "openai", "model": "gpt-4o-mini", "id": "ticket_id"}
    staged, whole = _stage(tmp_path, df, **kw), prepare(df, PROMPT, **kw)
    messages = []
    for source in (staged, whole):
        with pytest.raises(LlmBatchError, match="T-01234") as caught:
            estimate(source, exact=exact, sample_size=700)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("name", ["row", "user", "system", "payload", "bytes", "chars_user"])
def test_a_key_named_like_a_request_column(tmp_path: Path, name: str) -> None:
    df = _tickets(1_500).rename({"ticket_id": name})
    kw = {"provider": "openai", "model": "gpt-4o-mini", "id": name, "system": "Ticket {body}"}
    staged, whole = _stage(tmp_path, df, **kw), prepare(df, PROMPT, **kw)
    assert staged.row_table().collect().equals(whole.rows)
    assert pl.concat(staged.pieces(whole.requests.columns)).equals(whole.requests)
    reqs = df.lazy().llm.requests(PROMPT, **kw)
    assert reqs.equals(df.llm.requests(PROMPT, **kw))


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"), ("gemini", "gemini-2.5-flash")],
)
def test_shards_planned_from_the_stored_requests_are_the_same(
    tmp_path: Path, provider: str, model: str
) -> None:
    from polars_llmbatch.plan.requests import Prepared
    from polars_llmbatch.plan.stored import StoredRequests
    from polars_llmbatch.plan.subset import Subset

    kw = {"options": {"max_output_tokens": 100}} if provider == "anthropic" else {}
    whole = prepare(_tickets(2_500, seed=5), PROMPT, provider=provider, model=model, **kw)
    path = tmp_path / "requests.parquet"
    whole.requests.select("custom_id", "body", "row").write_parquet(path, row_group_size=97)
    # requests reused from the result cache leave the plan: every 7th, and a whole row group
    ids = whole.requests["custom_id"]
    cached = pl.concat([ids.gather_every(7), ids.slice(97 * 3, 97)]).unique()
    kept = whole.requests.filter(~pl.col("custom_id").is_in(cached.implode()))
    memory = Prepared(whole.spec, whole.provider, whole.key, whole.rows, kept)
    stored = Subset(StoredRequests(path, whole.spec, whole.provider), cached)
    assert stored.n_requests == kept.height
    caps = {"max_bytes": 25_000, "job_id": "j"}
    shards = plan(stored, **caps)
    assert shards == plan(memory, **caps) and len(shards) > 10
    for shard in shards:
        assert shard_bytes(stored, shard) == shard_bytes(memory, shard)
    at = pl.Series([0, 5, 96, 97, 1000, kept.height - 1])
    assert stored.gather(at, ["custom_id"]).equals(kept[at].select("custom_id"))


def _checkpoint_files(ckpt: Path) -> dict[str, Any]:
    """What a job's checkpoint holds of its data: rows, requests and every shard's bytes."""
    return {
        "rows": pl.read_parquet(ckpt / "rows.parquet"),
        "requests": pl.read_parquet(ckpt / "requests.parquet"),
        "shards": {p.name: p.read_bytes() for p in sorted((ckpt / "shards").glob("*.json*"))},
    }


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_lazyframe_batch_is_staged_and_makes_the_dataframe_job(
    tmp_path: Path, provider: str, monkeypatch
) -> None:
    from helpers import batch

    from polars_llmbatch import namespace
    from polars_llmbatch.emulator import serve

    df = _tickets(1_200, seed=9)
    df.write_parquet(tmp_path / "t.parquet")
    kw = {"output": ["billing", "bug"], "id": "ticket_id", "max_shard_requests": 150}
    with serve(batch_seconds=0.1) as emu:
        whole = batch(df, emu, tmp_path / "a" / "mem", provider, prompt=PROMPT, **kw)
        # the LazyFrame is never prepared in memory: only staged
        monkeypatch.setattr(namespace, "prepare", lambda *a, **k: pytest.fail("in memory"))
        lazy = batch(pl.scan_parquet(tmp_path / "t.parquet"), emu, tmp_path / "b" / "staged",
                     provider, prompt=PROMPT, **kw)  # fmt: skip
    a, b = _checkpoint_files(tmp_path / "a" / "mem"), _checkpoint_files(tmp_path / "b" / "staged")
    assert a["rows"].equals(b["rows"]) and a["requests"].equals(b["requests"])
    assert a["shards"] == b["shards"] and len(a["shards"]) >= 5
    out = lazy.collect()
    assert out.equals(whole) and set(out["llm_status"]) >= {"succeeded", "skipped"}


def test_a_staged_batch_reuses_the_result_cache(tmp_path: Path) -> None:
    from helpers import batch

    from polars_llmbatch.emulator import model, serve

    df = _tickets(900, seed=11).drop_nulls("body")
    df.write_parquet(tmp_path / "t.parquet")
    with serve(batch_seconds=0.1) as emu:
        batch(df.head(500), emu, tmp_path / "jobs" / "first", output=CATS, prompt=PROMPT)
        paid = len(emu.ledger.billed)
        lazy = pl.scan_parquet(tmp_path / "t.parquet")
        out = batch(lazy, emu, tmp_path / "jobs" / "second", output=CATS, prompt=PROMPT)
        out = out.collect()
        second = len(emu.ledger.billed) - paid
        requests = pl.read_parquet(tmp_path / "jobs" / "second" / "requests.parquet")
    # only the requests the first job never sent were paid for again
    unique = df["body"].unique().len()
    assert second == unique - df.head(500)["body"].unique().len()
    # the cached ones carry no worst case of their own: they are never sent
    cached = pl.read_parquet(tmp_path / "jobs" / "second" / "results" / "cached.parquet")
    assert (
        requests.height == unique and requests["worst_input_tokens"].null_count() == cached.height
    )
    assert set(out["llm_status"]) == {"succeeded"}
    expected = [model.enum_pick(f"Classify this ticket: {b}", "label", CATS) for b in df["body"]]
    assert out["label"].cast(pl.String).to_list() == expected


def test_killed_while_the_checkpoint_takes_the_staged_requests(tmp_path: Path) -> None:
    """kill -9 while a LazyFrame's staged requests are copied into its checkpoint (before
    job.json, so before anything is sent): the same call again starts the job afresh and pays
    each request once."""
    from polars_llmbatch.emulator import model, serve

    df = _tickets(3_000, seed=13).drop_nulls("body")
    df.write_parquet(tmp_path / "t.parquet")
    ckpt = tmp_path / "job"
    script = textwrap.dedent(f"""
        import os, signal, sys, polars as pl, polars_llmbatch
        from polars_llmbatch.plan import stream
        pieces = stream.Staged.pieces
        def dying(self, columns):
            for piece in pieces(self, columns):
                yield piece
                if os.path.exists({str(ckpt / "requests.parquet.tmp")!r}):
                    os.kill(os.getpid(), signal.SIGKILL)  # the file half-written
        if sys.argv[2] == "die":
            stream.Staged.pieces = dying
        out = pl.scan_parquet({str(tmp_path / "t.parquet")!r}).llm.batch(
            {PROMPT!r}, provider="openai", model="gpt-4o-mini", output={CATS!r},
            checkpoint={str(ckpt)!r}, api_key="k", base_url=sys.argv[1], progress=False,
            poll_interval=0.02, max_shard_requests=500)
        out.select(pl.col("label").cast(pl.String), "llm_status").collect().write_parquet(
            {str(tmp_path / "out.parquet")!r})
    """)
    with serve(batch_seconds=0.1) as emu:
        died = subprocess.run([sys.executable, "-c", script, emu.openai_url, "die"], timeout=120)
        assert died.returncode == -signal.SIGKILL
        assert (ckpt / "requests.parquet.tmp").exists() and not (ckpt / "job.json").exists()
        assert not emu.ledger.batches  # nothing sent before job.json
        again = subprocess.run([sys.executable, "-c", script, emu.openai_url, "live"], timeout=120)
        assert again.returncode == 0
        assert not emu.ledger.billed_twice()
        assert len(emu.ledger.billed) == df["body"].n_unique()
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert set(out["llm_status"]) == {"succeeded"}
    expected = [model.enum_pick(f"Classify this ticket: {b}", "label", CATS) for b in df["body"]]
    assert out["label"].to_list() == expected


def test_bodies_built_where_read_match_when_few_rows_hold_a_line_separator(
    tmp_path: Path,
) -> None:
    """The staged files keep no bodies: each piece builds its own, escaping U+2028/U+2029
    only when it holds one. One row of thousands holds one (and one a control character), so
    most pieces build without the escape and one with it: every body, payload and shard byte
    as the whole frame's."""
    n = 3_000
    bodies = [f"plain ticket {i}" for i in range(n)]
    bodies[1234] = "one line\u2028separator and\u2029another"
    bodies[2345] = 'control \x01\x1f, "quotes" and \\ a backslash'
    df = pl.DataFrame({"body": bodies})
    kw = {"provider": "openai", "model": "gpt-4o-mini"}
    staged = _stage(tmp_path, df, **kw)
    whole = prepare(df, PROMPT, **kw)
    assert len(staged.counts) > 4
    got = _requests(staged)
    assert got.equals(pl.concat(whole.pieces(COLUMNS)))
    assert got["body"].str.contains("\\u2028", literal=True).sum() == 1
    assert "\u2028" not in "".join(got["body"].to_list())
    planned = estimate(staged, max_shard_bytes=20_000)
    for shard in planned.shards:  # the planned sizes are what is written
        assert len(shard_bytes(staged, shard)) == shard.bytes
        assert shard_bytes(staged, shard) == shard_bytes(whole, shard)
