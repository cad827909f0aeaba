"""The simulated disk of one node: what survives a crash.

It holds the hard state, the latest snapshot and the log entries after it, plus the configuration
points of the log (each CONF_CHANGE entry with the configuration it produces, decoded with the
codec), so the simulator can rebuild a ``RaftCore`` exactly as a real driver would after a restart
and compare the engine's configuration with the one its durable log implies.

Writes made with ``synced=False`` (a Ready whose ``must_sync`` is false, or a Ready cut short by a
crash before its fsync) go to a journal of undo records; ``sync()`` makes them durable, ``crash()``
keeps a random prefix of them and rolls back the rest (a torn, unsynced tail). Snapshots are
written to their own file with an fsync, so they sync the journal first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..codec import decode_conf_change
from ..core.types import Configuration, Entry, EntryType, HardState, Snapshot
from .membership import apply_conf_change

ConfStep = tuple[int, Configuration, Configuration]  # index, config before, config after


class DiskError(Exception):
    """The engine asked for a write no log can take (a gap, or entries under the snapshot)."""


class SimDisk:
    __slots__ = (
        "base_config",
        "conf_points",
        "hard_state",
        "journal",
        "log",
        "offset",
        "snap_term",
        "snapshot",
    )

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.log: list[Entry] = []  # log[k].index == offset + 1 + k
        self.offset = 0  # snapshot index
        self.snap_term = 0
        self.base_config = Configuration()  # the snapshot's configuration
        self.conf_points: list[tuple[int, Configuration]] = []
        self.journal: list[tuple[object, ...]] = []

    # ----- reads
    @property
    def last_index(self) -> int:
        return self.offset + len(self.log)

    @property
    def snapshot_index(self) -> int:
        return self.offset

    def term_at(self, index: int) -> int | None:
        if index == self.offset:
            return self.snap_term
        if self.offset < index <= self.offset + len(self.log):
            return self.log[index - self.offset - 1].term
        return None

    def entry_at(self, index: int) -> Entry | None:
        if self.offset < index <= self.offset + len(self.log):
            return self.log[index - self.offset - 1]
        return None

    def config_latest(self) -> Configuration:
        return self.conf_points[-1][1] if self.conf_points else self.base_config

    def config_at(self, index: int) -> Configuration:
        for idx, cfg in reversed(self.conf_points):
            if idx <= index:
                return cfg
        return self.base_config

    def conf_indexes_above(self, index: int) -> list[int]:
        return [idx for idx, _ in self.conf_points if idx > index]

    def load(self) -> tuple[HardState, Snapshot | None, tuple[Entry, ...]]:
        return self.hard_state, self.snapshot, tuple(self.log)

    # ----- writes
    def append(self, entries: Sequence[Entry], *, synced: bool) -> tuple[list[ConfStep], bool]:
        """Append (truncating a conflicting tail). Returns the conf steps added and whether the
        latest configuration may have changed (a conf entry was added or truncated away)."""
        first = entries[0].index
        if first <= self.offset:
            raise DiskError(f"append at {first} is not after the snapshot index {self.offset}")
        if first > self.last_index + 1:
            raise DiskError(f"append at {first} leaves a gap after last index {self.last_index}")
        cut = first - self.offset - 1
        removed = self.log[cut:]
        del self.log[cut:]
        removed_conf: list[tuple[int, Configuration]] = []
        while self.conf_points and self.conf_points[-1][0] >= first:
            removed_conf.append(self.conf_points.pop())
        removed_conf.reverse()
        steps: list[ConfStep] = []
        expect = first
        for e in entries:
            if e.index != expect:
                raise DiskError(f"entries not contiguous: {e.index} after {expect - 1}")
            expect += 1
            if e.type == EntryType.CONF_CHANGE:
                before = self.config_latest()
                after = apply_conf_change(before, decode_conf_change(e.data))
                self.conf_points.append((e.index, after))
                steps.append((e.index, before, after))
        self.log.extend(entries)
        if not synced:
            self.journal.append(("ents", first, removed, removed_conf))
        return steps, bool(steps or removed_conf)

    def set_hard_state(self, hs: HardState, *, synced: bool) -> None:
        if not synced:
            self.journal.append(("hs", self.hard_state))
        self.hard_state = hs

    def sync(self) -> None:
        self.journal.clear()

    def install_snapshot(self, snap: Snapshot) -> None:
        """A snapshot received from the leader replaces the app state and the whole log."""
        self.sync()
        self.snapshot = snap
        self.offset = snap.meta.index
        self.snap_term = snap.meta.term
        self.base_config = snap.meta.config
        self.log = []
        self.conf_points = []

    def compact(self, snap: Snapshot) -> None:
        """The app's own snapshot at its applied index: entries up to it are no longer needed."""
        self.sync()
        index = snap.meta.index
        if index > self.last_index or index < self.offset:
            raise DiskError(f"compact at {index} outside log [{self.offset}, {self.last_index}]")
        del self.log[: index - self.offset]
        self.conf_points = [(i, c) for i, c in self.conf_points if i > index]
        self.snapshot = snap
        self.offset = index
        self.snap_term = snap.meta.term
        self.base_config = snap.meta.config

    def crash(self, rng: random.Random) -> int:
        """Lose a random suffix of the unsynced writes. Returns how many records were lost."""
        keep = rng.randint(0, len(self.journal))
        lost = self.journal[keep:]
        for rec in reversed(lost):
            if rec[0] == "hs":
                hs = rec[1]
                assert isinstance(hs, HardState)
                self.hard_state = hs
            else:
                _, first, removed, removed_conf = rec
                assert isinstance(first, int) and isinstance(removed, list)
                assert isinstance(removed_conf, list)
                del self.log[first - self.offset - 1 :]
                while self.conf_points and self.conf_points[-1][0] >= first:
                    self.conf_points.pop()
                self.log.extend(removed)
                self.conf_points.extend(removed_conf)
        self.journal.clear()
        return len(lost)
