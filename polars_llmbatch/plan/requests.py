"""Rows → unique provider requests: render the prompt, build wire bodies, hash them, deduplicate.

Everything is a polars expression over the whole frame (no Python loop over rows); the ids are
MD5 digests computed by DuckDB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import polars as pl

from polars_llmbatch import _json
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.outputs import OutputSpec, parse_output
from polars_llmbatch.plan.render import (
    ROW_NR,
    OnNull,
    RenderPlan,
    check_not_empty,
    make_plan,
    null_rows,
    request_digest,
    request_ids,
)
from polars_llmbatch.plan.spec import RequestSpec, Task
from polars_llmbatch.plan.template import Template, prompt_expr
from polars_llmbatch.providers import Provider, get_provider

__all__ = ["ROW_NR", "OnNull", "Prepared", "prepare", "render_plan", "request_digest"]

#: Names the request frames use themselves; an ``id=`` column may not take them.
_RESERVED = frozenset({"custom_id", "skipped", "body"})
#: A custom_id is the MD5 of the canonical request text as 32 hex characters (128 bits): an
#: identifier, not a security measure, and fits ^[a-zA-Z0-9_-]{1,64}$. MD5 over SHA-256 because
#: it hashes a million prompts in half the time (benchmarks/README.md).


@dataclass(frozen=True)
class RowIds:
    """How any frame's rows map to this job's ``custom_id``s, as expressions: the rendered
    texts, hashed exactly as :func:`prepare` hashes them. A result plan uses it to join answers
    on the request itself, never on a row's position (a LazyFrame evaluated again may give its
    rows in another order)."""

    texts: dict[str, pl.Expr]  # internal column name → rendered text
    digest: str

    def attach(self, lf: pl.LazyFrame, name: str) -> pl.LazyFrame:
        """``lf`` with the ``custom_id`` of each row as column ``name`` (null: skipped)."""
        columns = list(self.texts)
        digest = self.digest

        def ids(s: pl.Series) -> pl.Series:
            return request_ids(s.struct.unnest(), digest, columns)

        return (
            lf.with_columns(*(e.alias(c) for c, e in self.texts.items()))
            .with_columns(
                pl.struct(columns)
                .map_batches(ids, return_dtype=pl.String, is_elementwise=True)
                .alias(name)
            )
            .drop(columns)
        )


@dataclass(frozen=True)
class Prepared:
    """A frame turned into requests.

    ``rows``: one row per input row, in input order: the row key, ``custom_id`` (null for a
    skipped row) and ``skipped``. ``requests``: one row per unique request, sorted by
    ``custom_id`` (so shards do not depend on the input's row order): ``custom_id``, ``body``
    (the exact JSON body), ``user`` (and ``system`` when per row) texts and ``row`` (the first
    input row position that uses it, for error messages).
    """

    spec: RequestSpec
    provider: Provider
    key: str
    rows: pl.DataFrame
    requests: pl.DataFrame
    row_ids: RowIds | None = None
    #: The prompt as the caller wrote it (a template's text, an expression's repr).
    prompt: str | None = None

    @cached_property
    def job_id(self) -> str:
        """16 hex characters naming the job: a hash of the spec and of every request's id, so
        two jobs share it only when they send the same requests."""
        h = hashlib.sha256(self.spec.digest().encode())
        h.update("".join(self.requests["custom_id"].to_list()).encode())
        return h.hexdigest()[:16]

    @property
    def text_columns(self) -> tuple[str, ...]:
        return ("system", "user") if self.spec.system_per_row else ("user",)

    # The request source both this and the streamed :class:`.stream.Staged` are: what the
    # estimate and the shard files read, a piece at a time (here: one piece).

    @property
    def n_requests(self) -> int:
        return self.requests.height

    @property
    def n_rows(self) -> int:
        return self.rows.height

    @property
    def n_skipped(self) -> int:
        return int(self.rows["skipped"].sum())

    def pieces(self, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of the unique requests (``payload``: id and body bytes), in order."""
        yield self._select(self.requests, columns)

    def span(self, start: int, n: int, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
        """``columns`` of requests ``start:start + n``."""
        yield self._select(self.requests.slice(start, n), columns)

    def gather(self, positions: pl.Series, columns: Sequence[str]) -> pl.DataFrame:
        """``columns`` of the requests at ``positions``."""
        return self._select(self.requests[positions], columns)

    def _select(self, requests: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
        virtual = {e.meta.output_name(): e for e in sizes(self.text_columns)}
        return requests.select(virtual.get(c, pl.col(c)) for c in columns)

    def describe_row(self, position: int) -> str:
        """``row 17`` or ``row 17 (ticket_id='T-9')`` for error messages."""
        if self.key == ROW_NR:
            return f"row {position}"
        value = self.rows[self.key][position]
        return f"row {position} ({self.key}={value!r})"


def sizes(texts: tuple[str, ...]) -> list[pl.Expr]:
    """The sizes a request source gives besides its columns, what the estimate and the shard
    plan read of every request (the texts themselves are read of few): ``payload`` (what a request adds to a shard
    before framing: its id and body, in bytes), ``bytes`` (its texts' bytes) and
    ``chars_<text>`` (each text's characters)."""
    return [
        (pl.col("custom_id").str.len_bytes() + pl.col("body").str.len_bytes())
        .cast(pl.Int64)
        .alias("payload"),
        pl.sum_horizontal(pl.col(t).str.len_bytes().cast(pl.Int64) for t in texts).alias("bytes"),
        *(pl.col(t).str.len_chars().cast(pl.Int64).alias(f"chars_{t}") for t in texts),
    ]


def build_spec(
    *,
    provider: str | Provider,
    model: str,
    task: Task = "generate",
    output: Any = None,
    system: str | pl.Expr | Template | None = None,
    options: dict[str, Any] | None = None,
    dimensions: int | None = None,
    api: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> tuple[RequestSpec, Provider]:
    """Validate the call's arguments into a :class:`RequestSpec` (no data is touched)."""
    prov = get_provider(provider)
    if not isinstance(model, str) or not model:
        raise LlmBatchError("model= must be a model name, e.g. model='gpt-4o-mini'")
    if extra_body is not None and not (
        isinstance(extra_body, dict) and all(isinstance(k, str) for k in extra_body)
    ):
        raise LlmBatchError(
            f"extra_body= must be a dict of body fields, e.g. {{'service_tier': 'flex'}}; got "
            f"{type(extra_body).__name__}"
        )
    if task not in ("generate", "embed"):
        raise LlmBatchError(f"task= must be 'generate' or 'embed', not {task!r}")
    if task == "embed" and output is not None:
        raise LlmBatchError("output= applies to generation; embeddings always give one vector")
    if task == "generate" and dimensions is not None:
        raise LlmBatchError("dimensions= applies to embeddings (task='embed') only")
    out: OutputSpec | None = parse_output(output) if task == "generate" else None
    system_const: str | None = None
    per_row = False
    if isinstance(system, str):
        system = Template.parse(system)
    if isinstance(system, pl.Expr):
        per_row = True
    elif isinstance(system, Template):
        if system.columns:
            per_row = True
        else:
            system_const = "".join(p for p in system.parts if isinstance(p, str))
    elif system is not None:
        raise LlmBatchError(
            f"system= must be a string, a template or a polars expression, not {type(system).__name__}"
        )
    spec = RequestSpec(
        provider=prov.name,
        model=model,
        task=task,
        output=out,
        system=system_const,
        system_per_row=per_row,
        options={k: v for k, v in (options or {}).items() if v is not None},
        dimensions=dimensions,
        api=api,
        extra_body=extra_body or {},
    )
    # Building the skeleton once validates every option against the model family now,
    # before any data is read.
    skeleton = prov.body(spec, ("system", "user") if per_row else ("user",))
    try:
        _json.dumps(skeleton)
    except (TypeError, ValueError) as exc:
        raise LlmBatchError(
            f"the request body is not JSON ({exc}); check extra_body= and options"
        ) from exc
    return spec, prov


def render_plan(
    schema: pl.Schema,
    prompt: str | pl.Expr | Template,
    *,
    provider: str | Provider,
    model: str,
    task: Task = "generate",
    output: Any = None,
    system: str | pl.Expr | None = None,
    id: str | None = None,
    on_null: OnNull = "skip",
    options: dict[str, Any] | None = None,
    dimensions: int | None = None,
    api: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> RenderPlan:
    """Validate a call against a frame's ``schema`` into the :class:`RenderPlan` that renders
    its rows (no data is touched).

    Example:
        >>> import polars as pl
        >>> plan = render_plan(pl.Schema({"body": pl.String}), "Say: {body}",
        ...                    provider="openai", model="gpt-4o-mini")
        >>> plan.key, plan.columns
        ('row_nr', ['body'])
    """
    spec, prov = build_spec(
        provider=provider,
        model=model,
        task=task,
        output=output,
        system=system,
        options=options,
        dimensions=dimensions,
        api=api,
        extra_body=extra_body,
    )
    if on_null not in ("skip", "empty", "error"):
        raise LlmBatchError(f"on_null= must be 'skip', 'empty' or 'error', not {on_null!r}")
    if id is not None and not isinstance(id, str):
        raise LlmBatchError(f"id= must be a column name, got {type(id).__name__}")
    if id is not None and id not in schema:
        raise LlmBatchError(
            f"id= names column {id!r}, which the frame does not have; the columns are "
            f"{list(schema.names())}"
        )
    if id in _RESERVED:
        raise LlmBatchError(
            f"id= column {id!r} has a name the request frames use themselves "
            f"({sorted(_RESERVED)}); rename it, e.g. df.rename({{{id!r}: 'key'}})"
        )
    fill = on_null == "empty"
    exprs = {"user": prompt_expr(prompt, schema, "prompt", fill_null=fill)}
    if spec.system_per_row:
        exprs["system"] = prompt_expr(system, schema, "system", fill_null=fill)  # type: ignore[arg-type]
    return make_plan(spec, prov, exprs, id=id, on_null=on_null)


def prepare(
    frame: pl.DataFrame | pl.LazyFrame,
    prompt: str | pl.Expr | Template,
    **call: Any,
) -> Prepared:
    """Render ``prompt`` for every row and build the unique requests (see :class:`Prepared`);
    ``call`` takes the arguments of :func:`render_plan`."""
    lazy = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    rplan = render_plan(lazy.collect_schema(), prompt, **call)
    return prepare_plan(lazy, rplan, prompt)


def prepare_plan(
    lazy: pl.LazyFrame, rplan: RenderPlan, prompt: str | pl.Expr | Template
) -> Prepared:
    """:func:`prepare` of a validated plan, in memory: the rows are rendered and hashed as
    :func:`.render.render` does, but deduplicated before the bodies are built."""
    spec, prov = rplan.spec, rplan.provider
    texts = rplan.text_columns
    internal = rplan.internal()
    key, id = rplan.key, rplan.id
    key_expr = pl.col(id) if id is not None else pl.int_range(pl.len(), dtype=pl.UInt64)
    rendered = lazy.select(
        key_expr.alias(key), *(e.alias(internal[n]) for n, e in rplan.texts.items())
    ).collect(engine="streaming")
    if id is not None:
        check_unique(rendered.lazy(), id)
    skipped = null_rows(rendered, [internal[n] for n in texts], rplan.on_null, key)
    if spec.task == "embed":
        check_not_empty(rendered, internal["user"], skipped, key)

    keys = request_ids(rendered, rplan.digest, [internal[n] for n in texts])
    rows = pl.DataFrame([rendered[key], keys.alias("custom_id"), skipped.alias("skipped")])
    # Deduplicate on the narrow (id, position) pair, then fetch each unique request's texts by
    # position: the long texts are copied once, not sorted along.
    first = (
        rows.lazy()
        .select("custom_id", pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), "skipped")
        .filter(~pl.col("skipped"))
        # A stable sort keeps each id's rows in input order, so "first" is the first row using it.
        .sort("custom_id", maintain_order=True)
        .unique("custom_id", keep="first", maintain_order=True)
        .select("custom_id", "row")
        .collect()
    )
    unique_texts = rendered.select(pl.col(internal[n]).gather(first["row"]).alias(n) for n in texts)
    del rendered
    body = _json.template(
        rplan.skeleton,
        {n: pl.col(n) for n in texts},
        escape_line_separators=_json.has_line_separators(unique_texts, texts),
    )
    # The streaming engine builds the bodies in morsels: faster here, and it never holds the
    # whole column of intermediate JSON at once (benchmarks/README.md).
    requests = (
        pl.concat([first, unique_texts], how="horizontal")
        .lazy()
        .select("custom_id", body.alias("body"), *texts, "row")
        .collect(engine="streaming")
    )
    return Prepared(
        spec=spec,
        provider=prov,
        key=key,
        rows=rows,
        requests=requests,
        row_ids=row_ids(rplan),
        prompt=prompt.source if isinstance(prompt, Template) else str(prompt),
    )


def row_ids(rplan: RenderPlan) -> RowIds:
    """How rows map to the requests ``rplan`` renders (for a result plan's join on them)."""
    internal = rplan.internal()
    return RowIds({internal[n]: e for n, e in rplan.texts.items()}, rplan.digest)


def check_unique(rows: pl.LazyFrame, id: str) -> None:
    """Refuse an ``id=`` column with nulls or repeats, naming them (streamed: a large frame
    is never held whole)."""
    stats = rows.select(pl.col(id).null_count().alias("nulls"), pl.len().alias("n")).collect(
        engine="streaming"
    )
    nulls = stats["nulls"][0]
    if nulls:
        first = (
            rows.with_row_index("__i__")
            .filter(pl.col(id).is_null())
            .select("__i__")
            .head(1)
            .collect(engine="streaming")
            .item()
        )
        raise LlmBatchError(
            f"id= column {id!r} has {nulls} null value(s), first at row {first}; every row "
            "needs a key: fill them, or leave id= out to key rows by position"
        )
    dupes = rows.group_by(id).len().filter(pl.col("len") > 1).collect(engine="streaming")
    if dupes.height:
        shown = dupes.sort(["len", id], descending=[True, False]).head(5)
        listing = ", ".join(f"{v!r} ({n} rows)" for v, n in shown.iter_rows())
        more = f" and {dupes.height - 5} more" if dupes.height > 5 else ""
        raise LlmBatchError(
            f"id= column {id!r} must be unique, but {dupes.height} value(s) repeat: "
            f"{listing}{more}; pick a unique key column or leave id= out to key rows by position"
        )
