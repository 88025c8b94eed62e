"""Checkpoints in an object store: a real S3-compatible server (moto's, from PyPI) on
127.0.0.1, started here; the same guarantees as a local folder, without a local lock.

Expected values come from a local-folder run of the same call, the emulator's ledger (what
was created and billed) and the server's own listing, never from the checkpoint code.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from polars_llmbatch import Job  # noqa: E402
from polars_llmbatch.emulator import serve  # noqa: E402
from polars_llmbatch.errors import LlmBatchError  # noqa: E402
from polars_llmbatch.run import lease as lease_mod  # noqa: E402
from polars_llmbatch.run.checkpoint import Checkpoint, LockedError  # noqa: E402
from polars_llmbatch.run.store import Remote  # noqa: E402

BUCKET = "llmbatch-test"
SECRET = "moto-secret-never-written"
API_KEY = "sk-test-never-written"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="k",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield url
    srv.stop()


@pytest.fixture
def s3(server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix in the bucket; the store's standard variables point at the server (the
    children inherit them)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server,
        "AWS_ALLOW_HTTP": "true",
    }.items():
        monkeypatch.setenv(name, value)
    return f"s3://{BUCKET}/jobs/{uuid.uuid4().hex[:8]}"


def _objects(server: str, url: str) -> dict[str, bytes]:
    """Every object under ``url``'s prefix, read with boto3 (not the code under test)."""
    client = boto3.client("s3", endpoint_url=server, region_name="us-east-1")
    prefix = url.split(f"{BUCKET}/", 1)[1] + "/"
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {
        k.removeprefix(prefix): client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys
    }


def _frame(n: int = 50) -> pl.DataFrame:
    return pl.DataFrame(
        {"body": [f"ticket {i}: {'refund' if i % 3 else 'crash'}" for i in range(n)]}
    )


def _batch(df: pl.DataFrame, checkpoint: str | Path, url: str) -> pl.DataFrame:
    return df.llm.batch(
        "Classify: {body}",
        provider="openai",
        model="gpt-4o-mini",
        output=["billing", "bug", "feature", "other"],
        checkpoint=checkpoint,
        api_key=API_KEY,
        base_url=url,
        progress=False,
        poll_interval=0.02,
        max_shard_requests=20,
    )


def _fresh_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    """Another machine: the same store, an empty local cache."""
    monkeypatch.setenv("POLARS_LLMBATCH_CACHE", str(tmp_path / name))


def test_a_job_in_s3_gives_what_a_local_folder_gives_and_keeps_no_secret(
    s3: str, server: str, tmp_path: Path
) -> None:
    df = _frame()
    with serve(batch_seconds=0.05) as emu:
        local = _batch(df, tmp_path / "local", emu.openai_url)
        remote = _batch(df, s3, emu.openai_url)
        assert len(emu.ledger.batches) == 6  # 50 requests in shards of 20, once per job
    assert remote.equals(local)
    objects = _objects(server, s3)
    assert {"job.json", "rows.parquet", "requests.parquet"} <= set(objects)
    assert {f"results/{i:05d}.parquet" for i in range(3)} <= set(objects)
    # the event log is one object per event, numbered from 1 without a gap
    events = sorted(k for k in objects if k.startswith("events/"))
    assert events == [f"events/{i:010d}.json" for i in range(1, len(events) + 1)]
    kinds = [json.loads(objects[k])["event"] for k in events]
    assert kinds.count("submitted") == 3 and kinds.count("done") == 3
    for name, data in objects.items():
        assert SECRET.encode() not in data and API_KEY.encode() not in data, name
        assert b"AWS_" not in data, name


def test_a_job_in_s3_reopens_on_another_machine(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = _frame()
    with serve(batch_seconds=0.05) as emu:
        first = _batch(df, s3, emu.openai_url)
        _fresh_mirror(monkeypatch, tmp_path, "other-machine")
        job = Job.open(s3, progress=False)
        status = job.status()
        assert status.done and status.rows.get("succeeded") == 50
        assert job.result().drop("row_nr").equals(first.drop("body"))
        # the same call there reattaches to the job: nothing is sent again
        again = _batch(df, s3, emu.openai_url)
        assert len(emu.ledger.batches) == 3
    assert again.equals(first)
    assert str(job.path).startswith(str(tmp_path / "other-machine"))  # the mirror
    assert s3 in repr(job._ckpt) and s3 in job._next_steps()


def _child_script(tmp_path: Path) -> Path:
    from test_crash import CHILD

    script = tmp_path / "child.py"
    script.write_text(CHILD.replace('ckpt + ".out.json"', 'os.environ["OUT"]'))
    return script


def _child(script: Path, url: str, ckpt: str, stage: str, out: Path, cache: Path) -> int:
    return _run(script, [url, ckpt, stage, "openai", "gpt-4o-mini", "batch"], out, cache)


def _run(script: Path, args: list[str], out: Path, cache: Path) -> int:
    """``script`` in a child with its own cache (mirror) folder; killed or finished."""
    env = {**os.environ, "OUT": str(out), "POLARS_LLMBATCH_CACHE": str(cache)}
    run = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if run.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(run.stderr)
    return run.returncode


@pytest.mark.parametrize("stage", ["after_create", "downloading", "writing_results", "planning"])
@pytest.mark.parametrize("mirror", ["kept", "fresh (another machine)"])
def test_kill_9_with_an_s3_checkpoint_then_resume_pays_once(
    s3: str, tmp_path: Path, stage: str, mirror: str
) -> None:
    script = _child_script(tmp_path)
    out = tmp_path / "out.json"
    first = tmp_path / "cache-a"
    second = first if mirror == "kept" else tmp_path / "cache-b"
    with serve(batch_seconds=0.3) as emu:
        assert _child(script, emu.openai_url, s3, stage, out, first) == -signal.SIGKILL
        # the killed runner's lease: its process is gone (this machine) or it lapses (another)
        assert _child(script, emu.openai_url, s3, "none", out, second) == 0
        assert not emu.ledger.billed_twice()
        assert len(emu.ledger.batches) == 3  # 90 requests in shards of 40: created once each
    got = pl.DataFrame(json.loads(out.read_text()))
    assert got.height == 90 and set(got["llm_status"]) == {"succeeded"}


def test_the_event_log_loses_nothing_to_concurrent_writers(
    s3: str, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writers with mirrors of their own (two machines): every append races the other's.
    writers = []
    for name in ("a", "b"):
        _fresh_mirror(monkeypatch, tmp_path, name)
        writers.append(Checkpoint(s3))
    start = threading.Barrier(2)

    def write(ckpt: Checkpoint, who: str) -> None:
        start.wait()
        for i in range(40):
            ckpt.append("note", who=who, i=i)

    threads = [
        threading.Thread(target=write, args=(c, w)) for c, w in zip(writers, "ab", strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    objects = _objects(server, s3)
    stored = [json.loads(objects[f"events/{i:010d}.json"]) for i in range(1, 81)]
    assert len([k for k in objects if k.startswith("events/")]) == 80
    for who in "ab":
        assert [e["i"] for e in stored if e["who"] == who] == list(range(40))
    for ckpt in writers:  # each mirror reads the same log, in the store's order
        ckpt.sync()
        assert [(e["who"], e["i"]) for e in ckpt.events()] == [(e["who"], e["i"]) for e in stored]


def _foreign_lock(remote: Remote, *, seconds: float) -> None:
    """A lock as a runner on another machine writes it: renewed now, lapsing in ``seconds``."""
    now = dt.datetime.now(dt.timezone.utc)
    remote.write(
        lease_mod.KEY,
        json.dumps(
            {
                "owner": "elsewhere",
                "host": "another-host",
                "pid": 1,
                "boot": "another-boot",
                "renewed": now.isoformat(),
                "expires": (now + dt.timedelta(seconds=seconds)).isoformat(),
            }
        ).encode(),
    )


def test_a_live_runners_lease_is_refused_and_a_lapsed_one_taken(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_LLMBATCH_LEASE_SECONDS", "6")
    remote = Remote(s3)
    holder = Checkpoint(s3)
    with holder.lock():
        with pytest.raises(LockedError, match="being run by"), Checkpoint(s3).lock():
            pass
        # a runner waits to see whether the holder renews: it does (a third of a term)
        with pytest.raises(LockedError, match="being run by"), Checkpoint(s3).lock(patient=True):
            pass
        holder.append("note")  # still the holder's
    with Checkpoint(s3).lock():  # released: taken at once
        pass
    # another machine's runner that stopped renewing: a runner waits its lease out
    _foreign_lock(remote, seconds=2)
    with Checkpoint(s3).lock(patient=True):
        lapsed = json.loads(remote.read(lease_mod.KEY)[0])  # type: ignore[index]
        assert lapsed["owner"] != "elsewhere"
        now = dt.datetime.now(dt.timezone.utc)
    assert now > dt.datetime.fromisoformat(lapsed["renewed"]) - dt.timedelta(seconds=1)


def test_a_runner_that_lost_its_lease_writes_nothing_more(
    s3: str, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_LLMBATCH_LEASE_SECONDS", "6")
    ckpt = Checkpoint(s3)
    with ckpt.lock():
        ckpt.append("note", i=1)
        _foreign_lock(Remote(s3), seconds=30)  # taken over (a runner elsewhere)
        assert ckpt._lease.renew() is False
        with pytest.raises(LockedError, match="lost the lease"):
            ckpt.append("intent", shard=0)
    kinds = [json.loads(v)["event"] for k, v in _objects(server, s3).items() if "events/" in k]
    assert kinds == ["note"]
    assert json.loads(Remote(s3).read(lease_mod.KEY)[0])["owner"] == "elsewhere"  # type: ignore[index]


@pytest.mark.parametrize(
    ("checkpoint", "match"),
    [
        ("s3://llmbatch-test", "needs a bucket and a prefix"),
        ("s3://user:pw@llmbatch-test/jobs/x", "must not carry credentials"),
        ("s3://llmbatch-test/jobs/x?sas=abc", "must not carry credentials"),
        ("http://example.com/jobs/x", "not an object store"),
        ("s3://no-such-bucket-here/jobs/x", "cannot be written"),
    ],
)
def test_a_bad_store_url_is_refused_before_anything_is_sent(
    s3: str, checkpoint: str, match: str
) -> None:
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match=match) as err:
            _batch(_frame(5), checkpoint, emu.openai_url)
        assert not emu.ledger.batches and not emu.ledger.uploads
    assert "pw" not in str(err.value).replace("prefix", "") and SECRET not in str(err.value)


def test_without_the_extra_an_s3_checkpoint_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "obstore.store", None)  # as if not installed
    with pytest.raises(LlmBatchError, match=r"pip install 'polars_llmbatch\[s3\]'"):
        Job.open("s3://llmbatch-test/jobs/x")


def test_a_prefix_with_quotes_spaces_and_unicode_holds_a_job(
    s3: str, server: str, tmp_path: Path
) -> None:
    url = s3 + '/O\'Brien "q" tâches 日本'
    with serve(batch_seconds=0.05) as emu:
        out = _batch(_frame(10), url, emu.openai_url)
        assert len(emu.ledger.batches) == 1
    assert set(out["llm_status"]) == {"succeeded"}
    assert "job.json" in _objects(server, url)
    assert Job.open(url).status().done


def test_a_mirror_of_an_older_job_at_the_same_prefix_is_not_read_as_the_new_one(
    s3: str, server: str
) -> None:
    with serve(batch_seconds=0.05) as emu:
        old = _batch(_frame(10), s3, emu.openai_url)
        client = boto3.client("s3", endpoint_url=server, region_name="us-east-1")
        for key in _objects(server, s3):  # the prefix emptied by hand (the mirror kept)
            client.delete_object(Bucket=BUCKET, Key=s3.split(f"{BUCKET}/", 1)[1] + "/" + key)
        new = _batch(_frame(30), s3, emu.openai_url)  # a new job there
        assert len(emu.ledger.batches) == 1 + 2
    assert old.height == 10 and new.height == 30
    assert set(new["llm_status"]) == {"succeeded"}
    assert Job.open(s3).status().rows.get("succeeded") == 30


def test_a_reader_between_a_runners_upload_and_rename_of_job_json_empties_nothing(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status reader and a runner share a mirror. The reader's read of the store's job.json
    is answered as of before the runner's upload, while the runner renames job.json into the
    mirror meanwhile (the order it uses: store, then mirror). The mirror is the runner's: the
    reader must not take it for another job's and empty it."""
    reader = Checkpoint(s3)
    reader.path.mkdir(parents=True, exist_ok=True)
    in_progress = reader.path / "rows.parquet"  # what the runner writes next to it
    in_progress.write_bytes(b"the runner's")
    read = Remote.read

    def read_before_the_upload(self: Remote, key: str):  # type: ignore[no-untyped-def]
        got = read(self, key)
        if key == "job.json":
            reader.job_file.write_bytes(b'{"job":"new"}')  # the runner's rename, meanwhile
            return None  # answered as of before its upload
        return got

    monkeypatch.setattr(Remote, "read", read_before_the_upload)
    assert reader._fetch_job() is False
    assert in_progress.read_bytes() == b"the runner's"
    assert reader.job_file.read_bytes() == b'{"job":"new"}'


SYNC_CHILD = """
import os, signal, sys
import polars as pl
import polars_llmbatch
from polars_llmbatch.run import transport

url, ckpt, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
request = transport.Transport.request
sent = [0]
def dying_request(self, method, path, **kw):
    if method == "POST" and path.endswith("/chat/completions"):
        sent[0] += 1
        if sent[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # answers so far in the .part file
    return request(self, method, path, **kw)
transport.Transport.request = dying_request
df = pl.DataFrame({"body": [f"ticket {i}" for i in range(90)]})
out = df.llm.batch("Classify: {body}", provider="openai", model="gpt-4o-mini",
                   output=["billing", "bug", "feature", "other"], checkpoint=ckpt,
                   api_key="k", base_url=url, progress=False, mode="sync", concurrency=2)
out.select("llm_status").write_json(os.environ["OUT"])
"""


@pytest.mark.parametrize("mirror", ["kept", "fresh (another machine)"])
def test_kill_9_in_sync_mode_with_an_s3_checkpoint_loses_no_uploaded_answer(
    s3: str, tmp_path: Path, mirror: str
) -> None:
    script = tmp_path / "sync_child.py"
    script.write_text(SYNC_CHILD)
    out, first = tmp_path / "out.json", tmp_path / "cache-a"
    second = first if mirror == "kept" else tmp_path / "cache-b"

    def child(cache: Path, die_at: int) -> int:
        return _run(script, [emu.openai_url, s3, str(die_at)], out, cache)

    with serve(batch_seconds=0.05) as emu:
        assert child(first, 75) == -signal.SIGKILL
        answered = len(emu.ledger.billed)
        assert child(second, 0) == 0
        billed = len(emu.ledger.billed)  # a sync call is billed without a custom_id
    assert set(pl.read_json(out)["llm_status"]) == {"succeeded"}
    again = billed - 90
    if mirror == "kept":
        # every answer written was on this machine's disk; the other thread's request in
        # flight at the kill was billed, never answered (as with a local folder)
        assert again <= 1
    else:
        # the store had the answers up to the last upload (every 50): only those since (and
        # the one in flight) were sent again
        assert answered >= 73 and 0 < again <= answered - 50


def test_a_cancel_from_another_machine_stops_the_submission(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polars_llmbatch.providers.openai import OpenAI

    df = pl.DataFrame({"body": [f"ticket {i}" for i in range(32)]})
    creates: list[str] = []
    submit = OpenAI.submit

    def submit_and_cancel_at_the_third(self, t, spec, data, *, tag, kind):  # type: ignore[no-untyped-def]
        if len(creates) == 2:  # meanwhile, a cancel on another machine (a mirror of its own)
            with monkeypatch.context() as m:
                m.setenv("POLARS_LLMBATCH_CACHE", str(tmp_path / "elsewhere"))
                Job.open(s3, api_key="k", base_url=emu.openai_url).cancel(wait=False)
        remote_id = submit(self, t, spec, data, tag=tag, kind=kind)
        creates.append(remote_id)
        return remote_id

    monkeypatch.setattr(OpenAI, "submit", submit_and_cancel_at_the_third)
    with serve(batch_seconds=60) as emu:
        job = df.llm.batch(
            "Answer: {body}",
            provider="openai",
            model="gpt-4o-mini",
            checkpoint=s3,
            api_key="k",
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
            max_shard_requests=1,
            wait=False,
        )
        job.wait(timeout=5)
        # the third create was under way when the cancel came; none was made after it
        assert len(creates) == 3 and len(emu.ledger.batches) == 3
        assert emu.ledger.billed == []


def test_the_cli_runs_resumes_and_reads_a_job_in_s3(s3: str, tmp_path: Path) -> None:
    from test_cli_jobs import RUN, llmbatch

    from polars_llmbatch.sample import tickets

    tickets(200).write_parquet(tmp_path / "t.parquet")
    with serve(batch_seconds=0.5) as emu:
        env = {"OPENAI_API_KEY": "test", "OPENAI_BASE_URL": emu.openai_url}
        env["POLARS_LLMBATCH_CACHE"] = str(tmp_path / "machine-a")
        r = llmbatch(
            "run", "t.parquet", *RUN, "--checkpoint", s3, "--no-wait", cwd=tmp_path, env=env
        )
        assert r.returncode == 4 and f"llmbatch status {s3}" in r.stderr
        env["POLARS_LLMBATCH_CACHE"] = str(tmp_path / "machine-b")  # resumed elsewhere
        s = llmbatch(
            "status", s3, cwd=tmp_path, env={"POLARS_LLMBATCH_CACHE": env["POLARS_LLMBATCH_CACHE"]}
        )
        assert s.returncode == 4 and "running" in s.stdout and s3 in s.stdout
        r = llmbatch(
            "resume", s3, "--output", "out.parquet", "--quiet", "--poll-interval", "0.05",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert len(emu.ledger.batches) == 1
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.height == 200 and {"ticket_id", "label", "llm_status"} <= set(out.columns)


@pytest.mark.parametrize(
    ("checkpoint", "lease", "match"),
    [
        (Path("s3://llmbatch-test/jobs/x"), "30", "pass the URL as a string"),
        (None, "nan", "POLARS_LLMBATCH_LEASE_SECONDS='nan'"),
        (None, "1", "at least"),
    ],
)
def test_a_path_made_of_a_url_or_a_bad_lease_term_is_refused_before_sending(
    s3: str, checkpoint: Path | None, lease: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_LLMBATCH_LEASE_SECONDS", lease)
    with serve(batch_seconds=0.05) as emu:
        with pytest.raises(LlmBatchError, match=match):
            _batch(_frame(5), checkpoint or s3, emu.openai_url)
        assert not emu.ledger.batches and not emu.ledger.uploads
    assert not Path("s3:").exists()


def test_a_file_is_in_the_store_before_it_is_in_the_mirror(
    s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Otherwise a reader on this machine, between the two, would take the mirror's job.json
    # (absent from the store) for another job's and empty the mirror under the writer.
    ckpt = Checkpoint(s3)
    ckpt.check_writable()

    def unreachable(self: Remote, key: str, data: object) -> None:
        raise OSError("the store is unreachable")

    with monkeypatch.context() as m, pytest.raises(OSError, match="unreachable"):
        m.setattr(Remote, "write", unreachable)
        ckpt.commit({"job_id": "x"})
    assert not ckpt.job_file.exists()
    assert not Checkpoint(s3).exists()


def test_an_idle_runner_sees_a_cancel_from_another_machine_before_it_creates_again(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner that writes nothing (a batch in flight, the rest held by max_in_flight) learns
    of a cancel made on another machine from the store itself, before its next create: no
    event of its own would bring the cancel into its mirror."""
    with serve(batch_seconds=60) as emu:
        job = _frame(40).llm.batch(
            "Classify: {body}",
            provider="openai",
            model="gpt-4o-mini",
            checkpoint=s3,
            api_key=API_KEY,
            base_url=emu.openai_url,
            progress=False,
            poll_interval=0.02,
            max_shard_requests=10,
            max_in_flight=1,
            wait=False,
        )
        deadline = time.monotonic() + 30
        while not emu.ledger.batches and time.monotonic() < deadline:
            time.sleep(0.01)  # a poll until the first create, not a timing assumption
        job._stop_background(raise_error=False)  # this runner now writes nothing
        engine = job._engine()
        assert engine.canceled() is False
        with monkeypatch.context() as m:
            m.setenv("POLARS_LLMBATCH_CACHE", str(tmp_path / "elsewhere"))
            Job.open(s3, api_key=API_KEY, base_url=emu.openai_url).cancel(wait=False)
        assert engine.canceled() is True
        assert len(emu.ledger.batches) == 1
