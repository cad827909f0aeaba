"""Autopilot's pure logic: per-server health and reasons, failure tolerance,
promotion (with its predicted time), cleanup, the leadership-transfer choice, and what-if.

Runs on the leader only. The caller feeds what the leader knows (contact ages, match indexes,
the registry's "left" flags and drain states, each member's incarnation) together with the time;
this module keeps each server's health and ``stable_since`` clock and decides which nonvoters to
promote and which failed servers to remove. A new leader builds a fresh ``Autopilot`` so every
stabilization clock starts again.

Clocks and membership: a server's clocks belong to one *incarnation* of a member (its
pinned certificate fingerprint), not to its node id. They are forgotten the moment the server
leaves the Raft configuration (``forget``, called when the removal applies, not lazily at the
next evaluation), and an evaluation that sees the same id with another incarnation starts a fresh
clock. So a new node that joins later with a removed node's id never inherits its ``stableSince``
and always waits out the full stabilization time, however quickly it was re-added.

Foresight: ``reasons`` explain why a server is not healthy and settled; ``promotionAt``
is ``stable_since + server-stabilization-time``, the earliest moment ``decide`` promotes it (the
node's reconcile loop wakes at that moment, so the promotion happens no later than that plus one
reconcile interval). ``what_if`` answers for the cluster as it would be after removing, failing,
draining or promoting servers; the removal guard of ``DELETE /cluster/members/{id}`` and the
dead-server cleanup in ``decide`` both ask ``what_if``, and its predicted leader comes from
``transfer_target``, the same choice a drain's leadership hand-off makes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from quorumd.api.ports import DrainState


class NodeStatus(StrEnum):
    ALIVE = "alive"
    LEFT = "left"
    FAILED = "failed"


class Reason(StrEnum):
    """Why a server is not healthy and settled (``reasons`` in GET /cluster/autopilot)."""

    NO_CONTACT = "no_contact"
    LEFT = "left"
    TERM_BEHIND = "term_behind"
    LOG_BEHIND = "log_behind"
    STABILIZING = "stabilizing"
    DRAINING = "draining"
    DRAINED = "drained"
    NOT_CAUGHT_UP = "not_caught_up"


class WhatIfWarning(StrEnum):
    """What-if warnings."""

    QUORUM_LOST = "quorum_lost"
    FAILURE_TOLERANCE_ZERO = "failure_tolerance_zero"
    LEADER_MOVES = "leader_moves"
    LAST_VOTER = "last_voter"
    BELOW_MIN_QUORUM = "below_min_quorum"
    NOT_CAUGHT_UP = "not_caught_up"


UNSAFE_WARNINGS = frozenset({WhatIfWarning.QUORUM_LOST, WhatIfWarning.LAST_VOTER})


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
    drain_state: DrainState = DrainState.ACTIVE
    incarnation: str = ""  # the member's pinned certificate fingerprint: a new node, a new clock


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
    trailing_logs: int = 0
    drain_state: DrainState = DrainState.ACTIVE
    reasons: tuple[Reason, ...] = ()
    promotion_at: float | None = None

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
            "trailingLogs": self.trailing_logs,
            "reasons": [str(r) for r in self.reasons],
            "promotionAt": None if self.promotion_at is None else rfc3339_ms_ceil(self.promotion_at),
        }


@dataclass(frozen=True, slots=True)
class AutopilotView:
    healthy: bool
    failure_tolerance: int
    leader_node_id: int
    voters: tuple[int, ...]
    servers: tuple[ServerHealth, ...]
    healthy_voters: int = 0
    settings: AutopilotSettings = field(default_factory=AutopilotSettings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "failureTolerance": self.failure_tolerance,
            "leaderNodeId": self.leader_node_id,
            "voters": list(self.voters),
            "servers": [s.as_dict() for s in self.servers],
        }

    def server(self, node_id: int) -> ServerHealth | None:
        return next((s for s in self.servers if s.node_id == node_id), None)

    def next_promotion_at(self) -> float | None:
        """The earliest predicted promotion (None when no server is stabilizing)."""
        times = [s.promotion_at for s in self.servers if s.promotion_at is not None]
        return min(times) if times else None


@dataclass(frozen=True, slots=True)
class Decisions:
    promote: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()
    refused: tuple[int, ...] = ()  # failed servers cleanup left in place: would lose quorum


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_ms_ceil(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, rounded up: a predicted time is never shown early."""
    ms = math.ceil(round(ts * 1000.0, 6))
    return datetime.fromtimestamp(ms / 1000.0, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def quorum_of(voters: int) -> int:
    return voters // 2 + 1


def failure_tolerance(healthy_voters: int, voters: int) -> int:
    return max(0, healthy_voters - quorum_of(voters))


# --- leadership transfer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferCandidate:
    node_id: int
    voter: bool
    drain_state: DrainState
    last_contact_seconds: float
    match_index: int


def transfer_target(
    candidates: Iterable[TransferCandidate], *, exclude: Iterable[int], contact_threshold_seconds: float
) -> int:
    """The most up-to-date voter that is active (not draining or drained), was heard from within
    ``contact_threshold_seconds`` and is not excluded; the lowest id wins a tie; 0 when none.
    Both the drain's hand-off and what-if's predicted leader use this one rule."""
    skip = set(exclude)
    best, best_match = 0, -1
    for c in sorted(candidates, key=lambda x: x.node_id):
        if c.node_id in skip or not c.voter or c.drain_state != DrainState.ACTIVE:
            continue
        if c.last_contact_seconds > contact_threshold_seconds:
            continue
        if c.match_index > best_match:
            best, best_match = c.node_id, c.match_index
    return best


# --- what-if -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    remove: frozenset[int] = frozenset()
    fail: frozenset[int] = frozenset()
    drain: frozenset[int] = frozenset()
    promote: frozenset[int] = frozenset()

    def node_ids(self) -> frozenset[int]:
        return self.remove | self.fail | self.drain | self.promote


@dataclass(frozen=True, slots=True)
class WhatIf:
    voters: tuple[int, ...]
    quorum: int
    healthy_voters: int
    failure_tolerance: int
    leader_node_id: int
    warnings: tuple[WhatIfWarning, ...]

    @property
    def safe(self) -> bool:
        return not any(w in UNSAFE_WARNINGS for w in self.warnings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "voters": list(self.voters),
            "quorum": self.quorum,
            "healthyVoters": self.healthy_voters,
            "failureTolerance": self.failure_tolerance,
            "leaderNodeId": self.leader_node_id,
            "safe": self.safe,
            "warnings": [str(w) for w in self.warnings],
        }


def what_if(view: AutopilotView, scenario: Scenario, *, transfer_contact_seconds: float) -> WhatIf:
    """The cluster as it would be after the scenario. Pure: changes nothing.

    A removed or failed server is not a healthy voter; a drained (or draining) voter still votes
    and counts; a promoted server becomes a voter (healthy if it is healthy now). The predicted
    leader is today's unless it is removed, failed or drained; then the voter a drain would hand
    leadership to (``transfer_target``). When none could take over, a drained leader stays leader
    (as the drain leaves it) and a removed or failed one leaves no leader (0)."""
    s = view.settings
    gone = scenario.remove | scenario.fail
    by_id = {h.node_id: h for h in view.servers}
    voters = tuple(
        sorted(n for n, h in by_id.items() if n not in scenario.remove and (h.voter or n in scenario.promote))
    )
    healthy_voters = sum(1 for n in voters if n not in gone and by_id[n].healthy)
    quorum = quorum_of(len(voters))
    tolerance = failure_tolerance(healthy_voters, len(voters))
    leader = view.leader_node_id
    if leader in gone or leader in scenario.drain:
        candidates = [
            TransferCandidate(
                node_id=h.node_id,
                voter=h.node_id in voters,
                drain_state=DrainState.DRAINING if h.node_id in scenario.drain else h.drain_state,
                last_contact_seconds=h.last_contact_seconds,
                match_index=h.last_index,
            )
            for h in view.servers
        ]
        leader = transfer_target(
            candidates,
            exclude=gone | {view.leader_node_id},
            contact_threshold_seconds=transfer_contact_seconds,
        )
        if leader == 0 and view.leader_node_id not in gone:
            leader = view.leader_node_id  # a drained leader no voter can relieve stays leader
    warnings: list[WhatIfWarning] = []
    if healthy_voters < quorum:
        warnings.append(WhatIfWarning.QUORUM_LOST)
    elif tolerance == 0:
        warnings.append(WhatIfWarning.FAILURE_TOLERANCE_ZERO)
    if leader != view.leader_node_id:
        warnings.append(WhatIfWarning.LEADER_MOVES)
    if not voters:
        warnings.append(WhatIfWarning.LAST_VOTER)
    if s.min_quorum > 0 and len(voters) < s.min_quorum:
        warnings.append(WhatIfWarning.BELOW_MIN_QUORUM)
    for n in sorted(scenario.promote - scenario.remove):
        h = by_id[n]
        if not h.voter and not _caught_up(h, s):
            warnings.append(WhatIfWarning.NOT_CAUGHT_UP)
            break
    return WhatIf(voters, quorum, healthy_voters, tolerance, leader, tuple(warnings))


def _caught_up(h: ServerHealth, s: AutopilotSettings) -> bool:
    """Within max-trailing-logs of the leader, and heard from at least once."""
    return h.last_index > 0 and h.trailing_logs <= s.max_trailing_logs


def removal_refusal(view: AutopilotView, node_id: int, *, transfer_contact_seconds: float) -> WhatIf | None:
    """The what-if answer when removing ``node_id`` would lose quorum (healthy voters left fewer
    than the new quorum), else None. Used by DELETE /cluster/members/{id} (without force) and by
    autopilot's dead-server cleanup."""
    answer = what_if(
        view, Scenario(remove=frozenset({node_id})), transfer_contact_seconds=transfer_contact_seconds
    )
    return answer if WhatIfWarning.QUORUM_LOST in answer.warnings else None


def without(view: AutopilotView, node_id: int) -> AutopilotView:
    """The view with one server gone from the configuration (nothing else re-measured)."""
    servers = tuple(h for h in view.servers if h.node_id != node_id)
    voters = tuple(h.node_id for h in servers if h.voter)
    healthy_voters = sum(1 for h in servers if h.voter and h.healthy)
    return replace(
        view,
        servers=servers,
        voters=voters,
        healthy_voters=healthy_voters,
        healthy=all(h.healthy for h in servers),
        failure_tolerance=failure_tolerance(healthy_voters, len(voters)),
    )


# --- the autopilot -------------------------------------------------------------------------------


class Autopilot:
    def __init__(self, settings: AutopilotSettings) -> None:
        self.settings = settings
        # node id -> (incarnation, healthy, stable since)
        self._health: dict[int, tuple[str, bool, float]] = {}

    def forget(self, node_id: int) -> None:
        """The server left the configuration: drop its clocks now (see the module docstring)."""
        self._health.pop(node_id, None)

    def evaluate(
        self,
        *,
        now: float,
        leader_id: int,
        leader_term: int,
        leader_last_index: int,
        servers: Sequence[ServerInput],
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
            term_ok = srv.is_leader or srv.last_term == leader_term
            trailing = 0 if srv.is_leader else max(0, leader_last_index - srv.match_index)
            log_ok = trailing <= s.max_trailing_logs
            healthy = status == NodeStatus.ALIVE and term_ok and log_ok
            prev = self._health.get(srv.node_id)
            if prev is None or prev[0] != srv.incarnation or prev[1] != healthy:
                stable_since = now
            else:
                stable_since = prev[2]
            self._health[srv.node_id] = (srv.incarnation, healthy, stable_since)
            reasons: list[Reason] = []
            if not in_contact:
                reasons.append(Reason.NO_CONTACT)
            if srv.left:
                reasons.append(Reason.LEFT)
            if not term_ok:
                reasons.append(Reason.TERM_BEHIND)
            if not log_ok:
                reasons.append(Reason.LOG_BEHIND)
            promotion_at: float | None = None
            if not srv.voter:
                heard = srv.match_index > 0
                if not heard or not log_ok:
                    reasons.append(Reason.NOT_CAUGHT_UP)
                elif healthy and srv.drain_state == DrainState.ACTIVE:
                    reasons.append(Reason.STABILIZING)
                    promotion_at = stable_since + s.server_stabilization_seconds
            if srv.drain_state == DrainState.DRAINING:
                reasons.append(Reason.DRAINING)
            elif srv.drain_state == DrainState.DRAINED:
                reasons.append(Reason.DRAINED)
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
                    trailing_logs=trailing,
                    drain_state=srv.drain_state,
                    reasons=tuple(sorted(reasons, key=_REASON_ORDER.index)),
                    promotion_at=promotion_at,
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
            healthy_voters=healthy_voters,
            settings=s,
        )

    def decide(
        self, view: AutopilotView, now: float, *, transfer_contact_seconds: float | None = None
    ) -> Decisions:
        """Promote every stabilizing server whose ``promotionAt`` has come; with
        cleanup-dead-servers, remove failed servers (never a majority at once, never below
        min-quorum, never when what-if says the removal loses quorum)."""
        s = self.settings
        promote = tuple(
            h.node_id for h in view.servers if h.promotion_at is not None and now >= h.promotion_at
        )
        remove: list[int] = []
        refused: list[int] = []
        if s.cleanup_dead_servers:
            contact = (
                s.last_contact_threshold_seconds
                if transfer_contact_seconds is None
                else transfer_contact_seconds
            )
            voters = len(view.voters)
            failed = [h for h in view.servers if h.node_status == NodeStatus.FAILED and not h.is_leader]
            failed_voters = [h for h in failed if h.voter]
            # Never a majority at once, never below min-quorum.
            if len(failed_voters) <= (voters - 1) // 2:
                budget = voters - max(s.min_quorum, 1)
                after = view
                for h in failed:
                    if h.voter:
                        if budget <= 0:
                            continue
                        if removal_refusal(after, h.node_id, transfer_contact_seconds=contact) is not None:
                            refused.append(h.node_id)
                            continue
                        budget -= 1
                    remove.append(h.node_id)
                    after = without(after, h.node_id)
        return Decisions(promote=promote, remove=tuple(remove), refused=tuple(refused))


_REASON_ORDER = list(Reason)
