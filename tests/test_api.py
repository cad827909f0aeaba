"""The HTTP API against FakeNodes: every route as leader and as follower, every error case."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from quorumd.api.app import Api, all_routes, build_app
from quorumd.api.auth import FailedAuthLimiter, authorize
from quorumd.api.errors import ApiError, CommitTimeout, TooManyRequests, Unauthorized
from quorumd.api.openapi import build_document
from quorumd.api.ports import DrainState, ForwardedRequest, TokenRole
from tests.api_support import Client, Env, close_env, make_env, request, sample_path
from tests.fakes.node import FakeCluster, FakeNode

pytestmark = pytest.mark.asyncio
VIA = ["leader", "follower"]
M = "/api/v1/cluster/members"


def _doc() -> dict[str, Any]:
    return build_document(all_routes())


def _operations(role: str | None = None) -> list[tuple[str, str]]:
    doc = _doc()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if role is None or op["x-quorumd-role"] == role:
                out.append((method.upper(), path))
    return sorted(out)


# --- public routes ------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
async def test_public_routes(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(c, "GET", "/api/v1/status")
    assert r.status == 200
    st = r.result
    assert st["nodeId"] == env.node(via).node_id and st["leaderNodeId"] == 1
    assert st["role"] == ("leader" if via == "leader" else "follower")
    assert (await request(c, "GET", "/healthz")).result == {"status": "ok"}
    assert (await request(c, "GET", "/readyz")).result == {"ready": True}
    for path in ("/metrics", "/api/v1/metrics"):
        r = await request(c, "GET", path)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert b"quorumd_api_requests_total" in r.raw
    r = await request(c, "GET", "/api/v1/openapi.json")
    assert r.status == 200 and r.body["openapi"] == "3.1.0"
    # public probes ignore query parameters (scrapers may add some)
    assert (await request(c, "GET", "/healthz", params={"x": "1"})).status == 200


async def test_readyz_not_ready(env: Env) -> None:
    env.follower.ready = False
    r = await request(env.fc, "GET", "/readyz")
    assert r.status == 503 and r.code == "not_ready" and r.headers["Retry-After"] == "1"


# --- cluster ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
async def test_members_list(env: Env, via: str) -> None:
    r = await request(env.client(via), "GET", M, env.readonly)
    assert r.status == 200
    items = r.result
    assert [m["nodeId"] for m in items] == [1, 2, 3, 4, 5, 6]
    assert items[0]["isLeader"] is True and items[3]["suffrage"] == "nonvoter"
    assert env.node(via).forwarded == []  # plain reads are local


@pytest.mark.parametrize("via", VIA)
async def test_members_consistent_read_goes_through_leader(env: Env, via: str) -> None:
    r = await request(env.client(via), "GET", M, env.readonly, params={"consistent": "true"})
    assert r.status == 200 and len(r.result) == 6
    assert env.leader.barriers == 1
    assert len(env.follower.forwarded) == (1 if via == "follower" else 0)


@pytest.mark.parametrize("via", VIA)
async def test_remove_member(env: Env, via: str) -> None:
    c = env.client(via)
    base = env.cluster.applied
    r = await request(c, "DELETE", f"{M}/3", env.admin)
    assert r.status == 409 and r.code == "not_drained"
    r = await request(c, "DELETE", f"{M}/6", env.admin)
    assert r.status == 200 and r.result == {"message": "Cluster member removed"}
    r = await request(c, "DELETE", f"{M}/3", env.admin, params={"force": "true"})
    assert r.status == 200
    assert 3 not in env.cluster.members and 6 not in env.cluster.members
    r = await request(c, "DELETE", f"{M}/42", env.admin, params={"force": "true"})
    assert r.status == 404 and r.code == "member_not_found"
    r = await request(c, "DELETE", f"{M}/3", env.admin, params={"force": "maybe"})
    assert r.status == 400 and r.code == "invalid_parameter"
    if via == "follower":  # read-your-writes: one wait per successful forwarded write
        assert env.follower.waited == [base + 1, base + 2]


async def test_remove_leader_hands_over_and_last_voter(env: Env) -> None:
    r = await request(env.fc, "DELETE", f"{M}/1", env.admin, params={"force": "true"})
    assert r.status == 200
    assert env.cluster.leader_id == 2  # leadership moved before removal
    # now node 2 leads; remove voter 3, then 2 is the last voter
    assert (await request(env.fc, "DELETE", f"{M}/3", env.admin, params={"force": "true"})).status == 200
    r = await request(env.fc, "DELETE", f"{M}/2", env.admin, params={"force": "true"})
    assert r.status == 409 and r.code == "last_voter"


@pytest.mark.parametrize("via", VIA)
async def test_promote(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(c, "POST", f"{M}/4/promote", env.admin)
    assert r.status == 200 and r.result == {"message": "Cluster member promoted to voter"}
    assert env.cluster.members[4].voter
    r = await request(c, "POST", f"{M}/4/promote", env.admin)
    assert r.status == 409 and r.code == "already_voter"
    r = await request(c, "POST", f"{M}/5/promote", env.admin)
    assert r.status == 409 and r.code == "not_caught_up"
    r = await request(c, "POST", f"{M}/9/promote", env.admin)
    assert r.status == 404 and r.code == "member_not_found"
    r = await request(c, "POST", f"{M}/4/promote", env.admin, json_body={"x": 1})
    assert r.status == 400 and r.code == "unknown_field"


@pytest.mark.parametrize("via", VIA)
async def test_autopilot(env: Env, via: str) -> None:
    r = await request(env.client(via), "GET", "/api/v1/cluster/autopilot", env.admin)
    assert r.status == 200
    ap = r.result
    assert ap["leaderNodeId"] == 1 and ap["voters"] == [1, 2, 3] and len(ap["servers"]) == 6
    assert len(env.follower.forwarded) == (1 if via == "follower" else 0)


@pytest.mark.parametrize("via", VIA)
async def test_drain_and_resume(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(c, "POST", f"{M}/3/drain", env.admin)
    assert r.status == 200 and r.result == {"drainState": "drained"}
    r = await request(c, "POST", f"{M}/3/resume", env.admin)
    assert r.status == 200 and r.result == {"message": "Cluster member resumed"}
    assert env.cluster.members[3].drain_state == DrainState.ACTIVE
    r = await request(c, "POST", f"{M}/3/drain", env.admin, json_body={"deadlineSeconds": 30})
    assert r.result == {"drainState": "draining"}
    r = await request(c, "POST", f"{M}/3/resume", env.admin)
    r = await request(c, "POST", f"{M}/3/drain", env.admin, params={"deadlineSeconds": "3600"})
    assert r.result == {"drainState": "draining"}
    # resume is idempotent
    for _ in range(2):
        assert (await request(c, "POST", f"{M}/3/resume", env.admin)).status == 200
    r = await request(c, "POST", f"{M}/33/drain", env.admin)
    assert r.status == 404 and r.code == "member_not_found"
    r = await request(c, "POST", f"{M}/33/resume", env.admin)
    assert r.status == 404 and r.code == "member_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"deadlineSeconds": None},
        {"deadlineSeconds": "5"},
        {"deadlineSeconds": 1.5},
        {"deadlineSeconds": True},
        {"deadlineSeconds": -1},
        {"deadlineSeconds": 3601},
        {"deadlineSeconds": 1.0},
        {"deadline": 1},
        [1],
        "x",
    ],
)
async def test_drain_bad_body(env: Env, body: Any) -> None:
    for c in (env.lc, env.fc):
        r = await request(c, "POST", f"{M}/3/drain", env.admin, json_body=body)
        assert r.status == 400, r.body
    assert env.cluster.members[3].drain_state == DrainState.ACTIVE
    assert env.follower.forwarded == []  # validated before forwarding


@pytest.mark.parametrize("query", ["null", "5.0", "abc", "-1", "3601", "", " 5", "1e3"])
async def test_drain_bad_query(env: Env, query: str) -> None:
    r = await request(env.fc, "POST", f"{M}/3/drain", env.admin, params={"deadlineSeconds": query})
    assert r.status == 400 and r.code == "invalid_deadline"


async def test_drain_deadline_in_both_places(env: Env) -> None:
    r = await request(
        env.lc,
        "POST",
        f"{M}/3/drain",
        env.admin,
        json_body={"deadlineSeconds": 1},
        params={"deadlineSeconds": "1"},
    )
    assert r.status == 400 and r.code == "invalid_deadline"


@pytest.mark.parametrize("bad", ["0", "64", "abc", "-1", "1.5", "01", "99999999999999999999999", "%20"])
@pytest.mark.parametrize(
    "suffix,method", [("", "DELETE"), ("/promote", "POST"), ("/drain", "POST"), ("/resume", "POST")]
)
async def test_bad_node_ids(env: Env, bad: str, suffix: str, method: str) -> None:
    r = await request(env.fc, method, f"{M}/{bad}{suffix}", env.admin)
    assert r.status == 400 and r.code == "invalid_node_id", (bad, r.body)


@pytest.mark.parametrize("via", VIA)
async def test_join_tokens(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(c, "POST", "/api/v1/cluster/pki/join-tokens", env.admin, json_body={"nodeID": 7})
    assert r.status == 201 and r.result["token"] and r.result["expiresAt"] == int(env.cluster.now()) + 1800
    r = await request(
        c, "POST", "/api/v1/cluster/pki/join-tokens", env.admin, json_body={"nodeID": 8, "ttlSeconds": 300}
    )
    assert r.status == 201 and r.result["expiresAt"] == int(env.cluster.now()) + 300
    r = await request(c, "POST", "/api/v1/cluster/pki/join-tokens", env.admin, json_body={"nodeID": 2})
    assert r.status == 409 and r.code == "already_member"


@pytest.mark.parametrize(
    "body,code",
    [
        ({}, "missing_field"),
        ({"nodeID": 0}, "invalid_node_id"),
        ({"nodeID": 64}, "invalid_node_id"),
        ({"nodeID": "7"}, "invalid_node_id"),
        ({"nodeID": True}, "invalid_node_id"),
        ({"nodeID": 7.0}, "invalid_node_id"),
        ({"nodeID": 7, "ttlSeconds": 299}, "invalid_ttl"),
        ({"nodeID": 7, "ttlSeconds": 86401}, "invalid_ttl"),
        ({"nodeID": 7, "ttlSeconds": None}, "invalid_ttl"),
        ({"nodeID": 7, "nodeId": 7}, "unknown_field"),
    ],
)
async def test_join_token_bad_body(env: Env, body: dict[str, Any], code: str) -> None:
    r = await request(env.fc, "POST", "/api/v1/cluster/pki/join-tokens", env.admin, json_body=body)
    assert r.status == 400 and r.code == code


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
async def test_tokens_lifecycle(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(c, "POST", "/api/v1/tokens", env.admin, json_body={"name": "ci", "role": "readonly"})
    assert r.status == 201
    created = r.result
    assert (
        created["role"] == "readonly" and created["expiresAt"] is None and created["token"].startswith("qd_")
    )
    new_token = created["token"]
    assert (await request(c, "GET", M, new_token)).status == 200
    r = await request(c, "GET", "/api/v1/tokens", env.admin)
    assert created["id"] in [t["id"] for t in r.result]
    assert all("token" not in t for t in r.result)  # secrets are never listed
    r = await request(c, "GET", f"/api/v1/tokens/{created['id']}", env.admin)
    assert r.status == 200 and r.result["name"] == "ci"
    r = await request(c, "DELETE", f"/api/v1/tokens/{created['id']}", env.admin)
    assert r.status == 200 and r.result == {"message": "Token revoked"}
    r = await request(c, "GET", M, new_token)
    assert r.status == 401 and r.code == "unauthorized"
    r = await request(c, "DELETE", f"/api/v1/tokens/{created['id']}", env.admin)
    assert r.status == 404 and r.code == "token_not_found"
    r = await request(c, "GET", f"/api/v1/tokens/{created['id']}", env.admin)
    assert r.status == 404 and r.code == "token_not_found"
    r = await request(c, "GET", "/api/v1/tokens/NOT-AN-ID", env.admin)
    assert r.status == 400 and r.code == "invalid_token_id"


async def test_token_with_ttl_expires(env: Env) -> None:
    r = await request(
        env.fc,
        "POST",
        "/api/v1/tokens",
        env.admin,
        json_body={"name": "short", "role": "admin", "ttlSeconds": 60},
    )
    assert r.status == 201 and r.result["expiresAt"] == int(env.cluster.now()) + 60
    token = r.result["token"]
    assert (await request(env.fc, "GET", "/api/v1/tokens", token)).status == 200
    env.cluster.now = lambda: 1_750_000_000.0 + 61
    r = await request(env.fc, "GET", "/api/v1/tokens", token)
    assert r.status == 401 and r.code == "unauthorized"


@pytest.mark.parametrize(
    "body,code",
    [
        ({"name": "", "role": "admin"}, "invalid_field"),
        ({"name": "x" * 65, "role": "admin"}, "invalid_field"),
        ({"name": "a\nb", "role": "admin"}, "invalid_field"),
        ({"name": "a", "role": "root"}, "invalid_role"),
        ({"name": "a"}, "missing_field"),
        ({"name": 5, "role": "admin"}, "invalid_field"),
        ({"name": "a", "role": "admin", "ttlSeconds": "60"}, "invalid_ttl"),
        ({"name": "a", "role": "admin", "ttlSeconds": False}, "invalid_ttl"),
        ({"name": "a", "role": "admin", "extra": 1}, "unknown_field"),
        ({"name": "\ud800", "role": "admin"}, "invalid_field"),
    ],
)
async def test_token_bad_body(env: Env, body: dict[str, Any], code: str) -> None:
    r = await request(
        env.lc,
        "POST",
        "/api/v1/tokens",
        env.admin,
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 400 and r.code == code


# --- pools --------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
async def test_pools_lifecycle(env: Env, via: str) -> None:
    c = env.client(via)
    r = await request(
        c, "POST", "/api/v1/pools", env.admin, json_body={"name": "ran-a", "cidr": "10.1.0.0/24"}
    )
    assert r.status == 201 and r.result["name"] == "ran-a" and r.result["cidr"] == "10.1.0.0/24"
    r = await request(c, "POST", "/api/v1/pools", env.admin, json_body={"name": "v6", "cidr": "fd00::/120"})
    assert r.status == 201
    r = await request(
        c, "POST", "/api/v1/pools", env.admin, json_body={"name": "ran-a", "cidr": "10.2.0.0/24"}
    )
    assert r.status == 409 and r.code == "pool_exists"
    r = await request(
        c, "POST", "/api/v1/pools", env.admin, json_body={"name": "ran-b", "cidr": "10.1.0.0/16"}
    )
    assert r.status == 409 and r.code == "pool_overlap"
    r = await request(c, "GET", "/api/v1/pools", env.readonly)
    assert [p["name"] for p in r.result] == ["ran-a", "v6"]
    r = await request(c, "GET", "/api/v1/pools/ran-a", env.readonly)
    assert r.status == 200 and r.result["cidr"] == "10.1.0.0/24"
    r = await request(c, "GET", "/api/v1/pools/nope", env.readonly)
    assert r.status == 404 and r.code == "pool_not_found"
    r = await request(c, "GET", "/api/v1/pools/BAD!", env.readonly)
    assert r.status == 400 and r.code == "invalid_pool_name"
    r = await request(c, "DELETE", "/api/v1/pools/v6", env.admin)
    assert r.status == 200 and r.result == {"message": "Pool deleted"}
    r = await request(c, "DELETE", "/api/v1/pools/v6", env.admin)
    assert r.status == 404 and r.code == "pool_not_found"


@pytest.mark.parametrize(
    "body,code",
    [
        ({"name": "p", "cidr": "10.0.0.1/24"}, "invalid_cidr"),
        ({"name": "p", "cidr": "10.0.0.0"}, "invalid_cidr"),
        ({"name": "p", "cidr": "banana"}, "invalid_cidr"),
        ({"name": "p", "cidr": "10.0.0.0/33"}, "invalid_cidr"),
        ({"name": "p", "cidr": 10}, "invalid_cidr"),
        ({"name": "P", "cidr": "10.0.0.0/24"}, "invalid_pool_name"),
        ({"name": "a" * 65, "cidr": "10.0.0.0/24"}, "invalid_pool_name"),
        ({"cidr": "10.0.0.0/24"}, "missing_field"),
        ({"name": "p", "cidr": "10.0.0.0/24", "size": 3}, "unknown_field"),
    ],
)
async def test_pool_bad_body(env: Env, body: dict[str, Any], code: str) -> None:
    r = await request(env.fc, "POST", "/api/v1/pools", env.admin, json_body=body)
    assert r.status == 400 and r.code == code


# --- leases -------------------------------------------------------------------------------------


async def _pool(env: Env, name: str = "p1", cidr: str = "10.9.0.0/29") -> None:
    r = await request(env.lc, "POST", "/api/v1/pools", env.admin, json_body={"name": name, "cidr": cidr})
    assert r.status == 201, r.body


@pytest.mark.parametrize("via", VIA)
async def test_leases_allocate_defaults_to_serving_node(env: Env, via: str) -> None:
    await _pool(env)
    c = env.client(via)
    me = env.node(via).node_id
    r = await request(c, "POST", "/api/v1/leases", env.admin, json_body={"pool": "p1", "holder": "ue-1"})
    assert r.status == 201
    lease = r.result
    assert lease["nodeId"] == me and lease["address"] == "10.9.0.1" and lease["holder"] == "ue-1"
    assert env.leader.allocations[-1] == ("p1", "ue-1", me)
    if via == "follower":
        assert json.loads(env.follower.forwarded[-1].body)["nodeId"] == 2
    # the same (pool, holder) again: the existing lease, re-owned, 200
    r = await request(
        c, "POST", "/api/v1/leases", env.admin, json_body={"pool": "p1", "holder": "ue-1", "nodeId": 3}
    )
    assert r.status == 200 and r.result["id"] == lease["id"] and r.result["nodeId"] == 3
    r = await request(c, "POST", "/api/v1/leases", env.admin, json_body={"pool": "p1", "holder": "ue-2"})
    assert r.status == 201 and r.result["address"] == "10.9.0.2"
    members = (await request(c, "GET", M, env.readonly)).result
    assert {m["nodeId"]: m["activeLeases"] for m in members}[3] == 1


async def test_leases_conflicts(env: Env) -> None:
    await _pool(env, "tiny", "10.8.0.0/30")  # two usable addresses
    r = await request(
        env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "tiny", "holder": "a", "nodeId": 6}
    )
    assert r.status == 409 and r.code == "node_draining"
    for holder in ("a", "b"):
        assert (
            await request(
                env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "tiny", "holder": holder}
            )
        ).status == 201
    r = await request(env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "tiny", "holder": "c"})
    assert r.status == 409 and r.code == "pool_exhausted"
    r = await request(env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "nope", "holder": "c"})
    assert r.status == 404 and r.code == "pool_not_found"
    r = await request(
        env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "tiny", "holder": "c", "nodeId": 40}
    )
    assert r.status == 404 and r.code == "member_not_found"
    r = await request(env.fc, "DELETE", "/api/v1/pools/tiny", env.admin)
    assert r.status == 409 and r.code == "pool_in_use"


@pytest.mark.parametrize("via", VIA)
async def test_leases_list_and_release(env: Env, via: str) -> None:
    await _pool(env, "p1", "10.9.0.0/28")
    await _pool(env, "p2", "10.9.1.0/28")
    for i in range(6):
        body = {"pool": "p1" if i % 2 else "p2", "holder": f"h{i}", "nodeId": 1 + i % 3}
        assert (await request(env.lc, "POST", "/api/v1/leases", env.admin, json_body=body)).status == 201
    c = env.client(via)
    r = await request(c, "GET", "/api/v1/leases", env.readonly)
    assert [x["id"] for x in r.result] == [1, 2, 3, 4, 5, 6]
    r = await request(c, "GET", "/api/v1/leases", env.readonly, params={"limit": "2", "after": "2"})
    assert [x["id"] for x in r.result] == [3, 4]
    r = await request(c, "GET", "/api/v1/leases", env.readonly, params={"nodeId": "2"})
    assert [x["id"] for x in r.result] == [2, 5]
    r = await request(c, "GET", "/api/v1/leases", env.readonly, params={"pool": "p1", "consistent": "true"})
    assert [x["id"] for x in r.result] == [2, 4, 6]
    r = await request(c, "DELETE", "/api/v1/leases/2", env.admin)
    assert r.status == 200 and r.result == {"message": "Lease released"}
    r = await request(c, "DELETE", "/api/v1/leases/2", env.admin)
    assert r.status == 404 and r.code == "lease_not_found"
    r = await request(c, "DELETE", "/api/v1/leases/x", env.admin)
    assert r.status == 400 and r.code == "invalid_lease_id"


@pytest.mark.parametrize(
    "params,code",
    [
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "10001"}, "invalid_limit"),
        ({"limit": "abc"}, "invalid_limit"),
        ({"after": "-1"}, "invalid_parameter"),
        ({"after": "1.5"}, "invalid_parameter"),
        ({"nodeId": "0"}, "invalid_node_id"),
        ({"nodeId": "64"}, "invalid_node_id"),
        ({"pool": "Bad Name"}, "invalid_pool_name"),
        ({"bogus": "1"}, "unknown_parameter"),
        ([("limit", "1"), ("limit", "2")], "invalid_parameter"),
        ({"consistent": "yes"}, "invalid_parameter"),
    ],
)
async def test_leases_bad_query(env: Env, params: Any, code: str) -> None:
    r = await request(env.fc, "GET", "/api/v1/leases", env.readonly, params=params)
    assert r.status == 400 and r.code == code


@pytest.mark.parametrize(
    "body,code",
    [
        ({"pool": "p1"}, "missing_field"),
        ({"pool": "p1", "holder": ""}, "invalid_holder"),
        ({"pool": "p1", "holder": "x" * 257}, "invalid_holder"),
        ({"pool": "p1", "holder": 3}, "invalid_holder"),
        ({"pool": "p1", "holder": "h", "nodeId": 0}, "invalid_node_id"),
        ({"pool": "p1", "holder": "h", "nodeId": True}, "invalid_node_id"),
        ({"pool": "p1", "holder": "h", "nodeId": None}, "invalid_node_id"),
        ({"pool": "p1", "holder": "h", "owner": 1}, "unknown_field"),
    ],
)
async def test_leases_bad_body(env: Env, body: dict[str, Any], code: str) -> None:
    r = await request(env.fc, "POST", "/api/v1/leases", env.admin, json_body=body)
    assert r.status == 400 and r.code == code


# --- generic body handling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,code",
    [
        (b"{", "invalid_json"),
        (b"[]", "invalid_body"),
        (b"null", "invalid_body"),
        (b'"x"', "invalid_body"),
        (b'{"name":"a","name":"b","role":"admin"}', "invalid_json"),
        (b'{"name":NaN}', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"{}", "missing_field"),
        (b'{"name":"a","role":"admin","ttlSeconds":1' + b"0" * 5000 + b"}", "invalid_json"),
    ],
)
async def test_malformed_bodies(env: Env, raw: bytes, code: str) -> None:
    r = await request(env.fc, "POST", "/api/v1/tokens", env.admin, data=raw)
    assert r.status == 400 and r.code == code


async def test_payload_too_large(env: Env) -> None:
    big = b'{"name": "' + b"a" * (1024 * 1024) + b'"}'
    for c in (env.lc, env.fc):
        r = await request(c, "POST", "/api/v1/tokens", env.admin, data=big)
        assert r.status == 413 and r.code == "payload_too_large"
    resp = await env.cluster.apps[1].dispatch_forwarded(
        ForwardedRequest("POST", "/api/v1/tokens", (), big, env.admin)
    )
    assert resp.status == 413 and json.loads(resp.body)["code"] == "payload_too_large"


# --- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", _operations("admin") + _operations("readonly"))
async def test_401_without_or_with_bad_token(env: Env, method: str, path: str) -> None:
    concrete = sample_path(path, _doc(), method.lower())
    for token in (None, "qd_000000000001_" + "A" * 43, "garbage"):
        r = await request(env.fc, method, concrete, token)
        assert r.status == 401 and r.code == "unauthorized", (method, path, r.body)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.follower.forwarded == []


@pytest.mark.parametrize("method,path", _operations("admin"))
@pytest.mark.parametrize("via", VIA)
async def test_403_readonly_on_admin_routes(env: Env, via: str, method: str, path: str) -> None:
    doc = _doc()
    assert "403" in doc["paths"][path][method.lower()]["responses"]
    r = await request(env.client(via), method, sample_path(path, doc, method.lower()), env.readonly)
    assert r.status == 403 and r.code == "forbidden"
    assert env.follower.forwarded == []


async def test_readonly_routes_accept_readonly(env: Env) -> None:
    for method, path in _operations("readonly"):
        r = await request(env.fc, method, sample_path(path, _doc(), method.lower()), env.readonly)
        assert r.status in (200, 404), (path, r.body)


async def test_bearer_scheme_parsing(env: Env) -> None:
    r = await request(env.fc, "GET", M, headers={"Authorization": f"bearer {env.readonly}"})
    assert r.status == 200
    r = await request(env.fc, "GET", M, headers={"Authorization": f"Basic {env.readonly}"})
    assert r.status == 401
    r = await request(env.fc, "GET", M, headers={"Authorization": "Bearer"})
    assert r.status == 401


async def test_bruteforce_rate_limit(env: Env) -> None:
    """20 wrong tokens from one client: its further wrong tokens answer 429 for the window, while
    a valid token from that same client keeps working (the lockout never locks the admin out)."""
    bad = "qd_00000000beef_" + "B" * 43
    for i in range(20):
        assert (await request(env.fc, "GET", M, f"qd_00000000{i:04x}_" + "B" * 43)).status == 401
    r = await request(env.fc, "GET", M, bad)  # a flood of guesses is throttled
    assert r.status == 429 and r.code == "rate_limited" and int(r.headers["Retry-After"]) == 60
    assert (await request(env.fc, "GET", M, env.readonly)).status == 200  # a valid token is served
    assert (await request(env.fc, "GET", "/api/v1/status")).status == 200  # public stays open
    assert (await request(env.lc, "GET", M, bad)).status == 401  # per node, per client
    env.clock.now += 30
    r = await request(env.fc, "GET", M, bad)
    assert r.status == 429 and int(r.headers["Retry-After"]) == 30
    assert (await request(env.fc, "GET", M, env.readonly)).status == 200
    env.clock.now += 30.5
    assert (await request(env.fc, "GET", M, bad)).status == 401


async def test_bruteforce_on_one_token_id_from_many_clients(env: Env) -> None:
    """Wrong secrets for one token id are counted per token id too (across addresses); the holder
    of that token id is still served with the right secret, from any address."""
    tid = env.readonly.split("_")[1]
    limiter = FailedAuthLimiter(clock=env.clock)
    node = env.follower
    for i in range(20):
        wrong = f"qd_{tid}_{i:02d}" + "C" * 41
        with pytest.raises(Unauthorized):
            authorize(node, wrong, TokenRole.READONLY, client=f"10.9.0.{i + 1}", limiter=limiter)
    with pytest.raises(TooManyRequests):
        authorize(node, f"qd_{tid}_" + "D" * 43, TokenRole.READONLY, client="10.9.1.1", limiter=limiter)
    for source in ("10.9.1.1", "10.9.0.1"):
        p = authorize(node, env.readonly, TokenRole.READONLY, client=source, limiter=limiter)
        assert p.role == TokenRole.READONLY
    # another token id from a fresh address is not affected
    with pytest.raises(Unauthorized):
        authorize(node, "qd_0123456789ab_" + "E" * 43, TokenRole.READONLY, client="10.9.2.1", limiter=limiter)


# --- routing errors -----------------------------------------------------------------------------


async def test_clustering_disabled() -> None:
    cluster = FakeCluster()
    node = FakeNode(cluster, 1, cluster_enabled=False)
    cluster.add_member(1)  # a standalone node is the one member of its registry
    cluster.leader_id = 1
    _, admin = cluster.add_token(TokenRole.ADMIN)
    app = build_app(node, node_id=1, registry=CollectorRegistry())
    async with Client(app) as c:
        for method, path in _operations():
            if not path.startswith("/api/v1/cluster/"):
                continue
            concrete = sample_path(path, _doc(), method.lower())
            for token in (admin, None):
                r = await request(c, method, concrete, token)
                assert r.status == 404 and r.code == "clustering_disabled"
        # the rest works standalone
        r = await request(c, "POST", "/api/v1/pools", admin, json_body={"name": "p", "cidr": "10.0.0.0/24"})
        assert r.status == 201
        r = await request(c, "POST", "/api/v1/leases", admin, json_body={"pool": "p", "holder": "h"})
        assert r.status == 201 and r.result["nodeId"] == 1


async def test_unknown_route_and_method(env: Env) -> None:
    r = await request(env.fc, "GET", "/api/v1/nope", env.admin)
    assert r.status == 404 and r.code == "not_found"
    r = await request(env.fc, "GET", "/api/v1/tokens/", env.admin)
    assert r.status == 404 and r.code == "not_found"
    r = await request(env.fc, "PUT", M, env.admin)
    assert r.status == 405 and r.code == "method_not_allowed" and "GET" in r.headers["Allow"]
    r = await request(env.fc, "PATCH", "/api/v1/status")
    assert r.status == 405 and r.code == "method_not_allowed"


async def test_no_leader(env: Env) -> None:
    env.cluster.leader_id = 0
    r = await request(env.fc, "POST", f"{M}/3/drain", env.admin)
    assert r.status == 503 and r.code == "no_leader" and r.headers["Retry-After"] == "1"
    r = await request(env.fc, "GET", M, env.readonly, params={"consistent": "true"})
    assert r.status == 503 and r.code == "no_leader"
    assert (await request(env.fc, "GET", M, env.readonly)).status == 200  # local reads still work


async def test_forwarded_request_to_non_leader_is_not_forwarded_again(env: Env) -> None:
    req = ForwardedRequest("POST", f"{M}/3/drain", (), b"", env.admin, hops=1)
    resp = await env.cluster.apps[2].dispatch_forwarded(req)
    assert resp.status == 503 and json.loads(resp.body)["code"] == "no_leader"
    assert ("Retry-After", "1") in resp.headers
    assert env.follower.forwarded == []


async def test_dispatch_forwarded_edges(env: Env) -> None:
    app = env.cluster.apps[1]
    resp = await app.dispatch_forwarded(ForwardedRequest("GET", "/api/v1/zzz", (), b"", env.admin))
    assert resp.status == 404 and json.loads(resp.body)["code"] == "not_found"
    resp = await app.dispatch_forwarded(ForwardedRequest("PUT", M, (), b"", env.admin))
    assert resp.status == 405
    resp = await app.dispatch_forwarded(ForwardedRequest("GET", "/api/v1/cluster/autopilot", (), b"", ""))
    assert resp.status == 401
    resp = await app.dispatch_forwarded(ForwardedRequest("GET", "/api/v1/pools/a%2Db", (), b"", env.admin))
    assert resp.status == 404 and json.loads(resp.body)["code"] == "pool_not_found"
    resp = await app.dispatch_forwarded(ForwardedRequest("POST", f"{M}/3/drain", (), b"", env.admin))
    assert resp.status == 200 and resp.applied_index == env.cluster.applied
    assert json.loads(resp.body) == {"result": {"drainState": "drained"}}


async def test_token_revoked_between_follower_and_leader(env: Env) -> None:
    """The leader re-checks the carried token: a revocation the follower has not seen wins."""
    _tid, tok = env.cluster.add_token(TokenRole.ADMIN)
    real = env.leader.authenticate

    def leader_auth(token: str) -> Any:
        return None if token == tok else real(token)

    env.leader.authenticate = leader_auth  # type: ignore[method-assign]
    r = await request(env.fc, "POST", f"{M}/3/drain", tok)
    assert r.status == 401 and r.code == "unauthorized" and "WWW-Authenticate" in r.headers


async def test_leader_unreachable(env: Env) -> None:
    env.follower.forward_failure = "unreachable"
    r = await request(env.fc, "POST", f"{M}/3/resume", env.admin)
    assert r.status == 502 and r.code == "leader_unreachable"


async def test_leader_slow() -> None:
    e = await make_env(forward_timeout_seconds=0.2)
    try:
        e.leader.gate = asyncio.Event()
        r = await request(e.fc, "POST", f"{M}/3/resume", e.admin)
        assert r.status == 504 and r.code == "leader_timeout"
        e.leader.gate.set()
    finally:
        await close_env(e)


async def test_read_your_writes_wait(env: Env) -> None:
    r = await request(env.fc, "POST", f"{M}/3/drain", env.admin)
    assert r.status == 200
    assert env.follower.waited == [env.cluster.applied]
    env.follower.apply_stuck = True
    r = await request(env.fc, "POST", f"{M}/3/resume", env.admin)
    assert r.status == 504 and r.code == "apply_timeout"
    # failed writes are not waited for
    env.follower.waited.clear()
    r = await request(env.fc, "POST", f"{M}/4/promote", env.admin)
    r = await request(env.fc, "POST", f"{M}/4/promote", env.admin)
    assert r.status == 409 and len(env.follower.waited) == 1


@pytest.mark.parametrize("via", VIA)
async def test_commit_timeout_has_retry_after(env: Env, via: str) -> None:
    env.leader.raise_next = CommitTimeout()
    r = await request(env.client(via), "POST", f"{M}/3/resume", env.admin)
    assert r.status == 503 and r.code == "commit_timeout" and r.headers["Retry-After"] == "1"
    env.leader.raise_next = ApiError(503, "something", "node said so")
    r = await request(env.client(via), "POST", f"{M}/3/resume", env.admin)
    assert r.status == 503 and r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("via", VIA)
async def test_unexpected_exception_is_generic_500(
    env: Env, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    env.leader.raise_next = RuntimeError("secret-detail-xyz")
    with caplog.at_level(logging.ERROR):
        r = await request(env.client(via), "POST", f"{M}/3/resume", env.admin)
    assert r.status == 500 and r.code == "internal"
    assert b"secret-detail-xyz" not in r.raw and b"Traceback" not in r.raw
    assert "secret-detail-xyz" in caplog.text  # logged server-side with the traceback


async def test_tokens_never_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        await request(env.fc, "POST", f"{M}/3/drain", env.admin)
        for _ in range(21):
            await request(env.fc, "GET", M, "qd_00000000beef_" + "C" * 43)
    assert env.admin not in caplog.text and "C" * 43 not in caplog.text


# --- metrics ------------------------------------------------------------------------------------


async def test_request_metrics(env: Env) -> None:
    await request(env.fc, "POST", f"{M}/3/drain", env.admin)
    await request(env.fc, "GET", "/nope")
    await request(env.fc, "PROPFIND", M)  # a method the parser accepts but no route serves
    text = (await request(env.fc, "GET", "/metrics")).raw.decode()
    drain = 'route="/api/v1/cluster/members/{id}/drain"'
    assert f'quorumd_api_requests_total{{method="POST",{drain},status="200"}} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert 'method="OTHER"' in text
    assert f'quorumd_api_request_duration_seconds_count{{method="POST",{drain}}} 1.0' in text
    # the leader counted the forwarded request under the same template
    leader_text = (await request(env.lc, "GET", "/api/v1/metrics")).raw.decode()
    assert 'route="/api/v1/cluster/members/{id}/drain",status="200"' in leader_text


async def _backstop_leader(propose_timeout: float) -> tuple[FakeCluster, FakeNode, Api, str]:
    cluster = FakeCluster()
    cluster.add_member(1)
    cluster.add_member(3)
    cluster.leader_id = 1
    node = FakeNode(cluster, 1)
    app = build_app(node, node_id=1, registry=CollectorRegistry(), propose_timeout_seconds=propose_timeout)
    _, admin = cluster.add_token(TokenRole.ADMIN)
    return cluster, node, app, admin


def _resume(token: str) -> ForwardedRequest:
    return ForwardedRequest("POST", f"{M}/3/resume", (), b"", token, hops=1)


async def test_leader_operation_backstop() -> None:
    """A leader operation that never finishes answers 503 commit_timeout after three times the
    propose timeout; the timeout leaves no cancellation behind, and later requests still work."""
    _, node, app, admin = await _backstop_leader(0.02)
    node.gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow = await app.dispatch_forwarded(_resume(admin))
    assert loop.time() - started >= 0.06
    assert slow.status == 503 and json.loads(slow.body)["code"] == "commit_timeout"
    assert dict(slow.headers)["Retry-After"] == "1"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.1)  # no stray cancellation is delivered later
    node.gate.set()
    results = await asyncio.gather(*(app.dispatch_forwarded(_resume(admin)) for _ in range(3)))
    assert [r.status for r in results] == [200, 200, 200]


async def test_leader_operation_backstop_passes_outside_cancellation() -> None:
    _, node, app, admin = await _backstop_leader(5.0)
    node.gate = asyncio.Event()
    task = asyncio.ensure_future(app.dispatch_forwarded(_resume(admin)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_only_single_proposal_routes_skip_the_leader_backstop() -> None:
    """``self_bounded`` routes run without the leader's backstop timer: their only wait is one
    proposal, which the Raft driver expires itself (tests/test_driver.py). Anything that waits on
    more (catch-up, hand-off, barriers) must keep the backstop."""
    bounded = {(r.method, r.path) for r in all_routes() if r.self_bounded}
    assert bounded == {("POST", "/api/v1/leases"), ("DELETE", "/api/v1/leases/{id}")}
