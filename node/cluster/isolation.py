"""IsolationGuard: the running node's isolation fence, one part of ``ClusterNode``.

The decision is ``quorumd.node.cluster.fencing.IsolationFence``; this part feeds it (the arrival
time of every peer's Raft frames, the node's role and readiness from the ``ClusterService``),
checks it every step of ``fence_loop`` and before any speaker change (``guard``), stops the BGP
speaker the moment the node fences, and calls ``rejoined`` when it rejoins (the node's drain side
effects then bring the speaker back, only for an ``active`` node). ``on_isolation(isolated)`` is
the metrics hook. ``/readyz`` answers 503 ``isolated`` while fenced (``is_isolated``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from quorumd.node.cluster.fencing import FenceChange, IsolationFence
from quorumd.node.cluster.service import ClusterService
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.raft.core.types import Role

log = logging.getLogger(__name__)


class IsolationGuard:
    """See the module docstring. ``fence_after_seconds`` None: three election timeouts."""

    def __init__(
        self,
        service: ClusterService,
        bgp: BgpSpeaker,
        *,
        rejoined: Callable[[], None],
        election_timeout_seconds: float,
        fence_after_seconds: float | None = None,
    ) -> None:
        self.service = service
        self.bgp = bgp
        self._rejoined = rejoined
        self.election_timeout = election_timeout_seconds
        self.on_isolation: Callable[[bool], None] | None = None  # metrics hook: fn(isolated)
        default = 3.0 * election_timeout_seconds
        self.fence_after = default if fence_after_seconds is None else fence_after_seconds
        self._fence = self._new_fence()
        self._heard: dict[int, float] = {}  # peer -> monotonic time its last Raft frame arrived

    def _new_fence(self) -> IsolationFence:
        return IsolationFence.start(
            time.monotonic(),
            fence_after_seconds=self.fence_after,
            election_timeout_seconds=self.election_timeout,
        )

    def is_isolated(self) -> bool:
        return self._fence.fenced

    def heard_from(self, node_id: int) -> None:
        """A Raft frame from ``node_id`` arrived (called by the transport's frame callback)."""
        self._heard[node_id] = time.monotonic()

    def _quorum_contact_at(self) -> float | None:
        """When this node last knew it was in contact with a quorum (see fencing.py), or None."""
        svc = self.service
        if svc.driver is None:
            return None
        core = svc.driver.core
        me = svc.identity.node_id
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

    def check(self) -> None:
        """One check of the fence; stops the speaker at once when it fences (before any
        announcement that may follow), calls ``rejoined`` when it rejoins."""
        svc = self.service
        if not svc.cluster_enabled or svc.driver is None:
            return
        now = time.monotonic()
        change = self._fence.check(now, self._quorum_contact_at(), svc.is_ready())
        if change is FenceChange.FENCED:
            stall = self._fence.stalled_for
            self._fence.stalled_for = 0.0
            log.warning(
                "node_isolated node=%d silent_seconds=%.3f fence_after_seconds=%.3f stalled_seconds=%.3f",
                svc.identity.node_id, self._fence.silent_seconds(now), self.fence_after, stall,
            )  # fmt: skip
            if self.bgp.running:
                self.bgp.stop(token=svc.applied_token)
            if self.on_isolation is not None:
                self.on_isolation(True)
        elif change is FenceChange.REJOINED:
            log.info("node_rejoined node=%d applied=%d", svc.identity.node_id, svc.applied_index())
            if self.on_isolation is not None:
                self.on_isolation(False)
            self._rejoined()

    def guard(self) -> None:
        """Before any speaker change: a process that was paused checks first (cheap otherwise)."""
        if self._fence.stalled(time.monotonic()):
            self.check()

    async def fence_loop(self) -> None:
        """Check the fence often enough to fence within ``fence_after`` plus one step."""
        step = max(0.02, min(0.1, self.fence_after / 20.0))
        self._fence = self._new_fence()
        while True:
            await asyncio.sleep(step)
            self.check()
