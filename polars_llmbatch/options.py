"""The one table of options: each defined once, with its type, default, check, help and verbs.

Everything else derives from it: the checks every ``df.llm`` method runs first
(:func:`check`), the ``llmbatch`` flags and their help (:func:`add_flags`, :func:`from_flags`),
and the README's option reference (:func:`reference`). The methods in ``namespace.py`` keep
real, typed keyword arguments (IDE completion and ``help()`` show them);
``tests/test_options.py`` fails when a signature, the CLI or the README disagrees with this table.

Verbs: ``estimate``, ``requests``, ``batch`` and ``embed`` (the ``df.llm`` methods); the CLI's
``estimate``, ``requests`` and ``run`` (``run --embed`` is ``embed``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from polars_llmbatch._checks import check_bool, check_checkpoint, check_positive_int, check_seconds
from polars_llmbatch.errors import LlmBatchError

__all__ = [
    "OPTIONS",
    "VERBS",
    "Option",
    "add_flags",
    "check",
    "check_generation",
    "for_verb",
    "from_flags",
    "parse_categories",
    "recorded",
    "reference",
]

VERBS = ("estimate", "requests", "batch", "embed")
_GEN = frozenset({"estimate", "requests", "batch"})  # generation: what embed does not take
_ALL = frozenset(VERBS)
_RUN = frozenset({"batch", "embed"})
_PLAN = frozenset({"estimate", "requests"})


@dataclass(frozen=True)
class Option:
    """One option. ``annotation`` is the Python type as written in the signatures; ``flag`` the
    CLI flag (None: no flag, with ``no_flag`` saying why); ``parse`` turns the flag's text into
    the value; ``check`` raises :class:`LlmBatchError` naming the option, the value and the fix."""

    name: str
    annotation: str
    default: Any
    help: str
    verbs: frozenset[str]
    check: Callable[[str, Any], None] | None = None
    flag: str | None = ""  # "" → "--" + name with dashes
    parse: Callable[[str], Any] | None = None
    #: "value", "switch" (store_true), "repeat" (append), "choice", or "optional" (a flag
    #: alone means True, with a value that value: ``--calibrate``, ``--calibrate 500``)
    kind: str = "value"
    choices: tuple[str, ...] = ()
    no_flag: str = ""
    required: bool = False
    #: Kept in the checkpoint's job.json: what a reopened job (any process) runs with.
    recorded: bool = False

    def __post_init__(self) -> None:
        if self.choices and self.check is None:  # the choices are the check
            object.__setattr__(self, "check", _one_of(*self.choices))

    @property
    def cli(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")


# checks ---------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def _number(lo: float, hi: float) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        if value is None:
            return
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not ok or not (math.isfinite(value) and lo <= value <= hi):
            raise LlmBatchError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")

    return checked


def _tokens_cap(name: str, value: Any) -> None:
    # a cap on tokens or on a shard's size; the provider's own limits are checked with the
    # provider (shards.check_caps)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LlmBatchError(f"{name} must be a positive integer, got {value!r}")


def _stop(name: str, value: Any) -> None:
    if value is not None and not (
        isinstance(value, str)
        or (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(x, str) and x for x in value)
        )
    ):
        raise LlmBatchError(
            f"stop must be a string or a non-empty list of non-empty strings, got {value!r}"
        )


def _effort(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise LlmBatchError(f"reasoning_effort must be a string like 'low', got {value!r}")


def _max_cost(name: str, value: Any) -> None:
    from polars_llmbatch.plan.estimate import check_max_cost

    check_max_cost(value)


def _non_negative(name: str, value: Any) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < float("inf")
    ):
        raise LlmBatchError(f"{name}= must be a finite, non-negative number, got {value!r}")


def _one_of(*allowed: str) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        if value not in allowed:
            words = ", ".join(repr(a) for a in allowed)
            raise LlmBatchError(f"{name}= must be one of {words}, not {value!r}")

    return checked


def _flag(name: str, value: Any) -> None:
    check_bool(name, value)


def _seconds(name: str, value: Any) -> None:
    check_seconds(name, value)


def _tags(name: str, value: Any) -> None:
    if value is not None and not (
        isinstance(value, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise LlmBatchError(
            f"tags= must map strings to strings, e.g. {{'team': 'support'}}; got {value!r}"
        )


def _checkpoint(name: str, value: Any) -> None:
    check_checkpoint(value)


def _name(name: str, value: Any) -> None:
    if not (isinstance(value, str) and value):
        raise LlmBatchError(f"name= must be a non-empty column name, got {value!r}")


def _calibrate(name: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, int) or not 10 <= value <= 100_000:
        raise LlmBatchError(
            f"calibrate= takes True (a sample of 200 requests) or a sample size from 10 to "
            f"100,000, got {value!r}"
        )


def deadline_at(value: Any) -> dt.datetime | None:
    """A ``deadline=`` as an aware UTC time: an ISO string or datetime (naive ones are local
    time), or a number of seconds from now; refused when it is not one or has passed."""
    if value is None:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    when: dt.datetime | None = None
    if isinstance(value, bool):
        when = None
    elif isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        try:
            when = now + dt.timedelta(seconds=float(value))
        except OverflowError:  # past year 9999: no time this machine can wait for
            when = None
    elif isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if when is None:
        raise LlmBatchError(
            f"deadline= takes an ISO time ('2026-12-03T09:00'), a datetime or seconds from now "
            f"(e.g. 6 * 3600), got {value!r}"
        )
    when = when.astimezone(dt.timezone.utc)  # a naive time is this machine's local time
    if when <= now:
        raise LlmBatchError(f"deadline={value!r} has passed ({when.isoformat()} UTC)")
    return when


def _deadline(name: str, value: Any) -> None:
    deadline_at(value)


def _deadline_flag(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _seed(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise LlmBatchError(f"seed must be an integer, got {value!r}")


# flag parsers ---------------------------------------------------------------------------------
def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object is needed, e.g. '{\"input\": 0.15}'")
    return value


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--tag takes KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_categories(text: str) -> list[str]:
    labels = [c.strip() for c in text.split(",") if c.strip()]
    if not labels:
        raise argparse.ArgumentTypeError("give at least two comma-separated labels")
    return labels


_REQ = "the request"
OPTIONS: tuple[Option, ...] = (
    # what to send ------------------------------------------------------------------------
    Option("provider", "str | Provider", None, "openai, anthropic or gemini", _ALL, required=True),
    Option("model", "str", None, "the provider's model name", _ALL, required=True),
    Option(
        "output",
        "Any",
        None,
        "free text (None or a column name), categories (a list: a strict enum), a mapping "
        "of field → type, or a pydantic model",
        _GEN,
        flag=None,
        no_flag="--column NAME (free text) or --categories a,b,c",
    ),
    Option("system", "str | pl.Expr | None", None, "system prompt (may reference columns)", _GEN),
    Option("id", "str | None", None, "unique key column (default: row position)", _ALL),
    Option(
        "task",
        "Task",
        "generate",
        "generate or embed (batch and embed imply it)",
        _PLAN,
        check=_one_of("generate", "embed"),
        flag=None,
        no_flag="--embed",
    ),
    Option(
        "on_null",
        "OnNull",
        "skip",
        "a row whose prompt renders to null: skip it, send it empty, or raise",
        _ALL,
        kind="choice",
        choices=("skip", "empty", "error"),
    ),
    Option(
        "max_output_tokens",
        "int | None",
        None,
        "cap on output tokens per request (reasoning included)",
        _GEN,
        check=_tokens_cap,
        parse=int,
    ),
    Option(
        "temperature",
        "float | None",
        None,
        "sampling temperature, 0–2",
        _GEN,
        check=_number(0, 2),
        parse=float,
    ),
    Option(
        "top_p",
        "float | None",
        None,
        "nucleus sampling, 0–1",
        _GEN,
        check=_number(0, 1),
        parse=float,
    ),
    Option(
        "stop",
        "str | list[str] | None",
        None,
        "stop sequence(s) (the flag repeats)",
        _GEN,
        check=_stop,
        kind="repeat",
    ),
    Option(
        "seed", "int | None", None, "sampling seed (OpenAI, Gemini)", _GEN, check=_seed, parse=int
    ),
    Option(
        "reasoning_effort",
        "str | None",
        None,
        "reasoning models: low, medium or high",
        _GEN,
        check=_effort,
    ),
    Option(
        "dimensions",
        "int | None",
        None,
        "embedding size, where the model takes one",
        frozenset({"estimate", "requests", "embed"}),
        check=_positive_int,
        parse=int,
    ),
    Option("api", "str | None", None, "OpenAI: 'chat' (default) or 'responses'", _GEN),
    Option(
        "extra_body",
        "dict[str, Any] | None",
        None,
        "provider fields merged into every request body (the flag takes JSON)",
        _ALL,
        parse=_json_object,
    ),
    # what it costs -----------------------------------------------------------------------
    Option(
        "prices",
        "dict[str, float] | None",
        None,
        "USD per million tokens for a model the price list lacks, e.g. "
        '{"input": 0.3, "output": 1.2} (the flag takes JSON)',
        frozenset({"estimate", "batch", "embed"}),
        parse=_json_object,
    ),
    Option(
        "expected_output_tokens",
        "float | None",
        None,
        "expected output tokens per request, for the expected cost of free text",
        frozenset({"estimate", "batch"}),
        check=_non_negative,
        parse=float,
    ),
    Option(
        "exact",
        "bool",
        False,
        "count every request's tokens exactly",
        frozenset({"estimate"}),
        check=_flag,
        kind="switch",
    ),
    Option(
        "calibrate",
        "bool | int",
        False,
        "count a stratified sample of the requests (200, or this many) with the provider's "
        "free token-count endpoint and scale the input estimate by it (Anthropic, Gemini; "
        "needs the key)",
        frozenset({"estimate", "batch", "embed"}),
        check=_calibrate,
        parse=int,
        kind="optional",
    ),
    Option(
        "pilot",
        "int | None",
        None,
        "first send this many sampled requests through the sync endpoints (at sync prices) "
        "to measure output length, cut, failed and invalid shares; the batch reuses the answers",
        frozenset({"estimate", "batch", "embed"}),
        check=_positive_int,
        parse=int,
    ),
    Option(
        "max_cost",
        "float | None",
        None,
        "USD: refuse (before sending, and before retries) when the worst case is over it",
        frozenset({"estimate", "batch", "embed"}),
        check=_max_cost,
        parse=float,
        recorded=True,
    ),
    Option(
        "max_shard_requests",
        "int | None",
        None,
        "fewer requests per batch than the provider's cap",
        _ALL,
        parse=int,
        recorded=True,
        check=_tokens_cap,
    ),
    Option(
        "max_shard_bytes",
        "int | None",
        None,
        "fewer bytes per batch file than the provider's cap",
        _ALL,
        parse=int,
        recorded=True,
        check=_tokens_cap,
    ),
    Option(
        "max_shard_tokens",
        "int | None",
        None,
        "worst-case input tokens per batch (for the providers' enqueued-token limits)",
        _ALL - {"requests"},
        parse=int,
        recorded=True,
        check=_tokens_cap,
    ),
    Option(
        "max_in_flight",
        "int | None",
        None,
        "batches live at the provider at once (default: as many as its queue takes; a "
        "full-queue refusal is learned, and the live batches kept under it)",
        _RUN,
        parse=int,
        recorded=True,
        check=_positive_int,
    ),
    Option(
        "write_to",
        "str | Path | None",
        None,
        "write the shard files a batch would upload into this folder",
        frozenset({"requests"}),
    ),
    # how it runs -------------------------------------------------------------------------
    Option(
        "name",
        "str",
        "embedding",
        "the embedding column's name",
        frozenset({"embed"}),
        check=_name,
        flag=None,
        no_flag="--column NAME",
    ),
    Option(
        "checkpoint",
        "str | Path | None",
        None,
        "the job's folder, or an object store's prefix (`s3://bucket/jobs/x`, gs://, az://; "
        "the [s3] extra); default: a folder named by the job under the user cache folder. A "
        "pilot is kept next to it",
        _RUN | {"estimate"},
        check=_checkpoint,
    ),
    Option(
        "mode",
        "str",
        "batch",
        "batch (half price), sync (the sync endpoints), flex (sync calls at batch prices, "
        "slower; OpenAI, Gemini) or auto (sync for small jobs; with deadline=, batch then "
        "flex or sync for the rest)",
        _RUN,
        kind="choice",
        choices=("batch", "sync", "flex", "auto"),
        recorded=True,
    ),
    Option(
        "deadline",
        "str | datetime | float | None",
        None,
        "when the answers are needed (ISO time, datetime, or seconds from now): batches until "
        "then; at it, what still runs is cancelled and the rest sent with flex (else sync)",
        _RUN,
        check=_deadline,
        parse=_deadline_flag,
    ),
    Option(
        "wait",
        "bool",
        True,
        "wait for the results; False returns a Job at once",
        _RUN,
        check=_flag,
        flag="--no-wait",
        kind="switch",
    ),
    Option(
        "tags",
        "dict[str, str] | None",
        None,
        "labels kept with the job, for spend (the flag repeats KEY=VALUE)",
        _RUN,
        check=_tags,
        flag="--tag",
        kind="repeat",
        parse=_tag,
        recorded=True,
    ),
    Option("usage", "bool", False, "add token and cost columns", _RUN, check=_flag, kind="switch"),
    Option(
        "max_attempts",
        "int",
        3,
        "rounds per request, first send included",
        _RUN,
        check=_positive_int,
        parse=int,
        recorded=True,
    ),
    Option(
        "progress",
        "bool",
        True,
        "show a progress bar",
        _RUN,
        check=_flag,
        flag="--quiet",
        kind="switch",
    ),
    Option(
        "poll_interval",
        "float",
        5.0,
        "seconds between polls at first (it grows while nothing changes)",
        _RUN,
        check=_seconds,
        parse=float,
    ),
    Option(
        "concurrency",
        "int",
        8,
        "sync mode: requests in flight at once",
        _RUN,
        check=_positive_int,
        parse=int,
        recorded=True,
    ),
    Option(
        "api_key",
        "str | None",
        None,
        "the key (default: the SDK's variable, e.g. OPENAI_API_KEY; on a shared machine "
        "prefer the variable: a flag shows in the process list)",
        _RUN | {"estimate"},
    ),
    Option(
        "base_url",
        "str | None",
        None,
        "another endpoint: a proxy, a gateway, the emulator",
        _RUN | {"estimate"},
    ),
)

BY_NAME = {o.name: o for o in OPTIONS}


def for_verb(verb: str) -> list[Option]:
    """The options ``verb`` takes, in table order."""
    return [o for o in OPTIONS if verb in o.verbs]


def recorded(values: dict[str, Any]) -> dict[str, Any]:
    """The options job.json keeps, from a run's ``values`` or a job.json (absent ones, as in
    an older checkpoint, at their defaults)."""
    return {o.name: values.get(o.name, o.default) for o in OPTIONS if o.recorded}


def check(verb: str, values: dict[str, Any]) -> None:
    """Every check of ``verb``'s options, in table order, on ``values`` (a method's arguments):
    the one place an option's type and range are checked, before anything is read or sent."""
    for option in for_verb(verb):
        if option.check is not None and option.name in values:
            option.check(option.name, values[option.name])


def check_generation(values: dict[str, Any]) -> None:
    """The checks of the generation options in ``values`` (a request spec's options)."""
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is not None and option.check is not None:
            option.check(name, value)


# the CLI --------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, verb: str, *, skip: Iterable[str] = ()) -> None:
    """The flags of ``verb``'s options (help from the table)."""
    skipped = set(skip)
    for o in for_verb(verb):
        if o.cli is None or o.name in skipped:
            continue
        kw: dict[str, Any] = {"dest": o.name, "help": o.help}
        if o.kind == "switch":
            kw["action"] = "store_true"
        elif o.kind == "repeat":
            kw.update(action="append", type=o.parse or str, default=None)
        elif o.kind == "choice":
            kw.update(choices=o.choices, default=o.default)
        elif o.kind == "optional":
            kw.update(nargs="?", const=True, type=o.parse or str, default=None)
        else:
            kw.update(type=o.parse or str, required=o.required)
        parser.add_argument(o.cli, **kw)


def from_flags(args: argparse.Namespace, verb: str) -> dict[str, Any]:
    """``verb``'s keyword arguments from parsed flags (only what was given, defaults aside)."""
    kw: dict[str, Any] = {}
    for o in for_verb(verb):
        if o.cli is None or not hasattr(args, o.name):
            continue
        value = getattr(args, o.name)
        if o.kind == "switch":
            # a switch turns its option away from the default: --no-wait, --quiet
            value = (not value) if o.default is True else value
            if value != o.default:
                kw[o.name] = value
        elif o.kind == "repeat":
            if value:
                kw[o.name] = dict(value) if o.annotation.startswith("dict") else list(value)
        elif value is not None:
            kw[o.name] = value
    return kw


# the docs -------------------------------------------------------------------------------------
def reference() -> str:
    """The README's option reference, as a Markdown table."""
    rows = [
        "| option | default | estimate | requests | batch | embed | flag | job.json | what it does |"
    ]
    rows.append("|---|---|:-:|:-:|:-:|:-:|---|:-:|---|")
    for o in OPTIONS:
        marks = " | ".join("✓" if v in o.verbs else "" for v in VERBS)
        default = "required" if o.required else f"`{o.default!r}`"
        flag = f"`{o.cli}`" if o.cli else o.no_flag
        kept = "✓" if o.recorded else ""
        rows.append(f"| `{o.name}` | {default} | {marks} | {flag} | {kept} | {o.help} |")
    return "\n".join(rows) + "\n"
