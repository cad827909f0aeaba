"""Hypothesis-generated requests against the shared running cluster while a load thread writes
through every node: every answer is a documented one.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.xdist_group("apilive")


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
