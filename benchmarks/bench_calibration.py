"""Benchmark: input-token error of the estimate against what the emulator bills, offline and
calibrated (``calibrate=True``), per provider, and the overhead of calibrating.

The emulator bills with its own tokenizers (polars_llmbatch/emulator/tokenizers.py), which the
library's offline approximation does not know: Claude's and Gemini's are o200k plus
surcharges by character class, so their ratio to o200k depends on the text. The data is
``sample.varied(rows)`` (prose, code, transaction lines, CJK and JSON, each text unique),
prompt ``"Summarise in one line: {text}"``, 30 output tokens. For each provider the job is
estimated offline, estimated with calibration (200 requests counted by the emulator's count
endpoint), then run as a batch through the emulator; "billed" is the sum of the input tokens
in the emulator's ledger. Then the same per kind of text (``--rows`` / 5 each), where one
kind can mislead a fixed ratio.

The overhead part times ``estimate`` with and without ``calibrate=True`` on ``--overhead-rows``
rows (default 1M) against the emulator, median of 3 runs each; the difference is what
calibration costs here (200 local HTTP calls plus the stratified sample), and the count calls
are free at every provider.

Run it by hand::

    python benchmarks/bench_calibration.py [--rows 10000] [--overhead-rows 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

import polars_llmbatch  # noqa: F401
from polars_llmbatch.emulator import serve
from polars_llmbatch.sample import varied

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
PROMPT = "Summarise in one line: {text}"


def url(emu, provider: str) -> str:
    return {"openai": emu.openai_url, "anthropic": emu.anthropic_url, "gemini": emu.gemini_url}[
        provider
    ]


def measure(df: pl.DataFrame, provider: str, root: Path) -> dict[str, float]:
    kw = dict(provider=provider, model=MODELS[provider], max_output_tokens=30)
    with serve(batch_seconds=0.2) as emu:
        creds = dict(api_key="k", base_url=url(emu, provider))
        offline = df.llm.estimate(PROMPT, **kw)
        t = time.perf_counter()
        cal = df.llm.estimate(PROMPT, **kw, **creds, calibrate=True)
        seconds = time.perf_counter() - t
        counts = emu.ledger.counts.get(provider, 0)
        out = df.llm.batch(
            PROMPT,
            **kw,
            **creds,
            checkpoint=root / f"{provider}-{len(list(root.iterdir()))}",
            progress=False,
            poll_interval=0.05,
        )
        assert set(out["llm_status"]) == {"succeeded"}
        billed = sum(b["input_tokens"] for b in emu.ledger.billed)
    return {
        "billed": billed,
        "offline": offline.input_tokens,
        "offline_err": (offline.input_tokens - billed) / billed,
        "offline_band": offline.input_tokens_error / offline.input_tokens,
        "calibrated": cal.input_tokens,
        "cal_err": (cal.input_tokens - billed) / billed,
        "cal_band": cal.input_tokens_error / cal.input_tokens,
        "counted": counts,
        "seconds": seconds,
        "worst_holds": float(cal.input_tokens_worst >= billed),
    }


def show(label: str, m: dict[str, float]) -> None:
    print(
        f"{label:<22} billed {m['billed']:>10,.0f} | offline {m['offline_err']:+7.2%} "
        f"(±{m['offline_band']:.1%}) | calibrated {m['cal_err']:+7.2%} (±{m['cal_band']:.2%}, "
        f"{m['counted']:.0f} counted, {m['seconds']:.2f} s) | worst ≥ billed: "
        f"{bool(m['worst_holds'])}"
    )


def overhead(rows: int) -> None:
    df = varied(rows, seed=11)
    kw = dict(provider="anthropic", model=MODELS["anthropic"], max_output_tokens=30)
    with serve() as emu:
        creds = dict(api_key="k", base_url=emu.anthropic_url)
        times: dict[str, list[float]] = {"offline": [], "calibrated": []}
        for _ in range(3):
            for name, extra in (("offline", {}), ("calibrated", {**creds, "calibrate": True})):
                t = time.perf_counter()
                df.llm.estimate(PROMPT, **kw, **extra)
                times[name].append(time.perf_counter() - t)
    off, cal = statistics.median(times["offline"]), statistics.median(times["calibrated"])
    print(
        f"\noverhead on {rows:,} rows (anthropic, median of 3): estimate offline {off:.2f} s, "
        f"calibrated {cal:.2f} s: +{cal - off:.2f} s ({cal / off:.2f}x), $0 (count calls are free)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--overhead-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    df = varied(args.rows, seed=10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{args.rows:,} rows of sample.varied, all kinds:")
        for provider in MODELS:
            show(provider, measure(df, provider, root))
        print("\nby kind of text:")
        for kind in sorted(df["kind"].unique()):
            part = df.filter(pl.col("kind") == kind)
            for provider in ("anthropic", "gemini"):
                show(f"{provider} {kind} ({part.height:,})", measure(part, provider, root))
    if args.overhead_rows:
        overhead(args.overhead_rows)


if __name__ == "__main__":
    main()
