"""Benchmark: the emulator's OpenAI Batch API in fast mode, from upload to downloaded results.

The emulator runs in its own process (``llmbatch emulator --speed 1``), as a user would run
it, and this script drives it over HTTP with httpx:

1. one 50,000-request batch (the OpenAI cap): upload, create, poll every 50 ms until completed,
   download the output file; the time from create to completed, and each step;
2. 1,000,000 requests over 20 batches of 50,000: all uploaded and created, then polled until
   every batch is completed and its output downloaded; the wall time and the request rate.

Requests come from ``polars_llmbatch.sample.tickets`` through the library's own ``prepare`` /
``plan`` / ``shard_bytes`` (OpenAI ``gpt-4o-mini``, 4-category enum output). Run it by hand::

    python benchmarks/bench_emulator.py              # both parts
    python benchmarks/bench_emulator.py --rows 200000 --batches 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import httpx

from polars_llmbatch.plan.requests import prepare
from polars_llmbatch.plan.shards import plan, shard_bytes
from polars_llmbatch.sample import CATEGORIES, tickets

HEADERS = {"Authorization": "Bearer bench"}
TERMINAL = ("completed", "failed", "expired", "cancelled")


def start_emulator(batch_seconds: float) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-m",
        "polars_llmbatch.cli",
        "emulator",
        "--speed",
        str(batch_seconds),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "OPENAI_BASE_URL=" in line:
            return proc, line.strip().split("=", 1)[1]
    raise RuntimeError("the emulator did not start")


def shards(rows: int) -> list[bytes]:
    frame = tickets(rows)
    prepared = prepare(
        frame,
        "Classify this ticket: {body}",
        provider="openai",
        model="gpt-4o-mini",
        output=CATEGORIES,
        options={"max_output_tokens": 20},
    )
    return [shard_bytes(prepared, s) for s in plan(prepared)]


def submit(client: httpx.Client, base: str, data: bytes) -> str:
    f = client.post(
        f"{base}/files", files={"file": ("shard.jsonl", data)}, data={"purpose": "batch"}
    )
    f.raise_for_status()
    body = {
        "input_file_id": f.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    b = client.post(f"{base}/batches", json=body)
    b.raise_for_status()
    return b.json()["id"]


def poll(client: httpx.Client, base: str, batch_ids: list[str]) -> dict[str, dict]:
    done: dict[str, dict] = {}
    while len(done) < len(batch_ids):
        for bid in batch_ids:
            if bid in done:
                continue
            b = client.get(f"{base}/batches/{bid}").json()
            if b["status"] in TERMINAL:
                done[bid] = b
        time.sleep(0.05)
    return done


def download(client: httpx.Client, base: str, file_id: str) -> bytes:
    r = client.get(f"{base}/files/{file_id}/content")
    r.raise_for_status()
    return r.content


def one_batch(client: httpx.Client, base: str, data: bytes) -> None:
    n = data.count(b"\n")
    t0 = time.perf_counter()
    f = client.post(
        f"{base}/files", files={"file": ("shard.jsonl", data)}, data={"purpose": "batch"}
    )
    t_upload = time.perf_counter() - t0
    body = {
        "input_file_id": f.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    t1 = time.perf_counter()
    bid = client.post(f"{base}/batches", json=body).json()["id"]
    t_create = time.perf_counter() - t1
    batch = poll(client, base, [bid])[bid]
    t_done = time.perf_counter() - t1
    t2 = time.perf_counter()
    out = download(client, base, batch["output_file_id"])
    t_download = time.perf_counter() - t2
    lines = out.count(b"\n")
    assert batch["status"] == "completed" and lines == n, (batch["status"], lines, n)
    print(
        f"one batch of {n:,} requests ({len(data) / 1e6:.1f} MB in, {len(out) / 1e6:.1f} MB out):"
    )
    print(
        f"  upload {t_upload:.2f} s · create {t_create:.3f} s · create → completed {t_done:.2f} s"
        f" · download {t_download:.2f} s · total {time.perf_counter() - t0:.2f} s"
    )


def many_batches(client: httpx.Client, base: str, datas: list[bytes]) -> None:
    n = sum(d.count(b"\n") for d in datas)
    t0 = time.perf_counter()
    ids = [submit(client, base, d) for d in datas]
    t_submit = time.perf_counter() - t0
    done = poll(client, base, ids)
    t_done = time.perf_counter() - t0
    got = sum(download(client, base, b["output_file_id"]).count(b"\n") for b in done.values())
    total = time.perf_counter() - t0
    assert got == n and all(b["status"] == "completed" for b in done.values())
    print(f"{n:,} requests over {len(datas)} batches:")
    print(
        f"  upload + create all {t_submit:.1f} s · all completed at {t_done:.1f} s · all downloaded"
        f" at {total:.1f} s · {n / total:,.0f} requests/s end to end"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--rows", type=int, default=1_250_000, help="ticket rows (≈1M unique requests)"
    )
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    datas = shards(args.rows)[: args.batches]
    print(f"prepared {len(datas)} shard(s) in {time.perf_counter() - t:.1f} s (not timed below)")
    proc, base = start_emulator(args.batch_seconds)
    try:
        with httpx.Client(headers=HEADERS, timeout=600) as client:
            one_batch(client, base, datas[0])
            many_batches(client, base, datas)
            ledger = client.get(base.replace("/openai/v1", "/_emulator/ledger")).json()
            twice = len(ledger["billed"]) - len({b["custom_id"] for b in ledger["billed"]})
            print(
                f"ledger: {len(ledger['billed']):,} requests billed ({twice:,} ids billed again: the"
                " first batch's shard is submitted twice on purpose)"
            )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
