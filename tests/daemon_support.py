"""Helpers shared by the real-daemon crash, security, recovery and demo tests.

- ``metric_samples``/``metric_sum``: scrape a node's ``/metrics`` and read samples.
- ``LeaseWriter``: threads allocating (and sometimes releasing) leases through every node,
  recording every acknowledged answer; ``list_leases`` pages through a node's whole lease table.
- ``check_apply_traces``: compare the ``QUORUMD_TEST_APPLY_TRACE`` files of every node and every
  incarnation (see ``quorumd.node.daemon.testhooks.ApplyTrace``): one entry and one state per index.
- ``FakeSystemd``, ``fake_systemd``: the receiving end of ``NOTIFY_SOCKET`` (sd_notify datagrams).
- ``quiesce``: wait until every node has applied the same index and the leader has nothing newer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from quorumd.node.cluster import pki
from quorumd.node.registry.state import StateMachine
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.codec import decode_conf_change
from quorumd.raft.core.types import EntryType
from tests.cluster import _SSL, ApiCallError, Cluster, wait_for


# --- metrics -----------------------------------------------------------------------------------
def metric_samples(cluster: Cluster, node_id: int, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` on one node (counters: use ``..._total``)."""
    with urllib.request.urlopen(f"{cluster.nodes[node_id].api}/metrics", context=_SSL, timeout=5) as r:
        text = r.read().decode()
    out: list[tuple[dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


def metric_sum(cluster: Cluster, name: str, nodes: list[int] | None = None, **labels: str) -> float:
    """Sum of ``name`` samples matching ``labels`` over the live nodes (or ``nodes``)."""
    total = 0.0
    for nid in nodes or [n for n, node in cluster.nodes.items() if node.alive()]:
        for got, value in metric_samples(cluster, nid, name):
            if all(got.get(k) == v for k, v in labels.items()):
                total += value
    return total


def log_lines(cluster: Cluster, needle: str, nodes: list[int] | None = None) -> list[str]:
    """Every log line containing ``needle`` in the given nodes' log files (default: all)."""
    out: list[str] = []
    for nid in nodes or list(cluster.nodes):
        out += [line for line in cluster.nodes[nid].log_text().splitlines() if needle in line]
    return out


# --- leases ------------------------------------------------------------------------------------
def list_leases(cluster: Cluster, node_id: int, page: int = 5000) -> list[dict[str, Any]]:
    """The node's whole local lease table, paged with ``after``."""
    out: list[dict[str, Any]] = []
    after = ""
    for _ in range(1000):
        query = f"/api/v1/leases?limit={page}" + (f"&after={after}" if after else "")
        chunk = cluster.ok(node_id, "GET", query)
        out += chunk
        if len(chunk) < page:
            return out
        after = str(chunk[-1]["id"])
    raise AssertionError("lease listing did not end")


class KeepAliveClient:
    """One thread's persistent HTTPS connections to the nodes' APIs (a TLS handshake per request
    would cost more CPU than the daemons under test). Never retries: a failed request is
    indeterminate and answered as status 0."""

    def __init__(self, cluster: Cluster, timeout: float) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self._conns: dict[int, tuple[int, http.client.HTTPSConnection]] = {}

    def call(self, node_id: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        node = self.cluster.nodes[node_id]
        cached = self._conns.get(node_id)
        if cached is None or cached[0] != node.api_port:
            conn = http.client.HTTPSConnection("127.0.0.1", node.api_port, timeout=self.timeout, context=_SSL)
            self._conns[node_id] = (node.api_port, conn)
        else:
            conn = cached[1]
        headers = {"Authorization": f"Bearer {self.cluster.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
            return resp.status, json.loads(raw) if raw else None
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()
            del self._conns[node_id]
            return 0, None

    def close(self) -> None:
        for _, conn in self._conns.values():
            conn.close()
        self._conns.clear()


@dataclass
class LeaseWriter:
    """Worker threads writing leases through every live node until ``stop``.

    ``acked``: lease id -> the lease of an acknowledged allocation (201/200). A release is sent
    for a random tenth of acknowledged leases: ``released`` holds the ids whose release was
    acknowledged, ``maybe_released`` those whose release had no clear answer (either outcome
    is then allowed).
    """

    cluster: Cluster
    pool: str
    seed: int
    threads: int = 4
    timeout: float = 5.0
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    maybe_released: set[str] = field(default_factory=set)
    failures: int = 0
    failed: list[str] = field(default_factory=list)  # every failed answer, for the report
    bad: list[str] = field(default_factory=list)  # answers that must never happen (e.g. a 500)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> LeaseWriter:
        for w in range(self.threads):
            t = threading.Thread(target=self._run, args=(w,), name=f"lease-writer-{w}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout * 3 + 5)
        assert not any(t.is_alive() for t in self._workers), "a writer thread did not stop"

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_acks(self, more: int, timeout: float = 30.0) -> None:
        target = self.count() + more
        wait_for(f"{more} more acknowledged writes", lambda: self.count() >= target, timeout)

    def _run(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        client = KeepAliveClient(self.cluster, self.timeout)
        seq = 0
        try:
            for _ in range(10**7):  # bounded: ends on stop() long before this
                if self._stop.is_set():
                    return
                live = sorted(n for n, node in self.cluster.nodes.items() if node.alive())
                if not live:
                    self._stop.wait(0.05)
                    continue
                nid = live[seq % len(live)]
                seq += 1
                if self.acked and rng.random() < 0.1:
                    self._release(client, nid, rng)
                else:
                    self._allocate(client, nid, f"w{worker}-{seq}")
        finally:
            client.close()

    def _allocate(self, client: KeepAliveClient, nid: int, holder: str) -> None:
        st, body = client.call(nid, "POST", "/api/v1/leases", {"pool": self.pool, "holder": holder})
        if st == 0:
            self._stop.wait(0.02)  # pacing: a node that is down refuses at once; do not spin on it
        with self._lock:
            if st in (200, 201):
                lease = body["result"]
                if lease["holder"] != holder:
                    self.bad.append(f"allocate {holder} answered another holder: {lease}")
                self.acked[str(lease["id"])] = lease
            else:
                self.failures += 1
                self.failed.append(f"allocate via node {nid} at {time.time():.3f}: HTTP {st} {body}")
                if st in (400, 401, 403, 404, 409, 500):  # 401: a restarted node lost the token
                    self.bad.append(f"allocate via node {nid}: HTTP {st} {body}")

    def _release(self, client: KeepAliveClient, nid: int, rng: random.Random) -> None:
        with self._lock:
            candidates = sorted(set(self.acked) - self.released - self.maybe_released)
            if not candidates:
                return
            lease_id = rng.choice(candidates)
            self.maybe_released.add(lease_id)
        st, body = client.call(nid, "DELETE", f"/api/v1/leases/{lease_id}")
        with self._lock:
            if 200 <= st < 300:
                self.maybe_released.discard(lease_id)
                self.released.add(lease_id)
            elif st in (400, 401, 403, 404, 500):
                # 404 included: the lease was acknowledged and this is its only release attempt
                # (a release goes to the leader), so the leader must know it.
                self.bad.append(f"release of {lease_id} via node {nid}: HTTP {st} {body}")
            # Other 5xx, timeouts and connection errors stay indeterminate (maybe_released).


def check_leases(writer: LeaseWriter, table: list[dict[str, Any]], where: str) -> None:
    """Every acknowledged lease is in ``table`` with its acknowledged content unless released;
    no acknowledged release left its lease behind; addresses are unique."""
    by_id = {str(x["id"]): x for x in table}
    lost = [lid for lid in writer.acked if lid not in by_id and lid not in writer.released]
    lost = [lid for lid in lost if lid not in writer.maybe_released]
    assert not lost, (
        f"{where}: {len(lost)} acknowledged leases lost, e.g. {[writer.acked[i] for i in lost[:5]]}"
    )
    changed = [
        (writer.acked[lid], by_id[lid])
        for lid in writer.acked
        if lid in by_id
        and {k: by_id[lid][k] for k in ("pool", "address", "holder")}
        != {k: writer.acked[lid][k] for k in ("pool", "address", "holder")}
    ]
    assert not changed, f"{where}: acknowledged leases changed: {changed[:5]}"
    resurrected = sorted(writer.released & set(by_id))
    assert not resurrected, f"{where}: released leases still present: {resurrected[:5]}"
    addresses = [(x["pool"], x["address"]) for x in table]
    assert len(addresses) == len(set(addresses)), f"{where}: an address is leased twice"


# --- apply traces ------------------------------------------------------------------------------
@dataclass
class TraceReport:
    entries: int  # distinct indexes seen applied
    states: int  # distinct snapshot indexes seen
    incarnations: int
    max_index: int


def check_apply_traces(directory: Path) -> TraceReport:
    """Every node and incarnation applied the same entry at each index, and every snapshot taken,
    installed or restored at one index holds the same state. Raises AssertionError otherwise."""
    entries: dict[int, dict[tuple[int, str], list[str]]] = defaultdict(lambda: defaultdict(list))
    states: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    incarnations = 0
    files = sorted(directory.glob("apply-node*.trace"))
    assert files, f"no apply traces in {directory}"
    for path in files:
        node = path.stem
        pid = "?"
        last_applied = 0
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["P"] and len(parts) == 2:
                pid, last_applied = parts[1], 0
                incarnations += 1
            elif parts[:1] == ["E"] and len(parts) == 4:
                index = int(parts[1])
                where = f"{node} pid {pid}"
                assert index == last_applied + 1 or last_applied == 0, (
                    f"{where} applied index {index} after {last_applied} (out of order)"
                )
                last_applied = index
                entries[index][(int(parts[2]), parts[3])].append(where)
            elif parts[:1] and parts[0] in ("R", "S", "C") and len(parts) == 3:
                index = int(parts[1])
                states[index][parts[2]].append(f"{node} pid {pid} ({parts[0]})")
                if parts[0] != "C":
                    last_applied = index
    bad = {i: dict(v) for i, v in entries.items() if len(v) > 1}
    assert not bad, f"different entries applied at one index: {dict(list(bad.items())[:3])}"
    bad_states = {i: dict(v) for i, v in states.items() if len(v) > 1}
    assert not bad_states, f"different states at one index: {dict(list(bad_states.items())[:3])}"
    return TraceReport(len(entries), len(states), incarnations, max(entries, default=0))


# --- quiescing -------------------------------------------------------------------------------------
def quiesce(cluster: Cluster, timeout: float = 60.0) -> int:
    """Wait until every live node is ready and all report one appliedIndex equal to the leader's
    commitIndex; returns that index."""
    live = [n for n, node in cluster.nodes.items() if node.alive()]

    def settled() -> int:
        sts = [cluster.status(n) for n in live]
        applied = {s["appliedIndex"] for s in sts}
        leaders = [s for s in sts if s["role"] == "leader"]
        if len(applied) != 1 or len(leaders) != 1 or not all(s["ready"] for s in sts):
            return 0
        index = int(applied.pop())
        return index if leaders[0]["commitIndex"] == index else 0

    return int(wait_for("cluster quiesced", settled, timeout))


def stable_tables(cluster: Cluster, timeout: float = 60.0) -> tuple[int, dict[int, list[dict[str, Any]]]]:
    """(applied index, node -> lease table) read at one applied index on every live node."""
    deadline = time.monotonic() + timeout
    for _ in range(100):
        index = quiesce(cluster, max(1.0, deadline - time.monotonic()))
        live = [n for n, node in cluster.nodes.items() if node.alive()]
        tables = {n: list_leases(cluster, n) for n in live}
        try:
            if all(cluster.applied(n) == index for n in live):
                return index, tables
        except (OSError, ApiCallError):
            pass
        if time.monotonic() > deadline:
            break
    raise AssertionError("the cluster kept applying entries: no stable read of every lease table")


# --- a running node's replicated secrets -----------------------------------------------------------
def replica_state(data_dir: Path, scratch: Path) -> StateMachine:
    """The state machine of a running node's local log (read from a copy of its raft directory;
    every entry is applied, committed or not). How a test plays an attacker holding the join key."""
    import shutil

    copy = scratch / f"raft-copy-{time.monotonic_ns()}"
    shutil.copytree(data_dir / "raft", copy, ignore=shutil.ignore_patterns("LOCK"))
    storage, rec = LogStorage.open(copy)
    with storage:
        sm = StateMachine()
        if rec.snapshot is not None:
            sm.restore(rec.snapshot.data)
        for e in rec.entries:
            if e.type == EntryType.CONF_CHANGE:
                sm.apply_conf_change(e.index, decode_conf_change(e.data))
            else:
                sm.apply(e.index, e.data)
    shutil.rmtree(copy)
    return sm


def node_fingerprint(data_dir: Path) -> str:
    return pki.fingerprint(pki.pem_to_der((data_dir / "tls" / "node.crt").read_bytes()))


# --- sd_notify ---------------------------------------------------------------------------------
MAX_DATAGRAMS = 10_000


@dataclass
class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET; ``drain()`` collects what has arrived, without blocking."""

    sock: socket.socket
    env_value: str
    messages: list[tuple[float, str]] = field(default_factory=list)

    def drain(self) -> list[str]:
        for _ in range(MAX_DATAGRAMS):
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return self.texts()

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def count(self, state: str) -> int:
        return sum(state in text.split("\n") for text in self.texts())


@contextlib.contextmanager
def fake_systemd() -> Iterator[FakeSystemd]:
    """A ``FakeSystemd`` on an abstract-namespace socket (``NOTIFY_SOCKET=@name``), closed at the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"quorumd-test-notify-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    try:
        yield FakeSystemd(sock, "@" + name)
    finally:
        sock.close()
