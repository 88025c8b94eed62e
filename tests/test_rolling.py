"""Rolling submission: the first round's shards are submitted as they are written, at most
``max_in_flight`` batches live, and a full provider queue is learned and kept under."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from helpers import batch

from polars_llmbatch.emulator import serve
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.run import engine
from polars_llmbatch.run.checkpoint import Checkpoint

PROVIDERS = ["openai", "anthropic", "gemini"]


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"body": [f"ticket {i}: the app crashes when I pay" for i in range(n)]})


def most_live(ckpt: Path) -> int:
    """The most batches live at once, folded from the event log (submitted, not yet done)."""
    live: set[int] = set()
    most = 0
    for line in (ckpt / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "submitted":
            live.add(e["shard"])
        elif e["event"] == "done":
            live.discard(e["shard"])
        most = max(most, len(live))
    return most


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_shard_is_submitted_as_soon_as_it_is_written(
    tmp_path: Path, provider: str, monkeypatch
) -> None:
    write = engine.write_shard_files
    seen: list[tuple[list[int], int]] = []  # (shards being written, batches created by then)

    with serve(batch_seconds=0.2) as emu:

        def recording(source, shards, out):
            seen.append(([s.index for s in shards], len(emu.ledger.batches)))
            return write(source, shards, out)

        monkeypatch.setattr(engine, "write_shard_files", recording)
        out = batch(frame(30), emu, tmp_path / "j", provider, output="answer", max_shard_requests=3)
        assert len(emu.ledger.batches) == 10 and not emu.ledger.billed_twice()
    # Two shard files are written at a time, and both are sent before the next two are written.
    assert seen == [([i, i + 1], i) for i in range(0, 10, 2)]
    assert set(out["llm_status"]) == {"succeeded"}
    assert Checkpoint(tmp_path / "j").planning_done()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_max_in_flight_keeps_at_most_that_many_batches_live(tmp_path: Path, provider: str) -> None:
    with serve(batch_seconds=0.2) as emu:
        out = batch(
            frame(24), emu, tmp_path / "j", provider, output="answer",
            max_shard_requests=4, max_in_flight=2,
        )  # fmt: skip
        assert len(emu.ledger.batches) == 6 and not emu.ledger.billed_twice()
    assert most_live(tmp_path / "j") == 2
    assert set(out["llm_status"]) == {"succeeded"}


def test_max_in_flight_is_checked_before_anything_is_read(tmp_path: Path) -> None:
    from polars_llmbatch.errors import LlmBatchError

    for bad in (0, -1, 1.5, float("nan"), True):
        with pytest.raises(LlmBatchError, match="max_in_flight"):
            frame(2).llm.batch(
                "Q: {body}", provider="openai", model="gpt-4o-mini", api_key="k",
                base_url="http://127.0.0.1:9", checkpoint=tmp_path / "j", max_in_flight=bad,
            )  # fmt: skip
    assert not (tmp_path / "j").exists()


def shard_tokens(provider: str, tmp_path: Path) -> int:
    """Input tokens of one 4-request shard as the emulator bills them (its own tokenizers,
    not the library's counting): the unit the fault's limit is set in."""
    with serve(batch_seconds=0.05) as emu:
        batch(frame(4), emu, tmp_path / "probe", provider, output="answer")
        return sum(b["input_tokens"] for b in emu.ledger.billed)


def check_held_under_the_ceiling(ckpt: Path) -> tuple[int, int]:
    """Fold the event log by the documented rule: after a queue refusal, every batch created
    kept the live batches' worst-case tokens and requests under the ceiling (or went alone);
    the ceiling rises by the largest shard once as many batches have ended as were live at
    the refusal. Returns (refusals, the ones that came before the queue turned over since the
    last): the second must stay 0, or the engine knocked without waiting for room."""
    sizes: dict[int, tuple[int, int]] = {}
    live: set[int] = set()
    ceiling: tuple[int, int] | None = None
    learned = hasty = 0
    turnover = ended = 0
    raised = False
    for line in (ckpt / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "planned":
            sizes.update({s["shard"]: (s["tokens"], s["requests"]) for s in e["shards"]})
        elif e["event"] == "queue_full":
            learned += 1
            others = live - {e["shard"]}
            hasty += ceiling is not None and not raised and bool(others)
            ceiling = (e["tokens"], e["requests"])
            turnover, ended, raised = max(1, len(others)), 0, False
        elif e["event"] == "submitted":
            if ceiling is not None and live:
                t = sum(sizes[i][0] for i in live) + sizes[e["shard"]][0]
                r = sum(sizes[i][1] for i in live) + sizes[e["shard"]][1]
                assert t <= ceiling[0] and r <= ceiling[1], (e, live, ceiling)
            live.add(e["shard"])
        elif e["event"] == "done" and e["shard"] in live:
            live.discard(e["shard"])
            if ceiling is not None and not e["queue_limited"]:
                ended += 1
                if ended == turnover:  # the queue turned over: probe one shard more
                    ceiling = (ceiling[0] + max(t for t, _ in sizes.values()),
                               ceiling[1] + max(r for _, r in sizes.values()))  # fmt: skip
                    ended, raised = 0, True
    assert all(t > 0 for t, _ in sizes.values())  # every shard's queue share is known
    return learned, hasty


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_full_queue_is_learned_and_the_live_batches_kept_under_it(
    tmp_path: Path, provider: str
) -> None:
    # The organisation's queue takes two shards of this model at once, not three.
    limit = int(shard_tokens(provider, tmp_path) * 2.5)
    with serve(batch_seconds=1.0, faults=Faults(org_queue_tokens=limit)) as emu:
        out = batch(frame(32), emu, tmp_path / "j", provider, output="answer", max_shard_requests=4)
        assert not emu.ledger.billed_twice()
        assert len(emu.ledger.billed) == 32  # every request answered once
        created = len(emu.ledger.batches)
    assert set(out["llm_status"]) == {"succeeded"}
    ckpt = Checkpoint(tmp_path / "j")
    assert ckpt.queue_ceiling() is not None  # learned, and kept for a restart
    learned, hasty = check_held_under_the_ceiling(tmp_path / "j")
    events = [json.loads(line) for line in (ckpt.events_file).read_text().splitlines()]
    if provider == "openai":
        # OpenAI takes the create and fails the batch at validation: the shards sent before
        # the first failure was seen are refused, and come back in smaller shards at the end.
        refused = sum(s.queue_limited for s in ckpt.shards().values())
        assert learned >= 1 and refused >= 1
    else:
        # Anthropic and Gemini refuse the create (429). The engine then waits for room: it
        # probes one shard more only once the queue has turned over, never on every pass.
        intents = sum(e["event"] == "intent" for e in events)
        refused = intents - sum(e["event"] == "submitted" for e in events)
        assert refused == learned >= 1 and hasty == 0
        assert created == 8 and most_live(tmp_path / "j") == 2
        # the 8 shards drain 2 at a time: a probe after each turnover but the last
        assert refused <= 1 + (8 - 2) // 2


def test_a_cancel_from_another_process_mid_planning_stops_it(tmp_path: Path, monkeypatch) -> None:
    write = engine.write_shard_files

    def cancelled_at_shard_4(source, shards, out):
        if shards[0].index == 4:  # what a cancel in another process writes first
            Checkpoint(tmp_path / "j").append("canceled")
        return write(source, shards, out)

    monkeypatch.setattr(engine, "write_shard_files", cancelled_at_shard_4)
    with serve(batch_seconds=5) as emu:
        out = batch(frame(40), emu, tmp_path / "j", output="answer", max_shard_requests=4)
        assert len(emu.ledger.batches) == 4  # shards 0-3 were live; nothing created after
    ckpt = Checkpoint(tmp_path / "j")
    assert sum(s.cancel_sent for s in ckpt.shards().values()) == 4  # the live ones asked
    assert ckpt.planning_done() and max(ckpt.shards()) == 5  # 4 and 5 written, never sent
    assert set(out["llm_status"]) == {"canceled"} and out.height == 40


def test_the_deadline_mid_planning_sends_the_unplanned_by_the_fallback(
    tmp_path: Path, monkeypatch
) -> None:
    write = engine.write_shard_files
    passed = {"yet": False}

    def deadline_at_shard_4(source, shards, out):
        passed["yet"] |= shards[0].index == 4  # shards 0-3 are live by now
        return write(source, shards, out)

    monkeypatch.setattr(engine, "write_shard_files", deadline_at_shard_4)
    monkeypatch.setattr(engine.Engine, "past_deadline", lambda self: passed["yet"])
    with serve(batch_seconds=5) as emu:
        out = batch(frame(40), emu, tmp_path / "j", output="answer", max_shard_requests=4,
                    deadline=3600.0)  # fmt: skip
        bills = emu.ledger.billed
        assert len(emu.ledger.batches) == 4  # nothing created past the deadline
    assert set(out["llm_status"]) == {"succeeded"} and out.height == 40
    ids = [b["custom_id"] for b in bills if b["custom_id"]]  # sync bills carry none
    assert len(bills) == 40 and len(ids) == len(set(ids))  # each paid once, batch or fallback
    assert {b["tier"] for b in bills} <= {"batch", "flex"} and "flex" in {b["tier"] for b in bills}
    ckpt = Checkpoint(tmp_path / "j")
    first = [s for s in ckpt.shards().values() if s.round == 1]
    assert [s.index for s in first] == [0, 1, 2, 3, 4, 5]  # 6-9 never planned as batches
    assert {s.mode for s in ckpt.shards().values() if s.round > 1} == {"flex"}


class Crash(Exception):
    pass


def test_a_rerun_with_other_shard_caps_finishes_the_plan_it_began(
    tmp_path: Path, monkeypatch
) -> None:
    write = engine.write_shard_files

    def crash_at_shard_4(source, shards, out):
        if shards[0].index == 4:
            raise Crash  # the process dies mid-planning, shards 0-3 recorded (0-3 live)
        return write(source, shards, out)

    with serve(batch_seconds=0.3) as emu:
        with monkeypatch.context() as m:
            m.setattr(engine, "write_shard_files", crash_at_shard_4)
            with pytest.raises(Crash):
                batch(frame(40), emu, tmp_path / "j", output="answer", max_shard_requests=4)
        # the same call again, with another cap (or none): the job keeps the bounds it began
        out = batch(frame(40), emu, tmp_path / "j", output="answer", max_shard_requests=7)
        assert not emu.ledger.billed_twice() and len(emu.ledger.billed) == 40
        assert [b["requests"] for b in emu.ledger.batches] == [4] * 10
    assert set(out["llm_status"]) == {"succeeded"} and out.height == 40
    assert json.loads((tmp_path / "j" / "job.json").read_text())["format"] == 2


def test_a_refusal_among_shards_of_unknown_tokens_bounds_requests_only(tmp_path: Path) -> None:
    from polars_llmbatch.plan.requests import build_spec

    spec, prov = build_spec(provider="openai", model="gpt-4o-mini")
    ckpt = Checkpoint(tmp_path / "j")
    ckpt.path.mkdir()
    # shards recorded before shards kept their tokens: 0, unknown
    shards = [
        {"shard": i, "attempt": 1, "requests": 10, "sha256": "x", "tag": f"t{i}",
         "filename": f"{i:05d}.jsonl"} | ({"tokens": 500} if i == 2 else {})
        for i in range(3)
    ]  # fmt: skip
    ckpt.append("planned", shards=shards)
    ckpt.append("submitted", shard=0, remote_id="b0")
    run = engine.Engine(ckpt, prov, spec, None, engine.Settings(), key="row_nr")
    records = ckpt.shards()
    queue = engine._Queue(run, records)
    queue.refused(records[1])
    assert ckpt.queue_ceiling() == (None, 19)  # 10 live + 10 refused, less one; tokens unknown
    assert engine._Queue(run, ckpt.shards()).holds(records[1])  # 10 + 10 > 19
    records[2].requests = 9
    assert not engine._Queue(run, ckpt.shards()).holds(records[2])  # 10 + 9: no token bound


def test_the_ceiling_rises_by_a_shard_once_the_queue_has_turned_over(tmp_path: Path) -> None:
    """Hand-made log: two live batches, a third refused. Other jobs' batches share the queue
    unseen, so once two of this job's batches have ended the ceiling rises by the largest
    shard (and the next create probes it); a refusal lowers it again. A restart folds the
    same log to the same ceiling."""
    from polars_llmbatch.plan.requests import build_spec

    spec, prov = build_spec(provider="openai", model="gpt-4o-mini")
    ckpt = Checkpoint(tmp_path / "j")
    ckpt.path.mkdir()
    sizes = [(100, 10), (100, 10), (100, 10), (150, 12), (100, 10), (100, 10)]
    shards = [
        {"shard": i, "attempt": 1, "requests": r, "tokens": t, "sha256": "x", "tag": f"t{i}",
         "filename": f"{i:05d}.jsonl"}
        for i, (t, r) in enumerate(sizes)
    ]  # fmt: skip
    ckpt.append("planned", shards=shards)
    for i in (0, 1):
        ckpt.append("submitted", shard=i, remote_id=f"b{i}")
    run = engine.Engine(ckpt, prov, spec, None, engine.Settings(), key="row_nr")
    records = ckpt.shards()
    engine._Queue(run, records).refused(records[2])
    assert ckpt.queue_ceiling() == (299, 29)  # 3 x 100 tokens and 3 x 10 requests, less one
    ckpt.append("done", shard=0, queue_limited=False, counts={"succeeded": 10})
    assert ckpt.queue_ceiling() == (299, 29)  # one of the two: not turned over yet
    ckpt.append("submitted", shard=2, remote_id="b2")
    ckpt.append("done", shard=1, queue_limited=False, counts={"succeeded": 10})
    assert ckpt.queue_ceiling() == (449, 41)  # + the largest shard (150 tokens, 12 requests)
    assert Checkpoint(tmp_path / "j").queue_ceiling() == (449, 41)  # a restart folds the same
    queue = engine._Queue(run, ckpt.shards())  # shard 2 live: 100 tokens, 10 requests
    assert not queue.holds(ckpt.shards()[3])  # 100 + 150 <= 449: the probe goes
    queue.took(ckpt.shards()[3])
    ckpt.append("submitted", shard=3, remote_id="b3")
    # a batch that fails for the full queue does not count as room made
    ckpt.append("submitted", shard=4, remote_id="b4")
    ckpt.append("done", shard=4, queue_limited=True, counts={"errored": 10})
    assert ckpt.queue_ceiling() == (449, 41)
    queue.refused(ckpt.shards()[5])  # 2 and 3 live, 5 refused: 349 tokens, 31 requests, less one
    assert ckpt.queue_ceiling() == (349, 31)
    ckpt.append("done", shard=2, queue_limited=False, counts={"succeeded": 10})
    assert ckpt.queue_ceiling() == (349, 31)
    ckpt.append("done", shard=3, queue_limited=False, counts={"succeeded": 12})
    assert ckpt.queue_ceiling() == (499, 43)
