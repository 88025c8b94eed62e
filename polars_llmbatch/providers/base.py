"""The narrow interface every provider module implements, and the shapes it returns.

A provider knows its wire format, its limits and how its tokens are counted, and nothing else:
the request, shard and estimate code speak only this interface.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.spec import RequestSpec

if TYPE_CHECKING:
    from polars_llmbatch.run.transport import Transport

__all__ = [
    "COST_SCHEMA",
    "USAGE_SCHEMA",
    "AmbiguousBatch",
    "Framing",
    "Limits",
    "Provider",
    "RemoteState",
    "Secret",
    "TokenRule",
    "field_of",
    "nested_message",
    "redact_url",
    "report_pages",
    "with_field",
]


class Secret:
    """A value that never shows: its repr is ``Secret('***')``, it has no ``__dict__`` for
    ``vars()`` to show, and pickling it is refused.

    Example:
        >>> s = Secret("sk-live-123")
        >>> s, s.value
        (Secret('***'), 'sk-live-123')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is never pickled; pass the key again where it is needed")


def redact_url(url: str) -> str:
    """``url`` without what may carry a secret: user info (``https://user:pass@host``) and the
    query string (``?key=...``).

    Example:
        >>> redact_url("https://user:sk-1@proxy.example/v1?key=abc")
        'https://proxy.example/v1'
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Limits:
    """Per-batch caps. Bytes are decimal megabytes (200 MB = 200,000,000 bytes), the safe reading."""

    max_requests: int
    max_bytes: int
    max_embedding_inputs: int | None = None


@dataclass(frozen=True)
class Framing:
    """How request lines are joined into one uploaded shard.

    ``line`` is a JSON skeleton with ``slot("key")`` and ``slot("body")`` (body is raw JSON);
    a shard is ``prefix + sep.join(lines) + suffix``.
    """

    line: Any
    prefix: str = ""
    sep: str = "\n"
    suffix: str = "\n"
    media_type: str = "application/jsonl"
    kind: str = "file"  # "file": uploaded as a file; "inline": sent as the create-call body

    @property
    def line_bytes(self) -> int:
        """Bytes each line adds around its key and body, its separator included."""
        from polars_llmbatch._json import dumps, slot

        fixed = dumps(self.line).replace(dumps(slot("key")), "").replace(dumps(slot("body")), "")
        return len(fixed.encode()) + len(self.sep.encode()) + 2  # the key's quotes

    def size(self, n_requests: int, payload_bytes: int) -> int:
        """The framed shard size in bytes."""
        ends = len(self.prefix.encode()) + len(self.suffix.encode()) - len(self.sep.encode())
        return ends + payload_bytes + n_requests * self.line_bytes


@dataclass(frozen=True)
class TokenRule:
    """How to count (or approximate) a provider's billed input tokens from tiktoken counts.

    ``tokens ≈ ratio × encoding_tokens(texts) + per_request + per_message × messages``.
    ``band`` is the relative error bound of the result (0 for an exact count), ``slack`` an absolute
    per-request tolerance (e.g. ±2 tokens for models the cookbook rules were not checked on).
    """

    encoding: str
    per_request: int
    per_message: int
    ratio: float = 1.0
    band: float = 0.0
    slack: int = 0
    method: str = "exact"


class AmbiguousBatch(LlmBatchError):
    """More than one remote batch could be the one a crashed submit created: the engine waits
    (and asks again) rather than submit a second time."""


@dataclass(frozen=True)
class RemoteState:
    """A remote batch, normalised across providers for the engine.

    ``phase``: ``queued`` (accepted, not started), ``running``, ``finalizing`` or ``ended``;
    ``status`` is the provider's own word for it. When ``ended``, ``result_files`` names what to
    download (possibly nothing: a failed or expired Gemini batch has no results) and ``error``
    says why a whole batch failed.
    """

    remote_id: str
    phase: str
    status: str
    total: int = 0
    done: int = 0
    failed: int = 0
    result_files: tuple[str, ...] = ()
    error: str | None = None
    #: What the requests of an ended batch that have no result became: ``expired``,
    #: ``canceled`` or ``errored`` (each provider maps its own words).
    unanswered: str = "errored"

    @property
    def ended(self) -> bool:
        return self.phase == "ended"


#: The provider's usage report, normalised: tokens per day, model and tier (``batch``,
#: ``flex``, ``sync``; ``input_tokens`` is the whole input, cache reads and writes included).
USAGE_SCHEMA: dict[str, Any] = {  # polars dtypes
    "day": pl.Date,
    "model": pl.String,
    "tier": pl.String,
    "requests": pl.Int64,
    "input_tokens": pl.Int64,
    "cached_tokens": pl.Int64,
    "cache_write_tokens": pl.Int64,
    "output_tokens": pl.Int64,
}
#: The provider's cost report, normalised: USD per day, model and tier where it says them.
COST_SCHEMA: dict[str, Any] = {
    "day": pl.Date,
    "model": pl.String,
    "tier": pl.String,
    "amount": pl.Float64,
    "line_item": pl.String,
}


class Provider(ABC):
    """One provider's wire format, limits and token rules.

    An instance may carry credentials, for ``provider=OpenAI(api_key=..., base_url=...)``
    instead of the environment variables; the key never shows in its repr.
    """

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None) -> None:
        self._key = Secret(api_key) if api_key else None
        self.base_url = base_url

    @property
    def api_key(self) -> str | None:
        """The key this object carries (never in its repr, ``vars()`` or a pickle)."""
        return self._key.value if self._key is not None else None

    def __repr__(self) -> str:
        url = f"base_url={redact_url(self.base_url)!r}" if self.base_url else ""
        return f"{type(self).__name__}({url})"

    def __getstate__(self) -> dict[str, Any]:
        # A pickled provider (for a worker process, say) travels without its key.
        return {**self.__dict__, "_key": None}

    name: str
    limits: Limits
    #: Where the official SDKs look for credentials: key variables (the first set wins), the
    #: base-URL variable, and the default base URL.
    env_key: tuple[str, ...] = ()
    env_base_url: str = ""
    default_base_url: str = ""
    #: The provider's id in genai-prices.
    prices_id: str = ""
    #: Whether batch halves the price of prompt-cache hits too (Gemini bills them at sync rate).
    batch_halves_cache_hits: bool = True
    #: HTTP statuses of a transient failure, the one definition for this provider: the
    #: transport retries a call that got one, and a request whose result carries one is sent
    #: again in a retry round (sync mode and batch result lines alike).
    retryable_http: frozenset[int] = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
    #: The result ``finish`` words of an answer cut at the output cap.
    truncated: frozenset[str] = frozenset()
    #: Whether results can carry cache writes billed at a rate of their own.
    bills_cache_writes: bool = False

    @abstractmethod
    def endpoint(self, spec: RequestSpec) -> str:
        """The sync endpoint a request body is written for (also the OpenAI batch ``url``)."""

    @abstractmethod
    def body(self, spec: RequestSpec, slots: tuple[str, ...]) -> dict[str, Any]:
        """The wire body skeleton; per-row text goes where ``_json.slot(name)`` stands.

        ``slots`` names the per-row texts: always ``"user"``, and ``"system"`` when the system
        prompt is per row. Raises :class:`LlmBatchError` for options the model does not take.
        """

    @abstractmethod
    def framing(self, spec: RequestSpec, tag: str, n_requests: int, payload_bytes: int) -> Framing:
        """How a shard is framed for upload.

        ``payload_bytes`` is the size of the shard's custom_ids and bodies; with ``n_requests`` it
        gives the framed size (:meth:`Framing.size`), which may decide the form (Gemini inline or
        file). The planner asks with ``n_requests=0`` for the form used by full-size shards.
        """

    @abstractmethod
    def token_rule(self, spec: RequestSpec) -> TokenRule:
        """How to count this request's input tokens offline."""

    def output_tokens(self, spec: RequestSpec) -> float | None:
        """Expected output tokens per request where the task fixes them (embeddings: 0)."""
        return 0.0 if spec.task == "embed" else None

    def auto_cache_min_tokens(self, spec: RequestSpec) -> int | None:
        """The prefix length from which the provider caches a shared prompt prefix by itself
        (no request flag needed); ``None`` when it does not."""
        return None

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that carry ``api_key`` (and the API version where one is required)."""
        return {"Authorization": f"Bearer {api_key}"}

    def max_input_tokens(self, spec: RequestSpec) -> int | None:
        """A per-request input cap the provider enforces beyond the model's context window."""
        return None

    def check(self, spec: RequestSpec) -> None:
        """Refuse a spec this provider cannot serve; the default refuses nothing."""
        return None

    # flex: sync calls at batch prices ------------------------------------------------------
    def flex_body(self, spec: RequestSpec, body: str) -> str | None:
        """``body`` (a sync request's JSON) asking for the flex tier, or None where the
        provider (or this kind of request) has none."""
        return None

    # token counting: a provider's free count endpoint, for calibration ------------------
    def can_count(self, spec: RequestSpec) -> bool:
        """Whether the provider counts this spec's requests for free (an endpoint that
        returns the input tokens a request would be billed, without running it)."""
        return False

    def count_tokens(self, t: Transport, spec: RequestSpec, body: dict[str, Any]) -> int:
        """The provider's count of the input tokens of one request ``body`` (the wire body
        as :meth:`body` builds it, texts filled in). Only where :meth:`can_count`."""
        raise NotImplementedError(f"{self.name}: no token-count endpoint")

    # remote batches: the engine's whole view of a provider --------------------------------
    def submit(self, t: Transport, spec: RequestSpec, data: bytes, *, tag: str, kind: str) -> str:
        """Upload and create one batch from a shard's exact bytes, tagged; its remote id.
        ``kind`` is the shard's :attr:`Framing.kind` (``file`` or ``inline``)."""
        raise NotImplementedError(f"{self.name}: batch submission is not implemented")

    def find(
        self,
        t: Transport,
        *,
        tag: str,
        since: dt.datetime,
        requests: int,
        exclude: frozenset[str] = frozenset(),
        custom_ids: frozenset[str] = frozenset(),
    ) -> str | None:
        """The batch a crashed submit may have created (by ``tag``, or where the provider has no
        tag field, the one candidate created ``since`` with ``requests`` requests that is not in
        ``exclude``; when several are, the one whose results hold the shard's ``custom_ids``),
        else None. Raises :class:`AmbiguousBatch` while it cannot tell."""
        raise NotImplementedError(f"{self.name}: finding batches is not implemented")

    def poll(self, t: Transport, remote_id: str) -> RemoteState:
        raise NotImplementedError(f"{self.name}: polling is not implemented")

    def fetch(self, t: Transport, state: RemoteState, custom_ids: Sequence[str]) -> list[bytes]:
        """The bytes of every result file of an ended batch (what :meth:`parse` reads);
        ``custom_ids`` are the shard's requests in the order they were sent."""
        raise NotImplementedError(f"{self.name}: fetching results is not implemented")

    def parse(self, files: Sequence[Path], spec: RequestSpec) -> pl.DataFrame:
        """Result files → rows in :data:`polars_llmbatch.collect.results.RESULT_SCHEMA`."""
        raise NotImplementedError(f"{self.name}: parsing results is not implemented")

    def cancel(self, t: Transport, remote_id: str) -> None:
        raise NotImplementedError(f"{self.name}: cancelling is not implemented")

    def stops_job(self, status: int, message: str) -> bool:
        """Whether an error answer means no request of the job can go through (a wrong key,
        URL or model; an exhausted account): the engine stops rather than record every row as
        failed, so that re-running after the fix sends everything."""
        return status in (401, 403, 404)

    def queue_limited(self, state: RemoteState) -> bool:
        """Whether an ended batch failed only because the provider's queue was full (a smaller
        batch later will be accepted)."""
        return False

    # the bill: organisation reports read with an admin key ------------------------------
    #: Where the admin key is looked for (empty: the provider has no such reports).
    admin_env_key: tuple[str, ...] = ()

    def billed_usage(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        """Billed tokens per day, model and tier from ``start`` to ``end`` (UTC), in
        :data:`USAGE_SCHEMA`."""
        raise NotImplementedError(f"{self.name}: no organisation usage report")

    def billed_costs(self, t: Transport, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
        """Billed USD per day (and model and tier where the report says), in
        :data:`COST_SCHEMA`."""
        raise NotImplementedError(f"{self.name}: no organisation cost report")

    # sync mode: the same bodies, one call each ------------------------------------------
    def sync_path(self, spec: RequestSpec) -> str:
        """Where one request body is POSTed in sync mode (relative to the base URL)."""
        raise NotImplementedError(f"{self.name}: sync mode is not implemented")

    def sync_line(self, custom_id: str, status: int, body: bytes) -> bytes:
        """A sync response as one line of this provider's batch result file, so that sync and
        batch results go through the same :meth:`parse`."""
        raise NotImplementedError(f"{self.name}: sync mode is not implemented")

    def error_body(self, message: str) -> bytes:
        """An error response body in this provider's shape, for a call that got no answer
        (``sync_line`` then records it like any error the provider gave)."""
        raise NotImplementedError(f"{self.name}: sync mode is not implemented")

    @abstractmethod
    def line_id(self, record: dict[str, Any]) -> str | None:
        """The custom_id of one parsed line of this provider's result file."""

    @abstractmethod
    def error_message(self, body: Any) -> str | None:
        """The message of an error response (its parsed JSON body) in this provider's shape,
        or None when the body is not one."""

    # helpers shared by the provider modules ------------------------------------------------
    def _refuse(self, spec: RequestSpec, option: str, why: str) -> LlmBatchError:
        return LlmBatchError(f"{self.name} model {spec.model!r} does not take {option}: {why}")


def with_field(body: str, field: str) -> str:
    """``body`` (a JSON object's text) with ``field`` (``"name":value``) added first: the
    stored bytes stay as they are, no parse and re-encode per request."""
    head, brace, rest = body.partition("{")
    if not brace:  # pragma: no cover - bodies are JSON objects
        raise ValueError("not a JSON object")
    return head + "{" + field + ("," if rest.strip() != "}" else "") + rest


def report_pages(t: Transport, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every bucket of an organisation report, page after page: the shape OpenAI's and
    Anthropic's admin reports share (``data``, ``has_more``, ``next_page`` as ``page=``)."""
    page = None
    while True:
        query = {**params, **({"page": page} if page else {})}
        body = t.request("GET", path, params=query).json()
        yield from body.get("data") or []
        page = body.get("next_page")
        if not body.get("has_more") or not page:
            return


def field_of(record: dict[str, Any], name: str) -> str | None:
    """``record[name]`` as text, or None: a result line's id field (each provider names it)."""
    value = record.get(name)
    return None if value is None else str(value)


def nested_message(body: Any, *fallbacks: str) -> str | None:
    """``body["error"]["message"]`` (or the first of ``fallbacks`` there): the error shape
    the providers share, each stating in its own module that it uses it."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    found = next((err[k] for k in ("message", *fallbacks) if err.get(k)), None)
    return str(found) if found else None
