"""The node's Prometheus metrics (SPEC section 9): one registry, typed setters fed with plain values.

``Metrics`` owns a ``CollectorRegistry`` holding every ``quorumd_*`` series of the node layer (plus the
process/platform/GC collectors). The HTTP layer registers its own request metrics
(``quorumd_api_requests_total``, ``quorumd_api_request_duration_seconds``; see ``API_METRIC_NAMES``) on
``Metrics.registry``; ``render()`` serves the whole registry.

Choices:

- Base units and ``_total`` counters; commit and fsync latencies are histograms with buckets from
  0.1 ms to 5 s (``LATENCY_BUCKETS_SECONDS``).
- Node ids used as label values are checked to be 1..63 (bounded cardinality); other free-form label
  values (refusal reasons) are squashed to ``other`` unless they are short snake_case words.
- Leader-only views disappear on a node that stops leading instead of freezing at stale values:
  peer replication series are removed by ``clear_peers`` (or replaced wholesale by ``set_peers``), and the
  autopilot series (``quorumd_autopilot_*``) come from a custom collector that exports nothing until
  ``set_autopilot`` gives it a view and again after ``set_autopilot(None)``. Alert rules therefore
  aggregate with ``max``/``min`` across instances.
- Member-registry series (``quorumd_drain_state``, ``quorumd_leases_active``,
  ``quorumd_drain_deadline_timestamp_seconds``) are exported by every node from its replica;
  ``set_members`` replaces the whole set so removed members' series vanish. The drain deadline (unix
  time) exists only while a member drains with a deadline, so an alert can tell a drain that is
  legitimately waiting for its deadline from one that is stuck.
- ``quorumd_raft_state{state}`` and ``quorumd_drain_state{node_id,state}`` are one-hot.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import IntEnum
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from quorumd.api.metrics import LoopHistogram

__all__ = [
    "API_METRIC_NAMES",
    "DRAIN_STATES",
    "JOIN_TOKEN_RESULTS",
    "LATENCY_BUCKETS_SECONDS",
    "RAFT_STATES",
    "AutopilotServerLike",
    "AutopilotViewLike",
    "Metrics",
    "NodeLike",
    "RaftCoreLike",
]

MIN_NODE_ID = 1
MAX_NODE_ID = 63
RAFT_STATES: tuple[str, ...] = ("leader", "follower", "candidate")
DRAIN_STATES: tuple[str, ...] = ("active", "draining", "drained")
JOIN_TOKEN_RESULTS: tuple[str, ...] = ("minted", "consumed", "rejected")
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Registered by the HTTP layer (quorumd.api.metrics) on Metrics.registry, not here.
API_METRIC_NAMES: tuple[str, ...] = ("quorumd_api_requests_total", "quorumd_api_request_duration_seconds")
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class PeerStatusLike(Protocol):
    """A peer's replication state as the leader sees it (``quorumd.raft.core.ready.PeerStatus`` fits)."""

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
    """What ``update_from`` reads of the engine's status (``quorumd.raft.core.ready.Status`` fits)."""

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
    """The replicated member registry (``quorumd.node.registry.state.StateMachine`` fits)."""

    def members(self) -> Sequence[MemberLike]: ...

    def active_lease_count(self, node_id: int) -> int: ...


class NodeLike(Protocol):
    @property
    def sm(self) -> RegistryLike: ...


class AutopilotServerLike(Protocol):
    """What ``set_autopilot`` reads of each server (``quorumd.node.registry.autopilot.ServerHealth`` fits)."""

    @property
    def node_id(self) -> int: ...

    @property
    def healthy(self) -> bool: ...


class AutopilotViewLike(Protocol):
    """What ``set_autopilot`` reads of a view (``quorumd.node.registry.autopilot.AutopilotView`` fits)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def failure_tolerance(self) -> int: ...

    @property
    def servers(self) -> Iterable[AutopilotServerLike]: ...


def _node_label(node_id: int) -> str:
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not MIN_NODE_ID <= node_id <= MAX_NODE_ID:
        raise ValueError(f"node id must be an integer in {MIN_NODE_ID}..{MAX_NODE_ID}, got {node_id!r}")
    return str(node_id)


class _AutopilotCollector:
    """Leader-only autopilot gauges: exported only while a view is set."""

    def __init__(self) -> None:
        self.view: tuple[bool, int, tuple[tuple[int, bool], ...]] | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("quorumd_autopilot_healthy", "1 when every server is healthy (leader only)."),
            GaugeMetricFamily(
                "quorumd_autopilot_failure_tolerance",
                "Healthy voters that can fail without losing quorum (leader only).",
            ),
            GaugeMetricFamily(
                "quorumd_autopilot_server_healthy",
                "1 when autopilot considers the server healthy (leader only).",
                labels=["node_id"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        view = self.view
        if view is None:
            return
        healthy, tolerance, servers = view
        h, ft, sh = self._families()
        h.add_metric([], 1.0 if healthy else 0.0)
        ft.add_metric([], float(tolerance))
        for node_id, ok in servers:
            sh.add_metric([str(node_id)], 1.0 if ok else 0.0)
        yield h
        yield ft
        yield sh


class Metrics:
    """Every node-layer metric on one registry; setters take plain values."""

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Gauge("quorumd_build_info", "Build information; always 1.", ["version"], registry=r)
        self.build_info.labels(version).set(1)

        # --- raft ---------------------------------------------------------------------------------
        self.raft_state = Gauge(
            "quorumd_raft_state", "1 for the node's current Raft role.", ["state"], registry=r
        )
        for state in RAFT_STATES:
            self.raft_state.labels(state).set(1 if state == "follower" else 0)
        self.raft_has_leader = Gauge("quorumd_raft_has_leader", "1 when a leader is known.", registry=r)
        self.raft_term = Gauge("quorumd_raft_term", "Current Raft term.", registry=r)
        self.raft_commit_index = Gauge(
            "quorumd_raft_commit_index", "Highest committed log index.", registry=r
        )
        self.raft_applied_index = Gauge(
            "quorumd_raft_applied_index", "Highest applied log index.", registry=r
        )
        self.raft_last_log_index = Gauge(
            "quorumd_raft_last_log_index", "Last index in the local log.", registry=r
        )
        self.raft_leader_changes = Counter(
            "quorumd_raft_leader_changes_total", "Leader changes observed by this node.", registry=r
        )
        self.raft_voters = Gauge("quorumd_raft_voters", "Voters in the current configuration.", registry=r)
        self.raft_nonvoters = Gauge(
            "quorumd_raft_nonvoters", "Nonvoters in the current configuration.", registry=r
        )
        # observed per write / per batch on the event-loop thread: see quorumd.api.metrics
        self.raft_commit_duration = LoopHistogram(
            "quorumd_raft_commit_duration_seconds",
            "Time from proposal to commit on the leader.",
            (),
            r,
            buckets=LATENCY_BUCKETS_SECONDS,
        )
        self.raft_fsync_duration = LoopHistogram(
            "quorumd_raft_fsync_duration_seconds",
            "Duration of write-ahead log fsyncs.",
            (),
            r,
            buckets=LATENCY_BUCKETS_SECONDS,
        )
        self.raft_peer_lag = Gauge(
            "quorumd_raft_peer_replication_lag_entries",
            "Entries the peer is behind the leader's last index (leader only).",
            ["node_id"],
            registry=r,
        )
        self.raft_peer_last_contact = Gauge(
            "quorumd_raft_peer_last_contact_seconds",
            "Seconds since the leader last heard from the peer (leader only).",
            ["node_id"],
            registry=r,
        )
        self.raft_snapshots = Counter(
            "quorumd_raft_snapshots_total", "Snapshots taken or installed.", registry=r
        )
        self.storage_retries = Counter(
            "quorumd_raft_storage_retries_total",
            "Storage writes and snapshot saves retried because the process was out of file descriptors.",
            ["what"],
            registry=r,
        )

        # --- autopilot (custom collector, leader only) ----------------------------------------------
        self._autopilot = _AutopilotCollector()
        r.register(self._autopilot)

        # --- member registry ------------------------------------------------------------------------
        self.drain_state = Gauge(
            "quorumd_drain_state",
            "1 for the member's drain state (one-hot).",
            ["node_id", "state"],
            registry=r,
        )
        self.leases_active = Gauge(
            "quorumd_leases_active", "Active leases owned by the member.", ["node_id"], registry=r
        )
        self.drain_deadline = Gauge(
            "quorumd_drain_deadline_timestamp_seconds",
            "Unix time at which the member's drain deadline passes (only while draining with a deadline).",
            ["node_id"],
            registry=r,
        )
        self._members: set[int] = set()

        # --- bgp / ran --------------------------------------------------------------------------------
        self.bgp_speaker_running = Gauge(
            "quorumd_bgp_speaker_running", "1 when the BGP speaker runs.", registry=r
        )
        self.bgp_announced_prefixes = Gauge(
            "quorumd_bgp_announced_prefixes", "Prefixes the BGP speaker announces.", registry=r
        )
        self.ran_notifications = Counter(
            "quorumd_ran_notifications_total", "GUAMI-unavailable events sent to RANs.", registry=r
        )

        # --- join tokens / transport ------------------------------------------------------------------
        self.join_tokens = Counter(
            "quorumd_join_tokens_total",
            "Join tokens by outcome: minted, consumed, rejected.",
            ["result"],
            registry=r,
        )
        for result in JOIN_TOKEN_RESULTS:
            self.join_tokens.labels(result)
        self.transport_frames_dropped = Counter(
            "quorumd_transport_frames_dropped_total",
            "Outgoing cluster frames dropped (queue full or peer unreachable).",
            registry=r,
        )
        self.transport_malformed_frames = Counter(
            "quorumd_transport_malformed_frames_total",
            "Incoming cluster frames that failed to decode or validate.",
            registry=r,
        )
        self.transport_refused_connections = Counter(
            "quorumd_transport_refused_connections_total",
            "Incoming cluster connections refused, by reason.",
            ["reason"],
            registry=r,
        )

    # --- exposition ---------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of the registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample_names(self) -> frozenset[str]:
        """Every sample name this registry can expose (``_total``, ``_bucket``... included)."""
        names: set[str] = set()
        families = [*self.registry.collect(), *self._autopilot.describe()]
        for family in families:
            if family.type == "counter":
                names.update({f"{family.name}_total", f"{family.name}_created"})
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
            else:
                names.add(family.name)
            names.update(sample.name for sample in family.samples)
        return frozenset(names)

    # --- raft ---------------------------------------------------------------------------------------
    def update_raft(
        self,
        role: str,
        term: int,
        commit: int,
        applied: int,
        last_index: int,
        has_leader: bool,
        voters: int,
        nonvoters: int,
    ) -> None:
        """Set the node's Raft gauges; ``role`` is leader, follower or candidate."""
        role = role.lower()
        if role not in RAFT_STATES:
            raise ValueError(f"role must be one of {RAFT_STATES}, got {role!r}")
        for state in RAFT_STATES:
            self.raft_state.labels(state).set(1 if state == role else 0)
        self.raft_term.set(term)
        self.raft_commit_index.set(commit)
        self.raft_applied_index.set(applied)
        self.raft_last_log_index.set(last_index)
        self.raft_has_leader.set(1 if has_leader else 0)
        self.raft_voters.set(voters)
        self.raft_nonvoters.set(nonvoters)

    def update_from(self, node: NodeLike, core: RaftCoreLike, tick_seconds: float) -> None:
        """Refresh every polled gauge from the engine status and the member registry.

        Raft gauges from ``core.status()`` (a pre-candidate counts as ``candidate``); on the leader the
        peer series (lag = leader's last index - peer's match index, last contact = ticks x
        ``tick_seconds``), elsewhere none; drain state and active leases for every registry member.
        """
        st = core.status()
        role = "candidate" if "CANDIDATE" in st.role.name else st.role.name.lower()
        self.update_raft(
            role,
            st.term,
            st.commit_index,
            st.applied_index,
            st.last_index,
            st.leader_id != 0,
            len(st.config.voters),
            len(st.config.nonvoters),
        )
        if role == "leader":
            self.set_peers(
                {
                    p.node_id: (max(0, st.last_index - p.match_index), p.last_contact_ticks * tick_seconds)
                    for p in st.peers
                    if p.node_id != st.node_id
                }
            )
        else:
            self.clear_peers()
        registry = node.sm
        members = registry.members()
        self.set_members(
            {m.node_id: (str(m.drain_state), registry.active_lease_count(m.node_id)) for m in members}
        )
        for m in members:
            draining = str(m.drain_state) == "draining"
            self.set_drain_deadline(m.node_id, m.drain_deadline if draining else None)

    def count_leader_change(self) -> None:
        self.raft_leader_changes.inc()

    def observe_commit(self, seconds: float) -> None:
        self.raft_commit_duration.observe((), max(0.0, seconds))

    def observe_fsync(self, seconds: float) -> None:
        self.raft_fsync_duration.observe((), max(0.0, seconds))

    def count_snapshot(self) -> None:
        self.raft_snapshots.inc()

    def count_storage_retry(self, what: str) -> None:
        self.storage_retries.labels(what=what).inc()

    def set_peer(self, node_id: int, lag_entries: int, last_contact_seconds: float) -> None:
        """Leader view of one peer's replication."""
        label = _node_label(node_id)
        self.raft_peer_lag.labels(label).set(max(0, lag_entries))
        self.raft_peer_last_contact.labels(label).set(max(0.0, last_contact_seconds))

    def remove_peer(self, node_id: int) -> None:
        label = _node_label(node_id)
        for gauge in (self.raft_peer_lag, self.raft_peer_last_contact):
            with contextlib.suppress(KeyError):
                gauge.remove(label)

    def set_peers(self, peers: Mapping[int, tuple[int, float]]) -> None:
        """Replace the leader's peer view: node id -> (lag entries, last contact seconds)."""
        current = {int(labels[0]) for labels in self._label_sets(self.raft_peer_lag)}
        for node_id in sorted(current - set(peers)):
            self.remove_peer(node_id)
        for node_id in sorted(peers):
            lag, contact = peers[node_id]
            self.set_peer(node_id, lag, contact)

    def clear_peers(self) -> None:
        """Drop the peer series (this node is no longer the leader)."""
        self.raft_peer_lag.clear()
        self.raft_peer_last_contact.clear()

    # --- autopilot ----------------------------------------------------------------------------------
    def set_autopilot_values(
        self, healthy: bool, failure_tolerance: int, servers: Mapping[int, bool]
    ) -> None:
        """Leader's autopilot view: overall health, failure tolerance, node id -> server healthy."""
        for node_id in servers:
            _node_label(node_id)
        self._autopilot.view = (
            bool(healthy),
            max(0, int(failure_tolerance)),
            tuple((nid, bool(servers[nid])) for nid in sorted(servers)),
        )

    def set_autopilot(self, view: AutopilotViewLike | None) -> None:
        """Set from an autopilot view, or ``None`` to stop exporting (not the leader)."""
        if view is None:
            self.clear_autopilot()
            return
        self.set_autopilot_values(
            view.healthy, view.failure_tolerance, {s.node_id: s.healthy for s in view.servers}
        )

    def clear_autopilot(self) -> None:
        self._autopilot.view = None

    # --- member registry ----------------------------------------------------------------------------
    def set_drain(self, node_id: int, state: str) -> None:
        """One-hot drain state of a member: active, draining or drained."""
        label = _node_label(node_id)
        if state not in DRAIN_STATES:
            raise ValueError(f"drain state must be one of {DRAIN_STATES}, got {state!r}")
        for s in DRAIN_STATES:
            self.drain_state.labels(label, s).set(1 if s == state else 0)
        self._members.add(node_id)

    def set_leases(self, node_id: int, count: int) -> None:
        """Active leases owned by a member."""
        self.leases_active.labels(_node_label(node_id)).set(max(0, count))
        self._members.add(node_id)

    def set_drain_deadline(self, node_id: int, deadline: float | None) -> None:
        """The unix time a member's drain deadline passes; None (no deadline) drops the series."""
        label = _node_label(node_id)
        if deadline is None:
            with contextlib.suppress(KeyError):
                self.drain_deadline.remove(label)
        else:
            self.drain_deadline.labels(label).set(deadline)

    def remove_member(self, node_id: int) -> None:
        """Drop every per-member series of a removed node (drain, leases, deadline, peer view)."""
        label = _node_label(node_id)
        for s in DRAIN_STATES:
            with contextlib.suppress(KeyError):
                self.drain_state.remove(label, s)
        with contextlib.suppress(KeyError):
            self.leases_active.remove(label)
        with contextlib.suppress(KeyError):
            self.drain_deadline.remove(label)
        self.remove_peer(node_id)
        self._members.discard(node_id)

    def set_members(self, members: Mapping[int, tuple[str, int]]) -> None:
        """Replace the member registry view: node id -> (drain state, active leases)."""
        for node_id in sorted(self._members - set(members)):
            self.remove_member(node_id)
        for node_id in sorted(members):
            state, leases = members[node_id]
            self.set_drain(node_id, state)
            self.set_leases(node_id, leases)

    # --- bgp / ran ----------------------------------------------------------------------------------
    def set_bgp(self, running: bool, announced_prefixes: int) -> None:
        self.bgp_speaker_running.set(1 if running else 0)
        self.bgp_announced_prefixes.set(max(0, announced_prefixes))

    def count_ran(self, event: object = None) -> None:
        """One GUAMI-unavailable event (the argument, if any, is the event itself and is not inspected)."""
        self.ran_notifications.inc()

    # --- join tokens / transport --------------------------------------------------------------------
    def count_join(self, result: str) -> None:
        """A join-token outcome: minted, consumed or rejected."""
        if result not in JOIN_TOKEN_RESULTS:
            raise ValueError(f"join token result must be one of {JOIN_TOKEN_RESULTS}, got {result!r}")
        self.join_tokens.labels(result).inc()

    def count_dropped_frame(self, count: int = 1) -> None:
        self.transport_frames_dropped.inc(count)

    def count_bad_message(self) -> None:
        """A malformed cluster frame was received and dropped."""
        self.transport_malformed_frames.inc()

    def count_refused_connection(self, reason: str) -> None:
        """An incoming cluster connection was refused; unknown-shaped reasons count as ``other``."""
        label = reason if _REASON_RE.fullmatch(reason) else "other"
        self.transport_refused_connections.labels(label).inc()

    # --- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
        labels: set[tuple[str, ...]] = set()
        for family in metric.collect():
            for sample in family.samples:
                labels.add(tuple(sample.labels[name] for name in sorted(sample.labels)))
        return sorted(labels)
