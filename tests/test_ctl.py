"""quorumctl against an in-process fake API: requests sent, output printed, exit codes.

The fake server records every request (method, path, query, JSON body, Authorization header) and
answers with the API's envelopes set up per test. One HTTPS case uses a self-signed certificate made
here with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import resource
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from quorumd.node.ctl import client as ctl_client
from quorumd.node.ctl import main as ctl

TOKEN = "qd_test.secret"

MEMBERS = [
    {
        "nodeId": 1,
        "raftAddress": "10.0.0.1:7000",
        "apiAddress": "https://10.0.0.1:5002",
        "binaryVersion": "0.1.0",
        "suffrage": "voter",
        "isLeader": True,
        "drainState": "active",
        "activeLeases": 12,
        "protocolVersion": 2,
    },
    {
        "nodeId": 12,
        "raftAddress": "10.0.0.12:7000",
        "apiAddress": "https://10.0.0.12:5002",
        "binaryVersion": "0.1.0",
        "suffrage": "nonvoter",
        "isLeader": False,
        "drainState": "drained",
        "activeLeases": 0,
    },
]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    body: Any
    auth: str | None


Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeApi:
    routes: dict[tuple[str, str], Responder] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    endpoint: str = ""

    def ok(self, method: str, path: str, result: Any, status: int = 200) -> None:
        async def respond(_: web.Request) -> web.StreamResponse:
            return web.json_response({"result": result}, status=status)

        self.routes[(method, "/api/v1" + path)] = respond

    def error(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        async def respond(_: web.Request) -> web.StreamResponse:
            return web.json_response({"error": message, "code": code}, status=status, headers=headers)

        self.routes[(method, "/api/v1" + path)] = respond

    def raw(self, method: str, path: str, responder: Responder) -> None:
        self.routes[(method, "/api/v1" + path)] = responder

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path.split("?")[0],
                dict(request.query),
                body,
                request.headers.get("Authorization"),
            )
        )
        responder = self.routes.get((request.method, request.path))
        if responder is None:
            return web.json_response({"error": "no such route", "code": "not_found"}, status=404)
        return await responder(request)

    @property
    def last(self) -> Seen:
        return self.seen[-1]


async def _serve(api: FakeApi, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest_asyncio.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    runner, port = await _serve(fake)
    fake.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


async def _run(api: FakeApi, *argv: str, env: dict[str, str] | None = None) -> int:
    base_env = {"QUORUMD_ENDPOINT": api.endpoint, "QUORUMD_TOKEN": TOKEN}
    return await ctl.run(list(argv), env=base_env if env is None else env)


def _out(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


# --- members -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_members_list_table(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.ok("GET", "/cluster/members", MEMBERS)
    assert await _run(api, "members", "list") == 0
    out, err = _out(capsys)
    assert out == (
        "ID  RAFT-ADDRESS    API-ADDRESS             VERSION  SUFFRAGE  LEADER  DRAIN    LEASES  PROTOCOL\n"
        "1   10.0.0.1:7000   https://10.0.0.1:5002   0.1.0    voter     yes     active   12      2\n"
        "12  10.0.0.12:7000  https://10.0.0.12:5002  0.1.0    nonvoter  no      drained  0       -\n"
    )
    assert err == ""
    assert api.last == Seen(
        "GET", "/api/v1/cluster/members", "/api/v1/cluster/members", {}, None, f"Bearer {TOKEN}"
    )


@pytest.mark.asyncio
async def test_members_list_json_and_consistent(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.ok("GET", "/cluster/members", MEMBERS)
    # Global options are accepted after the command too.
    assert await _run(api, "members", "list", "--consistent", "-o", "json") == 0
    out, _ = _out(capsys)
    assert json.loads(out) == MEMBERS
    assert api.last.query == {"consistent": "true"}


@pytest.mark.asyncio
async def test_member_mutations(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.ok("DELETE", "/cluster/members/3", {"message": "Cluster member removed"})
    api.ok("POST", "/cluster/members/3/promote", {"message": "Cluster member promoted to voter"})
    api.ok("POST", "/cluster/members/3/drain", {"drainState": "draining"})
    api.ok("POST", "/cluster/members/3/resume", {"message": "Cluster member resumed"})

    assert await _run(api, "members", "remove", "3") == 0
    assert (api.last.method, api.last.query) == ("DELETE", {})
    assert await _run(api, "members", "remove", "3", "--force") == 0
    assert api.last.query == {"force": "true"}
    assert await _run(api, "members", "promote", "3") == 0
    assert (api.last.method, api.last.path, api.last.body) == (
        "POST",
        "/api/v1/cluster/members/3/promote",
        None,
    )
    assert await _run(api, "members", "drain", "3", "--deadline", "30") == 0
    assert api.last.body == {"deadlineSeconds": 30}
    assert await _run(api, "members", "drain", "3") == 0
    assert api.last.body == {"deadlineSeconds": 0}
    assert await _run(api, "members", "resume", "3") == 0
    assert api.last.path == "/api/v1/cluster/members/3/resume"
    out, _ = _out(capsys)
    assert out.splitlines() == [
        "Cluster member removed",
        "Cluster member removed",
        "Cluster member promoted to voter",
        "Cluster member 3 drain state: draining",
        "Cluster member 3 drain state: draining",
        "Cluster member resumed",
    ]
    assert all(s.auth == f"Bearer {TOKEN}" for s in api.seen)


@pytest.mark.asyncio
async def test_drain_rejects_negative_deadline_locally(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run(api, "members", "drain", "3", "--deadline", "-1") == 2
    assert await _run(api, "members", "drain", "3", "--deadline", "1.5") == 2
    assert await _run(api, "members", "remove", "three") == 2
    assert api.seen == []
    _, err = _out(capsys)
    assert "--deadline" in err


# --- status and autopilot ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_status_key_values(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    status = {
        "version": "0.1.0",
        "nodeId": 2,
        "clusterId": "c0ffee",
        "role": "follower",
        "term": 7,
        "leaderNodeId": 1,
        "leaderApiAddress": "https://10.0.0.1:5002",
        "commitIndex": 40,
        "appliedIndex": 40,
        "ready": True,
        "drainState": "active",
        "bgp": {"running": True, "announcedPrefixes": 2},
    }
    api.ok("GET", "/status", status)
    assert await _run(api, "status") == 0
    out, _ = _out(capsys)
    lines = out.splitlines()
    assert lines[0] == "Version:                0.1.0"
    assert "Leader API:             https://10.0.0.1:5002" in lines
    assert "Ready:                  yes" in lines
    assert lines[-2:] == ["bgp.running:            yes", "bgp.announcedPrefixes:  2"]
    assert api.last.path == "/api/v1/status"


@pytest.mark.asyncio
async def test_what_if_sends_the_id_lists_and_prints_the_answer(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {
        "voters": [1, 2],
        "quorum": 2,
        "healthyVoters": 1,
        "failureTolerance": 0,
        "leaderNodeId": 1,
        "safe": False,
        "warnings": ["quorum_lost"],
    }
    api.ok("GET", "/cluster/autopilot/what-if", answer)
    assert await _run(api, "what-if", "--remove", "3", "--fail", "2, 5") == 0
    out, _ = _out(capsys)
    assert api.last.query == {"remove": "3", "fail": "2,5"}
    assert out == (
        "Safe:               no\n"
        "Voters:             1,2\n"
        "Quorum:             2\n"
        "Healthy voters:     1\n"
        "Failure tolerance:  0\n"
        "Leader:             1\n"
        "Warnings:           quorum_lost\n"
    )
    assert await _run(api, "what-if") == 0
    assert api.last.query == {}
    assert await _run(api, "what-if", "--drain", "64") == 2


@pytest.mark.asyncio
async def test_autopilot_header_and_table(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    view = {
        "healthy": False,
        "failureTolerance": 0,
        "leaderNodeId": 1,
        "voters": [1, 2, 3],
        "servers": [
            {
                "nodeId": 1,
                "raftAddress": "10.0.0.1:7000",
                "nodeStatus": "alive",
                "healthy": True,
                "isLeader": True,
                "hasVotingRights": True,
                "stableSince": "2026-04-20T08:15:02Z",
                "lastContactMs": 0,
                "lastTerm": 3,
                "lastIndex": 99,
            },
            {
                "nodeId": 3,
                "raftAddress": "10.0.0.3:7000",
                "nodeStatus": "failed",
                "healthy": False,
                "isLeader": False,
                "hasVotingRights": True,
                "stableSince": "2026-04-20T08:16:00Z",
                "lastContactMs": 15000,
                "lastTerm": 2,
                "lastIndex": 50,
                "trailingLogs": 49,
                "reasons": ["no_contact", "term_behind"],
                "promotionAt": None,
            },
            {
                "nodeId": 4,
                "raftAddress": "10.0.0.4:7000",
                "nodeStatus": "alive",
                "healthy": True,
                "isLeader": False,
                "hasVotingRights": False,
                "stableSince": "2026-04-20T08:16:05Z",
                "lastContactMs": 12,
                "lastTerm": 3,
                "lastIndex": 99,
                "trailingLogs": 0,
                "reasons": ["stabilizing"],
                "promotionAt": "2026-04-20T08:16:15.000Z",
            },
        ],
    }
    api.ok("GET", "/cluster/autopilot", view)
    assert await _run(api, "autopilot") == 0
    out, _ = _out(capsys)
    assert out == (
        "Healthy: no   Failure tolerance: 0   Leader: 1   Voters: 1,2,3\n"
        "\n"
        "ID  RAFT-ADDRESS   STATUS  HEALTHY  LEADER  VOTER  STABLE-SINCE          "
        "LAST-CONTACT-MS  TERM  INDEX  TRAILING  REASONS                 PROMOTION-AT\n"
        "1   10.0.0.1:7000  alive   yes      yes     yes    2026-04-20T08:15:02Z  0                "
        "3     99     -         -                       -\n"
        "3   10.0.0.3:7000  failed  no       no      yes    2026-04-20T08:16:00Z  15000            "
        "2     50     49        no_contact,term_behind  -\n"
        "4   10.0.0.4:7000  alive   yes      no      no     2026-04-20T08:16:05Z  12               "
        "3     99     0         stabilizing             2026-04-20T08:16:15.000Z\n"
    )
    assert await _run(api, "-o", "json", "autopilot") == 0
    out, _ = _out(capsys)
    assert json.loads(out) == view


# --- tokens ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_join_token_create(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.ok("POST", "/cluster/pki/join-tokens", {"token": "AQAAAPx", "expiresAt": 1714233600}, status=201)
    assert await _run(api, "join-token", "create", "--node-id", "4", "--ttl", "600") == 0
    assert api.last.body == {"nodeID": 4, "ttlSeconds": 600}
    assert await _run(api, "join-token", "create", "--node-id", "5") == 0
    assert api.last.body == {"nodeID": 5}
    out, _ = _out(capsys)
    assert out.splitlines()[:2] == ["Token:    AQAAAPx", "Expires:  2024-04-27T16:00:00Z"]


@pytest.mark.asyncio
async def test_tokens(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    created = {"id": "ab12", "name": "ci", "role": "readonly", "token": "qd_ab12.s3cret", "expiresAt": None}
    api.ok("POST", "/tokens", created, status=201)
    api.ok(
        "GET",
        "/tokens",
        [
            {
                "id": "ab12",
                "name": "ci",
                "role": "readonly",
                "createdAt": "2026-01-01T00:00:00Z",
                "expiresAt": None,
            },
            {
                "id": "cd",
                "name": "admin",
                "role": "admin",
                "createdAt": "2026-01-01T00:00:00Z",
                "expiresAt": 0,
            },
        ],
    )
    api.ok("DELETE", "/tokens/ab12", {"message": "Token revoked"})

    assert await _run(api, "tokens", "create", "--name", "ci", "--role", "readonly") == 0
    assert api.last.body == {"name": "ci", "role": "readonly"}
    out, err = _out(capsys)
    assert "Token:    qd_ab12.s3cret" in out.splitlines()
    assert "Expires:  never" in out.splitlines()
    assert "shown only once" in err

    assert await _run(api, "tokens", "create", "--name", "ci", "--role", "admin", "--ttl", "60") == 0
    assert api.last.body == {"name": "ci", "role": "admin", "ttlSeconds": 60}
    assert await _run(api, "tokens", "create", "--name", "ci", "--role", "root") == 2

    assert await _run(api, "tokens", "list") == 0
    assert await _run(api, "tokens", "revoke", "ab12") == 0
    assert (api.last.method, api.last.path) == ("DELETE", "/api/v1/tokens/ab12")
    out, _ = _out(capsys)
    assert out.splitlines()[-4:] == [
        "ID    NAME   ROLE      CREATED               EXPIRES",
        "ab12  ci     readonly  2026-01-01T00:00:00Z  never",
        "cd    admin  admin     2026-01-01T00:00:00Z  1970-01-01T00:00:00Z",
        "Token revoked",
    ]


# --- pools and leases --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pools(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    pool = {
        "name": "ue-v4",
        "cidr": "10.45.0.0/16",
        "size": 65534,
        "allocated": 3,
        "createdAt": "2026-01-01T00:00:00Z",
    }
    api.ok("POST", "/pools", pool, status=201)
    api.ok("GET", "/pools", [pool])
    api.ok("GET", "/pools/ue-v4", pool)
    api.ok("DELETE", "/pools/ue-v4", None)
    api.error("GET", "/pools/a b", 404, "pool_not_found", "pool 'a b' not found")

    assert await _run(api, "pools", "create", "ue-v4", "10.45.0.0/16") == 0
    assert (api.last.method, api.last.body) == ("POST", {"name": "ue-v4", "cidr": "10.45.0.0/16"})
    assert await _run(api, "pools", "list") == 0
    assert await _run(api, "pools", "get", "ue-v4", "--consistent") == 0
    assert api.last.query == {"consistent": "true"}
    assert await _run(api, "pools", "delete", "ue-v4") == 0
    assert api.last.method == "DELETE"
    assert await _run(api, "pools", "get", "a b") == 1
    assert api.last.raw_path == "/api/v1/pools/a%20b"
    out, err = _out(capsys)
    lines = out.splitlines()
    assert lines[0] == "NAME   CIDR          SIZE   ALLOCATED  CREATED"
    assert lines[1] == "ue-v4  10.45.0.0/16  65534  3          2026-01-01T00:00:00Z"
    assert lines[-1] == "Pool ue-v4 deleted"
    assert err == "error: pool 'a b' not found (pool_not_found) [HTTP 404]\n"


def _lease(i: int, node: int = 2) -> dict[str, Any]:
    return {
        "id": i,
        "pool": "ue-v4",
        "address": f"10.45.0.{i}",
        "holder": f"imsi-{i}",
        "nodeId": node,
        "createdAt": "2026-01-01T00:00:00Z",
    }


@pytest.mark.asyncio
async def test_leases_allocate_list_release(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.ok("POST", "/leases", _lease(1), status=201)
    api.ok("GET", "/leases", [_lease(1), _lease(2, node=3)])
    api.ok("DELETE", "/leases/1", {"message": "Lease released"})

    assert await _run(api, "leases", "allocate", "--pool", "ue-v4", "--holder", "imsi-1") == 0
    assert api.last.body == {"pool": "ue-v4", "holder": "imsi-1"}
    assert (
        await _run(api, "leases", "allocate", "--pool", "ue-v4", "--holder", "imsi-1", "--node-id", "2") == 0
    )
    assert api.last.body == {"pool": "ue-v4", "holder": "imsi-1", "nodeId": 2}
    assert await _run(api, "leases", "list") == 0
    assert api.last.query == {}
    cmd = [
        "leases",
        "list",
        "--node-id",
        "3",
        "--pool",
        "ue-v4",
        "--limit",
        "10",
        "--after",
        "5",
        "--consistent",
    ]
    assert await _run(api, *cmd) == 0
    assert api.last.query == {
        "nodeId": "3",
        "pool": "ue-v4",
        "limit": "10",
        "after": "5",
        "consistent": "true",
    }
    assert await _run(api, "leases", "release", "1") == 0
    assert (api.last.method, api.last.path) == ("DELETE", "/api/v1/leases/1")
    out, _ = _out(capsys)
    lines = out.splitlines()
    assert lines[:2] == [
        "ID  POOL   ADDRESS    HOLDER  NODE  CREATED",
        "1   ue-v4  10.45.0.1  imsi-1  2     2026-01-01T00:00:00Z",
    ]
    assert lines[-1] == "Lease released"


@pytest.mark.asyncio
async def test_leases_list_all_follows_pagination(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    all_leases = [_lease(i) for i in (3, 4, 7, 9, 10)]

    async def page(request: web.Request) -> web.StreamResponse:
        limit = int(request.query.get("limit", "1000"))
        after = int(request.query.get("after", "0"))
        items = [x for x in all_leases if x["id"] > after][:limit]
        return web.json_response({"result": items})

    api.raw("GET", "/leases", page)
    assert await _run(api, "-o", "json", "leases", "list", "--all", "--limit", "2", "--pool", "ue-v4") == 0
    out, _ = _out(capsys)
    assert json.loads(out) == all_leases
    assert [s.query for s in api.seen] == [
        {"pool": "ue-v4", "limit": "2"},
        {"pool": "ue-v4", "limit": "2", "after": "4"},
        {"pool": "ue-v4", "limit": "2", "after": "9"},
    ]
    # A full last page costs one more request, which comes back empty.
    api.seen.clear()
    assert await _run(api, "-o", "json", "leases", "list", "--all", "--limit", "5") == 0
    assert [s.query for s in api.seen] == [{"limit": "5"}, {"limit": "5", "after": "10"}]
    out, _ = _out(capsys)
    assert json.loads(out) == all_leases
    api.seen.clear()
    assert await _run(api, "leases", "list", "--all", "--after", "7") == 0
    assert [s.query for s in api.seen] == [{"limit": "1000", "after": "7"}]
    out, _ = _out(capsys)
    assert len(out.splitlines()) == 3


@pytest.mark.asyncio
async def test_leases_list_all_stops_when_pagination_does_not_advance(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.ok("GET", "/leases", [_lease(1), _lease(2)])  # ignores ``after``
    assert await _run(api, "leases", "list", "--all", "--limit", "2") == 3
    assert len(api.seen) == 2
    _, err = _out(capsys)
    assert "did not advance" in err


@pytest.mark.asyncio
async def test_server_text_is_sanitized(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    lease = _lease(1) | {"holder": "evil\x1b[2J\nname"}
    api.ok("GET", "/leases", [lease])
    assert await _run(api, "leases", "list") == 0
    out, _ = _out(capsys)
    assert "\x1b" not in out
    assert out.splitlines()[1].split()[3] == "evil?[2J?name"


# --- errors and exit codes ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_api_errors_exit_1(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.error("DELETE", "/cluster/members/3", 409, "not_drained", "node 3 is not drained")
    api.error("POST", "/leases", 503, "no_leader", "no leader", headers={"Retry-After": "1"})

    async def bad_gateway(_: web.Request) -> web.StreamResponse:
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    api.raw("GET", "/cluster/autopilot", bad_gateway)
    assert await _run(api, "members", "remove", "3") == 1
    assert await _run(api, "leases", "allocate", "--pool", "p", "--holder", "h") == 1
    assert await _run(api, "autopilot") == 1
    assert await _run(api, "-o", "json", "tokens", "revoke", "zz") == 1  # unknown route: 404 envelope
    out, err = _out(capsys)
    assert out == ""
    assert err.splitlines() == [
        "error: node 3 is not drained (not_drained) [HTTP 409]",
        "error: no leader (no_leader) [HTTP 503]; retry after 1 s",
        "error: HTTP 502 Bad Gateway (http_502) [HTTP 502]",
        "error: no such route (not_found) [HTTP 404]",
    ]


@pytest.mark.asyncio
async def test_auth_error_and_missing_token(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.error("GET", "/cluster/members", 401, "unauthorized", "missing or invalid token")
    assert await _run(api, "members", "list", env={"QUORUMD_ENDPOINT": api.endpoint}) == 1
    assert api.last.auth is None
    _, err = _out(capsys)
    assert "(unauthorized) [HTTP 401]" in err
    assert TOKEN not in err


@pytest.mark.asyncio
async def test_not_an_envelope_exits_3(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    async def html(_: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    api.raw("GET", "/status", html)
    assert await _run(api, "status") == 3
    _, err = _out(capsys)
    assert "not an API envelope" in err


@pytest.mark.asyncio
async def test_connection_refused_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert await ctl.run(["--endpoint", f"http://127.0.0.1:{port}", "status"], env={}) == 3
    _, err = _out(capsys)
    assert err == f"error: cannot connect to http://127.0.0.1:{port}: Connection refused\n"


@pytest.mark.asyncio
async def test_timeout_exits_3(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    never = asyncio.Event()

    async def hang(_: web.Request) -> web.StreamResponse:
        await never.wait()
        raise AssertionError("unreachable")

    api.raw("GET", "/status", hang)
    assert await _run(api, "--timeout", "0.1", "status") == 3
    _, err = _out(capsys)
    assert "no answer from" in err and "within 0.1 s" in err


@pytest.mark.asyncio
async def test_a_deeply_nested_answer_exits_3(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    async def deep(_: web.Request) -> web.StreamResponse:
        body = b'{"result":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        return web.Response(body=body, content_type="application/json")

    api.raw("GET", "/status", deep)
    assert await _run(api, "status") == 3
    out, err = _out(capsys)
    assert out == "" and "not an API envelope" in err


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_beyond_the_bound_exits_3(
    api: FakeApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    monkeypatch.setattr(ctl_client, "MAX_ANSWER_BYTES", 1 << 20, raising=False)
    body = b'{"result": "ok"}' + b" " * (3 << 20)  # a valid envelope, padded

    async def huge(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 1 << 16):
            await resp.write(body[i : i + (1 << 16)])
        await resp.write_eof()
        return resp

    api.raw("GET", "/status", huge)
    assert await _run(api, "status") == 3
    _, err = _out(capsys)
    assert f"larger than {1 << 20} bytes" in err


# --- options and environment -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_endpoint_and_token_resolution(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api.ok("GET", "/cluster/members", [])
    token_file = tmp_path / "admin.token"
    token_file.write_text("  qd_file.tok\n")
    env = {"QUORUMD_ENDPOINT": "http://127.0.0.1:1", "QUORUMD_TOKEN": "qd_env.tok"}
    # --endpoint wins over the environment; the endpoint may carry /api/v1.
    assert await ctl.run(["--endpoint", api.endpoint + "/api/v1/", "members", "list"], env=env) == 0
    assert api.last.auth == "Bearer qd_env.tok"
    assert (
        await ctl.run(
            ["--endpoint", api.endpoint, "--token-file", str(token_file), "members", "list"], env=env
        )
        == 0
    )
    assert api.last.auth == "Bearer qd_file.tok"
    assert (
        await ctl.run(["members", "list", "--endpoint", api.endpoint, "--token", "qd_arg.tok"], env=env) == 0
    )
    assert api.last.auth == "Bearer qd_arg.tok"
    out, _ = _out(capsys)
    assert out.splitlines()[0].startswith("ID  RAFT-ADDRESS")


@pytest.mark.asyncio
async def test_an_oversized_token_file_is_a_usage_error(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.token"
    big.write_text("a" * (1 << 20))
    assert await ctl.run(["--endpoint", api.endpoint, "--token-file", str(big), "status"], env={}) == 2
    assert api.seen == []
    _, err = _out(capsys)
    assert f"token file {big} is larger than" in err


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_token_file_that_never_ends_is_a_usage_error() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "quorumd.node.ctl.main", "--endpoint", "http://127.0.0.1:1",
         "--token-file", "/dev/zero", "status"],
        capture_output=True, text=True, timeout=60, check=False, preexec_fn=_limit_memory,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "token file /dev/zero is larger than" in res.stderr


@pytest.mark.asyncio
async def test_a_reader_that_goes_away_is_no_traceback(api: FakeApi) -> None:
    api.ok("GET", "/leases", [_lease(i) for i in range(1, 3000)])  # more than a pipe holds
    r, w = os.pipe()
    os.close(r)  # ``quorumctl leases list | head -0``
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quorumd.node.ctl.main", "--endpoint", api.endpoint, "--token", TOKEN,
            "leases", "list", stdout=w, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 141 and err == b"", err.decode()[-2000:]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "argv",
    [
        ["--token", "a", "--token-file", "f", "status"],
        ["--cacert", "f", "--insecure", "status"],
        ["-o", "yaml", "status"],
        ["members"],
        ["frobnicate"],
        ["--token-file", "/nonexistent/token", "status"],
        ["--token", "two words", "status"],
        ["--endpoint", "ftp://host", "status"],
        ["--endpoint", "https://user:pw@127.0.0.1:1", "--token", "t", "status"],
        ["--endpoint", "https://a..b:1", "--token", "t", "status"],
        ["--endpoint", "https://127.0.0.1:1", "--cacert", "/nonexistent/ca.pem", "status"],
        ["leases", "list", "--limit", "0"],
        ["join-token", "create"],
    ],
)
async def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl.run(argv, env={}) == 2
    _, err = _out(capsys)
    assert "error" in err


def test_main_help_and_sync_entry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ctl.main(["--help"]) == 0
    out, _ = _out(capsys)
    assert "members" in out and "leases" in out
    monkeypatch.delenv("QUORUMD_TOKEN", raising=False)
    assert ctl.main(["--endpoint", "http://127.0.0.1:1", "status"]) == 3
    _, err = _out(capsys)
    assert "cannot connect" in err


# --- HTTPS -------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quorumd-api")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "api.crt", tmp_path / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.asyncio
async def test_https_cacert_insecure_and_verification_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    fake = FakeApi()
    fake.ok("GET", "/cluster/members", MEMBERS)
    runner, port = await _serve(fake, server_ctx)
    endpoint = f"https://127.0.0.1:{port}"
    try:
        env = {"QUORUMD_ENDPOINT": endpoint, "QUORUMD_TOKEN": TOKEN}
        assert await ctl.run(["--cacert", str(cert), "-o", "json", "members", "list"], env=env) == 0
        assert await ctl.run(["--insecure", "-o", "json", "members", "list"], env=env) == 0
        assert len(fake.seen) == 2 and fake.last.auth == f"Bearer {TOKEN}"
        out, _ = _out(capsys)
        assert out.count('"nodeId": 12') == 2

        assert await ctl.run(["members", "list"], env=env) == 3  # system trust store: self-signed fails
        _, err = _out(capsys)
        assert err.startswith(f"error: TLS certificate verification failed for {endpoint}")
        assert "--cacert" in err
        (tmp_path / "other").mkdir()
        other, _ = _self_signed(tmp_path / "other")
        assert await ctl.run(["--cacert", str(other), "members", "list"], env=env) == 3
        assert await ctl.run(["--endpoint", f"http://127.0.0.1:{port}", "members", "list"], env=env) == 3
        assert len(fake.seen) == 2  # none of the failed handshakes reached the app
    finally:
        await runner.cleanup()
