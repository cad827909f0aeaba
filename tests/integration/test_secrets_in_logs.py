"""No secret ever reaches a log, and the logging contract holds, on real daemons at log-level debug.

One scenario per log format (``text`` and ``json``, both at ``debug``), on a 3-node cluster formed
with join tokens: mint join tokens (through the leader and through a follower, which forwards),
create API tokens (readonly and admin, one through a follower), use them, revoke one, fail
authentication with wrong tokens (unknown, near-miss of the admin token, revoked, garbage) on
leader and followers, refuse joins (a wrong-node token refused by the joiner itself, a tampered
token and a replayed token refused by the leader), drain and resume a node (with and without a
deadline). Then, after a graceful stop, every byte the daemons wrote (stdout and stderr of every
node and every refused joiner) and every node's /metrics is searched for every secret: the admin
token, each API token, each join token (whole, and fragments of the secret part: the API token
secret, the join token's HMAC), and the private keys in the data dirs (PEM body lines).

Logging contract (node/daemon/logs.py): every line carries the node id of the process that wrote it;
JSON lines parse and have ts, level, logger, node, msg; role changes, membership changes, drains,
resumes, joins, token changes and join refusals are logged at INFO or WARNING.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from quorumd.node.cluster import pki
from quorumd.node.registry import apitoken, jointoken
from tests.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.xdist_group("test_secrets_in_logs")

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"^({TS}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+) node=(\d+) (.*)$")
JSON_FIELDS = ("ts", "level", "logger", "node", "msg")
FRAGMENT = 20  # 20 base64 characters = 120 bits: no accidental match
LEVELS_OK = {"info", "warning"}


@dataclass
class Secret:
    name: str
    whole: str
    secret_part: str  # the part that must never be seen, even partially

    def needles(self) -> list[str]:
        part = self.secret_part
        windows = [part[i : i + FRAGMENT] for i in range(0, max(1, len(part) - FRAGMENT + 1), FRAGMENT // 2)]
        return [self.whole, part, *windows]


@dataclass
class Scenario:
    fmt: str
    cluster: Cluster
    secrets: list[Secret] = field(default_factory=list)
    extra_logs: dict[str, Path] = field(default_factory=dict)  # refused joiners: name -> log
    metrics: dict[int, str] = field(default_factory=dict)

    def node_logs(self) -> dict[int, str]:
        return {nid: n.log_text() for nid, n in self.cluster.nodes.items()}


def api_token_secret(name: str, token: str) -> Secret:
    match = re.fullmatch(r"qd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})", token)
    assert match, f"unexpected API token shape for {name}"
    return Secret(name, token, match.group(2))


def join_token_secret(name: str, token: str) -> Secret:
    """The join token and the base64 characters that encode only its 32-byte HMAC."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    mac_start_char = math.ceil((len(raw) - 32) * 4 / 3)
    return Secret(name, token, token[mac_start_char:])


def pem_secrets(data_dir: Path) -> list[Secret]:
    out: list[Secret] = []
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if "PRIVATE KEY-----" not in text:
            continue
        body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
        out.append(Secret(str(path), body, body))
        # each PEM line on its own, as it would appear in a multi-line log record
        out.extend(
            Secret(f"{path}:{i}", line, line)
            for i, line in enumerate(text.splitlines())
            if len(line) >= FRAGMENT and not line.startswith("-----")
        )
    return out


def run_refused_joiner(
    scenario: Scenario, name: str, node_id: int, token: str, timeout: float = 60.0
) -> tuple[int, str]:
    """Start a joiner that must be refused; returns (exit code, everything it wrote)."""
    c = scenario.cluster
    base = c.directory / f"refused-{name}"
    base.mkdir()
    (base / "join.token").write_text(token + "\n")
    cfg = {
        "data-dir": str(base / "data"),
        "log-level": "debug",
        "log-format": scenario.fmt,
        "api": {"address": "127.0.0.1", "port": free_port()},
        "cluster": {
            "node-id": node_id,
            "bind-address": f"127.0.0.1:{free_port()}",
            "peers": [f"127.0.0.1:{n.raft_port}" for n in c.nodes.values()],
            "join-token-file": str(base / "join.token"),
            "join-timeout": "30s",
            "heartbeat-interval": "50ms",
            "election-timeout": "500ms",
        },
    }
    (base / "quorumd.yaml").write_text(yaml.safe_dump(cfg))
    log_path = base / "output.log"
    with open(log_path, "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(base / "quorumd.yaml")],
            stdout=out,
            stderr=out,
            timeout=timeout,
            check=False,
        )
    scenario.extra_logs[name] = log_path
    if (base / "data").exists():
        scenario.secrets.extend(pem_secrets(base / "data"))
    return proc.returncode, log_path.read_text(errors="replace")


def tamper(token: str) -> str:
    """The same claims with a different MAC (the last characters changed)."""
    tail = "AAAA" if not token.endswith("AAAA") else "BBBB"
    return token[:-4] + tail


def play(scenario: Scenario) -> None:
    c = scenario.cluster
    c.form()
    lead = c.wait_leader()
    follower = next(n for n in sorted(c.nodes) if n != lead)
    other = next(n for n in sorted(c.nodes) if n not in (lead, follower))
    admin = c.token
    scenario.secrets.append(api_token_secret("admin token", admin))
    for nid in (2, 3):  # the join tokens the harness minted and used to form the cluster
        used = (c.directory / f"node{nid}.join-token").read_text().strip()
        scenario.secrets.append(join_token_secret(f"join token node {nid}", used))

    # join tokens: minted through the leader and through a follower (forwarded to the leader)
    jt9 = c.mint(9, via=lead)
    jt10 = c.mint(10, via=follower)
    scenario.secrets += [join_token_secret("join token 9", jt9), join_token_secret("join token 10", jt10)]

    # API tokens: readonly through the leader, admin through a follower; use them, revoke one
    st, body, _ = c.api(lead, "POST", "/api/v1/tokens", {"name": "ro", "role": "readonly"})
    assert st == 201, body
    ro = body["result"]
    st, body, _ = c.api(
        follower, "POST", "/api/v1/tokens", {"name": "ops", "role": "admin", "ttlSeconds": 600}
    )
    assert st == 201, body
    ops = body["result"]
    scenario.secrets += [
        api_token_secret("readonly token", ro["token"]),
        api_token_secret("ops", ops["token"]),
    ]

    # a new token is in the replicated state: every node accepts it once it has applied the entry
    def accepted_everywhere(tok: str) -> bool:
        return all(c.api(n, "GET", "/api/v1/cluster/members", token=tok)[0] == 200 for n in c.nodes)

    for tok in (str(ro["token"]), str(ops["token"])):
        wait_for("token accepted everywhere", functools.partial(accepted_everywhere, tok), timeout=15)
    assert (
        c.api(follower, "POST", "/api/v1/pools", {"name": "x", "cidr": "10.9.0.0/24"}, ro["token"])[0] == 403
    )
    assert c.api(other, "POST", "/api/v1/pools", {"name": "s", "cidr": "10.8.0.0/24"}, ops["token"])[0] == 201
    st, body, _ = c.api(other, "POST", "/api/v1/leases", {"pool": "s", "holder": "h"}, ops["token"])
    assert st == 201, body
    assert c.api(follower, "DELETE", f"/api/v1/tokens/{ro['id']}", token=ops["token"])[0] in (200, 204)
    wait_for(
        "revocation seen everywhere",
        lambda: all(c.api(n, "GET", "/api/v1/cluster/members", token=ro["token"])[0] == 401 for n in c.nodes),
        timeout=15,
    )

    # failed authentication with wrong tokens, on every node (followers forward writes)
    unknown = "qd_" + "0" * 12 + "_" + "A" * 43
    near_miss = admin[:-1] + ("B" if admin[-1] != "B" else "C")
    for nid in sorted(c.nodes):
        for bad in (unknown, near_miss, "not-a-token", ro["token"]):
            assert c.api(nid, "GET", "/api/v1/cluster/members", token=bad)[0] == 401
            st, _, _ = c.api(nid, "POST", "/api/v1/cluster/pki/join-tokens", {"nodeID": 11}, token=bad)
            assert st == 401

    # join refusals: refused by the joiner itself (wrong node), by the leader (tampered, replayed)
    code, out = run_refused_joiner(scenario, "wrong-node", 8, jt9)
    assert code == 1 and "join token is for node 9" in out
    code, out = run_refused_joiner(scenario, "tampered", 9, tamper(jt9))
    assert code == 1 and "join refused: tampered" in out
    replay = (c.directory / "node3.join-token").read_text().strip()
    code, out = run_refused_joiner(scenario, "replayed", 3, replay)
    assert code == 1 and "join refused: replayed" in out

    # drain and resume: synchronous (deadline 0) and with a deadline
    assert c.ok(follower, "POST", f"/api/v1/cluster/members/{other}/drain", {"deadlineSeconds": 0}) == {
        "drainState": "drained"
    }
    c.ok(lead, "POST", f"/api/v1/cluster/members/{other}/resume")
    # The node keeps a lease, so the leader does not complete the drain on its own: a completion
    # racing the resume can override it (product bug, see the report on node/cluster/operations.py).
    c.ok(lead, "POST", "/api/v1/leases", {"pool": "s", "holder": "keep", "nodeId": follower})
    assert c.ok(lead, "POST", f"/api/v1/cluster/members/{follower}/drain", {"deadlineSeconds": 300}) == {
        "drainState": "draining"
    }
    c.ok(other, "POST", f"/api/v1/cluster/members/{follower}/resume")
    wait_for(
        "all active again",
        lambda: all(m["drainState"] == "active" for m in c.members()),
        timeout=15,
    )

    for nid, node in c.nodes.items():
        scenario.metrics[nid] = raw_get(f"{node.api}/metrics")
        scenario.secrets.extend(pem_secrets(node.data_dir))
    # a graceful stop of every node: the shutdown path logs too
    for nid in sorted(c.nodes, key=lambda n: n == lead):
        assert c.stop(nid) == 0


def raw_get(url: str) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=10, context=ctx) as resp:
        return str(resp.read().decode())


# One test per format runs the scenario once and checks everything on it (a module-scoped fixture
# would be set up once per xdist worker that runs one of its tests).
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secrets_and_the_logging_contract(fmt: str, tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3, top_overrides={"log-level": "debug", "log-format": fmt})
    scenario = Scenario(fmt, c)
    try:
        play(scenario)
    finally:
        c.close()
    check_no_secret_in_any_log_or_metrics(scenario)
    check_every_line_carries_the_node_id(scenario)
    check_operational_events_are_logged_at_info_or_warning(scenario)


# --- secrets ------------------------------------------------------------------------------------


def check_no_secret_in_any_log_or_metrics(scenario: Scenario) -> None:
    sources = {f"node{nid}.log": text for nid, text in scenario.node_logs().items()}
    sources |= {f"refused-{name}": p.read_text(errors="replace") for name, p in scenario.extra_logs.items()}
    sources |= {f"node{nid} /metrics": text for nid, text in scenario.metrics.items()}
    assert all(sources.values()) and len(sources) == 3 + 3 + 3
    names = {s.name for s in scenario.secrets}
    assert {"admin token", "readonly token", "ops", "join token 9", "join token 10"} <= names
    key_files = {s.name for s in scenario.secrets if s.name.endswith(".key")}
    for node in scenario.cluster.nodes.values():  # each node's own key and its API key
        assert {str(node.data_dir / "tls" / "node.key"), str(node.data_dir / "tls" / "api.key")} <= key_files
    # JSON escapes none of the base64 characters ("+", "/", "="): the needles match both formats
    hits = [
        (secret.name, source)
        for secret in scenario.secrets
        for needle in secret.needles()
        for source, text in sources.items()
        if needle in text
    ]
    assert hits == [], f"secrets found in logs: {sorted(set(hits))}"


def test_the_search_would_find_a_leak(tmp_path: Path) -> None:
    """Self-check: the needles of each kind of secret match the secret when it is logged, whole
    or in part, in either format; and they do not match the public parts."""
    key = jointoken.mint_join_token(
        b"k" * 32,
        jointoken.JoinClaims(9, "c" * 32, 2_000_000_000, b"t" * 16, "sha256:" + "a" * 64, ("10.0.0.1:7000",)),
    )
    api = apitoken.format_api_token("0123456789ab", b"s" * 32)
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "node.key").write_bytes(pki.generate_node_identity(1, "c" * 32).key_pem)
    secrets = [join_token_secret("jt", key), api_token_secret("api", api), *pem_secrets(tmp_path)]
    assert len(secrets) >= 3
    for secret in secrets:
        for text in (f"x token={secret.whole} y", json.dumps({"msg": f"token={secret.whole}"})):
            assert any(needle in text for needle in secret.needles()), secret.name
        half = secret.secret_part[: len(secret.secret_part) // 2 + FRAGMENT]
        assert any(needle in f"leaked {half}" for needle in secret.needles()), secret.name
    jt = secrets[0]
    assert len(jt.secret_part) >= 40 and jt.whole.endswith(jt.secret_part)
    claims_part = jt.whole[: -len(jt.secret_part)]
    assert not any(needle in claims_part for needle in jt.needles()[1:])  # the claims are not the secret
    assert not any(needle in "qd_0123456789ab_" for needle in secrets[1].needles())  # nor the token id


# --- the logging contract -------------------------------------------------------------------------


@dataclass
class Line:
    level: str
    logger: str
    node: int
    msg: str


def parse_lines(fmt: str, text: str, *, allow_cli_messages: bool = False) -> list[Line]:
    """Every line of a daemon's output as a log record; fails on a line that is not one."""
    out: list[Line] = []
    in_trace = False
    for raw in text.splitlines():
        if allow_cli_messages and raw.startswith("quorumd: "):
            continue  # the CLI's one-line fatal message on stderr (after the log record)
        if fmt == "json":
            obj = json.loads(raw)
            assert isinstance(obj, dict) and all(k in obj for k in JSON_FIELDS), raw
            assert re.fullmatch(TS, obj["ts"]) and isinstance(obj["node"], int), raw
            assert obj["level"] in {"debug", "info", "warning", "error", "critical"}, raw
            out.append(Line(obj["level"], obj["logger"], obj["node"], obj["msg"]))
            continue
        match = TEXT_LINE.match(raw)
        if match is None:
            # a traceback belongs to the record above it (formatted by the TextFormatter)
            assert in_trace or raw.startswith("Traceback"), f"not a log line: {raw!r}"
            in_trace = True
            continue
        in_trace = False
        out.append(Line(match.group(2).lower(), match.group(3), int(match.group(4)), match.group(5)))
    return out


def check_every_line_carries_the_node_id(scenario: Scenario) -> None:
    for nid, text in scenario.node_logs().items():
        lines = parse_lines(scenario.fmt, text)
        assert len(lines) > 20
        assert {line.node for line in lines} == {nid}, f"node{nid}.log"
        assert any(line.level == "debug" for line in lines)  # log-level debug is in effect
    joiner_ids = {"wrong-node": 8, "tampered": 9, "replayed": 3}
    for name, path in scenario.extra_logs.items():
        lines = parse_lines(scenario.fmt, path.read_text(errors="replace"), allow_cli_messages=True)
        assert lines and {line.node for line in lines} == {joiner_ids[name]}, name


def _events(lines: list[Line]) -> dict[str, set[str]]:
    """event name (first word of the message) -> levels it was logged at."""
    out: dict[str, set[str]] = {}
    for line in lines:
        event = line.msg.split(" ", 1)[0]
        out.setdefault(event, set()).add(line.level)
    return out


def check_operational_events_are_logged_at_info_or_warning(scenario: Scenario) -> None:
    per_node = {nid: _events(parse_lines(scenario.fmt, text)) for nid, text in scenario.node_logs().items()}
    everywhere = ("raft_role_change", "member_registered", "drain_state_changed", "api_token_created",
                  "api_token_revoked", "shutdown_start", "shutdown_done")  # fmt: skip
    for nid, events in per_node.items():
        for event in everywhere:
            assert event in events and events[event] <= LEVELS_OK, (nid, event, events.get(event))
    merged: dict[str, set[str]] = {}
    for events in per_node.values():
        for event, levels in events.items():
            merged.setdefault(event, set()).update(levels)
    for event in ("join_accepted", "join_token_minted", "member_draining", "member_resumed"):
        assert event in merged and merged[event] <= LEVELS_OK, (event, merged.get(event))
    assert "autopilot_promoted" in merged or "member_promoted" in merged
    assert merged.get("join_refused") == {"warning"}
    refusals = [
        line.msg
        for text in scenario.node_logs().values()
        for line in parse_lines(scenario.fmt, text)
        if line.msg.startswith("join_refused")
    ]
    assert any("reason=tampered" in m for m in refusals) and any("reason=replayed" in m for m in refusals)
    # the joiners learn the reason at ERROR (fatal) and say it on stderr
    for name in ("tampered", "replayed"):
        lines = parse_lines(scenario.fmt, scenario.extra_logs[name].read_text(), allow_cli_messages=True)
        assert any(line.level == "error" and "join refused" in line.msg for line in lines), name
