"""A realistic, deterministic sample: support tickets with duplicates, nulls, long and short texts.

Used by ``llmbatch sample``, the README's first command, the benchmarks and the tests.
"""

from __future__ import annotations

import polars as pl

__all__ = ["CATEGORIES", "tickets", "varied"]

CATEGORIES = ["billing", "bug", "feature", "other"]

_OPENERS = [
    "Hi team,",
    "Hello,",
    "Good morning,",
    "Hey there,",
    "Dear support,",
    "",
    "Urgent:",
    "Quick question -",
    "Bonjour,",
    "Hallo,",
]
_ISSUES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "my invoice #{n} shows the wrong VAT number",
        "the refund for order {n} never arrived on my card",
        "why did my {plan} plan renew at a higher price?",
        "I cancelled in {month} but you still billed me",
    ],
    "bug": [
        "the app crashes every time I open the {screen} screen",
        "exporting to CSV produces an empty file since version {v}",
        "login fails with error code {n} on Android",
        "the {screen} page takes over a minute to load",
        "notifications arrive twice, sometimes three times",
    ],
    "feature": [
        "could you add dark mode to the {screen} screen?",
        "please support exporting reports to Parquet",
        "it would be great to schedule reports every {month}",
        "we need single sign-on with our identity provider",
        "please let us tag tickets with custom colours",
    ],
    "other": [
        "how do I change the email address on my account?",
        "where can I find your security whitepaper?",
        "is there a discount for non-profits?",
        "thanks for the quick help last week!",
        "can I talk to someone about a partnership?",
    ],
}
_DETAILS = [
    "I already tried logging out and back in.",
    "This started after the last update.",
    "My colleague on the {plan} plan sees the same thing.",
    "Steps: open the app, go to {screen}, tap save. Expected: saved. Actual: spinner forever.",
    "Our team of {n} people depends on this every day, so please treat it as a priority.",
    "Attached is a screenshot (see below) — the totals don't match what the dashboard says.",
    "日本語のサポートはありますか？",
    "Merci d'avance pour votre aide.",
    "Order reference: ORD-{n}-{v}.",
    'The error says: "Unexpected token < in JSON at position 0".',
]
_CLOSERS = ["Thanks,", "Best regards", "Cheers", "", "Kind regards, Alex", "— sent from my phone"]


def tickets(
    n: int = 20_000, *, seed: int = 0, duplicates: float = 0.2, nulls: float = 0.01
) -> pl.DataFrame:
    """``n`` synthetic support tickets: ``ticket_id``, ``customer``, ``created``, ``body``.

    About ``duplicates`` of the bodies repeat an earlier one (templated mails, re-sent tickets)
    and ``nulls`` are empty (null ``body``). Lengths run from one line to a dozen sentences.

    Example:
        >>> df = tickets(1_000)
        >>> df.columns
        ['ticket_id', 'customer', 'created', 'body']
        >>> df.height, df["body"].null_count() > 0
        (1000, True)
    """
    ids = pl.int_range(n, eager=True).alias("i")
    frame = pl.DataFrame({"i": ids}).with_columns(
        h=pl.col("i").hash(
            seed
        ),  # within one run only: the sample need not be stable across versions
    )

    # Derive every choice from the row's hash, vectorised: no Python loop over rows.
    def pick(options: list[str], salt: int) -> pl.Expr:
        idx = ((pl.col("h") // (salt * 7919 + 1)) % len(options)).cast(pl.UInt32)
        return pl.lit(pl.Series(options)).gather(idx)

    cat_names = list(_ISSUES)
    issues = [s for c in cat_names for s in _ISSUES[c]]
    n_details = ((pl.col("h") // 104729) % 13).cast(pl.Int32) - 2  # -2..10: many short tickets
    details = pl.concat_str(
        [
            pl.when(n_details > k).then(pick(_DETAILS, 11 + k)).otherwise(pl.lit(""))
            for k in range(10)
        ],
        separator=" ",
    ).str.replace_all(r"\s+", " ")
    body = pl.concat_str(
        [
            pick(_OPENERS, 2),
            pl.concat_str(pick(issues, 3), pl.lit(".")),
            details,
            pl.format("(account {})", (pl.col("h") // 43) % 1_000_000),
            pick(_CLOSERS, 5),
        ],
        separator=" ",
    ).str.strip_chars()
    body = (
        body.str.replace_all(
            "{plan}", pick(["Pro", "Team", "Enterprise", "Starter"], 17), literal=True
        )
        .str.replace_all(
            "{screen}", pick(["settings", "dashboard", "billing", "reports"], 19), literal=True
        )
        .str.replace_all("{month}", pick(["January", "March", "June", "October"], 23), literal=True)
        .str.replace_all(
            "{n}", ((pl.col("h") // 31) % 90_000 + 10_000).cast(pl.String), literal=True
        )
        .str.replace_all(
            "{v}",
            pl.format("{}.{}", (pl.col("h") // 37) % 9 + 1, (pl.col("h") // 41) % 20),
            literal=True,
        )
    )
    frame = frame.with_columns(body=body)
    # Duplicates: a share of rows copy the body of an earlier row.
    u = (pl.col("h") % 10_000).cast(pl.Float64) / 10_000
    src = ((pl.col("h") // 7) % pl.max_horizontal(pl.col("i"), 1)).cast(pl.Int64)
    frame = frame.with_columns(
        body=pl.when((u < duplicates) & (pl.col("i") > 0))
        .then(pl.col("body").gather(src))
        .otherwise(pl.col("body"))
    )
    v = ((pl.col("h") // 13) % 10_000).cast(pl.Float64) / 10_000
    frame = frame.with_columns(body=pl.when(v < nulls).then(None).otherwise(pl.col("body")))
    return frame.select(
        pl.format("T-{}", pl.col("i") + 100_000).alias("ticket_id"),
        pl.format("cust-{}", (pl.col("h") // 3) % 5_000).alias("customer"),
        (pl.date(2026, 1, 1) + pl.duration(days=(pl.col("h") // 5) % 300)).alias("created"),
        "body",
    )


_PROSE = [
    "the",
    "quick",
    "report",
    "shows",
    "that",
    "customers",
    "who",
    "wait",
    "longer",
    "than",
    "a",
    "day",
    "for",
    "an",
    "answer",
    "are",
    "far",
    "less",
    "likely",
    "to",
    "renew",
    "their",
    "plan",
    "and",
    "often",
    "tell",
    "their",
    "colleagues",
    "about",
    "it",
    "while",
    "teams",
    "that",
    "answer",
    "within",
    "the",
    "hour",
    "keep",
    "almost",
    "everyone",
    "through",
    "the",
    "next",
    "quarter",
]
_CODE = [
    "def total(items):\n    return sum(i.price * i.qty for i in items)\n",
    "for row in rows:\n    if row['status'] == 'failed':\n        retry(row)\n",
    "SELECT customer_id, SUM(amount) FROM payments\nWHERE paid_at > NOW() - INTERVAL '7 days'\nGROUP BY 1;\n",
    "const res = await fetch(url, { method: 'POST', body: JSON.stringify(data) });\n",
]
_CJK = [
    "請求書の金額が間違っています",
    "应用程序在登录时崩溃",
    "환불이 아직 도착하지 않았습니다",
    "配送状況を確認したい",
]


def varied(n: int = 10_000, *, seed: int = 0) -> pl.DataFrame:
    """``n`` texts of five kinds that tokenizers count very differently: English ``prose``,
    ``code``, ``numbers`` (transaction lines), ``cjk`` and ``json``; columns ``kind`` and
    ``text``, lengths from a few words to a few hundred. For calibration tests and benchmarks.

    Example:
        >>> df = varied(1_000)
        >>> sorted(df["kind"].unique().to_list())
        ['cjk', 'code', 'json', 'numbers', 'prose']
    """
    import random

    rng = random.Random(seed)
    kinds, texts = [], []
    for i in range(n):
        kind = ("prose", "code", "numbers", "cjk", "json")[rng.randrange(5)]
        size = rng.choice((1, 2, 4, 8, 16))
        if kind == "prose":
            words = [rng.choice(_PROSE) for _ in range(6 * size)]
            text = " ".join(words).capitalize() + "."
        elif kind == "code":
            text = "".join(rng.choice(_CODE) for _ in range(size))
        elif kind == "numbers":
            text = "\n".join(
                f"{rng.randrange(2020, 2027)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                f"TXN{rng.randrange(10**8):08d} {rng.choice(['CARD', 'SEPA', 'ACH'])} "
                f"{rng.randrange(1, 10**6) / 100:.2f} EUR"
                for _ in range(size)
            )
        elif kind == "cjk":
            text = "。".join(rng.choice(_CJK) for _ in range(2 * size)) + "。"
        else:
            text = (
                "["
                + ",".join(
                    f'{{"id":{rng.randrange(10**6)},"sku":"SKU-{rng.randrange(10**4):04d}",'
                    f'"qty":{rng.randrange(1, 9)},"note":"{rng.choice(_PROSE)} {rng.choice(_PROSE)}"}}'
                    for _ in range(size)
                )
                + "]"
            )
        kinds.append(kind)
        texts.append(f"{text} #{i}")  # every text unique: no request is deduplicated away
    return pl.DataFrame({"kind": kinds, "text": texts})
