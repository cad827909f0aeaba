"""Error cases against real daemons, through the leader and through a follower: 404 and 409 cases,
a lagging nonvoter that is not caught up, bad path/query values and bodies generated from the
OpenAPI schemas, the body size limit and 405 with Allow. Every answer goes through
``check_documented``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from quorumd.api.app import MAX_BODY_BYTES
from tests.api_live_support import (
    _NO_BODY,
    DOC,
    NOT_A_MEMBER,
    OPS,
    ROUTES,
    VIAS,
    WALK_POOL,
    Live,
    check_envelope,
    drain_target,
    fill,
    op_doc,
    path_values,
    paused,
    promote_when_caught_up,
    request,
    retire,
    voters,
)

pytestmark = pytest.mark.xdist_group("apilive")


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
    target = drain_target(live, nid)
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


@pytest.mark.parametrize("via", VIAS)
def test_bad_path_and_query_values(live: Live, via: str) -> None:
    nid = live.node(via)
    checked = 0
    for method, template in OPS:
        route = ROUTES[(method, template)]
        for f in route.path_params:
            for bad in _bad_texts(f.schema, in_path=True):
                r = live.call(nid, method, template, {**path_values(template), f.name: bad})
                assert r.status == 400 and r.code == f.code, (bad, str(r))
                checked += 1
        if route.ignore_query:
            continue
        values = path_values(template)
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
        values = path_values(template)
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
        r = live.call(nid, method, template, path_values(template), raw=b" " * (MAX_BODY_BYTES + 1))
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
        path = fill(template, path_values(template))
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - documented):
            r = request(live.c.nodes[nid].api, method, path, token=live.c.token, body={})
            check_envelope(r)
            assert r.status == 405 and r.code == "method_not_allowed", str(r)
            allow = {m.strip() for m in (r.header("Allow") or "").split(",") if m.strip()}
            assert allow == documented, (template, method, allow)
