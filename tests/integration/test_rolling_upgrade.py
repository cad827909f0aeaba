"""Rolling upgrade from the baseline build (commit 017d9cc, protocol 1) to this build.

A 3-node cluster on the baseline build (installed from the repository's history into its own
virtualenv, see tests/baseline_support.py) takes a lease-allocation load through all three
nodes, retried on 0/502/503/504 as a client would (the same holder again is idempotent: it
returns the existing lease). Then, per node, followers first and the leader last: drain, SIGTERM,
start the same data dir and config on this build, wait for /readyz, resume. After each step
every node serves the members list, autopilot and a lease allocation; in the mixed states
every API route is exercised through a baseline node and an upgraded one (``ROUTES`` lists
them). At the end: every acknowledged lease is on every node with the same address, no address
is held twice, autopilot is healthy with failure tolerance 1 and every node reports
``clusterProtocolVersion`` 2.

About 20-30 s once the baseline virtualenv is cached (building it takes about a minute), so it
runs in ``make test``; ``make upgrade-test`` runs it alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quorumd.api.app import all_routes
from quorumd.api.openapi import build_document
from quorumd.node.registry.protocol import PROTOCOL_VERSION
from tests.baseline_support import BaselineUnavailable, baseline_python
from tests.cluster import _SSL, wait_for
from tests.daemon_support import KeepAliveClient
from tests.upgrade_support import VersionedCluster

pytestmark = [
    pytest.mark.upgrade,
    pytest.mark.xdist_group("upgrade"),
]

POOL = "upgrade"
RETRY = (0, 502, 503, 504)

# Every route of the API, exercised through both kinds of node in the mixed cluster.
ROUTES = [
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /api/v1/metrics",
    "GET /api/v1/openapi.json",
    "GET /api/v1/status",
    "GET /api/v1/cluster/members",
    "GET /api/v1/cluster/members?consistent=true",
    "GET /api/v1/cluster/autopilot",
    "POST /api/v1/cluster/members/{id}/promote (409 already_voter)",
    "DELETE /api/v1/cluster/members/{id} (409 not_drained; 404 for a non-member)",
    "PATCH /api/v1/cluster/members/{id} (its own addresses: 200 when this build leads and serves, 405 "
    "where the baseline does)",
    "POST /api/v1/cluster/members/{id}/drain (the procedure's drains)",
    "POST /api/v1/cluster/members/{id}/resume (the procedure's resumes, and idempotent on an active node)",
    "POST /api/v1/cluster/pki/join-tokens",
    "POST /api/v1/tokens",
    "GET /api/v1/tokens",
    "GET /api/v1/tokens/{id}",
    "DELETE /api/v1/tokens/{id} (then 401 with it on both kinds)",
    "POST /api/v1/pools",
    "GET /api/v1/pools",
    "GET /api/v1/pools/{name}",
    "DELETE /api/v1/pools/{name}",
    "POST /api/v1/leases",
    "GET /api/v1/leases?nodeId=&pool=&limit=&after=",
    "DELETE /api/v1/leases/{id}",
    "GET /api/v1/backup (an upgraded node serves it; a baseline node answers 404: it has no backups)",
    "GET /api/v1/cluster/autopilot/what-if (served once the leader is upgraded; 404 before)",
    "GET /api/v1/audit (an upgraded node serves its replica's trail; a baseline node answers 404)",
    "POST /api/v1/cluster/members/{id}/rotate-certificate (mixed: 409 feature_unavailable through an "
    "upgraded node, 404 through a baseline one; upgraded: 200, the old pin gone on every node)",
]


@dataclass
class Writer:
    """Lease allocations through the serving nodes, each retried until acknowledged."""

    cluster: VersionedCluster
    seed: int
    threads: int = 3
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # holder -> lease
    bad: list[str] = field(default_factory=list)
    retries: int = 0
    serving: set[int] = field(default_factory=set)
    _inflight: dict[int, int] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Writer:
        self.serving = set(self.cluster.nodes)
        for w in range(self.threads):
            t = threading.Thread(target=self._run, args=(w,), name=f"upgrade-writer-{w}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def pause(self, node_id: int, timeout: float = 20.0) -> None:
        """Stop routing to ``node_id`` (what a drain asks of clients) and wait for its requests."""
        with self._cond:
            self.serving.discard(node_id)
            assert self._cond.wait_for(lambda: self._inflight.get(node_id, 0) == 0, timeout)

    def resume(self, node_id: int) -> None:
        with self._cond:
            self.serving.add(node_id)

    def count(self) -> int:
        with self._cond:
            return len(self.acked)

    def wait_acks(self, more: int, timeout: float = 30.0) -> None:
        target = self.count() + more
        wait_for(f"{more} more acknowledged leases", lambda: self.count() >= target, timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)
        assert not any(t.is_alive() for t in self._workers), "a writer thread did not stop"

    def _pick(self, rng: random.Random) -> int | None:
        with self._cond:
            if not self.serving:
                return None
            nid = rng.choice(sorted(self.serving))
            self._inflight[nid] = self._inflight.get(nid, 0) + 1
            return nid

    def _done(self, nid: int) -> None:
        with self._cond:
            self._inflight[nid] -= 1
            self._cond.notify_all()

    def _run(self, worker: int) -> None:
        rng = random.Random(self.seed * 100 + worker)
        client = KeepAliveClient(self.cluster, 5.0)
        try:
            for seq in range(10**6):  # bounded: ends on stop() long before this
                if self._stop.is_set():
                    return
                holder = f"w{worker}-{seq}"
                while not self._stop.is_set():  # one holder until acknowledged (idempotent retry)
                    nid = self._pick(rng)
                    if nid is None:
                        self._stop.wait(0.05)
                        continue
                    try:
                        st, body = client.call(
                            nid, "POST", "/api/v1/leases", {"pool": POOL, "holder": holder}
                        )
                    finally:
                        self._done(nid)
                    if st in (200, 201):
                        lease = body["result"]
                        with self._cond:
                            prev = self.acked.get(holder)
                            if prev is not None and prev["address"] != lease["address"]:
                                self.bad.append(f"{holder} moved from {prev} to {lease}")
                            self.acked[holder] = lease
                        break
                    with self._cond:
                        self.retries += 1
                    if st not in RETRY:
                        self.bad.append(f"allocate {holder} via node {nid}: HTTP {st} {body}")
                        break
                    self._stop.wait(0.05)  # a client's back-off before the retry
        finally:
            client.close()


def _raw_get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=_SSL) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _call(c: VersionedCluster, via: int, method: str, path: str, body: Any = None, want: int = 200) -> Any:
    """One call through node ``via``, retried while the cluster answers 502/503/504."""
    got: list[Any] = []

    def attempt() -> bool:
        st, resp, _ = c.api(via, method, path, body)
        got[:] = [st, resp]
        return st not in RETRY

    wait_for(f"{method} {path} via {via}", attempt, 30, interval=0.1)
    st, resp = got
    assert st == want, f"{method} {path} via node {via}: HTTP {st} {resp}"
    return resp.get("result") if isinstance(resp, dict) else resp


def _eventually(c: VersionedCluster, via: int, path: str, check: Callable[[Any], bool]) -> None:
    """A read after a write through the same node. Bounded wait instead of one read: a baseline
    leader answers a forwarded write with its Raft core's applied index, which can lag the entry
    it just applied, so the forwarding node may read before the write reaches it (this build's
    leaders answer with the state machine's index)."""
    wait_for(f"GET {path} via {via}", lambda: check(_call(c, via, "GET", path)), 10)


def exercise_routes(c: VersionedCluster, via: int, tag: str) -> None:
    """Every route of ROUTES (except drain/resume of the procedure) through node ``via``."""
    api = c.nodes[via].api
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/metrics",
        "/api/v1/openapi.json",
        "/api/v1/status",
    ):
        assert _raw_get(api + path) == 200, f"GET {path} via {via}"
    members = _call(c, via, "GET", "/api/v1/cluster/members")
    assert sorted(m["nodeId"] for m in members) == sorted(c.nodes)
    _call(c, via, "GET", "/api/v1/cluster/members?consistent=true")
    _call(c, via, "GET", "/api/v1/cluster/autopilot")
    voter = members[0]["nodeId"]
    assert _call(c, via, "POST", f"/api/v1/cluster/members/{voter}/promote", want=409) is None
    _call(c, via, "DELETE", f"/api/v1/cluster/members/{voter}", want=409)
    _call(c, via, "DELETE", "/api/v1/cluster/members/40", want=404)
    same = {"raftAddress": members[0]["raftAddress"], "apiAddress": members[0]["apiAddress"]}
    this_build = all(c.python_of(n) == Path(sys.executable) for n in (via, c.wait_leader()))
    _call(c, via, "PATCH", f"/api/v1/cluster/members/{voter}", same, want=200 if this_build else 405)
    _call(c, via, "POST", f"/api/v1/cluster/members/{voter}/resume")  # idempotent on an active node
    minted = _call(c, via, "POST", "/api/v1/cluster/pki/join-tokens", {"nodeID": 9}, want=201)
    assert minted["token"] and minted["expiresAt"] > time.time()
    tok = _call(c, via, "POST", "/api/v1/tokens", {"name": f"t-{tag}", "role": "readonly"}, want=201)
    _eventually(c, via, "/api/v1/tokens", lambda r: any(t["id"] == tok["id"] for t in r))
    assert _call(c, via, "GET", f"/api/v1/tokens/{tok['id']}")["name"] == f"t-{tag}"
    _call(c, via, "DELETE", f"/api/v1/tokens/{tok['id']}")
    for nid in c.nodes:  # revoked: 401 on every node, whichever build serves it
        wait_for(
            f"revoked on {nid}",
            lambda nid=nid: _raw_get(c.nodes[nid].api + "/api/v1/pools", tok["token"]) == 401,
        )
    pool = f"p-{tag}"
    cidr = f"10.{200 + len(tag) % 50}.{sum(map(ord, tag)) % 250}.0/28"
    _call(c, via, "POST", "/api/v1/pools", {"name": pool, "cidr": cidr}, want=201)
    _eventually(c, via, "/api/v1/pools", lambda r: any(p["name"] == pool for p in r))
    _call(c, via, "GET", f"/api/v1/pools/{pool}")
    lease = _call(c, via, "POST", "/api/v1/leases", {"pool": pool, "holder": f"h-{tag}"}, want=201)
    assert lease["nodeId"] == via, lease  # owned by the node that received the request
    query = f"nodeId={via}&pool={pool}&limit=10&after={lease['id'] - 1}"
    _eventually(c, via, f"/api/v1/leases?{query}", lambda r: [x["id"] for x in r] == [lease["id"]])
    _call(c, via, "DELETE", f"/api/v1/leases/{lease['id']}")
    _call(c, via, "DELETE", f"/api/v1/pools/{pool}")
    upgraded = "clusterProtocolVersion" in _call(c, via, "GET", "/api/v1/status")
    backup = _raw_get(api + "/api/v1/backup", c.token)
    assert backup == (200 if upgraded else 404), f"GET /api/v1/backup via {via}: HTTP {backup}"
    # what-if runs on the leader (proxied by followers): a baseline leader does not know the route
    leader = _call(c, via, "GET", "/api/v1/status")["leaderNodeId"]
    leader_upgraded = "clusterProtocolVersion" in _call(c, leader, "GET", "/api/v1/status")
    what_if = _raw_get(api + f"/api/v1/cluster/autopilot/what-if?fail={voter}", c.token)
    expected = 200 if upgraded and leader_upgraded else 404
    assert what_if == expected, f"GET what-if via {via} (leader {leader}): HTTP {what_if}"
    audit = _raw_get(api + "/api/v1/audit?limit=5", c.token)
    assert audit == (200 if upgraded else 404), f"GET /api/v1/audit via {via}: HTTP {audit}"
    # below cluster protocol 3 a rotation is refused (nothing written a baseline node cannot read)
    st, body, _ = c.api(via, "POST", f"/api/v1/cluster/members/{via}/rotate-certificate")
    assert (st, body.get("code") if upgraded else None) == (
        (409, "feature_unavailable") if upgraded else (404, None)
    ), f"rotate-certificate via {via}: HTTP {st} {body}"


def check_step(c: VersionedCluster, step: str) -> None:
    """Every node serves the members list, autopilot and a lease allocation."""
    for nid in c.nodes:
        assert len(_call(c, nid, "GET", "/api/v1/cluster/members")) == 3, step
        view = _call(c, nid, "GET", "/api/v1/cluster/autopilot")
        assert view["leaderNodeId"] in c.nodes, step
        lease = _call(
            c, nid, "POST", "/api/v1/leases", {"pool": POOL, "holder": f"{step}-via-{nid}"}, want=201
        )
        assert lease["nodeId"] == nid


def _versions(c: VersionedCluster, via: int) -> dict[int, int]:
    return {x["nodeId"]: x["protocolVersion"] for x in _call(c, via, "GET", "/api/v1/cluster/members")}


def wait_healthy(c: VersionedCluster, timeout: float = 45.0) -> dict[str, Any]:
    def healthy() -> dict[str, Any] | None:
        st, body, _ = c.api(c.wait_leader(), "GET", "/api/v1/cluster/autopilot")
        if st == 200 and body["result"]["healthy"] and body["result"]["failureTolerance"] == 1:
            return dict(body["result"])
        return None

    return dict(wait_for("autopilot healthy, failure tolerance 1", healthy, timeout, interval=0.2))


def builds(c: VersionedCluster, current: Path) -> dict[int, str]:
    return {n: "new" if c.python_of(n) == current else "baseline" for n in c.nodes}


def test_rolling_upgrade_from_the_baseline_under_load(tmp_path: Path) -> None:
    started = time.monotonic()
    try:
        baseline = baseline_python()
    except BaselineUnavailable as exc:
        pytest.fail(f"cannot install the baseline build: {exc}")
    current = Path(sys.executable)
    seed = int(os.environ.get("QUORUMD_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed={seed}")
    c = VersionedCluster(tmp_path, 3, python=baseline)
    writer: Writer | None = None
    exercised: list[str] = []
    try:
        c.form()
        _call(c, 1, "POST", "/api/v1/pools", {"name": POOL, "cidr": "10.60.0.0/16"}, want=201)
        writer = Writer(c, seed).start()
        writer.wait_acks(50)

        leader = c.wait_leader()
        order = [n for n in sorted(c.nodes) if n != leader] + [leader]
        for k, n in enumerate(order):
            step = f"step{k + 1}-node{n}"
            kinds = builds(c, current)
            # The drain goes through a node of the other build when there is one, else any other.
            others = [m for m in sorted(c.nodes) if m != n]
            via = next((m for m in others if kinds[m] != kinds[n]), others[0])
            writer.pause(n)
            assert _call(c, via, "POST", f"/api/v1/cluster/members/{n}/drain", {"deadlineSeconds": 0}) == {
                "drainState": "drained"
            }
            exercised.append(f"drain {n} via {kinds[via]} node {via}")
            assert c.stop(n, signal.SIGTERM) == 0, c.nodes[n].log_text()[-3000:]
            c.use(n, current)
            c.restart(n)
            wait_for(f"node {n} /readyz", lambda n=n: _raw_get(c.nodes[n].api + "/readyz") == 200, 60)
            kinds = builds(c, current)
            resume_via = next((m for m in others if kinds[m] != kinds[n]), n)
            _call(c, resume_via, "POST", f"/api/v1/cluster/members/{n}/resume")
            exercised.append(f"resume {n} via {kinds[resume_via]} node {resume_via}")
            writer.resume(n)
            writer.wait_acks(20)
            check_step(c, step)
            if k < len(order) - 1:  # mixed: both builds serve every route
                for m in (next(x for x in c.nodes if kinds[x] == "baseline"), n):
                    exercise_routes(c, m, f"{step}-{kinds[m]}{m}")
                    exercised.append(f"every route via {kinds[m]} node {m} after {step}")
                wait_for(
                    "the new node sees the mixed versions",
                    lambda n=n, kinds=kinds: (
                        {
                            x["nodeId"]: x["protocolVersion"]
                            for x in _call(c, n, "GET", "/api/v1/cluster/members")
                        }
                        == {x: (PROTOCOL_VERSION if kinds[x] == "new" else 1) for x in c.nodes}
                    ),
                    20,
                )
                assert _call(c, n, "GET", "/api/v1/status")["clusterProtocolVersion"] == 1

        writer.wait_acks(20)
        writer.stop()
        assert not writer.bad, writer.bad[:5]
        view = wait_healthy(c)
        assert view["failureTolerance"] == 1 and view["healthy"]
        for nid in c.nodes:
            wait_for(
                f"clusterProtocolVersion 2 on {nid}",
                lambda nid=nid: c.status(nid)["clusterProtocolVersion"] == PROTOCOL_VERSION,
                30,
            )
            assert all(
                m["protocolVersion"] == PROTOCOL_VERSION
                for m in _call(c, nid, "GET", "/api/v1/cluster/members")
            )
        # every acknowledged lease on every node, with its address; no address twice
        leader = c.wait_leader()
        index = c.status(leader)["commitIndex"]
        tables: dict[int, list[dict[str, Any]]] = {}
        for nid in c.nodes:
            wait_for(f"node {nid} applied {index}", lambda nid=nid: c.applied(nid) >= index, 30)
            tables[nid] = _call(c, nid, "GET", "/api/v1/leases?limit=10000")
        for nid, table in tables.items():
            by_holder = {(x["pool"], x["holder"]): x for x in table}
            missing = [h for h in writer.acked if (POOL, h) not in by_holder]
            assert not missing, f"node {nid} lost {len(missing)} acknowledged leases: {missing[:5]}"
            moved = [h for h, x in writer.acked.items() if by_holder[(POOL, h)]["address"] != x["address"]]
            assert not moved, f"node {nid}: leases changed address: {moved[:5]}"
            addresses = [(x["pool"], x["address"]) for x in table]
            assert len(addresses) == len(set(addresses)), f"node {nid}: an address is leased twice"
            assert table == tables[leader], f"node {nid} and the leader hold different lease tables"
        # Upgraded: a certificate rotation goes through (protocol 3), seen by every node.
        before = {
            m["nodeId"]: m["certificateFingerprint"]
            for m in _call(c, leader, "GET", "/api/v1/cluster/members")
        }
        rotated = _call(c, leader, "POST", f"/api/v1/cluster/members/{leader}/rotate-certificate")
        assert rotated["certificateFingerprint"] != before[leader]
        for nid in c.nodes:
            wait_for(
                f"the new pin on {nid}",
                lambda nid=nid: (
                    {
                        m["nodeId"]: m["certificateFingerprint"]
                        for m in _call(c, nid, "GET", "/api/v1/cluster/members")
                    }[leader]
                    == rotated["certificateFingerprint"]
                ),
                10,
            )
        # With this build's leader, a write through a follower is visible there when it answers.
        follower = next(n for n in sorted(c.nodes) if n != leader)
        for i in range(30):
            lease = _call(
                c, follower, "POST", "/api/v1/leases", {"pool": POOL, "holder": f"ryw-{i}"}, want=201
            )
            page = _call(c, follower, "GET", f"/api/v1/leases?after={lease['id'] - 1}&limit=1")
            assert [x["id"] for x in page] == [lease["id"]], f"read-your-writes via {follower}: {page}"
        report = {
            "seconds": round(time.monotonic() - started, 1),
            "acknowledged": len(writer.acked),
            "retries": writer.retries,
            "steps": exercised,
            "routes": ROUTES,
        }
        print("upgrade_report " + json.dumps(report))
    finally:
        if writer is not None:
            writer.stop()
        c.close()


def test_routes_list_matches_the_openapi_document() -> None:
    """ROUTES names every path of the served OpenAPI document (nothing left out)."""
    listed = " ".join(ROUTES)
    for path, ops in build_document(all_routes())["paths"].items():
        for method in ops:
            assert f"{method.upper()} {path}" in listed or f"{method.upper()} /api/v1{path}" in listed, (
                f"{method.upper()} {path}"
            )
