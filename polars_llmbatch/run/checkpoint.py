"""A job's checkpoint directory: the single source of truth for what was sent, paid for and received.

Layout (every file is written atomically: temp file, fsync, rename; the event log is appended and
fsynced line by line)::

    job.json                  the job: spec, job id, mode, tags, estimate (never a secret)
    rows.parquet              input row key → custom_id (null for a skipped row)
    requests.parquet          unique requests: custom_id, body (the exact JSON), row
    shards/NNNNN.jsonl        each shard's bytes exactly as uploaded (.json for inline shards)
    shards/NNNNN.ids.parquet  the custom_ids a shard holds
    events.jsonl              append-only: planned, intent, submitted, state, fetched, done
                              (and planned_round, queue_full, canceled, cancel_sent,
                              retries_skipped)
    raw/NNNNN-K.jsonl         result files as downloaded, before anything parses them
    results/NNNNN.parquet     one row per request of the shard (results/cached.parquet: reused;
                              results/unplanned.parquet: what a cancel left unplanned)
    derived/                  made again from results/ whenever missing: each results file's
                              answers decoded (outputs/), a huge job's result (result-*/)

A process killed at any instant leaves the directory readable: a torn last event line is
ignored, and a half-written file is only ever a ``*.tmp`` that the next run overwrites.

A checkpoint in an object store (``s3://bucket/prefix``, run/store.py) holds the same files
as objects, each uploaded before the event naming it; its event log is one object per event,
created only if absent, and its runner lock is a lease (run/lease.py). A local folder under
the cache root mirrors it, and everything reads the mirror.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch._fs import fsync, lock_fd
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.stored import ROW_GROUP
from polars_llmbatch.run.store import Remote, is_remote, mirror_folder, redact

__all__ = ["Checkpoint", "LockedError", "ShardRecord", "default_root"]

log = logging.getLogger("polars_llmbatch")

#: The checkpoint format written; :data:`READS` the ones read. 2: the first round is planned
#: by the engine (``rolling``), which a reader of format 1 would take for a finished job.
FORMAT = 2
READS = (1, 2)
#: What a checkpoint folder holds (see the layout above).
_OWN_FILES = frozenset(
    {
        "job.json",
        "rows.parquet",
        "requests.parquet",
        "events.jsonl",
        "shards",
        "raw",
        "results",
        "derived",
        ".lock",
    }
)
#: What an object-store checkpoint holds besides (its lease; the event log's folder).
_OWN_OBJECTS = _OWN_FILES | {"lock.json", "events"}
#: Seconds between looks at an object-store checkpoint's new events (another process's
#: cancel, say) while reading its log.
SYNC_SECONDS = 1.0


def default_root() -> Path:
    """Where jobs without ``checkpoint=`` live: ``$POLARS_LLMBATCH_CACHE``, else the user cache
    directory (``~/.cache/polars_llmbatch`` on Linux, ``~/Library/Caches/polars_llmbatch`` on
    macOS, ``%LOCALAPPDATA%\\polars_llmbatch`` on Windows).

    Example:
        >>> import os
        >>> os.environ["POLARS_LLMBATCH_CACHE"] = "/tmp/llmbatch-doc"
        >>> str(default_root())
        '/tmp/llmbatch-doc'
        >>> del os.environ["POLARS_LLMBATCH_CACHE"]
    """
    if os.environ.get("POLARS_LLMBATCH_CACHE"):
        return Path(os.environ["POLARS_LLMBATCH_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "polars_llmbatch"


@dataclass
class ShardRecord:
    """One shard as the event log tells it."""

    index: int
    attempt: int
    requests: int
    sha256: str
    tag: str
    filename: str
    kind: str = "file"
    mode: str = "batch"
    round: int = 1
    intent_at: str | None = None
    remote_id: str | None = None
    phase: str | None = None
    status: str | None = None
    done: bool = False
    queue_limited: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # result statuses, once done
    files: list[str] = field(default_factory=list)
    error: str | None = None
    cancel_sent: bool = False  # its batch has been asked to cancel
    #: Its requests' worst-case input tokens (0 in checkpoints from before they were kept):
    #: what it holds of the provider's enqueued-token queue while it runs.
    tokens: int = 0

    @property
    def submitted(self) -> bool:
        return self.remote_id is not None


class Checkpoint:
    """Read and write one job directory. Only the engine and :class:`Job` write to it."""

    def __init__(self, path: str | Path) -> None:
        #: The job's store in an object-store checkpoint, None in a local one.
        self.remote = Remote(path) if is_remote(path) else None  # type: ignore[arg-type]
        #: Where the job is, as the user names it (a folder, or the store's URL).
        self.location = self.remote.url if self.remote else str(path)
        #: The local folder everything reads (an object-store checkpoint's mirror).
        self.path = mirror_folder(self.location) if self.remote else Path(path)
        self._lease: Any = None
        self._pulled = False
        self._synced = -math.inf

    def __repr__(self) -> str:
        return f"Checkpoint({self.location!r})"

    # files ---------------------------------------------------------------------------------
    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def events_file(self) -> Path:
        return self.path / "events.jsonl"

    def shard_file(self, filename: str) -> Path:
        return self.path / "shards" / filename

    def ids_file(self, index: int) -> Path:
        return self.path / "shards" / f"{index:05d}.ids.parquet"

    def result_file(self, index: int) -> Path:
        return self.path / "results" / f"{index:05d}.parquet"

    @property
    def cached_file(self) -> Path:
        return self.path / "results" / "cached.parquet"

    def raw_file(self, index: int, k: int) -> Path:
        return self.path / "raw" / f"{index:05d}-{k}.jsonl"

    def exists(self) -> bool:
        if self.remote is not None:
            return self._fetch_job()
        return self.job_file.is_file()

    # creation ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail early (before any request is sent) when the directory cannot be written."""
        if self.remote is not None:
            self._check_remote_writable()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # A name of this process's own: two processes probing one folder at once must not
            # delete each other's probe (the second would read as "not writable").
            probe = self.path / f".write-test-{os.getpid()}-{secrets.token_hex(4)}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise LlmBatchError(
                f"checkpoint directory {str(self.path)!r} is not writable ({exc.strerror or exc}); "
                "pass checkpoint= a folder you can write to"
            ) from None

    def begin(
        self,
        rows: pl.DataFrame | pl.LazyFrame,
        requests: pl.DataFrame | Callable[[Path], None],
    ) -> None:
        """Write a new job's data files (``rows`` a frame or a plan sunk to the file,
        ``requests`` a frame or a writer of the file). Until :meth:`commit` writes
        ``job.json`` the folder is not a job, and a run that died in between starts it afresh
        (nothing was sent)."""
        self.check_writable()
        if self.unfinished():
            for entry in self.path.iterdir():
                if entry.name == ".lock":  # held by whoever is creating the job: keep it
                    continue
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if self.remote is not None:
                for key in [m["path"] for m in self.remote.list()]:
                    if key != "lock.json":
                        self.remote.delete(key)
        for sub in ("shards", "raw", "results"):
            (self.path / sub).mkdir(exist_ok=True)
        if isinstance(rows, pl.LazyFrame):
            self._write(self.path / "rows.parquet", rows.sink_parquet)
        else:
            self.write_parquet(self.path / "rows.parquet", rows)
        if callable(requests):
            self._write(self.path / "requests.parquet", requests)
        else:
            # small row groups: the first round is planned from this file a row group at a time
            self.write_parquet(self.path / "requests.parquet", requests, row_group_size=ROW_GROUP)

    def commit(self, job: dict[str, Any]) -> None:
        self.write_bytes(self.job_file, json.dumps({"format": FORMAT, **job}, indent=1).encode())

    def unfinished(self) -> bool:
        """A folder holding only what :meth:`begin` and the first plan write, without
        ``job.json``: a job whose creation was interrupted before anything could be sent."""
        if self.remote is not None:
            names = self._remote_names()
            return "job.json" not in names and names <= _OWN_OBJECTS
        if not self.path.is_dir() or self.exists():
            return False
        names = {p.name.removesuffix(".tmp") for p in self.path.iterdir()}
        return names <= _OWN_FILES

    def occupied(self) -> bool:
        """Whether the place holds something that is neither a job nor an unfinished one
        (other files: a checkpoint holds one job)."""
        if self.remote is not None:
            return not self._remote_names() <= _OWN_OBJECTS
        return self.path.exists() and any(self.path.iterdir()) and not self.unfinished()

    def job(self) -> dict[str, Any]:
        if self.remote is not None and not self._pulled:
            self.pull()
        try:
            job = json.loads(self.job_file.read_text())
        except FileNotFoundError:
            raise LlmBatchError(
                f"{self.location!r} is not a polars_llmbatch checkpoint (no job.json)"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise LlmBatchError(
                f"{str(self.job_file)!r} is not valid JSON ({exc}); it is written atomically, "
                "so it was changed by hand: restore it from a backup"
            ) from None
        if job.get("format") not in READS:
            raise LlmBatchError(
                f"checkpoint {str(self.path)!r} has format {job.get('format')!r}; this version "
                f"reads formats {', '.join(map(str, READS))}"
            )
        return job

    def rows(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "rows.parquet")

    def scan_rows(self) -> pl.LazyFrame:
        """:meth:`rows` as a scan: what a row count reads without holding every row."""
        return pl.scan_parquet(self.path / "rows.parquet")

    def requests(self) -> pl.DataFrame:
        return pl.read_parquet(self.path / "requests.parquet")

    @contextlib.contextmanager
    def lock(self, *, blocking: bool = False, patient: bool = False) -> Iterator[None]:
        """Hold the job for one runner: a second process (or a second ``Job`` object) that
        tries to run the same job while one does gets a clear error instead of submitting
        every shard again. The lock is the OS's, so a killed process releases it.

        ``blocking`` waits for the holder instead: creating a job takes it that way, so two
        processes starting the same call make one job, the second reattaching to it.

        In an object store the lock is a lease (run/lease.py): ``patient`` (a runner) waits
        out a killed holder's lease instead of refusing it."""
        if self.remote is not None:
            with self._leased(blocking=blocking, patient=patient):
                yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                lock_fd(fd, blocking=blocking)
            except OSError:
                raise LockedError(
                    f"the job in {str(self.path)!r} is being run by another process or Job "
                    "object; let that one finish (`llmbatch status PATH`, or "
                    "Job.open(path).status() in Python, shows progress) or stop it first"
                ) from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # atomic writes -------------------------------------------------------------------------
    def write_bytes(self, path: Path, data: bytes) -> None:
        self._write(path, lambda tmp: tmp.write_bytes(data))

    def write_parquet(
        self, path: Path, frame: pl.DataFrame, *, row_group_size: int | None = None
    ) -> None:
        self._write(path, lambda tmp: frame.write_parquet(tmp, row_group_size=row_group_size))

    def _write(self, path: Path, write: Callable[[Path], object]) -> None:
        # In an object store the file is uploaded before it is renamed into the mirror: a
        # mirrored file is always in the store already (a mirror's job.json that the store
        # lacks is another job's, and is emptied: see _fetch_job)
        remote = self.remote
        if remote is None:
            _atomic(path, write)
            return
        key = self._key(path)
        _atomic(path, write, before_rename=lambda tmp: remote.write(key, tmp))

    def _key(self, path: Path) -> str:
        """A mirrored file's object name in the store (``results/00003.parquet``)."""
        return path.relative_to(self.path).as_posix()

    def keep(self, path: Path) -> None:
        """Make a file just written into the folder part of the checkpoint: in an object
        store, upload it (before any event names it); a local folder's fsync already did."""
        if self.remote is not None:
            self.remote.write(self._key(path), path)

    # the event log -------------------------------------------------------------------------
    def append(self, event: str, **fields: Any) -> None:
        """Append one event and fsync it before returning: once this returns, a crash cannot
        undo it."""
        if self.remote is not None:
            self._append_remote(event, fields)
            return
        record = {"at": _now(), "event": event, **fields}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        self._append_line(line)

    def _append_line(self, line: bytes) -> None:
        fd = os.open(self.events_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size:
                os.lseek(fd, -1, os.SEEK_END)
                if os.read(fd, 1) != b"\n":  # a torn line from a crash: close it off first
                    line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> Iterator[dict[str, Any]]:
        """The events in order. A torn last line (a crash mid-append) is skipped."""
        if self.remote is not None and time.monotonic() - self._synced >= SYNC_SECONDS:
            self.sync()
        try:
            data = self.events_file.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue

    def retry_grants(self) -> dict[str, int]:
        """Extra attempts granted by :meth:`Job.retry`, per row status (summed over grants)."""
        grants: dict[str, int] = {}
        for e in self.events():
            if e.get("event") == "retry_granted":
                for status in e.get("statuses", ()):
                    grants[status] = grants.get(status, 0) + 1
        return grants

    def planning_done(self) -> bool:
        """Whether the first round is wholly planned. The engine plans it shard by shard while
        it submits (each shard as soon as its file is written), then says so in a
        ``planned_round`` event; a job from before that was planned whole before job.json."""
        if not self.job().get("rolling"):
            return True
        return any(e.get("event") == "planned_round" for e in self.events())

    def queue_ceiling(self) -> tuple[int | None, int] | None:
        """``(tokens, requests)`` the live batches stay under, from the provider's queue
        refusals (``queue_full`` events: what was live with the refused batch, less one); None
        until one. A refusal does not say which limit it hit (OpenAI and Gemini count enqueued
        tokens, Anthropic queued requests), so both bound the batches the engine keeps live.

        Other jobs of the organisation share the queue unseen, so a ceiling is not forever:
        once as many of this job's batches have ended as were live at the last refusal (the
        queue has turned over), it rises by the job's largest shard, and the next create
        probes it (a refusal lowers it again). Folded from the log: a restart sees the same."""
        ceiling: tuple[int | None, int] | None = None
        sizes: dict[int, tuple[int, int]] = {}
        live: set[int] = set()
        turnover = ended = 0
        for e in self.events():
            kind = e.get("event")
            if kind == "planned":
                for s in e["shards"]:
                    sizes[s["shard"]] = (int(s.get("tokens") or 0), int(s["requests"]))
            elif kind == "submitted":
                live.add(e["shard"])
            elif kind == "queue_full":
                ceiling = (e["tokens"], e["requests"])  # the engine took the least already
                turnover, ended = max(1, len(live - {e["shard"]})), 0
            elif kind == "done" and e["shard"] in live:
                live.discard(e["shard"])
                if ceiling is not None and not e.get("queue_limited"):
                    ended += 1
                    if ended >= turnover:
                        tokens = max(t for t, _ in sizes.values())
                        requests = max(r for _, r in sizes.values())
                        ceiling = (
                            None if ceiling[0] is None else ceiling[0] + tokens,
                            ceiling[1] + requests,
                        )
                        ended = 0
        return ceiling

    def shards(self) -> dict[int, ShardRecord]:
        """Every shard's current record, folded from the event log."""
        shards: dict[int, ShardRecord] = {}
        for e in self.events():
            kind = e.get("event")
            if kind == "planned":  # a retry round in one line; the first, a line per shard
                for s in e["shards"]:
                    shards[s["shard"]] = ShardRecord(
                        index=s["shard"],
                        attempt=s["attempt"],
                        requests=s["requests"],
                        sha256=s["sha256"],
                        tag=s["tag"],
                        filename=s["filename"],
                        kind=s.get("kind", "file"),
                        mode=s.get("mode", "batch"),
                        round=s.get("round", 1),
                        tokens=s.get("tokens", 0),
                    )
                continue
            rec = shards.get(e.get("shard", -1))
            if rec is None:
                continue
            if kind == "intent":
                rec.intent_at = e["at"]
            elif kind == "submitted":
                rec.remote_id = e["remote_id"]
            elif kind == "state":
                rec.phase, rec.status, rec.error = e["phase"], e["status"], e.get("error")
            elif kind == "fetched":
                rec.files = list(e["files"])
            elif kind == "cancel_sent":
                rec.cancel_sent = e.get("remote_id") == rec.remote_id
            elif kind == "done":
                rec.done = True
                rec.queue_limited = bool(e.get("queue_limited"))
                rec.counts = dict(e.get("counts") or {})
            elif kind == "resubmit":  # the remote batch is gone (e.g. over a queue limit)
                rec.remote_id = rec.phase = rec.status = None
                rec.intent_at = None
        return shards

    # an object-store checkpoint --------------------------------------------------------------
    def pull(self) -> None:
        """Fill the mirror from the store: every file it lacks, then the new events."""
        assert self.remote is not None
        self._fetch_job()
        for sub in ("shards", "raw", "results"):  # a store has no empty folders
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._pull_files()
        self.sync()
        self._pulled = True

    def sync(self) -> None:
        """Catch the mirror's event log up with the store's (another process's events, and
        the files they name)."""
        assert self.remote is not None
        self.path.mkdir(parents=True, exist_ok=True)
        with self._events_locked():
            foreign = self._sync_locked()
        self._synced = time.monotonic()
        if foreign:
            self._pull_files()

    def _sync_locked(self) -> bool:
        """Append the store's events after the mirror's last; whether there were any."""
        assert self.remote is not None
        last = self._last_seq()
        keys = []
        for meta in self.remote.list("events/", after=_event_key(last)):
            if meta["path"] != _event_key(last + 1 + len(keys)):
                break  # only ever one past the last is created: nothing else belongs here
            keys.append(meta["path"])
        if not keys:
            return False
        lines = self.remote.read_many(keys)
        self._append_line(b"".join(line.rstrip(b"\n") + b"\n" for line in lines))
        return True

    def _append_remote(self, event: str, fields: dict[str, Any]) -> None:
        """Create the event's object one past the last one seen (never overwriting another
        writer's), then mirror it; a lost race reads the winner's events and goes on."""
        assert self.remote is not None
        if self._lease is not None:
            self._lease.check()  # a runner that lost its lease writes nothing more
        foreign = False
        self.path.mkdir(parents=True, exist_ok=True)
        with self._events_locked():
            unseen = 0
            while True:
                seq = self._last_seq() + 1
                record = {"at": _now(), "event": event, **fields, "seq": seq}
                line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
                if self.remote.create(_event_key(seq), line) is not None:
                    self._append_line(line)
                    break
                if self._sync_locked():
                    foreign, unseen = True, 0
                    continue
                # lost to a create still being completed (S3's 409): it lists in a moment
                unseen += 1
                if unseen > 20:
                    raise LlmBatchError(
                        f"{self.location}/{_event_key(seq)} cannot be created and is not "
                        "listed; the event log cannot be appended to (was it changed by hand?)"
                    )
                time.sleep(0.05 * unseen)
        if foreign:
            self._pull_files()

    def _last_seq(self) -> int:
        """The number of the mirror's last whole event (0 before the first)."""
        try:
            size = self.events_file.stat().st_size
        except FileNotFoundError:
            return 0
        chunk = 1 << 16
        with self.events_file.open("rb") as f:
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                lines = f.read(size - start).split(b"\n")
                for line in reversed(lines[1:] if start else lines):  # the first: partial
                    try:
                        seq = json.loads(line).get("seq")
                    except ValueError:
                        continue  # a torn line: its event is fetched again from the store
                    if isinstance(seq, int):
                        return seq
                if start == 0:
                    return 0
                chunk *= 4

    @contextlib.contextmanager
    def _events_locked(self) -> Iterator[None]:
        """The mirror's log is appended by one process of this machine at a time."""
        fd = os.open(self.path / ".events.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock_fd(fd, blocking=True)
            yield
        finally:
            os.close(fd)

    def _pull_files(self) -> None:
        assert self.remote is not None
        folders, objects = self.remote.top()
        for folder in folders:
            if folder != "events":  # read by sync, an object at a time
                objects += self.remote.list(folder + "/")
        for meta in objects:
            key = meta["path"]
            if key.startswith(".write-test") or key in ("lock.json", "job.json"):
                continue
            if key.endswith(".part"):  # merged with the local one when its shard is sent
                continue
            local = self.path / key
            if not local.is_file():  # each file is written once: one in the mirror is it
                self._replace(local, lambda tmp, key=key: self.remote.download(key, tmp))

    def fetch_part(self, part: Path) -> bytes | None:
        """The store's copy of a sync shard's answers so far (``raw/NNNNN-0.part``)."""
        assert self.remote is not None
        got = self.remote.read(self._key(part))
        return got[0] if got is not None else None

    def _fetch_job(self) -> bool:
        """The store's job.json into the mirror; whether there is one. A mirror of another
        job (the prefix was emptied and a new job started there) is emptied first: its files
        and events are not this job's."""
        assert self.remote is not None
        # The mirror first: a runner uploads job.json before it renames it into the mirror, so
        # a mirrored job.json is in the store. Read the other way round, the store could be read
        # before a runner's upload and the mirror after its rename: another job, to empty.
        try:
            mirrored: bytes | None = self.job_file.read_bytes()
        except FileNotFoundError:
            mirrored = None
        got = self.remote.read("job.json")
        data = got[0] if got is not None else None
        if mirrored is not None and mirrored != data:
            log.info("the mirror of %s held another job; emptied", self.location)
            for entry in self.path.iterdir():
                if entry.name != ".events.lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self._pulled = False
        if data is None:
            return False
        if mirrored != data:
            self._replace(self.job_file, lambda tmp: tmp.write_bytes(data))
        return True

    @staticmethod
    def _replace(local: Path, fill: Callable[[Path], object]) -> None:
        """``fill`` a temp file, then rename it to ``local`` (a file of the mirror)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: a reader and the runner may both be filling it
        tmp = local.with_name(f".{local.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
        try:
            fill(tmp)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _remote_names(self) -> set[str]:
        """The top-level names in the store's prefix (write probes left out)."""
        assert self.remote is not None
        folders, objects = self.remote.top()
        names = set(folders) | {m["path"] for m in objects}
        return {n for n in names if not n.startswith(".write-test")}

    def _check_remote_writable(self) -> None:
        assert self.remote is not None
        probe = f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.remote.write(probe, b"")
            self.remote.delete(probe)
        except Exception as exc:
            raise LlmBatchError(
                f"checkpoint {self.location!r} cannot be written ({redact(str(exc))}); check "
                "the bucket's name and the store's credentials in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ...)"
            ) from None

    @contextlib.contextmanager
    def _leased(self, *, blocking: bool, patient: bool) -> Iterator[None]:
        from polars_llmbatch.run.lease import Lease

        assert self.remote is not None
        lease = Lease(self.remote, LockedError)
        lease.acquire(blocking=blocking, patient=patient)
        self._lease = lease
        try:
            self.sync()  # what the last holder wrote, before acting on it
            yield
        finally:
            self._lease = None
            lease.release()


def _event_key(seq: int) -> str:
    return f"events/{seq:010d}.json"


def _atomic(
    path: Path,
    write: Callable[[Path], object],
    *,
    before_rename: Callable[[Path], object] | None = None,
) -> None:
    """``write`` a temp file next to ``path``, fsync it, rename it over ``path``, fsync the
    folder: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync(tmp)
    if before_rename is not None:
        before_rename(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


class LockedError(LlmBatchError):
    """Another runner holds the job."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
