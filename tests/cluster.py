"""Test harness: real ``quorumd run`` processes on 127.0.0.1, formed with the real join flow.

``Cluster(tmp_path, n).form()`` starts node 1 (founder), mints join tokens through the API with
the founder's admin token, starts the joiners and waits until every node is a voter. Nodes can be
stopped (SIGTERM), killed (SIGKILL), paused and restarted with their data. Every wait is bounded;
nothing sleeps in place of a condition (``wait_for`` polls a condition with a deadline).
Ports come from the OS (bound and released just before use).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import yaml


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_SSL = _ctx()


class ApiCallError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
    timeout: float = 10.0,
    raw_body: bytes | None = None,
) -> tuple[int, Any, dict[str, str]]:
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_SSL) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return exc.code, parsed, dict(exc.headers)


RETRIED: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, ApiCallError, TypeError)


def wait_for(
    what: str,
    fn: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    *,
    retried: tuple[type[BaseException], ...] = RETRIED,
) -> Any:
    """Poll ``fn`` until it returns a truthy value, at most ``timeout`` seconds; the errors in
    ``retried`` count as "not yet" (the last one is named on timeout), any other propagates."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except retried as exc:
            last = exc
        time.sleep(interval)  # polling interval of a bounded wait, not a synchronization sleep
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def merge_section(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it; a nested section (``autopilot``) is merged key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DaemonNode(Protocol):
    node_id: int
    proc: subprocess.Popen[bytes] | None

    @property
    def api(self) -> str: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def config_path(self) -> Path: ...
    @property
    def log_path(self) -> Path: ...
    def alive(self) -> bool: ...


NodeT = TypeVar("NodeT", bound=DaemonNode)


class DaemonCluster(Generic[NodeT]):
    """What every real-daemon harness shares, wherever its nodes run: the process launch and its
    log, the admin token, join tokens, and the status, leader and member queries through the API.
    A subclass says where a node runs (``where``: on loopback as is, or inside a network namespace),
    how its config is written and how formation goes."""

    nodes: dict[int, NodeT]
    token: str
    env: dict[str, str]
    probe_timeout: float = 3.0  # a status probe while looking for the leader
    fail_fast: bool = False  # waits for nodes raise at once when one of their processes has exited

    # --- processes ------------------------------------------------------------------------------
    def where(self, node_id: int, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` where node ``node_id`` lives (here: this host)."""
        return argv

    def launch(
        self,
        node: NodeT,
        argv: list[str] | None = None,
        *,
        banner: str = "",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start ``argv`` (default: this build's ``quorumd run`` with the node's config) where the
        node runs, its output appended to the node's log."""
        if argv is None:
            argv = [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(node.config_path)]
        with open(node.log_path, "ab") as out:
            if banner:
                out.write(banner.encode())
                out.flush()
            node.proc = subprocess.Popen(
                self.where(node.node_id, argv),
                stdout=out,
                stderr=out,
                env={**os.environ, **self.env} if env is None else env,
                cwd=cwd,
            )

    def check_running(self, node_id: int) -> None:
        """Raise at once (instead of waiting out a deadline) when the node's process has exited."""
        node = self.nodes[node_id]
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(
                f"node {node_id} exited with {node.proc.returncode}:\n{self.log_tail(node_id, 20)}"
            )

    def log_tail(self, node_id: int, lines: int = 30) -> str:
        path = self.nodes[node_id].log_path
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- the API ----------------------------------------------------------------------------------
    def api(
        self,
        node_id: int,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = "admin",
        timeout: float = 10.0,
    ) -> tuple[int, Any, dict[str, str]]:
        tok = self.token if token == "admin" else token
        return http(method, f"{self.nodes[node_id].api}{path}", tok, body, timeout=timeout)

    def call(self, node_id: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """An admin call that must succeed: its ``result``."""
        status, resp, _ = self.api(node_id, method, path, body, timeout=timeout)
        if status >= 300:
            raise ApiCallError(status, resp)
        return resp["result"] if isinstance(resp, dict) else resp

    ok = call

    def status(self, node_id: int, timeout: float = 3.0) -> dict[str, Any]:
        status, body, _ = http("GET", f"{self.nodes[node_id].api}/api/v1/status", timeout=timeout)
        if status != 200:
            raise ApiCallError(status, body)
        return dict(body["result"])

    def applied(self, node_id: int) -> int:
        return int(self.status(node_id)["appliedIndex"])

    def mint(self, node_id: int, via: int | None = None) -> str:
        """A join token for ``node_id``, minted through the leader (or ``via``)."""
        via = via or self.leader_id() or 1
        status, body, _ = http(
            "POST", f"{self.nodes[via].api}/api/v1/cluster/pki/join-tokens", self.token, {"nodeID": node_id}
        )
        if status != 201:
            raise ApiCallError(status, body)
        return str(body["result"]["token"])

    def leader_id(self) -> int:
        """The node that says it leads (0: none answers so), skipping stopped and paused ones."""
        for nid, node in self.nodes.items():
            if not node.alive() or getattr(node, "paused", False):
                continue
            try:
                st = self.status(nid, timeout=self.probe_timeout)
            except (OSError, ApiCallError, ValueError):
                continue
            if st.get("role") == "leader":
                return nid
        return 0

    def wait_leader(self, exclude: set[int] | None = None, timeout: float = 30.0) -> int:
        def check() -> int:
            lid = self.leader_id()
            return lid if lid and lid not in (exclude or set()) else 0

        return int(wait_for("a leader", check, timeout, interval=0.1))

    def wait_ready(self, node_id: int, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.fail_fast:
                self.check_running(node_id)
            return bool(self.status(node_id)["ready"])

        wait_for(f"node {node_id} ready", ready, timeout, interval=0.1)

    def members(self, node_id: int | None = None) -> list[dict[str, Any]]:
        return list(self.call(node_id or self.wait_leader(), "GET", "/api/v1/cluster/members"))

    def wait_member(self, node_id: int, timeout: float = 60.0) -> None:
        wait_for(
            f"node {node_id} member", lambda: any(m["nodeId"] == node_id for m in self.members()), timeout
        )

    def wait_voters(self, ids: set[int], timeout: float = 60.0) -> None:
        def check() -> bool:
            for nid in ids if self.fail_fast else ():
                self.check_running(nid)
            return {m["nodeId"] for m in self.members() if m["suffrage"] == "voter"} == ids

        wait_for(f"voters {sorted(ids)}", check, timeout, interval=0.1)


@dataclass
class Node:
    node_id: int
    directory: Path
    raft_port: int
    api_port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"  # its loopback address (a test may move a node to another 127.0.0.x)

    @property
    def api(self) -> str:
        return f"https://{self.host}:{self.api_port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / f"node{self.node_id}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster(DaemonCluster[Node]):
    """Daemons on loopback addresses, ports from the OS."""

    def __init__(
        self,
        directory: Path,
        n: int = 3,
        *,
        cluster_overrides: dict[str, Any] | None = None,
        top_overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.n = n
        self.cluster_overrides = cluster_overrides or {}
        self.top_overrides = top_overrides or {}
        self.env = env or {}
        self.nodes: dict[int, Node] = {}
        self.token: str = ""

    # --- configuration ------------------------------------------------------------------------
    def make_node(self, node_id: int) -> Node:
        # The kernel may hand out a port it just handed out (then released): never one that another
        # node of this cluster already has.
        taken = {p for n in self.nodes.values() for p in (n.raft_port, n.api_port)}
        raft_port = next(p for p in iter(free_port, None) if p not in taken)
        api_port = next(p for p in iter(free_port, None) if p not in taken and p != raft_port)
        node = Node(
            node_id=node_id,
            directory=self.directory,
            raft_port=raft_port,
            api_port=api_port,
            config_path=self.directory / f"node{node_id}.yaml",
            log_path=self.directory / f"node{node_id}.log",
        )
        self.nodes[node_id] = node
        return node

    def write_config(self, node: Node, join_token: str | None = None) -> None:
        peers = [f"{n.host}:{n.raft_port}" for n in self.nodes.values()]
        cluster: dict[str, Any] = {
            "node-id": node.node_id,
            "bind-address": f"{node.host}:{node.raft_port}",
            "advertise-address": f"{node.host}:{node.raft_port}",
            "peers": peers,
            "heartbeat-interval": "50ms",
            "election-timeout": "500ms",
            "join-timeout": "60s",
            "autopilot": {
                "server-stabilization-time": "1s",
                "reconcile-interval": "200ms",
                "last-contact-threshold": "2s",
            },
        }
        cluster = merge_section(cluster, self.cluster_overrides)
        if join_token is not None:
            tf = self.directory / f"node{node.node_id}.join-token"
            tf.write_text(join_token + "\n")
            cluster["join-token-file"] = str(tf)
        cfg: dict[str, Any] = {
            "data-dir": str(node.data_dir),
            "log-level": "debug" if os.environ.get("QUORUMD_TEST_DEBUG") else "info",
            "api": {"address": node.host, "port": node.api_port},
            "cluster": cluster,
            **self.top_overrides,
        }
        node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # --- processes ------------------------------------------------------------------------------
    def start(self, node: Node) -> None:
        self.launch(node)

    def stop(self, node_id: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        node = self.nodes[node_id]
        if node.proc is None or node.proc.poll() is not None:
            return node.proc.returncode if node.proc else None
        node.proc.send_signal(sig)
        try:
            return node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            return node.proc.wait(timeout=10)

    def kill(self, node_id: int) -> None:
        self.stop(node_id, signal.SIGKILL)

    def restart(self, node_id: int) -> None:
        self.start(self.nodes[node_id])

    def close(self) -> None:
        for nid in list(self.nodes):
            self.stop(nid, timeout=15)

    # --- formation --------------------------------------------------------------------------
    def form(self, *, voters: bool = True) -> Cluster:
        for i in range(1, self.n + 1):
            self.make_node(i)
        self.start_first(1)
        self.wait_ready(1)
        for i in range(2, self.n + 1):
            self.add_node(i, start_only=True)
        if voters:
            self.wait_voters(set(range(1, self.n + 1)))
        return self

    def start_first(self, node_id: int = 1) -> Node:
        """Start the founding node (or a standalone one) and take its admin token."""
        node = self.nodes.get(node_id) or self.make_node(node_id)
        self.write_config(node)
        self.start(node)
        token_file = node.data_dir / "admin.token"
        wait_for("admin token", lambda: token_file.exists() and token_file.read_text().strip())
        self.token = token_file.read_text().strip()
        return node

    def add_node(self, node_id: int, *, start_only: bool = False) -> Node:
        node = self.nodes.get(node_id) or self.make_node(node_id)
        token = wait_for(f"join token for {node_id}", lambda: self.mint(node_id))
        self.write_config(node, join_token=token)
        self.start(node)
        if not start_only:
            self.wait_member(node_id)
        return node


class RanReceiver:
    """A RAN webhook endpoint on 127.0.0.1: records every JSON event the daemons POST to it, once
    per ``eventId`` as a RAN would (a delivery retried after a slow attempt repeats its id)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._ids: set[str | None] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                event = json.loads(raw)
                with receiver._lock:
                    event_id = event.get("eventId")
                    if event_id is None or event_id not in receiver._ids:
                        receiver._ids.add(event_id)
                        receiver.events.append(event)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ran"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def of(self, node_id: int) -> list[dict[str, Any]]:
        """Every event node ``node_id`` sent (each ``eventId`` once), in arrival order."""
        with self._lock:
            return [e for e in self.events if e.get("nodeId") == node_id]

    def count(self, node_id: int) -> int:
        """The "GUAMI unavailable" events node ``node_id`` sent."""
        return sum(1 for e in self.of(node_id) if e.get("event") == "guami_unavailable")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
