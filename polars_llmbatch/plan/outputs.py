"""Output specs: what the caller asked for (`output=`) as a JSON schema plus the polars columns it fills.

- ``"label"`` (a column name): free text into a String column.
- ``["billing", "bug", ...]`` or a ``pl.Enum``: a strict JSON-schema enum → an Enum column ``label``.
- ``{"field": dtype, ...}`` or a pydantic model: a JSON schema object → one typed column per field.

Every schema has an object at its root (OpenAI's strict mode requires it), so each provider encodes
the same schema its own way and parsing is the same for all.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from polars_llmbatch.errors import LlmBatchError

__all__ = ["DEFAULT_OUTPUT", "OutputSpec", "parse_output"]

DEFAULT_OUTPUT = "label"


@dataclass(frozen=True)
class OutputSpec:
    """A parsed ``output=`` argument.

    Example:
        >>> spec = parse_output(["billing", "bug"])
        >>> spec.kind, spec.columns
        ('enum', {'label': Enum(categories=['billing', 'bug'])})
        >>> spec.schema["properties"]["label"]
        {'type': 'string', 'enum': ['billing', 'bug']}
    """

    kind: Literal["text", "enum", "struct"]
    columns: dict[str, pl.DataType]
    schema: dict[str, Any] | None = None
    strict: bool = True
    name: str = "output"  # the schema's name where a provider wants one
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def structured(self) -> bool:
        return self.schema is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form for the job spec (and its hash)."""
        return {
            "kind": self.kind,
            "columns": {k: str(v) for k, v in self.columns.items()},
            "schema": self.schema,
            "strict": self.strict,
            "name": self.name,
        }

    def dtypes_blob(self) -> str:
        """The exact polars dtypes (Enum categories, nested fields) as base64 Arrow IPC, so a
        job reopened from its checkpoint decodes into the same columns."""
        buf = io.BytesIO()
        pl.DataFrame(schema=self.columns).write_ipc(buf)
        return base64.b64encode(buf.getvalue()).decode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], dtypes_blob: str) -> OutputSpec:
        """The inverse of :meth:`to_dict` plus :meth:`dtypes_blob`."""
        columns = dict(pl.read_ipc(io.BytesIO(base64.b64decode(dtypes_blob))).schema)
        return cls(d["kind"], columns, d["schema"], d["strict"], d.get("name", "output"))


def parse_output(output: Any = None) -> OutputSpec:
    """Turn an ``output=`` argument into an :class:`OutputSpec`; a clear error for anything else."""
    if output is None:
        output = DEFAULT_OUTPUT
    if isinstance(output, str):
        if not output:
            raise LlmBatchError("output= must be a non-empty column name, e.g. output='label'")
        return OutputSpec("text", {output: pl.String()})
    if isinstance(output, pl.Enum) or (isinstance(output, type) and output is pl.Enum):
        categories = list(output.categories) if isinstance(output, pl.Enum) else []
        return _enum_spec(DEFAULT_OUTPUT, categories)
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        return _enum_spec(DEFAULT_OUTPUT, list(output))
    if isinstance(output, Mapping):
        if not output:
            raise LlmBatchError(
                "output= mapping is empty; give at least one field: {'score': pl.Int64}"
            )
        props: dict[str, Any] = {}
        columns: dict[str, pl.DataType] = {}
        for name, dtype in output.items():
            if not isinstance(name, str) or not name:
                raise LlmBatchError(f"output= field names must be non-empty strings, got {name!r}")
            dt = _as_dtype(dtype, name)
            props[name] = dtype_schema(dt, name)
            columns[name] = dt
        schema = _object(props)
        return OutputSpec("struct", columns, schema)
    if _is_pydantic_model(output):
        return _pydantic_spec(output)
    raise LlmBatchError(
        "output= must be a column name (free text), a list of categories or a pl.Enum, a mapping "
        f"of field → polars dtype, or a pydantic model; got {type(output).__name__}"
    )


def _enum_spec(name: str, categories: list[Any]) -> OutputSpec:
    if len(categories) < 2:
        raise LlmBatchError(
            f"output= categories {categories!r}: give at least two, e.g. ['yes', 'no'] (one "
            "category is no choice; for free text pass a column name, e.g. output='label')"
        )
    bad = [c for c in categories if not isinstance(c, str) or not c]
    if bad:
        raise LlmBatchError(f"output= categories must be non-empty strings; these are not: {bad}")
    dupes = sorted({c for c in categories if categories.count(c) > 1})
    if dupes:
        raise LlmBatchError(f"output= categories must be unique; repeated: {dupes}")
    dt = pl.Enum(categories)
    return OutputSpec("enum", {name: dt}, _object({name: dtype_schema(dt, name)}))


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


_PY_TYPES: dict[type, pl.DataType] = {
    str: pl.String(),
    int: pl.Int64(),
    float: pl.Float64(),
    bool: pl.Boolean(),
}


def _as_dtype(dtype: Any, name: str) -> pl.DataType:
    if isinstance(dtype, type) and dtype in _PY_TYPES:
        return _PY_TYPES[dtype]
    if isinstance(dtype, (list, tuple)):
        return pl.Enum(list(dtype))
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if isinstance(dtype, pl.DataType):
        return dtype
    raise LlmBatchError(
        f"output= field {name!r}: {dtype!r} is not a polars dtype; use e.g. pl.String, pl.Int64, "
        "pl.Float64, pl.Boolean, pl.Enum([...]), pl.List(pl.String) or pl.Struct({...})"
    )


def dtype_schema(dt: pl.DataType, name: str) -> dict[str, Any]:
    """The JSON schema of one polars dtype (strict-mode compatible)."""
    if isinstance(dt, pl.Enum):
        cats = list(dt.categories)
        if not cats:
            raise LlmBatchError(f"output= field {name!r}: pl.Enum needs categories")
        return {"type": "string", "enum": cats}
    if dt in (pl.String, pl.Categorical) or isinstance(dt, pl.Categorical):
        return {"type": "string"}
    if dt.is_integer():
        return {"type": "integer"}
    if dt.is_float() or dt.is_decimal():
        return {"type": "number"}
    if dt == pl.Boolean:
        return {"type": "boolean"}
    if dt == pl.Date:
        return {"type": "string", "format": "date"}
    if isinstance(dt, pl.Datetime):
        return {"type": "string", "format": "date-time"}
    if isinstance(dt, (pl.List, pl.Array)):
        return {"type": "array", "items": dtype_schema(dt.inner, name)}
    if isinstance(dt, pl.Struct):
        return _object({f.name: dtype_schema(f.dtype, f"{name}.{f.name}") for f in dt.fields})
    raise LlmBatchError(
        f"output= field {name!r}: polars dtype {dt} has no JSON-schema form; use a string, number, "
        "boolean, date, Enum, List or Struct type"
    )


def _is_pydantic_model(obj: Any) -> bool:
    return (
        isinstance(obj, type) and hasattr(obj, "model_json_schema") and hasattr(obj, "model_fields")
    )


def _pydantic_spec(model: type) -> OutputSpec:
    schema = copy.deepcopy(model.model_json_schema())  # type: ignore[attr-defined]
    strict = _normalise(schema)
    defs = schema.get("$defs", {})
    if schema.get("type") != "object" or "properties" not in schema:
        raise LlmBatchError(f"output= pydantic model {model.__name__} must have fields")
    columns = {k: schema_dtype(v, defs) for k, v in schema["properties"].items()}
    return OutputSpec("struct", columns, schema, strict=strict, name=model.__name__)


# Keywords whose value is a schema, a list of schemas, or a name → schema mapping. Walking only
# these (never a ``properties`` mapping's keys) keeps fields named "title" or "default" intact.
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED_SUBSCHEMAS = ("properties", "$defs", "definitions", "patternProperties")


def _normalise(node: Any) -> bool:
    """Close every object (additionalProperties: false), drop titles and defaults; say whether
    the schema fits OpenAI's strict mode (every field required, no defaults)."""
    if not isinstance(node, dict):
        return True
    strict = True
    node.pop("title", None)
    if "default" in node:
        node.pop("default")
        strict = False
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
        if set(node.get("required", [])) != set(node["properties"]):
            strict = False  # optional fields: strict mode needs every field required
    for key in _SUBSCHEMA:
        if isinstance(node.get(key), dict):
            strict = _normalise(node[key]) and strict
    for key in _SUBSCHEMAS:
        for sub in node.get(key, []):
            strict = _normalise(sub) and strict
    for key in _NAMED_SUBSCHEMAS:
        for sub in node.get(key, {}).values():
            strict = _normalise(sub) and strict
    return strict


def schema_dtype(node: dict[str, Any], defs: dict[str, Any]) -> pl.DataType:
    """The polars dtype a JSON-schema node parses into (String for anything without a typed form)."""
    if "$ref" in node:
        return schema_dtype(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if o.get("type") != "null"]
            return schema_dtype(options[0], defs) if len(options) == 1 else pl.String()
    if "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        return pl.Enum(node["enum"])
    t = node.get("type")
    if t == "string":
        fmt = node.get("format")
        return (
            pl.Date() if fmt == "date" else pl.Datetime("us") if fmt == "date-time" else pl.String()
        )
    if t == "integer":
        return pl.Int64()
    if t == "number":
        return pl.Float64()
    if t == "boolean":
        return pl.Boolean()
    if t == "array":
        return pl.List(schema_dtype(node.get("items", {}), defs))
    if t == "object" and "properties" in node:
        return pl.Struct({k: schema_dtype(v, defs) for k, v in node["properties"].items()})
    return pl.String()
