"""``quorumctl`` end to end against a running 3-node cluster.

Every command, in table and ``-o json`` form, through ``quorumd.node.ctl.main.main``; JSON
output is checked against the OpenAPI result schema of the route behind the command. Also: the
exit code and the server's own message on an API error, ``--endpoint`` / ``QUORUMD_ENDPOINT``,
``--token`` / ``--token-file`` / ``QUORUMD_TOKEN``, ``--cacert`` with the node's self-signed API
certificate (``<data-dir>/tls/api.crt``) and ``--insecure``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from jsonschema import Draft202012Validator

from quorumd.node.ctl import main as ctl
from tests.api_live_support import (
    MANUAL_PROMOTION,
    form_with_manual_promotion,
    op_doc,
    resolve_refs,
    shutdown,
    voters,
)
from tests.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.xdist_group("ctllive")

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
TestFn = TypeVar("TestFn", bound=Callable[..., None])
LEAVES: dict[str, str] = {}  # "members remove" -> handler name (filled from the parser below)
COVERS: dict[str, set[str]] = {}  # test name -> the commands it must run successfully


def covers(*commands: str) -> Callable[[TestFn], TestFn]:
    """Declare the quorumctl commands a test runs; the ``q`` fixture checks each exited 0 in it."""

    def mark(fn: TestFn) -> TestFn:
        COVERS[fn.__name__] = set(commands)
        return fn

    return mark


def _handler_name(argv: list[str]) -> str | None:
    try:
        ns = ctl.build_parser().parse_args(argv)
    except SystemExit:
        return None
    return str(ns.handler.__name__)


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """``"members remove"`` -> handler name, for every command the parser knows."""
    out: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                handler = sub.get_default("handler")
                path = f"{prefix} {name}".strip()
                out.update({path: handler.__name__} if handler is not None else _leaf_commands(sub, path))
    return out


LEAVES.update(_leaf_commands(ctl.build_parser()))


@dataclass
class Ctl:
    c: Cluster
    capsys: pytest.CaptureFixture[str]
    ran: dict[str, set[int]] = field(default_factory=dict)  # handler -> exit codes in this test

    def token_file(self) -> Path:
        return self.c.nodes[1].data_dir / "admin.token"

    def cacert(self, nid: int) -> Path:
        return self.c.nodes[nid].data_dir / "tls" / "api.crt"

    def base(self, nid: int = 2) -> list[str]:
        """Connection options for node ``nid``: verified TLS against its own certificate."""
        return [
            "--endpoint",
            self.c.nodes[nid].api,
            "--token-file",
            str(self.token_file()),
            "--cacert",
            str(self.cacert(nid)),
        ]

    def run(self, *args: str, nid: int = 2, conn: list[str] | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        argv = [*(self.base(nid) if conn is None else conn), *args]
        code = ctl.main(argv)
        out, err = self.capsys.readouterr()
        handler = _handler_name(argv)
        if handler is not None:
            self.ran.setdefault(handler, set()).add(code)
        return code, out, err

    def ok(self, *args: str, nid: int = 2) -> str:
        code, out, err = self.run(*args, nid=nid)
        assert code == EXIT_OK, (args, code, out, err)
        assert "Traceback" not in out + err
        return out

    def json(self, *args: str, nid: int = 2) -> Any:
        return json.loads(self.ok("-o", "json", *args, nid=nid))

    def fails(self, *args: str, status: int, code: str, nid: int = 2) -> str:
        """The command exits 1 and prints the server's message, code and status on stderr."""
        rc, out, err = self.run(*args, nid=nid)
        assert rc == EXIT_API, (args, rc, out, err)
        assert f"({code}) [HTTP {status}]" in err, err
        assert err.startswith("error: ") and len(err.split("(")[0].strip()) > len("error:"), err
        return err


def conforms(result: Any, method: str, template: str, status: int = 200) -> None:
    """``result`` matches the documented result schema of the route."""
    schema = op_doc(method, template)["responses"][str(status)]["content"]["application/json"]["schema"]
    inner = resolve_refs(schema)["properties"]["result"]
    errors = sorted(Draft202012Validator(inner).iter_errors(result), key=str)
    assert not errors, f"{method} {template}: {errors[0].message}: {result!r}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ctllive"), 3, cluster_overrides=MANUAL_PROMOTION)
    try:
        form_with_manual_promotion(c)
        # Formation waited on the leader's view; the tests list members through node 2, whose own
        # replica may take the last promotion in a moment later.
        for nid in (1, 2, 3):
            wait_for(f"node {nid} lists three voters", lambda nid=nid: voters(c, nid) == {1, 2, 3}, 30)
        yield c
    finally:
        shutdown(c)


@pytest.fixture
def q(
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Ctl]:
    monkeypatch.delenv("QUORUMD_ENDPOINT", raising=False)
    monkeypatch.delenv("QUORUMD_TOKEN", raising=False)
    runner = Ctl(cluster, capsys)
    yield runner
    declared = COVERS.get(request.function.__name__, set())
    missed = sorted(cmd for cmd in declared if EXIT_OK not in runner.ran.get(LEAVES[cmd], set()))
    assert not missed, f"{request.function.__name__} declared but did not run successfully: {missed}"


def _table(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


@covers("status")
def test_status(q: Ctl) -> None:
    out = q.ok("status")
    assert re.search(r"^Node ID:\s+2$", out, re.M) and re.search(r"^Role:\s+(leader|follower)$", out, re.M)
    assert re.search(r"^Ready:\s+yes$", out, re.M)
    res = q.json("status")
    conforms(res, "GET", "/api/v1/status")
    assert res["nodeId"] == 2 and res["leaderNodeId"] == q.c.wait_leader()
    # options may also follow the command
    assert json.loads(q.ok("status", "-o", "json"))["nodeId"] == 2


@covers("members list", "autopilot", "what-if")
def test_members_list_and_autopilot(q: Ctl) -> None:
    lead = q.c.wait_leader()
    rows = _table(q.ok("members", "list"))
    assert rows[0] == [
        "ID",
        "RAFT-ADDRESS",
        "API-ADDRESS",
        "VERSION",
        "SUFFRAGE",
        "LEADER",
        "DRAIN",
        "LEASES",
        "PROTOCOL",
    ]
    body = {int(r[0]): r for r in rows[1:]}
    assert set(body) >= {1, 2, 3}
    assert body[lead][5] == "yes" and all(body[n][4] == "voter" for n in (1, 2, 3))
    assert body[2][2] == q.c.nodes[2].api
    ms = q.json("members", "list", "--consistent")
    conforms(ms, "GET", "/api/v1/cluster/members")
    assert [m["nodeId"] for m in ms] == sorted(m["nodeId"] for m in ms)
    out = q.ok("autopilot")
    assert re.search(r"Healthy: (yes|no)\s+Failure tolerance: \d+\s+Leader: " + str(lead), out), out
    assert "STABLE-SINCE" in out
    ap = q.json("autopilot")
    conforms(ap, "GET", "/api/v1/cluster/autopilot")
    assert ap["leaderNodeId"] == lead and sorted(ap["voters"])[:3] == [1, 2, 3]
    assert "REASONS" in out and "PROMOTION-AT" in out
    # what-if: removing the leader and failing another voter of three loses quorum
    other = next(n for n in (1, 2, 3) if n != lead)
    wi = q.json("what-if", "--remove", str(lead), "--fail", str(other))
    conforms(wi, "GET", "/api/v1/cluster/autopilot/what-if")
    assert wi["safe"] is False and "quorum_lost" in wi["warnings"] and lead not in wi["voters"]
    out = q.ok("what-if", "--drain", str(lead))
    assert re.search(r"^Safe:\s+yes$", out, re.M) and re.search(r"^Warnings:\s+.*leader_moves", out, re.M), (
        out
    )


@covers("join-token create", "members promote", "members drain", "members resume", "members remove")
def test_join_promote_drain_resume_remove(q: Ctl) -> None:
    c = q.c
    out = q.ok("join-token", "create", "--node-id", "4", "--ttl", "600")
    assert re.search(r"^Token:\s+\S{20,}$", out, re.M) and re.search(
        r"^Expires:\s+\d{4}-\d\d-\d\dT", out, re.M
    )
    before = int(time.time())
    minted = q.json("join-token", "create", "--node-id", "4", "--ttl", "900")
    conforms(minted, "POST", "/api/v1/cluster/pki/join-tokens", 201)
    assert before + 890 <= minted["expiresAt"] <= int(time.time()) + 910
    err = q.fails("join-token", "create", "--node-id", "2", status=409, code="already_member")
    assert "node 2 is already a member" in err
    q.fails("join-token", "create", "--node-id", "4", "--ttl", "60", status=400, code="invalid_ttl")

    # the minted token really joins node 4 (a nonvoter: autopilot never promotes here)
    node = c.make_node(4)
    c.write_config(node, join_token=minted["token"])
    c.start(node)
    try:
        c.wait_member(4)
        c.wait_ready(4, 60)
        listed = q.json("members", "list", "--consistent")
        assert next(m for m in listed if m["nodeId"] == 4)["suffrage"] == "nonvoter"
        assert "Cluster member promoted to voter" in q.ok("members", "promote", "4")
        err = q.fails("members", "promote", "4", status=409, code="already_voter")
        assert "node 4 is already a voter" in err
        assert "drain state: drained" in q.ok("members", "drain", "4", "--deadline", "0")
        assert "Cluster member resumed" in q.ok("members", "resume", "4")
        assert q.json("members", "resume", "4") == {"message": "Cluster member resumed"}
        q.fails("members", "remove", "4", status=409, code="not_drained")
        assert "Cluster member removed" in q.ok("members", "remove", "4", "--force")
        assert 4 not in {m["nodeId"] for m in q.json("members", "list")}
        q.fails("members", "remove", "4", status=404, code="member_not_found")
    finally:
        c.stop(4, timeout=15)
        del c.nodes[4]


@covers(
    "members drain", "members resume", "leases allocate", "leases release", "pools create", "pools delete"
)
def test_drain_with_deadline_json(q: Ctl) -> None:
    q.ok("pools", "create", "ctl-hold", "10.76.0.0/29")
    # node 3 holds a lease, so the drain stays "draining" until the resume (no watch race)
    hold = q.json("leases", "allocate", "--pool", "ctl-hold", "--holder", "hold", "--node-id", "3")
    try:
        res = q.json("members", "drain", "3", "--deadline", "600")
        conforms(res, "POST", "/api/v1/cluster/members/{id}/drain")
        assert res == {"drainState": "draining"}
        assert next(m for m in q.json("members", "list") if m["nodeId"] == 3)["drainState"] == "draining"
    finally:
        q.ok("members", "resume", "3")
        q.ok("leases", "release", str(hold["id"]))
        q.ok("pools", "delete", "ctl-hold")
    assert next(m for m in q.json("members", "list") if m["nodeId"] == 3)["drainState"] == "active"
    err = q.fails("members", "drain", "99", status=400, code="invalid_node_id")
    assert "1..63" in err  # the server's own message


@covers("tokens create", "tokens list", "tokens revoke", "members list")
def test_tokens(q: Ctl) -> None:
    code, out, err = q.run("tokens", "create", "--name", "ctl-reader", "--role", "readonly", "--ttl", "3600")
    assert code == EXIT_OK and "shown only once" in err
    secret = re.search(r"^Token:\s+(qd_\S+)$", out, re.M)
    assert secret, out
    created = q.json("tokens", "create", "--name", "ctl-admin", "--role", "admin")
    conforms(created, "POST", "/api/v1/tokens", 201)
    assert created["expiresAt"] is None
    rows = _table(q.ok("tokens", "list"))
    assert rows[0] == ["ID", "NAME", "ROLE", "CREATED", "EXPIRES"]
    reader = next(r for r in rows[1:] if r[1] == "ctl-reader")
    assert reader[2] == "readonly" and re.fullmatch(r"\d{4}-.*Z", reader[4])
    listed = q.json("tokens", "list", "--consistent")
    conforms(listed, "GET", "/api/v1/tokens")
    assert not any(secret.group(1) in json.dumps(t) for t in listed)

    ro = ["--endpoint", q.c.nodes[2].api, "--token", secret.group(1), "--insecure"]
    code, out, err = q.run("members", "list", conn=ro)
    assert code == EXIT_OK and "SUFFRAGE" in out
    code, _out, err = q.run("pools", "create", "nope", "10.9.0.0/24", conn=ro)
    assert code == EXIT_API and "(forbidden) [HTTP 403]" in err
    assert "Token" in q.ok("tokens", "revoke", reader[0]) and "revoked" in q.ok(
        "tokens", "revoke", created["id"]
    )
    code, _out, err = q.run("members", "list", conn=ro)
    assert code == EXIT_API and "(unauthorized) [HTTP 401]" in err, err
    q.fails("tokens", "revoke", reader[0], status=404, code="token_not_found")
    q.fails("tokens", "revoke", "NOT-AN-ID", status=400, code="invalid_token_id")


@covers(
    "pools create",
    "pools list",
    "pools get",
    "pools delete",
    "leases allocate",
    "leases list",
    "leases release",
)
def test_pools_and_leases(q: Ctl) -> None:
    rows = _table(q.ok("pools", "create", "ctl-p", "10.77.0.0/29"))
    assert rows[0][:2] == ["NAME", "CIDR"] and rows[1][:2] == ["ctl-p", "10.77.0.0/29"]
    q.fails("pools", "create", "ctl-p", "10.78.0.0/29", status=409, code="pool_exists")
    q.fails("pools", "create", "ctl-q", "10.77.0.1/29", status=400, code="invalid_cidr")
    assert "ctl-p" in q.ok("pools", "list")
    pools = q.json("pools", "list", "--consistent")
    conforms(pools, "GET", "/api/v1/pools")
    got = q.json("pools", "get", "ctl-p")
    conforms(got, "GET", "/api/v1/pools/{name}")
    assert got["cidr"] == "10.77.0.0/29"

    rows = _table(q.ok("leases", "allocate", "--pool", "ctl-p", "--holder", "imsi-0"))
    assert rows[0] == ["ID", "POOL", "ADDRESS", "HOLDER", "NODE", "CREATED"] and rows[1][4] == "2"
    leases = [
        q.json("leases", "allocate", "--pool", "ctl-p", "--holder", f"imsi-{i}", "--node-id", "3")
        for i in range(4)
    ]
    for lease in leases:
        conforms(lease, "POST", "/api/v1/leases", 201)
    assert leases[0]["nodeId"] == 3  # imsi-0 again: the same lease, re-owned to node 3
    all_ids = [x["id"] for x in q.json("leases", "list", "--pool", "ctl-p", "--limit", "2", "--all")]
    assert len(all_ids) == 4 and all_ids == sorted(all_ids)
    page = q.json("leases", "list", "--pool", "ctl-p", "--limit", "2")
    conforms(page, "GET", "/api/v1/leases")
    assert [x["id"] for x in page] == all_ids[:2]
    after = q.json("leases", "list", "--pool", "ctl-p", "--after", str(all_ids[1]), "--node-id", "3")
    assert [x["id"] for x in after] == all_ids[2:]
    table = _table(q.ok("leases", "list", "--pool", "ctl-p", "--consistent"))
    assert len(table) == 5
    q.fails("pools", "delete", "ctl-p", status=409, code="pool_in_use")
    for lease_id in all_ids:
        assert "released" in q.ok("leases", "release", str(lease_id))
    q.fails("leases", "release", str(all_ids[0]), status=404, code="lease_not_found")
    assert "deleted" in q.ok("pools", "delete", "ctl-p")
    err = q.fails("pools", "get", "ctl-p", status=404, code="pool_not_found")
    assert "ctl-p" in err


@covers("members list", "status")
def test_endpoint_and_token_sources(q: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = q.token_file().read_text().strip()
    node3 = q.c.nodes[3].api
    dead = f"https://127.0.0.1:{free_port()}"
    # environment only
    monkeypatch.setenv("QUORUMD_ENDPOINT", node3)
    monkeypatch.setenv("QUORUMD_TOKEN", admin)
    code, out, _ = q.run("-o", "json", "members", "list", conn=["--insecure"])
    assert code == EXIT_OK and {m["nodeId"] for m in json.loads(out)} >= {1, 2, 3}
    code, out, _ = q.run("-o", "json", "status", conn=["--insecure"])
    assert json.loads(out)["nodeId"] == 3
    # flags win over the environment
    monkeypatch.setenv("QUORUMD_ENDPOINT", dead)
    monkeypatch.setenv("QUORUMD_TOKEN", "qd_bad")
    code, out, err = q.run("-o", "json", "status", conn=["--insecure", "--endpoint", q.c.nodes[1].api])
    assert code == EXIT_OK and json.loads(out)["nodeId"] == 1
    code, _out, err = q.run("members", "list", conn=["--insecure", "--endpoint", node3, "--token", admin])
    assert code == EXIT_OK, err
    code, _out, err = q.run(
        "members", "list", conn=["--insecure", "--endpoint", node3, "--token-file", str(q.token_file())]
    )
    assert code == EXIT_OK, err
    code, _out, err = q.run("members", "list", conn=["--insecure", "--endpoint", node3])  # env token: bad
    assert code == EXIT_API and "(unauthorized) [HTTP 401]" in err
    code, _out, err = q.run("status", conn=["--insecure"])  # env endpoint: nothing listens
    assert code == EXIT_UNREACHABLE and "cannot connect" in err
    # no token at all: the public status works, the rest is 401
    monkeypatch.delenv("QUORUMD_TOKEN")
    conn = ["--insecure", "--endpoint", node3]
    assert q.run("status", conn=conn)[0] == EXIT_OK
    code, _out, err = q.run("autopilot", conn=conn)
    assert code == EXIT_API and "(unauthorized) [HTTP 401]" in err
    code, _out, err = q.run("status", conn=[*conn, "--token", admin, "--token-file", str(q.token_file())])
    assert code == EXIT_USAGE


@covers("members list")
def test_tls_verification(q: Ctl) -> None:
    api2 = q.c.nodes[2].api
    tok = ["--token-file", str(q.token_file())]
    code, _out, err = q.run("members", "list", conn=["--endpoint", api2, *tok, "--cacert", str(q.cacert(2))])
    assert code == EXIT_OK, err
    wrong = ["--endpoint", api2, *tok, "--cacert", str(q.cacert(1))]  # another node's certificate
    code, _out, err = q.run("members", "list", conn=wrong)
    assert code == EXIT_UNREACHABLE and "certificate verification failed" in err, err
    code, _out, err = q.run("members", "list", conn=["--endpoint", api2, *tok])  # system trust only
    assert code == EXIT_UNREACHABLE and "--cacert" in err, err
    code, _out, err = q.run("members", "list", conn=["--endpoint", api2, *tok, "--insecure"])
    assert code == EXIT_OK, err
    both = ["--endpoint", api2, *tok, "--insecure", "--cacert", str(q.cacert(2))]
    assert q.run("members", "list", conn=both)[0] == EXIT_USAGE
    wait_for("all nodes still ready", lambda: all(q.c.status(n)["ready"] for n in (1, 2, 3)))


@covers("members set-address")
def test_members_set_address(q: Ctl) -> None:
    """Its own addresses again (a no-op on a running member); refusals name the field."""
    me = next(m for m in q.json("members", "list") if m["nodeId"] == 3)
    out = q.ok("members", "set-address", "3", "--raft", me["raftAddress"], "--api", me["apiAddress"])
    assert me["raftAddress"] in out and me["apiAddress"] in out
    res = q.json("members", "set-address", "3", "--api", me["apiAddress"])
    conforms(res, "PATCH", "/api/v1/cluster/members/{id}")
    assert (res["raftAddress"], res["apiAddress"]) == (me["raftAddress"], me["apiAddress"])
    bad = ("members", "set-address", "3", "--raft", "0.0.0.0:7000")
    err = q.fails(*bad, status=400, code="invalid_raft_address")
    assert "raftAddress" in err
    q.fails("members", "set-address", "40", "--raft", "127.0.0.9:7000", status=404, code="member_not_found")
    assert q.run("members", "set-address", "3")[0] == 2  # neither --raft nor --api: a usage error


@covers("members rotate-certificate")
def test_members_rotate_certificate(q: Ctl) -> None:
    """Node 3's certificate through node 2: the new fingerprint printed and listed; 404 for a
    non-member."""
    before = next(m for m in q.json("members", "list") if m["nodeId"] == 3)["certificateFingerprint"]
    out = q.ok("members", "rotate-certificate", "3")
    assert "certificate rotated: sha256:" in out and before not in out, out
    res = q.json("members", "rotate-certificate", "3")
    conforms(res, "POST", "/api/v1/cluster/members/{id}/rotate-certificate")
    listed = next(m for m in q.json("members", "list") if m["nodeId"] == 3)
    assert listed["certificateFingerprint"] == res["certificateFingerprint"]
    q.fails("members", "rotate-certificate", "40", status=404, code="member_not_found")


@covers("backup save")
def test_backup_save(q: Ctl, tmp_path: Path) -> None:
    """Saved through a follower: atomic, 0600, digest checked; the file verifies offline."""
    target = tmp_path / "saved.backup"
    target.write_bytes(b"older content")
    out = q.ok("backup", "save", str(target))
    data = target.read_bytes()
    assert f"sha256: {hashlib.sha256(data).hexdigest()}" in out and f"size:   {len(data)} bytes" in out
    assert re.search(r"^index:\s+\d+$", out, re.M), out
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.backup"]  # no temp file left
    res = json.loads(q.ok("-o", "json", "backup", "save", str(target)))
    assert res["file"] == str(target) and res["index"] >= 1
    code, _, err = q.run("backup", "save", str(tmp_path / "missing-dir" / "x.backup"))
    assert code == EXIT_API and "cannot create" in err
    code, _, err = q.run("backup", "save", str(tmp_path / "b"), conn=[*q.base(2)[:2], "--insecure"])
    assert code == EXIT_API and "(unauthorized) [HTTP 401]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.backup"]


@covers("audit")
def test_audit(q: Ctl) -> None:
    """``quorumctl audit`` through a follower: the record of a pool made through quorumctl, in a
    table and as JSON (the documented schema), its filters, and the server's 400 for a limit over
    1000. Audited writes need the cluster's recorded protocol 2: probe until a write is audited."""
    probes = iter(range(1000))

    def audited_pool() -> str:
        name = f"audit{next(probes)}"
        q.ok("pools", "create", name, "10.77.0.0/24")
        q.ok("pools", "delete", name)
        rows = q.json("audit", "--action", "pool_delete", "--limit", "1000")
        return name if any(r["target"] == f"pool:{name}" for r in rows) else ""

    name = wait_for("an audited write", audited_pool, 30, interval=0.2)
    rows = q.json("audit", "--action", "pool_create", "--limit", "1000")
    conforms(rows, "GET", "/api/v1/audit")
    mine = [r for r in rows if r["target"] == f"pool:{name}"]
    assert len(mine) == 1 and mine[0]["viaNodeId"] == 2 and mine[0]["sourceAddress"] == "127.0.0.1"
    assert mine[0]["actor"]["name"] == "admin" and mine[0]["detail"] == {"cidr": "10.77.0.0/24"}
    after = mine[0]["id"]
    nxt = q.json("audit", "--after", str(after), "--limit", "1")
    assert len(nxt) == 1 and nxt[0]["id"] > after and nxt[0]["action"] == "pool_delete"
    actor = q.json("audit", "--actor", mine[0]["actor"]["tokenId"], "--after", str(after - 1), "--limit", "1")
    assert [r["id"] for r in actor] == [after]
    table = _table(q.ok("audit", "--after", str(after - 1), "--limit", "2"))
    assert table[0] == ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "DETAIL", "VIA", "SOURCE"]
    assert (
        table[1][3:6] == ["pool_create", f"pool:{name}", "cidr=10.77.0.0/24"] and table[2][3] == "pool_delete"
    )
    q.fails("audit", "--limit", "1001", status=400, code="invalid_limit")


def test_every_command_is_covered() -> None:
    """Every quorumctl command (read from its parser, so a new command without a live test fails
    here) is declared by a test above; the ``q`` fixture checks each declared one exited 0."""
    spec = {"status", "members list", "members remove", "members promote", "members drain", "members resume"}
    spec |= {"autopilot", "join-token create", "tokens create", "tokens list", "tokens revoke", "audit"}
    assert spec <= set(LEAVES), sorted(spec - set(LEAVES))
    assert {c.split()[0] for c in LEAVES} >= {"pools", "leases"}
    declared = set().union(*COVERS.values())
    assert declared == set(LEAVES), {
        "untested": sorted(set(LEAVES) - declared),
        "unknown": sorted(declared - set(LEAVES)),
    }
