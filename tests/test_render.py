"""The partition render: a pure function of (plan, Arrow batch) that agrees with the whole-frame
path wherever a frame is cut, and whose ids are the documented content hash."""

from __future__ import annotations

import hashlib
import json
import pickle

import polars as pl
import pytest

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan.render import render
from polars_llmbatch.plan.requests import prepare, render_plan

KW = {"provider": "openai", "model": "gpt-4o-mini"}


def _frame(n: int) -> pl.DataFrame:
    bodies = [
        None if i % 7 == 3 else f"ticket {i % 11} — naïve “quote” \u2028 {i % 5}" for i in range(n)
    ]
    return pl.DataFrame({"ticket_id": [f"T-{i}" for i in range(n)], "body": bodies})


@pytest.mark.parametrize("id", [None, "ticket_id"])
@pytest.mark.parametrize("cut", [1, 7, 50])
def test_batches_render_what_the_whole_frame_prepares(id: str | None, cut: int) -> None:
    df = _frame(50)
    whole = prepare(df, "Classify: {body}", id=id, **KW)
    plan = render_plan(df.schema, "Classify: {body}", id=id, **KW)
    parts = [
        render(plan, df.slice(start, cut).to_arrow(), offset=start)
        for start in range(0, df.height, cut)
    ]
    got = pl.concat(parts)
    assert got.select(plan.key, "custom_id", "skipped").equals(whole.rows)
    assert got["row"].to_list() == list(range(50))
    bodies = dict(whole.requests.select("custom_id", "body").iter_rows())
    for cid, body in got.select("custom_id", "body").iter_rows():
        assert body == bodies.get(cid)  # None for a skipped row


def test_the_id_is_the_documented_hash_and_the_plan_travels() -> None:
    df = pl.DataFrame({"t": ["hello"]})
    plan = render_plan(df.schema, "{t}", **KW)
    out = render(pickle.loads(pickle.dumps(plan)), df.to_arrow())  # as a worker receives it
    canonical = plan.digest + "\x1f5:hello"
    assert out["custom_id"].item() == hashlib.md5(canonical.encode()).hexdigest()
    assert json.loads(out["body"].item())["messages"] == [{"role": "user", "content": "hello"}]


def test_a_null_row_is_named_by_its_place_in_the_whole_input() -> None:
    df = pl.DataFrame({"body": ["a", None, "c"]})
    plan = render_plan(df.schema, "{body}", on_null="error", **KW)
    with pytest.raises(LlmBatchError, match=r"among rows 1,000-1,002.*first at row 1001"):
        render(plan, df.to_arrow(), offset=1000)


def test_an_empty_text_to_embed_is_refused_with_its_row() -> None:
    df = pl.DataFrame({"body": ["a", "b", ""]})
    plan = render_plan(df.schema, "{body}", provider="openai", model="text-embedding-3-small",
                       task="embed")  # fmt: skip
    with pytest.raises(LlmBatchError, match=r"empty text.*first at row 12"):
        render(plan, df.to_arrow(), offset=10)
