"""Wire bodies checked against the official SDKs' request types (test-only dependencies)."""

from __future__ import annotations

import json
from typing import Any, get_type_hints

import polars as pl
import pydantic
import pytest

from polars_llmbatch import LlmBatchError
from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes

DF = pl.DataFrame({"body": ['charged "twice"\n', "crash 日本語"], "tier": ["gold", "free"]})
CATS = ["billing", "bug", "feature", "other"]
STRUCT = {
    "label": pl.Enum(CATS),
    "urgency": pl.Int64,
    "summary": pl.String,
    "tags": pl.List(pl.String),
}


def bodies(provider: str, model: str, **kw: Any) -> list[dict[str, Any]]:
    p = prepare(DF, "Classify: {body}", provider=provider, model=model, **kw)
    return [json.loads(b) for b in p.requests["body"]]


def validate_typed_dict(td: type, obj: dict[str, Any]) -> None:
    """Validate types with pydantic and refuse keys the TypedDict does not declare."""
    unknown = set(obj) - set(get_type_hints(td))
    assert not unknown, f"{td.__name__} has no field(s) {unknown}"
    pydantic.TypeAdapter(td).validate_python(obj, strict=False)


# OpenAI -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "output": CATS,
            "system": "Be brief.",
            "options": {"max_output_tokens": 20, "temperature": 0},
        },
        {"output": STRUCT, "options": {"seed": 1, "stop": ["\n"], "top_p": 0.5}},
        {"system": "Tier {tier}"},
    ],
)
def test_openai_chat_body_matches_sdk(kw: dict[str, Any]) -> None:
    from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming

    for body in bodies("openai", "gpt-4o-mini", **kw):
        validate_typed_dict(CompletionCreateParamsNonStreaming, body)
        if "output" in kw:
            rf = body["response_format"]
            assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
            assert rf["json_schema"]["schema"]["additionalProperties"] is False


def test_openai_reasoning_models() -> None:
    for body in bodies(
        "openai", "o4-mini", options={"max_output_tokens": 50, "reasoning_effort": "low"}
    ):
        assert body["max_completion_tokens"] == 50 and "max_tokens" not in body
        assert body["reasoning_effort"] == "low"
    with pytest.raises(LlmBatchError, match="'o3' does not take stop"):
        bodies("openai", "o3", options={"stop": "END"})
    for body in bodies("openai", "gpt-5", options={"reasoning_effort": "max"}):
        assert body["reasoning_effort"] == "max"
    with pytest.raises(LlmBatchError, match="'gpt-5-mini' does not take temperature"):
        bodies("openai", "gpt-5-mini", options={"temperature": 0.2})
    with pytest.raises(LlmBatchError, match="not a reasoning model"):
        bodies("openai", "gpt-4o", options={"reasoning_effort": "low"})


def test_openai_responses_body_matches_sdk() -> None:
    from openai.types.responses.response_create_params import ResponseCreateParamsNonStreaming

    for body in bodies(
        "openai",
        "gpt-5-mini",
        api="responses",
        output=CATS,
        system="Be brief.",
        options={"max_output_tokens": 30},
    ):
        validate_typed_dict(ResponseCreateParamsNonStreaming, body)
        assert body["text"]["format"]["type"] == "json_schema"
    with pytest.raises(LlmBatchError, match="stop"):
        bodies("openai", "gpt-5-mini", api="responses", options={"stop": "x"})


def test_openai_embedding_body_matches_sdk() -> None:
    from openai.types.embedding_create_params import EmbeddingCreateParams

    for body in bodies("openai", "text-embedding-3-small", task="embed", dimensions=256):
        validate_typed_dict(EmbeddingCreateParams, body)
        assert body["dimensions"] == 256 and body["encoding_format"] == "base64"
    with pytest.raises(LlmBatchError, match="dimensions"):
        bodies("openai", "text-embedding-ada-002", task="embed", dimensions=256)
    with pytest.raises(LlmBatchError, match="no generation options"):
        bodies("openai", "text-embedding-3-small", task="embed", options={"temperature": 1})


def test_openai_batch_line_shape() -> None:
    p = prepare(DF, "{body}", provider="openai", model="gpt-4o-mini")
    (shard,) = plan(p)
    for line in shard_bytes(p, shard).decode().split("\n")[:-1]:
        obj = json.loads(line)
        assert list(obj) == ["custom_id", "method", "url", "body"]
        assert obj["url"] == "/v1/chat/completions"


# Anthropic --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"options": {"max_output_tokens": 64}},
        {
            "output": STRUCT,
            "system": "Tier {tier}",
            "options": {"max_output_tokens": 64, "stop": "END"},
        },
        {"output": CATS, "options": {"max_output_tokens": 64, "reasoning_effort": "low"}},
    ],
)
def test_anthropic_batch_body_matches_sdk(kw: dict[str, Any]) -> None:
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
    from anthropic.types.messages.batch_create_params import BatchCreateParams, Request

    p = prepare(DF, "Classify: {body}", provider="anthropic", model="claude-haiku-4-5", **kw)
    (shard,) = plan(p)
    create = json.loads(shard_bytes(p, shard))
    validate_typed_dict(BatchCreateParams, create)
    for req in create["requests"]:
        validate_typed_dict(Request, req)
        validate_typed_dict(MessageCreateParamsNonStreaming, req["params"])
        if "output" in kw:
            assert req["params"]["output_config"]["format"]["type"] == "json_schema"


def test_anthropic_refusals() -> None:
    with pytest.raises(LlmBatchError, match="max_output_tokens"):
        bodies("anthropic", "claude-haiku-4-5")
    with pytest.raises(LlmBatchError, match="no embeddings"):
        bodies("anthropic", "claude-haiku-4-5", task="embed")
    for name in ("temperature", "top_p", "seed"):
        with pytest.raises(LlmBatchError, match=f"does not take {name}: the current Messages API"):
            bodies("anthropic", "claude-haiku-4-5", options={"max_output_tokens": 5, name: 1})


# Gemini -----------------------------------------------------------------------------------
def check_gemini_request(req: dict[str, Any]) -> None:
    from google.genai import types

    assert set(req) <= {"contents", "systemInstruction", "generationConfig"}
    for content in req["contents"]:
        types.Content.model_validate(content)
    if "systemInstruction" in req:
        types.Content.model_validate(req["systemInstruction"])
    if "generationConfig" in req:
        types.GenerationConfig.model_validate(req["generationConfig"])  # extra="forbid"


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "output": STRUCT,
            "system": "Tier {tier}",
            "options": {
                "max_output_tokens": 64,
                "temperature": 0.2,
                "seed": 3,
                "stop": "END",
                "top_p": 0.5,
            },
        },
        {"output": CATS, "options": {"reasoning_effort": "low"}},
    ],
)
def test_gemini_bodies_match_sdk_types(kw: dict[str, Any]) -> None:
    model = (
        "gemini-3-flash-preview"
        if "reasoning_effort" in kw.get("options", {})
        else "gemini-2.5-flash"
    )
    p = prepare(DF, "Classify: {body}", provider="gemini", model=model, **kw)
    (shard,) = plan(p)
    assert shard.framing.kind == "inline"  # a small shard goes inline
    create = json.loads(shard_bytes(p, shard))
    entries = create["batch"]["inputConfig"]["requests"]["requests"]
    assert create["batch"]["displayName"] == shard.tag
    for entry in entries:
        assert set(entry) == {"request", "metadata"}
        check_gemini_request(entry["request"])
    if "output" in kw:
        cfg = entries[0]["request"]["generationConfig"]
        assert cfg["responseMimeType"] == "application/json" and "responseJsonSchema" in cfg


def test_gemini_file_form_for_large_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    from polars_llmbatch.providers import gemini

    monkeypatch.setattr(gemini, "INLINE_MAX_BYTES", 10)
    p = prepare(DF, "{body}", provider="gemini", model="gemini-2.5-flash")
    (shard,) = plan(p)
    assert shard.framing.kind == "file" and shard.filename.endswith(".jsonl")
    for line in shard_bytes(p, shard).decode().splitlines():
        obj = json.loads(line)
        assert list(obj) == ["key", "request"]
        check_gemini_request(obj["request"])


def test_gemini_embeddings() -> None:
    from google.genai import types

    for body in bodies("gemini", "gemini-embedding-001", task="embed", dimensions=768):
        types.Content.model_validate(body["content"])
        types.EmbedContentConfig.model_validate({k: v for k, v in body.items() if k != "content"})
        assert body["outputDimensionality"] == 768
    with pytest.raises(LlmBatchError, match="thinking levels start with Gemini 3"):
        bodies("gemini", "gemini-2.5-flash", options={"reasoning_effort": "low"})


# each provider's own words, behind the one interface ------------------------------------------
ERROR_BODIES = {
    "openai": {
        "error": {"message": "Invalid model", "type": "invalid_request_error", "param": None}
    },
    "anthropic": {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Invalid model"},
        "request_id": "req_1",
    },
    "gemini": {"error": {"code": 404, "message": "Invalid model", "status": "NOT_FOUND"}},
}


@pytest.mark.parametrize("name", sorted(ERROR_BODIES))
def test_each_provider_reads_its_own_error_shape(name: str) -> None:
    from polars_llmbatch.providers import get_provider

    prov = get_provider(name)
    assert prov.error_message(ERROR_BODIES[name]) == "Invalid model"
    assert prov.error_message({"detail": "not an error body"}) is None
    assert prov.error_message(["a list"]) is None
    # a call that got no answer is written in the provider's own shape and read back by it
    body = json.loads(prov.error_body("connection reset"))
    assert prov.error_message(body) == "connection reset"
    line = json.loads(prov.sync_line("r1", 503, prov.error_body("connection reset")))
    assert prov.line_id(line) == "r1"


def test_gemini_result_lines_carry_the_id_as_key() -> None:
    from polars_llmbatch.providers import get_provider

    assert get_provider("gemini").line_id({"key": "abc", "response": {}}) == "abc"
    assert get_provider("gemini").line_id({"custom_id": "abc"}) is None
    assert get_provider("openai").line_id({"custom_id": "abc"}) == "abc"


def _code_words(path) -> tuple[set[str], set[str]]:
    """The string literals and the names of a module's code (no docstrings, no comments)."""
    import ast

    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    literals, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            literals.add(node.value.lower())
        elif isinstance(node, ast.Name):
            names.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            names.add(node.attr.lower())
        elif isinstance(node, ast.alias):
            names.update(node.name.lower().split("."))
    return literals, names


def test_the_engine_and_transport_hold_no_provider_words() -> None:
    """Provider names, status words and wire fields live in the provider modules only."""
    from pathlib import Path

    import polars_llmbatch.run as run

    wire = {"key", "cancelled", "expire", "cancel", "processing_status", "x-api-key", "message"}
    providers = {"openai", "anthropic", "gemini", "google"}
    for module in ("engine.py", "transport.py"):
        literals, names = _code_words(Path(run.__file__).parent / module)
        found = sorted(
            {w for w in literals if w in wire or "batch_state" in w or w in providers}
            | (names & providers)
        )
        assert not found, f"run/{module} names {found}"
