"""The API against real daemons: every documented route, every error case, auth, fuzz.

One module-scoped 3-node cluster (``live``; autopilot never promotes by itself, so tests control
suffrage; joined "spare" nodes serve promote/remove/not-caught-up) serves the route walk, the
error cases, the auth table and the fuzz; no test relies on another having run first. Destructive
cases use their own small clusters: leader removal and the proxy failure modes (502/503/504,
drain_timeout), leader self-removal and the last voter, and standalone mode.

Every answer any test receives goes through ``check_documented``: a status documented for the
operation, a body matching the document's schema for that status, the error envelope with a
documented code. The route walk and the auth table are generated from the OpenAPI document, so a
route added to the document without a live test makes this module fail.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from quorumd.api.app import MAX_BODY_BYTES
from tests.api_live_support import (
    _NO_BODY,
    BAD_TOKEN,
    DOC,
    MANUAL_PROMOTION,
    OPS,
    ROUTES,
    LiveReply,
    LoadThread,
    admin_request,
    bad_token,
    check_documented,
    check_envelope,
    create_token,
    fill,
    form_with_manual_promotion,
    fresh_source,
    is_cluster_route,
    join_nonvoters,
    op_doc,
    op_role,
    paused,
    promote_when_caught_up,
    request,
    retire,
    shutdown,
    voters,
    wait_token_everywhere,
)
from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.xdist_group("apilive")

VIAS = ("leader", "follower")
WALK_POOL = "walk"
LOAD_POOL = "load"
NOT_A_MEMBER = 42
MESSAGES = {
    ("DELETE", "/api/v1/cluster/members/{id}"): "Cluster member removed",
    ("POST", "/api/v1/cluster/members/{id}/promote"): "Cluster member promoted to voter",
    ("POST", "/api/v1/cluster/members/{id}/resume"): "Cluster member resumed",
}


def _op_id(op: tuple[str, str]) -> str:
    return f"{op[0]} {op[1]}"


@dataclass
class Live:
    """The shared cluster, its readonly token, and the calls made through it."""

    c: Cluster
    readonly: str
    spares: dict[str, int] = field(default_factory=dict)
    next_spare: int = 10
    log: list[tuple[int, str, str, int]] = field(default_factory=list)

    def leader(self) -> int:
        return self.c.wait_leader()

    def followers(self) -> list[int]:
        lead = self.leader()
        ms = self.c.members(lead)
        return sorted(
            m["nodeId"]
            for m in ms
            if m["nodeId"] != lead
            and m["suffrage"] == "voter"
            and m["drainState"] == "active"
            and self.c.nodes[m["nodeId"]].alive()
        )

    def node(self, via: str) -> int:
        return self.leader() if via == "leader" else self.followers()[0]

    def token_for(self, kind: str | None) -> str | None:
        return {"admin": self.c.token, "readonly": self.readonly}.get(kind or "", kind)

    def call(
        self,
        nid: int,
        method: str,
        template: str,
        values: dict[str, Any] | None = None,
        *,
        token: str | None = "admin",
        body: Any = _NO_BODY,
        raw: bytes | None = None,
        query: Any = None,
        source: str | None = None,
        timeout: float = 20.0,
    ) -> LiveReply:
        """One request of a documented operation on node ``nid``; the answer is checked."""
        tok = self.token_for(token)
        if source is None and tok not in (None, self.c.token, self.readonly):
            source = fresh_source()  # a wrong token: keep the failed-auth limiter away from others
        r = request(
            self.c.nodes[nid].api,
            method,
            fill(template, values),
            token=tok,
            body=body,
            raw=raw,
            query=query,
            source=source,
            timeout=timeout,
        )
        check_documented(method, template, r)
        self.log.append((nid, method, template, r.status))
        return r

    def members(self, nid: int, *, consistent: bool = False) -> dict[int, dict[str, Any]]:
        """The member list served by ``nid``. Its local replica sees ``nid``'s own writes at once
        (read-your-writes); for writes made through other nodes, read with ``consistent``."""
        query = {"consistent": "true"} if consistent else None
        r = self.call(nid, "GET", "/api/v1/cluster/members", query=query)
        return {m["nodeId"]: m for m in r.result}

    def spare(self, role: str) -> int:
        """A joined, caught-up member for one test (``role``: leader, follower, lagging); the
        first call joins one for every role at once. Ids are never reused (a removed node's data
        directory stays behind)."""
        sid = self.spares.get(role)
        if sid is None or sid not in self.c.nodes:
            # the first call joins all of them in parallel; later calls just the missing one
            wanted = [role] if self.spares else list(dict.fromkeys([role, *SPARE_ROLES]))
            for r in wanted:
                self.spares[r] = self.next_spare
                self.next_spare += 1
            join_nonvoters(self.c, [self.spares[r] for r in wanted])
            sid = self.spares[role]
        return sid


SPARE_ROLES = ("leader", "follower", "lagging")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    c = Cluster(tmp_path_factory.mktemp("apilive"), 3, cluster_overrides=MANUAL_PROMOTION)
    try:
        form_with_manual_promotion(c)
        ro = create_token(c, "readonly", "live-reader")["token"]
        wait_token_everywhere(c, ro)
        for name, cidr in ((WALK_POOL, "10.60.0.0/16"), (LOAD_POOL, "10.61.0.0/16")):
            r = admin_request(c, c.wait_leader(), "POST", "/api/v1/pools", body={"name": name, "cidr": cidr})
            assert r.status == 201, str(r)
        yield Live(c, ro)
    finally:
        shutdown(c)


# --- the route walk -----------------------------------------------------------------------------
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


def _drain_target(live: Live, nid: int) -> int:
    return next(f for f in live.followers() if f != nid)


@scenario("POST", "/api/v1/cluster/members/{id}/drain")
def _drain(live: Live, nid: int) -> None:
    target = _drain_target(live, nid)
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
    target = _drain_target(live, nid)
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
        live.call(nid, "POST", "/api/v1/pools", body={"name": name, "cidr": f"10.{90 + nid}.0.0/28"})
        live.call(nid, "DELETE", "/api/v1/pools/{name}", {"name": name})
        q = {"action": "pool_delete", "limit": "1000", "consistent": "true"}
        return [
            r for r in live.call(nid, "GET", "/api/v1/audit", query=q).result if r["target"] == f"pool:{name}"
        ]

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
@pytest.mark.parametrize("op", OPS, ids=_op_id)
def test_route(live: Live, op: tuple[str, str], via: str) -> None:
    """One documented operation, served by the leader or by a follower (which forwards)."""
    fn = SCENARIOS.get(op)
    assert fn is not None, f"no live test for documented route {op}"
    nid = live.node(via)
    start = len(live.log)
    fn(live, nid)
    served = [s for n, m, t, s in live.log[start:] if (n, m, t) == (nid, *op)]
    assert any(200 <= s < 300 for s in served), f"{op} never succeeded on node {nid}: {served}"


# --- error cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("via", VIAS)
def test_not_found_cases(live: Live, via: str) -> None:
    nid = live.node(via)
    member = {"id": NOT_A_MEMBER}
    for method, template in (
        ("DELETE", "/api/v1/cluster/members/{id}"),
        ("POST", "/api/v1/cluster/members/{id}/promote"),
        ("POST", "/api/v1/cluster/members/{id}/drain"),
        ("POST", "/api/v1/cluster/members/{id}/resume"),
    ):
        r = live.call(nid, method, template, member)
        assert r.status == 404 and r.code == "member_not_found", str(r)
    cases: list[tuple[str, str, dict[str, Any], Any, str]] = [
        ("GET", "/api/v1/pools/{name}", {"name": "nope"}, _NO_BODY, "pool_not_found"),
        ("DELETE", "/api/v1/pools/{name}", {"name": "nope"}, _NO_BODY, "pool_not_found"),
        ("GET", "/api/v1/tokens/{id}", {"id": "000000000000"}, _NO_BODY, "token_not_found"),
        ("DELETE", "/api/v1/tokens/{id}", {"id": "000000000000"}, _NO_BODY, "token_not_found"),
        ("DELETE", "/api/v1/leases/{id}", {"id": 2**62}, _NO_BODY, "lease_not_found"),
        ("POST", "/api/v1/leases", {}, {"pool": "nope", "holder": "h"}, "pool_not_found"),
        ("POST", "/api/v1/leases", {}, {"pool": WALK_POOL, "holder": "h", "nodeId": 42}, "member_not_found"),
        ("PATCH", "/api/v1/cluster/members/{id}", member, {"raftAddress": "10.9.9.9:7"}, "member_not_found"),
    ]
    for method, template, values, body, code in cases:
        r = live.call(nid, method, template, values, body=body)
        assert r.status == 404 and r.code == code, str(r)
    for path in ("/api/v1/nope", "/api/v1/cluster/members/1/bogus", "/api/v2/status", "/"):
        r = request(live.c.nodes[nid].api, "GET", path, token=live.c.token)
        check_envelope(r)
        assert r.status == 404 and r.code == "not_found", str(r)


@pytest.mark.parametrize("via", VIAS)
def test_conflict_cases(live: Live, via: str) -> None:
    nid = live.node(via)
    lead = live.leader()
    for target in (lead, *live.followers()):
        r = live.call(nid, "POST", "/api/v1/cluster/members/{id}/promote", {"id": target})
        assert r.status == 409 and r.code == "already_voter", str(r)
        r = live.call(nid, "DELETE", "/api/v1/cluster/members/{id}", {"id": target})
        assert r.status == 409 and r.code == "not_drained", str(r)
    # an exhausted pool
    tiny = f"tiny-{via}"
    live.call(nid, "POST", "/api/v1/pools", body={"name": tiny, "cidr": f"10.{90 + nid}.0.0/30"})
    statuses = [
        live.call(nid, "POST", "/api/v1/leases", body={"pool": tiny, "holder": f"t{i}"}).status
        for i in range(6)
    ]
    r = live.call(nid, "POST", "/api/v1/leases", body={"pool": tiny, "holder": "one-more"})
    assert r.status == 409 and r.code == "pool_exhausted", (statuses, str(r))
    # a draining owner takes no new lease
    target = _drain_target(live, nid)
    keep = live.call(
        nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": f"keep-{via}", "nodeId": target}
    )
    try:
        r = live.call(
            nid, "POST", "/api/v1/cluster/members/{id}/drain", {"id": target}, body={"deadlineSeconds": 600}
        )
        assert r.result == {"drainState": "draining"}
        r = live.call(
            nid, "POST", "/api/v1/leases", body={"pool": WALK_POOL, "holder": "late", "nodeId": target}
        )
        assert r.status == 409 and r.code == "node_draining", str(r)
    finally:
        live.call(nid, "POST", "/api/v1/cluster/members/{id}/resume", {"id": target})
        live.call(nid, "DELETE", "/api/v1/leases/{id}", {"id": keep.result["id"]})


def test_promote_of_a_lagging_nonvoter_is_not_caught_up(live: Live) -> None:
    c = live.c
    sid = live.spare("lagging")
    voters_before = voters(c)
    lead = live.leader()
    follower = live.followers()[0]
    try:
        with paused(c, sid):
            for i in range(30):  # well past max-trailing-logs (20)
                live.call(lead, "POST", "/api/v1/tokens", body={"name": f"lag{i}", "role": "readonly"})
            started = time.monotonic()
            r = live.call(follower, "POST", "/api/v1/cluster/members/{id}/promote", {"id": sid})
            assert r.status == 409 and r.code == "not_caught_up", str(r)
            assert time.monotonic() - started >= 1.0  # it waited a little before refusing
            assert live.members(follower, consistent=True)[sid]["suffrage"] == "nonvoter"
        # once it runs again it catches up and the same promotion succeeds
        promote_when_caught_up(c, sid)
        assert live.members(lead)[sid]["suffrage"] == "voter"
    finally:
        retire(c, sid)
    assert voters(c) == voters_before - {sid}


def _bad_texts(schema: dict[str, Any], *, in_path: bool) -> list[str]:
    """Text values that violate ``schema`` (a path or query parameter)."""
    kind = schema.get("type")
    out: list[str] = []
    if kind == "integer":
        out = ["abc", "1.5", "+1", "01", "0x1", "1e3", " 1", "9" * 25, "-0", "1 "]
        if "minimum" in schema:
            out.append(str(schema["minimum"] - 1))
        if "maximum" in schema:
            out.append(str(schema["maximum"] + 1))
    elif kind == "boolean":
        out = ["yes", "2", "tru", "on", "TRUEE"]
    elif kind == "string":
        pattern = re.compile(schema.get("pattern", "^$"))
        candidates = [
            "UPPER",
            "-x",
            "a" * 70,
            "a b",
            "é",
            "x;y",
            "ABCDEF012345",
            "0123456789abc",
            "0123456789a",
        ]
        out = [v for v in candidates if not pattern.search(v)]
    if not in_path:
        out.append("")
    return out


def _path_values(template: str) -> dict[str, str]:
    if "{name}" in template:
        return {"name": "nope"}
    if template.startswith("/api/v1/tokens/"):
        return {"id": "000000000000"}
    if "{id}" in template:
        return {"id": str(NOT_A_MEMBER)}
    return {}


@pytest.mark.parametrize("via", VIAS)
def test_bad_path_and_query_values(live: Live, via: str) -> None:
    nid = live.node(via)
    checked = 0
    for method, template in OPS:
        route = ROUTES[(method, template)]
        for f in route.path_params:
            for bad in _bad_texts(f.schema, in_path=True):
                r = live.call(nid, method, template, {**_path_values(template), f.name: bad})
                assert r.status == 400 and r.code == f.code, (bad, str(r))
                checked += 1
        if route.ignore_query:
            continue
        values = _path_values(template)
        for f in route.query:
            for bad in _bad_texts(f.schema, in_path=False):
                r = live.call(nid, method, template, values, query={f.name: bad})
                assert r.status == 400 and r.code == f.code, (f.name, bad, str(r))
                checked += 1
            r = live.call(nid, method, template, values, query=[(f.name, "1"), (f.name, "1")])
            assert r.status == 400 and r.code == "invalid_parameter", str(r)
        r = live.call(nid, method, template, values, query={"bogus": "1"})
        assert r.status == 400 and r.code == "unknown_parameter", str(r)
        checked += 1
    # deadlineSeconds: body or query, never both
    r = live.call(
        nid, "POST", "/api/v1/cluster/members/{id}/drain", {"id": 2},
        body={"deadlineSeconds": 0}, query={"deadlineSeconds": "0"},
    )  # fmt: skip
    assert r.status == 400 and r.code == "invalid_deadline", str(r)
    assert checked > 50


BODY_SAMPLES: dict[str, Any] = {
    "nodeID": 60,
    "name": "bad-body",
    "cidr": "10.99.0.0/24",
    "pool": "nope",
    "holder": "h",
    "nodeId": NOT_A_MEMBER,
    "deadlineSeconds": 0,
    "role": "readonly",
    "raftAddress": "127.0.0.9:7000",
    "apiAddress": "https://127.0.0.9:5002",
}


def _sample(name: str, schema: dict[str, Any]) -> Any:
    if name == "ttlSeconds":
        return max(600, schema.get("minimum", 0))
    return BODY_SAMPLES[name]


def _bad_json_values(schema: dict[str, Any]) -> list[Any]:
    kind = schema.get("type")
    if kind == "integer":
        out: list[Any] = ["5", 1.5, 1.0, True, None, [1], {"a": 1}, 2**64]
        if "minimum" in schema:
            out.append(schema["minimum"] - 1)
        if "maximum" in schema:
            out.append(schema["maximum"] + 1)
        return out
    out = [5, None, True, [], {}]
    if "maxLength" in schema:
        out.append("a" * (schema["maxLength"] + 1))
    if "minLength" in schema:
        out.append("")
    if "enum" in schema:
        out.append("root")
    if "pattern" in schema:
        out.append("BAD \u0001 NAME")
    return out


@pytest.mark.parametrize("via", VIAS)
def test_bad_bodies(live: Live, via: str) -> None:
    nid = live.node(via)
    checked = 0
    for method, template in OPS:
        op = op_doc(method, template)
        if "requestBody" not in op:
            continue
        route = ROUTES[(method, template)]
        assert route.body is not None
        values = _path_values(template)
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        props: dict[str, Any] = schema["properties"]
        base = {name: _sample(name, s) for name, s in props.items()}
        codes = {f.name: f.code for f in route.body}

        def expect(
            body: Any = _NO_BODY,
            raw: bytes | None = None,
            *,
            code: str,
            op: tuple[str, str] = (method, template),
            values: dict[str, str] = values,
        ) -> None:
            nonlocal checked
            r = live.call(nid, op[0], op[1], values, body=body, raw=raw)
            assert r.status == 400 and r.code == code, (op, body, raw, str(r))
            checked += 1

        for name, fschema in props.items():
            for bad in _bad_json_values(fschema):
                expect({**base, name: bad}, code=codes[name])
        for name in schema.get("required", []):
            expect({k: v for k, v in base.items() if k != name}, code="missing_field")
        expect({**base, "bogus": 1}, code="unknown_field")
        expect({**base, "NodeId": 1}, code="unknown_field")
        for raw in (b"{", b"nul", b'{"a":1,"a":2}', b'{"x": NaN}', b"\xff\xfe", b"[1]" + b"]"):
            expect(raw=raw, code="invalid_json")
        for obj in ([], [base], "text", 1, None):
            expect(obj, code="invalid_body")
    for cidr in ("10.0.0.1/24", "300.0.0.0/8", "10.0.0.0", "fd00::1/64", "10.0.0.0/33", "x/8"):
        r = live.call(nid, "POST", "/api/v1/pools", body={"name": "bad-cidr", "cidr": cidr})
        assert r.status == 400 and r.code == "invalid_cidr", (cidr, str(r))
    assert checked > 80


@pytest.mark.parametrize("via", VIAS)
def test_body_size_limit(live: Live, via: str) -> None:
    nid = live.node(via)
    for method, template in OPS:
        if "requestBody" not in op_doc(method, template):
            continue
        r = live.call(nid, method, template, _path_values(template), raw=b" " * (MAX_BODY_BYTES + 1))
        assert r.status == 413 and r.code == "payload_too_large", str(r)
    # exactly at the limit is not too large: a valid (empty) object, refused for what it lacks
    at_limit = b"{" + b" " * (MAX_BODY_BYTES - 2) + b"}"
    r = live.call(nid, "POST", "/api/v1/pools", raw=at_limit)
    assert r.status == 400 and r.code == "missing_field", str(r)


@pytest.mark.parametrize("via", VIAS)
def test_wrong_method_is_405_with_allow(live: Live, via: str) -> None:
    nid = live.node(via)
    for template, ops in DOC["paths"].items():
        documented = {m.upper() for m in ops}
        path = fill(template, _path_values(template))
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - documented):
            r = request(live.c.nodes[nid].api, method, path, token=live.c.token, body={})
            check_envelope(r)
            assert r.status == 405 and r.code == "method_not_allowed", str(r)
            allow = {m.strip() for m in (r.header("Allow") or "").split(",") if m.strip()}
            assert allow == documented, (template, method, allow)


# --- authentication and roles (the targets) ---------------------------------------------------------
def _auth_probe(method: str, template: str) -> tuple[dict[str, str], Any]:
    values = _path_values(template)
    if template == "/api/v1/cluster/members/{id}" or "/members/{id}/" in template:
        values = {"id": "2"}
    if template == "/api/v1/pools/{name}":
        values = {"name": WALK_POOL}
    body = {"deadlineSeconds": 0} if template.endswith("/drain") else _NO_BODY
    return values, body


AUTH_TABLE = [(m, t, op_role(m, t)) for m, t in OPS]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("method,template,role", AUTH_TABLE, ids=[f"{m} {t}" for m, t, _ in AUTH_TABLE])
def test_auth_table(live: Live, method: str, template: str, role: str, via: str) -> None:
    """Anonymous: 401 unless documented public. Bad token: 401. Readonly: 403 on admin routes."""
    nid = live.node(via)
    values, body = _auth_probe(method, template)
    anon = live.call(nid, method, template, values, token=None, body=body)
    bad = live.call(nid, method, template, values, token=bad_token(), body=body)
    if role == "public":
        assert anon.status < 300 and bad.status < 300, (str(anon), str(bad))
        return
    for r in (anon, bad):
        assert r.status == 401 and r.code == "unauthorized", str(r)
    assert 'error="invalid_token"' in (bad.header("WWW-Authenticate") or "")
    ro = live.call(nid, method, template, values, token="readonly", body=body)
    if role == "admin":
        assert ro.status == 403 and ro.code == "forbidden", str(ro)
    else:
        assert role == "readonly"
        assert ro.status == 200, str(ro)
    # other malformed Authorization headers are anonymous
    for header in ("Basic Zm9vOmJhcg==", "Bearer", "Bearer a b", "Bearer " + "x" * 600):
        r = request(live.c.nodes[nid].api, method, fill(template, values), headers={"Authorization": header})
        check_documented(method, template, r)
        assert r.status == 401, (header, str(r))


def test_revoked_token_is_refused_on_every_node(live: Live) -> None:
    c = live.c
    lead = live.leader()
    follower = live.followers()[0]
    tok = live.call(lead, "POST", "/api/v1/tokens", body={"name": "doomed", "role": "admin"}).result
    wait_token_everywhere(c, tok["token"])
    r = live.call(follower, "DELETE", "/api/v1/tokens/{id}", {"id": tok["id"]}, token=tok["token"])
    assert r.result == {"message": "Token revoked"}  # a token may revoke itself
    r = live.call(follower, "GET", "/api/v1/cluster/members", token=tok["token"])
    assert r.status == 401  # at once where it was revoked
    wait_token_everywhere(c, tok["token"], accepted=False)
    for nid in sorted(c.nodes):
        for method, template in (("GET", "/api/v1/pools"), ("POST", "/api/v1/cluster/members/{id}/resume")):
            r = live.call(nid, method, template, {"id": 2}, token=tok["token"])
            assert r.status == 401 and r.code == "unauthorized", str(r)
    r = live.call(lead, "GET", "/api/v1/tokens/{id}", {"id": tok["id"]})
    assert r.status == 404 and r.code == "token_not_found"


def test_failed_auth_rate_limit_is_per_client(live: Live) -> None:
    nid = live.leader()
    source, token = fresh_source(), bad_token()
    statuses = [live.call(nid, "GET", "/api/v1/pools", token=token, source=source).status for _ in range(25)]
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    r = live.call(nid, "GET", "/api/v1/pools", token=token, source=source)
    assert r.status == 429 and r.code == "rate_limited"
    r = live.call(nid, "GET", "/api/v1/pools", source=source)  # a valid token from that client works
    assert r.status == 200, str(r)
    assert live.call(nid, "GET", "/api/v1/pools", source=fresh_source()).status == 200
    assert live.call(nid, "GET", "/api/v1/status", token=None, source=source).status == 200  # public


# --- fuzz against the running cluster, under write load -----------------------------------------
_MEMBER_MUTATIONS = {
    ("DELETE", "/api/v1/cluster/members/{id}"),
    ("POST", "/api/v1/cluster/members/{id}/drain"),
    ("POST", "/api/v1/cluster/members/{id}/promote"),
}
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
NAMES: dict[str, list[Any]] = {
    "pool": [WALK_POOL, LOAD_POOL, "fz-a", "fz-b"],
    "name": ["fz-a", "fz-b", "fz-c", WALK_POOL],
    "cidr": [
        "10.200.0.0/28",
        "10.201.0.0/24",
        "fd00:99::/120",
        "10.60.1.0/24",
        "0.0.0.0/0",
        "10.0.0.1/8",
    ],
    "holder": ["fz1", "fz2", "fz3"],
}


def _valid(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 10**6)
        edges = st.sampled_from([lo, hi, 1, 2, 3, NOT_A_MEMBER] if hi <= 63 else [lo, hi])
        return st.one_of(edges, st.integers(lo, hi))
    if kind == "boolean":
        return st.booleans()
    choices = NAMES.get(name)
    pattern = schema.get("pattern")
    gen: st.SearchStrategy[Any]
    if pattern and "\\u0000" not in pattern:
        gen = st.from_regex(pattern, fullmatch=True)
    else:
        gen = st.text(
            alphabet=st.characters(blacklist_categories=("Cc", "Cs")),
            min_size=schema.get("minLength", 0),
            max_size=min(schema.get("maxLength", 20), 40),
        )
    return st.one_of(st.sampled_from(choices), gen) if choices else gen


def _any(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    near: st.SearchStrategy[Any] = st.nothing()
    if schema.get("type") == "integer":
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 10**6)
        near = st.sampled_from([lo - 1, hi + 1, 2**64, True, 1.5, float(lo), str(lo), None])
    return st.one_of(_valid(name, schema), near, JSON_VALUES)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _text(name: str, schema: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.one_of(
        _valid(name, schema).map(_as_text),
        _valid(name, schema).map(_as_text),
        st.sampled_from(["", "-1", "0", "01", "1.0", "null", "yes", " 1", "9" * 22]),
        st.text(max_size=20),
    )


@st.composite
def fuzz_cases(draw: st.DrawFn) -> dict[str, Any]:
    method, template = draw(st.sampled_from(OPS))
    op = op_doc(method, template)
    values: dict[str, str] = {}
    query: list[tuple[str, str]] = []
    for p in op.get("parameters", []):
        if p["in"] == "path":
            values[p["name"]] = draw(
                _text(p["name"], p["schema"]).filter(lambda s: s not in ("", ".", "..") and "/" not in s)
            )
        elif draw(st.booleans()):
            query.append((p["name"], draw(_text(p["name"], p["schema"]))))
    if draw(st.integers(0, 9)) == 0:
        query.append((draw(st.text(min_size=1, max_size=6)), draw(st.text(max_size=6))))
    raw: bytes | None = None
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        kind = draw(st.integers(0, 9))
        if kind <= 6:
            obj: dict[str, Any] = {}
            for name, fschema in schema["properties"].items():
                if name in schema.get("required", []) or draw(st.booleans()):
                    obj[name] = draw(_valid(name, fschema) if kind <= 3 else _any(name, fschema))
            if kind == 6:
                obj[draw(st.text(max_size=6))] = draw(JSON_VALUES)
            raw = json.dumps(obj).encode()
        elif kind <= 8:
            raw = json.dumps(draw(JSON_VALUES)).encode()
        else:
            raw = draw(st.binary(max_size=30))
    return {
        "method": method,
        "template": template,
        "values": values,
        "query": query,
        "raw": raw,
        "token": draw(st.sampled_from(["admin", "admin", "admin", "readonly", None, BAD_TOKEN])),
        "node": draw(st.sampled_from([1, 2, 3])),
    }


def _defuse(case: dict[str, Any], members: set[int]) -> dict[str, Any]:
    """Keep the fuzz from changing the membership it runs on (remove, drain, promote a member),
    or deleting the pools the other tests and the load use."""
    key = (case["method"], case["template"])
    if case["token"] == "admin" and key in _MEMBER_MUTATIONS:
        text = case["values"].get("id", "")
        if re.fullmatch(r"-?[0-9]+", text) and int(text) in members:
            case["values"]["id"] = str(NOT_A_MEMBER)
    if case["template"] == "/api/v1/pools/{name}" and case["values"].get("name") in (WALK_POOL, LOAD_POOL):
        case["values"]["name"] = "fz-z"
    return case


def test_fuzz_live_cluster_under_write_load(live: Live) -> None:
    c = live.c
    members = set(live.members(live.leader()))
    voters_before = voters(c)
    load = LoadThread(c, [1, 2, 3], LOAD_POOL, max_seconds=90)
    seen: dict[tuple[str, str], set[int]] = {}
    load.start()
    try:

        @settings(
            max_examples=600,
            derandomize=True,
            deadline=None,
            database=None,
            phases=(Phase.explicit, Phase.generate),  # no shrinking against a live cluster
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
        )
        @given(case=fuzz_cases())
        def run(case: dict[str, Any]) -> None:
            case = _defuse(case, members)
            r = live.call(
                case["node"],
                case["method"],
                case["template"],
                case["values"],
                token=case["token"],
                raw=case["raw"],
                query=case["query"],
            )
            assert r.status < 500, (case, str(r))
            seen.setdefault((case["method"], case["template"]), set()).add(r.status)

        run()
    finally:
        load.stop()
    assert not load.errors, load.errors
    for method, template, r in load.replies:
        check_documented(method, template, r)
        assert r.status < 500, str(r)
    assert load.successes() >= 20, f"the write load barely ran: {len(load.replies)} replies"
    assert set(seen) == set(OPS), sorted(set(OPS) - set(seen))
    statuses = {s for v in seen.values() for s in v}
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    # the cluster is intact afterwards
    assert set(live.members(live.leader())) == members and voters(c) == voters_before
    outcomes = sum(len(v) for v in seen.values())
    print(f"fuzz: {outcomes} (route, status) outcomes; load: {len(load.replies)} replies")


# --- destructive cases on their own clusters -----------------------------------------------------
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
        node = c.make_node(1)
        c.write_config(node)
        c.start(node)
        token_file = node.data_dir / "admin.token"
        wait_for("admin token", lambda: token_file.exists() and token_file.read_text().strip())
        c.token = token_file.read_text().strip()
        wait_for("api up", lambda: request(node.api, "GET", "/healthz").status == 200)
        cluster_ops = [(m, t) for m, t in OPS if is_cluster_route(t)]
        assert len(cluster_ops) >= 7
        for method, template in cluster_ops:
            values, body = _auth_probe(method, template)
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
    finally:
        shutdown(c)
