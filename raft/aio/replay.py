"""Rebuilding the log from the ENTRY records of the WAL segments (the log's semantics on disk).

The last writer wins. An ENTRY record for an index at or below the current last index truncates
the log there (the log becomes the prefix before that index, then the new entry). A record that
jumps past the end restarts the log (only legitimate after a snapshot that covers the jump, which
``after_snapshot`` checks). Entries at or before the snapshot index are not returned.

Pure functions over lists of entries: ``LogStorage`` (``storage.py``) reads the segments
(``wal.py``), feeds their entries here in order, logs and acts on the outcome.
"""

from __future__ import annotations

from ..core.types import Entry, Snapshot
from .storage_errors import StorageCorruptError


def apply_entries(log: list[Entry], entries: list[Entry]) -> None:
    """Apply one segment's ENTRY records, in file order, to ``log`` (contiguous, ascending)."""
    nxt = log[-1].index + 1 if log else 0
    for e in entries:
        i = e.index
        if i == nxt:
            log.append(e)
            nxt += 1
            continue
        if log and log[0].index <= i < nxt:  # rewritten: the last writer wins
            del log[i - log[0].index :]
        else:  # jump (after an installed snapshot): start over from here
            log.clear()
        log.append(e)
        nxt = i + 1


def after_snapshot(log: list[Entry], snapshot: Snapshot | None) -> tuple[list[Entry], bool]:
    """The entries of the replayed ``log`` after ``snapshot``, and whether the log conflicts with
    the snapshot (a snapshot install was cut short: the whole log must be dropped)."""
    if snapshot is None:
        if log and log[0].index != 1:
            first = log[0].index
            raise StorageCorruptError(f"log starts at index {first} with no snapshot (lost segment?)")
        return log, False
    s, first = snapshot.meta.index, log[0].index if log else 0
    if log and first <= s <= log[-1].index and log[s - first].term != snapshot.meta.term:
        return [], True
    if not log or log[-1].index <= s:
        return [], False
    if first > s + 1:
        raise StorageCorruptError(f"log gap: wal starts at index {first}, snapshot ends at {s}")
    return log[s + 1 - first :], False


__all__ = ["after_snapshot", "apply_entries"]
