from __future__ import annotations

import socket

import polars as pl
import pytest

import polars_llmbatch  # noqa: F401  (registers .llm)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a provider (or anything else) over the network: only the
    emulator on the loopback address."""
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if self.family == socket.AF_UNIX or host in _LOOPBACK:
            return connect(self, address)
        raise OSError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs without ``checkpoint=`` live in a cache folder of the test's own (subprocesses
    inherit it), never in the user's cache or another test's."""
    monkeypatch.setenv("POLARS_LLMBATCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def instant_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The transport's retry backoff, recorded instead of waited (tests that check the delays
    inject their own ``sleep``)."""
    from polars_llmbatch.run import transport

    waits: list[float] = []
    monkeypatch.setattr(transport, "_sleep", waits.append)
    return waits


@pytest.fixture
def tickets() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ticket_id": ["T1", "T2", "T3", "T4", "T5"],
            "body": [
                "I was charged twice",
                "The app crashes on login",
                None,
                "I was charged twice",
                'Quotes " and \\ backslashes,\nnewlines\tand 日本語 \u2028',
            ],
            "priority": [1, 2, 3, 1, 5],
        }
    )
