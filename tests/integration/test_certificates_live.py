"""Certificate rotation on real daemons.

* ``test_rotate_a_follower_then_the_leader_under_load``: a 3-node cluster under a write load
  through all three nodes (keep-alive clients); rotate a follower, then the leader, each through
  another node: zero failed requests, every acknowledged write present on every node, the
  cluster healthy with the same leader, the new fingerprints in the members list, the expiry
  metric and the audit record; the old key opens no cluster connection (a transport presenting
  it is refused, ``not_pinned``); each rotated node restarts on its new identity; the rotation
  of a stopped node is refused (409 ``node_unreachable``) and changes nothing.
* ``test_leader_killed_in_the_middle_of_a_rotation``: the leader is killed the moment a
  follower has pinned its next certificate. The rotation fails or completes; either way the
  follower keeps a valid pin and serves; while a member is down the rotation cannot switch (409
  ``member_unreachable``, both pins valid); once it is back, a retry finishes the rotation.
* ``test_certificates_renew_themselves_before_expiry``: a tiny ``cluster.certificate-lifetime``
  makes every node rotate by itself, recorded as ``certificate_rotate`` by the certificates
  component, with writes still served.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from quorumd.raft.aio.transport import ClusterTransport, RpcError
from tests.cluster import Cluster, free_port, wait_for
from tests.daemon_support import LeaseWriter, check_leases, list_leases, log_lines, metric_samples, quiesce

pytestmark = pytest.mark.xdist_group("test_certificates_live")


def fingerprints(c: Cluster, via: int) -> dict[int, str]:
    return {m["nodeId"]: m["certificateFingerprint"] for m in c.members(via)}


def rotate(c: Cluster, target: int, via: int) -> tuple[int, Any]:
    status, body, _ = c.api(via, "POST", f"/api/v1/cluster/members/{target}/rotate-certificate")
    return status, body


def refused_with_old_key(c: Cluster, old_cert: bytes, old_key: bytes, as_node: int, target: int) -> bool:
    """A transport presenting ``as_node``'s old certificate cannot call ``target``."""
    cluster_id = json.loads((c.nodes[target].data_dir / "node.json").read_text())["cluster_id"]
    target_fp = fingerprints(c, target)[target]

    async def attempt() -> bool:
        t = ClusterTransport(
            as_node,
            cluster_id,
            old_cert,
            old_key,
            {target: target_fp},
            {target: f"{c.nodes[target].host}:{c.nodes[target].raft_port}"},
            lambda _frm, _frame: None,
            connect_timeout_seconds=3.0,
        )
        await t.start(f"127.0.0.1:{free_port()}")
        try:
            await t.rpc(target, "node.info", b"\x80", 5.0)
        except RpcError:
            return True
        finally:
            await t.close()
        return False

    return asyncio.run(attempt())


def identity_files(c: Cluster, node_id: int) -> tuple[bytes, bytes]:
    tls = c.nodes[node_id].data_dir / "tls"
    return (tls / "node.crt").read_bytes(), (tls / "node.key").read_bytes()


def stable_since(c: Cluster, via: int) -> dict[int, str]:
    status, body, _ = c.api(via, "GET", "/api/v1/cluster/autopilot")
    assert status == 200, body
    return {s["nodeId"]: s["stableSince"] for s in body["result"]["servers"]}


def healthy(c: Cluster, via: int) -> bool:
    status, body, _ = c.api(via, "GET", "/api/v1/cluster/autopilot")
    return status == 200 and bool(body["result"]["healthy"])


def test_rotate_a_follower_then_the_leader_under_load(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3).form()
    writer: LeaseWriter | None = None
    try:
        wait_for("protocol 3", lambda: c.status(1)["clusterProtocolVersion"] >= 3)
        c.ok(1, "POST", "/api/v1/pools", {"name": "p", "cidr": "10.64.0.0/16"})
        leader = c.wait_leader()
        follower, third = (n for n in (1, 2, 3) if n != leader)
        before = fingerprints(c, leader)
        old = {n: identity_files(c, n) for n in (follower, leader)}
        writer = LeaseWriter(c, "p", seed=22, threads=3).start()
        writer.wait_acks(200)
        wait_for("a healthy cluster", lambda: healthy(c, leader))
        stable_before = stable_since(c, leader)

        status, body = rotate(c, follower, via=third)
        assert status == 200, body
        assert body["result"]["certificateFingerprint"] != before[follower]
        writer.wait_acks(200)
        # the same member to autopilot: its stabilization clock is kept across the rotation
        assert stable_since(c, leader)[follower] == stable_before[follower]
        status, body = rotate(c, leader, via=follower)
        assert status == 200, body
        writer.wait_acks(200)
        writer.stop()

        assert writer.failures == 0 and not writer.bad, (writer.failed[:5], writer.bad[:5])
        quiesce(c)
        for n in (1, 2, 3):
            check_leases(writer, list_leases(c, n), f"node {n} after the rotations")
        after = fingerprints(c, third)
        assert after[follower] != before[follower] and after[leader] != before[leader]
        assert after[third] == before[third]
        assert all(fingerprints(c, n) == after for n in (1, 2, 3))
        assert c.leader_id() == leader  # no spurious election
        wait_for("a healthy cluster", lambda: healthy(c, leader))
        expiry = metric_samples(c, leader, "quorumd_node_certificate_expiry_timestamp_seconds")
        assert [labels["node_id"] for labels, _ in expiry] == [str(leader)]
        assert abs(expiry[0][1] - (time.time() + 365 * 86400)) < 3600
        _, audit, _ = c.api(third, "GET", "/api/v1/audit?action=certificate_rotate")
        targets = [r["target"] for r in audit["result"]]
        assert targets == [f"node:{follower}", f"node:{leader}"], audit
        assert all(r["actor"].get("tokenId") for r in audit["result"])

        # the old keys open no cluster connection anywhere
        for node_id, (cert, key) in old.items():
            other = third
            assert refused_with_old_key(c, cert, key, node_id, other)
        assert log_lines(c, "peer_refused reason=not_pinned", [third])

        # each rotated node restarts on its new identity
        for n in (follower, leader):
            assert c.stop(n) == 0
            c.restart(n)
            c.wait_ready(n)
        c.wait_voters({1, 2, 3})
        wait_for("a healthy cluster", lambda: healthy(c, c.wait_leader()))
        assert fingerprints(c, follower) == after

        # a stopped node cannot be rotated, and nothing changes
        assert c.stop(third) == 0
        status, body = rotate(c, third, via=follower)
        assert status == 409 and body["code"] == "node_unreachable", body
        assert fingerprints(c, follower) == after
    finally:
        if writer is not None:
            writer.stop()
        c.close()


def test_leader_killed_in_the_middle_of_a_rotation(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3).form()
    try:
        wait_for("protocol 3", lambda: c.status(1)["clusterProtocolVersion"] >= 3)
        leader = c.wait_leader()
        follower, third = (n for n in (1, 2, 3) if n != leader)
        before = fingerprints(c, third)

        result: dict[str, Any] = {}

        def rotate_in_background() -> None:
            result["answer"] = rotate(c, follower, via=follower)

        t = threading.Thread(target=rotate_in_background, daemon=True)
        t.start()
        wait_for(
            "the next certificate pinned",
            lambda: log_lines(c, "certificate_rotation_started", [follower]),
            timeout=30,
            interval=0.005,
        )
        c.kill(leader)
        t.join(60)
        assert not t.is_alive()
        status, body = result["answer"]
        assert status in (200, 409, 503, 504), body
        new_leader = c.wait_leader(exclude={leader})
        # whatever happened, the follower serves and is trusted by the surviving member
        c.wait_ready(follower)
        wait_for("writes through the follower", lambda: c.api(follower, "POST", "/api/v1/tokens",
                 {"name": "after-kill", "role": "readonly"})[0] == 201)  # fmt: skip
        mid = fingerprints(c, third)
        assert mid[third] == before[third]
        if status != 200:
            # a member is down: the rotation cannot switch yet, and both pins stay valid
            status, body = rotate(c, follower, via=third)
            assert status == 409 and body["code"] == "member_unreachable", body
        c.restart(leader)
        c.wait_ready(leader)
        c.wait_voters({1, 2, 3})
        if status != 200:
            status, body = rotate(c, follower, via=new_leader)
            assert status == 200, body
        # A rotation that finished while the old leader was down did not wait for it: the restarted
        # node may still be applying the unpin.
        quiesce(c)
        final = fingerprints(c, third)
        assert final[follower] != before[follower]
        assert all(fingerprints(c, n) == final for n in (1, 2, 3))
        wait_for("a healthy cluster", lambda: healthy(c, c.wait_leader()))
    finally:
        c.close()


def test_certificates_renew_themselves_before_expiry(tmp_path: Path) -> None:
    c = Cluster(
        tmp_path,
        3,
        cluster_overrides={"certificate-lifetime": "60s", "certificate-renew-before": "50s"},
    ).form()
    try:
        wait_for("protocol 3", lambda: c.status(1)["clusterProtocolVersion"] >= 3)
        first = fingerprints(c, 1)
        wait_for(
            "every node renewed its certificate",
            lambda: all(fp != first[n] for n, fp in fingerprints(c, 1).items()),
            timeout=90,
        )

        # Node 1 has applied every renewal's unpin (and its record); node 2 may still be applying one.
        def renewals_on_2() -> list[dict[str, Any]]:
            _, audit, _ = c.api(2, "GET", "/api/v1/audit?action=certificate_rotate")
            found = list(audit["result"])
            return found if {r["target"] for r in found} >= {"node:1", "node:2", "node:3"} else []

        renewals = wait_for("every renewal recorded on node 2", renewals_on_2, 30)
        system = {"type": "system", "component": "certificates"}
        assert all(r["actor"] == system for r in renewals), renewals[:3]
        c.ok(c.wait_leader(), "POST", "/api/v1/pools", {"name": "q", "cidr": "10.65.0.0/24"})
        wait_for("a healthy cluster", lambda: healthy(c, c.wait_leader()))
        for n in (1, 2, 3):
            for labels, value in metric_samples(c, n, "quorumd_node_certificate_expiry_timestamp_seconds"):
                assert labels["node_id"] == str(n) and value > time.time()
    finally:
        c.close()
