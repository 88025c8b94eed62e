"""Exceptions raised by polars_llmbatch.

Every error is raised before any request is sent or any money is spent, and its message names the
problem and the fix. None of them ever carries an API key.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceededError",
    "LlmBatchError",
    "RequestTooLargeError",
]


class LlmBatchError(ValueError):
    """Base class: bad input found before anything was sent (a template, an option, a column)."""


class RequestTooLargeError(LlmBatchError):
    """A single request can never be sent: over a provider's byte cap or over the model's context."""


class BudgetExceededError(LlmBatchError):
    """The worst-case cost of the job is over the caller's ``max_cost``."""
