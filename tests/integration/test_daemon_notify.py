"""The real daemon speaking sd_notify to a fake systemd: a unix datagram socket bound by the test.

``quorumd run`` is started with ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace)
and ``WATCHDOG_USEC``, as systemd does for ``Type=notify`` with ``WatchdogSec=``. The test checks the
datagrams: READY=1 exactly once and only when the API serves and the node is ready (for a joiner:
once it has joined), WATCHDOG=1 repeatedly after READY=1, STOPPING=1 on SIGTERM, and exit code 0.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, http, wait_for
from tests.daemon_support import FakeSystemd

pytestmark = pytest.mark.xdist_group("test_daemon_notify")

WATCHDOG_USEC = 400_000  # WatchdogSec=0.4s: the daemon pings every 0.2 s


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify.sock"
        assert len(str(path)) < 100, "unix socket path too long for this tmp_path"
        sock.bind(str(path))
        value = str(path)
    else:
        name = f"quorumd-test-notify-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        value = "@" + name
    try:
        yield FakeSystemd(sock, value)
    finally:
        sock.close()


def notify_env(systemd: FakeSystemd) -> dict[str, str]:
    return {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def wait_ready_datagram(systemd: FakeSystemd, cluster: Cluster, node_id: int) -> None:
    def ready() -> bool:
        node = cluster.nodes[node_id]
        assert node.alive(), f"node {node_id} exited: {node.log_text()[-2000:]}"
        return "READY=1" in systemd.drain()

    wait_for(f"READY=1 from node {node_id}", ready, timeout=60)


def check_watchdog_and_stop(systemd: FakeSystemd, cluster: Cluster, node_id: int) -> None:
    wait_for("three WATCHDOG=1 pings", lambda: systemd.drain() and systemd.count("WATCHDOG=1") >= 3, 30)
    texts = systemd.texts()
    first_ready = texts.index("READY=1")
    assert "WATCHDOG=1" not in texts[:first_ready]  # the watchdog starts with the service
    assert cluster.stop(node_id) == 0  # SIGTERM: graceful, exit code 0
    systemd.drain()
    assert systemd.count("STOPPING=1") == 1, systemd.texts()
    assert systemd.count("READY=1") == 1
    stopping = systemd.texts().index("STOPPING=1")
    assert stopping > first_ready
    unknown = [t for t in systemd.texts() if t not in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
    assert unknown == []
    assert "shutdown_done" in cluster.nodes[node_id].log_text()


def test_founder_notifies_ready_watchdog_and_stopping(systemd: FakeSystemd, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 1, env=notify_env(systemd))
    node = cluster.make_node(1)
    cluster.write_config(node)
    try:
        cluster.start(node)
        wait_ready_datagram(systemd, cluster, 1)
        # READY=1 means the API serves and the node leads its one-voter cluster: true when it arrives
        # (`ready` also needs applied == commit, which a commit in flight may briefly break)
        status = cluster.status(1)
        assert status["role"] == "leader" and status["leaderNodeId"] == 1
        cluster.wait_ready(1, timeout=10)
        # (an entry the founder proposes after its start can hold applied < commit for a moment)
        wait_for("/readyz 200", lambda: http("GET", f"{node.api}/readyz", timeout=3)[0] == 200, 10)
        check_watchdog_and_stop(systemd, cluster, 1)
    finally:
        cluster.close()


def test_joiner_notifies_ready_only_after_joining(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "n2.sock"
    sock.bind(str(path))
    systemd = FakeSystemd(sock, str(path))
    cluster = Cluster(tmp_path, 1)  # the founder runs without NOTIFY_SOCKET
    try:
        cluster.form()
        cluster.env = notify_env(systemd)  # only the joiner (started next) gets the socket
        cluster.add_node(2, start_only=True)
        wait_ready_datagram(systemd, cluster, 2)
        members = {m["nodeId"] for m in cluster.members(2)}
        assert members == {1, 2}  # joined (in its own replica) before READY=1
        assert cluster.status(2)["leaderNodeId"] == 1  # and knows the leader
        cluster.wait_ready(2, timeout=10)
        assert "join_accepted" in cluster.nodes[2].log_text()
        check_watchdog_and_stop(systemd, cluster, 2)
        assert os.environ.get("NOTIFY_SOCKET") != str(path)  # the test process itself is untouched
    finally:
        cluster.close()
        sock.close()
