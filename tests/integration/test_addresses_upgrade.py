"""Address changes across versions with real daemons: a member moves while a baseline member is present.

``SetMemberAddress`` needs cluster protocol 2, so while a member of the baseline build (protocol
1) is in the cluster the leader cannot record the move: the gate refuses it (a leader of this
build) or the RPC is unknown (a baseline leader). The moved node keeps asking; once the last
baseline member is upgraded the leader ratchets the cluster to this build's protocol (the moved node's own
request told it that node's version, which it could not ask over the old address), the gate
opens, the next request is recorded, and the cluster is healthy again without operator action.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quorumd.node.version import PROTOCOL_VERSION
from tests.baseline_support import BaselineUnavailable, baseline_python
from tests.cluster import free_port, wait_for
from tests.integration.test_addresses_live import M, addresses, healthy, listed_everywhere, write_through
from tests.upgrade_support import VersionedCluster

pytestmark = [pytest.mark.upgrade, pytest.mark.xdist_group("upgrade")]


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[VersionedCluster]:
    try:
        baseline = baseline_python()
    except BaselineUnavailable as exc:
        pytest.fail(f"cannot install the baseline build: {exc}")
    c = VersionedCluster(tmp_path, 3, python=baseline)
    try:
        c.form()
        c.ok(c.wait_leader(), "POST", "/api/v1/pools", {"name": "moves", "cidr": "10.78.0.0/20"})
        yield c
    finally:
        c.close()


def upgrade_in_place(c: VersionedCluster, nid: int) -> None:
    assert c.stop(nid) == 0
    c.use(nid, Path(sys.executable))
    c.start(c.nodes[nid])
    c.wait_ready(nid, 60)


def test_a_move_waits_for_the_gate_and_happens_when_it_opens(mixed: VersionedCluster) -> None:
    c = mixed
    upgrade_in_place(c, 3)
    # Node 2 comes back on this build at another address; node 1 still runs the baseline.
    assert c.stop(2) == 0
    c.use(2, Path(sys.executable))
    node = c.nodes[2]
    old = (f"127.0.0.1:{node.raft_port}", f"https://127.0.0.1:{node.api_port}")
    node.host = "127.0.0.26"
    node.raft_port, node.api_port = free_port(node.host), free_port(node.host)
    c.write_config(node)
    c.start(node)
    new = addresses(c, 2)

    def refused_twice() -> bool:
        return node.log_text().count("own_address_announce_retry") >= 2

    wait_for("the moved node's requests refused and retried", refused_twice, 30)
    assert c.status(3)["clusterProtocolVersion"] == 1
    for n in (1, 3):  # not recorded anywhere while the gate is closed
        item = next(m for m in c.ok(n, "GET", M) if m["nodeId"] == 2)
        assert (item["raftAddress"], item["apiAddress"]) == old
    write_through(c, 3, "while-gated", nodes=[1, 3])  # the two reachable members still serve writes
    leader = c.wait_leader()
    if leader == 3:
        assert "member_address_deferred node_id=2 reason=feature_unavailable" in c.nodes[3].log_text()

    t0 = time.monotonic()
    upgrade_in_place(c, 1)  # the last baseline member: the ratchet can move to this build's protocol
    wait_for(
        "this build's cluster protocol",
        lambda: c.status(1)["clusterProtocolVersion"] == PROTOCOL_VERSION,
        60,
    )
    wait_for("node 2 listed at its new addresses", lambda: listed_everywhere(c, 2, new), 60)
    c.wait_ready(2, 60)
    wait_for("autopilot healthy, failure tolerance 1", lambda: healthy(c), 60)
    print(f"node 2 recorded and healthy {time.monotonic() - t0:.2f}s after the last upgrade began")
    write_through(c, 2, "after-the-gate")
