"""The request spec: everything that decides what one wire body looks like, as plain data.

It holds no secret and no data rows; its hash names the job (and prefixes every custom_id), so two
runs of the same call agree on every id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.outputs import OutputSpec

__all__ = ["GENERATION_OPTIONS", "RequestSpec"]

#: Generation options, by our name. Each provider maps them to its own field names, or refuses
#: them with a clear error where a model family does not take them.
GENERATION_OPTIONS: dict[str, str] = {
    "max_output_tokens": "cap on output tokens per request (reasoning/thinking included)",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling",
    "stop": "stop sequence(s): a string or a list of strings",
    "seed": "sampling seed (OpenAI, Gemini)",
    "reasoning_effort": "reasoning effort for reasoning models: 'low', 'medium', 'high', ...",
}

Task = Literal["generate", "embed"]


@dataclass(frozen=True)
class RequestSpec:
    """What a provider needs to build one wire body; per-row text comes separately as expressions.

    ``system`` is a constant system prompt; ``system_per_row`` says the system prompt is a per-row
    expression instead (it then comes in as a slot, like the user prompt).
    """

    provider: str
    model: str
    task: Task = "generate"
    output: OutputSpec | None = None
    system: str | None = None
    system_per_row: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    dimensions: int | None = None
    api: str | None = None  # provider-specific API flavour, e.g. OpenAI "chat" or "responses"
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(GENERATION_OPTIONS))
        if unknown:
            raise LlmBatchError(
                f"unknown generation option(s) {unknown}; the options are "
                f"{sorted(GENERATION_OPTIONS)} (provider-specific fields go in extra_body={{...}})"
            )
        if self.task == "embed":
            used = sorted(k for k, v in self.options.items() if v is not None)
            if used:
                raise LlmBatchError(f"embeddings take no generation options; drop {used}")
            if self.system is not None or self.system_per_row:
                raise LlmBatchError("embeddings have no system prompt; drop system=")
        from polars_llmbatch.options import check_generation

        check_generation(self.options)  # the options table's checks: one definition
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int) or self.dimensions < 1
        ):
            raise LlmBatchError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    @property
    def max_output_tokens(self) -> int | None:
        return self.options.get("max_output_tokens")

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "task": self.task,
            "output": self.output.to_dict() if self.output is not None else None,
            "system": self.system,
            "system_per_row": self.system_per_row,
            "options": dict(sorted(self.options.items())),
            "dimensions": self.dimensions,
            "api": self.api,
            "extra_body": dict(self.extra_body),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], output_dtypes: str | None = None) -> RequestSpec:
        """The inverse of :meth:`to_dict` (``output_dtypes``: :meth:`OutputSpec.dtypes_blob`)."""
        out = d.get("output")
        return cls(
            provider=d["provider"],
            model=d["model"],
            task=d["task"],
            output=OutputSpec.from_dict(out, output_dtypes or "") if out is not None else None,
            system=d.get("system"),
            system_per_row=bool(d.get("system_per_row")),
            options=dict(d.get("options") or {}),
            dimensions=d.get("dimensions"),
            api=d.get("api"),
            extra_body=dict(d.get("extra_body") or {}),
        )

    def digest(self) -> str:
        """A stable hex digest of the spec (what makes two bodies with the same text differ)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
