"""quorumd processes in network namespaces, formed the way an operator would (the namespace
sibling of ``tests/cluster.py``).

Each node runs ``quorumd run --config nodeN.yaml`` inside its own namespace (``ip netns exec``
execs in place, so the Popen pid is the daemon's pid and signals reach it directly). Cluster
bind/advertise and the API listen on the namespace address with fixed ports (every node has its
own network stack). Node 1 founds the cluster; the others join with tokens minted through
``POST /api/v1/cluster/pki/join-tokens`` with the founder's ``<data-dir>/admin.token`` and passed
in ``cluster.join-token-file``. A node can be killed, paused, restarted with its data, wiped
and re-joined under the same id with a new data directory and a new token, or moved to another
address of its namespace (``move``: every node's config then names it there; the caller restarts
it). ``bgp_config`` adds a ``bgp`` section to every node's config (a real speaker).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.chaos.netns import NetLab
from tests.cluster import ApiCallError, DaemonCluster, http, merge_section, wait_for

RAFT_PORT = 7000
API_PORT = 5002

DEFAULT_CLUSTER: dict[str, Any] = {
    "heartbeat-interval": "100ms",
    "election-timeout": "1000ms",
    "join-timeout": "120s",
    "propose-timeout": "5s",
    "snapshot-threshold": 1000,
    "trailing-logs": 500,
    "autopilot": {
        "server-stabilization-time": "2s",
        "reconcile-interval": "500ms",
        "last-contact-threshold": "3s",
    },
}


@dataclass
class NsNode:
    node_id: int
    addr: str
    directory: Path
    generation: int = 0  # bumped by a wipe-and-rejoin: a new data dir
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    join_token_file: Path | None = None  # kept in the config once written (restarts reuse it)

    @property
    def api(self) -> str:
        return f"https://{self.addr}:{API_PORT}"

    @property
    def data_dir(self) -> Path:
        return self.directory / f"node{self.node_id}" / f"data{self.generation}"

    @property
    def config_path(self) -> Path:
        return self.directory / f"node{self.node_id}" / "quorumd.yaml"

    @property
    def log_path(self) -> Path:
        return self.directory / f"node{self.node_id}" / "quorumd.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class NsCluster(DaemonCluster[NsNode]):
    """``DaemonCluster`` whose nodes run in the lab's namespaces, on fixed ports."""

    lab: NetLab
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    cluster_overrides: dict[str, Any] = field(default_factory=dict)
    nodes: dict[int, NsNode] = field(default_factory=dict)
    token: str = ""
    bgp_config: Callable[[NsNode], dict[str, Any]] | None = None  # the ``bgp`` section of a node

    probe_timeout = 2.0
    fail_fast = True

    def __post_init__(self) -> None:
        for i in self.lab.nodes():
            self.nodes[i] = NsNode(i, self.lab.addr(i), self.directory)
            (self.directory / f"node{i}").mkdir(parents=True, exist_ok=True)

    # --- configuration -------------------------------------------------------------------------
    def write_config(self, node: NsNode, join_token: str | None = None) -> None:
        cluster: dict[str, Any] = {
            "node-id": node.node_id,
            "bind-address": f"{node.addr}:{RAFT_PORT}",
            "advertise-address": f"{node.addr}:{RAFT_PORT}",
            "peers": [f"{n.addr}:{RAFT_PORT}" for n in self.nodes.values()],
        }
        cluster = merge_section(merge_section(cluster, DEFAULT_CLUSTER), self.cluster_overrides)
        if join_token is not None:
            tf = node.config_path.parent / f"join-token.{node.generation}"
            tf.write_text(join_token + "\n")
            os.chmod(tf, 0o600)
            node.join_token_file = tf
        if node.join_token_file is not None:
            cluster["join-token-file"] = str(node.join_token_file)
        cfg: dict[str, Any] = {
            "data-dir": str(node.data_dir),
            "log-level": "debug" if os.environ.get("QUORUMD_TEST_DEBUG") else "info",
            "api": {"address": node.addr, "port": API_PORT},
            "cluster": cluster,
        }
        if self.bgp_config is not None:
            cfg["bgp"] = self.bgp_config(node)
        node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # --- processes ----------------------------------------------------------------------------------
    def where(self, node_id: int, argv: list[str]) -> list[str]:
        return self.lab.exec_argv(node_id, argv)  # ``ip netns exec`` execs in place: same pid

    def start(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert not node.alive(), f"node {node_id} already running"
        self.launch(node, banner=f"\n===== start #{node.starts} generation {node.generation} =====\n")
        node.starts += 1
        node.paused = False

    def signal(self, node_id: int, sig: int) -> None:
        node = self.nodes[node_id]
        if node.alive():
            assert node.proc is not None
            node.proc.send_signal(sig)

    def kill(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=15)
        node.paused = False

    def stop(self, node_id: int, timeout: float = 20.0) -> None:
        node = self.nodes[node_id]
        if node.proc is None or node.proc.poll() is not None:
            return
        if node.paused:
            node.proc.send_signal(signal.SIGCONT)
            node.paused = False
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(timeout=10)

    def pause(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGSTOP)
        self.nodes[node_id].paused = True

    def unpause(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGCONT)
        self.nodes[node_id].paused = False

    def close(self) -> None:
        """Stop every process this cluster started (SIGCONT first so SIGTERM is handled)."""
        for nid, node in self.nodes.items():
            if node.alive():
                try:
                    self.stop(nid, timeout=10)
                except Exception:
                    if node.proc is not None and node.proc.poll() is None:
                        node.proc.kill()

    # --- formation ----------------------------------------------------------------------------------
    def form(self, timeout: float = 120.0, voters: set[int] | None = None) -> NsCluster:
        """Found with node 1, join the rest; wait until ``voters`` (default: all) are voters and
        every node is a member."""
        first = self.nodes[1]
        self.write_config(first)
        self.start(1)
        token_file = first.data_dir / "admin.token"

        def admin_token() -> str:
            self.check_running(1)
            return token_file.read_text().strip() if token_file.exists() else ""

        wait_for("admin token", admin_token, 60)
        self.token = token_file.read_text().strip()
        self.wait_ready(1, 60)
        for i in sorted(self.nodes)[1:]:
            self.join(i)
        want = set(self.nodes) if voters is None else voters
        if voters is not None:  # autopilot is told not to promote: promote these by hand
            for nid in sorted(want - {1}):
                wait_for(f"promote {nid}", functools.partial(self._promote, nid), timeout, interval=0.5)
        self.wait_voters(want, timeout)
        wait_for("all members", lambda: {m["nodeId"] for m in self.members()} == set(self.nodes), timeout)
        return self

    def _promote(self, node_id: int) -> bool:
        lid = self.leader_id()
        if not lid:
            return False
        status, body, _ = http(
            "POST", f"{self.nodes[lid].api}/api/v1/cluster/members/{node_id}/promote", self.token
        )
        if status == 200 or (
            status == 409 and isinstance(body, dict) and body.get("code") == "already_voter"
        ):
            return True
        raise ApiCallError(status, body)

    def join(self, node_id: int) -> None:
        token = wait_for(f"join token for {node_id}", lambda: self.mint(node_id), 60)
        self.write_config(self.nodes[node_id], join_token=token)
        self.start(node_id)

    def move(self, node_id: int, slot: int) -> str:
        """The host of a stopped node changes address: its namespace gets the address of ``slot``
        and every node's config says so (the moved node's bind, advertise and API address; every
        node's ``cluster.peers``, kept current as the operations guide asks). Data dir, node id and
        certificate stay. Returns the new address; the caller starts the node again."""
        node = self.nodes[node_id]
        assert not node.alive(), f"node {node_id} still running"
        node.addr = self.lab.move(node_id, slot)
        for other in self.nodes.values():
            if other.config_path.exists():
                self.write_config(other)
        return node.addr

    def wipe_and_rejoin(self, node_id: int) -> None:
        """A replaced host: stop, new empty data dir, new join token, start."""
        self.kill(node_id)
        self.nodes[node_id].generation += 1
        self.join(node_id)


def monotonic() -> float:
    return time.monotonic()
