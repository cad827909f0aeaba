"""Isolation fencing: when has this node gone too long without hearing a quorum?

``IsolationFence`` is the decision, pure and clocked by the caller (monotonic seconds). The node
feeds it ``contact_at``: the latest moment it *knows* it was in contact with a quorum.

- A leader is in contact with a quorum at the moment the quorum-th most recent of its voters
  (itself counting as "now") was last heard from: the same rule as the engine's CheckQuorum,
  measured with the monotonic clock at frame arrival instead of ticks.
- A follower (or nonvoter) trusts its current leader: it was in contact when it last heard from
  it. The leader itself steps down within an election timeout of losing its quorum (CheckQuorum),
  so on the minority side of a partition the follower stops hearing from any leader.
- A candidate, or a follower that knows no leader, learns nothing new.

The node is fenced once ``now - contact_at >= fence_after`` and rejoins once it has been in
contact (``now - contact_at <= contact_window``) and caught up (ready) for ``rejoin_hold``
seconds without a break: one heartbeat after a heal is not enough to trust the replica again.

Paused processes: every call is a check, and a check that comes more than ``stall_seconds``
after the previous one (SIGSTOP, a frozen VM, a long stall of the loop) does not trust contact
stamped since the previous check: frames read right after waking may have sat in the socket
buffer for the whole pause. It judges on the contact known before the pause; the node calls
``check`` before any change to its speaker, so a node that slept past ``fence_after`` withdraws
before it announces anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FenceChange(Enum):
    FENCED = "fenced"
    REJOINED = "rejoined"


@dataclass(slots=True)
class IsolationFence:
    fence_after_seconds: float
    contact_window_seconds: float
    rejoin_hold_seconds: float
    stall_seconds: float
    contact_at: float  # latest known quorum contact (monotonic)
    last_check: float
    fenced: bool = False
    stalled_for: float = 0.0  # the last stall seen (for the log)
    _good_since: float | None = None

    @classmethod
    def start(
        cls, now: float, *, fence_after_seconds: float, election_timeout_seconds: float
    ) -> IsolationFence:
        return cls(
            fence_after_seconds=fence_after_seconds,
            contact_window_seconds=election_timeout_seconds,
            rejoin_hold_seconds=election_timeout_seconds,
            stall_seconds=max(0.5, election_timeout_seconds),
            contact_at=now,
            last_check=now,
        )

    def stalled(self, now: float) -> bool:
        """Whether a check at ``now`` would follow a pause (cheap: for every speaker change)."""
        return now - self.last_check > self.stall_seconds

    def check(self, now: float, contact_at: float | None, ready: bool) -> FenceChange | None:
        if now - self.last_check > self.stall_seconds:
            self.stalled_for = now - self.last_check
            contact_at = None  # stamps read since waking may be stale: judge on what came before
            self._good_since = None
        self.last_check = now
        if contact_at is not None and contact_at > self.contact_at:
            self.contact_at = min(contact_at, now)
        silent = now - self.contact_at
        if not self.fenced:
            if silent >= self.fence_after_seconds:
                self.fenced = True
                self._good_since = None
                return FenceChange.FENCED
            return None
        if silent <= self.contact_window_seconds and ready:
            if self._good_since is None:
                self._good_since = now
            if now - self._good_since >= self.rejoin_hold_seconds:
                self.fenced = False
                self._good_since = None
                return FenceChange.REJOINED
        else:
            self._good_since = None
        return None

    def silent_seconds(self, now: float) -> float:
        return now - self.contact_at
