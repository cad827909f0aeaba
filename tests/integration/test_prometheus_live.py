"""A real Prometheus scraping a real 3-node cluster with the shipped scrape config and alert rules.

The scrape job is deploy/prometheus/prometheus.yml's own ``quorumd`` job (HTTPS on the API port,
``insecure_skip_verify`` for the self-signed certificate), with the compose targets replaced by the
test nodes' API ports and the intervals shortened to 1 s; deploy/prometheus/rules.yml is loaded
as-is. Through PromQL over Prometheus' HTTP API the test then sees: every target up, exactly one
leader, failure tolerance 1, the commit index of every node following writes; after a voter is
killed, failure tolerance 0 (and the matching alerts pending); after its restart, 1 again. Every
rule of rules.yml must evaluate with health ``ok``.

Skipped only when /usr/bin/prometheus is missing (CI installs the Debian package).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.xdist_group("test_prometheus_live")

PROMETHEUS = Path("/usr/bin/prometheus")
REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise ValueError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant vector: (labels, value) per series."""
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def scalar(self, expr: str) -> float | None:
        """The value of a single-series expression, None when the vector is empty."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def scrape_config(cluster: Cluster, rules: Path) -> dict[str, Any]:
    """The shipped prometheus.yml with test targets and 1 s intervals."""
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "quorumd")
    assert job["scheme"] == "https" and job["tls_config"] == {"insecure_skip_verify": True}
    job["static_configs"] = [{"targets": [f"127.0.0.1:{n.api_port}" for n in cluster.nodes.values()]}]
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [job],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("promcluster"), 3)
    try:
        c.form()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} is missing: apt-get install prometheus (CI installs it)")
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "rules.yml"
    shutil.copy(PROM_DIR / "rules.yml", rules)
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(cluster, rules), sort_keys=False))
    port = free_port()
    log_path = work / "prometheus.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=out,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}: {prom.log_tail()}"
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for("prometheus ready", ready, timeout=60, interval=0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def instance(cluster: Cluster, node_id: int) -> str:
    return f"127.0.0.1:{cluster.nodes[node_id].api_port}"


def wait_value(prom: Prometheus, expr: str, want: float, timeout: float = 45.0) -> None:
    seen: list[float | None] = []

    def check() -> bool:
        value = prom.scalar(expr)
        if not seen or seen[-1] != value:
            seen.append(value)
        return value == want

    try:
        wait_for(f"{expr} == {want}", check, timeout=timeout, interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; values seen: {seen[-10:]}; prometheus log: {prom.log_tail()}") from None


def test_targets_up_one_leader_and_failure_tolerance(cluster: Cluster, prometheus: Prometheus) -> None:
    wait_value(prometheus, 'count(up{job="quorumd"} == 1)', 3.0)
    # every node exports its own one-hot role: the sum of the leader gauge is the number of leaders
    wait_value(prometheus, 'sum(quorumd_raft_state{job="quorumd",state="leader"})', 1.0)
    leader = cluster.wait_leader()
    roles = prometheus.query('quorumd_raft_state{job="quorumd",state="leader"} == 1')
    assert [labels["instance"] for labels, _ in roles] == [instance(cluster, leader)]
    assert prometheus.scalar('min(quorumd_raft_has_leader{job="quorumd"})') == 1.0
    assert prometheus.scalar('max(quorumd_raft_voters{job="quorumd"})') == 3.0
    wait_value(prometheus, 'max(quorumd_autopilot_failure_tolerance{job="quorumd"})', 1.0)
    # leader-only series: only the leader's instance exports it
    ft = prometheus.query('quorumd_autopilot_failure_tolerance{job="quorumd"}')
    assert [labels["instance"] for labels, _ in ft] == [instance(cluster, leader)]
    builds = prometheus.query('quorumd_build_info{job="quorumd"}')
    assert len(builds) == 3 and all(labels.get("version") for labels, _ in builds)


def test_commit_index_follows_writes(cluster: Cluster, prometheus: Prometheus) -> None:
    wait_value(prometheus, 'count(quorumd_raft_commit_index{job="quorumd"})', 3.0)
    before = prometheus.scalar('max(quorumd_raft_commit_index{job="quorumd"})')
    assert before is not None and before > 0
    leases_expr = 'sum by (instance) (quorumd_leases_active{job="quorumd"})'
    leases_before = prometheus.scalar(f"max({leases_expr}) or vector(0)")
    assert leases_before is not None
    lead = cluster.wait_leader()
    cluster.ok(lead, "POST", "/api/v1/pools", {"name": "prom", "cidr": "10.77.0.0/24"})
    writes = 10
    for i in range(writes):
        cluster.ok(lead, "POST", "/api/v1/leases", {"pool": "prom", "holder": f"h{i}"})
    target = before + writes + 1
    # every node's commit index (min over instances) passes the writes, seen through scrapes
    wait_for(
        f"every node's commit index >= {target}",
        lambda: (prometheus.scalar('min(quorumd_raft_commit_index{job="quorumd"})') or 0) >= target,
        timeout=30,
        interval=0.25,
    )
    applied = prometheus.scalar('min(quorumd_raft_applied_index{job="quorumd"})')
    assert applied is not None and applied >= before
    # the commit latency histogram is fed by the leader's commits
    count = prometheus.scalar('sum(quorumd_raft_commit_duration_seconds_count{job="quorumd"})')
    assert count is not None and count >= writes
    # every node exports the replicated lease count of every member
    wait_value(prometheus, f"min({leases_expr})", leases_before + writes)
    wait_value(prometheus, f"max({leases_expr})", leases_before + writes)


def test_killed_voter_drops_failure_tolerance_and_restart_restores_it(
    cluster: Cluster, prometheus: Prometheus
) -> None:
    wait_value(prometheus, 'max(quorumd_autopilot_failure_tolerance{job="quorumd"})', 1.0)
    lead = cluster.wait_leader()
    victim = next(n for n in sorted(cluster.nodes) if n != lead)
    cluster.kill(victim)
    wait_value(prometheus, f'up{{job="quorumd",instance="{instance(cluster, victim)}"}}', 0.0)
    wait_value(prometheus, 'max(quorumd_autopilot_failure_tolerance{job="quorumd"})', 0.0)
    wait_value(prometheus, f'max(quorumd_autopilot_server_healthy{{job="quorumd",node_id="{victim}"}})', 0.0)
    wait_value(prometheus, 'sum(quorumd_raft_state{job="quorumd",state="leader"})', 1.0)
    # the shipped alerts see it too (pending: their `for:` is minutes long)
    for alert, extra in (
        ("QuorumdFailureToleranceZero", ""),
        ("QuorumdServerUnhealthy", f',node_id="{victim}"'),
        ("QuorumdNodeDown", f',instance="{instance(cluster, victim)}"'),
    ):
        wait_value(prometheus, f'count(ALERTS{{alertname="{alert}",alertstate="pending"{extra}}})', 1.0)
    assert prometheus.query('ALERTS{alertname="QuorumdNoLeader"}') == []
    cluster.restart(victim)
    cluster.wait_ready(victim, timeout=60)
    wait_value(prometheus, 'count(up{job="quorumd"} == 1)', 3.0)
    wait_value(prometheus, 'max(quorumd_autopilot_failure_tolerance{job="quorumd"})', 1.0, timeout=60)
    wait_value(prometheus, 'count(ALERTS{alertname="QuorumdFailureToleranceZero"}) or vector(0)', 0.0)


def test_drain_deadline_is_exported_and_the_stuck_drain_alert_waits_for_it(
    cluster: Cluster, prometheus: Prometheus
) -> None:
    lead = cluster.wait_leader()
    target = next(n for n in sorted(cluster.nodes) if n != lead)
    # one lease keeps the drain waiting for its deadline (with none the leader completes it at once)
    cluster.ok(lead, "POST", "/api/v1/pools", {"name": "drain", "cidr": "10.78.0.0/24"})
    cluster.ok(lead, "POST", "/api/v1/leases", {"pool": "drain", "holder": "keep", "nodeId": target})
    before = time.time()
    res = cluster.ok(lead, "POST", f"/api/v1/cluster/members/{target}/drain", {"deadlineSeconds": 600})
    assert res == {"drainState": "draining"}
    try:
        deadline = f'quorumd_drain_deadline_timestamp_seconds{{job="quorumd",node_id="{target}"}}'
        wait_value(prometheus, f"count({deadline})", 3.0)  # every node exports its replica's view
        low, high = prometheus.scalar(f"min({deadline})"), prometheus.scalar(f"max({deadline})")
        assert low == high and low is not None and before + 590 < low < time.time() + 610
        wait_value(prometheus, f'max(quorumd_drain_state{{node_id="{target}",state="draining"}})', 1.0)
        # the deadline is ahead: the stuck-drain expression is empty, the alert not even pending
        assert prometheus.query('ALERTS{alertname="QuorumdNodeStuckDraining"}') == []
    finally:
        cluster.ok(lead, "POST", f"/api/v1/cluster/members/{target}/resume")
    wait_value(prometheus, f"count({deadline}) or vector(0)", 0.0)


def test_shipped_rules_evaluate_without_errors(prometheus: Prometheus) -> None:
    shipped = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    expected = {r.get("alert") or r.get("record") for g in shipped["groups"] for r in g["rules"]}

    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # each rule has been evaluated at least once (health leaves "unknown")
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_for("every rule evaluated", evaluated, timeout=30, interval=0.25)
    assert {r["name"] for r in rules} == expected
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert bad == []
    assert all(not r.get("lastError") for r in rules)
