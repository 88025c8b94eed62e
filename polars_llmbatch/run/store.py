"""Checkpoints in an object store (``s3://``, ``gs://``, ``az://``): the store holds the job,
a local folder mirrors it.

Every file of a checkpoint is written whole and never changed, so the store keeps each as an
object of the same name, uploaded before the event that refers to it is written. The event
log, the one thing that grows, is one object per event (``events/0000000042.json``), each
created only if no object of that name exists yet (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``, Azure ``If-None-Match: *``): two writers can never both write event
42, and neither loses an event. The readers (the engine, ``reconcile``, ``result()``) read
the local mirror, which is filled from the store on opening and kept up with its new events.

The layer is `obstore <https://developmentseed.org/obstore/>`_ (the Rust ``object_store``
crate that polars' own cloud IO is built on), for its create-only and compare-and-swap puts,
streaming multipart uploads from a file, and small-object latency (benchmarks/README.md);
credentials come from the store's standard environment variables (``AWS_*``,
``GOOGLE_*``, ``AZURE_*``) and are never written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from polars_llmbatch.errors import LlmBatchError

__all__ = ["SCHEMES", "Remote", "is_remote", "mirror_folder", "redact"]

#: URL schemes taken for an object store (``checkpoint="s3://bucket/prefix"``).
SCHEMES = ("s3", "gs", "az", "abfs", "abfss")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: Objects fetched at once when a mirror catches up (small objects: latency-bound).
FETCHERS = 16


def is_remote(location: object) -> bool:
    """Whether ``location`` names an object-store checkpoint (a URL, as a string).

    Example:
        >>> is_remote("s3://bucket/jobs/tickets"), is_remote("runs/tickets")
        (True, False)
    """
    return isinstance(location, str) and bool(_URL.match(location))


def check_url(url: str) -> str:
    """``url`` normalised (no trailing slash), or a clear error naming what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise LlmBatchError(
            f"checkpoint={url!r}: {parts.scheme}:// is not an object store this reads; use a "
            f"local folder or one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        # a key in the URL would be written into job.json and every message naming the job
        raise LlmBatchError(
            f"checkpoint= must not carry credentials or options in the URL ({parts.scheme}://"
            "bucket/prefix only); give credentials through the store's environment variables "
            "(AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)"
        )
    prefix = parts.path.strip("/")
    if not parts.netloc or not prefix:
        raise LlmBatchError(
            f"checkpoint={url!r} needs a bucket and a prefix for the job, e.g. "
            f"{parts.scheme}://my-bucket/jobs/tickets"
        )
    return f"{parts.scheme.lower()}://{parts.netloc}/{prefix}"


#: Environment variables whose values never appear in a message (a store's error may echo
#: what it was given).
_SECRETS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
)


def redact(text: str) -> str:
    """``text`` with the store's secrets from the environment blanked out.

    Example:
        >>> import os
        >>> os.environ["AWS_SECRET_ACCESS_KEY"] = "hunter2hunter2"
        >>> redact("denied for hunter2hunter2")
        'denied for ***'
        >>> del os.environ["AWS_SECRET_ACCESS_KEY"]
    """
    for name in _SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def mirror_folder(url: str) -> Path:
    """The local folder mirroring ``url``: under the cache root, named for the prefix (readable)
    and a digest of the whole URL (unique).

    Example:
        >>> import os
        >>> os.environ["POLARS_LLMBATCH_CACHE"] = "/tmp/llmbatch-doc"
        >>> mirror_folder("s3://bucket/jobs/tickets").name
        'tickets-dcf68f256f2a'
        >>> del os.environ["POLARS_LLMBATCH_CACHE"]
    """
    from polars_llmbatch.run.checkpoint import default_root

    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return default_root() / "remote" / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class Remote:
    """One checkpoint's prefix in an object store; keys are relative to it (``job.json``)."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url)
        try:
            from obstore.store import from_url
        except ImportError:
            raise LlmBatchError(
                f"checkpoint={self.url!r} needs the object-store layer: "
                "pip install 'polars_llmbatch[s3]' (or [gcs], [azure])"
            ) from None
        self._store = from_url(self.url)

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def read(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag; None if there is none."""
        import obstore

        try:
            got = obstore.get(self._store, key)
        except FileNotFoundError:
            return None
        return bytes(got.bytes()), str(got.meta["e_tag"])

    def write(self, key: str, data: bytes | Path) -> None:
        """Put an object (a file is streamed, in parts when large)."""
        import obstore

        if isinstance(data, Path):
            with data.open("rb") as f:
                obstore.put(self._store, key, f)
        else:
            obstore.put(self._store, key, data)

    def create(self, key: str, data: bytes) -> str | None:
        """Put an object only if none of that name exists: its ETag, or None if one did."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return str(obstore.put(self._store, key, data, mode="create")["e_tag"])
        except (AlreadyExistsError, PreconditionError):
            return None
        except Exception as exc:
            # S3 answers 409 ConditionalRequestConflict to the loser of two creates racing:
            # lost, like a 412 (the caller reads what is there and tries again)
            if "409" in str(exc) or "Conflict" in str(exc):
                return None
            raise

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Put an object only if it is still the version ``etag``: the new ETag, or None if it
        changed meanwhile (or is gone)."""
        import obstore
        from obstore.exceptions import PreconditionError

        try:
            return str(obstore.put(self._store, key, data, mode={"e_tag": etag})["e_tag"])
        except (PreconditionError, FileNotFoundError):
            return None

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self._store, key)

    def download(self, key: str, path: Path) -> None:
        """Stream an object into ``path`` (the caller renames it into place)."""
        import obstore

        got = obstore.get(self._store, key)
        with path.open("wb") as f:
            for chunk in got:
                f.write(chunk)

    def list(self, prefix: str = "", *, after: str | None = None) -> Iterator[dict[str, Any]]:
        """Objects under ``prefix`` in key order (``after`` one key, exclusive): dicts with
        ``path`` (relative) and ``size``."""
        import obstore

        stream = obstore.list(self._store, prefix or None, offset=after)
        for batch in stream:
            yield from batch

    def top(self) -> tuple[list[str], list[dict[str, Any]]]:
        """The prefix's first level: its folders' names and its objects (one listing, not
        every object below: the event log's thousands are left out)."""
        import obstore

        level = obstore.list_with_delimiter(self._store)
        folders = [p.rstrip("/").rsplit("/", 1)[-1] for p in level["common_prefixes"]]
        return folders, list(level["objects"])

    def read_many(self, keys: list[str]) -> list[bytes]:
        """Several small objects at once (in ``keys``' order); each must exist."""
        if len(keys) <= 1:
            return [self._must(k) for k in keys]
        with ThreadPoolExecutor(max_workers=FETCHERS) as pool:
            return list(pool.map(self._must, keys))

    def _must(self, key: str) -> bytes:
        got = self.read(key)
        if got is None:
            raise LlmBatchError(f"{self.url}/{key} was listed but is gone; was it deleted?")
        return got[0]
