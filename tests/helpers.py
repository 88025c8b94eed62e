"""What the end-to-end tests share: the emulator's URL and a default model per provider, and
``df.llm.batch`` with the arguments every test against the emulator passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}


def url_for(emu: Any, provider: str) -> str:
    return {"openai": emu.openai_url, "anthropic": emu.anthropic_url, "gemini": emu.gemini_url}[
        provider
    ]


def batch(df: pl.DataFrame, emu: Any, ckpt: Path, provider: str = "openai", **kw: Any) -> Any:
    """``df.llm.batch("Classify: {body}", ...)`` on the emulator; ``kw`` overrides."""
    prompt = kw.pop("prompt", "Classify: {body}")
    args: dict[str, Any] = dict(
        provider=provider,
        model=MODELS[provider],
        max_output_tokens=200,
        checkpoint=ckpt,
        api_key="k",
        base_url=url_for(emu, provider),
        progress=False,
        poll_interval=0.02,
    )
    args.update(kw)
    return df.llm.batch(prompt, **args)


class StepClock:
    """An emulator clock that moves only when the test says so (``emu.ctx.clock = StepClock()``):
    a lifecycle test then sees every state in turn, however slow the machine is."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
