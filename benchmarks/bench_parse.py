"""Benchmark: ways to read 1M OpenAI batch output lines into columns (groundwork for the engine).

Writes ``--rows`` synthetic chat-completion output lines (the shape the emulator and OpenAI
write: ~610 bytes a line), then times four readers of the fields the engine needs (custom_id,
status code, the message content, the two token counts):

0. the library's own ``providers.openai.parse_results`` (DuckDB, statuses, dedup);
1. DuckDB ``read_json`` with an explicit column spec (``ignore_errors`` for malformed lines);
2. polars: the file as one string column, then ``str.json_decode`` to a narrow struct;
3. polars ``str.json_path_match``, one call per field;
4. an orjson loop into tuples (the baseline the issue names, ~5 s).

Run it by hand::

    python benchmarks/bench_parse.py --rows 1000000
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl

from polars_llmbatch.providers.openai import parse_results

COLUMNS = (
    "{custom_id: 'VARCHAR', response: 'STRUCT(status_code INTEGER, body STRUCT(choices "
    "STRUCT(message STRUCT(content VARCHAR), finish_reason VARCHAR)[], usage STRUCT("
    "prompt_tokens INTEGER, completion_tokens INTEGER)))', error: 'STRUCT(code VARCHAR, "
    "message VARCHAR)'}"
)
STRUCT = pl.Struct(
    {
        "custom_id": pl.String,
        "response": pl.Struct(
            {
                "status_code": pl.Int64,
                "body": pl.Struct(
                    {
                        "choices": pl.List(
                            pl.Struct(
                                {
                                    "message": pl.Struct({"content": pl.String}),
                                    "finish_reason": pl.String,
                                }
                            )
                        ),
                        "usage": pl.Struct(
                            {"prompt_tokens": pl.Int64, "completion_tokens": pl.Int64}
                        ),
                    }
                ),
            }
        ),
        "error": pl.Struct({"code": pl.String, "message": pl.String}),
    }
)


def write_lines(path: Path, n: int) -> None:
    rnd = random.Random(0)
    labels = ["billing", "bug", "feature", "other"]
    with open(path, "wb") as fh:
        for i in range(n):
            content = orjson.dumps({"label": labels[rnd.randrange(4)]}).decode()
            body = {
                "id": f"chatcmpl-{i}",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 100 + i % 50,
                    "completion_tokens": 6,
                    "total_tokens": 106 + i % 50,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
                "service_tier": "default",
                "system_fingerprint": "fp",
            }
            record = {
                "id": f"batch_req_{i:024x}",
                "custom_id": f"{i:032x}",
                "response": {"status_code": 200, "request_id": f"req_{i:x}", "body": body},
                "error": None,
            }
            fh.write(orjson.dumps(record) + b"\n")


def duckdb_reader(path: Path) -> pl.DataFrame:
    sql = (
        "SELECT custom_id, response.status_code AS status, "
        "response.body.choices[1].message.content AS text, "
        "response.body.usage.prompt_tokens AS input_tokens, "
        "response.body.usage.completion_tokens AS output_tokens "
        f"FROM read_json('{path}', format='newline_delimited', ignore_errors=true, "
        f"columns={COLUMNS})"
    )
    with duckdb.connect() as con:
        return con.sql(sql).pl()


def polars_decode(path: Path) -> pl.DataFrame:
    lines = pl.read_csv(
        path, has_header=False, separator="\x01", quote_char=None, schema={"line": pl.String}
    )
    # Decode once, then take the fields: in one select the decode would run once per field.
    decoded = lines.select(pl.col("line").str.json_decode(STRUCT).alias("r"))
    rec = pl.col("r")
    body = rec.struct.field("response").struct.field("body")
    return decoded.select(
        rec.struct.field("custom_id"),
        rec.struct.field("response").struct.field("status_code").alias("status"),
        body.struct.field("choices")
        .list.first()
        .struct.field("message")
        .struct.field("content")
        .alias("text"),
        body.struct.field("usage").struct.field("prompt_tokens").alias("input_tokens"),
        body.struct.field("usage").struct.field("completion_tokens").alias("output_tokens"),
    )


def polars_paths(path: Path) -> pl.DataFrame:
    lines = pl.read_csv(
        path, has_header=False, separator="\x01", quote_char=None, schema={"line": pl.String}
    )
    c = pl.col("line").str
    return lines.select(
        c.json_path_match("$.custom_id").alias("custom_id"),
        c.json_path_match("$.response.status_code").alias("status"),
        c.json_path_match("$.response.body.choices[0].message.content").alias("text"),
        c.json_path_match("$.response.body.usage.prompt_tokens").alias("input_tokens"),
        c.json_path_match("$.response.body.usage.completion_tokens").alias("output_tokens"),
    )


def orjson_loop(path: Path) -> list[tuple[Any, ...]]:
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            o = orjson.loads(line)
            r = o["response"]
            b = r["body"]
            u = b["usage"]
            out.append(
                (
                    o["custom_id"],
                    r["status_code"],
                    b["choices"][0]["message"]["content"],
                    u["prompt_tokens"],
                    u["completion_tokens"],
                )
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    readers: dict[str, Callable[[Path], Any]] = {
        "openai.parse_results (ours)": lambda path: parse_results([str(path)]),
        "duckdb read_json (columns)": duckdb_reader,
        "polars json_decode (struct)": polars_decode,
        "polars json_path_match x5": polars_paths,
        "orjson loop (baseline)": orjson_loop,
    }
    with tempfile.TemporaryDirectory(prefix="bench_parse_", dir=".") as tmp:
        path = Path(tmp) / "output.jsonl"
        write_lines(path, args.rows)
        print(f"{args.rows:,} lines, {path.stat().st_size / 1e6:,.0f} MB")
        base = None
        for name, fn in readers.items():
            times = []
            for _ in range(args.repeat if "path_match" not in name else 1):
                t = time.perf_counter()
                result = fn(path)
                times.append(time.perf_counter() - t)
            n = len(result)
            assert n == args.rows, (name, n)
            median = statistics.median(times)
            base = median if "orjson" in name else base
            print(f"  {name:<30} {median:6.2f} s  ({args.rows / median:,.0f} lines/s)")
        print(f"baseline: orjson loop {base:.2f} s")


if __name__ == "__main__":
    main()
