"""Checkers over a chaos history and the healed cluster's final state.

1. ``check_exclusive``: no address (and no (pool, holder)) is ever held by two leases at once.
   A lease id is never reused, so a lease is alive over one contiguous interval. Each observation
   (an acknowledged allocate answer, a read that lists it) proves the lease alive at some instant
   inside that operation's [invoke, complete]. So the lease is certainly alive over
   [earliest completion, latest invocation] of its observations, and at some point of each
   observation. Two leases on one address overlap for certain when their certain intervals
   intersect, or when one observation of one lies wholly inside the other's certain interval.
   A single read listing one address or holder twice, or one lease id with two different
   addresses/holders anywhere, is also a violation.
2. ``check_durable``: every acknowledged allocation is in the final lease table unless a release
   of it was acknowledged or is indeterminate, or a removal (acknowledged or indeterminate) of a
   node that may have owned it purged it (removal purges the node's leases). Every lease
   in the final table comes from some allocate of its holder that was not a definite failure.
3. Linearizability lives in ``tests.chaos.linearizability``.
4. ``check_converged``: after healing, every node reports the same appliedIndex, leader and lease
   list, and autopilot (from the leader) is healthy with the full failure tolerance.
5. Isolation fencing: ``check_fenced_silent`` (sampled /status during the run) and
   ``check_fence_logs`` (each node's log): no node announces a prefix while it is fenced;
   ``check_announcements`` after every heal: the union of announced prefixes equals the active
   leases of the active nodes.

Each checker returns a list of ``Violation`` (empty = pass); they are pure functions of data so
the unit tests feed them synthetic histories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.chaos.history import ALLOCATE, FAIL, OK, READ, RELEASE, REMOVE, History, LeaseObs


@dataclass(frozen=True, slots=True)
class Violation:
    checker: str
    message: str
    ops: tuple[int, ...] = ()

    def __str__(self) -> str:
        refs = f" (ops {list(self.ops)})" if self.ops else ""
        return f"[{self.checker}] {self.message}{refs}"


@dataclass(slots=True)
class _Life:
    lease: LeaseObs
    evidence: list[tuple[float, float, int]] = field(default_factory=list)  # (invoke, complete, op)

    def certain(self) -> tuple[float, float] | None:
        lo = min(c for _i, c, _o in self.evidence)
        hi = max(i for i, _c, _o in self.evidence)
        return (lo, hi) if lo < hi else None


def _overlap_certain(a: _Life, b: _Life) -> tuple[int, int] | None:
    """Op ids proving ``a`` and ``b`` alive at one instant, or None."""
    ca, cb = a.certain(), b.certain()
    if ca and cb and ca[0] < cb[1] and cb[0] < ca[1]:
        return (a.evidence[0][2], b.evidence[0][2])
    for c, other in ((ca, b), (cb, a)):
        if c is None:
            continue
        for i, comp, op in other.evidence:
            if c[0] < i and comp < c[1]:
                return (op, (a if other is b else b).evidence[0][2])
    return None


def check_exclusive(history: History) -> list[Violation]:
    out: list[Violation] = []
    lives: dict[int, _Life] = {}

    def observe(lease: LeaseObs, invoke: float, complete: float, op_id: int) -> None:
        life = lives.get(lease.lease_id)
        if life is None:
            life = lives[lease.lease_id] = _Life(lease)
        elif (life.lease.pool, life.lease.address, life.lease.holder) != (
            lease.pool,
            lease.address,
            lease.holder,
        ):
            out.append(
                Violation(
                    "exclusive",
                    f"lease {lease.lease_id} seen as {life.lease.holder}@{life.lease.address} "
                    f"and as {lease.holder}@{lease.address}",
                    (life.evidence[0][2], op_id),
                )
            )
        life.evidence.append((invoke, complete, op_id))

    for op in history.ops:
        if op.status != OK:
            continue
        if op.kind == ALLOCATE and op.lease is not None:
            observe(op.lease, op.invoke, op.complete, op.op_id)
        elif op.kind == READ and op.leases is not None:
            seen_addr: dict[tuple[str, str], int] = {}
            seen_holder: dict[tuple[str, str], int] = {}
            for lease in op.leases:
                for index, key, what in (
                    (seen_addr, (lease.pool, lease.address), "address"),
                    (seen_holder, (lease.pool, lease.holder), "holder"),
                ):
                    if key in index and index[key] != lease.lease_id:
                        out.append(
                            Violation(
                                "exclusive",
                                f"one read lists {what} {key[1]} in leases {index[key]} and {lease.lease_id}",
                                (op.op_id,),
                            )
                        )
                    index[key] = lease.lease_id
                observe(lease, op.invoke, op.complete, op.op_id)

    for what in ("address", "holder"):
        groups: dict[tuple[str, str], list[_Life]] = {}
        for life in lives.values():
            key = (life.lease.pool, life.lease.address if what == "address" else life.lease.holder)
            groups.setdefault(key, []).append(life)
        for key, group in sorted(groups.items()):
            group.sort(key=lambda lf: lf.lease.lease_id)
            for i, a in enumerate(group):
                for b in group[i + 1 :]:
                    proof = _overlap_certain(a, b)
                    if proof:
                        out.append(
                            Violation(
                                "exclusive",
                                f"{what} {key[1]} (pool {key[0]}) held by leases {a.lease.lease_id} "
                                f"({a.lease.holder}@{a.lease.address}) and {b.lease.lease_id} "
                                f"({b.lease.holder}@{b.lease.address}) at the same time",
                                proof,
                            )
                        )
    return out


def check_durable(history: History, final: list[LeaseObs]) -> list[Violation]:
    out: list[Violation] = []
    final_by_id = {lease.lease_id: lease for lease in final}
    released: set[int] = set()
    removed_nodes: set[int] = set()
    owners_of: dict[tuple[str, str], set[int]] = {}  # (pool, holder) -> nodes it may have been owned by
    attempted: set[tuple[str, str]] = set()
    acked: dict[int, tuple[LeaseObs, int]] = {}
    for op in history.ops:
        if op.kind == RELEASE and op.status != FAIL:
            released.add(op.lease_id)
        elif op.kind == REMOVE and op.status != FAIL:
            removed_nodes.add(op.owner)
        elif op.kind == ALLOCATE and op.status != FAIL:
            attempted.add((op.pool, op.holder))
            owners_of.setdefault((op.pool, op.holder), set()).add(op.owner)
            if op.status == OK and op.lease is not None:
                owners_of[(op.pool, op.holder)].add(op.lease.node_id)
                acked[op.lease.lease_id] = (op.lease, op.op_id)
    for lease_id, (lease, op_id) in sorted(acked.items()):
        now = final_by_id.get(lease_id)
        if now is not None:
            if (now.pool, now.address, now.holder) != (lease.pool, lease.address, lease.holder):
                out.append(
                    Violation(
                        "durable",
                        f"lease {lease_id} acknowledged as {lease.holder}@{lease.address}, "
                        f"final state has {now.holder}@{now.address}",
                        (op_id,),
                    )
                )
            continue
        if lease_id in released:
            continue
        if owners_of.get((lease.pool, lease.holder), set()) & removed_nodes:
            continue
        out.append(
            Violation(
                "durable",
                f"acknowledged lease {lease_id} ({lease.holder}@{lease.address} on node "
                f"{lease.node_id}) is missing after healing, never released and its owner never removed",
                (op_id,),
            )
        )
    for lease in final:
        if (lease.pool, lease.holder) not in attempted:
            out.append(
                Violation(
                    "durable",
                    f"final lease {lease.lease_id} ({lease.holder}@{lease.address}) "
                    "was never requested by any client",
                )
            )
    return out


@dataclass(slots=True)
class NodeView:
    """What one node reports after healing."""

    node_id: int
    status: dict[str, Any] | None  # /api/v1/status result, None when unreachable
    leases: list[LeaseObs] | None  # local (non-consistent) lease listing


def check_converged(
    views: list[NodeView], autopilot: dict[str, Any] | None, expected_voters: int
) -> list[Violation]:
    out: list[Violation] = []
    for v in views:
        if v.status is None or v.leases is None:
            out.append(Violation("converged", f"node {v.node_id} did not answer"))
    answered = [v for v in views if v.status is not None and v.leases is not None]
    applied = {v.node_id: v.status.get("appliedIndex") for v in answered if v.status}
    if len(set(applied.values())) > 1:
        out.append(Violation("converged", f"appliedIndex differs between nodes: {applied}"))
    leaders = {v.node_id: v.status.get("leaderNodeId") for v in answered if v.status}
    if len(set(leaders.values())) > 1 or None in leaders.values() or 0 in leaders.values():
        out.append(Violation("converged", f"nodes disagree on the leader: {leaders}"))
    roles = [v.node_id for v in answered if v.status and v.status.get("role") == "leader"]
    if len(roles) != 1:
        out.append(Violation("converged", f"expected exactly one leader, nodes {roles} say leader"))
    if answered:
        ref = answered[0]
        for v in answered[1:]:
            if v.leases != ref.leases:
                a = {x.lease_id for x in ref.leases or []}
                b = {x.lease_id for x in v.leases or []}
                out.append(
                    Violation(
                        "converged",
                        f"lease lists differ: node {ref.node_id} has {len(a)}, node {v.node_id} "
                        f"{len(b)}; only on {ref.node_id}: {sorted(a - b)[:10]}, only on "
                        f"{v.node_id}: {sorted(b - a)[:10]}",
                    )
                )
    if autopilot is None:
        out.append(Violation("converged", "autopilot state unavailable"))
        return out
    want_tol = expected_voters - (expected_voters // 2 + 1)
    voters = autopilot.get("voters") or []
    if not autopilot.get("healthy"):
        bad = [s.get("nodeId") for s in autopilot.get("servers", []) if not s.get("healthy")]
        out.append(Violation("converged", f"autopilot not healthy (unhealthy servers {bad})"))
    if autopilot.get("failureTolerance") != want_tol:
        out.append(
            Violation(
                "converged",
                f"autopilot failureTolerance {autopilot.get('failureTolerance')}, expected {want_tol}",
            )
        )
    if len(voters) != expected_voters:
        out.append(Violation("converged", f"autopilot voters {voters}, expected {expected_voters}"))
    return out


# --- 5. isolation fencing -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeakerSample:
    """One node's /status at one moment: its fence and its speaker."""

    at: float
    node_id: int
    isolated: bool
    running: bool
    announced: int


def check_fenced_silent(samples: list[SpeakerSample], withdraw_grace: float = 0.0) -> list[Violation]:
    """No node runs its speaker while it reports itself fenced, nor announces a prefix. A real
    speaker's announcements are read back from the speaker process, so they reach zero a moment
    after the fence: ``withdraw_grace`` seconds after the first fenced sample of a fenced spell
    (the stub: 0, at once). The route collector checks the same from the network's side."""
    out: list[Violation] = []
    fenced_since: dict[int, float] = {}
    for s in sorted(samples, key=lambda x: x.at):
        if not s.isolated:
            fenced_since.pop(s.node_id, None)
            continue
        since = fenced_since.setdefault(s.node_id, s.at)
        if s.running or (s.announced > 0 and s.at - since >= withdraw_grace):
            out.append(
                Violation(
                    "fencing",
                    f"t={s.at:.3f}: node {s.node_id} is fenced but its speaker "
                    f"{'runs' if s.running else 'stopped'} with {s.announced} prefixes announced",
                )
            )
    return out


def _log_time(line: str) -> datetime | None:
    try:
        return datetime.fromisoformat(line[:24].replace("Z", "+00:00"))
    except ValueError:
        return None


def check_fence_logs(logs: dict[int, str], in_flight_grace: float = 0.0) -> list[Violation]:
    """From each node's log: between ``node_isolated`` and the next ``node_rejoined`` (or the end
    of that process: a restart banner) the speaker neither starts nor announces anything.

    A real speaker logs ``bgp_announce`` when the speaker process confirms a change, so a change
    sent before the fence (say, just before a SIGSTOP) may be confirmed after it: such a line is
    allowed within ``in_flight_grace`` seconds of ``node_isolated`` (the stub: 0, never). A start
    of the speaker is never allowed."""
    out: list[Violation] = []
    for nid, text in sorted(logs.items()):
        fenced_since = ""
        for line in text.splitlines():
            if line.startswith("===== start") or " node_rejoined " in line:
                fenced_since = ""
            elif " node_isolated " in line:
                fenced_since = line[:24]
            elif fenced_since and (" bgp_speaker_started" in line or " bgp_announce " in line):
                since, at = _log_time(fenced_since), _log_time(line)
                in_flight = (
                    " bgp_announce " in line
                    and since is not None
                    and at is not None
                    and (at - since).total_seconds() < in_flight_grace
                )
                if in_flight:
                    continue
                out.append(
                    Violation(
                        "fencing",
                        f"node {nid} changed its speaker while fenced (since {fenced_since}): {line[:160]}",
                    )
                )
    return out


@dataclass(frozen=True, slots=True)
class SpeakerView:
    """After a heal: what a node announces and what its own replica says it owns."""

    node_id: int
    isolated: bool
    running: bool
    announced: int
    sample: tuple[str, ...]
    drain_state: str
    owned: int  # this node's active leases, per its own replica


def check_announcements(
    views: list[SpeakerView], leases: list[LeaseObs] | None, label: str
) -> list[Violation]:
    """The union of announced prefixes equals the host routes of the active nodes' active leases:
    every active node announces exactly the leases it owns (count, and its sample are its own),
    every draining or drained node announces nothing, and no node is fenced."""
    out: list[Violation] = []
    routes: dict[int, set[str]] = {}
    for x in leases or []:
        routes.setdefault(x.node_id, set()).add(f"{x.address}/{128 if ':' in x.address else 32}")
    for v in views:
        active = v.drain_state == "active"
        want = v.owned if active else 0
        problem = ""
        if v.isolated:
            problem = "is still fenced"
        elif v.running != active:
            problem = f"speaker running={v.running} while {v.drain_state}"
        elif v.announced != want:
            problem = f"announces {v.announced} prefixes, owns {want} active leases"
        elif leases is not None and not set(v.sample) <= routes.get(v.node_id, set()):
            problem = f"announces {sorted(set(v.sample) - routes.get(v.node_id, set()))[:5]} it does not own"
        if problem:
            out.append(Violation("announcements", f"{label}: node {v.node_id} {problem}"))
    return out


def check_no_unauthorized_membership_change(
    observations: list[tuple[str, Any, Any]],
) -> list[Violation]:
    """No membership change without an authorized API request: around each attempt made without
    one (the rogue member's hostile internal RPCs), the members -- ids, suffrage, drain state,
    addresses -- read through the leader are the same before and after. An observation that could
    not be read (None) is reported too: the check must not pass by not looking."""
    out: list[Violation] = []
    for what, before, after in observations:
        if before is None or after is None:
            out.append(Violation("unauthorized_membership", f"{what}: members could not be read"))
        elif before != after:
            out.append(
                Violation(
                    "unauthorized_membership",
                    f"{what}: members changed without an authorized API request: {before} -> {after}",
                )
            )
    return out
