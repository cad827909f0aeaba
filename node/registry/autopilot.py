"""Autopilot's pure logic (SPEC 6): per-server health, failure tolerance, promotion and cleanup.

Runs on the leader only. The caller feeds what the leader knows (contact ages, match indexes,
the registry's "left" flags) together with the time; this module keeps each server's health and
``stable_since`` clock and decides which nonvoters to promote and which failed servers to remove.
A new leader builds a fresh ``Autopilot`` so every stabilization clock starts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class NodeStatus(StrEnum):
    ALIVE = "alive"
    LEFT = "left"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AutopilotSettings:
    last_contact_threshold_seconds: float = 10.0
    max_trailing_logs: int = 500
    server_stabilization_seconds: float = 10.0
    cleanup_dead_servers: bool = False
    min_quorum: int = 0


@dataclass(frozen=True, slots=True)
class ServerInput:
    node_id: int
    raft_address: str
    voter: bool
    is_leader: bool
    last_contact_seconds: float
    match_index: int
    last_term: int
    left: bool = False


@dataclass(frozen=True, slots=True)
class ServerHealth:
    node_id: int
    raft_address: str
    node_status: NodeStatus
    healthy: bool
    is_leader: bool
    voter: bool
    stable_since: float
    last_contact_seconds: float
    last_term: int
    last_index: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "raftAddress": self.raft_address,
            "nodeStatus": str(self.node_status),
            "healthy": self.healthy,
            "isLeader": self.is_leader,
            "hasVotingRights": self.voter,
            "stableSince": rfc3339(self.stable_since),
            "lastContactMs": round(self.last_contact_seconds * 1000.0, 3),
            "lastTerm": self.last_term,
            "lastIndex": self.last_index,
        }


@dataclass(frozen=True, slots=True)
class AutopilotView:
    healthy: bool
    failure_tolerance: int
    leader_node_id: int
    voters: tuple[int, ...]
    servers: tuple[ServerHealth, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "failureTolerance": self.failure_tolerance,
            "leaderNodeId": self.leader_node_id,
            "voters": list(self.voters),
            "servers": [s.as_dict() for s in self.servers],
        }


@dataclass(frozen=True, slots=True)
class Decisions:
    promote: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_tolerance(healthy_voters: int, voters: int) -> int:
    return max(0, healthy_voters - (voters // 2 + 1))


class Autopilot:
    def __init__(self, settings: AutopilotSettings) -> None:
        self.settings = settings
        self._health: dict[int, tuple[bool, float]] = {}  # node id -> (healthy, stable since)

    def evaluate(
        self,
        *,
        now: float,
        leader_id: int,
        leader_term: int,
        leader_last_index: int,
        servers: list[ServerInput],
    ) -> AutopilotView:
        s = self.settings
        out: list[ServerHealth] = []
        seen: set[int] = set()
        for srv in sorted(servers, key=lambda x: x.node_id):
            seen.add(srv.node_id)
            in_contact = srv.is_leader or srv.last_contact_seconds <= s.last_contact_threshold_seconds
            if srv.left:
                status = NodeStatus.LEFT
            elif in_contact:
                status = NodeStatus.ALIVE
            else:
                status = NodeStatus.FAILED
            healthy = (
                status == NodeStatus.ALIVE
                and (srv.is_leader or srv.last_term == leader_term)
                and leader_last_index - srv.match_index <= s.max_trailing_logs
            )
            prev = self._health.get(srv.node_id)
            stable_since = now if prev is None or prev[0] != healthy else prev[1]
            self._health[srv.node_id] = (healthy, stable_since)
            out.append(
                ServerHealth(
                    node_id=srv.node_id,
                    raft_address=srv.raft_address,
                    node_status=status,
                    healthy=healthy,
                    is_leader=srv.is_leader,
                    voter=srv.voter,
                    stable_since=stable_since,
                    last_contact_seconds=0.0 if srv.is_leader else srv.last_contact_seconds,
                    last_term=srv.last_term,
                    last_index=srv.match_index,
                )
            )
        for gone in [n for n in self._health if n not in seen]:
            del self._health[gone]
        voters = tuple(h.node_id for h in out if h.voter)
        healthy_voters = sum(1 for h in out if h.voter and h.healthy)
        return AutopilotView(
            healthy=all(h.healthy for h in out),
            failure_tolerance=failure_tolerance(healthy_voters, len(voters)),
            leader_node_id=leader_id,
            voters=voters,
            servers=tuple(out),
        )

    def decide(self, view: AutopilotView, now: float, *, draining: frozenset[int] = frozenset()) -> Decisions:
        s = self.settings
        # ``last_index > 0``: the leader has heard from it at least once. A new peer's contact age
        # starts at zero, so a joiner that died before answering would otherwise look alive (and,
        # with server-stabilization-time below last-contact-threshold, get promoted while dead).
        promote = tuple(
            h.node_id
            for h in view.servers
            if not h.voter
            and h.healthy
            and h.last_index > 0
            and h.node_id not in draining
            and now - h.stable_since >= s.server_stabilization_seconds
        )
        remove: list[int] = []
        if s.cleanup_dead_servers:
            voters = len(view.voters)
            failed = [h for h in view.servers if h.node_status == NodeStatus.FAILED and not h.is_leader]
            failed_voters = [h for h in failed if h.voter]
            # Never a majority at once, never below min-quorum.
            if len(failed_voters) <= (voters - 1) // 2:
                budget = voters - max(s.min_quorum, 1)
                for h in failed:
                    if h.voter:
                        if budget <= 0:
                            continue
                        budget -= 1
                    remove.append(h.node_id)
        return Decisions(promote=promote, remove=tuple(remove))
