"""Durable writes: what is on disk after ``fsync`` survives a crash or a power cut."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["fsync"]


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory to make its renames durable) to disk."""
    if sys.platform == "win32" and path.is_dir():  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
