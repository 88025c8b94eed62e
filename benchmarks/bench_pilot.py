"""Benchmark: the expected output cost that ``pilot=100`` gives for free text, against what the
emulator bills for the whole job, per provider; and the pilot's overhead on a 1M-row job.

Data: ``sample.varied(rows)`` (prose, code, transaction lines, CJK, JSON; every text unique),
prompt ``"Summarise: {text}"``, ``max_output_tokens=400``, real prices from genai-prices. For
each provider: ``df.llm.estimate(..., pilot=100)`` (100 requests at sync rates), then the batch
(which reuses the pilot's 100 answers); "billed" output is the sum of output tokens in the
emulator's ledger over all requests, priced at the batch output rate. Without a pilot the
expected cost of free text is unknown, so there is no baseline figure but the truth.

Overhead: on ``--overhead-rows`` rows (default 1M), the wall time of ``estimate`` with
``pilot=100`` minus without (median of 3; a pilot found again sends nothing, so each run
pilots into a fresh root, where no sibling can lend its answers), and its dollars: the pilot's sync cost, and what it adds over
sending the same 100 in the batch (half of it), next to the job's expected batch cost.

Run it by hand::

    python benchmarks/bench_pilot.py [--rows 10000] [--overhead-rows 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars_llmbatch  # noqa: F401
from polars_llmbatch.emulator import serve
from polars_llmbatch.sample import varied

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
PROMPT = "Summarise: {text}"


def url(emu, provider: str) -> str:
    return {"openai": emu.openai_url, "anthropic": emu.anthropic_url, "gemini": emu.gemini_url}[
        provider
    ]


def accuracy(rows: int, root: Path) -> None:
    df = varied(rows, seed=20)
    print(f"{rows:,} rows of sample.varied, free text, pilot=100:")
    for provider, model in MODELS.items():
        kw = dict(provider=provider, model=model, max_output_tokens=400)
        with serve(batch_seconds=0.2) as emu:
            creds = dict(api_key="k", base_url=url(emu, provider))
            ckpt = root / provider
            t = time.perf_counter()
            est = df.llm.estimate(PROMPT, **kw, **creds, pilot=100, checkpoint=ckpt)
            seconds = time.perf_counter() - t
            df.llm.batch(
                PROMPT,
                **kw,
                **creds,
                checkpoint=ckpt,
                pilot=100,
                progress=False,
                poll_interval=0.05,
            )
            billed_out = sum(b["output_tokens"] for b in emu.ledger.billed)
        rate = est.price.batch_output
        expected = est.output_tokens_expected * rate / 1e6
        billed = billed_out * rate / 1e6
        half = est.output_tokens_error * rate / 1e6
        print(
            f"  {provider:<9} expected output ${expected:.4f} ± ${half:.4f} | billed "
            f"${billed:.4f} | off {(expected - billed) / billed:+.2%} | pilot {seconds:.2f} s, "
            f"${est.pilot['cost']:.6f} at sync"
        )


def overhead(rows: int, root: Path) -> None:
    df = varied(rows, seed=21)
    kw = dict(provider="openai", model=MODELS["openai"], max_output_tokens=400)
    times: dict[str, list[float]] = {"offline": [], "pilot": []}
    with serve() as emu:
        creds = dict(api_key="k", base_url=emu.openai_url)
        for i in range(3):
            t = time.perf_counter()
            df.llm.estimate(PROMPT, **kw)
            times["offline"].append(time.perf_counter() - t)
            t = time.perf_counter()
            est = df.llm.estimate(
                PROMPT, **kw, **creds, pilot=100, checkpoint=root / f"o{i}" / "job"
            )  # no sibling to reuse
            times["pilot"].append(time.perf_counter() - t)
    off, pil = statistics.median(times["offline"]), statistics.median(times["pilot"])
    cost = est.pilot["cost"]
    print(
        f"\noverhead on {rows:,} rows (openai {MODELS['openai']}, median of 3): estimate "
        f"{off:.2f} s offline, {pil:.2f} s with pilot=100 (+{pil - off:.2f} s); the pilot cost "
        f"${cost:.6f} at sync rates, ${cost / 2:.6f} more than in the batch, next to an "
        f"expected batch cost of ${est.cost_batch:,.2f} ({cost / 2 / est.cost_batch:.4%})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--overhead-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        accuracy(args.rows, Path(tmp))
        if args.overhead_rows:
            overhead(args.overhead_rows, Path(tmp))


if __name__ == "__main__":
    main()
