"""``llmbatch demo``: the whole product on the local emulator, in under a minute, for free.

It makes a realistic sample (support tickets with duplicates, nulls, long and short texts),
shows the estimate, runs a category backfill and an embeddings job through the emulator's
OpenAI Batch API with progress bars, prints some results and the spend summary, and says how to
point the same commands at a real provider.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

__all__ = ["run_demo"]

PROMPT = "Classify this support ticket into one category.\n\nTicket: {body}"


def run_demo(
    rows: int = 20_000, directory: str | Path | None = None, say: Callable[[str], None] = print
) -> pl.DataFrame:
    """Run the demo; returns the labelled tickets.

    Example:
        >>> import io, contextlib
        >>> from polars_llmbatch.demo import run_demo
        >>> with contextlib.redirect_stderr(io.StringIO()):
        ...     out = run_demo(rows=200, say=lambda text: None)
        >>> out.height, out["llm_status"].unique().sort().to_list()
        (200, ['skipped', 'succeeded'])
    """
    import polars_llmbatch  # noqa: F401  (registers .llm)
    from polars_llmbatch.collect.spend import spend
    from polars_llmbatch.emulator import serve
    from polars_llmbatch.sample import CATEGORIES, tickets

    started = time.perf_counter()
    keep = tempfile.TemporaryDirectory(prefix="llmbatch-demo-") if directory is None else None
    root = Path(directory or keep.name) / "runs"  # type: ignore[union-attr]
    try:
        with serve(batch_seconds=1.0) as emu:
            say(f"The emulator serves the OpenAI, Anthropic and Gemini batch APIs on {emu.url}")
            say("(127.0.0.1 only: nothing leaves this machine, no key, no cost).\n")
            df = tickets(rows)
            nulls = df["body"].null_count()
            say(
                f"Sample: {df.height:,} support tickets ({df['body'].n_unique():,} distinct "
                f"texts, {nulls:,} empty); the first three:"
            )
            say(str(df.head(3)))
            common = dict(
                provider="openai",
                api_key="demo",
                base_url=emu.openai_url,
                poll_interval=0.25,
            )
            say("\n1. The estimate, before anything is sent:")
            est = df.llm.estimate(
                PROMPT,
                provider="openai",
                model="gpt-4o-mini",
                output=CATEGORIES,
                max_output_tokens=20,
            )
            say(repr(est))
            say("\n2. The category backfill through the Batch API (half price):")
            out = df.llm.batch(
                PROMPT,
                model="gpt-4o-mini",
                output=CATEGORIES,
                max_output_tokens=20,
                checkpoint=root / "tickets",
                tags={"team": "support", "feature": "triage"},
                max_cost=5.0,
                usage=True,
                **common,  # type: ignore[arg-type]
            )
            say(str(out.select("ticket_id", "body", "label", "llm_status").head(5)))
            say(str(out["llm_status"].value_counts().sort("llm_status")))
            say("\n3. Embeddings of the same tickets, into a Float32 array column:")
            emb = df.llm.embed(
                "body",
                model="text-embedding-3-small",
                dimensions=256,
                checkpoint=root / "ticket-embeddings",
                tags={"team": "search", "feature": "similar-tickets"},
                **common,  # type: ignore[arg-type]
            )
            say(str(emb.select("ticket_id", "embedding", "llm_status").head(3)))
            say("\n4. What it cost, from the checkpoints (llmbatch spend):")
            with pl.Config(tbl_cols=-1, tbl_width_chars=160):
                say(str(spend(root, by="tag:feature")))
        took = time.perf_counter() - started
        say(
            f"\nDone in {took:.0f} s. Checkpoints: {root}"
            + (" (a temporary folder, removed now)" if keep else "")
        )
        say(
            "\nTo run the same on a real provider: set OPENAI_API_KEY (or ANTHROPIC_API_KEY, "
            "GEMINI_API_KEY) and run, e.g.\n"
            "  llmbatch sample tickets.parquet\n"
            '  llmbatch run tickets.parquet --prompt "Classify this ticket: {body}" '
            "--provider openai --model gpt-4o-mini \\\n"
            "      --categories billing,bug,feature,other --max-output-tokens 20 "
            "--max-cost 5 --output labelled.parquet --checkpoint runs/tickets\n"
            "To dry-run first, `llmbatch emulator` and export the base URLs it prints."
        )
        return out
    finally:
        if keep is not None:
            keep.cleanup()
