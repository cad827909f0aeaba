"""Property-based fuzz of the API over its OpenAPI document, against FakeNode-backed apps.

Hypothesis strategies walk the document (tests/api_strategies.py): an operation, path and query
values (valid per schema, near the bounds, or arbitrary text), a body (a valid object, a mutated
one, any JSON value or raw bytes), a token (admin, readonly, none, garbage), and the node serving
it (leader or follower, which forwards). Properties: never a 5xx; the status is documented for the operation;
the body matches the documented schema for that status; error codes are among the documented
ones. Derandomized (fixed seed) and bounded, so runs are reproducible and quick.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from quorumd.api.app import all_routes
from quorumd.api.openapi import build_document
from tests.api_strategies import RequestStrategies
from tests.api_support import Env, Reply, check_response, close_env, make_env

DOC = build_document(all_routes())
OPS = sorted((m, p) for p, ops in DOC["paths"].items() for m in ops)
INTERESTING: dict[str, list[Any]] = {
    "pool": ["p1", "p2", "tiny"],
    "name": ["p1", "p2", "tiny", "ops"],
    "cidr": ["10.0.0.0/30", "10.1.0.0/24", "fd00::/126", "10.0.0.1/24", "10.0.0.0/16", "x", "::/0"],
    "holder": ["h1", "h2", "h3"],
}
STRATEGIES = RequestStrategies(INTERESTING)


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    method, template = draw(st.sampled_from(OPS))
    values, query, body = STRATEGIES.request_parts(draw, DOC["paths"][template][method])
    path = template
    for name, value in values.items():
        path = path.replace("{" + name + "}", quote(value, safe=""))
    return {
        "method": method.upper(),
        "template": template,
        "path": path,
        "query": query,
        "body": body,
        "token": draw(st.sampled_from(["admin", "admin", "admin", "readonly", "none", "bad"])),
        "via": draw(st.sampled_from(["leader", "follower"])),
    }


async def _send(env: Env, case: dict[str, Any]) -> Reply:
    token = {"admin": env.admin, "readonly": env.readonly, "bad": "qd_0123456789ab_" + "x" * 43}.get(
        case["token"]
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = URL.build(path=case["path"], encoded=True)
    if case["query"]:
        url = url.with_query(case["query"])
    client = env.client(case["via"])
    async with client.request(case["method"], url, data=case["body"], headers=headers) as resp:
        raw = await resp.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        return Reply(resp.status, body, dict(resp.headers), raw)


async def _prepare(env: Env) -> None:
    from tests.api_support import request

    for name, cidr in (("p1", "10.0.0.0/28"), ("tiny", "10.3.0.0/30")):
        r = await request(env.lc, "POST", "/api/v1/pools", env.admin, json_body={"name": name, "cidr": cidr})
        assert r.status == 201


def test_fuzz_api_against_document() -> None:
    loop = asyncio.new_event_loop()
    env = loop.run_until_complete(make_env())
    loop.run_until_complete(_prepare(env))
    seen: set[tuple[str, str, int]] = set()

    async def check(case: dict[str, Any]) -> None:
        env.clock.now += 120.0  # fresh brute-force window for every example
        r = await _send(env, case)
        assert r.status < 500, (case, r.status, r.body)
        check_response(DOC, case["method"], case["template"], r)
        if r.status >= 400:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", r.body["code"])
        seen.add((case["method"], case["template"], r.status))

    @settings(
        max_examples=700,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=cases())
    def run(case: dict[str, Any]) -> None:
        loop.run_until_complete(check(case))

    try:
        run()
    finally:
        loop.run_until_complete(close_env(env))
        loop.close()
    # the fuzz reached every operation, and both successes and failures
    assert {(m, t) for m, t, _ in seen} == {(m.upper(), t) for m, t in OPS}
    assert any(s < 300 for _, _, s in seen) and any(400 <= s < 500 for _, _, s in seen)
    print(f"fuzz: {len(seen)} distinct (method, route, status) outcomes")
