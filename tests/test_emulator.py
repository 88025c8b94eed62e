"""The emulator as a whole: where it listens, the model, the fault switches, the ledger."""

from __future__ import annotations

import pytest

from polars_llmbatch.emulator import Faults, Ledger, model, serve


def test_binds_loopback_only_and_names_three_base_urls() -> None:
    with serve() as emu:
        host, port = emu.server._httpd.server_address[:2]
        assert host == "127.0.0.1" and port > 0
        urls = {k: v for k, v in emu.env().items() if k.endswith("_BASE_URL")}
        assert urls["OPENAI_BASE_URL"].endswith("/openai/v1")
        assert len(set(urls.values())) == 3  # one base URL per provider: no path collisions
        assert all(u.startswith(f"http://127.0.0.1:{port}/") for u in urls.values())


def test_model_is_deterministic_and_satisfies_schemas() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["a", "b", "c"]},
            "score": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "when": {"type": "string", "format": "date"},
            "ok": {"type": "boolean"},
        },
        "required": ["label", "score", "tags", "when", "ok"],
        "additionalProperties": False,
    }
    import json

    text, cut, n = model.answer("Classify: my card was charged twice", schema, None)
    value = json.loads(text)
    assert value["label"] == model.enum_pick(
        "Classify: my card was charged twice", "label", ["a", "b", "c"]
    )
    assert isinstance(value["score"], int) and len(value["tags"]) == 2 and not cut and n > 0
    assert model.answer("Classify: my card was charged twice", schema, None) == (text, cut, n)
    text, cut, n = model.answer("one two three four five six", None, 2)
    assert cut and n == 2
    v = model.embedding("hello", 32)
    assert v == model.embedding("hello", 32) and v != model.embedding("hello!", 32)
    assert abs(sum(x * x for x in v) - 1) < 1e-5


def test_faults_parse_and_pick_stable_victims() -> None:
    f = Faults.parse("request_errors=0.3,expire_at=0.5,seed=9,read_errors=2")
    assert f == Faults(request_errors=0.3, expire_at=0.5, seed=9, read_errors=2)
    hits = [f.hits("request_errors", 0.3, f"id{i}") for i in range(1000)]
    assert 250 < sum(hits) < 350 and hits == [
        f.hits("request_errors", 0.3, f"id{i}") for i in range(1000)
    ]
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.parse("nope=1")


def test_ledger_finds_double_billing() -> None:
    ledger = Ledger()
    ledger.bill("openai", "b1", "x", 10, 2)
    ledger.bill("openai", "b2", "x", 10, 2)
    ledger.bill("openai", None, "y", 10, 2)  # sync calls are not batches
    ledger.bill("anthropic", "b3", "z", 10, 2)
    assert ledger.billed_twice() == {"x": 2} and ledger.billed_twice("anthropic") == {}


def test_ids_never_collide() -> None:
    from polars_llmbatch.emulator.context import Context

    ctx = Context()
    ids = [ctx.new_id("batch_") for _ in range(5_000)] + [
        ctx.new_id("batch_", 12) for _ in range(300)
    ]
    assert len(set(ids)) == len(ids)
    assert {len(i) for i in ids[:5_000]} == {len("batch_") + 24}
