"""The ``.llm`` namespace on ``pl.DataFrame`` and ``pl.LazyFrame``: a thin facade, no logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from polars_llmbatch.estimate import Estimate, check_fits, estimate
from polars_llmbatch.prices import check_override
from polars_llmbatch.providers import Provider, get_provider
from polars_llmbatch.requests import OnNull, Prepared, prepare
from polars_llmbatch.shards import check_caps, check_target, plan, write_shards
from polars_llmbatch.spec import GENERATION_OPTIONS, Task
from polars_llmbatch.template import Template

__all__ = ["LlmNamespace"]


class LlmNamespace:
    """``df.llm``: estimate and build provider batch requests from a frame.

    A ``LazyFrame`` is collected once, for the columns the prompt, system prompt and ``id=`` read
    (nothing else is materialised).
    """

    def __init__(self, frame: pl.DataFrame | pl.LazyFrame) -> None:
        self._frame = frame

    def estimate(
        self,
        prompt: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        output: Any = None,
        system: str | pl.Expr | None = None,
        id: str | None = None,
        task: Task = "generate",
        on_null: OnNull = "skip",
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        reasoning_effort: str | None = None,
        dimensions: int | None = None,
        api: str | None = None,
        extra_body: dict[str, Any] | None = None,
        prices: dict[str, float] | None = None,
        expected_output_tokens: float | None = None,
        exact: bool = False,
        max_cost: float | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
        max_shard_tokens: int | None = None,
    ) -> Estimate:
        """Tokens and cost of sending one request per row, at batch and sync rates; nothing is sent.

        Identical prompts share one request (and are paid once). Input tokens are exact for
        OpenAI up to 20,000 unique requests and sampled above that (``exact=True`` counts all);
        Anthropic and Gemini are approximated with an error band. ``max_cost`` (USD) raises
        :class:`~polars_llmbatch.BudgetExceededError` when the worst case is over it.

        Example:
            >>> import polars as pl, polars_llmbatch
            >>> df = pl.DataFrame({"body": ["I was charged twice", "The app crashes"]})
            >>> est = df.llm.estimate("Classify this ticket: {body}", provider="openai",
            ...                       model="gpt-4o-mini", output=["billing", "bug"],
            ...                       max_output_tokens=20)
            >>> est.unique_requests, est.output_tokens_worst, est.cost_batch < est.cost_sync
            (2, 40, True)
        """
        check_caps(get_provider(provider), max_shard_requests, max_shard_bytes, max_shard_tokens)
        check_override(prices)
        prepared = _prepare(self._frame, prompt, locals())
        est, _ = estimate(
            prepared,
            exact=exact,
            prices=prices,
            expected_output_tokens=expected_output_tokens,
            max_shard_requests=max_shard_requests,
            max_shard_bytes=max_shard_bytes,
            max_shard_tokens=max_shard_tokens,
        )
        est.check_budget(max_cost)
        return est

    def requests(
        self,
        prompt: str | pl.Expr | Template,
        *,
        provider: str | Provider,
        model: str,
        output: Any = None,
        system: str | pl.Expr | None = None,
        id: str | None = None,
        task: Task = "generate",
        on_null: OnNull = "skip",
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        reasoning_effort: str | None = None,
        dimensions: int | None = None,
        api: str | None = None,
        extra_body: dict[str, Any] | None = None,
        write_to: str | Path | None = None,
        max_shard_requests: int | None = None,
        max_shard_bytes: int | None = None,
    ) -> pl.DataFrame:
        """The request per row: row key, ``custom_id`` and the exact JSON ``body`` (null if skipped).

        Rows with identical bodies share one ``custom_id``. With ``write_to=DIR`` the unique
        requests are also written as the shard files a batch would upload, byte for byte
        (``DIR/00000.jsonl``, ...), for people who submit by hand.

        Example:
            >>> import polars as pl, polars_llmbatch
            >>> df = pl.DataFrame({"body": ["hi", "hi", None]})
            >>> reqs = df.llm.requests("Say: {body}", provider="openai", model="gpt-4o-mini")
            >>> reqs.columns, reqs["custom_id"].n_unique()
            (['row_nr', 'custom_id', 'body'], 2)
        """
        check_caps(get_provider(provider), max_shard_requests, max_shard_bytes)
        if write_to is not None:
            check_target(write_to)
        prepared = _prepare(self._frame, prompt, locals())
        check_fits(prepared)
        if write_to is not None:
            shards = plan(prepared, max_requests=max_shard_requests, max_bytes=max_shard_bytes)
            write_shards(prepared, shards, write_to)
        bodies = prepared.requests.select("custom_id", "body")
        return prepared.rows.join(bodies, on="custom_id", how="left", maintain_order="left").select(
            prepared.key, "custom_id", "body"
        )


_REQUEST_ARGS = ("provider", "model", "output", "system", "id", "task", "on_null")
_REQUEST_ARGS += ("dimensions", "api", "extra_body")


def _prepare(frame: pl.DataFrame | pl.LazyFrame, prompt: Any, args: dict[str, Any]) -> Prepared:
    """``prepare`` with the namespace method's own arguments (its ``locals()``): the methods
    spell every option out for their signatures and docs, and share this one call."""
    options = {name: args[name] for name in GENERATION_OPTIONS}
    return prepare(frame, prompt, options=options, **{k: args[k] for k in _REQUEST_ARGS})


def register() -> None:
    """Register ``.llm`` on DataFrame and LazyFrame (idempotent)."""
    pl.api.register_dataframe_namespace("llm")(LlmNamespace)
    pl.api.register_lazyframe_namespace("llm")(LlmNamespace)
