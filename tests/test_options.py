"""The options table is the one source: signatures, checks, CLI flags and the README agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from polars_llmbatch import LlmBatchError, options
from polars_llmbatch.cli import _parser
from polars_llmbatch.namespace import LlmNamespace

POSITIONAL = {"estimate": "prompt", "requests": "prompt", "batch": "prompt", "embed": "text"}
COMMANDS = {"estimate": ["estimate"], "requests": ["requests"], "run": ["batch", "embed"]}


@pytest.mark.parametrize("verb", options.VERBS)
def test_each_method_takes_exactly_the_table_options_with_their_defaults_and_types(verb) -> None:
    params = dict(inspect.signature(getattr(LlmNamespace, verb)).parameters)
    params.pop("self")
    assert params.pop(POSITIONAL[verb]).kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    table = {o.name: o for o in options.for_verb(verb)}
    assert sorted(params) == sorted(table), "signature and table disagree"
    for name, p in params.items():
        o = table[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p.annotation == o.annotation, (name, p.annotation, o.annotation)
        if o.required:
            assert p.default is inspect.Parameter.empty, name
        else:
            assert p.default == o.default, (name, p.default, o.default)


def _flags(command: str) -> dict[str, str]:
    sub = next(
        a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    ).choices[command]
    return {s: a.dest for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_cli_has_a_flag_for_every_option_it_can_take(command) -> None:
    flags = _flags(command)
    for verb in COMMANDS[command]:
        for o in options.for_verb(verb):
            if o.cli is None:
                assert o.no_flag, f"{o.name} has no flag and no reason"
                continue
            assert o.cli in flags, f"llmbatch {command} lacks {o.cli} ({verb}'s {o.name})"


def test_run_passes_every_flag_on_as_the_python_value() -> None:
    argv = [
        "run", "t.parquet", "--prompt", "Classify: {body}", "--provider", "openai",
        "--model", "ft:gpt-4o-mini:acme", "--top-p", "0.5", "--stop", "END", "--stop", "STOP",
        "--seed", "7", "--reasoning-effort", "low", "--api", "responses",
        "--extra-body", '{"user": "u1"}', "--concurrency", "3", "--max-shard-bytes", "1000000",
        "--prices", '{"input": 0.3, "output": 1.2}', "--expected-output-tokens", "12.5",
        "--api-key", "sk-x", "--base-url", "http://127.0.0.1:1/v1", "--tag", "team=support",
        "--usage", "--max-attempts", "2", "--mode", "auto", "--categories", "a,b",
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    kw = options.from_flags(args, "batch")
    assert kw == {
        "provider": "openai",
        "model": "ft:gpt-4o-mini:acme",
        "on_null": "skip",
        "top_p": 0.5,
        "stop": ["END", "STOP"],
        "seed": 7,
        "reasoning_effort": "low",
        "api": "responses",
        "extra_body": {"user": "u1"},
        "prices": {"input": 0.3, "output": 1.2},
        "expected_output_tokens": 12.5,
        "max_shard_bytes": 1_000_000,
        "mode": "auto",
        "tags": {"team": "support"},
        "usage": True,
        "max_attempts": 2,
        "concurrency": 3,
        "poll_interval": 5.0,
        "api_key": "sk-x",
        "base_url": "http://127.0.0.1:1/v1",
    }
    options.check("batch", kw)  # what the CLI builds passes the table's own checks


def test_a_flag_value_the_cli_cannot_read_is_a_usage_error(capsys) -> None:
    base = ["run", "t.parquet", "--prompt", "p", "--provider", "openai", "--model", "m"]
    for bad in (["--prices", "{not json"], ["--extra-body", "[1]"], ["--categories", ","]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(base + bad)
        assert exit_.value.code == 2
    assert "a JSON object is needed" in capsys.readouterr().err


@pytest.mark.parametrize("option", [o for o in options.OPTIONS if o.check is not None])
def test_every_checked_option_refuses_a_value_of_the_wrong_type(option) -> None:
    verb = next(iter(sorted(option.verbs)))
    with pytest.raises(LlmBatchError, match=option.name):
        options.check(verb, {option.name: object()})


def test_the_readme_reference_is_the_table() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start, end = "<!-- options:start -->\n", "<!-- options:end -->"
    block = readme[readme.index(start) + len(start) : readme.index(end)]
    assert block == options.reference(), "README out of date: paste options.reference()"


def test_job_json_keeps_the_recorded_options_and_a_reopened_job_runs_with_them(tmp_path) -> None:
    import json

    import polars as pl
    from helpers import batch

    import polars_llmbatch
    from polars_llmbatch.emulator import serve

    df = pl.DataFrame({"body": ["a", "b", "c"]})
    given = {"mode": "sync", "tags": {"team": "x"}, "max_attempts": 2, "max_cost": 1.0}
    given |= {"concurrency": 2, "max_shard_requests": 2, "max_shard_bytes": 100_000}
    given |= {"max_shard_tokens": 10_000, "max_in_flight": 3}
    with serve(batch_seconds=0.05) as emu:
        batch(df, emu, tmp_path / "j", **given)
    job = json.loads((tmp_path / "j" / "job.json").read_text())
    kept = {o.name for o in options.OPTIONS if o.recorded}
    assert kept == set(given)  # every recorded option is one a run can set, and the other way
    assert {k: job[k] for k in kept} == given
    reopened = polars_llmbatch.Job.open(tmp_path / "j", api_key="k")
    settings = reopened._settings
    assert (settings.mode, settings.max_attempts, settings.concurrency) == ("sync", 2, 2)
    assert (settings.max_shard_requests, settings.max_cost) == (2, 1.0)
    assert settings.max_in_flight == 3


def test_job_estimate_is_the_estimate_shown_before_sending(tmp_path) -> None:
    import polars as pl
    from helpers import batch

    import polars_llmbatch
    from polars_llmbatch.emulator import serve

    df = pl.DataFrame({"body": ["a refund", "a crash", "a refund"]})
    args = {"provider": "openai", "model": "gpt-4o-mini", "output": ["billing", "bug"]}
    before = df.llm.estimate("Classify: {body}", max_output_tokens=200, **args)
    with serve(batch_seconds=0.05) as emu:
        job = batch(df, emu, tmp_path / "j", wait=False, output=args["output"])
        job.wait()
        job.close()
    reopened = polars_llmbatch.Job.open(tmp_path / "j")
    page = reopened._repr_html_()  # the notebook view: rows and shards, numbers right-aligned
    assert "rows by status" in page and "shards by state" in page
    assert '<td>done</td><td style="text-align:right">1</td>' in page
    assert '<td>succeeded</td><td style="text-align:right">3</td>' in page
    est = reopened.estimate
    assert isinstance(est, polars_llmbatch.Estimate)
    assert est.unique_requests == before.unique_requests == 2
    assert est.cost_batch == pytest.approx(before.cost_batch)
    assert est.worst_cost_batch == pytest.approx(before.worst_cost_batch)
    assert repr(est) == repr(before) and est._repr_html_() == before._repr_html_()


def test_batch_takes_max_shard_tokens_and_keeps_each_batch_under_it(tmp_path) -> None:
    """A documented option that was a TypeError in batch(): each batch's requests' worst-case
    input tokens (the bounds stored with the requests) sum to at most the cap."""
    import polars as pl
    from helpers import batch

    from polars_llmbatch.emulator import Faults, serve
    from polars_llmbatch.run.checkpoint import Checkpoint

    df = pl.DataFrame({"body": [f"ticket number {i} about a refund" for i in range(40)]})
    faults = Faults(expire_at=0.5, fault_batches=1)  # a retry round is planned too
    with serve(batch_seconds=0.05, faults=faults) as emu:
        out = batch(df, emu, tmp_path / "j", output=["billing", "bug"], max_shard_tokens=400)
        created = len(emu.ledger.batches)
    assert set(out["llm_status"]) == {"succeeded"}
    ckpt = Checkpoint(tmp_path / "j")
    worst = pl.read_parquet(tmp_path / "j" / "requests.parquet")
    per_shard = [
        int(
            worst.join(pl.read_parquet(ckpt.ids_file(i)), on="custom_id")[
                "worst_input_tokens"
            ].sum()
        )
        for i in ckpt.shards()
    ]
    assert created == len(per_shard) > 1 and max(per_shard) <= 400
    assert max(s.round for s in ckpt.shards().values()) == 2  # the retry round kept the cap
    assert ckpt.job()["max_shard_tokens"] == 400
