"""The route walk against real daemons: every documented operation, through the leader and
through a follower, on the shared cluster of this package (``live``, conftest.py). The walk is
generated from the OpenAPI document: a route added to the document without a live scenario makes
this module fail. Every answer goes through ``check_documented``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.api_live_support import (
    DOC,
    LOAD_POOL,
    MESSAGES,
    OPS,
    VIAS,
    WALK_POOL,
    Live,
    drain_target,
    op_id,
)
from tests.cluster import wait_for

pytestmark = pytest.mark.xdist_group("apilive")


Scenario = Callable[[Live, int], None]
SCENARIOS: dict[tuple[str, str], Scenario] = {}


def scenario(method: str, template: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        assert (method, template) not in SCENARIOS
        SCENARIOS[(method, template)] = fn
        return fn

    return register


def _rfc3339(text: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@scenario("GET", "/api/v1/status")
def _status(live: Live, nid: int) -> None:
    res = live.call(nid, "GET", "/api/v1/status", token=None).result
    lead = live.leader()
    assert res["nodeId"] == nid and res["leaderNodeId"] == lead
    assert res["role"] == ("leader" if nid == lead else "follower")
    assert res["ready"] is True and res["drainState"] == "active"
    assert res["clusterId"] == live.c.status(lead)["clusterId"]
    assert res["leaderApiAddress"] == live.c.nodes[lead].api  # https://host:port


@scenario("GET", "/healthz")
def _healthz(live: Live, nid: int) -> None:
    assert live.call(nid, "GET", "/healthz", token=None).result == {"status": "ok"}


@scenario("GET", "/readyz")
def _readyz(live: Live, nid: int) -> None:
    assert live.call(nid, "GET", "/readyz", token=None).result == {"ready": True}


def _metrics(live: Live, nid: int, path: str) -> None:
    live.call(nid, "GET", "/api/v1/pools/{name}", {"name": WALK_POOL})
    text = live.call(nid, "GET", path, token=None).raw.decode()
    for name in ("quorumd_raft_term", "quorumd_build_info", "quorumd_api_requests_total"):
        assert re.search(rf"^{name}\b", text, re.M), name
    # the route label is the template, never the concrete path
    assert 'route="/api/v1/pools/{name}"' in text
    assert f'route="/api/v1/pools/{WALK_POOL}"' not in text


@scenario("GET", "/metrics")
def _metrics_root(live: Live, nid: int) -> None:
    _metrics(live, nid, "/metrics")


@scenario("GET", "/api/v1/metrics")
def _metrics_api(live: Live, nid: int) -> None:
    _metrics(live, nid, "/api/v1/metrics")


@scenario("GET", "/api/v1/openapi.json")
def _openapi(live: Live, nid: int) -> None:
    served = live.call(nid, "GET", "/api/v1/openapi.json", token=None).body
    assert served == DOC  # the running daemon serves exactly the document these tests walk


@scenario("GET", "/api/v1/cluster/members")
def _members_list(live: Live, nid: int) -> None:
    lead = live.leader()
    for query in ({"consistent": "true"}, None):  # consistent first: then local is as new
        ms = live.call(nid, "GET", "/api/v1/cluster/members", query=query).result
        ids = [m["nodeId"] for m in ms]
        assert ids == sorted(ids) and {1, 2, 3} <= set(ids)
        assert [m["nodeId"] for m in ms if m["isLeader"]] == [lead]
        for m in ms:
            assert m["apiAddress"] == live.c.nodes[m["nodeId"]].api
            assert m["raftAddress"] == f"127.0.0.1:{live.c.nodes[m['nodeId']].raft_port}"


@scenario("PATCH", "/api/v1/cluster/members/{id}")
def _set_address(live: Live, nid: int) -> None:
    """A running member's own addresses again (a no-op); a refusal names the field."""
    target = max(live.members(nid, consistent=True))
    me = live.members(nid)[target]
    same = {"raftAddress": me["raftAddress"], "apiAddress": me["apiAddress"]}
    r = live.call(nid, "PATCH", "/api/v1/cluster/members/{id}", {"id": target}, body=same)
    assert (r.result["nodeId"], r.result["raftAddress"], r.result["apiAddress"]) == (target, *same.values())
    bad = {"raftAddress": "0.0.0.0:1"}
    r = live.call(nid, "PATCH", "/api/v1/cluster/members/{id}", {"id": target}, body=bad)
    assert r.status == 400 and r.code == "invalid_raft_address" and "raftAddress" in r.body["error"], str(r)
    assert live.members(nid, consistent=True)[target]["raftAddress"] == me["raftAddress"]


@scenario("POST", "/api/v1/cluster/members/{id}/rotate-certificate")
def _rotate_certificate(live: Live, nid: int) -> None:
    """Another voter's certificate through this node (forwarded to that member): its new pin on
    this node's members list when the call answers; an unknown id is 404 and changes nothing."""
    path = "/api/v1/cluster/members/{id}/rotate-certificate"
    target = next(i for i in (1, 2, 3) if i != nid)
    before = live.members(nid, consistent=True)[target]["certificateFingerprint"]
    r = live.call(nid, "POST", path, {"id": target})
    assert r.status == 200 and r.result["certificateFingerprint"] != before, str(r)
    assert live.members(nid)[target]["certificateFingerprint"] == r.result["certificateFingerprint"]
    r = live.call(nid, "POST", path, {"id": 40})
    assert r.status == 404 and r.code == "member_not_found", str(r)


@scenario("POST", "/api/v1/cluster/members/{id}/promote")
def _promote(live: Live, nid: int) -> None:
    via = "leader" if nid == live.leader() else "follower"
    sid = live.spare(via)
    assert live.members(nid, consistent=True)[sid]["suffrage"] == "nonvoter"
    r = live.call(nid, "POST", "/api/v1/cluster/members/{id}/promote", {"id": sid})
    assert r.result == {"message": MESSAGES[("POST", "/api/v1/cluster/members/{id}/promote")]}
    assert live.members(nid)[sid]["suffrage"] == "voter"  # read-your-writes on the serving node
    r = live.call(nid, "POST", "/api/v1/cluster/members/{id}/promote", {"id": sid})
    assert r.status == 409 and r.code == "already_voter"


@scenario("DELETE", "/api/v1/cluster/members/{id}")
def _remove(live: Live, nid: int) -> None:
    via = "leader" if nid == live.leader() else "follower"
    sid = live.spare(via)
    held = live.members(nid, consistent=True)[sid]["activeLeases"]
    owned = live.call(
        nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": f"sp{sid}", "nodeId": sid}
    )
    assert owned.status == 201 and live.members(nid)[sid]["activeLeases"] == held + 1
    r = live.call(nid, "DELETE", "/api/v1/cluster/members/{id}", {"id": sid})
    assert r.status == 409 and r.code == "not_drained"
    r = live.call(nid, "POST", "/api/v1/cluster/members/{id}/drain", {"id": sid}, body={"deadlineSeconds": 0})
    assert r.result == {"drainState": "drained"}
    r = live.call(nid, "DELETE", "/api/v1/cluster/members/{id}", {"id": sid})
    assert r.result == {"message": MESSAGES[("DELETE", "/api/v1/cluster/members/{id}")]}
    assert sid not in live.members(nid)
    # the removed node's leases are purged with it
    listed = live.call(nid, "GET", "/api/v1/leases", query={"pool": WALK_POOL, "limit": "10000"}).result
    assert owned.result["id"] not in {x["id"] for x in listed}
    r = live.call(nid, "DELETE", "/api/v1/cluster/members/{id}", {"id": sid}, query={"force": "true"})
    assert r.status == 404 and r.code == "member_not_found"
    live.c.stop(sid, timeout=15)
    del live.c.nodes[sid]
    live.spares.pop(via, None)


@scenario("GET", "/api/v1/cluster/autopilot")
def _autopilot(live: Live, nid: int) -> None:
    lead = live.leader()
    res = live.call(nid, "GET", "/api/v1/cluster/autopilot").result
    ms = live.members(nid)
    assert res["leaderNodeId"] == lead
    assert sorted(res["voters"]) == sorted(i for i, m in ms.items() if m["suffrage"] == "voter")
    assert {s["nodeId"] for s in res["servers"]} == set(ms)
    healthy_voters = sum(1 for s in res["servers"] if s["hasVotingRights"] and s["healthy"])
    n = len(res["voters"])
    assert res["failureTolerance"] == max(0, healthy_voters - (n // 2 + 1))
    assert res["healthy"] == all(s["healthy"] for s in res["servers"])
    for s in res["servers"]:
        assert s["isLeader"] == (s["nodeId"] == lead)
        _rfc3339(s["stableSince"])


@scenario("GET", "/api/v1/cluster/autopilot/what-if")
def _what_if(live: Live, nid: int) -> None:
    lead = live.leader()
    voters = sorted(live.call(nid, "GET", "/api/v1/cluster/autopilot").result["voters"])
    res = live.call(nid, "GET", "/api/v1/cluster/autopilot/what-if").result  # nothing changes
    assert res["voters"] == voters and res["leaderNodeId"] == lead and res["safe"] is True
    assert res["quorum"] == len(voters) // 2 + 1
    gone = [v for v in voters if v != lead][:1]
    query = {"remove": ",".join(map(str, gone)), "drain": str(lead)}
    res = live.call(nid, "GET", "/api/v1/cluster/autopilot/what-if", query=query).result
    assert res["voters"] == [v for v in voters if v not in gone]
    assert res["leaderNodeId"] not in (lead, 0) and "leader_moves" in res["warnings"]
    everyone = ",".join(map(str, voters))
    res = live.call(nid, "GET", "/api/v1/cluster/autopilot/what-if", query={"remove": everyone}).result
    assert res["safe"] is False and {"quorum_lost", "last_voter"} <= set(res["warnings"])
    r = live.call(nid, "GET", "/api/v1/cluster/autopilot/what-if", query={"fail": "63"})
    assert r.status == 404 and r.code == "member_not_found"
    assert sorted(live.call(nid, "GET", "/api/v1/cluster/autopilot").result["voters"]) == voters


@scenario("POST", "/api/v1/cluster/members/{id}/drain")
def _drain(live: Live, nid: int) -> None:
    target = drain_target(live, nid)
    path = "/api/v1/cluster/members/{id}/drain"
    resume = "/api/v1/cluster/members/{id}/resume"
    # The target holds a lease while drained with a deadline, so the leader's watch never flips it
    # to drained behind the resume (a separate race, see the report).
    hold = live.call(
        nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": f"hold-{nid}", "nodeId": target}
    )
    try:
        r = live.call(nid, "POST", path, {"id": target}, body={"deadlineSeconds": 0})
        assert r.result == {"drainState": "drained"}
        assert live.members(nid)[target]["drainState"] == "drained"
        wait_for("drained seen by the target", lambda: live.c.status(target)["drainState"] == "drained")
        r = live.call(nid, "POST", path, {"id": target})  # idempotent; empty body means 0
        assert r.result == {"drainState": "drained"}
        live.call(nid, "POST", resume, {"id": target})
        assert live.members(nid)[target]["drainState"] == "active"
        r = live.call(nid, "POST", path, {"id": target}, query={"deadlineSeconds": "600"})
        assert r.result == {"drainState": "draining"}  # returns at once with a deadline
        assert live.members(nid)[target]["drainState"] == "draining"  # a lease is still active
    finally:
        live.call(nid, "POST", resume, {"id": target})
        live.call(nid, "DELETE", "/api/v1/leases/{id}", {"id": hold.result["id"]})
    assert live.members(nid)[target]["drainState"] == "active"


@scenario("POST", "/api/v1/cluster/members/{id}/resume")
def _resume(live: Live, nid: int) -> None:
    target = drain_target(live, nid)
    for _ in range(2):  # idempotent on an active member
        r = live.call(nid, "POST", "/api/v1/cluster/members/{id}/resume", {"id": target})
        assert r.result == {"message": MESSAGES[("POST", "/api/v1/cluster/members/{id}/resume")]}
    assert live.members(nid)[target]["drainState"] == "active"


@scenario("POST", "/api/v1/cluster/pki/join-tokens")
def _join_token(live: Live, nid: int) -> None:
    for body, ttl in (({"nodeID": 50 + nid, "ttlSeconds": 600}, 600), ({"nodeID": 50 + nid}, 1800)):
        before = int(time.time())
        res = live.call(nid, "POST", "/api/v1/cluster/pki/join-tokens", body=body).result
        assert res["token"] and before + ttl - 5 <= res["expiresAt"] <= int(time.time()) + ttl + 5
    r = live.call(nid, "POST", "/api/v1/cluster/pki/join-tokens", body={"nodeID": nid})
    assert r.status == 409 and r.code == "already_member"


def _new_token(live: Live, nid: int, role: str = "readonly", ttl: int | None = 3600) -> dict[str, Any]:
    body: dict[str, Any] = {"name": f"walk-{nid}-{role}", "role": role}
    if ttl is not None:
        body["ttlSeconds"] = ttl
    r = live.call(nid, "POST", "/api/v1/tokens", body=body)
    assert r.status == 201
    return dict(r.result)


@scenario("POST", "/api/v1/tokens")
def _tokens_create(live: Live, nid: int) -> None:
    before = int(time.time())
    tok = _new_token(live, nid)
    assert tok["role"] == "readonly" and tok["token"].startswith(f"qd_{tok['id']}_")
    assert before + 3590 <= tok["expiresAt"] <= int(time.time()) + 3610
    # usable at once on the serving node, with its role
    assert live.call(nid, "GET", "/api/v1/pools", token=tok["token"]).status == 200
    r = live.call(nid, "POST", "/api/v1/pools", token=tok["token"], body={"name": "x", "cidr": "10.9.0.0/24"})
    assert r.status == 403 and r.code == "forbidden"
    forever = _new_token(live, nid, "admin", ttl=None)
    assert forever["expiresAt"] is None


@scenario("GET", "/api/v1/tokens")
def _tokens_list(live: Live, nid: int) -> None:
    tok = _new_token(live, nid)
    for query in ({"consistent": "true"}, None):  # consistent first: then local is as new
        items = live.call(nid, "GET", "/api/v1/tokens", query=query).result
        mine = [t for t in items if t["id"] == tok["id"]]
        assert mine and mine[0]["name"] == tok["name"] and mine[0]["role"] == "readonly"
        assert all("token" not in t for t in items)  # the secret is shown only once
        assert not any(tok["token"] in json.dumps(t) for t in items)
        _rfc3339(mine[0]["createdAt"])


@scenario("GET", "/api/v1/tokens/{id}")
def _tokens_get(live: Live, nid: int) -> None:
    tok = _new_token(live, nid)
    res = live.call(nid, "GET", "/api/v1/tokens/{id}", {"id": tok["id"]}).result
    assert res["id"] == tok["id"] and res["expiresAt"] == tok["expiresAt"] and "token" not in res


@scenario("DELETE", "/api/v1/tokens/{id}")
def _tokens_revoke(live: Live, nid: int) -> None:
    tok = _new_token(live, nid)
    r = live.call(nid, "DELETE", "/api/v1/tokens/{id}", {"id": tok["id"]})
    assert r.result == {"message": "Token revoked"}
    r = live.call(nid, "GET", "/api/v1/pools", token=tok["token"])  # refused at once here
    assert r.status == 401 and r.code == "unauthorized"
    r = live.call(nid, "DELETE", "/api/v1/tokens/{id}", {"id": tok["id"]})
    assert r.status == 404 and r.code == "token_not_found"


def _pool_name(nid: int, tag: str) -> str:
    return f"walk-{nid}-{tag}"


@scenario("POST", "/api/v1/pools")
def _pools_create(live: Live, nid: int) -> None:
    # sizes count what can be handed out: no network/broadcast (v4), no subnet-router anycast (v6)
    for tag, cidr, size in (("v4", f"10.{70 + nid}.0.0/24", 254), ("v6", f"fd00:{nid}::/120", 255)):
        res = live.call(
            nid, "POST", "/api/v1/pools", body={"name": _pool_name(nid, tag), "cidr": cidr}
        ).result
        assert res["name"] == _pool_name(nid, tag) and res["cidr"] == cidr
        assert res.get("size") in (None, size, size + 2, size - 2)
    r = live.call(nid, "POST", "/api/v1/pools", body={"name": _pool_name(nid, "v4"), "cidr": "10.99.0.0/24"})
    assert r.status == 409 and r.code == "pool_exists"
    r = live.call(
        nid, "POST", "/api/v1/pools", body={"name": _pool_name(nid, "ov"), "cidr": f"10.{70 + nid}.0.0/25"}
    )
    assert r.status == 409 and r.code == "pool_overlap"


@scenario("GET", "/api/v1/pools")
def _pools_list(live: Live, nid: int) -> None:
    for query in ({"consistent": "true"}, None):  # consistent first: then local is as new
        names = [p["name"] for p in live.call(nid, "GET", "/api/v1/pools", query=query).result]
        assert WALK_POOL in names and LOAD_POOL in names


@scenario("GET", "/api/v1/pools/{name}")
def _pools_get(live: Live, nid: int) -> None:
    res = live.call(
        nid, "GET", "/api/v1/pools/{name}", {"name": WALK_POOL}, query={"consistent": "true"}
    ).result
    assert res["name"] == WALK_POOL and res["cidr"] == "10.60.0.0/16"
    r = live.call(nid, "GET", "/api/v1/pools/{name}", {"name": "no-such-pool"})
    assert r.status == 404 and r.code == "pool_not_found"


@scenario("DELETE", "/api/v1/pools/{name}")
def _pools_delete(live: Live, nid: int) -> None:
    name = _pool_name(nid, "del")
    live.call(nid, "POST", "/api/v1/pools", body={"name": name, "cidr": f"10.{80 + nid}.0.0/28"})
    lease = live.call(nid, "POST", "/api/v1/leases", body={"pool": name, "holder": "h"}).result
    r = live.call(nid, "DELETE", "/api/v1/pools/{name}", {"name": name})
    assert r.status == 409 and r.code == "pool_in_use"
    live.call(nid, "DELETE", "/api/v1/leases/{id}", {"id": lease["id"]})
    assert live.call(nid, "DELETE", "/api/v1/pools/{name}", {"name": name}).result == {
        "message": "Pool deleted"
    }
    r = live.call(nid, "GET", "/api/v1/pools/{name}", {"name": name})
    assert r.status == 404 and r.code == "pool_not_found"


@scenario("POST", "/api/v1/leases")
def _leases_allocate(live: Live, nid: int) -> None:
    holder = f"walk-holder-{nid}-{time.monotonic_ns()}"
    other = next(n for n in (1, 2, 3) if n != nid)
    before = {n: m["activeLeases"] for n, m in live.members(nid, consistent=True).items()}
    r = live.call(nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": holder})
    assert r.status == 201
    assert live.members(nid)[nid]["activeLeases"] == before[nid] + 1  # counted for its owner
    lease = r.result
    assert lease["nodeId"] == nid and lease["pool"] == WALK_POOL and lease["holder"] == holder
    assert lease["address"].startswith("10.60.")
    _rfc3339(lease["createdAt"])
    r = live.call(nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": holder, "nodeId": other})
    assert r.status == 200  # the same (pool, holder): the existing lease, re-owned
    assert r.result["id"] == lease["id"] and r.result["address"] == lease["address"]
    assert r.result["nodeId"] == other
    after = {n: m["activeLeases"] for n, m in live.members(nid).items()}
    assert (after[nid], after[other]) == (before[nid], before[other] + 1)


@scenario("GET", "/api/v1/leases")
def _leases_list(live: Live, nid: int) -> None:
    made = [
        live.call(nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": f"page-{nid}-{i}"}).result
        for i in range(3)
    ]
    ids = [x["id"] for x in made]
    q = {"nodeId": str(nid), "pool": WALK_POOL, "limit": "10000"}
    listed = live.call(nid, "GET", "/api/v1/leases", query=q).result
    got = [x["id"] for x in listed]
    assert got == sorted(got) and set(ids) <= set(got)
    assert all(x["nodeId"] == nid and x["pool"] == WALK_POOL for x in listed)
    page = live.call(nid, "GET", "/api/v1/leases", query={**q, "limit": "1", "after": str(ids[0])}).result
    assert [x["id"] for x in page] == [next(i for i in got if i > ids[0])]
    consistent = live.call(nid, "GET", "/api/v1/leases", query={**q, "consistent": "true"}).result
    assert set(ids) <= {x["id"] for x in consistent}


@scenario("DELETE", "/api/v1/leases/{id}")
def _leases_release(live: Live, nid: int) -> None:
    lease = live.call(nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": f"rel-{nid}"}).result
    r = live.call(nid, "DELETE", "/api/v1/leases/{id}", {"id": lease["id"]})
    assert r.result == {"message": "Lease released"}
    listed = live.call(nid, "GET", "/api/v1/leases", query={"pool": WALK_POOL, "limit": "10000"}).result
    assert lease["id"] not in {x["id"] for x in listed}
    r = live.call(nid, "DELETE", "/api/v1/leases/{id}", {"id": lease["id"]})
    assert r.status == 404 and r.code == "lease_not_found"


@scenario("GET", "/api/v1/backup")
def _backup(live: Live, nid: int) -> None:
    r = live.call(nid, "GET", "/api/v1/backup", timeout=60)
    assert r.status == 200 and r.header("Content-Type") == "application/octet-stream"
    assert r.header("X-Quorumd-Backup-Sha256") == hashlib.sha256(r.raw).hexdigest()
    index = int(r.header("X-Quorumd-Backup-Index") or "0")
    cid = live.c.status(nid)["clusterId"]
    assert r.header("Content-Disposition") == f'attachment; filename="quorumd-{cid}-{index}.backup"'
    assert index >= 1 and hashlib.sha256(r.raw[:-32]).digest() == r.raw[-32:]
    assert live.call(nid, "GET", "/api/v1/backup", token="readonly").status == 403
    assert live.call(nid, "GET", "/api/v1/backup", token=None).status == 401


@scenario("GET", "/api/v1/audit")
def _audit(live: Live, nid: int) -> None:
    """The record of a pool deleted through ``nid``; audited writes start once the
    leader has recorded protocol 2, so the write is repeated until one is recorded."""
    name = _pool_name(nid, "audit")

    def recorded() -> list[dict[str, Any]]:
        live.call(nid, "POST", "/api/v1/pools", body={"name": name, "cidr": f"10.{120 + nid}.0.0/28"})
        live.call(nid, "DELETE", "/api/v1/pools/{name}", {"name": name})
        found: list[dict[str, Any]] = []
        q = {"action": "pool_delete", "limit": "1000", "consistent": "true"}
        for _ in range(100):  # oldest first, a page at a time: the other suites audit many deletes
            page = live.call(nid, "GET", "/api/v1/audit", query=q).result
            found += [r for r in page if r["target"] == f"pool:{name}"]
            if len(page) < 1000:
                break
            q["after"] = str(page[-1]["id"])
        return found

    rec = wait_for("an audited write", recorded, 30, interval=0.2)[-1]
    assert rec["viaNodeId"] == nid and rec["actor"]["type"] == "token" and rec["sourceAddress"] == "127.0.0.1"
    _rfc3339(rec["time"])
    page = live.call(nid, "GET", "/api/v1/audit", query={"after": str(rec["id"] - 1), "limit": "1"}).result
    assert page == [rec]
    r = live.call(nid, "GET", "/api/v1/audit", query={"limit": "1001"})
    assert r.status == 400 and r.code == "invalid_limit"
    assert live.call(nid, "GET", "/api/v1/audit", token="readonly").status == 403


def test_every_documented_route_has_a_live_scenario() -> None:
    assert set(SCENARIOS) == set(OPS), {
        "documented without a live test": sorted(set(OPS) - set(SCENARIOS)),
        "tested but not documented": sorted(set(SCENARIOS) - set(OPS)),
    }


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("op", OPS, ids=op_id)
def test_route(live: Live, op: tuple[str, str], via: str) -> None:
    """One documented operation, served by the leader or by a follower (which forwards)."""
    fn = SCENARIOS.get(op)
    assert fn is not None, f"no live test for documented route {op}"
    nid = live.node(via)
    start = len(live.log)
    fn(live, nid)
    served = [s for n, m, t, s in live.log[start:] if (n, m, t) == (nid, *op)]
    assert any(200 <= s < 300 for s in served), f"{op} never succeeded on node {nid}: {served}"
