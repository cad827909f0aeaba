"""A write answered through a follower is visible in that follower's replica when it answers.

The forwarding node waits until it has applied the index the leader's answer carries. That must
be the leader's state machine index: the Raft core's applied index advances only at the end of
the batch, after the proposal's client has been answered, and under load a leader that was
still writing the batch answered with the older index (measured: 37 stale reads of 300).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.daemon_support import LeaseWriter

pytestmark = pytest.mark.xdist_group("ryw")


def test_follower_reads_its_own_forwarded_writes_under_load(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3).form()
    writer: LeaseWriter | None = None
    try:
        leader = c.wait_leader()
        follower = next(n for n in sorted(c.nodes) if n != leader)
        c.ok(leader, "POST", "/api/v1/pools", {"name": "mine", "cidr": "10.0.0.0/16"})
        c.ok(leader, "POST", "/api/v1/pools", {"name": "load", "cidr": "10.1.0.0/16"})
        writer = LeaseWriter(c, "load", seed=7, threads=4).start()
        stale = []
        for i in range(200):
            lease = c.ok(follower, "POST", "/api/v1/leases", {"pool": "mine", "holder": f"h{i}"})
            page = c.ok(follower, "GET", f"/api/v1/leases?pool=mine&after={lease['id'] - 1}&limit=1")
            if [x["id"] for x in page] != [lease["id"]]:
                stale.append(lease["id"])
        assert not stale, f"{len(stale)} of 200 writes not yet visible where they were answered"
    finally:
        if writer is not None:
            writer.stop()
        c.close()
