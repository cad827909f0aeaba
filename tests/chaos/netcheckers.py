"""Checkers of the network-facing side of a chaos run (the lease checkers are in ``checkers``).

6. ``check_moves``: after every move of a node to a new address, every running node's members
   list (its own replica) shows the moved node at its new ``raftAddress`` and ``apiAddress``, the
   moved node is ready, and some operation through its new API address succeeded after it started
   there (the nemesis' probe read or a workload client's operation: the node serves again). After
   the final heal every node lists every member at the address it has now.
7. ``check_routes``: every wait for the route collector's RIB to reach the intended state (a
   drained, fenced or stopped node's routes withdrawn; after quiescence, each active running
   node's routes = the host routes of its active leases with its current address as next hop)
   held within its bound. The records come from ``tests.chaos.collector.RouteWatch``.

Pure functions of recorded data, like ``checkers``; the unit tests feed them synthetic records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tests.chaos.checkers import Violation
from tests.chaos.collector import RouteCheck
from tests.chaos.history import OK, History

Listing = dict[int, tuple[str, str]]  # member id -> (raftAddress, apiAddress)


@dataclass(frozen=True, slots=True)
class MoveRecord:
    """One move: where the node went and what the cluster said once it settled (or gave up)."""

    node: int
    at: float  # run time of the start at the new address
    old_raft: str
    raft: str  # the new raftAddress, host:port
    api: str  # the new apiAddress, https://host:port
    # each running node -> the moved node's (raftAddress, apiAddress) in its members list (None: absent)
    listings: dict[int, tuple[str, str] | None] = field(default_factory=dict)
    ready: bool = False  # the moved node answered /status ready
    settled_seconds: float | None = None  # start to ready + listed everywhere + a probe served; None: never


def check_moves(
    moves: list[MoveRecord],
    history: History,
    final: Mapping[int, Listing | None] | None = None,
    current: Listing | None = None,
) -> list[Violation]:
    out: list[Violation] = []
    for m in moves:
        what = f"move of node {m.node} to {m.raft} at t={m.at:.1f}s"
        if m.raft == m.old_raft:
            out.append(Violation("moves", f"{what}: the address did not change"))
        if not m.listings:
            out.append(Violation("moves", f"{what}: no node's members list was read"))
        for observer, entry in sorted(m.listings.items()):
            if entry != (m.raft, m.api):
                out.append(Violation("moves", f"{what}: node {observer} lists it at {entry}, not {m.raft}"))
        if not m.ready:
            out.append(Violation("moves", f"{what}: the node never reported ready at its new address"))
        served = [
            op.op_id for op in history.ops if op.node == m.node and op.addr == m.api and op.status == OK
            and op.invoke >= m.at
        ]  # fmt: skip
        if not served:
            out.append(Violation("moves", f"{what}: no operation through {m.api} succeeded after the move"))
    if final is not None and current is not None:
        for observer, listing in sorted(final.items()):
            if listing is None:
                out.append(Violation("moves", f"after the final heal, node {observer}'s members unread"))
                continue
            for member, want in sorted(current.items()):
                if listing.get(member) != want:
                    out.append(
                        Violation(
                            "moves",
                            f"after the final heal node {observer} lists node {member} at "
                            f"{listing.get(member)}, it is at {want}",
                        )
                    )
    return out


def check_routes(checks: list[RouteCheck]) -> list[Violation]:
    return [
        Violation(
            "routes",
            f"t={c.at:.1f}s {c.label}: the collector's RIB did not reach the intended state "
            f"within the bound: {'; '.join(c.last_diff) or 'no difference recorded'}",
        )
        for c in checks
        if c.seconds is None
    ]
