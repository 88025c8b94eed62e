"""Gemini (Developer API) Batch Mode: ``generateContent`` and ``embedContent`` requests, file or inline."""

from __future__ import annotations

import re
from typing import Any

from polars_llmbatch._json import slot
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers.base import Framing, Limits, Provider, TokenRule
from polars_llmbatch.spec import RequestSpec

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
        >>> from polars_llmbatch.spec import RequestSpec
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
        return TokenRule(
            "o200k_base",
            per_request=0,
            per_message=0,
            band=0.15,
            method="approximate: o200k_base count, ±15%",
        )
