"""What a leader tracks about each peer: match/next index and the flow-control state.

PROBE: one append in flight (``paused`` until the reply) while the match index is unknown.
REPLICATE: appends are pipelined up to ``max_inflight``; ``next`` moves optimistically.
SNAPSHOT: an InstallSnapshot transfer of ``snapshot`` is under way; ``snapshot_offset`` bytes
have been acknowledged. Follows etcd-io/raft's tracker.Progress (thesis 3.5 and 10.2.1).
"""

from __future__ import annotations

from collections import deque

from .types import ProgressState, Snapshot


class Progress:
    __slots__ = (
        "heartbeat_match",
        "inflight",
        "last_contact_ticks",
        "match",
        "max_inflight",
        "next",
        "optimistic",
        "paused",
        "recent_active",
        "snapshot",
        "snapshot_acked",
        "snapshot_offset",
        "state",
    )

    def __init__(self, next_index: int, max_inflight: int) -> None:
        self.match = 0
        self.heartbeat_match = -1  # match seen at the previous heartbeat response
        self.next = next_index
        self.state = ProgressState.PROBE
        self.paused = False
        # A new leader's first probe: until the peer first answers, each append goes out at once
        # (each resends from ``next``) instead of waiting a round trip behind the leader's no-op.
        self.optimistic = False
        self.inflight: deque[int] = deque()
        self.max_inflight = max_inflight
        self.recent_active = False
        self.last_contact_ticks = 0
        self.snapshot: Snapshot | None = None
        self.snapshot_offset = 0
        self.snapshot_acked = True

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT and self.snapshot is not None:
            self.next = max(self.match + 1, self.snapshot.meta.index + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.optimistic = False
        self.inflight.clear()
        self.snapshot = None

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.optimistic = False
        self.inflight.clear()
        self.snapshot = None

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot = snapshot
        self.snapshot_offset = 0
        self.snapshot_acked = True
        self.paused = False
        self.optimistic = False
        self.inflight.clear()

    def maybe_update(self, index: int) -> bool:
        """A successful append response up to ``index``. True when match advanced."""
        updated = False
        if index > self.match:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        return updated

    def maybe_decrease(self, rejected: int, hint: int) -> bool:
        """A rejected append for ``rejected``; ``hint`` is the next probe position minus one."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale rejection
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale rejection of an older probe
        self.next = max(min(rejected, hint + 1), self.match + 1, 1)
        self.paused = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.paused and not self.optimistic
        if self.state == ProgressState.REPLICATE:
            return len(self.inflight) >= self.max_inflight
        return True

    def sent(self, last_index: int) -> None:
        if self.state == ProgressState.REPLICATE:
            if last_index >= self.next:
                self.next = last_index + 1
                self.inflight.append(last_index)
        elif self.state == ProgressState.PROBE:
            self.paused = True
