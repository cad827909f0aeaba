"""Hypothesis-generated requests against the shared running cluster while a load thread writes
through every node: every answer is a documented one.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.api_live_support import (
    BAD_TOKEN,
    LOAD_POOL,
    NOT_A_MEMBER,
    OPS,
    WALK_POOL,
    Live,
    LoadThread,
    check_documented,
    op_doc,
    voters,
)
from tests.api_strategies import RequestStrategies

pytestmark = pytest.mark.xdist_group("apilive")


_MEMBER_MUTATIONS = {
    ("DELETE", "/api/v1/cluster/members/{id}"),
    ("POST", "/api/v1/cluster/members/{id}/drain"),
    ("POST", "/api/v1/cluster/members/{id}/promote"),
}
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
STRATEGIES = RequestStrategies(NAMES, small_ints=(1, 2, 3, NOT_A_MEMBER), max_text=40)


@st.composite
def fuzz_cases(draw: st.DrawFn) -> dict[str, Any]:
    method, template = draw(st.sampled_from(OPS))
    values, query, raw = STRATEGIES.request_parts(draw, op_doc(method, template))
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


def _delete_pools_but(live: Live, keep: set[str]) -> None:
    """Delete every pool not in ``keep`` (its leases released first): the pools the fuzz created
    (an address range as wide as 0.0.0.0/0 among them) would refuse the other suites' pools."""
    lead = live.leader()
    for pool in live.call(lead, "GET", "/api/v1/pools").result:
        if pool["name"] in keep:
            continue
        for _ in range(100):  # bounded: a page of leases at a time
            q = {"pool": pool["name"], "limit": "1000"}
            leases = live.call(lead, "GET", "/api/v1/leases", query=q).result
            if not leases:
                break
            for lease in leases:
                live.call(lead, "DELETE", "/api/v1/leases/{id}", {"id": lease["id"]})
        r = live.call(lead, "DELETE", "/api/v1/pools/{name}", {"name": pool["name"]})
        assert r.status == 200, str(r)


def test_fuzz_live_cluster_under_write_load(live: Live) -> None:
    c = live.c
    members = set(live.members(live.leader()))
    pools_before = {p["name"] for p in live.call(live.leader(), "GET", "/api/v1/pools").result}
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
        _delete_pools_but(live, pools_before)
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
