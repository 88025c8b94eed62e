"""A local stand-in for the OpenAI, Anthropic and Gemini batch (and sync) APIs.

It serves on 127.0.0.1 only, with a deterministic model (:mod:`.model`) and injectable faults
(:class:`Faults`), and keeps a :class:`Ledger` of everything uploaded, created and billed. Tests,
notebooks and ``llmbatch demo`` run against it; users can dry-run a pipeline on it for free.

Each provider has its own base URL, so that paths which collide on a shared root (OpenAI's and
Gemini's ``/v1/batches/...``) never meet::

    with serve(batch_seconds=0.5) as emu:
        client = openai.OpenAI(base_url=emu.openai_url, api_key="anything")
        ...
        assert not emu.ledger.billed_twice()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from polars_llmbatch.emulator.anthropic import AnthropicEmulator
from polars_llmbatch.emulator.context import Context
from polars_llmbatch.emulator.faults import Faults
from polars_llmbatch.emulator.gemini import GeminiEmulator
from polars_llmbatch.emulator.http import Response, Router, Server
from polars_llmbatch.emulator.ledger import Ledger
from polars_llmbatch.emulator.openai import OpenAIEmulator

__all__ = ["Emulator", "Faults", "Ledger", "serve"]


#: The key :meth:`Emulator.env` exports: not a secret, any non-empty key is accepted here.
DUMMY_KEY = "emulator-dummy-key"


class Emulator:
    """A running emulator: its base URLs, its ledger, and ``stop()``.

    Example:
        >>> with serve() as emu:
        ...     emu.openai_url.startswith("http://127.0.0.1:")
        True
    """

    def __init__(
        self, *, port: int = 0, batch_seconds: float = 1.0, faults: Faults | None = None
    ) -> None:
        self.ctx = Context(faults=faults or Faults(), batch_seconds=batch_seconds)
        router = Router()
        self.openai = OpenAIEmulator(self.ctx)
        self.openai.routes(router)
        self.anthropic = AnthropicEmulator(self.ctx)
        self.anthropic.routes(router)
        self.gemini = GeminiEmulator(self.ctx)
        self.gemini.routes(router)
        router.add("GET", "/_emulator/ledger", lambda r: Response.json(self.ledger.to_dict()))
        self._providers = (self.openai, self.anthropic, self.gemini)
        self.server = Server(router, port)
        self.ctx.base_url = self.server.url

    @property
    def ledger(self) -> Ledger:
        """What was uploaded, created and billed, up to now: batches that have finished are
        billed whether or not anyone polled them (as at the real services)."""
        now = self.ctx.clock()
        for provider in self._providers:
            provider.sweep(now)
        return self.ctx.ledger

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def openai_url(self) -> str:
        """For ``OPENAI_BASE_URL`` (it includes ``/v1``, as the SDK expects)."""
        return f"{self.server.url}/openai/v1"

    @property
    def anthropic_url(self) -> str:
        """For ``ANTHROPIC_BASE_URL`` (no ``/v1``: the SDK adds it)."""
        return f"{self.server.url}/anthropic"

    @property
    def gemini_url(self) -> str:
        """For ``GOOGLE_GEMINI_BASE_URL`` (no version: the SDK adds ``v1`` or ``v1beta``)."""
        return f"{self.server.url}/gemini"

    def env(self) -> dict[str, str]:
        """Environment variables that point the official SDKs (and this library) here: the
        base URLs, and dummy keys (the emulator takes any non-empty key; the SDKs and this
        library refuse to start without one)."""
        return {
            "OPENAI_BASE_URL": self.openai_url,
            "ANTHROPIC_BASE_URL": self.anthropic_url,
            "GOOGLE_GEMINI_BASE_URL": self.gemini_url,
            "OPENAI_API_KEY": DUMMY_KEY,
            "ANTHROPIC_API_KEY": DUMMY_KEY,
            "GEMINI_API_KEY": DUMMY_KEY,
        }

    def start(self) -> Emulator:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __repr__(self) -> str:
        return f"Emulator(url={self.url!r}, faults={self.ctx.faults!r})"


@contextmanager
def serve(
    *, port: int = 0, batch_seconds: float = 1.0, faults: Faults | None = None
) -> Iterator[Emulator]:
    """Run an emulator for the duration of a ``with`` block."""
    emu = Emulator(port=port, batch_seconds=batch_seconds, faults=faults).start()
    try:
        yield emu
    finally:
        emu.stop()
