"""A leader whose disk fills is waited out by three daemons with every acknowledged write kept; a
restart on a full disk waits (and tells systemd). Root: the data dir is a small tmpfs (the storage
and start-up parts: tests/test_disk_full.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from quorumd.node.daemon import startup
from tests.cluster import ApiCallError, Cluster, wait_for
from tests.daemon_support import fake_systemd, list_leases, log_lines, metric_sum
from tests.test_disk_full import fill, free_bytes, small_tmpfs

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
    pytest.mark.xdist_group("test_disk_full"),
]


def leader_among(c: Cluster, ids: list[int]) -> int:
    for nid in ids:
        with contextlib.suppress(OSError, ApiCallError):
            if c.status(nid)["role"] == "leader":
                return nid
    return 0


def write_leases(c: Cluster, via: int, tag: str, count: int) -> list[str]:
    """``count`` acknowledged lease ids (only answers with a lease count)."""
    return [
        c.ok(via, "POST", "/api/v1/leases", {"pool": "p", "holder": f"{tag}{i}"})["id"] for i in range(count)
    ]


def has_all(c: Cluster, nid: int, acked: list[str]) -> bool:
    with contextlib.suppress(OSError, ApiCallError):
        return set(acked) <= {lease["id"] for lease in list_leases(c, nid)}
    return False


def test_a_full_disk_is_waited_out_and_no_acknowledged_write_is_lost(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "node1", "8m") as disk:  # node 1's data dir, nothing else
        c = Cluster(tmp_path, 3)
        # The WAL's open segment is allocated ahead (4 MiB steps): writes into that space never
        # meet a full disk. A small step here, so that a few writes use it up.
        c.env["QUORUMD_TEST_WAL_PREALLOCATE_BYTES"] = "4096"
        try:
            c.form()
            node = c.nodes[1]
            assert node.data_dir == disk and leader_among(c, [1]) == 1
            c.ok(1, "POST", "/api/v1/pools", {"name": "p", "cidr": "10.0.0.0/16"})
            acked = write_leases(c, 1, "before", 5)

            # The leader's disk fills: its next write does not fit.
            fill(disk)
            assert free_bytes(disk) < 8192
            for i in range(200):  # bounded: the part-used last page takes a few small writes
                if log_lines(c, "disk_full path=", [1]):
                    break
                with contextlib.suppress(ApiCallError, OSError):
                    acked.append(
                        c.ok(1, "POST", "/api/v1/leases", {"pool": "p", "holder": f"h{i}-" + "x" * 200})["id"]
                    )
            wait_for("disk_full said", lambda: log_lines(c, "disk_full path=", [1]), 30)
            (line,) = log_lines(c, "disk_full path=", [1])
            assert "ERROR" in line and f"path={disk}/raft/wal-" in line and " free=" in line

            # The others elect a leader and go on acknowledging writes; node 1 stays up, retrying.
            new = int(wait_for("a leader with room", lambda: leader_among(c, [2, 3]), 30))
            acked += write_leases(c, new, "during", 10)
            retried = metric_sum(c, "quorumd_raft_storage_retries_total", [1])
            wait_for(
                "node 1 backs off and retries",
                lambda: metric_sum(c, "quorumd_raft_storage_retries_total", [1]) >= retried + 2,
                30,
            )
            assert node.alive() and "Traceback" not in node.log_text()

            # Space again: node 1 writes, catches up and serves every acknowledged write.
            (disk / "ballast").unlink()
            wait_for("disk_space_recovered", lambda: log_lines(c, "disk_space_recovered", [1]), 30)
            wait_for("node 1 has every acknowledged write", lambda: has_all(c, 1, acked), 60)

            # Restarted on a full disk: it waits (and tells systemd) instead of exiting.
            assert c.stop(1) == 0
            fill(disk)
            assert free_bytes(disk) < startup.START_FREE_BYTES
            before = len(node.log_text())
            with fake_systemd() as systemd:
                c.env["NOTIFY_SOCKET"] = systemd.env_value
                try:
                    c.restart(1)
                finally:
                    del c.env["NOTIFY_SOCKET"]

                def waiting() -> bool:
                    assert node.alive(), node.log_text()[-3000:]
                    return sum("EXTEND_TIMEOUT_USEC=" in t for t in systemd.drain()) >= 4

                wait_for("the start waits for space", waiting, 60)
                assert not any("READY=1" in t.split("\n") for t in systemd.texts())
                acked += write_leases(c, new, "while-waiting", 5)
                text = node.log_text()[before:]
                assert text.count("disk_full path=") == 1 and f"disk_full path={disk} free=" in text
                # A stop while waiting is a clean one.
                assert c.stop(1, signal.SIGTERM) == 0
            assert "Traceback" not in node.log_text()

            # Started again and space freed while it waits: it starts, catches up and serves.
            waits = len(log_lines(c, "the start waits", [1]))
            c.restart(1)
            wait_for("waiting again", lambda: len(log_lines(c, "the start waits", [1])) > waits, 30)
            (disk / "ballast").unlink()
            c.wait_ready(1, 60)
            acked += write_leases(c, new, "after", 5)
            wait_for("node 1 has every acknowledged write", lambda: has_all(c, 1, acked), 60)
            # An acknowledged write is on a majority; the third node may still be applying it.
            for nid in (2, 3):
                wait_for(f"node {nid} has every write", lambda nid=nid: has_all(c, nid, acked), 30)
            assert "Traceback" not in node.log_text()
        finally:
            c.close()
