"""Anthropic: Message Batches ``params`` (a Messages API body) and the batch create body."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from polars_llmbatch._json import dumps, slot
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers import anthropic_admin, anthropic_remote
from polars_llmbatch.providers.base import (
    AmbiguousBatch,
    Framing,
    Limits,
    Provider,
    RemoteState,
    TokenRule,
    field_of,
    nested_message,
)

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = ["Anthropic"]

_EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Tokenizer families (reference/tokens.md §4): Opus 4.7 and every 5.x model use the newer,
# denser-counting tokenizer.
_V47 = re.compile(r"^claude-opus-4-7")
_V48 = re.compile(r"^claude-(opus-4-(8|9)|[a-z]+-5|opus-5|sonnet-5|fable|mythos|haiku-5)")


class Anthropic(Provider):
    """Anthropic's wire format: one ``{"custom_id", "params"}`` entry per request.

    Example:
        >>> from polars_llmbatch.plan.spec import RequestSpec
        >>> spec = RequestSpec("anthropic", "claude-haiku-4-5", options={"max_output_tokens": 64})
        >>> Anthropic().body(spec, ("user",))["max_tokens"]
        64
    """

    name = "anthropic"
    limits = Limits(max_requests=100_000, max_bytes=256_000_000)
    env_key = ("ANTHROPIC_API_KEY",)
    env_base_url = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"
    prices_id = "anthropic"
    truncated = frozenset({"max_tokens"})
    bills_cache_writes = True
    admin_env_key = ("ANTHROPIC_ADMIN_KEY",)

    def endpoint(self, spec: RequestSpec) -> str:
        return "/v1/messages"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": "2023-06-01"}

    def check(self, spec: RequestSpec) -> None:
        if spec.task == "embed":
            raise LlmBatchError(
                "anthropic has no embeddings API; use provider='openai' or provider='gemini'"
            )
        if spec.api is not None:
            raise LlmBatchError(f"anthropic has a single API; drop api={spec.api!r}")

    def body(self, spec: RequestSpec, slots: tuple[str, ...]) -> dict[str, Any]:
        self.check(spec)
        opts = spec.options
        if opts.get("max_output_tokens") is None:
            raise LlmBatchError(
                "anthropic requires a cap on output tokens for every request; pass "
                "max_output_tokens=..., e.g. max_output_tokens=256"
            )
        for name in ("seed", "temperature", "top_p"):
            # The current Messages API (SDK 2.x) has no sampling fields; sending them fails.
            if opts.get(name) is not None:
                raise self._refuse(
                    spec,
                    name,
                    "the current Messages API has no such field; drop it (or send it through "
                    "extra_body={...} for an older API version)",
                )
        effort = opts.get("reasoning_effort")
        if effort is not None and effort not in _EFFORTS:
            raise LlmBatchError(
                f"anthropic reasoning_effort must be one of {_EFFORTS}, not {effort!r}"
            )
        body: dict[str, Any] = {"model": spec.model, "max_tokens": opts["max_output_tokens"]}
        system = slot("system") if "system" in slots else spec.system
        if system is not None:
            body["system"] = system
        body["messages"] = [{"role": "user", "content": slot("user")}]
        stop = opts.get("stop")
        if stop is not None:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        output_config: dict[str, Any] = {}
        if effort is not None:
            output_config["effort"] = effort
        if spec.output is not None and spec.output.schema is not None:
            output_config["format"] = {"type": "json_schema", "schema": spec.output.schema}
        if output_config:
            body["output_config"] = output_config
        body.update(spec.extra_body)
        return body

    def framing(self, spec: RequestSpec, tag: str, n_requests: int, payload_bytes: int) -> Framing:
        # The shard is the exact JSON body POSTed to /v1/messages/batches.
        return Framing(
            line={"custom_id": slot("key"), "params": slot("body")},
            prefix='{"requests":[',
            sep=",",
            suffix="]}",
            media_type="application/json",
            kind="inline",
        )

    def token_rule(self, spec: RequestSpec) -> TokenRule:
        # No offline Claude tokenizer: o200k × a measured ratio, with its error band
        # (reference/tokens.md §4.3).
        if _V47.match(spec.model):
            ratio, frame, band, family = 1.5, 11, 0.20, "Opus 4.7"
        elif _V48.match(spec.model):
            ratio, frame, band, family = 1.5, 6, 0.20, "Claude 4.8+/5"
        else:
            ratio, frame, band, family = 1.15, 7, 0.15, "Claude 3 to 4.6"
        per_request = frame
        if spec.output is not None and spec.output.schema is not None:
            per_request += _SCHEMA_OVERHEAD
        return TokenRule(
            "o200k_base",
            per_request=per_request,
            per_message=3,
            ratio=ratio,
            band=band,
            method=f"approximate: o200k × {ratio} ({family} tokenizer), ±{band:.0%}",
        )

    # the bill ------------------------------------------------------------------------
    def billed_usage(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        return anthropic_admin.usage(t, start, end)

    def billed_costs(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        return anthropic_admin.costs(t, start, end)

    # token counting: the free count_tokens endpoint -------------------------------------
    def can_count(self, spec: RequestSpec) -> bool:
        return True

    def count_tokens(self, t: Transport, spec: RequestSpec, body: dict[str, Any]) -> int:
        return anthropic_remote.count_tokens(t, body)

    # remote batches: the engine's interface -------------------------------------------
    def submit(self, t: Transport, spec: RequestSpec, data: bytes, *, tag: str, kind: str) -> str:
        return anthropic_remote.submit(t, data)

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
        # No tag field on the batch object: candidates by creation time and size, then
        # confirmed by their custom_ids once they have results (design.md, crash safety).
        found = anthropic_remote.candidates(t, created_after=since, requests=requests)
        confirmed, running = [], 0
        for batch_id in found:
            if batch_id in exclude:
                continue
            st = anthropic_remote.poll(t, batch_id)
            if not st.ended:
                running += 1  # cannot tell whose it is until its results exist
                continue
            if st.result_files:
                ids = _result_ids(anthropic_remote.download(t, st.result_files[0]))
                if ids and ids <= custom_ids:
                    confirmed.append(batch_id)
        if confirmed:  # its results are this shard's requests (the newest, if several)
            return confirmed[0]
        if not running:
            return None
        raise AmbiguousBatch(
            f"{running} batch(es) of {requests} requests created since "
            f"{since:%H:%M:%S} may be this shard's; waiting until their results show whose"
        )

    def poll(self, t: Transport, remote_id: str) -> RemoteState:
        return anthropic_remote.poll(t, remote_id)

    def fetch(self, t: Transport, state: RemoteState, custom_ids: Sequence[str]) -> list[bytes]:
        return [anthropic_remote.download(t, url) for url in state.result_files]

    def parse(self, files: Sequence[Path], spec: RequestSpec) -> pl.DataFrame:
        return parse_results([str(f) for f in files])

    def cancel(self, t: Transport, remote_id: str) -> None:
        anthropic_remote.cancel(t, remote_id)

    def sync_path(self, spec: RequestSpec) -> str:
        return "/v1/messages"

    def sync_line(self, custom_id: str, status: int, body: bytes) -> bytes:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {
                "error": {"type": "api_error", "message": body[:500].decode(errors="replace")}
            }
        if status == 200:
            result = {"type": "succeeded", "message": parsed}
        else:
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if not isinstance(error, dict):
                error = {"type": "api_error", "message": f"HTTP {status}"}
            if status in self.retryable_http and error.get("type") not in RETRYABLE_TYPES:
                error = {**error, "type": "api_error"}
            result = {"type": "errored", "error": {"type": "error", "error": error}}
        return dumps({"custom_id": custom_id, "result": result}).encode()

    def error_body(self, message: str) -> bytes:
        # no error type: sync_line types it by the HTTP status (retryable or not)
        return dumps({"type": "error", "error": {"message": message}}).encode()

    def line_id(self, record: dict[str, Any]) -> str | None:
        return field_of(record, "custom_id")

    def error_message(self, body: Any) -> str | None:
        return nested_message(body)  # {"type": "error", "error": {"type", "message"}, "request_id"}


def _result_ids(data: bytes) -> set[str]:
    ids = set()
    for line in data.splitlines():
        try:
            ids.add(str(json.loads(line)["custom_id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


# Structured outputs add a system preamble of unpublished size; budget a fixed amount.
_SCHEMA_OVERHEAD = 50


# results ---------------------------------------------------------------------------------------
#: Error types worth sending again (the rest, e.g. invalid_request_error, fail the same way).
RETRYABLE_TYPES = ("api_error", "overloaded_error", "rate_limit_error", "timeout_error")
_LINE_COLUMNS = (
    "{custom_id: 'VARCHAR', result: 'STRUCT(type VARCHAR, message STRUCT("
    "content STRUCT(type VARCHAR, text VARCHAR)[], stop_reason VARCHAR, usage STRUCT("
    "input_tokens BIGINT, output_tokens BIGINT, cache_creation_input_tokens BIGINT, "
    "cache_read_input_tokens BIGINT)), "
    "error STRUCT(type VARCHAR, message VARCHAR, error STRUCT(type VARCHAR, message VARCHAR)))'}"
)
_PARSE_SQL = """
SELECT
    custom_id,
    CASE result.type
        WHEN 'succeeded' THEN 'succeeded'
        WHEN 'expired' THEN 'expired'
        WHEN 'canceled' THEN 'canceled'
        ELSE 'errored'
    END AS status,
    nullif(array_to_string(list_transform(
        list_filter(result.message.content, lambda c: c.type = 'text'), lambda c: c.text), ''), '')
        AS text,
    coalesce(result.error.error.message, result.error.message,
             CASE WHEN result.type NOT IN ('succeeded', 'expired', 'canceled')
                  THEN 'result type ' || coalesce(result.type, 'null') END) AS error,
    coalesce(result.error.error.type IN {types}, false) AS retryable,
    result.message.usage.input_tokens
        + coalesce(result.message.usage.cache_creation_input_tokens, 0)
        + coalesce(result.message.usage.cache_read_input_tokens, 0) AS input_tokens,
    result.message.usage.output_tokens AS output_tokens,
    result.message.stop_reason AS finish,
    -- input_tokens above is the whole input; these parts of it have their own rates.
    result.message.usage.cache_read_input_tokens AS cache_read_tokens,
    result.message.usage.cache_creation_input_tokens AS cache_write_tokens
FROM read_json($files, format = 'newline_delimited', ignore_errors = true,
               columns = {columns})
WHERE custom_id IS NOT NULL
"""


def parse_results(files: Sequence[str]) -> pl.DataFrame:
    """One row per request from Message Batches results files (see
    :data:`~polars_llmbatch.collect.results.RESULT_SCHEMA`); text is the concatenated text blocks.

    Example:
        >>> import tempfile, pathlib
        >>> line = ('{"custom_id": "r1", "result": {"type": "succeeded", "message": {"content": '
        ...         '[{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": '
        ...         '{"input_tokens": 9, "output_tokens": 1}}}}')
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> _ = path.write_text(line + "\\n")
        >>> parse_results([str(path)]).select("custom_id", "status", "text", "finish").rows()
        [('r1', 'succeeded', 'hi', 'end_turn')]
    """
    import duckdb

    from polars_llmbatch.collect.results import finish_parse

    sql = _PARSE_SQL.format(columns=_LINE_COLUMNS, types=RETRYABLE_TYPES)
    with duckdb.connect() as con:
        return finish_parse(con.sql(sql, params={"files": [str(f) for f in files]}).pl())
