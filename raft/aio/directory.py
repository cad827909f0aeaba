"""The storage directory itself: created with its name durable, locked for one process at a time.

A file's data is durable after its fsync, its name after the fsync of the directory holding it:
a directory created for the log is synced in its parent (and each new parent in its own) before
anything is written in it, or a power loss could forget the directory and all the log it held.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .storage_errors import StorageError


def fsync_path(directory: Path) -> None:
    """fsync a directory by its path (to make the names created in it durable)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_locked(directory: Path) -> int:
    """Create ``directory`` (0700, parents too) with durable names if it is missing, take its
    ``LOCK`` (an exclusive flock) and return that file's descriptor; ``StorageError`` if another
    process holds it or the directory cannot be made."""
    try:
        created = [d for d in (directory, *directory.parents) if not d.exists()]
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in created:  # each new name, synced in its parent
            fsync_path(d.parent)
        lock_fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open data directory {directory}: {exc}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        raise StorageError(f"data directory {directory} is in use by another process") from None
    return lock_fd
