"""Authentication and roles against real daemons: the role of every documented operation (generated
from the OpenAPI document) through the leader and a follower, a revoked token refused on every
node, and the per-client failed-auth rate limit.
"""

from __future__ import annotations

import pytest

from tests.api_live_support import (
    OPS,
    VIAS,
    Live,
    auth_probe,
    bad_token,
    check_documented,
    fill,
    fresh_source,
    op_role,
    request,
    wait_token_everywhere,
)

pytestmark = pytest.mark.xdist_group("apilive")


AUTH_TABLE = [(m, t, op_role(m, t)) for m, t in OPS]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("method,template,role", AUTH_TABLE, ids=[f"{m} {t}" for m, t, _ in AUTH_TABLE])
def test_auth_table(live: Live, method: str, template: str, role: str, via: str) -> None:
    """Anonymous: 401 unless documented public. Bad token: 401. Readonly: 403 on admin routes."""
    nid = live.node(via)
    values, body = auth_probe(method, template)
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
