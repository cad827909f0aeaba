"""The OpenAPI document: valid OpenAPI 3.1, and in agreement with the served routes (both ways)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from quorumd.api.app import all_routes, build_app
from quorumd.api.openapi import build_document
from quorumd.api.ports import TokenRole
from tests.api_support import Env, check_response, request, sample_path
from tests.fakes.node import FakeCluster, FakeNode

DOC = build_document(all_routes())


def test_document_is_valid_openapi_31() -> None:
    assert DOC["openapi"] == "3.1.0"
    validate(DOC)


def _served() -> set[tuple[str, str]]:
    cluster = FakeCluster()
    api = build_app(FakeNode(cluster, 1), node_id=1, registry=CollectorRegistry())
    return {(route.method, route.path) for route in api.routes}


def _documented() -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in DOC["paths"].items() for m in ops}


def test_served_routes_match_document_both_ways() -> None:
    served, documented = _served(), _documented()
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    must_have = {
        ("GET", "/api/v1/cluster/members"),
        ("DELETE", "/api/v1/cluster/members/{id}"),
        ("POST", "/api/v1/cluster/members/{id}/promote"),
        ("GET", "/api/v1/cluster/autopilot"),
        ("POST", "/api/v1/cluster/members/{id}/drain"),
        ("POST", "/api/v1/cluster/members/{id}/resume"),
        ("POST", "/api/v1/cluster/pki/join-tokens"),
        ("GET", "/api/v1/status"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/metrics"),
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/{id}"),
        ("POST", "/api/v1/pools"),
        ("GET", "/api/v1/pools"),
        ("GET", "/api/v1/pools/{name}"),
        ("DELETE", "/api/v1/pools/{name}"),
        ("POST", "/api/v1/leases"),
        ("GET", "/api/v1/leases"),
        ("DELETE", "/api/v1/leases/{id}"),
    }
    assert must_have <= served


@pytest.mark.parametrize("method,path", sorted(_documented()))
def test_operation_shape(method: str, path: str) -> None:
    op = DOC["paths"][path][method.lower()]
    declared = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
    assert declared == re.findall(r"\{(\w+)\}", path)
    assert "500" in op["responses"]
    success = [s for s in op["responses"] if s.startswith("2")]
    assert success
    if op["x-quorumd-role"] == "public":
        assert op["security"] == [] and "401" not in op["responses"]
    else:
        assert op["security"] == [{"bearerAuth": []}]
        assert {"401", "429"} <= set(op["responses"])
        assert ("403" in op["responses"]) == (op["x-quorumd-role"] == "admin")
    if path.startswith("/api/v1/cluster/"):
        assert "clustering_disabled" in op["responses"]["404"]["x-error-codes"]
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False
        assert "413" in op["responses"]
    if op["x-quorumd-placement"] != "local":
        assert {"502", "503", "504"} <= set(op["responses"])
        assert "Retry-After" in op["responses"]["503"]["headers"]
    for status, resp in op["responses"].items():
        if int(status) >= 400:
            assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            assert resp["x-error-codes"]


@pytest.mark.asyncio
async def test_served_document_is_the_built_one(env: Env) -> None:
    r = await request(env.fc, "GET", "/api/v1/openapi.json")
    assert r.status == 200 and r.body == DOC


def _valid_request(method: str, path: str, env: Env) -> tuple[str, Any, dict[str, str] | None]:
    """A valid request for every operation, in an order that makes each one succeed."""
    concrete = sample_path(path, DOC, method.lower())
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/api/v1/cluster/pki/join-tokens"): {"nodeID": 9, "ttlSeconds": 600},
        ("POST", "/api/v1/tokens"): {"name": "n", "role": "readonly", "ttlSeconds": 3600},
        ("POST", "/api/v1/pools"): {"name": "pool-a", "cidr": "192.0.2.0/28"},
        ("POST", "/api/v1/leases"): {"pool": "pool-a", "holder": "imsi-1"},
        ("POST", "/api/v1/cluster/members/{id}/drain"): {"deadlineSeconds": 10},
        ("PATCH", "/api/v1/cluster/members/{id}"): {"raftAddress": "127.0.0.9:7100"},
    }
    params: dict[tuple[str, str], dict[str, str]] = {
        ("DELETE", "/api/v1/cluster/members/{id}"): {"force": "true"},
        ("GET", "/api/v1/leases"): {"limit": "5", "consistent": "true"},
    }
    if path == "/api/v1/tokens/{id}":
        concrete = path.replace("{id}", env.cluster.last_token_id)  # the one POST /tokens made
    return concrete, bodies.get((method, path)), params.get((method, path))


_FIRST = ["/api/v1/pools", "/api/v1/tokens"]  # created before anything uses them
_LAST = ["/api/v1/pools/{name}", "/api/v1/cluster/members/{id}"]  # deleted after their users


def _rank(mp: tuple[str, str]) -> tuple[int, int, str]:
    method, path = mp
    if method == "DELETE":
        return (2, _LAST.index(path) if path in _LAST else -1, path)
    if method == "POST":
        return (0, -1 if path in _FIRST else 0, path)
    return (1, 0, path)


@pytest.mark.asyncio
@pytest.mark.parametrize("via", ["leader", "follower"])
async def test_every_operation_answers_as_documented(env: Env, via: str) -> None:
    """One valid call of every documented operation; status and body match the document."""
    for method, path in sorted(_documented(), key=_rank):
        concrete, body, params = _valid_request(method, path, env)
        if path == "/api/v1/cluster/members/{id}":
            concrete = concrete.replace("/2", "/3")  # not the serving follower
        if path == "/api/v1/cluster/members/{id}/promote":
            concrete = concrete.replace("/2/", "/4/")  # a caught-up nonvoter
        if path == "/api/v1/pools/{name}" and method == "DELETE":
            await request(env.lc, "DELETE", "/api/v1/leases/1", env.admin)
        r = await request(env.client(via), method, concrete, env.admin, json_body=body, params=params)
        assert r.status < 300, (method, concrete, r.status, r.body)
        check_response(DOC, method, path, r)


@pytest.mark.asyncio
async def test_readonly_token_role_matches_document(env: Env) -> None:
    """Operations the document marks readonly accept a readonly token (so 403 docs are exact)."""
    _, tok = env.cluster.add_token(TokenRole.READONLY)
    for method, path in sorted(_documented()):
        op = DOC["paths"][path][method.lower()]
        if op["x-quorumd-role"] != "readonly":
            continue
        r = await request(env.fc, method, sample_path(path, DOC, method.lower()), tok)
        assert r.status != 403
        check_response(DOC, method, path, r)
