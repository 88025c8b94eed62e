"""polars_llmbatch: one LLM answer (or embedding) per row of a Polars frame, at batch prices.

``import polars_llmbatch`` registers the ``.llm`` namespace on ``pl.DataFrame`` and ``pl.LazyFrame``::

    import polars as pl
    import polars_llmbatch

    df = pl.DataFrame({"body": ["I was charged twice", "The app crashes on login"]})
    est = df.llm.estimate("Classify this ticket: {body}", provider="openai",
                          model="gpt-4o-mini", output=["billing", "bug", "feature", "other"],
                          max_output_tokens=20)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from polars_llmbatch.collect.bill import reconcile_bill
from polars_llmbatch.collect.spend import spend
from polars_llmbatch.errors import BudgetExceededError, LlmBatchError, RequestTooLargeError
from polars_llmbatch.namespace import LlmNamespace, register
from polars_llmbatch.plan.estimate import Estimate
from polars_llmbatch.plan.template import Template
from polars_llmbatch.run.job import Job, JobStatus

__all__ = [
    "BudgetExceededError",
    "Estimate",
    "Job",
    "JobStatus",
    "LlmBatchError",
    "LlmNamespace",
    "RequestTooLargeError",
    "Template",
    "__version__",
    "reconcile_bill",
    "spend",
]

try:
    __version__ = version("polars_llmbatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

register()
