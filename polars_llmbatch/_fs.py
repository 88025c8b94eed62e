"""Durable writes (what is on disk after ``fsync`` survives a crash or a power cut) and the
OS's file locks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["fsync", "lock_fd"]


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory to make its renames durable) to disk.

    POSIX flushes through any descriptor, so files are opened read-only (they may be
    read-only to us). Windows needs a handle open for writing (``os.fsync`` is
    ``_commit`` there) and cannot open a directory at all: its renames are made durable by
    the file system's own journal, so directories are skipped.
    """
    windows = sys.platform == "win32"
    if windows and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if windows else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_fd(fd: int, *, blocking: bool = False) -> None:
    """Take the OS's exclusive lock on ``fd`` (released when it is closed, or the process
    dies); without ``blocking``, OSError when another holds it."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
