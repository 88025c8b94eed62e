"""One partition of rows → its request rows: a pure function of (plan, Arrow batch).

:func:`render` is what streaming preparation runs on every batch of a frame too large to hold,
and what another engine (Ray Data ``map_batches``, Spark ``mapInArrow``; docs/scale-out.md)
would run on its own partitions: it reads nothing but its arguments, writes nothing, and
gives every row the same ``custom_id`` and body bytes wherever and in whatever batch it runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import polars as pl
import pyarrow as pa

from polars_llmbatch import _json
from polars_llmbatch.errors import LlmBatchError
from polars_llmbatch.plan.spec import RequestSpec
from polars_llmbatch.providers import Provider, get_provider

__all__ = ["ROW_NR", "RenderPlan", "render"]

#: The row key column when the caller gives no ``id=``: the row's position in the input frame.
ROW_NR = "row_nr"
#: Rendered texts while rows are processed: a name no user column has.
INTERNAL = "__llmbatch_{}__"

OnNull = Literal["skip", "empty", "error"]


@dataclass(frozen=True)
class RenderPlan:
    """Everything a partition needs to render its rows: the spec, the text expressions, the
    row key and the body skeleton. Plain data and polars expressions, so it pickles to a
    worker process or another machine.

    ``texts`` maps ``"user"`` (and ``"system"`` when per row) to an expression over the input
    columns; ``id`` is the caller's key column (``None``: rows are keyed by position).
    """

    spec: RequestSpec
    texts: dict[str, pl.Expr]
    id: str | None
    on_null: OnNull
    skeleton: dict[str, Any]
    digest: str

    @property
    def key(self) -> str:
        """The row key column of the request rows."""
        return self.id if self.id is not None else ROW_NR

    @property
    def provider(self) -> Provider:
        return get_provider(self.spec.provider)

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(self.texts)

    @property
    def columns(self) -> list[str]:
        """The input columns rendering reads (project the scan to these)."""
        names: list[str] = [self.id] if self.id is not None else []
        for e in self.texts.values():
            names += [n for n in e.meta.root_names() if n not in names]
        return names

    def body(self, texts: pl.DataFrame) -> pl.Expr:
        """The exact JSON body over ``texts`` (columns named as :attr:`text_columns`)."""
        return _json.template(
            self.skeleton,
            {n: pl.col(n) for n in self.texts},
            # the escape is a full pass: only when a text holds a line separator
            escape_line_separators=_json.has_line_separators(texts, self.texts),
        )

    def body_length(self, texts: pl.DataFrame) -> pl.Expr:
        """The length in bytes of :meth:`body` over ``texts``, without building the bodies."""
        return _json.template_length(
            self.skeleton,
            {n: pl.col(n) for n in self.texts},
            escape_line_separators=_json.has_line_separators(texts, self.texts),
        )

    def output(self, name: str) -> str:
        """The name :func:`render` gives its column ``name`` (``row``, a text): ``name``, unless
        the row key is called that (``id="user"``), when it is ``__llmbatch_<name>__``."""
        return INTERNAL.format(name) if name == self.key else name

    def internal(self) -> dict[str, str]:
        """Rendered text column names that never collide with the key column."""
        return {n: INTERNAL.format(n) for n in self.texts}


def make_plan(
    spec: RequestSpec,
    provider: Provider,
    texts: dict[str, pl.Expr],
    *,
    id: str | None,
    on_null: OnNull,
) -> RenderPlan:
    """The :class:`RenderPlan` of a validated spec and its text expressions."""
    skeleton = provider.body(spec, tuple(texts))
    return RenderPlan(
        spec=spec,
        texts=texts,
        id=id,
        on_null=on_null,
        skeleton=skeleton,
        digest=request_digest(provider, spec, skeleton),
    )


def render(
    plan: RenderPlan,
    batch: pa.RecordBatch | pa.Table | pl.DataFrame,
    *,
    offset: int = 0,
    bodies: bool = True,
) -> pl.DataFrame:
    """The request row of every row of ``batch``, in its order: the row key, ``custom_id``
    (null: skipped), ``row`` (the row's position in the whole input: ``offset`` plus its place
    in the batch), ``skipped``, ``body`` (the exact JSON body; null when skipped) and the
    rendered texts (``user``, and ``system`` when per row). A column the row key's name would
    take is called ``__llmbatch_<name>__`` instead (:meth:`RenderPlan.output`).

    ``offset`` is the position of the batch's first row in the whole input; without ``id=``
    it is also the row key, so a partition must know where it starts. Rows that render to
    null are checked here as ``on_null`` says (``"error"`` raises, naming the row), and an
    empty text to embed is refused, since those APIs reject it. ``bodies=False`` leaves the
    body out, for a caller that builds it once per unique request (:meth:`RenderPlan.body`).

    Example:
        >>> import polars as pl
        >>> from polars_llmbatch.plan.requests import render_plan
        >>> df = pl.DataFrame({"body": ["hi", None, "hi"]})
        >>> plan = render_plan(df.schema, "Say: {body}", provider="openai", model="gpt-4o-mini")
        >>> out = render(plan, df.to_arrow(), offset=100)
        >>> out["row_nr"].to_list(), out["skipped"].to_list(), out["custom_id"].n_unique()
        ([100, 101, 102], [False, True, False], 2)
    """
    frame = batch if isinstance(batch, pl.DataFrame) else pl.DataFrame(pl.from_arrow(batch))
    internal = plan.internal()
    key = plan.key
    key_expr = (
        pl.col(plan.id)
        if plan.id is not None
        else (pl.int_range(pl.len(), dtype=pl.UInt64) + offset).alias(key)
    )
    rendered = frame.select(
        key_expr.alias(key), *(e.alias(internal[n]) for n, e in plan.texts.items())
    )
    columns = [internal[n] for n in plan.texts]
    # a batch knows only its own rows: the count names them
    among = f" among rows {offset:,}-{offset + rendered.height - 1:,}"
    skipped = null_rows(rendered, columns, plan.on_null, key, offset, among)
    if plan.spec.task == "embed":
        check_not_empty(rendered, internal["user"], skipped, key, offset, among)
    ids = request_ids(rendered, plan.digest, columns)
    texts = rendered.select(pl.col(internal[n]).alias(n) for n in plan.texts)
    named = {n: plan.output(n) for n in plan.texts}
    out = pl.DataFrame(
        [
            rendered[key],
            ids.alias("custom_id"),
            pl.int_range(offset, offset + rendered.height, dtype=pl.UInt64, eager=True).alias(
                plan.output("row")
            ),
            skipped.alias("skipped"),
        ]
    )
    if not bodies:
        return out.hstack(texts.rename(named))
    body = pl.when(~skipped).then(plan.body(texts)).alias("body")
    return out.hstack(texts.select(body, *plan.texts).rename(named))


def request_digest(provider: Provider, spec: RequestSpec, skeleton: dict[str, Any]) -> str:
    """SHA-256 of what every request of the job shares: the provider, the endpoint and the body
    skeleton (the exact body with placeholders where the per-row texts go)."""
    shared = {"provider": provider.name, "endpoint": provider.endpoint(spec), "body": skeleton}
    return hashlib.sha256(_json.dumps(shared).encode()).hexdigest()


def request_ids(rendered: pl.DataFrame, digest: str, columns: list[str]) -> pl.Series:
    """``custom_id``: the MD5 hex digest of the request's canonical text, which is the shared
    digest, then each per-row text length-prefixed (so no two inputs share one string).

    This is a content hash of the body (skeleton + texts) that does not depend on how JSON
    escapes the texts. DuckDB hashes the column vectorised; a null text gives a null id.
    """
    canonical = " || ".join(f'chr(31) || strlen("{c}")::VARCHAR || \':\' || "{c}"' for c in columns)
    sql = f"SELECT md5('{digest}' || {canonical}) AS custom_id FROM rendered"
    with duckdb.connect() as con:
        con.register("rendered", rendered.select(columns))
        return con.sql(sql).pl().to_series()


def null_rows(
    frame: pl.DataFrame,
    texts: list[str],
    on_null: OnNull,
    key: str,
    offset: int = 0,
    among: str = "",
) -> pl.Series:
    """Which rows render to null (skipped); with ``on_null="empty"`` none do."""
    skipped = frame.select(pl.any_horizontal(pl.col(t).is_null() for t in texts)).to_series()
    if on_null == "error" and skipped.any():
        first = int(skipped.arg_true()[0])
        raise LlmBatchError(
            f"{skipped.sum()} row(s){among} render to null (a referenced value is null), first at row "
            f"{first + offset} ({key}={frame[key][first]!r}); fill the nulls, or pass "
            "on_null='skip' to skip those rows or on_null='empty' to render nulls as empty text"
        )
    return skipped


def check_not_empty(
    frame: pl.DataFrame,
    text: str,
    skipped: pl.Series,
    key: str,
    offset: int = 0,
    among: str = "",
) -> None:
    """Embedding APIs reject empty input: refuse it now, naming the first row."""
    empty = (frame[text].str.len_bytes() == 0) & ~skipped
    if empty.any():
        first = int(empty.arg_true()[0])
        raise LlmBatchError(
            f"{empty.sum()} row(s){among} render to empty text, which embedding APIs reject, first at "
            f"row {first + offset} ({key}={frame[key][first]!r}); filter them out first, e.g. "
            "df.filter(pl.col('text').str.len_chars() > 0)"
        )
