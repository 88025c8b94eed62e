"""The emulator's columnar batch path gives what its per-request model gives, line for line.

Big OpenAI chat batches are validated and answered in columns (``emulator/columns.py``,
``openai.parse_chat`` / ``answer_chat``); small and unusual ones line by line. The per-request
path is the reference here: the same file through both must give the same result files (ids
aside), the same bills and the same batch object, faults included, and a file the line-by-line
validator refuses must never be taken by the columnar one.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import httpx
import polars as pl
import pytest

from polars_llmbatch.emulator import Faults, columns, model, serve
from polars_llmbatch.emulator import openai as emulated
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes

CATS = ["billing", "bug", "feature", "other"]
AUTH = {"Authorization": "Bearer test-key"}

# Text that is hard to split into words and to escape as JSON: unicode spaces that are not
# ASCII whitespace, quotes, backslashes, control characters, emoji, line separators.
PIECES = ["a", "b", " ", "\t", "\n", "é", "中", '"', "\\", "\u2028", "\x1c", "\u3000", "\xa0"]
PIECES += ["😀", "word", "Classify:", "\x00"]


def texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))) for _ in range(n)]


SCHEMAS: list[dict[str, Any] | None] = [
    None,
    {"type": "object", "properties": {"label": {"type": "string", "enum": CATS}}},
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "number"},
            "c": {"type": "boolean"},
            "d": {"type": "string", "format": "date"},
            "e": {"type": "string", "format": "date-time"},
            "f": {"type": "string"},
            "g": {"type": "array", "items": {"enum": [1, "x", None, 2.5]}},
            "h": {"type": ["null", "object"], "properties": {"z": {"$ref": "#/$defs/Z"}}},
            "i": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
            "j": {"type": "null"},
            "k": {"type": "object", "properties": {}},
        },
        "$defs": {"Z": {"type": "array", "items": {"type": "number"}}},
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["text", "enum", "every-kind"])
@pytest.mark.parametrize("cap", [None, 3])
def test_answers_equal_the_per_request_model(schema, cap) -> None:
    prompts = [*texts(1500), "", " ", "x"]
    caps = pl.Series([cap if i % 2 else None for i in range(len(prompts))], dtype=pl.Int64)
    got = columns.answers(pl.Series(prompts), schema, caps)
    expected = [model.answer(p, schema, c) for p, c in zip(prompts, caps.to_list(), strict=True)]
    assert [tuple(r) for r in got.rows()] == expected
    if cap is not None:
        assert got["cut"].any()  # the cap was really exercised


def test_fault_hits_and_hashes_equal_the_per_request_ones() -> None:
    ids = pl.Series([f"id-{i}" for i in range(4000)] + ['q"uote', "é"])
    f = Faults(seed=7)
    got = columns.hits(7, "missing", 0.1, ids).to_list()
    assert got == [f.hits("missing", 0.1, c) for c in ids]
    assert 300 < sum(got) < 500
    assert not columns.hits(7, "missing", 0.0, ids).any()
    joined = pl.Series([f"{p}|path" for p in texts(200)])
    assert columns.stable_ints(joined).to_list() == [model.stable_int(t) for t in joined]


def test_json_strings_are_what_a_json_encoder_writes() -> None:
    values = [*texts(500), "", '"', "\\", "\x7f", "\u2028"]
    got = columns.json_strings(pl.Series(values)).to_list()
    assert [json.loads(g) for g in got] == values


def test_ids_in_a_block_are_fresh_and_the_same_shape() -> None:
    with serve() as emu:
        ctx = emu.ctx
        one = ctx.new_id("req_")
        block = ctx.new_ids("req_", 1000).to_list()
        after = ctx.new_id("req_")
    every = [one, *block, after]
    assert len(set(every)) == len(every)
    assert {len(i) for i in every} == {len(one)}
    assert sorted(every) == every  # counted on from the same counter


# ---- a whole batch through both paths --------------------------------------------------------


def shard(
    n: int,
    *,
    output: Any,
    cap: int,
    system: str | None = None,
    provider: str = "openai",
    seed: int = 3,
) -> bytes:
    """One shard of ``n`` distinct, hard-to-escape prompts, as the library writes it."""
    model = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}[provider]
    df = pl.DataFrame({"body": [f"{i}: {b}" for i, b in enumerate(texts(n, seed=seed))]})
    p = prepare(
        df,
        "Classify: {body}",
        provider=provider,
        model=model,
        output=output,
        system=system,
        options={"max_output_tokens": cap},
    )
    (s,) = plan(p)
    return shard_bytes(p, s)


def run_batch(
    data: bytes, faults: Faults, *, in_columns: bool, monkeypatch, cancel: bool = False
) -> dict[str, Any]:
    """Upload, create and wait: the batch object, both files' lines and the bills, with the
    ids (fresh on every run) blanked."""
    monkeypatch.setattr(emulated, "COLUMNS_FROM", 0 if in_columns else 10**9)
    with serve(batch_seconds=0.05 if not cancel else 30, faults=faults) as emu:
        start = time.time()
        if cancel:  # a clock that moves only when told: the cancel lands at the same share
            emu.ctx.clock = lambda: start
        c = httpx.Client(base_url=emu.openai_url, headers=AUTH, timeout=60)
        f = c.post("/files", files={"file": ("s.jsonl", data)}, data={"purpose": "batch"})
        body = {
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        b = c.post("/batches", json=body).json()
        if cancel:
            emu.ctx.clock = lambda: start + 15  # halfway through: about half the requests ran
            c.post(f"/batches/{b['id']}/cancel")
            emu.ctx.clock = lambda: start + 90
        deadline = time.monotonic() + 60
        while b["status"] not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, b["status"]
            b = c.get(f"/batches/{b['id']}").json()
        files = {}
        for attr in ("output_file_id", "error_file_id"):
            raw = c.get(f"/files/{b[attr]}/content").text if b[attr] else ""
            # not splitlines(): answers hold U+2028 and \x1c, which it splits on too
            files[attr] = [_blank(line) for line in raw.split("\n")[:-1]]
        bills = emu.ledger.billed
        c.close()
    for key in ("id", "input_file_id", "output_file_id", "error_file_id"):
        b[key] = bool(b[key])
    for key in list(b):
        if key.endswith("_at"):
            b[key] = bool(b[key])
    return {
        "batch": b,
        **files,
        "bills": [(x["custom_id"], x["input_tokens"], x["output_tokens"]) for x in bills],
    }


_IDS = re.compile(r"(batch_req_|req_|chatcmpl-|msg_)[0-9a-f]{1,24}")


def _blank(line: str) -> Any:
    """The line with its fresh ids blanked: parsed, or as text when a fault cut it (the cut
    falls in the same place, ids having one length)."""
    line = _IDS.sub(r"\1-", line)
    try:
        return json.loads(line)
    except ValueError:
        return ("malformed", line)


CASES = {
    "enum": ({"output": CATS, "cap": 20}, Faults()),
    "text-cut": ({"output": None, "cap": 4, "system": "Be brief."}, Faults(cache_read=0.3)),
    "faults": (
        {"output": CATS, "cap": 20},
        Faults(seed=5, request_errors=0.1, missing=0.05, duplicates=0.05, malformed=0.05),
    ),
    "expired": ({"output": None, "cap": 30}, Faults(seed=2, expire_at=0.6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_batch_in_columns_equals_the_batch_line_by_line(case, monkeypatch) -> None:
    shape, faults = CASES[case]
    data = shard(700, **shape)
    by_line = run_batch(data, faults, in_columns=False, monkeypatch=monkeypatch)
    in_columns = run_batch(data, faults, in_columns=True, monkeypatch=monkeypatch)
    assert by_line["output_file_id"], "the reference run answered nothing"
    assert in_columns == by_line


def test_a_cancelled_batch_in_columns_equals_the_batch_line_by_line(monkeypatch) -> None:
    data = shard(600, output=CATS, cap=20)
    by_line = run_batch(data, Faults(), in_columns=False, monkeypatch=monkeypatch, cancel=True)
    in_columns = run_batch(data, Faults(), in_columns=True, monkeypatch=monkeypatch, cancel=True)
    assert by_line["batch"]["status"] == "cancelled"
    assert 0 < len(by_line["output_file_id"]) < 600 and by_line["error_file_id"]
    assert in_columns == by_line


def anthropic_shard(n: int, **shape: Any) -> bytes:
    return shard(n, provider="anthropic", seed=4, **shape)


def run_anthropic(
    data: bytes, faults: Faults, *, in_columns: bool, monkeypatch, cancel: bool = False
) -> dict[str, Any]:
    from polars_llmbatch.emulator import anthropic

    monkeypatch.setattr(anthropic, "COLUMNS_FROM", 0 if in_columns else 10**9)
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    with serve(batch_seconds=0.05 if not cancel else 30, faults=faults) as emu:
        start = time.time()
        emu.ctx.clock = lambda: start
        c = httpx.Client(base_url=emu.anthropic_url, headers=headers, timeout=60)
        b = c.post("/v1/messages/batches", content=data).json()
        if cancel:
            emu.ctx.clock = lambda: start + 15
            c.post(f"/v1/messages/batches/{b['id']}/cancel")
        emu.ctx.clock = lambda: start + 90
        b = c.get(f"/v1/messages/batches/{b['id']}").json()
        assert b["processing_status"] == "ended"
        raw = c.get(b["results_url"]).text
        bills = emu.ledger.billed
        c.close()
    lines = [_blank(line) for line in raw.split("\n")[:-1]]
    return {
        "counts": b["request_counts"],
        "lines": lines,
        "bills": [(x["custom_id"], x["input_tokens"], x["output_tokens"]) for x in bills],
    }


ANTHROPIC_CASES = {
    "enum-cached": ({"output": CATS, "cap": 20}, Faults(cache_read=0.2, cache_write=0.1)),
    "text-cut-system": ({"output": None, "cap": 4, "system": "Be brief."}, Faults()),
    "faults": (
        {"output": CATS, "cap": 20},
        Faults(seed=5, request_errors=0.1, missing=0.05, duplicates=0.05, malformed=0.05),
    ),
    "expired": ({"output": None, "cap": 30}, Faults(seed=2, expire_at=0.6)),
}


@pytest.mark.parametrize("case", [*ANTHROPIC_CASES, "cancelled"])
def test_an_anthropic_batch_in_columns_equals_the_batch_request_by_request(
    case, monkeypatch
) -> None:
    shape, faults = ANTHROPIC_CASES.get(case, ({"output": CATS, "cap": 20}, Faults()))
    data = anthropic_shard(700, **shape)
    cancel = case == "cancelled"
    by_one = run_anthropic(data, faults, in_columns=False, monkeypatch=monkeypatch, cancel=cancel)
    in_columns = run_anthropic(
        data, faults, in_columns=True, monkeypatch=monkeypatch, cancel=cancel
    )
    assert by_one["counts"]["succeeded"] > 300
    if cancel:
        assert by_one["counts"]["canceled"] > 100
    assert in_columns == by_one


def test_an_anthropic_batch_with_odd_requests_answers_them_one_by_one(monkeypatch) -> None:
    """A refused model and params the columns do not read take the per-request path inside
    a columnar batch, with the same results."""
    good = json.loads(anthropic_shard(30, output=CATS, cap=20))["requests"]
    good[3]["params"]["model"] = "claude-nonexistent-9"
    good[7]["params"]["max_tokens"] = "20"  # a string: the per-request path errors it
    good[9]["params"]["messages"][0]["content"] = [{"type": "text", "text": "parts"}]
    data = json.dumps({"requests": good}).encode()
    by_one = run_anthropic(data, Faults(), in_columns=False, monkeypatch=monkeypatch)
    in_columns = run_anthropic(data, Faults(), in_columns=True, monkeypatch=monkeypatch)
    assert by_one["counts"]["errored"] == 2 and by_one["counts"]["succeeded"] == 28
    assert in_columns == by_one


def run_gemini(
    df: pl.DataFrame, faults: Faults, tmp: Any, *, in_columns: bool, monkeypatch, **kw: Any
) -> dict[str, Any]:
    """A whole job through the library: every result file and inline output the emulator
    made, the bills, and the answers the job read back."""
    from helpers import batch

    from polars_llmbatch.emulator import gemini

    monkeypatch.setattr(gemini, "COLUMNS_FROM", 0 if in_columns else 10**9)
    with serve(batch_seconds=0.05, faults=faults) as emu:
        out = batch(df, emu, tmp / ("columns" if in_columns else "one"), provider="gemini", **kw)
        store = emu.gemini
        made = [f.data.decode() for f in store.files.values() if f.source == "GENERATED"]
        inline = [
            (b.final.get("response") or {}).get("inlinedResponses") for b in store.batches.values()
        ]
        bills = [(x["custom_id"], x["input_tokens"], x["output_tokens"]) for x in emu.ledger.billed]
    return {"files": made, "inline": inline, "bills": bills, "rows": out.to_dicts()}


GEMINI_CASES = {
    "enum-cached": ({"output": CATS}, Faults(cache_read=0.25)),
    "text-cut-system": ({"max_output_tokens": 4, "system": "Be brief."}, Faults()),
    "faults": (
        {"output": CATS},
        Faults(seed=5, request_errors=0.1, missing=0.05, duplicates=0.05, malformed=0.05),
    ),
}


@pytest.mark.parametrize("form", ["inline", "file"])
@pytest.mark.parametrize("case", list(GEMINI_CASES))
def test_a_gemini_batch_in_columns_equals_the_batch_request_by_request(
    case, form, monkeypatch, tmp_path
) -> None:
    from polars_llmbatch.providers import gemini as provider

    if form == "file":
        monkeypatch.setattr(provider, "INLINE_MAX_BYTES", 0)
    kw, faults = GEMINI_CASES[case]
    df = pl.DataFrame({"body": [f"{i}: {b}" for i, b in enumerate(texts(600, seed=6))]})
    by_one = run_gemini(df, faults, tmp_path, in_columns=False, monkeypatch=monkeypatch, **kw)
    in_columns = run_gemini(df, faults, tmp_path, in_columns=True, monkeypatch=monkeypatch, **kw)
    assert len(by_one["bills"]) >= 500
    assert bool(by_one["files"]) == (form == "file")
    assert in_columns == by_one


def _line(i: int, **change: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}]}
    line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    for path, value in change.items():
        *parents, last = path.split("__")
        node = line
        for p in parents:
            node = node[p]
        if value is KeyError:
            node.pop(last)
        else:
            node[last] = value
    return line


# Files the per-line validator refuses (the batch fails), then files it takes whose shape the
# columns leave to the line-by-line path (a per-request 400, or content parts).
REFUSED = {
    "not-json": lambda lines: [*lines[:3], "{not json", *lines[3:]],
    "duplicate-id": lambda lines: [*lines, lines[0]],
    "other-url": lambda lines: [*lines, json.dumps(_line(99, url="/v1/embeddings"))],
    "get": lambda lines: [*lines, json.dumps(_line(99, method="GET"))],
    "method-null": lambda lines: [*lines, json.dumps(_line(99, method=None))],
    "two-models": lambda lines: [*lines, json.dumps(_line(99, body__model="gpt-4o"))],
    "no-model": lambda lines: [*lines, json.dumps(_line(99, body__model=KeyError))],
    "no-body": lambda lines: [*lines, json.dumps(_line(99, body=KeyError))],
    "array-line": lambda lines: [*lines, "[1, 2]"],
}
UNUSUAL = {
    "numeric-id": lambda lines: [*lines, json.dumps(_line(99, custom_id=99))],
    "content-parts": lambda lines: (
        [
            *lines,
            json.dumps(
                _line(
                    99,
                    body__messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                )
            ),
        ]
    ),
    "messages-null": lambda lines: [*lines, json.dumps(_line(99, body__messages=None))],
    "format-string": lambda lines: [*lines, json.dumps(_line(99, body__response_format="json"))],
    "cap-float": lambda lines: [*lines, json.dumps(_line(99, body__max_tokens=2.5))],
    "cr-lines": lambda lines: ["\r\n".join(lines)],
}


@pytest.mark.parametrize("bad", [*REFUSED, *UNUSUAL])
def test_the_columnar_reader_takes_only_files_the_validator_takes_whole(bad, monkeypatch) -> None:
    monkeypatch.setattr(emulated, "COLUMNS_FROM", 0)
    good = [json.dumps(_line(i)) for i in range(20)]
    clean = ("\n".join(good) + "\n").encode()
    parsed = emulated.parse_chat(clean, "/v1/chat/completions")
    assert parsed is not None and parsed["custom_id"].to_list() == [f"r{i}" for i in range(20)]
    data = ("\n".join({**REFUSED, **UNUSUAL}[bad](good)) + "\n").encode()
    _, errors = emulated.validate(data, "/v1/chat/completions", None)
    assert bool(errors) == (bad in REFUSED)
    assert emulated.parse_chat(data, "/v1/chat/completions") is None


def test_the_line_by_line_path_stays_for_small_files() -> None:
    data = shard(20, output=CATS, cap=20)
    assert emulated.COLUMNS_FROM > 20
    assert emulated.parse_chat(data, "/v1/chat/completions") is None


@pytest.mark.parametrize(
    "faults",
    [
        Faults(queue_limit_tokens=10),
        Faults(queue_limit_tokens=10**9, request_errors=0.2, seed=7),
        Faults(org_queue_tokens=10),
        Faults(org_queue_tokens=10**9, fault_batches=1, missing=0.1),
    ],
    ids=["queue-full", "queue-room", "org-full", "org-room"],
)
def test_an_anthropic_create_in_columns_refuses_and_takes_as_request_by_request(
    faults, monkeypatch
) -> None:
    data = anthropic_shard(600, output=CATS, cap=20)
    outcomes = []
    for in_columns in (False, True):
        from polars_llmbatch.emulator import anthropic

        monkeypatch.setattr(anthropic, "COLUMNS_FROM", 0 if in_columns else 10**9)
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        with serve(batch_seconds=0.05, faults=faults) as emu:
            c = httpx.Client(base_url=emu.anthropic_url, headers=headers, timeout=60)
            r = c.post("/v1/messages/batches", content=data)
            got: Any = (r.status_code, r.json() if r.status_code != 200 else None)
            if r.status_code == 200:
                b = r.json()
                deadline = time.monotonic() + 60
                while b["processing_status"] != "ended":
                    assert time.monotonic() < deadline
                    b = c.get(f"/v1/messages/batches/{b['id']}").json()
                raw = c.get(b["results_url"]).text
                got = (b["request_counts"], sorted(raw.split("\n")), len(emu.ledger.billed))
                got = (got[0], [_IDS.sub("", line) for line in got[1]], got[2])
            c.close()
        outcomes.append(got)
    assert outcomes[0] == outcomes[1]


def _anthropic_body(change: Any) -> bytes:
    good = json.loads(anthropic_shard(20, output=CATS, cap=20))["requests"]
    return json.dumps({"requests": change(good)}).encode()


# Bodies the create refuses (the same 400 either way), then bodies it takes whose shape the
# columnar reader leaves to the per-request path.
ANTHROPIC_REFUSED = {
    "duplicate-id": lambda r: [*r, r[0]],
    "bad-id": lambda r: [*r, {**r[0], "custom_id": "has space"}],
    "numeric-id": lambda r: [*r, {**r[0], "custom_id": 7}],
    "no-params": lambda r: [*r, {"custom_id": "x1"}],
    "params-list": lambda r: [*r, {"custom_id": "x1", "params": []}],
    "not-an-object": lambda r: [*r, "text"],
    "empty": lambda r: [],
}
ANTHROPIC_UNUSUAL = {
    "id-newline": lambda r: [*r, {**r[0], "custom_id": "abc\n"}],
    "content-blocks": lambda r: [
        *r,
        {
            "custom_id": "x1",
            "params": {
                **r[0]["params"],
                "messages": [{"role": "user", "content": [{"text": "a"}]}],
            },
        },
    ],
    "cap-string": lambda r: [
        *r,
        {"custom_id": "x1", "params": {**r[0]["params"], "max_tokens": "9"}},
    ],
    "two-models": lambda r: [
        *r,
        {"custom_id": "x1", "params": {**r[0]["params"], "model": "claude-opus-4-1"}},
    ],
    "refused-model": lambda r: [
        {"custom_id": x["custom_id"], "params": {**x["params"], "model": "claude-nonexistent-9"}}
        for x in r
    ],
    "system-blocks": lambda r: [
        *r,
        {
            "custom_id": "x1",
            "params": {**r[0]["params"], "system": [{"type": "text", "text": "s"}]},
        },
    ],
    "no-role": lambda r: [
        *r,
        {"custom_id": "x1", "params": {**r[0]["params"], "messages": [{"content": "hi"}]}},
    ],
}


@pytest.mark.parametrize("bad", [*ANTHROPIC_REFUSED, *ANTHROPIC_UNUSUAL])
def test_the_anthropic_columnar_reader_takes_only_bodies_taken_whole(bad, monkeypatch) -> None:
    from polars_llmbatch.emulator import anthropic

    clean = _anthropic_body(lambda r: r)
    parsed = anthropic.parse_batch(clean)
    assert parsed is not None and parsed.height == 20
    data = _anthropic_body({**ANTHROPIC_REFUSED, **ANTHROPIC_UNUSUAL}[bad])
    assert anthropic.parse_batch(data) is None
    replies = []
    for threshold in (10**9, 0):
        monkeypatch.setattr(anthropic, "COLUMNS_FROM", threshold)
        with serve(batch_seconds=0.05) as emu:
            r = httpx.post(
                emu.anthropic_url + "/v1/messages/batches", content=data, headers={"x-api-key": "k"}
            )
            replies.append((r.status_code, r.json().get("error")))
    assert replies[0] == replies[1]
    assert (replies[0][0] == 400) == (bad in ANTHROPIC_REFUSED)


def test_the_anthropic_columnar_reader_skips_small_bodies() -> None:
    from polars_llmbatch.emulator import anthropic

    assert anthropic.COLUMNS_FROM > 20
    with serve(batch_seconds=0.05) as emu:
        body = anthropic_shard(20, output=CATS, cap=20)
        r = httpx.post(
            emu.anthropic_url + "/v1/messages/batches", content=body, headers={"x-api-key": "k"}
        )
        assert r.status_code == 200
        assert emu.anthropic.batches[r.json()["id"]].computed is None  # the per-request path


# ---- a Gemini batch file read in columns (emulator/gemini_columns.py) ------------------------


def gemini_file(n: int, *, output: Any = CATS, cap: int | None = 20, system: str | None = None):
    """A batch file of ``n`` hard-to-escape prompts, as the library writes it for Gemini."""
    from polars_llmbatch.providers import gemini as provider

    df = pl.DataFrame({"body": [f"{i}: {b}" for i, b in enumerate(texts(n, seed=8))]})
    options = {"max_output_tokens": cap} if cap is not None else {}
    p = prepare(
        df,
        "Classify: {body}",
        provider="gemini",
        model="gemini-2.5-flash",
        output=output,
        system=system,
        options=options,
    )
    keep = provider.INLINE_MAX_BYTES
    provider.INLINE_MAX_BYTES = 0  # the file form
    try:
        (s,) = plan(p)
        return shard_bytes(p, s)
    finally:
        provider.INLINE_MAX_BYTES = keep


def run_gemini_file(
    data: bytes, faults: Faults, *, in_columns: bool, monkeypatch, cancel: bool = False
) -> Any:
    """Upload, create (cancel) and end a file batch over HTTP: the operation, the responses
    file's lines and the bills, with fresh names blanked; or the create's refusal."""
    from polars_llmbatch.emulator import gemini

    monkeypatch.setattr(gemini, "COLUMNS_FROM", 0 if in_columns else 10**9)
    with serve(batch_seconds=30, faults=faults) as emu:
        start = 1_800_000_000.0  # the same clock in both runs: the same times in the operation
        emu.ctx.clock = lambda: start
        c = httpx.Client(base_url=emu.gemini_url, headers={"x-goog-api-key": "k"}, timeout=60)
        r = c.post(
            "/upload/v1beta/files",
            headers={"x-goog-upload-command": "start"},
            json={"file": {"displayName": "in"}},
        )
        r = c.post(
            r.headers["x-goog-upload-url"],
            content=data,
            headers={"x-goog-upload-command": "upload, finalize"},
        )
        name = r.json()["file"]["name"]
        body = {"batch": {"displayName": "t", "inputConfig": {"fileName": name}}}
        r = c.post("/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body)
        if r.status_code != 200:
            c.close()
            return r.status_code, r.text.replace(name, "FILE")
        op = r.json()
        if cancel:
            emu.ctx.clock = lambda: start + 15  # halfway: about half the requests ran
            assert c.post(f"/v1beta/{op['name']}:cancel").status_code == 200
        emu.ctx.clock = lambda: start + 90
        op = c.get(f"/v1beta/{op['name']}").json()
        assert op.get("done"), op
        out = (op.get("response") or {}).get("responsesFile")
        raw = c.get(f"/download/v1beta/{out}:download", params={"alt": "media"}).text if out else ""
        bills = [(x["custom_id"], x["input_tokens"], x["output_tokens"]) for x in emu.ledger.billed]
        c.close()
    batch_id = op["name"].split("/", 1)[1]
    blank = json.loads(json.dumps(op).replace(batch_id, "ID").replace(name, "FILE"))
    return {"op": blank, "lines": [_blank(x) for x in raw.split("\n")[:-1]], "bills": bills}


GEMINI_FILE_CASES = {
    "enum-cached": ({}, Faults(cache_read=0.25)),
    "text-cut-system": ({"output": None, "cap": 4, "system": "Be brief."}, Faults()),
    "no-cap": ({"cap": None}, Faults()),
    "faults": (
        {},
        Faults(seed=5, request_errors=0.1, missing=0.05, duplicates=0.05, malformed=0.05),
    ),
    "expired": ({"output": None}, Faults(seed=2, expire_at=0.6)),
    "queue-full": ({}, Faults(queue_limit_tokens=10)),
    "queue-room": ({}, Faults(queue_limit_tokens=10**9, request_errors=0.2, seed=7)),
    "org-full": ({}, Faults(org_queue_tokens=10)),
    "org-room": ({}, Faults(org_queue_tokens=10**9, fault_batches=1, missing=0.1)),
}


@pytest.mark.parametrize("case", [*GEMINI_FILE_CASES, "cancelled"])
def test_a_gemini_file_read_in_columns_equals_it_read_line_by_line(case, monkeypatch) -> None:
    from polars_llmbatch.emulator import gemini_columns

    shape, faults = GEMINI_FILE_CASES.get(case, ({}, Faults()))
    data = gemini_file(600, **shape)
    assert gemini_columns.parse_file(data, "gemini-2.5-flash") is not None  # the columns' path
    cancel = case == "cancelled"
    by_line = run_gemini_file(
        data, faults, in_columns=False, monkeypatch=monkeypatch, cancel=cancel
    )
    in_columns = run_gemini_file(
        data, faults, in_columns=True, monkeypatch=monkeypatch, cancel=cancel
    )
    if case.endswith("-full"):
        assert by_line[0] == 429
    elif case == "expired":
        assert not by_line["lines"] and "response" not in by_line["op"]
    else:
        assert len(by_line["lines"]) > (250 if cancel else 500)
    assert in_columns == by_line


def _gemini_line(i: int, **change: Any) -> str:
    line: dict[str, Any] = {
        "key": f"k{i}",
        "request": {
            "contents": [{"role": "user", "parts": [{"text": f"hello {i}"}]}],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "generationConfig": {"maxOutputTokens": 9},
        },
    }
    for path, value in change.items():
        *parents, last = path.split("__")
        node: Any = line
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            node.pop(last)
        else:
            node[last] = value
    return json.dumps(line)


# Files the create refuses (the same 400 either way), then files it takes whose shape the
# columnar reader leaves to the per-request path.
GEMINI_REFUSED = {
    "not-json": lambda lines: [*lines[:3], "{not json", *lines[3:]],
    "no-key": lambda lines: [*lines, _gemini_line(99, key=KeyError)],
    "no-request": lambda lines: [*lines, _gemini_line(99, request=KeyError)],
}
GEMINI_UNUSUAL = {
    "numeric-key": lambda lines: [*lines, _gemini_line(99, key=99)],
    "two-contents": lambda lines: [
        *lines,
        _gemini_line(
            99, request__contents=[{"parts": [{"text": "a"}]}, {"parts": [{"text": "b"}]}]
        ),
    ],
    "two-parts": lambda lines: [
        *lines,
        _gemini_line(99, request__contents=[{"parts": [{"text": "a"}, {"text": "b"}]}]),
    ],
    "model-role": lambda lines: [*lines, _gemini_line(99, request__contents__0__role="model")],
    "snake-config": lambda lines: [
        *lines,
        _gemini_line(99, request__generation_config={"max_output_tokens": 3}),
    ],
    "snake-system": lambda lines: [
        *lines,
        _gemini_line(99, request__system_instruction={"parts": [{"text": "s"}]}),
    ],
    "cap-float": lambda lines: [
        *lines,
        _gemini_line(99, request__generationConfig={"maxOutputTokens": 2.5}),
    ],
    "cap-huge": lambda lines: [
        *lines,
        _gemini_line(99, request__generationConfig={"maxOutputTokens": 2**64 - 1}),
    ],
    "schema-list": lambda lines: [
        *lines,
        _gemini_line(99, request__generationConfig={"responseJsonSchema": [1]}),
    ],
    "system-two-parts": lambda lines: [
        *lines,
        _gemini_line(99, request__systemInstruction={"parts": [{"text": "a"}, {"text": "b"}]}),
    ],
    "cr-lines": lambda lines: ["\r\n".join(lines)],
    "no-contents": lambda lines: [*lines, _gemini_line(99, request__contents=KeyError)],
}


@pytest.mark.parametrize("bad", [*GEMINI_REFUSED, *GEMINI_UNUSUAL])
def test_the_gemini_columnar_reader_takes_only_files_taken_whole(bad, monkeypatch) -> None:
    from polars_llmbatch.emulator import gemini_columns

    good = [_gemini_line(i) for i in range(20)]
    parsed = gemini_columns.parse_file(("\n".join(good) + "\n").encode(), "gemini-2.5-flash")
    assert parsed is not None and parsed["key"].to_list() == [f"k{i}" for i in range(20)]
    data = ("\n".join({**GEMINI_REFUSED, **GEMINI_UNUSUAL}[bad](good)) + "\n").encode()
    assert gemini_columns.parse_file(data, "gemini-2.5-flash") is None
    outcomes = [
        run_gemini_file(data, Faults(), in_columns=c, monkeypatch=monkeypatch)
        for c in (False, True)
    ]
    assert outcomes[0] == outcomes[1]
    refused = isinstance(outcomes[0], tuple)
    assert refused == (bad in GEMINI_REFUSED)


def test_the_gemini_columnar_reader_refuses_a_model_the_service_does_not_have() -> None:
    from polars_llmbatch.emulator import gemini_columns

    data = ("\n".join(_gemini_line(i) for i in range(5)) + "\n").encode()
    assert gemini_columns.parse_file(data, "gemini-2.5-flash") is not None
    assert gemini_columns.parse_file(data, "gemini-nonexistent-9") is None


def test_token_counts_split_between_threads_are_each_texts_own() -> None:
    from polars_llmbatch.emulator import tokenizers
    from polars_llmbatch.plan.tokens.encodings import get_encoding

    many = texts(25_000, seed=9)  # past the split: counted in two threads, put back in order
    enc = get_encoding("o200k_base")
    assert tokenizers.lengths("o200k_base", many) == [len(enc.encode_ordinary(t)) for t in many]
