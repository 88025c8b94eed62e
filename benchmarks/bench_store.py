"""Object-store checkpoints: which layer for the small objects, and what a job pays for them.

Against moto's S3 server on 127.0.0.1 (started here; a real store's latency is higher and
its throughput different, so the ratios, not the milliseconds, carry over):

1. an event: a create-only put (``If-None-Match: *``) and a get of a 300-byte object,
   obstore against boto3 (the floor: the same request with the AWS SDK), medians of N;
2. a shard: a 64 MB file uploaded by obstore (streamed, multipart) against boto3's
   ``upload_file`` and polars' own cloud writer (``write_parquet("s3://...")``);
3. a job: the same 2,000-row job with a local-folder checkpoint and an S3 one, through the
   emulator (the wall time of the whole call).

Run: ``python benchmarks/bench_store.py`` (needs the dev extras: obstore, moto[server]).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

N = int(os.environ.get("N", "300"))


def main() -> None:
    import logging

    import boto3
    import obstore
    import polars as pl
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
        AWS_ALLOW_HTTP="true",
    )
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="bench")
    from obstore.store import from_url

    store = from_url("s3://bench/o")
    event = b'{"at":"2026-12-04T20:00:00.000+00:00","event":"submitted","shard":1}' * 4

    def timed(fn, n: int = N) -> float:
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    run = uuid.uuid4().hex[:6]
    ob_put = timed(lambda i: obstore.put(store, f"{run}/e{i}", event, mode="create"))
    bo_put = timed(
        lambda i: client.put_object(
            Bucket="bench", Key=f"b/{run}/e{i}", Body=event, IfNoneMatch="*"
        )
    )
    ob_get = timed(lambda i: bytes(obstore.get(store, f"{run}/e{i}").bytes()))
    bo_get = timed(lambda i: client.get_object(Bucket="bench", Key=f"b/{run}/e{i}")["Body"].read())
    print(f"event ({len(event)} B), median of {N}:")
    print(
        f"  create-only put  obstore {ob_put:6.2f} ms   boto3 {bo_put:6.2f} ms  ({bo_put / ob_put:.2f}x)"
    )
    print(
        f"  get              obstore {ob_get:6.2f} ms   boto3 {bo_get:6.2f} ms  ({bo_get / ob_get:.2f}x)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "shard.parquet"
        frame = pl.DataFrame({"body": [os.urandom(48).hex() for _ in range(600_000)]})
        frame.write_parquet(big, compression="uncompressed")
        size = big.stat().st_size / 1e6

        def ob_file(i: int) -> None:
            with big.open("rb") as f:
                obstore.put(store, f"{run}/big{i}", f)

        ob = timed(ob_file, 3)
        bo = timed(lambda i: client.upload_file(str(big), "bench", f"b/{run}/big{i}"), 3)
        pw = timed(
            lambda i: frame.write_parquet(
                f"s3://bench/p/{run}/big{i}.parquet", compression="uncompressed"
            ),
            3,
        )
        print(f"shard file ({size:.0f} MB), median of 3:")
        print(
            f"  obstore {ob:7.0f} ms   boto3 upload_file {bo:7.0f} ms   polars write_parquet {pw:7.0f} ms"
        )

        from polars_llmbatch.emulator import serve

        os.environ["POLARS_LLMBATCH_CACHE"] = str(Path(tmp) / "cache")
        df = pl.DataFrame({"body": [f"ticket {i}" for i in range(2000)]})

        def job(checkpoint: str) -> float:
            t = time.perf_counter()
            df.llm.batch(
                "Classify: {body}",
                provider="openai",
                model="gpt-4o-mini",
                output=["billing", "bug", "feature", "other"],
                checkpoint=checkpoint,
                api_key="test",
                base_url=emu.openai_url,
                progress=False,
                poll_interval=0.02,
                max_shard_requests=100,
            )
            return time.perf_counter() - t

        with serve(batch_seconds=0.0) as emu:
            local = [
                job(str(Path(tmp) / f"local{i}" / "job")) for i in range(3)
            ]  # no siblings: no cache
            client.create_bucket(Bucket="jobs")  # its own bucket: moto lists by scanning one
            remote = [job(f"s3://jobs/{run}-{i}/job") for i in range(3)]
        lm, rm = statistics.median(local), statistics.median(remote)
        print("job (2,000 rows, 20 shards), median of 3:")
        print(f"  local folder {lm:5.2f} s   s3 {rm:5.2f} s  ({rm / lm:.2f}x)")
    srv.stop()


if __name__ == "__main__":
    main()
