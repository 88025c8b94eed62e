"""OpenAI: Batch API request lines for ``/v1/chat/completions``, ``/v1/responses`` and ``/v1/embeddings``."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from polars_llmbatch._json import dumps, slot
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.providers import openai_admin, openai_remote
from polars_llmbatch.providers.base import (
    Framing,
    Limits,
    Provider,
    RemoteState,
    TokenRule,
    field_of,
    nested_message,
    with_field,
)

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["OpenAI", "count_chat_tokens", "encoding_for"]

# Reasoning models take max_completion_tokens and reasoning_effort, and reject temperature,
# top_p and stop.
_REASONING = re.compile(r"^(o\d|gpt-5|gpt-6)(?!.*-chat)")
# Models the cookbook's counting rules were checked on (exact); newer ones are off by up to ±2.
_COOKBOOK_EXACT = re.compile(r"^(gpt-3\.5|gpt-4$|gpt-4-|gpt-4o|chatgpt-4o)")
_CL100K = re.compile(r"^(gpt-4(?![o.])|gpt-3\.5|gpt-35|text-embedding|davinci-002|babbage-002)")
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # SDK ReasoningEffort


def encoding_for(model: str) -> str:
    """tiktoken encoding of an OpenAI model (tiktoken/model.py); unknown names get o200k_base."""
    name = model.removeprefix("ft:")
    return "cl100k_base" if _CL100K.match(name) else "o200k_base"


class OpenAI(Provider):
    """OpenAI's wire format. ``api="chat"`` (default) or ``"responses"`` for text; embeddings.

    Example:
        >>> from polars_llmbatch.plan.spec import RequestSpec
        >>> OpenAI().endpoint(RequestSpec("openai", "gpt-4o-mini"))
        '/v1/chat/completions'
    """

    name = "openai"
    limits = Limits(max_requests=50_000, max_bytes=200_000_000, max_embedding_inputs=50_000)
    env_key = ("OPENAI_API_KEY",)
    env_base_url = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"
    prices_id = "openai"
    truncated = frozenset({"length", "incomplete"})
    admin_env_key = ("OPENAI_ADMIN_KEY",)

    def endpoint(self, spec: RequestSpec) -> str:
        if spec.task == "embed":
            return "/v1/embeddings"
        return "/v1/responses" if spec.api == "responses" else "/v1/chat/completions"

    def auto_cache_min_tokens(self, spec: RequestSpec) -> int | None:
        # Prompt caching is automatic for prompts of 1,024 tokens or more.
        return None if spec.task == "embed" else 1024

    def max_input_tokens(self, spec: RequestSpec) -> int | None:
        return 8192 if spec.task == "embed" else None  # tokens per embedding input

    def check(self, spec: RequestSpec) -> None:
        if spec.api not in (None, "chat", "responses"):
            raise LlmBatchError(f"openai api= must be 'chat' or 'responses', not {spec.api!r}")

    # bodies -------------------------------------------------------------------------------
    def body(self, spec: RequestSpec, slots: tuple[str, ...]) -> dict[str, Any]:
        self.check(spec)
        if spec.task == "embed":
            return self._embedding(spec)
        reasoning = bool(_REASONING.match(spec.model))
        opts = dict(spec.options)
        for name in ("temperature", "top_p", "stop"):
            if reasoning and opts.get(name) is not None:
                raise self._refuse(spec, name, "reasoning models reject it; drop it")
        effort = opts.get("reasoning_effort")
        if effort is not None and not reasoning:
            raise self._refuse(spec, "reasoning_effort", "it is not a reasoning model")
        if effort is not None and effort not in _EFFORTS:
            raise LlmBatchError(
                f"openai reasoning_effort must be one of {_EFFORTS}, not {effort!r}"
            )
        system = slot("system") if "system" in slots else spec.system
        if spec.api == "responses":
            body = self._responses(spec, system, opts)
        else:
            body = self._chat(spec, system, opts)
        body.update(spec.extra_body)
        return body

    def _chat(self, spec: RequestSpec, system: str | None, opts: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "user", "content": slot("user")}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        body: dict[str, Any] = {"model": spec.model, "messages": messages}
        # max_completion_tokens is the one cap every current chat model takes (max_tokens is
        # rejected by reasoning models).
        _put(body, "max_completion_tokens", opts.get("max_output_tokens"))
        _put(body, "temperature", opts.get("temperature"))
        _put(body, "top_p", opts.get("top_p"))
        _put(body, "stop", opts.get("stop"))
        _put(body, "seed", opts.get("seed"))
        _put(body, "reasoning_effort", opts.get("reasoning_effort"))
        if spec.output is not None and spec.output.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": spec.output.name,
                    "strict": spec.output.strict,
                    "schema": spec.output.schema,
                },
            }
        return body

    def _responses(
        self, spec: RequestSpec, system: str | None, opts: dict[str, Any]
    ) -> dict[str, Any]:
        for name in ("stop", "seed"):
            if opts.get(name) is not None:
                raise self._refuse(
                    spec, name, "the Responses API has no such field; use api='chat'"
                )
        body: dict[str, Any] = {"model": spec.model}
        _put(body, "instructions", system)
        body["input"] = slot("user")
        _put(body, "max_output_tokens", opts.get("max_output_tokens"))
        _put(body, "temperature", opts.get("temperature"))
        _put(body, "top_p", opts.get("top_p"))
        if opts.get("reasoning_effort") is not None:
            body["reasoning"] = {"effort": opts["reasoning_effort"]}
        if spec.output is not None and spec.output.schema is not None:
            body["text"] = {
                "format": {
                    "type": "json_schema",
                    "name": spec.output.name,
                    "strict": spec.output.strict,
                    "schema": spec.output.schema,
                }
            }
        body["store"] = False  # batch results come back in the output file; nothing to keep
        return body

    def _embedding(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"model": spec.model, "input": slot("user")}
        if spec.dimensions is not None:
            if not spec.model.startswith("text-embedding-3"):
                raise self._refuse(
                    spec, "dimensions", "only text-embedding-3 models can shorten embeddings"
                )
            body["dimensions"] = spec.dimensions
        # base64 float32 is ~3x smaller than JSON floats and decodes straight into Arrow.
        body["encoding_format"] = "base64"
        body.update(spec.extra_body)
        return body

    # remote batches -----------------------------------------------------------------------
    def submit(self, t: Transport, spec: RequestSpec, data: bytes, *, tag: str, kind: str) -> str:
        return openai_remote.submit(
            t, data, endpoint=self.endpoint(spec), tag=tag, filename=f"{tag}.jsonl"
        )

    def find(
        self,
        t: Transport,
        *,
        tag: str,
        since: dt.datetime,
        requests: int,
        exclude: frozenset[str] = frozenset(),
        custom_ids: frozenset[str] = frozenset(),
    ) -> str | None:
        return openai_remote.find(t, tag, since=since.timestamp())

    def poll(self, t: Transport, remote_id: str) -> RemoteState:
        return openai_remote.poll(t, remote_id)

    def fetch(self, t: Transport, state: RemoteState, custom_ids: Sequence[str]) -> list[bytes]:
        return [openai_remote.download(t, f) for f in state.result_files]

    def parse(self, files: Sequence[Path], spec: RequestSpec) -> pl.DataFrame:
        return parse_results([str(f) for f in files], embeddings=spec.task == "embed")

    def cancel(self, t: Transport, remote_id: str) -> None:
        openai_remote.cancel(t, remote_id)

    def stops_job(self, status: int, message: str) -> bool:
        # A 429 that is no rate limit: the account is out of credit.
        return super().stops_job(status, message) or "insufficient_quota" in message

    def queue_limited(self, state: RemoteState) -> bool:
        return state.status == "failed" and "token_limit_exceeded" in (state.error or "")

    def sync_path(self, spec: RequestSpec) -> str:
        return self.endpoint(spec).removeprefix("/v1")  # the base URL ends in /v1

    def sync_line(self, custom_id: str, status: int, body: bytes) -> bytes:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"error": {"message": body[:500].decode(errors="replace")}}
        line = {
            "custom_id": custom_id,
            "response": {"status_code": status, "body": parsed},
            "error": None,
        }
        return dumps(line).encode()

    def error_body(self, message: str) -> bytes:
        return dumps({"error": {"message": message}}).encode()

    def line_id(self, record: dict[str, Any]) -> str | None:
        return field_of(record, "custom_id")

    def error_message(self, body: Any) -> str | None:
        return nested_message(body)  # {"error": {"message", "type", "param", "code"}}

    # shards -------------------------------------------------------------------------------
    def framing(self, spec: RequestSpec, tag: str, n_requests: int, payload_bytes: int) -> Framing:
        line = {
            "custom_id": slot("key"),
            "method": "POST",
            "url": self.endpoint(spec),
            "body": slot("body"),
        }
        return Framing(line=line)

    # tokens -------------------------------------------------------------------------------
    # flex ------------------------------------------------------------------------------
    def flex_body(self, spec: RequestSpec, body: str) -> str | None:
        # ``service_tier: "flex"`` on chat and responses (developers.openai.com, flex
        # processing); embeddings have no flex tier.
        if spec.task == "embed":
            return None
        return with_field(body, '"service_tier":"flex"')

    # the bill ------------------------------------------------------------------------
    def billed_usage(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        return openai_admin.usage(t, start, end)

    def billed_costs(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        return openai_admin.costs(t, start, end)

    def token_rule(self, spec: RequestSpec) -> TokenRule:
        enc = encoding_for(spec.model)
        if spec.task == "embed":
            return TokenRule(enc, per_request=0, per_message=0, method="exact (tiktoken)")
        structured = spec.output is not None and spec.output.schema is not None
        # Exact only where the cookbook rules were checked against the API: plain chat messages
        # on the models it names. A schema's overhead is a community recipe (±2 tokens).
        exact = bool(_COOKBOOK_EXACT.match(spec.model)) and spec.api != "responses"
        exact = exact and not structured
        per_request = 3  # primes the assistant's reply
        if structured:
            per_request += _schema_tokens(spec.output.schema, enc)
        return TokenRule(
            enc,
            per_request=per_request,
            per_message=4,  # 3 framing + 1 for the role
            slack=0 if exact else 2,
            method=(
                "exact (tiktoken + cookbook chat rules)"
                if exact
                else "tiktoken + cookbook chat rules, ±2 tokens/request"
            ),
        )


def _put(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


def _schema_tokens(schema: dict[str, Any], encoding: str) -> int:
    """Structured-output overhead: the schema as compact JSON without required/
    additionalProperties/$schema, plus 9 (community recipe, openai-cookbook #2140)."""
    return _schema_tokens_of(dumps(schema), encoding)


@lru_cache(maxsize=64)
def _role_tokens(role: str, encoding: str) -> int:
    return len(get_encoding(encoding).encode_ordinary(role))


@lru_cache(maxsize=256)
def _schema_tokens_of(schema_json: str, encoding: str) -> int:
    schema = json.loads(schema_json)

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: strip(v)
                for k, v in node.items()
                if k not in ("required", "additionalProperties", "$schema")
            }
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return len(get_encoding(encoding).encode_ordinary(dumps(strip(schema)))) + 9


def count_chat_tokens(
    messages: Sequence[Mapping[str, str]],
    model: str = "gpt-4o",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Input tokens of an OpenAI chat request by the cookbook's rules (exact for the models it checks).

    Example:
        >>> count_chat_tokens([{"role": "user", "content": "Hello!"}], "gpt-4o")
        9
    """
    enc = get_encoding(encoding_for(model))
    per_message, per_name = (4, -1) if model == "gpt-3.5-turbo-0301" else (3, 1)
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += per_message
        for key, value in message.items():
            if key == "role":  # a handful of values: count each once
                total += _role_tokens(value, enc.name)
            else:
                total += len(enc.encode_ordinary(value))
            if key == "name":
                total += per_name
    if tools:
        total += _tool_tokens(tools, model, enc)
    return total


def _tool_tokens(tools: Sequence[Mapping[str, Any]], model: str, enc: Any) -> int:
    func_init = 7 if model.startswith(("gpt-4o", "gpt-4.1", "o", "gpt-5")) else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    total = 0
    for tool in tools:
        fn = tool["function"]
        total += func_init
        desc = fn.get("description", "").removesuffix(".")
        total += len(enc.encode_ordinary(f"{fn['name']}:{desc}"))
        props = fn.get("parameters", {}).get("properties", {})
        if props:
            total += prop_init
            for key, prop in props.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + len(enc.encode_ordinary(item))
                p_desc = prop.get("description", "").removesuffix(".")
                total += len(enc.encode_ordinary(f"{key}:{prop.get('type', '')}:{p_desc}"))
    return total + func_end


# results --------------------------------------------------------------------------------------
# The fields the engine reads from an output or error file line, as DuckDB types: DuckDB reads
# a million lines in about a second (benchmarks/bench_parse.py), and skips malformed ones.
# Generation and embedding lines differ only in the body's answer field: each reads its own
# (a field DuckDB is not asked for costs nothing to skip).
_ANSWER_COLUMNS = {
    False: "choices STRUCT(message STRUCT(content VARCHAR, refusal VARCHAR), finish_reason "
    "VARCHAR)[], output STRUCT(type VARCHAR, content STRUCT(type VARCHAR, text VARCHAR)[])[], ",
    True: "data STRUCT(embedding JSON)[], ",
}
_ANSWER_SQL = {
    False: """coalesce(
        response.body.choices[1].message.content,
        CASE WHEN response.body.output IS NOT NULL THEN
            list_filter(response.body.output, lambda o: o.type = 'message')[1].content[1].text
        END
    ) AS text, NULL::JSON AS emb,
    coalesce(response.body.choices[1].finish_reason, response.body.status) AS finish""",
    True: """NULL::VARCHAR AS text, response.body.data[1].embedding AS emb,
    NULL::VARCHAR AS finish""",
}
# An embedding comes as base64 float32 (what we ask for) or as a list of numbers.
_VECTORS_SQL = """
    CASE WHEN json_type(emb) = 'VARCHAR' THEN from_base64(emb ->> '$') END AS embedding_b64,
    CASE WHEN json_type(emb) = 'ARRAY' THEN emb::FLOAT[] END AS embedding_floats,"""
_LINE_COLUMNS = (
    "{{custom_id: 'VARCHAR', response: 'STRUCT(status_code INTEGER, body STRUCT("
    "{answer}"
    "status VARCHAR, "
    "usage STRUCT(prompt_tokens BIGINT, completion_tokens BIGINT, input_tokens BIGINT, "
    "output_tokens BIGINT, "
    "prompt_tokens_details STRUCT(cached_tokens BIGINT, cache_write_tokens BIGINT), "
    "input_tokens_details STRUCT(cached_tokens BIGINT, cache_write_tokens BIGINT)), "
    "error STRUCT(message VARCHAR, code VARCHAR)))', "
    "error: 'STRUCT(code VARCHAR, message VARCHAR)'}}"
)
#: Per-request failure codes worth sending again (statuses: ``OpenAI.retryable_http``).
RETRYABLE_CODES = ("server_error", "rate_limit_exceeded", "timeout", "internal_error")
_PARSE_SQL = """
WITH lines AS (
    SELECT * FROM read_json($files, format = 'newline_delimited', ignore_errors = true,
                            columns = {columns})
    WHERE custom_id IS NOT NULL
), parsed AS (
SELECT
    custom_id,
    CASE
        WHEN response.status_code = 200 THEN 'succeeded'
        WHEN error.code = 'batch_expired' THEN 'expired'
        WHEN error.code = 'batch_cancelled' THEN 'canceled'
        ELSE 'errored'
    END AS status,
    {answer},
    coalesce(response.body.error.message, error.message,
             CASE WHEN response.status_code <> 200
                  THEN 'HTTP ' || response.status_code::VARCHAR END) AS error,
    coalesce(response.status_code IN {http}, false)
        OR coalesce(error.code IN {codes}, false)
        OR coalesce(response.body.error.code IN {codes}, false) AS retryable,
    coalesce(response.body.usage.prompt_tokens, response.body.usage.input_tokens) AS input_tokens,
    coalesce(response.body.usage.completion_tokens, response.body.usage.output_tokens)
        AS output_tokens,
    -- Both are part of prompt_tokens / input_tokens, billed at their own rates.
    coalesce(response.body.usage.prompt_tokens_details.cached_tokens,
             response.body.usage.input_tokens_details.cached_tokens) AS cache_read_tokens,
    coalesce(response.body.usage.prompt_tokens_details.cache_write_tokens,
             response.body.usage.input_tokens_details.cache_write_tokens) AS cache_write_tokens
FROM lines
)
SELECT custom_id, status, text, {vectors}
    error, retryable, input_tokens, output_tokens, finish, cache_read_tokens, cache_write_tokens
FROM parsed
"""


def parse_results(files: Sequence[str], *, embeddings: bool = False) -> pl.DataFrame:
    """One row per request from OpenAI batch output and error files (chat, responses and
    embeddings).

    Columns are :data:`~polars_llmbatch.collect.results.RESULT_SCHEMA`: ``custom_id``, ``status``
    (``succeeded``, ``errored``, ``expired``, ``canceled``), ``text``, ``embedding``, ``error``
    (the provider's message), ``retryable``, ``input_tokens``, ``output_tokens``, ``finish``.
    Malformed lines are skipped and a duplicated line never replaces a success; requests absent
    from every file are the caller's to call ``missing``.

    Example:
        >>> import tempfile, pathlib
        >>> line = ('{"custom_id": "r1", "response": {"status_code": 200, "body": {"choices": '
        ...         '[{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": '
        ...         '{"prompt_tokens": 9, "completion_tokens": 1}}}, "error": null}')
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
        >>> _ = path.write_text(line + "\\n{broken\\n")
        >>> parse_results([str(path)]).select("custom_id", "status", "text", "input_tokens").rows()
        [('r1', 'succeeded', 'hi', 9)]
    """
    import duckdb

    from polars_llmbatch.collect.results import finish_parse

    if not files:
        raise ValueError("parse_results needs at least one file")
    sql = _PARSE_SQL.format(
        columns=_LINE_COLUMNS.format(answer=_ANSWER_COLUMNS[embeddings]),
        answer=_ANSWER_SQL[embeddings],
        vectors=_VECTORS_SQL if embeddings else "",
        http=tuple(sorted(OpenAI.retryable_http)),
        codes=RETRYABLE_CODES,
    )
    with duckdb.connect() as con:
        rows = con.sql(sql, params={"files": [str(f) for f in files]}).pl()
    return finish_parse(rows)
