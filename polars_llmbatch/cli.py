"""The ``llmbatch`` command: every step of a batch job from the shell (cron, CI, a terminal).

Commands: ``demo``, ``sample``, ``estimate``, ``requests``, ``run``, ``status``, ``resume``,
``retry``, ``cancel``, ``results``, ``spend``, ``emulator``.

Exit codes: 0 done; 1 an error (one line on stderr says what and how to fix it); 3 over budget
(``--max-cost``); 4 submitted and still running (``--no-wait``, ``--timeout``, or ``status`` of a
running job); 130 interrupted (Ctrl-C: the batches keep running, ``resume`` picks them up).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch import options
from polars_llmbatch.errors import BudgetExceededError, LlmBatchError
from polars_llmbatch.run.job import INTERFACE, RETRY_STATUSES

__all__ = ["main"]

EXIT_BAD_INPUT = 1
EXIT_OVER_BUDGET = 3
EXIT_RUNNING = 4
EXIT_INTERRUPTED = 130

_EXAMPLES = """examples:
  llmbatch demo
  llmbatch sample tickets.parquet
  llmbatch estimate tickets.parquet --prompt "Classify this ticket: {body}" \\
      --provider openai --model gpt-4o-mini --categories billing,bug,feature,other \\
      --max-output-tokens 20
  llmbatch requests tickets.parquet --prompt "Summarise: {body}" --provider anthropic \\
      --model claude-haiku-4-5 --max-output-tokens 200 --write-to shards/
  llmbatch run tickets.parquet --prompt "Classify this ticket: {body}" --provider openai \
      --model gpt-4o-mini --categories billing,bug,feature,other --max-output-tokens 20 \
      --output labelled.parquet --checkpoint runs/tickets --tag team=support --max-cost 5
  llmbatch status runs/tickets
  llmbatch resume runs/tickets --output labelled.parquet
  llmbatch results runs/tickets --output labels.csv
  llmbatch spend runs --by tag:team

exit codes: 0 done · 1 error (one line on stderr says what and how to fix it) · 3 over budget ·
4 submitted, still running · 130 interrupted (the batches keep running: resume later)
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
        ("run", "run a job: estimate, submit, wait, write the results (--output)"),
    ):
        c = sub.add_parser(
            name, help=text, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        c.add_argument("input", help=".parquet, .csv, .ndjson file or a Parquet glob")
        c.add_argument("--prompt", required=True, help="template, e.g. 'Classify: {body}'")
        out = c.add_mutually_exclusive_group()
        out.add_argument(
            "--column", help="output column name for free text (default 'label'), or --embed's"
        )
        out.add_argument(
            "--categories", type=options.parse_categories, help="comma-separated labels: an enum"
        )
        c.add_argument("--embed", action="store_true", help="embeddings instead of generation")
        # every option of the verb, from the options table (run: batch's and embed's)
        verbs = {"estimate": ["estimate"], "requests": ["requests"], "run": ["batch", "embed"]}
        seen: set[str] = set()
        for verb in verbs[name]:
            options.add_flags(c, verb, skip=seen | {"wait", "progress", "poll_interval"})
            seen |= {o.name for o in options.for_verb(verb)}
        if name == "estimate":
            c.add_argument("--json", action="store_true", help="print the estimate as JSON")
        elif name == "run":
            c.add_argument(
                "--output",
                help="write the input rows with the results here (.parquet/.csv/.ndjson)",
            )
            _waiting(c)
        else:
            c.add_argument("--out", help="write the request table here (.parquet)")
    for name, text, example in (
        ("status", "where a job stands (exit 4 while it runs)", "llmbatch status runs/tickets"),
        (
            "resume",
            "pick a job up again (after Ctrl-C, a crash or --no-wait) and wait for it",
            "llmbatch resume runs/tickets --output labelled.parquet",
        ),
        (
            "retry",
            "send again the rows that ended expired, missing or with a transient error",
            "llmbatch retry runs/tickets --status expired --output labelled.parquet",
        ),
        (
            "cancel",
            "cancel a job's batches; what already ran is kept",
            "llmbatch cancel runs/tickets",
        ),
        (
            "results",
            "write a job's results (row key + outputs) to a file",
            "llmbatch results runs/tickets --output labels.parquet",
        ),
    ):
        c = sub.add_parser(
            name,
            help=text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.add_argument("checkpoint", help="the job's folder")
        if name in ("resume", "retry", "results"):
            c.add_argument(
                "--output",
                required=name == "results",
                help="file to write (.parquet, .csv or .ndjson)",
            )
        if name in ("resume", "retry"):
            _waiting(c)
        if name == "retry":
            c.add_argument(
                "--status",
                action="append",
                choices=RETRY_STATUSES,
                help="which rows to send again (repeatable; default: all three)",
            )
        if name == "cancel":
            c.add_argument("--quiet", action="store_true", help=_QUIET)
        if name == "results":
            c.add_argument("--usage", action="store_true", help="add token and cost columns")
    c = sub.add_parser(
        "spend",
        help="spend by job, provider, model, mode, day or tag, from the checkpoints",
        epilog="examples:\n  llmbatch spend runs\n  llmbatch spend runs --by tag:team\n"
        "  OPENAI_ADMIN_KEY=sk-admin-... llmbatch spend runs --reconcile openai "
        "--start 2026-11-01",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("root", nargs="?", help="folder holding checkpoint folders (default: cache)")
    c.add_argument(
        "--by",
        help="job (default), provider, model, mode, day or tag:NAME; with --reconcile, spend "
        "as billed by that group instead of the bill itself",
    )
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    c.add_argument(
        "--reconcile",
        metavar="PROVIDER",
        help="compare with the provider's bill (its usage and cost reports; needs an admin "
        "key in OPENAI_ADMIN_KEY or ANTHROPIC_ADMIN_KEY): day x model x tier",
    )
    c.add_argument("--start", help="--reconcile: first day, e.g. 2026-11-01 (required)")
    c.add_argument("--end", help="--reconcile: the day after the last (default: tomorrow)")
    c.add_argument("--base-url", help="--reconcile: another endpoint (a proxy, the emulator)")
    d = sub.add_parser(
        "demo",
        help="the whole product on a local emulator in under a minute: no key, no cost",
        epilog="example:\n  llmbatch demo --rows 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--rows", type=int, default=20_000)
    d.add_argument("--dir", help="where to keep the demo's files (default: a temporary folder)")
    for command in sub.choices.values():  # every command takes --quiet
        if not any("--quiet" in a.option_strings for a in command._actions):
            command.add_argument("--quiet", action="store_true", help=_QUIET)
    return parser


_QUIET = "no progress bar or progress notes on stderr; the output and errors stay"


def _say(args: argparse.Namespace, message: str) -> None:
    """A progress note on stderr (where a job lives, what status could not ask), unless
    ``--quiet``; stdout, the command's output, is the same either way."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _waiting(c: argparse.ArgumentParser) -> None:
    """The waiting flags ``run`` and ``resume`` share (``wait``, ``progress`` and
    ``poll_interval`` of the options table, taken by this process rather than passed on)."""
    c.add_argument("--no-wait", action="store_true", help="submit and exit (code 4); resume later")
    c.add_argument("--timeout", type=float, help="stop waiting after SECONDS (exit 4)")
    c.add_argument(
        "--poll-interval",
        type=float,
        default=options.BY_NAME["poll_interval"].default,
        help=options.BY_NAME["poll_interval"].help,
    )
    c.add_argument("--quiet", action="store_true", help=_QUIET)


def _common(args: argparse.Namespace, verb: str) -> dict[str, Any]:
    """``verb``'s keyword arguments from the flags: the table's options, and the output."""
    kw = options.from_flags(args, verb)
    if args.embed:
        if args.categories:
            raise LlmBatchError("--categories does not apply to --embed")
        if verb == "embed" and args.column:
            kw["name"] = args.column
        elif verb != "embed":
            kw["task"] = "embed"
    else:
        kw["output"] = args.categories or args.column
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    import polars_llmbatch  # noqa: F401  (registers .llm)

    args = _parser().parse_args(argv)
    # hints (Ctrl-C, errors) name llmbatch commands, not Python
    said_as = INTERFACE.set("cli")
    try:
        return _main(args)
    finally:
        INTERFACE.reset(said_as)


def _main(args: argparse.Namespace) -> int:
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
        if args.command == "demo":
            from polars_llmbatch.demo import run_demo

            run_demo(args.rows, args.dir)
            return 0
        if args.command in ("status", "resume", "retry", "cancel", "results"):
            return _job_command(args)
        if args.command == "spend":
            return _spend(args)
        frame = read_input(args.input)
        if args.command == "run":
            return _run(frame, args)
        if args.command == "estimate":
            est = frame.llm.estimate(args.prompt, **_common(args, "estimate"))
            print(json.dumps(est.to_dict(), indent=2, default=str) if args.json else repr(est))
            return 0
        where = f"; shard files in {args.write_to}" if args.write_to else ""
        if not args.out:  # nothing to write but the shard files: no frame of every body
            from polars_llmbatch.namespace import request_files

            with request_files(frame, args.prompt, **_common(args, "requests")) as source:
                print(f"{source.n_rows:,} rows → {source.n_requests:,} unique requests{where}")
            return 0
        reqs = frame.llm.requests(args.prompt, **_common(args, "requests"))
        reqs.write_parquet(args.out)
        n = reqs["custom_id"].n_unique() - (1 if reqs["custom_id"].null_count() else 0)
        print(f"{reqs.height:,} rows → {n:,} unique requests{where}")
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # Job.wait has said how to resume or cancel
    except BudgetExceededError as exc:
        print(f"llmbatch: over budget: {exc}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except (LlmBatchError, pl.exceptions.PolarsError, OSError) as exc:
        print(f"llmbatch: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # anything else is our bug: still one line, never a traceback
        print(
            f"llmbatch: unexpected {type(exc).__name__}: {_one_line(exc)} (the checkpoint is "
            "intact; please report this with the command you ran)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(frame: pl.LazyFrame, args: argparse.Namespace) -> int:
    if args.output:
        _check_output(args.output)
    verb = "embed" if args.embed else "batch"
    # given: any value but the flag's absence (0 and 0.0 are given: `--temperature 0`)
    given = {k for k, v in vars(args).items() if v is not None and v is not False and v != []}
    taken = {o.name for o in options.for_verb(verb)} | {"wait", "progress", "poll_interval"}
    other = {o.name for o in options.OPTIONS if o.cli} - taken
    stray = sorted(given & other)
    if stray:
        flags = ", ".join(options.BY_NAME[n].cli or n for n in stray)
        raise LlmBatchError(
            f"{flags} {'does' if len(stray) == 1 else 'do'} not apply to "
            f"{'--embed' if args.embed else 'generation (drop them, or add --embed)'}"
        )
    kw = _common(args, verb)
    kw.update(progress=not args.quiet, poll_interval=args.poll_interval, wait=False)
    method = frame.llm.embed if args.embed else frame.llm.batch
    job = method(args.prompt, **kw)
    try:
        _remember(job, args.input, args.output)
        _say(args, f"job {job.id}: checkpoint {job._ckpt.location}")
        if not args.no_wait:
            job.wait(timeout=args.timeout)
        job._stop_background()  # this process exits: the job waits in its checkpoint
        if not job.status(refresh=False).done:
            return _still_running(job, submitted_only=args.no_wait)
        out = job.result()  # a LazyFrame for a file's rows: sunk, never collected whole
        _report(job, out, args.output)
        return 0
    except KeyboardInterrupt:  # between submitting and waiting: say it all the same
        job._say_interrupted()
        raise
    finally:
        job.close()


def _still_running(job: Any, *, submitted_only: bool = False) -> int:
    """Say what is true of a job this process leaves unfinished, and what to run next."""
    st = job.status(refresh=False)
    if st.state == "retries due":
        what = f"{st.retries_due:,} request(s) are due to be sent again"
    elif job.mode == "sync":
        what = "sync mode sends from this process, which stops here; the rest is not sent yet"
    elif submitted_only:
        what = "submitted; the batches run at the provider"
    else:
        what = f"still {st.state}"
    print(
        f"{what}. Follow it with: llmbatch status {job._ckpt.location}; go on with: "
        f"llmbatch resume {job._ckpt.location}",
        file=sys.stderr,
    )
    return EXIT_RUNNING


def _job_command(args: argparse.Namespace) -> int:
    from polars_llmbatch.run.job import Job

    if getattr(args, "output", None):
        _check_output(args.output)
    quiet = getattr(args, "quiet", False)
    job = Job.open(
        args.checkpoint, progress=not quiet, poll_interval=getattr(args, "poll_interval", 5.0)
    )
    with job:
        return _on_job(job, args)


def _on_job(job: Any, args: argparse.Namespace) -> int:
    if args.command == "status":
        st = job.status()  # asks the live batches once (read-only) and records it
        print(repr(job))
        if job._t is None:
            _say(
                args, "(from the checkpoint alone: set the provider's API key to ask the provider)"
            )
        return 0 if st.done else _still_running(job)
    if args.command == "cancel":
        job.cancel(timeout=120)
        print(repr(job))
        return 0 if job.status(refresh=False).done else _still_running(job)
    if args.command in ("resume", "retry"):
        given = _remembered(job)
        if args.command == "retry":
            job.retry(args.status or RETRY_STATUSES, wait=False)
        job.wait(timeout=0 if args.no_wait else args.timeout)
        job._stop_background()  # this process exits: the job waits in its checkpoint
        if not job.status(refresh=False).done:
            return _still_running(job, submitted_only=args.no_wait)
        out = _with_input_rows(job, job.result(), given)
        _report(job, out, args.output or given.get("output"))
        return 0
    out = job.result(usage=args.usage)  # results
    _write(out, args.output)
    rows = sum(job.status(refresh=False).rows.values())
    print(f"wrote {rows:,} rows to {args.output}")
    return 0


_CLI_FILE = "cli.json"  # what `llmbatch run` was given: `resume` writes the same file


def _remember(job: Any, input_path: str, output: str | None) -> None:
    """Keep the input and output files of ``run`` in the checkpoint (absolute paths, and the
    input's size and time, to know it is the same file later)."""
    source = Path(input_path)
    stat = source.stat() if source.is_file() else None
    record = {
        "input": str(source.resolve()) if stat else None,
        "input_size": stat.st_size if stat else None,
        "input_mtime_ns": stat.st_mtime_ns if stat else None,
        "output": str(Path(output).resolve()) if output else None,
    }
    job._ckpt.write_bytes(job.path / _CLI_FILE, json.dumps(record).encode())


def _remembered(job: Any) -> dict[str, Any]:
    path = job.path / _CLI_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _with_input_rows(
    job: Any, out: pl.DataFrame | pl.LazyFrame, given: dict[str, Any]
) -> pl.DataFrame | pl.LazyFrame:
    """The input rows with their results, as ``run`` writes them, when the input file ``run``
    read is still there unchanged; else the row key with the results (as ``results``)."""
    source = Path(given["input"]) if given.get("input") else None
    if source is None or not source.is_file():
        return out
    stat = source.stat()
    if (stat.st_size, stat.st_mtime_ns) != (given["input_size"], given["input_mtime_ns"]):
        print(
            f"llmbatch: {str(source)!r} changed since run; writing the row key with the "
            "results instead of the input rows",
            file=sys.stderr,
        )
        return out
    key = job._job["key"]
    rows = read_input(str(source))
    positional = key not in rows.collect_schema().names()
    if isinstance(out, pl.LazyFrame):
        # A huge job's result, joined on disk in the checkpoint's row order, which is the
        # unchanged file's own: side by side, never through a join's hash table of every row.
        return pl.concat([rows, out.drop(key)], how="horizontal")
    if positional:  # the row's position in a file: files keep their order
        rows = rows.with_row_index(key)
    # lazy: the input rows stream through to the output file, never collected whole
    joined = rows.join(out.lazy(), on=key, how="left", maintain_order="left")
    return joined.drop(key) if positional else joined


def _report(job: Any, out: pl.DataFrame | pl.LazyFrame, path: str | None) -> None:
    if path:
        _write(out, path)
    st = job.status(refresh=False)
    rows = ", ".join(f"{k} {v:,}" for k, v in st.rows.items() if v)
    where = f"; wrote {sum(st.rows.values()):,} rows to {path}" if path else ""
    print(f"done: {rows}; spent ${st.spent:,.4f}{where}")


def _check_output(path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv", ".ndjson", ".jsonl"):
        raise LlmBatchError(f"--output {path!r}: use a .parquet, .csv or .ndjson file")
    parent = Path(path).parent
    if not parent.is_dir():
        raise LlmBatchError(f"--output {path!r}: folder {str(parent)!r} does not exist")


def _write(frame: pl.DataFrame | pl.LazyFrame, path: str) -> None:
    """Write ``frame`` by the file's suffix; CSV gets nested columns (embeddings, lists,
    structs) as JSON text, since CSV has no nested type. A LazyFrame (a job over a file's
    rows) is sunk by the streaming engine, never collected whole; either is written to a
    temporary name first, so a crash never leaves a partial file under ``path``."""
    tmp = f"{path}.tmp"
    _write_as(frame, tmp, Path(path).suffix.lower())
    os.replace(tmp, path)


def _write_as(frame: pl.DataFrame | pl.LazyFrame, path: str, suffix: str) -> None:
    lazy = frame.lazy()
    if suffix == ".csv":
        nested = [c for c, t in lazy.collect_schema().items() if t.is_nested()]
        lazy.with_columns(
            pl.struct(c)
            .struct.json_encode()
            .str.strip_prefix(f'{{"{c}":')
            .str.strip_suffix("}")
            .alias(c)
            for c in nested
        ).sink_csv(path)
    elif suffix in (".ndjson", ".jsonl"):
        lazy.sink_ndjson(path)
    else:
        lazy.sink_parquet(path)


def _spend(args: argparse.Namespace) -> int:
    import warnings

    from polars_llmbatch.collect.spend import spend

    if args.reconcile:
        from polars_llmbatch.collect.bill import reconcile_bill

        if not args.start:
            raise LlmBatchError("--reconcile needs --start DAY (e.g. --start 2026-11-01)")
        bill = reconcile_bill(
            args.root,
            provider=args.reconcile,
            start=args.start,
            end=args.end,
            base_url=args.base_url,
        )
        if args.by is None:
            return _print_table(bill, args.json)
    else:
        bill = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = spend(args.root, by=args.by or "job", bill=bill)
    for w in caught:  # one line each, as the errors are
        print(f"llmbatch: warning: {w.message}", file=sys.stderr)
    return _print_table(table, args.json)


def _print_table(table: pl.DataFrame, as_json: bool) -> int:
    if as_json:
        print(json.dumps(table.to_dicts(), indent=2, default=str))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=60):
            print(table)
    return 0


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
