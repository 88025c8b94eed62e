"""Gemini (Developer API) Batch Mode: ``generateContent`` and ``embedContent`` requests, file or inline."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from polars_llmbatch._json import dumps, slot
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.plan.tokens.encodings import get_encoding
from polars_llmbatch.providers import gemini_remote
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
    import datetime as dt

    from polars_llmbatch.run.transport import Transport

__all__ = ["INLINE_MAX_BYTES", "Gemini"]

#: Shards smaller than this go inline in the create call (the documented cap is 20 MB); larger
#: ones are uploaded as a JSONL file.
INLINE_MAX_BYTES = 19_000_000
_THINKING_LEVELS = ("minimal", "low", "medium", "high", "xhigh")  # SDK ThinkingLevel
_THINKING_LEVEL_MODELS = re.compile(r"^gemini-(3|[4-9])")


class Gemini(Provider):
    """Gemini's wire format: ``GenerateContentRequest`` / ``EmbedContentRequest`` bodies.

    The batch file holds ``{"key", "request"}`` lines; the inline form puts
    ``{"metadata": {"key"}, "request"}`` entries in the create body.

    Example:
        >>> from polars_llmbatch.plan.spec import RequestSpec
        >>> spec = RequestSpec("gemini", "gemini-2.5-flash", options={"max_output_tokens": 64})
        >>> Gemini().body(spec, ("user",))["generationConfig"]
        {'maxOutputTokens': 64}
    """

    name = "gemini"
    # No published request cap per batch: 100,000 is our own choice, keeping each shard's results
    # file and its retry unit a manageable size. Files may be up to 2 GB.
    limits = Limits(max_requests=100_000, max_bytes=2_000_000_000)
    env_key = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's order: GOOGLE_API_KEY wins
    env_base_url = "GOOGLE_GEMINI_BASE_URL"
    default_base_url = "https://generativelanguage.googleapis.com"
    prices_id = "google"
    truncated = frozenset({"MAX_TOKENS"})
    batch_halves_cache_hits = False  # batch cache hits are billed at the sync cached rate

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def endpoint(self, spec: RequestSpec) -> str:
        verb = "embedContent" if spec.task == "embed" else "generateContent"
        return f"/v1beta/models/{spec.model}:{verb}"

    def auto_cache_min_tokens(self, spec: RequestSpec) -> int | None:
        # Implicit caching (Gemini 2.5 and later): 1,024 tokens on Flash, 2,048 on Pro models.
        if spec.task == "embed":
            return None
        return 2048 if "pro" in spec.model else 1024

    def max_input_tokens(self, spec: RequestSpec) -> int | None:
        return 2048 if spec.task == "embed" else None  # gemini-embedding-001 input limit

    def check(self, spec: RequestSpec) -> None:
        if spec.api is not None:
            raise LlmBatchError(f"gemini has a single API; drop api={spec.api!r}")

    def body(self, spec: RequestSpec, slots: tuple[str, ...]) -> dict[str, Any]:
        self.check(spec)
        if spec.task == "embed":
            return self._embedding(spec)
        opts = spec.options
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": slot("user")}]}]}
        system = slot("system") if "system" in slots else spec.system
        if system is not None:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        for ours, theirs in (
            ("max_output_tokens", "maxOutputTokens"),
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("seed", "seed"),
        ):
            if opts.get(ours) is not None:
                config[theirs] = opts[ours]
        stop = opts.get("stop")
        if stop is not None:
            config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
        effort = opts.get("reasoning_effort")
        if effort is not None:
            if not _THINKING_LEVEL_MODELS.match(spec.model):
                raise self._refuse(
                    spec,
                    "reasoning_effort",
                    "thinking levels start with Gemini 3; set a thinking budget in "
                    "extra_body={'generationConfig': ...} instead",
                )
            if effort not in _THINKING_LEVELS:
                raise LlmBatchError(
                    f"gemini reasoning_effort must be one of {_THINKING_LEVELS}, not {effort!r}"
                )
            config["thinkingConfig"] = {"thinkingLevel": effort}
        if spec.output is not None and spec.output.schema is not None:
            config["responseMimeType"] = "application/json"
            config["responseJsonSchema"] = spec.output.schema
        if config:
            body["generationConfig"] = config
        body.update(spec.extra_body)
        return body

    def _embedding(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"content": {"parts": [{"text": slot("user")}]}}
        if spec.dimensions is not None:
            body["outputDimensionality"] = spec.dimensions
        body.update(spec.extra_body)
        return body

    def framing(self, spec: RequestSpec, tag: str, n_requests: int, payload_bytes: int) -> Framing:
        from polars_llmbatch._json import dumps

        # The create body of models/{model}:batchGenerateContent (or :asyncBatchEmbedContent).
        inline = Framing(
            line={"metadata": {"key": slot("key")}, "request": slot("body")},
            prefix='{"batch":{"displayName":'
            + dumps(tag)
            + ',"inputConfig":{"requests":{"requests":[',
            sep=",",
            suffix="]}}}}",
            media_type="application/json",
            kind="inline",
        )
        if n_requests > 0 and inline.size(n_requests, payload_bytes) < INLINE_MAX_BYTES:
            return inline
        return Framing(line={"key": slot("key"), "request": slot("body")})

    def token_rule(self, spec: RequestSpec) -> TokenRule:
        # No offline Gemini tokenizer without a seeded Gemma model: o200k ± 15% (tokens.md §5.3).
        # A response schema counts toward the input (Gemini's structured-output docs).
        schema = spec.output.schema if spec.output is not None else None
        per_request = _schema_tokens(dumps(schema)) if schema is not None else 0
        return TokenRule(
            "o200k_base",
            per_request=per_request,
            per_message=0,
            band=0.15,
            method="approximate: o200k_base count, ±15%",
        )

    # flex ------------------------------------------------------------------------------
    def flex_body(self, spec: RequestSpec, body: str) -> str | None:
        # A top-level ``service_tier: "FLEX"`` on generateContent (ai.google.dev, flex
        # inference, preview); embeddings have none.
        if spec.task == "embed":
            return None
        return with_field(body, '"service_tier":"FLEX"')

    # token counting: the free countTokens endpoint ------------------------------------------
    def can_count(self, spec: RequestSpec) -> bool:
        # countTokens takes generation models only (python-genai #1541)
        return spec.task != "embed"

    def count_tokens(self, t: Transport, spec: RequestSpec, body: dict[str, Any]) -> int:
        return gemini_remote.count_tokens(t, spec.model, body)

    # remote batches: the engine's interface -------------------------------------------
    def submit(self, t: Transport, spec: RequestSpec, data: bytes, *, tag: str, kind: str) -> str:
        return gemini_remote.submit(
            t,
            data,
            kind,
            model=spec.model,
            embed=spec.task == "embed",
            tag=tag,
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
        return gemini_remote.find(t, tag)

    def poll(self, t: Transport, remote_id: str) -> RemoteState:
        return gemini_remote.poll(t, remote_id)

    def fetch(self, t: Transport, state: RemoteState, custom_ids: Sequence[str]) -> list[bytes]:
        """The results as JSONL ``{"key", "response" | "error"}`` lines: the responses file as
        is, or the inline responses written out in the same shape.

        Inline responses come back in request order, but their ``metadata`` (our key) is not
        promised (python-genai #2008: the real API leaves it out): an entry without one takes
        the key of the request at its position, when there is one response per request. The
        raw answer is kept either way, so nothing that came back is lost or bought again."""
        if state.result_files == (gemini_remote.INLINE,):
            items = gemini_remote.inline_results(t, state.remote_id)
            by_position = len(items) == len(custom_ids)
            lines = []
            for i, item in enumerate(items):
                key = (item.get("metadata") or {}).get("key")
                if key is None and by_position:
                    key = custom_ids[i]
                rest = {k: v for k, v in item.items() if k != "metadata"}
                lines.append(orjson.dumps({"key": key, **rest}) + b"\n")
            return [b"".join(lines)]
        return [gemini_remote.download(t, f) for f in state.result_files]

    def parse(self, files: Sequence[Path], spec: RequestSpec) -> pl.DataFrame:
        return parse_results([str(f) for f in files])

    def cancel(self, t: Transport, remote_id: str) -> None:
        gemini_remote.cancel(t, remote_id)

    def sync_path(self, spec: RequestSpec) -> str:
        verb = "embedContent" if spec.task == "embed" else "generateContent"
        return f"/{gemini_remote.VERSION}/models/{spec.model}:{verb}"

    def sync_line(self, custom_id: str, status: int, body: bytes) -> bytes:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"error": {"code": status, "message": body[:500].decode(errors="replace")}}
        if status == 200:
            return dumps({"key": custom_id, "response": parsed}).encode()
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if not isinstance(error, dict):
            error = {"code": status, "message": f"HTTP {status}"}
        return dumps({"key": custom_id, "error": {"code": status, **error}}).encode()

    def error_body(self, message: str) -> bytes:
        return dumps({"error": {"message": message}}).encode()

    def line_id(self, record: dict[str, Any]) -> str | None:
        return field_of(record, "key")  # Gemini's lines carry our id as "key"

    def error_message(self, body: Any) -> str | None:
        # Google's {"error": {"code", "message", "status", "details"}}
        return nested_message(body, "status")


# results ---------------------------------------------------------------------------------------
#: Google error statuses worth sending again.
RETRYABLE_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED")
_LINE_COLUMNS = (
    "{key: 'VARCHAR', response: 'STRUCT("
    "candidates STRUCT(content STRUCT(parts STRUCT(text VARCHAR, thought BOOLEAN)[]), "
    "finishReason VARCHAR)[], "
    "usageMetadata STRUCT(promptTokenCount BIGINT, candidatesTokenCount BIGINT, "
    "thoughtsTokenCount BIGINT, cachedContentTokenCount BIGINT), "
    'embedding STRUCT("values" FLOAT[]), tokenCount VARCHAR)\', '
    "error: 'STRUCT(code INTEGER, message VARCHAR, status VARCHAR)'}"
)
_PARSE_SQL = """
SELECT
    key AS custom_id,
    CASE WHEN error IS NULL AND response IS NOT NULL THEN 'succeeded' ELSE 'errored' END
        AS status,
    nullif(array_to_string(list_transform(
        list_filter(response.candidates[1].content.parts, lambda p: NOT coalesce(p.thought, false)),
        lambda p: p.text), ''), '') AS text,
    response.embedding."values" AS embedding_floats,
    coalesce(error.message, CASE WHEN response IS NULL THEN 'no response' END) AS error,
    coalesce(error.status IN {statuses}, false) OR coalesce(error.code IN {http}, false)
        AS retryable,
    coalesce(response.usageMetadata.promptTokenCount, try_cast(response.tokenCount AS BIGINT))
        AS input_tokens,
    CASE WHEN response.usageMetadata IS NOT NULL
         THEN coalesce(response.usageMetadata.candidatesTokenCount, 0)
              + coalesce(response.usageMetadata.thoughtsTokenCount, 0) END AS output_tokens,
    response.candidates[1].finishReason AS finish,
    -- promptTokenCount includes the cached part, billed at the cached rate.
    response.usageMetadata.cachedContentTokenCount AS cache_read_tokens
FROM read_json($files, format = 'newline_delimited', ignore_errors = true,
               columns = {columns})
WHERE key IS NOT NULL
"""


@lru_cache(maxsize=64)
def _schema_tokens(schema_json: str) -> int:
    return len(get_encoding("o200k_base").encode_ordinary(schema_json))


def parse_results(files: Sequence[str]) -> pl.DataFrame:
    """One row per request from Gemini batch results as JSONL ``{"key", "response" | "error"}``
    lines (the responses file as downloaded, or the inline responses written out the same
    way); see :data:`~polars_llmbatch.collect.results.RESULT_SCHEMA`. Thought parts are left out of
    the text and thought tokens are counted as output (they are billed as output).

    Example:
        >>> import tempfile, pathlib
        >>> line = ('{"key": "r1", "response": {"candidates": [{"content": {"parts": [{"text": '
        ...         '"hi"}]}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 8, '
        ...         '"candidatesTokenCount": 1, "thoughtsTokenCount": 4}}}')
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> _ = path.write_text(line + "\\n")
        >>> parse_results([str(path)]).select("custom_id", "text", "output_tokens").rows()
        [('r1', 'hi', 5)]
    """
    import duckdb

    from polars_llmbatch.collect.results import finish_parse

    sql = _PARSE_SQL.format(
        columns=_LINE_COLUMNS,
        statuses=RETRYABLE_STATUS,
        http=tuple(sorted(Gemini.retryable_http)),
    )
    with duckdb.connect() as con:
        return finish_parse(con.sql(sql, params={"files": [str(f) for f in files]}).pl())
