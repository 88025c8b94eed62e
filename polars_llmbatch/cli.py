"""The ``llmbatch`` command: ``sample``, ``estimate`` and ``requests`` from the shell.

Exit codes: 0 done; 1 bad input (one line on stderr says what and how to fix it); 3 over budget
(``--max-cost``).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch.errors import BudgetExceededError, LlmBatchError

__all__ = ["main"]

EXIT_BAD_INPUT = 1
EXIT_OVER_BUDGET = 3

_EXAMPLES = """examples:
  llmbatch sample tickets.parquet
  llmbatch estimate tickets.parquet --prompt "Classify this ticket: {body}" \\
      --provider openai --model gpt-4o-mini --categories billing,bug,feature,other \\
      --max-output-tokens 20
  llmbatch requests tickets.parquet --prompt "Summarise: {body}" --provider anthropic \\
      --model claude-haiku-4-5 --max-output-tokens 200 --write-to shards/

exit codes: 0 done · 1 bad input (one line on stderr says what and how to fix it) · 3 over budget
"""


def read_input(path: str) -> pl.LazyFrame:
    """A Parquet, CSV or NDJSON file (or a glob of Parquet files) as a LazyFrame."""
    p = Path(path)
    if any(ch in path for ch in "*?["):
        if not glob.glob(path):
            raise LlmBatchError(f"no file matches {path!r}")
        return pl.scan_parquet(path)
    if not p.exists():
        raise LlmBatchError(f"input file {path!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return pl.scan_parquet(p)
    if suffix == ".csv":
        return pl.scan_csv(p)
    if suffix in (".ndjson", ".jsonl"):
        return pl.scan_ndjson(p)
    raise LlmBatchError(
        f"input {path!r}: use a .parquet, .csv, .ndjson/.jsonl file or a Parquet glob"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmbatch",
        description="One LLM request per row of a table, through the providers' batch APIs.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "sample",
        help="write a sample table of synthetic support tickets",
        epilog="example:\n  llmbatch sample tickets.parquet --rows 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("out", help="output file (.parquet, .csv or .ndjson)")
    s.add_argument("--rows", type=int, default=20_000, help="number of tickets (default 20000)")
    s.add_argument("--seed", type=int, default=0)

    e = sub.add_parser(
        "emulator",
        help="serve the OpenAI, Anthropic and Gemini batch APIs locally (127.0.0.1), for free",
        epilog=(
            "examples:\n  llmbatch emulator --port 8765\n"
            "  llmbatch emulator --speed 10 --faults request_errors=0.1,expire_at=0.8"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    e.add_argument(
        "--speed",
        "--batch-seconds",
        dest="speed",
        default="fast",
        help="how long a batch takes from create to done: 'fast' (1 s, the default), 'slow' "
        "(60 s) or a number of seconds",
    )
    e.add_argument("--faults", help="e.g. request_errors=0.1,missing=0.01,seed=3")

    for name, text in (
        ("estimate", "tokens and cost at batch and sync rates; nothing is sent"),
        ("requests", "build the request per row; --write-to DIR writes the shard files"),
    ):
        c = sub.add_parser(
            name, help=text, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        c.add_argument("input", help=".parquet, .csv, .ndjson file or a Parquet glob")
        c.add_argument("--prompt", required=True, help="template, e.g. 'Classify: {body}'")
        c.add_argument("--provider", required=True, help="openai, anthropic or gemini")
        c.add_argument("--model", required=True)
        c.add_argument("--system", help="system prompt (may reference columns)")
        c.add_argument("--id", help="unique key column (default: row position)")
        out = c.add_mutually_exclusive_group()
        out.add_argument("--output", help="output column name for free text (default 'label')")
        out.add_argument("--categories", help="comma-separated labels: a strict enum output")
        c.add_argument("--embed", action="store_true", help="embeddings instead of generation")
        c.add_argument("--dimensions", type=int)
        c.add_argument("--max-output-tokens", type=int)
        c.add_argument("--temperature", type=float)
        c.add_argument("--on-null", choices=["skip", "empty", "error"], default="skip")
        c.add_argument("--max-shard-requests", type=int)
        if name == "estimate":
            c.add_argument("--exact", action="store_true", help="count every request exactly")
            c.add_argument("--expected-output-tokens", type=float)
            c.add_argument("--max-cost", type=float, help="refuse if the worst case is over USD")
            c.add_argument("--json", action="store_true", help="print the estimate as JSON")
        else:
            c.add_argument("--write-to", help="folder for the shard files")
            c.add_argument("--out", help="write the request table here (.parquet)")
    return parser


def _common(args: argparse.Namespace) -> dict[str, Any]:
    output: Any = args.output
    if args.categories:
        output = [c.strip() for c in args.categories.split(",") if c.strip()]
    kw: dict[str, Any] = {
        "provider": args.provider,
        "model": args.model,
        "system": args.system,
        "id": args.id,
        "task": "embed" if args.embed else "generate",
        "on_null": args.on_null,
        "max_output_tokens": args.max_output_tokens,
        "temperature": args.temperature,
        "dimensions": args.dimensions,
        "max_shard_requests": args.max_shard_requests,
    }
    if not args.embed:
        kw["output"] = output
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    import polars_llmbatch  # noqa: F401  (registers .llm)

    args = _parser().parse_args(argv)
    try:
        if args.command == "sample":
            from polars_llmbatch.sample import tickets

            df = tickets(args.rows, seed=args.seed)
            out = Path(args.out)
            if out.suffix == ".csv":
                df.write_csv(out)
            elif out.suffix in (".ndjson", ".jsonl"):
                df.write_ndjson(out)
            else:
                df.write_parquet(out)
            print(f"wrote {df.height:,} tickets to {out}")
            return 0
        if args.command == "emulator":
            return _emulator(args)
        frame = read_input(args.input)
        if args.command == "estimate":
            est = frame.llm.estimate(
                args.prompt,
                exact=args.exact,
                expected_output_tokens=args.expected_output_tokens,
                max_cost=args.max_cost,
                **_common(args),
            )
            print(json.dumps(est.to_dict(), indent=2, default=str) if args.json else repr(est))
            return 0
        reqs = frame.llm.requests(args.prompt, write_to=args.write_to, **_common(args))
        if args.out:
            reqs.write_parquet(args.out)
        n = reqs["custom_id"].n_unique() - (1 if reqs["custom_id"].null_count() else 0)
        where = f"; shard files in {args.write_to}" if args.write_to else ""
        print(f"{reqs.height:,} rows → {n:,} unique requests{where}")
        return 0
    except BudgetExceededError as exc:
        print(f"llmbatch: over budget: {exc}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (LlmBatchError, pl.exceptions.PolarsError, OSError) as exc:
        print(f"llmbatch: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _emulator(args: argparse.Namespace) -> int:
    import time

    from polars_llmbatch.emulator import Emulator, Faults

    try:
        faults = Faults.parse(args.faults)
    except (ValueError, TypeError) as exc:
        raise LlmBatchError(f"--faults: {exc}") from exc
    try:
        seconds = {"fast": 1.0, "slow": 60.0}.get(args.speed) or float(args.speed)
    except ValueError:
        raise LlmBatchError(
            f"--speed must be 'fast', 'slow' or seconds, not {args.speed!r}"
        ) from None
    emu = Emulator(port=args.port, batch_seconds=seconds, faults=faults).start()
    print(f"emulator on {emu.url} (127.0.0.1 only); point the SDKs here with:")
    for name, value in emu.env().items():
        print(f"  export {name}={value}")
    print("any non-empty API key is accepted; the ledger is at " + emu.url + "/_emulator/ledger")
    print("Ctrl-C to stop", flush=True)
    try:
        while True:  # time.sleep, unlike a lock wait, is interrupted by Ctrl-C
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
