"""The exceptions of the node's on-disk storage: the log (``storage.py``), its WAL segment files
(``wal.py``) and its snapshot files (``snapshots.py``).

``quorumd.raft.aio.storage`` re-exports every one of them; other code imports them from there.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..core.ready import RaftError


class StorageError(RaftError):
    """A storage operation failed or was asked to break the log's invariants."""


class StorageTransientError(StorageError):
    """Out of file descriptors (EMFILE/ENFILE) while opening a file: nothing was changed; the
    same call may be retried later (the caller backs off)."""


TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFullError(StorageTransientError):
    """No space left (ENOSPC/EDQUOT) for a write or a new file: nothing was changed (a partial
    append is cut off again, a partial snapshot file removed); the same call works once space
    is free. ``path``: the file; ``free``: bytes available in its file system then (-1: unknown)."""

    def __init__(self, path: Path, free: int) -> None:
        super().__init__(f"disk full: {path}: free={free}")
        self.path, self.free = path, free


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use in the file system of ``path`` (-1: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class StorageCorruptError(StorageError):
    """The data on disk is corrupt beyond a torn tail; the node must not start on it."""


class StorageFormatError(StorageError):
    """A file written in a newer format than this build reads (a newer build's data dir)."""

    def __init__(self, path: Path, found: int, known: int, what: str) -> None:
        super().__init__(
            f"{path} is in {what} format version {found}; this build reads up to version {known} "
            "(run a newer build on this data dir)"
        )
        self.path, self.found, self.known = path, found, known


__all__ = [
    "DISK_FULL_ERRNOS",
    "TRANSIENT_ERRNOS",
    "StorageCorruptError",
    "StorageError",
    "StorageFormatError",
    "StorageFullError",
    "StorageTransientError",
    "free_bytes",
]
