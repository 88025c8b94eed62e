"""Keys go only to the configured provider origin, and never into a repr, ``vars()``, a
pickle or a checkpoint."""

from __future__ import annotations

import http.server
import json
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from polars_llmbatch.emulator import serve
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers import get_provider
from polars_llmbatch.providers.anthropic import Anthropic
from polars_llmbatch.providers.openai import OpenAI
from polars_llmbatch.run.transport import Transport, credentials
from tests.helpers import batch

KEY = "sk-live-very-secret-0042"


@contextmanager
def recorder() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server on 127.0.0.1 that answers 200 and records each request's headers."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_the_key_goes_only_to_the_configured_origin(provider: str) -> None:
    with recorder() as (home, at_home), recorder() as (foreign, abroad):
        t = Transport(credentials(provider, api_key=KEY, base_url=home + "/v1"))
        try:
            t.request("GET", "/batches")  # relative: the provider itself
            t.request("GET", home + "/results/1")  # absolute, same origin (Anthropic results)
            t.request("GET", foreign + "/results/1")  # a URL the provider named, elsewhere
        finally:
            t.close()
    assert all(KEY in " ".join(h.values()) for h in at_home) and len(at_home) == 2
    assert len(abroad) == 1 and KEY not in " ".join(abroad[0].values())
    names = set(get_provider(provider).auth_headers(KEY))
    assert not names & set(abroad[0])


def test_provider_objects_keep_the_key_out_of_vars_and_pickles() -> None:
    for cls in (OpenAI, Anthropic):
        p = cls(api_key=KEY, base_url="https://api.example/v1")
        assert p.api_key == KEY
        assert KEY not in repr(p) + repr(vars(p))
        copy = pickle.loads(pickle.dumps(p))
        assert KEY.encode() not in pickle.dumps(p) and copy.api_key is None
    creds = credentials("openai", api_key=KEY)
    assert KEY not in repr(creds) + repr(vars(creds))
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(creds)


@pytest.mark.parametrize(
    "url", ["http://user:sk-pass@127.0.0.1:9/v1", "http://127.0.0.1:9/v1?key=sk-query"]
)
def test_a_base_url_holding_a_secret_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(LlmBatchError, match="carries user info or a query string") as err:
        pl.DataFrame({"body": ["a"]}).llm.batch(
            "x {body}",
            provider="openai",
            model="gpt-4o-mini",
            api_key="k",
            base_url=url,
            checkpoint=tmp_path / "j",
            progress=False,
        )
    assert "sk-pass" not in str(err.value) and "sk-query" not in str(err.value)
    assert not (tmp_path / "j").exists()


def test_the_checkpoint_records_no_secret(tmp_path: Path) -> None:
    with serve(batch_seconds=0.05) as emu:
        batch(pl.DataFrame({"body": ["a"]}), emu, tmp_path / "j", api_key=KEY, output="answer")
    job = json.loads((tmp_path / "j" / "job.json").read_text())
    assert job["base_url"] == emu.openai_url
    for f in (tmp_path / "j").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
