"""Provider modules: one per provider, each behind the interface in :mod:`.base`."""

from __future__ import annotations

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers.anthropic import Anthropic
from polars_llmbatch.providers.base import Framing, Limits, Provider, TokenRule
from polars_llmbatch.providers.gemini import Gemini
from polars_llmbatch.providers.openai import OpenAI

__all__ = ["PROVIDERS", "Framing", "Limits", "Provider", "TokenRule", "get_provider"]

PROVIDERS: dict[str, type[Provider]] = {"openai": OpenAI, "anthropic": Anthropic, "gemini": Gemini}


def get_provider(provider: str | Provider) -> Provider:
    """The provider named ``provider`` ("openai", "anthropic", "gemini"), or ``provider`` itself."""
    if isinstance(provider, Provider):
        return provider
    if not isinstance(provider, str) or provider.lower() not in PROVIDERS:
        raise LlmBatchError(f"unknown provider {provider!r}; the providers are {sorted(PROVIDERS)}")
    return PROVIDERS[provider.lower()]()
