"""A big Gemini batch file read, answered and written in columns.

The per-request path (:mod:`.gemini`) reads each line of an uploaded file into Python objects
at create and answers them one by one; for the files the library writes (one user text, an
optional system instruction, a schema and a cap) that is most of a 1M-row dry run. Here DuckDB
extracts each line's fields in one parse, polars answers them (:func:`columns.answers`) and
writes the result lines; anything else (other shapes, snake_case names, a refused model, a
line that is not JSON) goes the per-request way, which gives every error message.
"""

from __future__ import annotations

from typing import Any

import duckdb
import orjson
import polars as pl

from polars_llmbatch.emulator import columns, model, tokenizers

__all__ = ["answer_frame", "input_tokens", "parse_file", "response_json", "result_lines"]

# One extraction per line: the fields the model reads, and the names that must be absent
# for the columns to read the line as the per-request path does.
_PATHS = (
    "$.key",  # 1
    "$.request",  # 2
    "$.request.contents",  # 3
    "$.request.contents[0].role",  # 4
    "$.request.contents[0].parts",  # 5
    "$.request.contents[0].parts[0].text",  # 6
    "$.request.systemInstruction",  # 7
    "$.request.systemInstruction.parts",  # 8
    "$.request.systemInstruction.parts[0].text",  # 9
    "$.request.generationConfig",  # 10
    "$.request.generationConfig.responseJsonSchema",  # 11
    "$.request.generationConfig.maxOutputTokens",  # 12
    "$.request.system_instruction",  # 13
    "$.request.generation_config",  # 14
    "$.request.generationConfig.response_json_schema",  # 15
    "$.request.generationConfig.max_output_tokens",  # 16
)
_SQL = f"""
WITH f AS (SELECT n, json_extract(line, {list(_PATHS)}) AS v FROM lines)
SELECT n, list_transform(v, lambda x: json_type(x)) AS t,
    v[1]->>'$' AS key, json_array_length(v[3]) AS n_contents, v[4]->>'$' AS role,
    json_array_length(v[5]) AS n_parts, v[6]->>'$' AS user,
    json_array_length(v[8]) AS n_system, v[9]->>'$' AS system,
    v[11]::VARCHAR AS schema, (v[12]->>'$')::BIGINT AS cap
FROM f ORDER BY n
"""
#: What ``bytes.strip`` strips: a line of only these is skipped, as the per-request path does.
_BLANK = " \t\n\r\x0b\x0c"


def parse_file(data: bytes, model_name: str) -> pl.DataFrame | None:
    """The requests of an uploaded batch file in columns (key, user, system, schema as JSON
    text, cap), or None when the file needs the per-request reading. None is always safe;
    a frame only for files the per-request path takes whole and answers without an error."""
    if model.model_problem("gemini", model_name, embed=False) is not None:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    if "\r" in text:  # bytes.splitlines splits there too
        return None
    lines = (
        pl.DataFrame({"line": [text]})
        .select(pl.col("line").str.split("\n").explode())
        .filter(pl.col("line").str.strip_chars(_BLANK) != "")
        .with_row_index("n")
    )
    if lines.is_empty():
        return None
    con = duckdb.connect()
    try:
        con.register("lines", lines)
        r = con.sql(_SQL).pl()
    except duckdb.Error:  # a line that is not JSON (or a cap past int64): the per-request path
        return None
    finally:
        con.close()
    typed = columns.json_typed
    system_ok = pl.col("t").list.get(6).is_null() | (pl.col("t").list.get(6) == "NULL")
    system_ok = system_ok | (
        typed(7, "OBJECT") & typed(8, "ARRAY") & (pl.col("n_system") == 1) & typed(9, "VARCHAR")
    )
    clean = r.select(
        typed(1, "VARCHAR").all()
        & typed(2, "OBJECT").all()
        & typed(3, "ARRAY").all()
        & (pl.col("n_contents") == 1).all()
        & typed(4, "VARCHAR", absent=True).all()
        & (pl.col("role").fill_null("user") == "user").all()
        & typed(5, "ARRAY").all()
        & (pl.col("n_parts") == 1).all()
        & typed(6, "VARCHAR").all()
        & system_ok.all()
        & typed(10, "OBJECT", "NULL", absent=True).all()
        & typed(11, "OBJECT", "NULL", absent=True).all()
        & typed(12, "UBIGINT", "BIGINT", "NULL", absent=True).all()
        & pl.all_horizontal(pl.col("t").list.get(i).is_null() for i in range(12, 16)).all()
    ).item()
    if not clean:
        return None
    return r.select(
        "key",
        "user",
        pl.col("system").fill_null(""),
        pl.col("schema").replace("null", None),
        "cap",
    )


def _schema_text(schema: str) -> str:
    """A schema as the per-request path counts it (``orjson.dumps`` of the parsed object)."""
    return orjson.dumps(orjson.loads(schema)).decode()


def input_tokens(model_name: str, frame: pl.DataFrame) -> pl.Series:
    """Each request's prompt tokens, as :func:`.gemini.input_tokens` counts them: the user
    text, the system instruction and the response schema's JSON, each on its own."""
    fam = tokenizers.family("gemini", model_name)  # an empty text counts 0
    schemas = frame["schema"].drop_nulls().unique().to_list()
    schema_n = {s: fam.count(_schema_text(s)) for s in schemas}
    by_schema = frame["schema"].replace_strict(schema_n, default=0, return_dtype=pl.Int64)
    user = fam.count_series(frame["user"])
    system = fam.count_series(frame["system"], distinct=True)
    return (user + system + by_schema).cast(pl.Int64).rename("input_tokens")


def answer_frame(
    model_name: str, frame: pl.DataFrame, cache_read: float, inputs: pl.Series | None = None
) -> pl.DataFrame:
    """Every request answered: key, response (JSON text), input and output tokens."""
    inp = inputs if inputs is not None else input_tokens(model_name, frame)
    indexed = frame.with_row_index("i")
    parts = []
    for (key,), group in indexed.group_by("schema", maintain_order=True):
        schema = orjson.loads(key) if key is not None else None
        parts.append(group.select("i").hstack(columns.answers(group["user"], schema, group["cap"])))
    done = pl.concat(parts).sort("i").with_columns(inp=inp)
    return pl.DataFrame(
        {
            "key": frame["key"],
            "response": response_json(model_name, done, cache_read),
            "input_tokens": inp,
            "output_tokens": done["output_tokens"],
        }
    )


def response_json(model_name: str, done: pl.DataFrame, cache_read: float) -> pl.Series:
    """``GenerateContentResponse`` JSON for answered rows (text, cut, output_tokens, inp), as
    :func:`.gemini.respond` writes it."""
    inp, n_out = done["inp"], done["output_tokens"]
    cached = (inp * cache_read).floor().cast(pl.Int64)
    when = pl.when
    return columns.concat(
        [
            '{"candidates":[{"content":{"role":"model","parts":[{"text":',
            columns.json_strings(done["text"]),
            '}]},"finishReason":',
            done["cut"].replace_strict(
                {True: '"MAX_TOKENS"', False: '"STOP"'}, return_dtype=pl.String
            ),
            ',"index":0}],"usageMetadata":{"promptTokenCount":',
            inp.cast(pl.String),
            ',"totalTokenCount":',
            (inp + n_out).cast(pl.String),
            pl.select(
                when(cached > 0)
                .then(',"cachedContentTokenCount":' + cached.cast(pl.String))
                .otherwise(pl.lit(""))
            ).to_series(),
            pl.select(
                when(n_out > 0)
                .then(',"candidatesTokenCount":' + n_out.cast(pl.String))
                .otherwise(pl.lit(""))
            ).to_series(),
            '},"modelVersion":' + orjson.dumps(model_name).decode() + ',"responseId":"',
            columns.md5_hex(done["text"]).str.head(22),
            '"}',
        ],
        done.height,
    )


def result_lines(work: pl.DataFrame, ok: pl.Series, errored: pl.Series, error: Any) -> pl.DataFrame:
    """The responses file's lines (custom_id, line) of the requests that ran, in input order:
    a response where ``ok``, ``error`` (a JSON-able object) where ``errored``."""
    key = columns.json_strings(work["key"])
    failed = ',"error":' + orjson.dumps(error).decode() + "}"
    line = pl.select(
        pl.when(ok)
        .then('{"key":' + key + ',"response":' + work["response"] + "}")
        .otherwise('{"key":' + key + failed)
    ).to_series()
    ran = ok | errored
    return pl.DataFrame({"custom_id": work["key"].filter(ran), "line": line.filter(ran)})
