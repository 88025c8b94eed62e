"""A job's runner lock in an object store: a lease, since there is no OS lock across machines.

The holder writes ``lock.json`` (created only if absent, or swapped for a lapsed one by
ETag) and renews it every third of its term from a background thread, each renewal a
compare-and-swap on the ETag it last wrote: a holder that was displaced finds out at its next
renewal. The holder acts (the engine appends an event: an intent before every create) only
while its lease is valid on its own monotonic clock, less a margin for clock skew between
machines; a killed holder's lease lapses after one term (``POLARS_LLMBATCH_LEASE_SECONDS``,
default 30) and the next runner takes it. What a local checkpoint's OS lock promises holds
while the machines' clocks agree within :data:`SKEW` seconds and the holder reaches the store
at least once a term (it stops acting the moment it cannot).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time

from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.run.store import Remote, redact

__all__ = ["KEY", "SKEW", "Lease", "term"]

log = logging.getLogger("polars_llmbatch")

#: The lock's object in the checkpoint's prefix.
KEY = "lock.json"
#: Seconds two machines' clocks may disagree by (NTP keeps them within milliseconds).
SKEW = 2.0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
#: How often a waiting runner looks at the lock again.
POLL = 0.25


def term() -> float:
    """The lease's term in seconds: ``$POLARS_LLMBATCH_LEASE_SECONDS``, default 30."""
    raw = os.environ.get("POLARS_LLMBATCH_LEASE_SECONDS", "30")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 3 * SKEW or value == float("inf"):  # NaN too
        raise LlmBatchError(
            f"POLARS_LLMBATCH_LEASE_SECONDS={raw!r}: give a number of seconds of at least "
            f"{3 * SKEW:g} (the default is 30)"
        )
    return value


class Lease:
    """Hold ``remote``'s job for this process (:meth:`acquire`, :meth:`release`)."""

    def __init__(self, remote: Remote, held_error: type[LlmBatchError]) -> None:
        self.remote = remote
        self.term = term()
        self._error = held_error
        self._token = secrets.token_hex(8)
        self._etag: str | None = None
        self._valid_until = 0.0  # monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def valid(self) -> bool:
        """Whether this process may act for the job now."""
        return self._etag is not None and time.monotonic() < self._valid_until

    def _body(self, *, lapsed: bool = False) -> bytes:
        now = dt.datetime.now(dt.timezone.utc)
        # released: lapsed on any clock, so the next runner takes it at once
        expires = _EPOCH if lapsed else now + dt.timedelta(seconds=self.term)
        return json.dumps(
            {
                "owner": self._token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "boot": _BOOT,
                "renewed": now.isoformat(timespec="milliseconds"),
                "expires": expires.isoformat(timespec="milliseconds"),
            }
        ).encode()

    def acquire(self, *, blocking: bool, patient: bool = False) -> None:
        """Take the lease. A lapsed lease, or one whose holder is a process of this machine
        that is gone (killed), is taken at once. Otherwise ``blocking`` waits for the holder;
        ``patient`` waits one renewal to tell a live holder (raise) from a killed one (wait
        its lease out, at most one term); neither raises if the holder renewed lately."""
        seen: str | None = None
        while True:
            started = time.monotonic()
            etag = self.remote.create(KEY, self._body())
            if etag is None:
                got = self.remote.read(KEY)
                if got is None:
                    continue  # released meanwhile: create it
                data, held = got
                info = _parse(data)
                now = dt.datetime.now(dt.timezone.utc)
                if now > info["expires"] + dt.timedelta(seconds=SKEW) or _gone(info):
                    etag = self.remote.replace(KEY, self._body(), held)
                    if etag is None:
                        continue  # someone else took it first: look again
                else:
                    alive = (now - info["renewed"]).total_seconds() < self.term / 3 + SKEW
                    renewed = seen is not None and held != seen
                    if not blocking and (renewed or (alive and not patient and seen is None)):
                        raise self._error(_held_message(self.remote.url, info))
                    seen = held
                    time.sleep(POLL)
                    continue
            with self._mutex:
                self._etag = etag
                self._valid_until = started + self.term - SKEW
            break
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="llmbatch-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.term / 3) and self.renew():
            pass

    def renew(self) -> bool:
        """Extend the lease by a term (what the background thread does every third of one);
        False once it is lost (taken by another runner, or released)."""
        started = time.monotonic()
        with self._mutex:
            if self._etag is None:
                return False
            try:
                etag = self.remote.replace(KEY, self._body(), self._etag)
            except Exception as exc:  # the store is unreachable: try again, or lapse
                log.warning(
                    "could not renew the job's lease in %s: %s", self.remote.url, redact(str(exc))
                )
                return True
            if etag is None:
                log.warning("the job's lease in %s was taken by another runner", self.remote.url)
                self._etag = None
                return False
            self._etag, self._valid_until = etag, started + self.term - SKEW
            return True

    def release(self) -> None:
        """Stop renewing and let the lease lapse at once (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._etag is not None and self.valid():
                try:
                    self.remote.replace(KEY, self._body(lapsed=True), self._etag)
                except Exception as exc:  # it lapses by itself within a term
                    log.warning("could not release the job's lease: %s", exc)
            self._etag = None

    def check(self) -> None:
        """Raise unless the lease is still this process's: called before every event a
        runner writes, so none (no intent, hence no create) follows a lost lease."""
        if not self.valid():
            raise self._error(
                f"this runner lost the lease on {self.remote.url} (the store could not be "
                "reached to renew it, or another runner took it); nothing more is sent from "
                "here. Resume the job again (llmbatch resume, or Job.open(...).wait())"
            )


def _boot_id() -> str:
    """This boot of this machine (Linux), or "" where it cannot be told: with it, a lock
    left by a killed process here is known for one without waiting out its term."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT = _boot_id()


def _gone(info: dict) -> bool:
    """Whether the lock's holder was a process of this very boot that no longer runs."""
    if not _BOOT or info.get("boot") != _BOOT or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process: another Lease object of ours, alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by another user
    return False


def _parse(data: bytes) -> dict[str, dt.datetime | str]:
    try:
        info = json.loads(data)
        return {
            **info,
            "renewed": dt.datetime.fromisoformat(info["renewed"]),
            "expires": dt.datetime.fromisoformat(info["expires"]),
        }
    except (ValueError, KeyError, TypeError):
        return {"renewed": _EPOCH, "expires": _EPOCH}  # unreadable: taken as lapsed


def _held_message(url: str, info: dict) -> str:
    who = f"{info.get('host', '?')} (pid {info.get('pid', '?')})"
    lapses = info["expires"].strftime("%H:%M:%S UTC")
    return (
        f"the job in {url!r} is being run by {who}, which holds its lease until {lapses} and "
        "renews it while it runs; let that one finish (`llmbatch status URL` shows progress) "
        "or stop it first"
    )
