"""The node's Prometheus metrics: one registry; counters and histograms fed by the node, state
gauges computed at scrape time.

``Metrics`` owns a ``CollectorRegistry`` holding every ``quorumd_*`` series of the node layer (plus the
process/platform/GC collectors). The HTTP layer registers its own request metrics
(``quorumd_api_requests_total``, ``quorumd_api_request_duration_seconds``; see ``API_METRIC_NAMES``) on
``Metrics.registry``; ``render()`` serves the whole registry.

Choices:

- Base units and ``_total`` counters; commit and fsync latencies are histograms with buckets from
  0.1 ms to 5 s (``LATENCY_BUCKETS_SECONDS``).
- State gauges (Raft role, term and indexes, configuration sizes, the leader's peer view, drain
  states, active leases, drain deadlines, the leader's autopilot view) are not stored here: the
  ``NodeCollector`` of ``node_collector`` computes them from one view of the node per scrape
  (``set_source``), so a scrape never mixes two moments and leader-only series vanish the moment a
  node stops leading. Alert rules aggregate leader-only series with ``max``/``min`` across instances.
- Node ids used as label values are checked to be 1..63 (bounded cardinality); other free-form label
  values (refusal reasons) are squashed to ``other`` unless they are short snake_case words.
- ``quorumd_raft_state{state}`` and ``quorumd_drain_state{node_id,state}`` are one-hot.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from quorumd.api.metrics import LoopHistogram
from quorumd.node.daemon.backupmetrics import BackupMetrics
from quorumd.node.daemon.node_collector import DRAIN_STATES, RAFT_STATES, NodeCollector, NodeView
from quorumd.raft.aio.transport import TransportStats

__all__ = [
    "API_METRIC_NAMES",
    "DRAIN_STATES",
    "JOIN_TOKEN_RESULTS",
    "LATENCY_BUCKETS_SECONDS",
    "RAFT_STATES",
    "Metrics",
]

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


class Metrics:
    """Every node-layer metric on one registry; setters take plain values."""

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._transport_seen: dict[str, int] = {}
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Gauge("quorumd_build_info", "Build information; always 1.", ["version"], registry=r)
        self.build_info.labels(version).set(1)

        # --- state gauges: computed at scrape time (see node_collector) ----------------------------
        self.node_collector = NodeCollector()
        r.register(self.node_collector)

        # --- raft ---------------------------------------------------------------------------------
        self.raft_leader_changes = Counter(
            "quorumd_raft_leader_changes_total", "Leader changes observed by this node.", registry=r
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
        self.raft_snapshots = Counter(
            "quorumd_raft_snapshots_total", "Snapshots taken or installed.", registry=r
        )
        self.storage_retries = Counter(
            "quorumd_raft_storage_retries_total",
            "Storage writes and snapshot saves retried: out of file descriptors, or the disk was full.",
            ["what"],
            registry=r,
        )

        self.backups = BackupMetrics()  # scheduled backups: see node/daemon/backupmetrics.py
        r.register(self.backups)

        # --- bgp / ran --------------------------------------------------------------------------------
        self.node_isolated = Gauge(
            "quorumd_node_isolated",
            "1 while the node is fenced: it has not heard from a quorum for isolation-fence-after.",
            registry=r,
        )
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
        families = [*self.registry.collect(), *self.node_collector.describe(), *self.backups.describe()]
        for family in families:
            if family.type == "counter":
                names.update({f"{family.name}_total", f"{family.name}_created"})
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
            else:
                names.add(family.name)
            names.update(sample.name for sample in family.samples)
        return frozenset(names)

    # --- state gauges -------------------------------------------------------------------------------
    def set_source(self, source: Callable[[], NodeView | None] | None) -> None:
        """Where the state gauges come from at each scrape (see ``node_collector``)."""
        self.node_collector.source = source

    # --- raft ---------------------------------------------------------------------------------------
    def count_leader_change(self) -> None:
        self.raft_leader_changes.inc()

    def observe_commit(self, seconds: float) -> None:
        self.raft_commit_duration.observe((), max(0.0, seconds))

    def observe_fsync(self, seconds: float) -> None:
        self.raft_fsync_duration.observe((), max(0.0, seconds))

    def count_snapshot(self) -> None:
        self.raft_snapshots.inc()

    def absorb_transport_stats(self, stats: TransportStats) -> None:
        """Move the transport's plain counters (refusals by reason, dropped and malformed frames)
        into the Prometheus counters, by the increase since the last call."""
        seen = self._transport_seen
        for reason, count in list(stats.refused_connections.items()):
            delta = count - seen.get(f"refused:{reason}", 0)
            if delta > 0:
                label = reason if _REASON_RE.fullmatch(reason) else "other"
                self.transport_refused_connections.labels(label).inc(delta)
                seen[f"refused:{reason}"] = count
        dropped = stats.frames_dropped - seen.get("dropped", 0)
        if dropped > 0:
            self.count_dropped_frame(dropped)
            seen["dropped"] = stats.frames_dropped
        malformed = stats.malformed_frames - seen.get("malformed", 0)
        if malformed > 0:
            self.transport_malformed_frames.inc(malformed)
            seen["malformed"] = stats.malformed_frames

    def count_storage_retry(self, what: str) -> None:
        self.storage_retries.labels(what=what).inc()

    # --- bgp / ran ----------------------------------------------------------------------------------
    def set_bgp(self, running: bool, announced_prefixes: int) -> None:
        self.bgp_speaker_running.set(1 if running else 0)
        self.bgp_announced_prefixes.set(max(0, announced_prefixes))

    def set_isolated(self, isolated: bool) -> None:
        self.node_isolated.set(1 if isolated else 0)

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
