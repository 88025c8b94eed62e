"""HTTP to the providers: one httpx client per provider, with auth, timeouts and retries.

Retries cover the provider's transient statuses (:attr:`Provider.retryable_http`: 408, 409,
429, 5xx, 529) and connection errors, with exponential backoff
and jitter, honouring ``Retry-After`` / ``retry-after-ms`` (up to a ceiling). The API key lives
only in the client's headers: it never appears in a repr, a log line or an exception.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.providers import get_provider
from polars_llmbatch.providers.base import Secret, redact_url

__all__ = ["Credentials", "ProviderError", "Transport", "UncertainError", "credentials"]

log = logging.getLogger("polars_llmbatch.transport")


class ProviderError(LlmBatchError):
    """A provider answered with an error (after retries); carries the status and its message."""

    def __init__(self, provider: str, status: int, message: str) -> None:
        super().__init__(f"{provider} answered HTTP {status}: {message}")
        self.provider = provider
        self.status = status


class UncertainError(ProviderError):
    """A call that must not be repeated (a batch create) failed in a way that leaves open
    whether the provider acted on it: a timeout, a cut connection or a server error after
    the request was sent. The caller looks the result up instead of sending it again."""


@dataclass(frozen=True)
class Credentials:
    """A provider, its base URL and its key (held as a :class:`Secret`: never in a repr,
    ``vars()`` or a pickle)."""

    provider: str
    base_url: str
    secret: Secret = field(repr=False)

    @property
    def api_key(self) -> str:
        return self.secret.value

    def headers(self) -> dict[str, str]:
        return get_provider(self.provider).auth_headers(self.api_key)


def credentials(
    provider: str,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials:
    """The key and base URL for ``provider``: explicit arguments, else the same environment
    variables as the official SDKs. A missing key is an error naming the variable to set.

    Example:
        >>> c = credentials("openai", env={"OPENAI_API_KEY": "sk-test"})
        >>> c.base_url, "sk-test" in repr(c)
        ('https://api.openai.com/v1', False)
    """
    prov = get_provider(provider)
    keys, url_var = prov.env_key, prov.env_base_url
    env = os.environ if env is None else env
    key = api_key or next((env[k] for k in keys if env.get(k)), None)
    if not key:
        names = " or ".join(keys)
        raise LlmBatchError(
            f"no API key for {prov.name}: set {names}, or pass api_key=... "
            f"(to try things for free, run `llmbatch emulator` and set {url_var})"
        )
    url = (base_url or env.get(url_var) or prov.default_base_url).rstrip("/")
    if redact_url(url) != url:
        where = "base_url=" if base_url else f"${url_var}"
        raise LlmBatchError(
            f"{where} {redact_url(url)!r} carries user info or a query string, which would "
            "be kept in the checkpoint and sent as given; drop them and pass the key as "
            f"api_key= (or {' or '.join(keys)})"
        )
    return Credentials(prov.name, url, Secret(key))


class Transport:
    """Requests to one provider, retried on transient failures.

    ``sleep`` is injectable so tests can observe the backoff without waiting for it.
    """

    def __init__(
        self,
        creds: Credentials,
        *,
        max_retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        timeout: httpx.Timeout | None = None,
        sleep: Callable[[float], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.provider = creds.provider
        # What is recorded and shown (job.json, reprs, the result cache's key): no user info
        # or query string, which may carry a secret. Requests still go to the real URL.
        self.base_url = redact_url(creds.base_url)
        provider = get_provider(creds.provider)
        self.retry_status = provider.retryable_http
        self._error_message = provider.error_message
        self._origin = _origin(httpx.URL(creds.base_url))
        self._auth = tuple(creds.headers())
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self._client = httpx.Client(
            base_url=creds.base_url,
            headers=creds.headers(),
            timeout=timeout or httpx.Timeout(120.0, connect=10.0),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"Transport(provider={self.provider!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """Send, retrying transient failures; raise :class:`ProviderError` on a final error.

        The whole body is read before returning, so a connection cut mid-download is retried
        like any other connection error. With ``idempotent=False`` (a batch create) only what
        certainly did not reach the provider is retried (a refused connection, a 429); any
        other failure raises :class:`UncertainError` at once, since repeating the call could
        create, and bill, a second batch.
        """
        attempt = 0
        while True:
            try:
                request = self._client.build_request(method, path, **kwargs)
                if _origin(request.url) != self._origin:
                    # An absolute URL the provider named (a results or upload URL) on another
                    # host: the key goes only to the configured base URL's origin.
                    for name in self._auth:
                        request.headers.pop(name, None)
                response = self._client.send(request)
                response.read()
            except (httpx.TransportError, httpx.DecodingError) as exc:
                if not idempotent and not isinstance(
                    exc, (httpx.ConnectError, httpx.ConnectTimeout)
                ):
                    raise UncertainError(
                        self.provider, 0, f"no answer to {method} {path} ({type(exc).__name__})"
                    ) from None
                if attempt >= self.max_retries:
                    raise ProviderError(
                        self.provider, 0, f"connection failed: {type(exc).__name__}"
                    ) from None
                delay = self._delay(attempt, None)
                log.info("%s %s: %s, retrying in %.1f s", method, path, type(exc).__name__, delay)
            else:
                if response.status_code < 400:
                    return response
                if not idempotent and response.status_code != 429 and response.status_code >= 500:
                    raise UncertainError(
                        self.provider, response.status_code, _message(response, self._error_message)
                    )
                if response.status_code not in self.retry_status or attempt >= self.max_retries:
                    raise ProviderError(
                        self.provider, response.status_code, _message(response, self._error_message)
                    )
                if not idempotent and response.status_code != 429:
                    raise UncertainError(
                        self.provider, response.status_code, _message(response, self._error_message)
                    )
                delay = self._delay(attempt, response)
                log.info(
                    "%s %s: HTTP %d, retrying in %.1f s", method, path, response.status_code, delay
                )
            (self.sleep or _sleep)(delay)
            attempt += 1

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            ms = response.headers.get("retry-after-ms")
            after = response.headers.get("retry-after")
            try:
                if ms is not None:
                    return min(float(ms) / 1000, self.max_backoff)
                if after is not None:
                    return min(float(after), self.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to backoff
        base = min(self.backoff * 2**attempt, self.max_backoff)
        return base * (0.5 + random.random() / 2)  # jitter: retries from many shards spread out


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _sleep(seconds: float) -> None:
    # Looked up at call time, so a test can make every transport's backoff instant.
    time.sleep(seconds)


def _message(response: httpx.Response, read: Callable[[Any], str | None]) -> str:
    """The provider's own error message (``read``: its :meth:`Provider.error_message`), else
    the start of the body, else the status."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error"
    found = read(body)
    return found if found is not None else str(body)[:500]
