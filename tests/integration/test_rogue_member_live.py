"""A member is not an administrator: a rogue nonvoter on a real 3-node cluster (node/cluster/rpcs.py).

The rogue joins with nothing but a join token (the real join call, its own fresh key), then calls
every internal RPC on every member with hostile arguments (tests/rogue_member.py): removing
active voters, drain and registry changes for other nodes, token, pool and lease commands,
forwarded admin requests without a valid token, a replayed join, malformed payloads. Afterwards
the members, their suffrage, drain states and addresses, the tokens, pools and leases are exactly
as before, and the admin token still works. Then the one thing it may do: remove itself, with the
answer delivered although its removal closes its connections.

Also: API token changes are visible on every live member once the call answers (revocation and
creation, via the leader and via a follower, many times over), and a valid admin token keeps
working from an address that floods the node with bad tokens.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from http.client import HTTPSConnection
from typing import Any

import pytest

from quorumd.node.cluster.service import pack
from tests.cluster import _SSL, Cluster, free_port, wait_for
from tests.daemon_support import log_lines
from tests.rogue_member import INTERNAL_RPCS, RogueMember, hostile_calls

pytestmark = pytest.mark.xdist_group("test_rogue_member_live")

MEMBERS = [1, 2, 3]


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cl = Cluster(tmp_path_factory.mktemp("rogue"), 3)
    try:
        cl.form()
        yield cl
    finally:
        cl.close()


def snapshot(c: Cluster) -> dict[str, Any]:
    """Everything a rogue could want to change, read through the leader (consistent)."""
    lead = c.wait_leader()

    def get(path: str) -> Any:
        st, body, _ = c.api(lead, "GET", path)
        assert st == 200, body
        return body["result"]

    members = get("/api/v1/cluster/members?consistent=true")
    return {
        "members": sorted(
            (
                m["nodeId"],
                m["suffrage"],
                m["drainState"],
                m["raftAddress"],
                m["apiAddress"],
                m["certificateFingerprint"],
            )
            for m in members
        ),
        "tokens": sorted(t["id"] for t in get("/api/v1/tokens")),
        "pools": get("/api/v1/pools"),
        "leases": get("/api/v1/leases"),
    }


def admin_token_id(c: Cluster) -> str:
    return c.token.split("_")[1]


def test_every_internal_rpc_is_covered_by_the_hostile_calls() -> None:
    methods = {m for m, _ in hostile_calls(9, [1], "0" * 12, "t", b"")}
    assert set(INTERNAL_RPCS) <= methods


def test_rogue_member_cannot_change_the_cluster(c: Cluster) -> None:
    cluster_id = str(c.status(1)["clusterId"])
    rogue_id = 9
    token = c.mint(rogue_id)
    before_ops = {nid: len(log_lines(c, "internal_rpc_refused", [nid])) for nid in MEMBERS}

    async def scenario() -> tuple[list[tuple[int, str, str]], dict[str, Any], tuple[str, bytes]]:
        rogue = RogueMember(rogue_id, cluster_id, token, free_port())
        try:
            await rogue.start([f"127.0.0.1:{c.nodes[n].raft_port}" for n in MEMBERS])
            await asyncio.to_thread(c.wait_member, rogue_id)
            before = await asyncio.to_thread(snapshot, c)
            answered = await rogue.attack(MEMBERS, MEMBERS, admin_token_id(c))
            after = await asyncio.to_thread(snapshot, c)
            assert after == before, (before, after)
            # the one thing it may do: remove itself, through the leader, and hear the answer
            lead = await asyncio.to_thread(c.wait_leader)
            removed = await rogue.call(lead, "member.remove", pack([rogue_id]))
            return answered, before, removed
        finally:
            await rogue.close()

    answered, before, removed = asyncio.run(scenario())
    # Whatever answered with success bytes changed nothing (checked above): the forwarded API
    # requests answer 401 envelopes, refused drain confirmations answer False, wait_applied its
    # applied index, member.address a refusal ({"ok": false, "reason": "forbidden"}), node.info
    # the versions.
    harmless = (
        "api.forward",
        "node.propose",
        "node.wait_applied",
        "join.forward",
        "member.address",
        "node.info",
    )
    for target, method, _body in answered:
        assert method in harmless, (target, method)
    assert removed[0] == "ok", removed  # the answer arrives although the removal closes the connection
    wait_for("rogue removed", lambda: rogue_id not in {m["nodeId"] for m in c.members()})
    assert {m[0] for m in before["members"]} == {1, 2, 3, rogue_id}
    assert sorted(m["nodeId"] for m in c.members()) == MEMBERS
    st, _, _ = c.api(c.wait_leader(), "GET", "/api/v1/tokens")
    assert st == 200  # the admin token still works
    refusals = sum(len(log_lines(c, "internal_rpc_refused", [n])) - before_ops[n] for n in MEMBERS)
    assert refusals >= 3 * 3  # at least the removals of the three voters, logged where refused


def _use(c: Cluster, nid: int, token: str, source: str) -> int:
    """One authenticated read from ``source`` (a fresh address per iteration keeps the failed-auth
    limiter out of the count: 20 revoked-token refusals from one address would answer 429)."""
    return _members_from(c.nodes[nid].api_port, token, source)


@pytest.mark.parametrize("via", ["leader", "follower"])
def test_token_revocation_and_creation_hold_on_every_node_at_once(c: Cluster, via: str) -> None:
    """Revoke (and create) through the leader or a follower, then use the token on every node at
    once: 401 everywhere after the revocation, 200 everywhere after the creation, every time."""
    iterations = 25
    for i in range(iterations):
        lead = c.wait_leader()
        node = lead if via == "leader" else next(n for n in MEMBERS if n != lead)
        st, body, _ = c.api(node, "POST", "/api/v1/tokens", {"name": f"t{via}{i}", "role": "readonly"})
        assert st == 201, body
        tok = body["result"]
        source = f"127.1.{i}.{1 if via == 'leader' else 2}"
        statuses = {nid: _use(c, nid, tok["token"], source) for nid in MEMBERS}
        assert set(statuses.values()) == {200}, (i, "created", statuses)
        st, body, _ = c.api(node, "DELETE", f"/api/v1/tokens/{tok['id']}")
        assert st == 200, body
        statuses = {nid: _use(c, nid, tok["token"], source) for nid in MEMBERS}
        assert set(statuses.values()) == {401}, (i, "revoked", statuses)


def _members_from(port: int, token: str, source: str) -> int:
    conn = HTTPSConnection("127.0.0.1", port, timeout=10, context=_SSL, source_address=(source, 0))
    try:
        conn.request("GET", "/api/v1/cluster/members", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_valid_admin_token_works_during_a_flood_of_bad_tokens_from_its_address(c: Cluster) -> None:
    source = f"127.0.{secrets.randbelow(200) + 20}.{secrets.randbelow(200) + 20}"
    port = c.nodes[2].api_port
    statuses = [_members_from(port, f"qd_{secrets.token_hex(6)}_{'A' * 43}", source) for _ in range(30)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}, statuses  # throttled
    for _ in range(5):
        assert _members_from(port, c.token, source) == 200  # the admin is not locked out
        assert _members_from(port, f"qd_{secrets.token_hex(6)}_{'B' * 43}", source) == 429
    assert log_lines(c, f"auth_rate_limited client={source}", [2])
