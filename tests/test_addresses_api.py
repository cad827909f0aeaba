"""Address changes over HTTP against FakeNodes: PATCH /cluster/members/{id} (role, inputs, forwarding,
OpenAPI), and ``quorumctl members set-address``. The semantic checks of the addresses (like the
config keys) run in the real node: tests/test_addresses.py and tests/integration/test_addresses_live.py."""

from __future__ import annotations

import pytest

from quorumd.api.app import all_routes
from quorumd.api.openapi import build_document
from quorumd.node.ctl.main import UsageError, parse
from tests.api_support import Env, request

pytestmark = pytest.mark.asyncio
M = "/api/v1/cluster/members"


@pytest.mark.parametrize("via", ["leader", "follower"])
async def test_patch_sets_addresses(env: Env, via: str) -> None:
    c = env.client(via)
    body = {"raftAddress": "127.0.0.9:7100", "apiAddress": "https://127.0.0.9:5102"}
    r = await request(c, "PATCH", f"{M}/3", env.admin, json_body=body)
    assert r.status == 200, r.body
    assert r.result["nodeId"] == 3 and r.result["raftAddress"] == "127.0.0.9:7100"
    assert r.result["apiAddress"] == "https://127.0.0.9:5102"
    r = await request(c, "PATCH", f"{M}/3", env.admin, json_body={"apiAddress": "https://h3:5002"})
    assert r.status == 200 and r.result["raftAddress"] == "127.0.0.9:7100"  # one field: the other stays
    assert len(env.follower.forwarded) == (2 if via == "follower" else 0)  # a leader operation


@pytest.mark.parametrize(
    ("path", "token", "body", "status", "code"),
    [
        (f"{M}/3", "readonly", {"raftAddress": "127.0.0.9:7100"}, 403, "forbidden"),
        (f"{M}/3", None, {"raftAddress": "127.0.0.9:7100"}, 401, "unauthorized"),
        (f"{M}/42", "admin", {"raftAddress": "127.0.0.9:7100"}, 404, "member_not_found"),
        (f"{M}/0", "admin", {"raftAddress": "127.0.0.9:7100"}, 400, "invalid_node_id"),
        (f"{M}/3", "admin", {}, 400, "missing_field"),
        (f"{M}/3", "admin", None, 400, "missing_field"),
        (f"{M}/3", "admin", {"raftAddress": 7100}, 400, "invalid_raft_address"),
        (f"{M}/3", "admin", {"raftAddress": ""}, 400, "invalid_raft_address"),
        (f"{M}/3", "admin", {"apiAddress": "https://a b:1"}, 400, "invalid_api_address"),
        (f"{M}/3", "admin", {"apiAddress": None}, 400, "invalid_api_address"),
        (f"{M}/3", "admin", {"raftAddress": "h:1", "nodeId": 3}, 400, "unknown_field"),
    ],
)
async def test_refused_patches_change_nothing(
    env: Env, path: str, token: str | None, body: object, status: int, code: str
) -> None:
    before = env.leader.members()
    tok = {"admin": env.admin, "readonly": env.readonly, None: None}[token]
    for c in (env.lc, env.fc):
        r = await request(c, "PATCH", path, tok, json_body=body)
        assert (r.status, r.code) == (status, code), r.body
    assert env.leader.members() == before


async def test_openapi_documents_the_patch() -> None:
    doc = build_document(all_routes())
    op = doc["paths"]["/api/v1/cluster/members/{id}"]["patch"]
    assert op["x-quorumd-role"] == "admin" and op["x-quorumd-placement"] == "leader"
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(props) == {"raftAddress", "apiAddress"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["result"] == {
        "$ref": "#/components/schemas/Member"
    }
    for status, codes in (("400", {"invalid_raft_address", "invalid_api_address", "missing_field"}),
                          ("404", {"member_not_found"}), ("403", {"forbidden"})):  # fmt: skip
        assert codes <= set(op["responses"][status]["x-error-codes"])


async def test_quorumctl_set_address_parses() -> None:
    inv = parse(
        ["members", "set-address", "3", "--raft", "10.0.0.9:7000", "--api", "https://10.0.0.9:5002"], {}
    )
    assert (inv.args.id, inv.args.raft, inv.args.api) == (3, "10.0.0.9:7000", "https://10.0.0.9:5002")
    with pytest.raises(UsageError, match="--raft"):
        parse(["members", "set-address", "3"], {})
