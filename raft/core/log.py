"""The in-memory Raft log: entries after the compaction point, stable/commit/applied marks.

The log holds every entry with index in ``(offset, last_index]``; ``offset`` is the index just
before the first kept entry (at most the snapshot index, lower when ``trailing_logs`` are kept
behind a snapshot). ``stable_index`` is the last index known durable: everything after it is
handed to the driver in the next Ready. Entries at or below ``commit`` never change.
"""

from __future__ import annotations

from collections.abc import Sequence

from .ready import InvariantError
from .types import Entry


class RaftLog:
    __slots__ = ("applied", "commit", "entries", "offset", "offset_term", "stable_index")

    def __init__(self, offset: int = 0, offset_term: int = 0, entries: Sequence[Entry] = ()) -> None:
        self.offset = offset
        self.offset_term = offset_term
        self.entries: list[Entry] = list(entries)
        for i, e in enumerate(self.entries):
            if e.index != offset + 1 + i:
                raise InvariantError(f"log not contiguous at {e.index} (expected {offset + 1 + i})")
        self.stable_index = self.last_index
        self.commit = offset
        self.applied = offset

    # --- positions --------------------------------------------------------------------------
    @property
    def last_index(self) -> int:
        return self.offset + len(self.entries)

    @property
    def first_index(self) -> int:
        return self.offset + 1

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None when compacted away or beyond the end."""
        if index == self.offset:
            return self.offset_term
        if index < self.offset or index > self.last_index:
            return None
        return self.entries[index - self.offset - 1].term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft paper 5.4.1: the candidate's log is at least as up to date as ours."""
        my_term = self.last_term
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index)

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries with index in [lo, hi); at least one entry when any is available."""
        if lo <= self.offset:
            raise InvariantError(f"slice from compacted index {lo} (offset {self.offset})")
        hi = min(hi, self.last_index + 1)
        if lo >= hi:
            return []
        out = self.entries[lo - self.offset - 1 : hi - self.offset - 1]
        if max_bytes is not None and len(out) > 1:
            total = 0
            for n, e in enumerate(out):
                total += len(e.data) + 16
                if total > max_bytes and n > 0:
                    return out[:n]
        return out

    # --- mutation -------------------------------------------------------------------------------
    def append(self, entries: Sequence[Entry]) -> int:
        """Append entries; the first may overwrite the tail (never committed entries)."""
        if not entries:
            return self.last_index
        first = entries[0].index
        if first <= self.commit:
            raise InvariantError(f"overwrite of committed index {first} (commit {self.commit})")
        if first > self.last_index + 1:
            raise InvariantError(f"gap: append at {first} after last {self.last_index}")
        if first <= self.last_index:
            del self.entries[first - self.offset - 1 :]
            if self.stable_index >= first:
                self.stable_index = first - 1
        self.entries.extend(entries)
        return self.last_index

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry whose term differs from ours (0 when all match).

        Entries at or below the offset are committed and skipped."""
        for e in entries:
            if e.index <= self.offset:
                continue
            if self.term(e.index) != e.term:
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= ``index`` whose term is <= ``term`` (fast backtracking, thesis 3.5)."""
        index = min(index, self.last_index)
        while index > self.offset:
            t = self.term(index)
            if t is not None and t <= term:
                return index
            index -= 1
        return self.offset

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: Sequence[Entry]
    ) -> int | None:
        """AppendEntries receiver (paper 5.3). Returns the last new index, or None on mismatch."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            self.append(entries[conflict - prev_index - 1 :])
        self.commit_to(min(commit, last_new))
        return last_new

    def commit_to(self, index: int) -> bool:
        if index > self.commit:
            if index > self.last_index:
                raise InvariantError(f"commit {index} beyond last index {self.last_index}")
            self.commit = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) == term and index > self.stable_index:
            self.stable_index = index

    def unstable_entries(self) -> list[Entry]:
        if self.stable_index >= self.last_index:
            return []
        return self.entries[self.stable_index - self.offset :]

    def has_next_committed(self) -> bool:
        """Whether ``next_committed()`` would return anything, without building the list."""
        return max(self.applied, self.offset) < self.commit

    def next_committed(self) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index)
        if lo > self.commit:
            return []
        return self.entries[lo - self.offset - 1 : self.commit - self.offset]

    def compact_to(self, index: int) -> None:
        """Drop entries with index <= ``index`` (must be applied)."""
        if index <= self.offset:
            return
        if index > self.applied:
            raise InvariantError(f"compaction past applied ({index} > {self.applied})")
        term = self.term(index)
        assert term is not None
        del self.entries[: index - self.offset]
        self.offset = index
        self.offset_term = term

    def restore(self, index: int, term: int) -> None:
        """Reset to a snapshot at (index, term): the whole log is replaced."""
        self.entries = []
        self.offset = index
        self.offset_term = term
        self.stable_index = index
        self.commit = index
        self.applied = index
