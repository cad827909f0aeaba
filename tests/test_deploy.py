"""Deployment artifacts (deploy/) and the metrics they depend on (node/daemon/metrics.py).

Tool-backed checks (promtool, systemd-analyze, docker-compose) fail, not skip, when the tool is
missing: CI (.ci/run) installs prometheus, systemd and docker-compose. The bring-up test runs
deploy/compose/bringup.py against real daemons in network namespaces (root, iproute2, nftables;
skipped without them, like the chaos tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from quorumd.node.config.schema import config_from_dict, load_config
from quorumd.node.daemon.metrics import API_METRIC_NAMES, Metrics
from quorumd.node.daemon.node_collector import AutopilotGauges, NodeView

# One module runs real daemons (the bring-up test): keep it on one worker.
pytestmark = pytest.mark.xdist_group("test_deploy")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
COMPOSE = DEPLOY / "compose"
UNIT = DEPLOY / "systemd" / "quorumd.service"
DASHBOARD = DEPLOY / "grafana" / "quorumd.json"

SPEC_METRICS = {  # the metrics operators rely on, as exposed sample names
    "quorumd_raft_state",
    "quorumd_raft_has_leader",
    "quorumd_raft_term",
    "quorumd_raft_commit_index",
    "quorumd_raft_applied_index",
    "quorumd_raft_last_log_index",
    "quorumd_raft_leader_changes_total",
    "quorumd_raft_voters",
    "quorumd_raft_nonvoters",
    "quorumd_raft_commit_duration_seconds_bucket",
    "quorumd_raft_fsync_duration_seconds_bucket",
    "quorumd_raft_peer_replication_lag_entries",
    "quorumd_raft_peer_last_contact_seconds",
    "quorumd_raft_snapshots_total",
    "quorumd_autopilot_healthy",
    "quorumd_autopilot_failure_tolerance",
    "quorumd_autopilot_server_healthy",
    "quorumd_drain_state",
    "quorumd_leases_active",
    "quorumd_bgp_speaker_running",
    "quorumd_bgp_announced_prefixes",
    "quorumd_ran_notifications_total",
    "quorumd_join_tokens_total",
    "quorumd_build_info",
    "quorumd_transport_frames_dropped_total",
    "quorumd_transport_malformed_frames_total",
    "quorumd_transport_refused_connections_total",
}
NAME_RE = re.compile(r"\bquorumd_[a-z0-9_]+")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: apt-get install {package} (CI installs it)"
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def known_names() -> frozenset[str]:
    api = {f"{n}{s}" for n in API_METRIC_NAMES for s in ("", "_bucket", "_sum", "_count")}
    return Metrics("test").sample_names() | api


def sample_value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    value = m.registry.get_sample_value(name, labels or {})
    return None if value is None else float(value)


# --- metrics ---------------------------------------------------------------------------------------


def test_every_spec_metric_is_exposed() -> None:
    m = Metrics("1.2.3")
    m.set_source(lambda: NodeView("leader", autopilot=AutopilotGauges(True, 1, {1: True})))
    assert SPEC_METRICS - m.sample_names() == set()
    text = m.render()[0].decode()
    assert 'quorumd_build_info{version="1.2.3"} 1.0' in text
    for name in SPEC_METRICS:
        base = re.escape(name.removesuffix("_bucket").removesuffix("_total"))
        assert re.search(rf"^# TYPE {base}(_total)? (gauge|counter|histogram)$", text, re.M), name


def test_api_layer_registers_on_the_same_registry() -> None:
    from quorumd.api.metrics import ApiMetrics

    m = Metrics("v")
    api = ApiMetrics(m.registry)
    api.observe("GET", "/api/v1/cluster/members", 200, 0.01)
    assert (
        sample_value(
            m,
            "quorumd_api_requests_total",
            {"method": "GET", "route": "/api/v1/cluster/members", "status": "200"},
        )
        == 1.0
    )
    assert Metrics("v", registry=CollectorRegistry()).registry is not m.registry


# --- prometheus --------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = tool("promtool", "prometheus")
    res = run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "prometheus")
    res = run([promtool, "check", "rules", str(PROM / "rules.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    promtool = tool("promtool", "prometheus")
    res = run([promtool, "test", "rules", "rules_test.yml"], cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {
        "QuorumdNoLeader",
        "QuorumdFailureToleranceZero",
        "QuorumdServerUnhealthy",
        "QuorumdLeaderFlapping",
        "QuorumdCommitLatencyHigh",
        "QuorumdNodeStuckDraining",
        "QuorumdNodeDown",
        "QuorumdNodeIsolated",
    }
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


def test_rules_use_known_metrics() -> None:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    names = {n for g in rules["groups"] for r in g["rules"] for n in NAME_RE.findall(r["expr"])}
    assert names and names <= known_names()


def test_prometheus_targets_match_compose_services() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "quorumd")
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["node1:5002", "node2:5002", "node3:5002"]


# --- grafana ------------------------------------------------------------------------------------------


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboard_uses_only_registered_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = {name for expr in _exprs(dash) for name in NAME_RE.findall(expr)}
    assert used - known_names() == set()
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    for required in (
        "quorumd_raft_state",
        "quorumd_raft_term",
        "quorumd_raft_commit_index",
        "quorumd_raft_applied_index",
        "quorumd_raft_commit_duration_seconds",
        "quorumd_raft_fsync_duration_seconds",
        "quorumd_autopilot_failure_tolerance",
        "quorumd_autopilot_server_healthy",
        "quorumd_drain_state",
        "quorumd_leases_active",
        "quorumd_api_requests",
        "quorumd_api_request_duration_seconds",
        "quorumd_bgp_announced_prefixes",
        "quorumd_ran_notifications",
    ):
        assert required in families, required


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    dash = json.loads(DASHBOARD.read_text())
    exprs = [p_t["expr"] for p in dash["panels"] for p_t in p.get("targets", [])]
    assert exprs
    rules = [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "5m").replace("$job", ".+")}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


# --- systemd -----------------------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at an executable that exists here (verify checks it)."""
    fake = tmp_path / "bin" / "quorumd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/quorumd run --config /etc/quorumd/quorumd.yaml" in text
    unit = tmp_path / "quorumd.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/quorumd ", f"ExecStart={fake} "))
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    res = run([analyze, "verify", str(_testable_unit(tmp_path))])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "quorumd.service" not in res.stderr, res.stderr


def test_systemd_unit_exposure_is_low(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    res = run([analyze, "security", "--offline=yes", "--threshold=25", str(_testable_unit(tmp_path))])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr


def test_systemd_unit_settings() -> None:
    s = _unit_settings()
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "quorumd",
        "StateDirectory": "quorumd",
        "StateDirectoryMode": "0700",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "TimeoutStopSec": "45s",
        "RestartPreventExitStatus": "2",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], key
    assert "LimitNOFILE" in s and "ReadWritePaths" in s


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60.0 if match.group(2) == "min" else 1.0)


def test_stop_and_start_timeouts_cover_the_daemon_budgets() -> None:
    """TimeoutStopSec is above the worst graceful stop with the default config: the leadership
    hand-off (3 x election-timeout), the leave announcement (propose-timeout) and every bounded
    cleanup step of node/daemon/root.py (``self._bounded(..., N)``); TimeoutStartSec is above the
    default
    join-timeout; WatchdogSec leaves the daemon's half-interval ping room to spare."""
    s = _unit_settings()
    cluster = config_from_dict({"cluster": {"node-id": 1}}).cluster
    daemon_src = (REPO / "node" / "daemon" / "root.py").read_text()
    cleanups = [float(x) for x in re.findall(r"self\._bounded,[^\n]*?,\s*([0-9.]+)\)", daemon_src)]
    assert len(cleanups) >= 3, "the cleanup bounds of node/daemon/root.py moved: update this test"
    budget = 3 * cluster.election_timeout_seconds + cluster.propose_timeout_seconds + sum(cleanups)
    stop = _seconds(s["TimeoutStopSec"][0])
    assert stop >= budget + 10, (stop, budget)
    assert _seconds(s["TimeoutStartSec"][0]) >= cluster.join_timeout_seconds + 30
    assert _seconds(s["WatchdogSec"][0]) >= 10
    assert "SIGTERM" in s["KillSignal"] and s["KillMode"] == ["mixed"]


# --- compose ------------------------------------------------------------------------------------------


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    compose = tool("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    res = subprocess.run(
        [compose, "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_topology_and_node_configs(tmp_path: Path) -> None:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"node1", "node2", "node3", "prometheus", "init"} <= set(services)
    token = tmp_path / "join.token"
    token.write_text("qd_jt_testtoken123\n")
    for i in (1, 2, 3):
        svc = services[f"node{i}"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/var/lib/quorumd"] == f"node{i}-data"
        assert mounts["/etc/quorumd/quorumd.yaml"] == f"./node{i}.yaml"
        raw = yaml.safe_load((COMPOSE / f"node{i}.yaml").read_text())
        if i == 1:
            assert "join-token-file" not in raw["cluster"]
            cfg = load_config(COMPOSE / "node1.yaml")
        else:
            assert raw["cluster"]["join-token-file"] == f"/join/node{i}.token"
            assert f"/join/node{i}.token" in " ".join(svc["command"])  # waits for the file
            raw["cluster"]["join-token-file"] = str(token)
            cfg = config_from_dict(raw)
            assert cfg.cluster.is_joiner
        assert cfg.node_id == i and cfg.data_dir == Path("/var/lib/quorumd")
        assert str(cfg.cluster.advertise_address) == f"node{i}:7000"
        assert f"node{i}:7000" not in [str(p) for p in cfg.cluster.peers]
    init = " ".join(services["init"]["command"])
    assert "--node-ids=2,3" in init and "--out-dir=/join" in init
    assert "node1-data:/node1:ro" in services["init"]["volumes"]
    # Images are built offline (deploy/image/build.sh): the compose file never builds or pulls.
    images = {name: svc.get("image") for name, svc in services.items()}
    assert images == {
        "node1": "quorumd:local",
        "node2": "quorumd:local",
        "node3": "quorumd:local",
        "init": "quorumd:local",
        "prometheus": "quorumd-prometheus:local",
        "collector": "quorumd-collector:local",
    }
    assert all("build" not in svc for svc in services.values())
    dockerfile = (DEPLOY / "image" / "quorumd.Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert dockerfile.startswith("# ") and set(froms) == {"quorumd-base:bookworm"}, froms
    assert "--no-index" in dockerfile and "--find-links" in dockerfile
    assert "USER quorumd" in dockerfile and "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    for other in ("prometheus.Dockerfile", "host.Dockerfile", "collector.Dockerfile"):
        text = (DEPLOY / "image" / other).read_text()
        assert re.findall(r"^FROM (\S+)", text, re.M) == ["quorumd-base:bookworm"], other


# --- bringup.py ---------------------------------------------------------------------------------------


def _load_bringup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quorumd_bringup", COMPOSE / "bringup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeApi:
    """A scripted stand-in for node 1's API: answers pop from per-path queues; the last one repeats."""

    def __init__(self, script: dict[str, list[tuple[int, Any]]]) -> None:
        self.script = script
        self.calls: list[tuple[str, str, str | None, Any]] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                key = f"{self.command} {self.path}"
                if body is not None and "nodeID" in body:
                    key += f" {body['nodeID']}"
                with api.lock:
                    api.calls.append((self.command, self.path, self.headers.get("Authorization"), body))
                    queue = api.script.get(key, [(404, {"error": "nope", "code": "not_found"})])
                    status, payload = queue.pop(0) if len(queue) > 1 else queue[0]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _argv(api: FakeApi, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"--endpoint={api.endpoint}",
        f"--token-file={tmp_path / 'admin.token'}",
        "--node-ids=2,3",
        f"--out-dir={tmp_path / 'join'}",
        "--poll-interval=0.01",
        "--timeout=20",
        *extra,
    ]


def test_bringup_mints_and_writes_tokens(tmp_path: Path) -> None:
    bringup = _load_bringup()
    (tmp_path / "admin.token").write_text("qd_admin_secret\n")
    script: dict[str, list[tuple[int, Any]]] = {
        "GET /api/v1/status": [
            (503, {"error": "starting", "code": "no_leader"}),
            (200, {"result": {"leaderNodeId": 0}}),
            (200, {"result": {"leaderNodeId": 1}}),
        ],
        "POST /api/v1/cluster/pki/join-tokens 2": [
            (503, {"error": "no leader", "code": "no_leader"}),
            (201, {"result": {"token": "qd_jt_for_node_2", "expiresAt": 1}}),
        ],
        "POST /api/v1/cluster/pki/join-tokens 3": [
            (201, {"result": {"token": "qd_jt_for_node_3", "expiresAt": 1}})
        ],
    }
    with FakeApi(script) as api:
        assert bringup.main(_argv(api, tmp_path, "--ttl=600")) == 0
        posts = [c for c in api.calls if c[0] == "POST"]
    assert all(auth == "Bearer qd_admin_secret" for _m, _p, auth, _b in posts)
    assert [b for *_x, b in posts] == [
        {"nodeID": 2, "ttlSeconds": 600},
        {"nodeID": 2, "ttlSeconds": 600},
        {"nodeID": 3, "ttlSeconds": 600},
    ]
    for n in (2, 3):
        path = tmp_path / "join" / f"node{n}.token"
        assert path.read_text() == f"qd_jt_for_node_{n}\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "join").iterdir()) == ["node2.token", "node3.token"]
    # a re-run skips nodes whose file exists, without contacting the API
    with FakeApi({}) as api:
        assert bringup.main(_argv(api, tmp_path)) == 0
        assert api.calls == []


def test_bringup_skips_members_and_fails_on_auth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bringup = _load_bringup()
    (tmp_path / "admin.token").write_text("qd_admin_secret\n")
    ready = [(200, {"result": {"leaderNodeId": 1}})]
    script: dict[str, list[tuple[int, Any]]] = {
        "GET /api/v1/status": list(ready),
        "POST /api/v1/cluster/pki/join-tokens 2": [
            (409, {"error": "already a member", "code": "already_member"})
        ],
        "POST /api/v1/cluster/pki/join-tokens 3": [(401, {"error": "bad token", "code": "unauthorized"})],
    }
    with FakeApi(script) as api:
        assert bringup.main(_argv(api, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "node 2: already_member" in err and "HTTP 401" in err
    assert "qd_admin_secret" not in err
    assert not (tmp_path / "join" / "node2.token").exists()


def test_bringup_times_out_waiting_for_the_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bringup = _load_bringup()
    with FakeApi({}) as api:
        argv = [a for a in _argv(api, tmp_path) if not a.startswith("--timeout")] + ["--timeout=0.05"]
        assert bringup.main(argv) == 1
        assert api.calls == []
    assert "timed out waiting for the admin token file" in capsys.readouterr().err


def test_bringup_rejects_bad_arguments(tmp_path: Path) -> None:
    bringup = _load_bringup()
    with pytest.raises(SystemExit) as info:
        bringup.main(["--token-file=x", "--node-ids=0,2", "--out-dir=y"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        bringup.main(["--token-file=x", "--node-ids=2", "--out-dir=y", "--insecure", "--cacert=c"])
    assert bringup.parse_node_ids("3, 2,3") == [3, 2]
