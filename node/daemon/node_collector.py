"""The node's state gauges, computed at scrape time: one scrape is one consistent view.

Raft gauges, the leader's peer view, the member registry series and the leader's autopilot
gauges all come from one ``NodeView`` that the collector asks its source for when Prometheus
scrapes (prometheus-client calls ``collect`` on the event loop thread, inside the API's /metrics
handler, so the view is taken between two steps of the loop and can never disagree with itself).
Nothing is polled and nothing is cached: a node that stops leading exports no peer or autopilot
series in the very next scrape, and a removed member's series vanish with it.

``node_view(node, core, tick_seconds, autopilot)`` builds the view from the engine status and the
member registry; the daemon passes the leader's autopilot evaluation (the same one
``GET /cluster/autopilot`` answers with) or ``None`` on other nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

MIN_NODE_ID = 1
MAX_NODE_ID = 63
RAFT_STATES: tuple[str, ...] = ("leader", "follower", "candidate")
DRAIN_STATES: tuple[str, ...] = ("active", "draining", "drained")


class PeerStatusLike(Protocol):
    """What the collector reads of one peer in ``RaftCore.status()``."""

    @property
    def node_id(self) -> int: ...

    @property
    def match_index(self) -> int: ...

    @property
    def last_contact_ticks(self) -> int: ...


class ConfigurationLike(Protocol):
    @property
    def voters(self) -> AbstractSet[int]: ...

    @property
    def nonvoters(self) -> AbstractSet[int]: ...


class RaftStatusLike(Protocol):
    """What the collector reads of ``RaftCore.status()``."""

    @property
    def node_id(self) -> int: ...

    @property
    def role(self) -> IntEnum: ...  # FOLLOWER, PRE_CANDIDATE, CANDIDATE, LEADER

    @property
    def term(self) -> int: ...

    @property
    def leader_id(self) -> int: ...

    @property
    def commit_index(self) -> int: ...

    @property
    def applied_index(self) -> int: ...

    @property
    def last_index(self) -> int: ...

    @property
    def config(self) -> ConfigurationLike: ...

    @property
    def peers(self) -> Sequence[PeerStatusLike]: ...


class RaftCoreLike(Protocol):
    def status(self) -> RaftStatusLike: ...


class MemberLike(Protocol):
    @property
    def node_id(self) -> int: ...

    @property
    def drain_state(self) -> str: ...

    @property
    def drain_deadline(self) -> float | None: ...  # unix time, only while draining with a deadline


class RegistryLike(Protocol):
    def members(self) -> Sequence[MemberLike]: ...

    def active_lease_count(self, node_id: int) -> int: ...


class NodeLike(Protocol):
    @property
    def sm(self) -> RegistryLike: ...


class AutopilotServerLike(Protocol):
    """What the collector reads of each server (``quorumd.node.registry.autopilot.ServerHealth`` fits)."""

    @property
    def node_id(self) -> int: ...

    @property
    def healthy(self) -> bool: ...


class AutopilotViewLike(Protocol):
    """What the collector reads of a view (``quorumd.node.registry.autopilot.AutopilotView`` fits)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def failure_tolerance(self) -> int: ...

    @property
    def servers(self) -> Iterable[AutopilotServerLike]: ...


def node_label(node_id: int) -> str:
    """A node id as a label value; only 1..63 (bounded cardinality)."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not MIN_NODE_ID <= node_id <= MAX_NODE_ID:
        raise ValueError(f"node id must be an integer in {MIN_NODE_ID}..{MAX_NODE_ID}, got {node_id!r}")
    return str(node_id)


@dataclass(frozen=True, slots=True)
class MemberView:
    drain_state: str  # active, draining or drained
    active_leases: int
    drain_deadline: float | None = None  # only while draining with a deadline


@dataclass(frozen=True, slots=True)
class AutopilotGauges:
    healthy: bool
    failure_tolerance: int
    servers: Mapping[int, bool]  # node id -> healthy


@dataclass(frozen=True, slots=True)
class NodeView:
    """Everything the state gauges show, taken at one instant."""

    role: str  # leader, follower or candidate
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0
    last_index: int = 0
    has_leader: bool = False
    voters: int = 0
    nonvoters: int = 0
    peers: Mapping[int, tuple[int, float]] = field(default_factory=dict)  # leader: lag, last contact s
    members: Mapping[int, MemberView] = field(default_factory=dict)
    autopilot: AutopilotGauges | None = None  # leader only
    node_id: int = 0  # this node (0: not known yet)
    certificate_expiry: float | None = None  # notAfter of this node's certificate (unix seconds)

    def __post_init__(self) -> None:
        if self.role not in RAFT_STATES:
            raise ValueError(f"role must be one of {RAFT_STATES}, got {self.role!r}")
        for node_id, member in self.members.items():
            node_label(node_id)
            if member.drain_state not in DRAIN_STATES:
                raise ValueError(f"drain state must be one of {DRAIN_STATES}, got {member.drain_state!r}")
        for node_id in self.peers:
            node_label(node_id)
        if self.autopilot is not None:
            for node_id in self.autopilot.servers:
                node_label(node_id)


def autopilot_gauges(view: AutopilotViewLike) -> AutopilotGauges:
    return AutopilotGauges(
        bool(view.healthy), max(0, int(view.failure_tolerance)), {s.node_id: s.healthy for s in view.servers}
    )


def node_view(
    node: NodeLike,
    core: RaftCoreLike,
    tick_seconds: float,
    autopilot: AutopilotViewLike | None,
    certificate_expiry: float | None = None,
) -> NodeView:
    """The view of ``core.status()`` and the registry (a pre-candidate counts as ``candidate``);
    peers only on the leader (lag = leader's last index - peer's match index, last contact =
    ticks x ``tick_seconds``)."""
    st = core.status()
    role = "candidate" if "CANDIDATE" in st.role.name else st.role.name.lower()
    peers = {}
    if role == "leader":
        peers = {
            p.node_id: (max(0, st.last_index - p.match_index), p.last_contact_ticks * tick_seconds)
            for p in st.peers
            if p.node_id != st.node_id
        }
    registry = node.sm
    members = {}
    for m in registry.members():
        state = str(m.drain_state)
        deadline = m.drain_deadline if state == "draining" else None
        members[m.node_id] = MemberView(state, registry.active_lease_count(m.node_id), deadline)
    return NodeView(
        role=role,
        term=st.term,
        commit_index=st.commit_index,
        applied_index=st.applied_index,
        last_index=st.last_index,
        has_leader=st.leader_id != 0,
        voters=len(st.config.voters),
        nonvoters=len(st.config.nonvoters),
        peers=peers,
        members=members,
        autopilot=autopilot_gauges(autopilot) if autopilot is not None and role == "leader" else None,
        node_id=st.node_id,
        certificate_expiry=certificate_expiry,
    )


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class NodeCollector:
    """A prometheus-client collector over ``source()``; before a source is set (or when it
    returns ``None``) it exports a follower with no leader."""

    def __init__(self) -> None:
        self.source: Callable[[], NodeView | None] | None = None

    def describe(self) -> Iterator[Metric]:
        yield from self._families(NodeView("follower"), with_leader_series=True)

    def collect(self) -> Iterator[Metric]:
        view = self.source() if self.source is not None else None
        yield from self._families(
            view if view is not None else NodeView("follower"), with_leader_series=False
        )

    @staticmethod
    def _families(v: NodeView, *, with_leader_series: bool) -> Iterator[Metric]:
        state = _gauge("quorumd_raft_state", "1 for the node's current Raft role.", ["state"])
        for s in RAFT_STATES:
            state.add_metric([s], 1.0 if s == v.role else 0.0)
        yield state
        for name, doc, value in (
            ("quorumd_raft_has_leader", "1 when a leader is known.", 1 if v.has_leader else 0),
            ("quorumd_raft_term", "Current Raft term.", v.term),
            ("quorumd_raft_commit_index", "Highest committed log index.", v.commit_index),
            ("quorumd_raft_applied_index", "Highest applied log index.", v.applied_index),
            ("quorumd_raft_last_log_index", "Last index in the local log.", v.last_index),
            ("quorumd_raft_voters", "Voters in the current configuration.", v.voters),
            ("quorumd_raft_nonvoters", "Nonvoters in the current configuration.", v.nonvoters),
        ):
            g = _gauge(name, doc)
            g.add_metric([], float(value))
            yield g
        lag = _gauge(
            "quorumd_raft_peer_replication_lag_entries",
            "Entries the peer is behind the leader's last index (leader only).",
            ["node_id"],
        )
        contact = _gauge(
            "quorumd_raft_peer_last_contact_seconds",
            "Seconds since the leader last heard from the peer (leader only).",
            ["node_id"],
        )
        for node_id in sorted(v.peers):
            peer_lag, peer_contact = v.peers[node_id]
            lag.add_metric([str(node_id)], float(max(0, peer_lag)))
            contact.add_metric([str(node_id)], max(0.0, float(peer_contact)))
        yield lag
        yield contact
        drain = _gauge(
            "quorumd_drain_state", "1 for the member's drain state (one-hot).", ["node_id", "state"]
        )
        leases = _gauge("quorumd_leases_active", "Active leases owned by the member.", ["node_id"])
        deadline = _gauge(
            "quorumd_drain_deadline_timestamp_seconds",
            "Unix time at which the member's drain deadline passes (only while draining with a deadline).",
            ["node_id"],
        )
        for node_id in sorted(v.members):
            m = v.members[node_id]
            for s in DRAIN_STATES:
                drain.add_metric([str(node_id), s], 1.0 if s == m.drain_state else 0.0)
            leases.add_metric([str(node_id)], float(max(0, m.active_leases)))
            if m.drain_deadline is not None:
                deadline.add_metric([str(node_id)], m.drain_deadline)
        yield drain
        yield leases
        yield deadline
        expiry = _gauge(
            "quorumd_node_certificate_expiry_timestamp_seconds",
            "Unix time at which this node's cluster certificate expires (renewed before).",
            ["node_id"],
        )
        if v.certificate_expiry is not None and v.node_id:
            expiry.add_metric([str(v.node_id)], v.certificate_expiry)
        yield expiry
        if v.autopilot is None and not with_leader_series:
            return
        ap = v.autopilot or AutopilotGauges(False, 0, {})
        healthy = _gauge("quorumd_autopilot_healthy", "1 when every server is healthy (leader only).")
        tolerance = _gauge(
            "quorumd_autopilot_failure_tolerance",
            "Healthy voters that can fail without losing quorum (leader only).",
        )
        server = _gauge(
            "quorumd_autopilot_server_healthy",
            "1 when autopilot considers the server healthy (leader only).",
            ["node_id"],
        )
        if v.autopilot is not None:
            healthy.add_metric([], 1.0 if ap.healthy else 0.0)
            tolerance.add_metric([], float(ap.failure_tolerance))
            for node_id in sorted(ap.servers):
                server.add_metric([str(node_id)], 1.0 if ap.servers[node_id] else 0.0)
        yield healthy
        yield tolerance
        yield server
