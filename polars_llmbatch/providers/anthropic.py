"""Anthropic: Message Batches ``params`` (a Messages API body) and the batch create body."""

from __future__ import annotations

import re
from typing import Any

from polars_llmbatch._json import slot
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers.base import Framing, Limits, Provider, TokenRule
from polars_llmbatch.spec import RequestSpec

__all__ = ["Anthropic"]

_EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Tokenizer families (reference/tokens.md §4): Opus 4.7 and every 5.x model use the newer,
# denser-counting tokenizer.
_V47 = re.compile(r"^claude-opus-4-7")
_V48 = re.compile(r"^claude-(opus-4-(8|9)|[a-z]+-5|opus-5|sonnet-5|fable|mythos|haiku-5)")


class Anthropic(Provider):
    """Anthropic's wire format: one ``{"custom_id", "params"}`` entry per request.

    Example:
        >>> from polars_llmbatch.spec import RequestSpec
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


# Structured outputs add a system preamble of unpublished size; budget a fixed amount.
_SCHEMA_OVERHEAD = 50
