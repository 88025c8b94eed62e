"""JSON-schema validation of structured answers: which validator, at what cost per million.

Every structured answer is checked against the schema that was sent (issue: types, enums,
nested fields, ``minimum``/``maximum`` from pydantic ``Field(ge=, le=)``). This measures the
candidates on the same 1M answers, in one process, medians of ``--repeat`` runs:

- floor: ``orjson.loads`` of every answer (the decode any validator needs first);
- ``jsonschema_rs`` (Rust) ``is_valid`` on the decoded objects;
- ``fastjsonschema`` (generated Python) on the decoded objects;
- ``jsonschema`` (pure Python, the reference implementation), on a 20k sample, scaled.

Run: ``python benchmarks/bench_validate.py --rows 1000000 --repeat 3``
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson

SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "bug", "feature", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "summary": {"type": "string"},
    },
    "required": ["category", "urgency", "tags", "customer", "summary"],
    "additionalProperties": False,
}


def answers(n: int) -> list[bytes]:
    cats = ["billing", "bug", "feature", "other", "refund"]  # 1 in 5 outside the enum
    return [
        orjson.dumps(
            {
                "category": cats[i % 5],
                "urgency": i % 7,  # 0 and 6 are out of range
                "tags": ["a", "b"],
                "customer": {"name": f"c{i}", "vip": i % 2 == 0},
                "summary": f"summary of ticket {i} " * 3,
            }
        )
        for i in range(n)
    ]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import fastjsonschema
    import jsonschema
    import jsonschema_rs

    texts = answers(args.rows)
    rs = jsonschema_rs.validator_for(SCHEMA)
    fast = fastjsonschema.compile(SCHEMA)

    def fast_ok(obj: object) -> bool:
        try:
            fast(obj)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    results: dict[str, list[float]] = {"floor": [], "jsonschema_rs": [], "fastjsonschema": []}
    valid = {}
    for _ in range(args.repeat):
        seconds, objs = timed(lambda: [orjson.loads(t) for t in texts])
        results["floor"].append(seconds)
        seconds, valid["rs"] = timed(lambda objs=objs: [rs.is_valid(o) for o in objs])
        results["jsonschema_rs"].append(seconds)
        seconds, valid["fast"] = timed(lambda objs=objs: [fast_ok(o) for o in objs])
        results["fastjsonschema"].append(seconds)
    assert valid["rs"] == valid["fast"]
    sample = [orjson.loads(t) for t in texts[:20_000]]
    ref = jsonschema.Draft202012Validator(SCHEMA)
    seconds, ref_valid = timed(lambda: [ref.is_valid(o) for o in sample])
    assert ref_valid == valid["rs"][:20_000]
    floor = statistics.median(results["floor"])
    print(f"{args.rows:,} answers, {sum(valid['rs']):,} valid; medians of {args.repeat}")
    print(f"  floor (orjson.loads)       {floor:6.2f} s")
    for name in ("jsonschema_rs", "fastjsonschema"):
        m = statistics.median(results[name])
        print(f"  {name:<26} {m:6.2f} s  ({m / floor:.2f}x the floor)")
    scaled = seconds * args.rows / 20_000
    print(f"  jsonschema (20k, scaled)   {scaled:6.2f} s  ({scaled / floor:.2f}x the floor)")


if __name__ == "__main__":
    main()
