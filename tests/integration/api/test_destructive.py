"""Destructive API cases, each on its own small cluster: leader removal and the proxy failure modes
(502/503/504, drain_timeout), leader self-removal and the last voter, and standalone mode.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.api_live_support import (
    _NO_BODY,
    BAD_TOKEN,
    OPS,
    LiveReply,
    auth_probe,
    check_documented,
    fill,
    fresh_source,
    is_cluster_route,
    paused,
    request,
    shutdown,
    voters,
)
from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.xdist_group("apilive")


def _req(
    c: Cluster, nid: int, method: str, template: str, values: dict[str, Any] | None = None, **kw: Any
) -> LiveReply:
    r = request(c.nodes[nid].api, method, fill(template, values), token=kw.pop("token", c.token), **kw)
    check_documented(method, template, r)
    return r


def test_proxy_failures_and_leader_removal(tmp_path: Path) -> None:
    """Leader removal through a follower, then the proxy failure modes, on one 4-node cluster.

    - 504 ``leader_timeout``: the leader is stopped (SIGSTOP) and a follower forwards over the RPC
      connection it already has: the request goes out, no answer comes back.
    - 502 ``leader_unreachable``: same stopped leader, a follower that has no RPC connection to it
      yet cannot establish one (TCP connects, TLS never completes). A killed leader is not used:
      its closed connections tell the followers at once that it is gone (fast failover), so they
      answer 503 instead.
    - 504 ``drain_timeout`` (relayed by a follower): a synchronous drain of a stopped node.
    - 503 ``no_leader`` with Retry-After: two of three voters killed.

    A 3 s election timeout keeps the followers loyal to a stopped leader for at least 3 s; a 2 s
    propose timeout bounds each forward.
    """
    c = Cluster(tmp_path, 4, cluster_overrides={"election-timeout": "3s", "propose-timeout": "2s"})
    try:
        c.form()
        # Leader removal through a follower: refused while not drained; with force, leadership
        # moves first, then the old leader is removed, and the follower says so.
        lead = c.wait_leader()
        via = min(n for n in c.nodes if n != lead)
        r = _req(c, via, "DELETE", "/api/v1/cluster/members/{id}", {"id": lead})
        assert r.status == 409 and r.code == "not_drained", str(r)
        r = _req(c, via, "DELETE", "/api/v1/cluster/members/{id}", {"id": lead}, query={"force": "true"})
        assert r.status == 200 and r.result == {"message": "Cluster member removed"}, str(r)
        seen = _req(c, via, "GET", "/api/v1/cluster/members").result  # read-your-writes on `via`
        assert lead not in {m["nodeId"] for m in seen}
        new = c.wait_leader(exclude={lead})
        rest = set(c.nodes) - {lead}
        wait_for("three voters left", lambda: voters(c, new) == rest)
        c.stop(lead)
        del c.nodes[lead]
        for nid in c.nodes:
            c.wait_ready(nid)

        # 504 and 502 against the new leader, which no follower has forwarded to so far.
        lead = c.wait_leader()
        warm, cold = sorted(set(c.nodes) - {lead})
        r = _req(c, warm, "POST", "/api/v1/pools", body={"name": "warm", "cidr": "10.1.0.0/24"})
        assert r.status == 201, str(r)

        def forward_from(nid: int) -> tuple[LiveReply, float]:
            started = time.monotonic()
            body = {"name": f"stopped-{nid}", "cidr": f"10.{10 + nid}.0.0/24"}
            return _req(c, nid, "POST", "/api/v1/pools", body=body), time.monotonic() - started

        with paused(c, lead), ThreadPoolExecutor(2) as pool:
            assert c.status(warm)["leaderNodeId"] == lead and c.status(cold)["leaderNodeId"] == lead
            slow, unreachable = pool.map(forward_from, (warm, cold))
        assert slow[0].status == 504 and slow[0].code == "leader_timeout", str(slow[0])
        gone = unreachable[0]
        assert gone.status == 502 and gone.code == "leader_unreachable", str(gone)
        for _, elapsed in (slow, unreachable):
            assert 1.5 <= elapsed <= 10, elapsed
        for nid in c.nodes:
            c.wait_ready(nid)

        # 504 drain_timeout, relayed by a follower: a stopped node cannot confirm a synchronous
        # drain in time (the leader waits 2 x propose timeout, longer than a plain forward); it
        # stays draining, and completes the drain itself once it runs again.
        lead = c.wait_leader()
        relay, target = sorted(set(c.nodes) - {lead})
        drain = "/api/v1/cluster/members/{id}/drain"

        def drain_state(nid: int) -> str:
            ms = _req(c, relay, "GET", "/api/v1/cluster/members").result
            return str(next(m["drainState"] for m in ms if m["nodeId"] == nid))

        with paused(c, target):
            r = _req(c, relay, "POST", drain, {"id": target}, body={"deadlineSeconds": 0})
            assert r.status == 504 and r.code == "drain_timeout", str(r)
            assert drain_state(target) == "draining"
        wait_for("drain completed by the returning node", lambda: drain_state(target) == "drained", 30)
        r = _req(c, relay, "POST", "/api/v1/cluster/members/{id}/resume", {"id": target})
        assert r.status == 200, str(r)

        # 503: two of three voters are gone; no leader is known, leader-only requests say so.
        lead = c.wait_leader()
        survivor = min(set(c.nodes) - {lead})
        c.kill(lead)
        c.kill(max(set(c.nodes) - {lead, survivor}))
        wait_for("no leader known", lambda: c.status(survivor)["leaderNodeId"] == 0, 30)
        for method, template, values, query in (
            ("POST", "/api/v1/cluster/members/{id}/resume", {"id": survivor}, None),
            ("POST", "/api/v1/pools", {}, None),
            ("GET", "/api/v1/cluster/autopilot", {}, None),
            ("GET", "/api/v1/cluster/members", {}, {"consistent": "true"}),
        ):
            body = {"name": "nl", "cidr": "10.4.0.0/24"} if template == "/api/v1/pools" else _NO_BODY
            r = _req(c, survivor, method, template, values, query=query, body=body)
            assert r.status == 503 and r.code == "no_leader" and r.header("Retry-After"), str(r)
        local = _req(c, survivor, "GET", "/api/v1/cluster/members")  # local replica reads still work
        assert local.status == 200 and {m["nodeId"] for m in local.result} == rest
        r = request(c.nodes[survivor].api, "GET", "/readyz")
        check_documented("GET", "/readyz", r)
        assert r.status == 503 and r.code == "not_ready" and r.header("Retry-After")
        st_ = _req(c, survivor, "GET", "/api/v1/status", token=None).result
        assert st_["ready"] is False and st_["leaderNodeId"] == 0 and st_["leaderApiAddress"] is None
    finally:
        shutdown(c)


def test_leader_removal_sent_to_the_leader_and_the_last_voter(tmp_path: Path) -> None:
    """A 2-voter cluster: the leader removes itself (leadership moves first), then the remaining
    voter cannot be removed (409 last_voter), drained or not, forced or not."""
    c = Cluster(tmp_path, 2)
    try:
        c.form()
        lead = c.wait_leader()
        other = 3 - lead
        r = _req(c, lead, "DELETE", "/api/v1/cluster/members/{id}", {"id": lead})
        assert r.status == 409 and r.code == "not_drained", str(r)
        removal = _req(
            c, lead, "DELETE", "/api/v1/cluster/members/{id}", {"id": lead}, query={"force": "true"}
        )
        assert c.wait_leader(exclude={lead}) == other
        wait_for("one voter left", lambda: voters(c, other) == {other})
        c.stop(lead)
        del c.nodes[lead]

        r = _req(c, other, "DELETE", "/api/v1/cluster/members/{id}", {"id": other}, query={"force": "true"})
        assert r.status == 409 and r.code == "last_voter", str(r)
        r = _req(
            c, other, "POST", "/api/v1/cluster/members/{id}/drain", {"id": other}, body={"deadlineSeconds": 0}
        )
        assert r.result == {"drainState": "drained"}, str(r)
        r = _req(c, other, "DELETE", "/api/v1/cluster/members/{id}", {"id": other})
        assert r.status == 409 and r.code == "last_voter", str(r)
        r = _req(c, other, "POST", "/api/v1/cluster/members/{id}/promote", {"id": other})
        assert r.status == 409 and r.code == "already_voter", str(r)
        assert voters(c) == {other}
    finally:
        shutdown(c)
    # The new leader keeps the old leader's pin until its member.remove answer is written
    # (ClusterService.pin_kept): the removal's true outcome, never a 502 for a done removal.
    assert removal.status == 200 and removal.result == {"message": "Cluster member removed"}, str(removal)


def test_standalone_answers_404_on_every_cluster_route(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 1, cluster_overrides={"enabled": False})
    try:
        node = c.start_first(1)
        wait_for("api up", lambda: request(node.api, "GET", "/healthz").status == 200)
        cluster_ops = [(m, t) for m, t in OPS if is_cluster_route(t)]
        assert len(cluster_ops) >= 7
        for method, template in cluster_ops:
            values, body = auth_probe(method, template)
            for token in (c.token, None, BAD_TOKEN):
                src = fresh_source() if token == BAD_TOKEN else None
                r = _req(c, 1, method, template, values, token=token, body=body, source=src)
                assert r.status == 404 and r.code == "clustering_disabled", str(r)
        for method, template in OPS:  # everything else works
            if is_cluster_route(template) or method != "GET" or "{" in template:
                continue
            r = _req(c, 1, method, template)
            assert r.status == 200, str(r)
        res = _req(c, 1, "POST", "/api/v1/pools", body={"name": "s", "cidr": "fd00::/120"}).result
        assert res["name"] == "s"
        lease = _req(c, 1, "POST", "/api/v1/leases", body={"pool": "s", "holder": "h"}).result
        assert lease["address"].startswith("fd00::")
    finally:
        shutdown(c)
