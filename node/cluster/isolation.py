"""FencedService: the running node's isolation fence on top of ``ClusterService``.

The decision is ``quorumd.node.cluster.fencing.IsolationFence``; this layer feeds it (the arrival
time of every peer's Raft frames, the node's role and readiness), checks it every ``step`` and
before any speaker change (``_fence_guard``), stops the speaker the moment the node fences, and
asks the subclass to restore its side effects when it rejoins (``_rejoined``: the speaker comes
back only for an ``active`` node). ``/readyz`` answers 503 ``isolated`` while fenced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from quorumd.node.cluster.fencing import FenceChange, IsolationFence
from quorumd.node.cluster.service import ClusterService
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.raft.core.types import Role

log = logging.getLogger(__name__)


class FencedService(ClusterService):
    def __init__(
        self,
        *args: Any,
        bgp: BgpSpeaker,
        election_timeout_seconds: float,
        isolation_fence_after_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.bgp = bgp
        self.election_timeout = election_timeout_seconds
        self.on_isolation: Callable[[bool], None] | None = None  # metrics hook: fn(isolated)
        self.fence_after = (
            3.0 * election_timeout_seconds
            if isolation_fence_after_seconds is None
            else isolation_fence_after_seconds
        )
        self._fence = self._new_fence()
        self._heard: dict[int, float] = {}  # peer -> monotonic time its last Raft frame arrived

    def _new_fence(self) -> IsolationFence:
        return IsolationFence.start(
            time.monotonic(),
            fence_after_seconds=self.fence_after,
            election_timeout_seconds=self.election_timeout,
        )

    def _rejoined(self) -> None:
        """Bring the side effects back after a fence (the subclass knows the drain state)."""

    # --- isolation fencing ---------------------------------------------------------
    def is_isolated(self) -> bool:
        return self._fence.fenced

    def heard_from(self, node_id: int) -> None:
        """A Raft frame from ``node_id`` arrived (called by the transport's frame callback)."""
        self._heard[node_id] = time.monotonic()

    def _quorum_contact_at(self) -> float | None:
        """When this node last knew it was in contact with a quorum (see fencing.py), or None."""
        if self.driver is None:
            return None
        core = self.running_driver.core
        me = self.identity.node_id
        if core.role == Role.LEADER:
            voters = core.config.voters
            if not voters:
                return None
            now = time.monotonic()
            stamps = sorted((now if v == me else self._heard.get(v, 0.0) for v in voters), reverse=True)
            return stamps[len(voters) // 2]
        leader = core.leader_id
        if leader and leader != me:
            return self._heard.get(leader)
        return None

    def _fence_check(self) -> None:
        """One check of the fence; stops the speaker at once when it fences (before any
        announcement that may follow), kicks the side effects when it rejoins."""
        if not self._cluster_enabled or self.driver is None:
            return
        now = time.monotonic()
        change = self._fence.check(now, self._quorum_contact_at(), self.is_ready())
        if change is FenceChange.FENCED:
            stall = self._fence.stalled_for
            self._fence.stalled_for = 0.0
            log.warning(
                "node_isolated node=%d silent_seconds=%.3f fence_after_seconds=%.3f stalled_seconds=%.3f",
                self.identity.node_id, self._fence.silent_seconds(now), self.fence_after, stall,
            )  # fmt: skip
            if self.bgp.running:
                self.bgp.stop(token=self.applied_token)
            if self.on_isolation is not None:
                self.on_isolation(True)
        elif change is FenceChange.REJOINED:
            log.info("node_rejoined node=%d applied=%d", self.identity.node_id, self.applied_index())
            if self.on_isolation is not None:
                self.on_isolation(False)
            self._rejoined()

    def _fence_guard(self) -> None:
        """Before any speaker change: a process that was paused checks first (cheap otherwise)."""
        if self._fence.stalled(time.monotonic()):
            self._fence_check()

    async def fence_loop(self) -> None:
        """Check the fence often enough to fence within ``fence_after`` plus one step."""
        step = max(0.02, min(0.1, self.fence_after / 20.0))
        self._fence = self._new_fence()
        while True:
            await asyncio.sleep(step)
            self._fence_check()
