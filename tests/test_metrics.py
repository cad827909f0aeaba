"""The node's metrics (node/daemon/metrics.py, node/daemon/node_collector.py): state gauges computed
from one view per scrape, counters and histograms fed by the node."""

from __future__ import annotations

from typing import Any

import pytest

from quorumd.node.daemon.metrics import LATENCY_BUCKETS_SECONDS, Metrics
from quorumd.node.daemon.node_collector import AutopilotGauges, MemberView, NodeView, node_view
from quorumd.raft.core.ready import PeerStatus, Status
from quorumd.raft.core.types import Configuration, ProgressState, Role


def sample_value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    value = m.registry.get_sample_value(name, labels or {})
    return None if value is None else float(value)


def metrics_showing(view: NodeView | None) -> Metrics:
    m = Metrics("v")
    m.set_source(lambda: view)
    return m


def test_raft_gauges_and_one_hot_role() -> None:
    m = metrics_showing(NodeView("leader", 5, 100, 99, 101, True, 3, 2))
    roles = [sample_value(m, "quorumd_raft_state", {"state": s}) for s in ("leader", "follower", "candidate")]
    assert roles == [1.0, 0.0, 0.0]
    m = metrics_showing(NodeView("candidate", 6, 100, 100, 101, False, 3, 2))
    assert sample_value(m, "quorumd_raft_state", {"state": "candidate"}) == 1.0
    assert sample_value(m, "quorumd_raft_state", {"state": "leader"}) == 0.0
    assert sample_value(m, "quorumd_raft_term") == 6.0
    assert sample_value(m, "quorumd_raft_applied_index") == 100.0
    assert sample_value(m, "quorumd_raft_last_log_index") == 101.0
    assert sample_value(m, "quorumd_raft_has_leader") == 0.0
    assert (sample_value(m, "quorumd_raft_voters"), sample_value(m, "quorumd_raft_nonvoters")) == (3.0, 2.0)
    with pytest.raises(ValueError):
        NodeView("learner")
    m.count_leader_change()
    m.count_snapshot()
    assert sample_value(m, "quorumd_raft_leader_changes_total") == 1.0
    assert sample_value(m, "quorumd_raft_snapshots_total") == 1.0


def test_no_source_is_a_follower_without_leader() -> None:
    for m in (Metrics("v"), metrics_showing(None)):
        assert sample_value(m, "quorumd_raft_state", {"state": "follower"}) == 1.0
        assert sample_value(m, "quorumd_raft_has_leader") == 0.0
        assert sample_value(m, "quorumd_autopilot_healthy") is None


def test_each_scrape_reads_the_source_once_and_fresh() -> None:
    """One scrape is one view: the source is asked once per collection, never cached."""
    views = iter([NodeView("leader", term=1, voters=1), NodeView("leader", term=2, voters=3)])
    calls = []

    def source() -> NodeView:
        calls.append(1)
        return next(views)

    m = Metrics("v")
    m.set_source(source)
    first = m.render()[0].decode()
    assert "quorumd_raft_term 1.0" in first and "quorumd_raft_voters 1.0" in first
    second = m.render()[0].decode()
    assert "quorumd_raft_term 2.0" in second and "quorumd_raft_voters 3.0" in second
    assert len(calls) == 2


def test_latency_histograms() -> None:
    assert LATENCY_BUCKETS_SECONDS[0] == 0.0001 and LATENCY_BUCKETS_SECONDS[-1] == 5.0
    assert list(LATENCY_BUCKETS_SECONDS) == sorted(LATENCY_BUCKETS_SECONDS)
    m = Metrics("v")
    m.observe_commit(0.0002)
    m.observe_fsync(3.0)
    assert sample_value(m, "quorumd_raft_commit_duration_seconds_bucket", {"le": "0.00025"}) == 1.0
    assert sample_value(m, "quorumd_raft_commit_duration_seconds_bucket", {"le": "0.0001"}) == 0.0
    assert sample_value(m, "quorumd_raft_fsync_duration_seconds_bucket", {"le": "2.5"}) == 0.0
    assert sample_value(m, "quorumd_raft_fsync_duration_seconds_bucket", {"le": "5.0"}) == 1.0
    assert sample_value(m, "quorumd_raft_fsync_duration_seconds_count") == 1.0


def test_peer_series_follow_the_view() -> None:
    m = metrics_showing(NodeView("leader", peers={2: (10, 0.5), 3: (0, 0.1)}))
    assert sample_value(m, "quorumd_raft_peer_replication_lag_entries", {"node_id": "2"}) == 10.0
    m.set_source(lambda: NodeView("leader", peers={3: (4, 0.2)}))
    assert sample_value(m, "quorumd_raft_peer_replication_lag_entries", {"node_id": "2"}) is None
    assert sample_value(m, "quorumd_raft_peer_last_contact_seconds", {"node_id": "3"}) == 0.2
    m.set_source(lambda: NodeView("follower"))
    assert sample_value(m, "quorumd_raft_peer_last_contact_seconds", {"node_id": "3"}) is None


@pytest.mark.parametrize("bad", [0, 64, -1, True])
def test_node_id_labels_are_bounded(bad: int) -> None:
    with pytest.raises(ValueError):
        NodeView("leader", peers={bad: (1, 1.0)})
    with pytest.raises(ValueError):
        NodeView("leader", members={bad: MemberView("active", 1)})
    with pytest.raises(ValueError):
        NodeView("leader", autopilot=AutopilotGauges(True, 0, {bad: True}))


def test_members_drain_one_hot_and_leases() -> None:
    members = {1: MemberView("active", 3), 2: MemberView("draining", 1, 1234.5)}
    m = metrics_showing(NodeView("follower", members=members))
    assert sample_value(m, "quorumd_drain_state", {"node_id": "2", "state": "draining"}) == 1.0
    assert sample_value(m, "quorumd_drain_state", {"node_id": "2", "state": "active"}) == 0.0
    assert sample_value(m, "quorumd_leases_active", {"node_id": "1"}) == 3.0
    assert sample_value(m, "quorumd_drain_deadline_timestamp_seconds", {"node_id": "2"}) == 1234.5
    assert sample_value(m, "quorumd_drain_deadline_timestamp_seconds", {"node_id": "1"}) is None
    with pytest.raises(ValueError):
        NodeView("follower", members={2: MemberView("gone", 0)})
    m.set_source(lambda: NodeView("follower", members={1: MemberView("active", 0)}))  # node 2 removed
    assert sample_value(m, "quorumd_drain_state", {"node_id": "2", "state": "draining"}) is None
    assert sample_value(m, "quorumd_leases_active", {"node_id": "2"}) is None
    assert sample_value(m, "quorumd_drain_deadline_timestamp_seconds", {"node_id": "2"}) is None
    assert sample_value(m, "quorumd_leases_active", {"node_id": "1"}) == 0.0


def test_autopilot_series_exist_only_while_leading() -> None:
    m = metrics_showing(NodeView("leader"))
    assert sample_value(m, "quorumd_autopilot_failure_tolerance") is None
    m.set_source(lambda: NodeView("leader", autopilot=AutopilotGauges(False, 0, {1: True, 2: False})))
    assert sample_value(m, "quorumd_autopilot_healthy") == 0.0
    assert sample_value(m, "quorumd_autopilot_failure_tolerance") == 0.0
    assert sample_value(m, "quorumd_autopilot_server_healthy", {"node_id": "2"}) == 0.0
    assert sample_value(m, "quorumd_autopilot_server_healthy", {"node_id": "1"}) == 1.0
    m.set_source(lambda: NodeView("follower"))
    assert sample_value(m, "quorumd_autopilot_healthy") is None
    assert "quorumd_autopilot_healthy" in m.sample_names()  # still described


def test_counters_bgp_ran_join_transport() -> None:
    m = Metrics("v")
    m.set_bgp(True, 4)
    m.count_ran(object())
    m.count_ran()
    m.count_join("minted")
    m.count_join("rejected")
    with pytest.raises(ValueError):
        m.count_join("stolen")
    m.count_dropped_frame()
    m.count_bad_message()
    m.count_refused_connection("unknown_fingerprint")
    m.count_refused_connection("Weird Reason!")
    assert sample_value(m, "quorumd_bgp_speaker_running") == 1.0
    assert sample_value(m, "quorumd_bgp_announced_prefixes") == 4.0
    assert sample_value(m, "quorumd_ran_notifications_total") == 2.0
    assert sample_value(m, "quorumd_join_tokens_total", {"result": "consumed"}) == 0.0  # pre-created
    assert sample_value(m, "quorumd_join_tokens_total", {"result": "minted"}) == 1.0
    assert sample_value(m, "quorumd_transport_frames_dropped_total") == 1.0
    assert sample_value(m, "quorumd_transport_malformed_frames_total") == 1.0
    refused = "quorumd_transport_refused_connections_total"
    assert sample_value(m, refused, {"reason": "unknown_fingerprint"}) == 1.0
    assert sample_value(m, refused, {"reason": "other"}) == 1.0


class _Member:
    def __init__(self, node_id: int, drain_state: str, drain_deadline: float | None = None) -> None:
        self.node_id, self.drain_state, self.drain_deadline = node_id, drain_state, drain_deadline


class _Registry:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def members(self) -> list[_Member]:
        return [_Member(1, "active", 5.0), _Member(2, "draining", self.deadline)]

    def active_lease_count(self, node_id: int) -> int:
        return {1: 5, 2: 0}[node_id]


class _Node:
    def __init__(self, deadline: float | None = 1_900_000_000.0) -> None:
        self.sm = _Registry(deadline)


class _Core:
    def __init__(self, status: Any) -> None:
        self._status = status

    def status(self) -> Any:
        return self._status


class _Server:
    def __init__(self, node_id: int, healthy: bool) -> None:
        self.node_id, self.healthy = node_id, healthy


class _View:
    healthy, failure_tolerance = True, 1
    servers = (_Server(1, True), _Server(2, True))


def _status(role: Role, peers: tuple[PeerStatus, ...]) -> Status:
    return Status(
        node_id=1,
        role=role,
        term=4,
        vote=1,
        leader_id=1 if role == Role.LEADER else 0,
        commit_index=40,
        applied_index=39,
        last_index=42,
        last_term=4,
        first_index=1,
        snapshot_index=0,
        config=Configuration(voters=frozenset({1, 2, 3}), nonvoters=frozenset({4})),
        pending_conf_index=0,
        transfer_target=0,
        peers=peers,
    )


def test_node_view_from_engine_status_and_registry() -> None:
    peers = (
        PeerStatus(1, True, 42, 43, ProgressState.REPLICATE, 0, True),
        PeerStatus(2, True, 30, 31, ProgressState.REPLICATE, 3, True),
    )
    m = metrics_showing(node_view(_Node(), _Core(_status(Role.LEADER, peers)), 0.1, _View()))
    assert sample_value(m, "quorumd_raft_state", {"state": "leader"}) == 1.0
    assert sample_value(m, "quorumd_raft_has_leader") == 1.0
    assert (sample_value(m, "quorumd_raft_voters"), sample_value(m, "quorumd_raft_nonvoters")) == (3.0, 1.0)
    assert sample_value(m, "quorumd_raft_peer_replication_lag_entries", {"node_id": "2"}) == 12.0
    assert sample_value(m, "quorumd_raft_peer_last_contact_seconds", {"node_id": "2"}) == pytest.approx(0.3)
    assert sample_value(m, "quorumd_raft_peer_replication_lag_entries", {"node_id": "1"}) is None  # not self
    assert sample_value(m, "quorumd_drain_state", {"node_id": "2", "state": "draining"}) == 1.0
    assert sample_value(m, "quorumd_leases_active", {"node_id": "1"}) == 5.0
    assert sample_value(m, "quorumd_autopilot_failure_tolerance") == 1.0
    deadline = "quorumd_drain_deadline_timestamp_seconds"
    assert sample_value(m, deadline, {"node_id": "2"}) == 1_900_000_000.0
    assert sample_value(m, deadline, {"node_id": "1"}) is None  # not draining: no deadline series
    m = metrics_showing(node_view(_Node(None), _Core(_status(Role.LEADER, peers)), 0.1, None))
    assert sample_value(m, deadline, {"node_id": "2"}) is None
    assert sample_value(m, "quorumd_autopilot_failure_tolerance") is None
    # a pre-candidate is a candidate; a stale autopilot view is not exported off the leader
    m = metrics_showing(node_view(_Node(), _Core(_status(Role.PRE_CANDIDATE, ())), 0.1, _View()))
    assert sample_value(m, "quorumd_raft_state", {"state": "candidate"}) == 1.0
    assert sample_value(m, "quorumd_raft_has_leader") == 0.0
    assert sample_value(m, "quorumd_raft_peer_replication_lag_entries", {"node_id": "2"}) is None
    assert sample_value(m, "quorumd_autopilot_healthy") is None
