"""The audit trail on real daemons.

* ``test_every_audited_action_through_a_follower``: a 3-node cluster at protocol 2; a named admin
  token (``ops``) does every audited API call through a follower (pools, tokens, a join token, a
  promotion, drains with and without a deadline, resume, a forced removal, a drain of the leader
  that moves leadership, a backup export); a joiner is promoted by autopilot; a deadline watch
  completes a drain; a stopped leader hands off. The trail read from every node at one applied
  index is the same, each record names the right actor, receiving node and client address, and
  a scan of the whole trail finds no secret. Refused requests (401, 403) move
  ``quorumd_api_auth_failures_total`` and leave no record.
* ``test_retention_survives_a_snapshot_and_restart``: ``audit.retention`` keeps the newest records
  and the trail (and the next id) comes back from a snapshot after a restart.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import _SSL, ApiCallError, Cluster, http, wait_for
from tests.daemon_support import metric_sum, quiesce

pytestmark = pytest.mark.xdist_group("test_audit_live")


def audit(c: Cluster, node_id: int, **params: Any) -> list[dict[str, Any]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, body, _ = c.api(node_id, "GET", "/api/v1/audit" + (f"?{query}" if query else ""))
    if status != 200:
        raise ApiCallError(status, body)
    return list(body["result"])


def whole_trail(c: Cluster, node_id: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = audit(c, node_id, limit=1000, **({"after": out[-1]["id"]} if out else {}))
        if not page:
            return out
        out += page


def call(c: Cluster, node_id: int, token: str, method: str, path: str, body: Any = None) -> Any:
    status, resp, _ = c.api(node_id, method, path, body, token=token, timeout=30)
    if status >= 300:
        raise ApiCallError(status, resp)
    return resp["result"] if resp else None


def protocol_2(c: Cluster) -> None:
    """Wait until the leader has recorded protocol 2 (the ratchet: then changes are audited);
    each probe is a pool whose creation is either audited or not."""
    probes = iter(range(1000))

    def audited() -> bool:
        name = f"probe{next(probes)}"
        leader = c.wait_leader()
        call(
            c,
            leader,
            c.token,
            "POST",
            "/api/v1/pools",
            {"name": name, "cidr": "10.250.0.0/24"},
        )
        call(c, leader, c.token, "DELETE", f"/api/v1/pools/{name}")
        return any(r["target"] == f"pool:{name}" for r in audit(c, leader, action="pool_delete"))

    wait_for("cluster protocol 2 recorded", audited, 60, interval=0.2)


def follower_of(c: Cluster) -> int:
    leader = c.wait_leader()
    return next(n for n, x in c.nodes.items() if x.alive() and n != leader)


def test_every_audited_action_through_a_follower(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3, cluster_overrides={"autopilot": {"server-stabilization-time": "3s"}})
    secrets: list[str] = []
    try:
        c.form()
        protocol_2(c)
        secrets.append(c.token)
        f = f0 = follower_of(c)
        ops_tok = call(c, f, c.token, "POST", "/api/v1/tokens", {"name": "ops", "role": "admin"})
        ops, ops_id = ops_tok["token"], ops_tok["id"]
        secrets.append(ops)
        start = audit(c, f)[-1]["id"]

        # pools and tokens
        call(c, f, ops, "POST", "/api/v1/pools", {"name": "p1", "cidr": "10.10.0.0/24"})
        call(c, f, ops, "DELETE", "/api/v1/pools/p1")
        ci = call(c, f, ops, "POST", "/api/v1/tokens", {"name": "ci", "role": "readonly"})
        secrets.append(ci["token"])
        call(c, f, ops, "DELETE", f"/api/v1/tokens/{ci['id']}")

        # a join token (minted by ops through the follower), a join and an API promotion
        jt = call(c, f, ops, "POST", "/api/v1/cluster/pki/join-tokens", {"nodeID": 4})["token"]
        secrets.append(jt)
        node4 = c.make_node(4)
        c.write_config(node4, join_token=jt)
        c.start(node4)
        c.wait_member(4)
        wait_for("node 4 promoted", lambda: _try_promote(c, f, ops, 4), 30)

        # drain with a deadline: the watch completes it (a lease keeps it open until the deadline)
        call(c, f, ops, "POST", "/api/v1/pools", {"name": "p2", "cidr": "10.20.0.0/24"})
        call(c, f, ops, "POST", "/api/v1/leases", {"pool": "p2", "holder": "h4", "nodeId": 4})
        assert call(c, f, ops, "POST", "/api/v1/cluster/members/4/drain", {"deadlineSeconds": 1}) == {
            "drainState": "draining"
        }
        wait_for("deadline drain", lambda: _drain_state(c, f, 4) == "drained", 30)
        call(c, f, ops, "POST", "/api/v1/cluster/members/4/resume")
        call(c, f, ops, "DELETE", "/api/v1/cluster/members/4?force=true")
        c.stop(4)

        # a drain of the leader through a follower moves leadership
        leader = c.wait_leader()
        f = follower_of(c)
        call(c, f, ops, "POST", f"/api/v1/cluster/members/{leader}/drain", {"deadlineSeconds": 0})
        c.wait_leader(exclude={leader})
        call(c, f, ops, "POST", f"/api/v1/cluster/members/{leader}/resume")

        # a backup export through a follower
        f = follower_of(c)
        req = urllib.request.Request(f"{c.nodes[f].api}/api/v1/backup")
        req.add_header("Authorization", f"Bearer {ops}")
        with urllib.request.urlopen(req, timeout=30, context=_SSL) as resp:
            assert resp.status == 200 and resp.read()

        # a joiner promoted by autopilot
        node5 = c.add_node(5)
        c.wait_voters({1, 2, 3, 5}, timeout=60)

        # a stopped leader hands leadership over
        leader = c.wait_leader()
        assert c.stop(leader) == 0
        c.wait_leader(exclude={leader})
        c.restart(leader)
        c.wait_ready(leader, 60)

        # refused requests: counted on the receiving node, never recorded
        f = follower_of(c)
        quiesce(c)
        before = metric_sum(c, "quorumd_api_auth_failures_total", [f])
        readonly = call(c, f, ops, "POST", "/api/v1/tokens", {"name": "viewer", "role": "readonly"})["token"]
        secrets.append(readonly)
        quiesce(c)
        trail_before = audit(c, f, after=start, limit=1000)
        for tok in ("qd_000000000000_bogus", readonly):
            status, _, _ = c.api(
                f, "POST", "/api/v1/pools", {"name": "px", "cidr": "10.30.0.0/24"}, token=tok
            )
            assert status in (401, 403)
        status, _, _ = c.api(f, "DELETE", "/api/v1/pools/p2", token=None)
        assert status == 401
        assert metric_sum(c, "quorumd_api_auth_failures_total", [f]) == before + 3
        assert metric_sum(c, "quorumd_api_auth_failures_total", [f], reason="forbidden") >= 1
        quiesce(c)
        assert audit(c, f, after=start, limit=1000) == trail_before
        assert "api_auth_refused" in c.nodes[f].log_text() and "source=127.0.0.1" in c.nodes[f].log_text()

        # the same trail from every node at one applied index (background bookkeeping, e.g. the
        # restarted node's announcements, may still commit: read again until nothing moved)
        def settled_trails() -> dict[int, list[dict[str, Any]]] | None:
            at = quiesce(c)
            trails = {n: whole_trail(c, n) for n in c.nodes if c.nodes[n].alive()}
            return trails if all(c.applied(n) == at for n in trails) else None

        trails = wait_for("trails read at one applied index", settled_trails, 60)
        first = next(iter(trails.values()))
        assert all(t == first for t in trails.values())
        ids = [r["id"] for r in first]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

        mine = [r for r in first if r["id"] > start]
        by_action: dict[str, list[dict[str, Any]]] = {}
        for r in mine:
            by_action.setdefault(r["action"], []).append(r)
        ops_actor = {"type": "token", "tokenId": ops_id, "name": "ops"}
        for action in (
            "pool_create",
            "pool_delete",
            "token_create",
            "token_revoke",
            "join_token_mint",
            "member_promote",
            "member_drain",
            "member_resume",
            "member_remove",
            "backup_export",
        ):
            assert action in by_action, (action, [r["action"] for r in mine])
            assert by_action[action][0]["actor"] == ops_actor, by_action[action][0]
        for r in mine:
            if r["actor"]["type"] == "token":  # ops, or the harness's admin (node 5's join token)
                assert r["sourceAddress"] == "127.0.0.1", r
                assert r["viaNodeId"] in c.nodes, r
        assert by_action["pool_create"][0]["viaNodeId"] == f0  # the follower that received it
        assert by_action["member_remove"][0]["detail"] == {"force": True}
        assert by_action["member_remove"][0]["target"] == "node:4"
        assert {r["detail"]["deadlineSeconds"] for r in by_action["member_drain"]} == {0, 1}
        assert by_action["token_revoke"][0]["target"] == f"token:{ci['id']}"
        assert by_action["join_token_mint"][0]["target"] == "node:4"

        system = {(r["action"], r["actor"].get("component")) for r in mine if r["actor"]["type"] == "system"}
        assert ("member_join", "join") in system
        assert ("autopilot_promote", "autopilot") in system
        assert ("member_drained", "drain") in system
        assert ("leadership_transfer", "shutdown") in system
        for r in mine:
            if r["actor"]["type"] == "system":
                assert r["viaNodeId"] is None and r["sourceAddress"] is None, r
        drained = next(r for r in mine if r["action"] == "member_drained")
        assert drained["target"] == "node:4" and drained["detail"] == {"reason": "deadline"}
        transfers = by_action["leadership_transfer"]
        assert any(r["detail"]["reason"] == "drain" and r["actor"] == ops_actor for r in transfers)
        assert any(r["detail"]["reason"] == "stop" for r in transfers)
        assert {r["target"] for r in by_action["member_join"]} == {"node:4", "node:5"}
        assert node5.alive()

        # no secret anywhere in the trail
        text = json.dumps(first)
        for secret in secrets:
            assert secret not in text
            for part in re.split(r"[._]", secret):  # the secret part of a token, a join token's MAC
                assert len(part) < 16 or part not in text
        assert "BEGIN" not in text and "PRIVATE" not in text
    finally:
        c.close()


def _try_promote(c: Cluster, via: int, token: str, node_id: int) -> bool:
    status, body, _ = c.api(
        via, "POST", f"/api/v1/cluster/members/{node_id}/promote", token=token, timeout=30
    )
    if status == 200:
        return True
    if status == 409 and body.get("code") == "not_caught_up":
        return False
    raise ApiCallError(status, body)


def _drain_state(c: Cluster, via: int, node_id: int) -> str:
    return str(next(m["drainState"] for m in c.members(via) if m["nodeId"] == node_id))


def test_retention_survives_a_snapshot_and_restart(tmp_path: Path) -> None:
    c = Cluster(
        tmp_path,
        1,
        cluster_overrides={"snapshot-threshold": 16, "trailing-logs": 0},
        top_overrides={"audit": {"retention": 5}},
    )
    try:
        c.form()
        protocol_2(c)
        for i in range(20):
            status, body, _ = http(
                "POST", f"{c.nodes[1].api}/api/v1/pools", c.token, {"name": f"r{i}", "cidr": f"10.{i}.0.0/24"}
            )
            assert status == 201, body
        trail = whole_trail(c, 1)
        assert len(trail) == 5 and [r["target"] for r in trail] == [f"pool:r{i}" for i in range(15, 20)]
        last = trail[-1]["id"]
        assert [r["id"] for r in trail] == list(range(last - 4, last + 1))
        applied = c.applied(1)

        def snapshot_index() -> int:
            names = [p.name for p in (c.nodes[1].data_dir / "raft").rglob("snap-*.snap")]
            newest = max((int(n.split("-")[1], 16) for n in names), default=0)
            return newest if newest > applied - 16 else 0

        wait_for("a snapshot holding the trail", snapshot_index, 30)
        assert c.stop(1) == 0
        c.restart(1)
        c.wait_ready(1, 60)
        assert whole_trail(c, 1) == trail
        status, _, _ = http("DELETE", f"{c.nodes[1].api}/api/v1/pools/r0", c.token, timeout=30)
        assert status == 200
        after = whole_trail(c, 1)
        assert len(after) == 5 and after[-1]["id"] == last + 1 and after[-1]["action"] == "pool_delete"
        assert after[0]["id"] == trail[1]["id"]
    finally:
        c.close()
