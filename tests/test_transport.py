"""The provider HTTP client: retries, Retry-After, errors and secrets, against the emulator."""

from __future__ import annotations

import logging

import pytest

from polars_llmbatch import LlmBatchError
from polars_llmbatch.emulator import Faults, serve
from polars_llmbatch.run.transport import ProviderError, Transport, credentials

KEY = "sk-secret-test-key-0123456789abcdef"


def transport(url: str, delays: list[float], provider: str = "openai", **kw) -> Transport:
    creds = credentials(provider, api_key=KEY, base_url=url)
    return Transport(creds, sleep=delays.append, **kw)


def test_missing_key_is_a_clear_early_error() -> None:
    with pytest.raises(
        LlmBatchError, match="no API key for gemini: set GOOGLE_API_KEY or GEMINI_API_KEY"
    ):
        credentials("gemini", env={})
    c = credentials(
        "anthropic",
        env={"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": "http://127.0.0.1:1/anthropic/"},
    )
    assert c.base_url == "http://127.0.0.1:1/anthropic" and KEY not in repr(c)
    assert credentials("gemini", env={"GEMINI_API_KEY": "a", "GOOGLE_API_KEY": "b"}).api_key == "b"


def test_retry_after_is_honoured_on_429() -> None:
    with serve(faults=Faults(rate_limit_creates=2)) as emu:
        delays: list[float] = []
        t = transport(emu.openai_url, delays)
        with pytest.raises(ProviderError) as e:  # after two 429s, the real answer: no such file
            t.request(
                "POST",
                "/batches",
                json={
                    "input_file_id": "file-x",
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
        assert e.value.status == 404 and "No such File object" in str(e.value)
        assert delays == [1.0, 1.0]  # Retry-After: 1, honoured exactly


def test_retries_then_reports_the_real_error_and_never_leaks_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="polars_llmbatch.transport")
    with serve(faults=Faults(read_errors=3)) as emu:
        delays: list[float] = []
        t = transport(emu.anthropic_url, delays, provider="anthropic")
        with pytest.raises(ProviderError) as e:
            t.request("GET", "/v1/messages/batches/msgbatch_nope")
        assert e.value.status == 404 and "No message batch" in str(e.value)
        assert len(delays) == 3  # three 529/500s, retried with backoff
        assert KEY not in repr(t) and KEY not in str(e.value) and KEY not in caplog.text


def test_gives_up_after_max_retries() -> None:
    with serve(faults=Faults(read_errors=10)) as emu:
        delays: list[float] = []
        t = transport(emu.gemini_url, delays, provider="gemini", max_retries=2)
        with pytest.raises(ProviderError, match="HTTP 503") as e:
            t.request("GET", "/v1beta/batches/abc")
        assert e.value.status == 503 and len(delays) == 2


def test_connection_errors_and_cut_downloads_are_retried() -> None:
    delays: list[float] = []
    t = transport("http://127.0.0.1:9", delays, max_retries=1)  # nothing listens on port 9
    with pytest.raises(ProviderError, match="connection failed"):
        t.request("GET", "/batches")
    assert len(delays) == 1
    with serve(faults=Faults(drop_downloads=1)) as emu:
        import openai

        c = openai.OpenAI(base_url=emu.openai_url, api_key="k")
        f = c.files.create(
            file=(
                "s.jsonl",
                b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}}\n',
            ),
            purpose="batch",
        )
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status != "completed":
            b = c.batches.retrieve(b.id)
        delays.clear()
        body = (
            transport(emu.openai_url, delays)
            .request("GET", f"/files/{b.output_file_id}/content")
            .content
        )
        assert body.count(b"\n") == 1 and len(delays) == 1  # the cut download, then a whole one
