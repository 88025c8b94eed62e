"""Checks of the run options, made before anything is read, written or sent: each names the
option, what it got and what it takes."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from polars_llmbatch.errors import LlmBatchError

__all__ = ["check_bool", "check_checkpoint", "check_positive_int", "check_seconds"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: What ``Path`` makes of a URL (``s3:/bucket``); two letters at least, so ``C:/`` is a drive.
_COLLAPSED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/[^/]")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmBatchError(f"{name}= must be a positive integer, got {value!r}")


def check_seconds(name: str, value: Any, *, zero: bool = False, none: bool = False) -> None:
    """A finite number of seconds, > 0 (or ≥ 0 with ``zero``; None allowed with ``none``)."""
    if value is None and none:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
    )
    if not ok:
        bound = "≥ 0" if zero else "> 0"
        raise LlmBatchError(f"{name}= must be a finite number of seconds {bound}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise LlmBatchError(f"{name}= must be True or False, got {value!r}")


def check_checkpoint(checkpoint: Any) -> None:
    """A local folder, or an object store's URL (``s3://bucket/prefix``): any other URL would
    silently become a local folder named ``ftp:``, and a file cannot hold a job."""
    if checkpoint is None:
        return
    if not isinstance(checkpoint, (str, Path)):
        raise LlmBatchError(f"checkpoint= must be a folder path, got {type(checkpoint).__name__}")
    if isinstance(checkpoint, Path) and _COLLAPSED_URL.match(str(checkpoint)):
        # Path("s3://b/p") is "s3:/b/p": a local folder named "s3:" would hold the job
        raise LlmBatchError(
            f"checkpoint={str(checkpoint)!r} looks like a URL made into a Path, which drops one "
            "of its slashes; pass the URL as a string (checkpoint='s3://bucket/prefix')"
        )
    if _URL.match(str(checkpoint)):
        from polars_llmbatch.run.store import check_url

        check_url(str(checkpoint))  # an object store's, or a clear error
        return
    if Path(checkpoint).exists() and not Path(checkpoint).is_dir():
        raise LlmBatchError(
            f"checkpoint={str(checkpoint)!r} is a file; a checkpoint is a folder: name a new "
            "or empty folder"
        )
