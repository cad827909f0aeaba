"""``quorumd recover`` after quorum loss, run as an operator would (the CLI, in a subprocess), and
the node id pinned in the data directory.

* ``test_recover_after_quorum_loss``: a 3-node cluster with data (a snapshot plus a log tail) loses
  two nodes for good; the survivor cannot commit. It is stopped, ``quorumd recover --peers
  1=...`` rewrites its configuration (refused while the node runs), and restarted it leads a
  1-node cluster holding every committed pool, API token and lease of its own; leases owned by
  the dead members are purged with them (removal purges a node's leases; recover says how
  many). Fresh nodes then join with join tokens, reusing the dead nodes' ids, and replicate it all.
* ``test_node_id_is_pinned_in_the_data_dir_and_recover_refuses_bad_input``: starting (or
  recovering) a data dir with another ``cluster.node-id`` fails with exit code 1 and a message
  naming both ids; ``recover`` refuses malformed peers, unknown members, a peer set without this
  node (1) and a bad config (2); a WAL with a corrupt record (not a torn tail) refuses to start
  with a clear message; afterwards the right id starts on the untouched state.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster import Cluster, wait_for
from tests.daemon_support import list_leases, quiesce

pytestmark = pytest.mark.xdist_group("test_recover")


def quorumd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quorumd.node.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_recover_after_quorum_loss(tmp_path: Path) -> None:
    c = Cluster(
        tmp_path,
        3,
        cluster_overrides={"snapshot-threshold": 40, "trailing-logs": 10, "propose-timeout": "1s"},
    )
    try:
        c.form()
        lead = c.wait_leader()
        c.ok(lead, "POST", "/api/v1/pools", {"name": "r", "cidr": "10.70.0.0/24"})
        reader = c.ok(lead, "POST", "/api/v1/tokens", {"name": "reader", "role": "readonly"})
        for i in range(60):  # past the snapshot threshold: recover starts from a snapshot + tail
            owner = (1, 2, 3)[i % 3]
            c.ok(
                (1, 2, 3)[i % 3], "POST", "/api/v1/leases", {"pool": "r", "holder": f"h{i}", "nodeId": owner}
            )
        quiesce(c)
        before = list_leases(c, 1)
        mine = [x for x in before if x["nodeId"] == 1]
        assert len(mine) == 20 and len(before) == 60

        c.kill(2)  # two of three voters lost for good
        c.kill(3)
        consistent = "/api/v1/leases?limit=1&consistent=true"  # a linearizable read needs a quorum
        wait_for("quorum lost", lambda: c.api(1, "GET", consistent, timeout=15)[0] >= 500, 60)
        port = c.nodes[1].raft_port
        peers = f"1=127.0.0.1:{port}"
        config = str(c.nodes[1].config_path)

        busy = quorumd("recover", "--config", config, "--peers", peers)
        assert busy.returncode == 1 and "in use" in busy.stderr, busy  # never under a running node
        assert c.stop(1) == 0

        done = quorumd("recover", "--config", config, "--peers", peers)
        assert done.returncode == 0, done.stderr
        assert f"with voters 1=127.0.0.1:{port}" in done.stdout
        assert "removed members [2, 3]" in done.stdout and "40 leases purged" in done.stdout, done.stdout

        c.restart(1)
        assert c.wait_leader() == 1
        c.wait_ready(1)
        members = c.members(1)
        assert [(m["nodeId"], m["suffrage"], m["isLeader"]) for m in members] == [(1, "voter", True)]
        assert list_leases(c, 1) == mine  # committed data of the survivor, unchanged
        assert [p["name"] for p in c.ok(1, "GET", "/api/v1/pools")] == ["r"]
        assert reader["id"] in {t["id"] for t in c.ok(1, "GET", "/api/v1/tokens")}
        st, _, _ = c.api(1, "GET", "/api/v1/cluster/members", token=reader["token"])
        assert st == 200
        new = c.ok(1, "POST", "/api/v1/leases", {"pool": "r", "holder": "after-recover"})  # it commits

        # Rebuilt hosts join with join tokens, under the lost nodes' ids and fresh data dirs.
        for nid in (2, 3):
            shutil.rmtree(c.nodes[nid].data_dir)
            c.add_node(nid)
        c.wait_voters({1, 2, 3})
        quiesce(c)
        for nid in (1, 2, 3):
            assert list_leases(c, nid) == [*mine, new]
    finally:
        c.close()


def test_node_id_is_pinned_in_the_data_dir_and_recover_refuses_bad_input(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 1)
    try:
        c.form()
        node = c.nodes[1]
        assert c.stop(1) == 0
        good = node.config_path.read_text()
        cfg = yaml.safe_load(good)
        cfg["cluster"]["node-id"] = 5
        node.config_path.write_text(yaml.safe_dump(cfg))

        c.restart(1)
        assert node.proc is not None and node.proc.wait(60) == 1
        message = f"data-dir {node.data_dir} belongs to node 1, but cluster.node-id is 5"
        assert f"quorumd: {message}" in node.log_text()  # on stderr, for the operator
        peers = f"5=127.0.0.1:{node.raft_port}"
        rec = quorumd("recover", "--config", str(node.config_path), "--peers", peers)
        assert rec.returncode == 1 and "belongs to node 1, config says 5" in rec.stderr, rec
        node.config_path.write_text(good)

        config = str(node.config_path)
        here = f"1=127.0.0.1:{node.raft_port}"
        for peers, expect in (
            ("1=nowhere", "--peers: bad address"),
            (f"{here},9=127.0.0.1:7009", "not members: [9]"),
            ("2=127.0.0.1:7002", "--peers must include this node (1)"),
        ):
            bad = quorumd("recover", "--config", config, "--peers", peers)
            assert bad.returncode == 1 and expect in bad.stderr, bad
        broken = tmp_path / "broken.yaml"
        broken.write_text(good + "bogus-key: 1\n")
        res = quorumd("recover", "--config", str(broken), "--peers", here)
        assert res.returncode == 2 and "bogus-key" in res.stderr, res

        # A corrupt WAL record (not a torn tail: valid records follow) refuses to start, clearly.
        wal = sorted((node.data_dir / "raft").glob("wal-*.log"))[-1]
        original = wal.read_bytes()
        damaged = bytearray(original)
        damaged[20] ^= 0xFF  # inside the first record
        wal.write_bytes(bytes(damaged))
        c.restart(1)
        assert node.proc is not None and node.proc.wait(60) == 1
        assert "quorumd: cannot open the Raft state: corrupt record in" in node.log_text()
        assert "Traceback" not in node.log_text()
        wal.write_bytes(original)

        c.restart(1)  # the right id, and nothing changed by the refused attempts: it starts
        c.wait_ready(1)
        assert c.status(1)["nodeId"] == 1 and c.members(1)[0]["suffrage"] == "voter"
    finally:
        c.close()
