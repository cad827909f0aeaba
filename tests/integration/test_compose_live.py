"""The docker-compose walk-through of docs/operations.md, for real (``make compose-test``).

Runs the shipped deploy/compose/docker-compose.yml (unchanged) on the images ``make image`` builds
offline, and only through what the host sees: the published ports and the docker CLI. The commands
of the docs' compose section are the constants below, run in that order (the test checks first
that the docs show exactly them); between them it checks what their comments promise and what an
operator relies on:

- ``up -d``: the one-shot ``init`` mints the join tokens and exits 0; three voters, one leader;
  autopilot healthy with failure tolerance 1; Prometheus (published port) reports ``up`` for the
  three nodes and has loaded the rule group of deploy/prometheus/rules.yml;
- a lease allocated through node 2 is listed by every node;
- ``docker kill`` of the leader's container: another node leads and a write through a survivor
  commits; ``docker-compose start`` brings the node back, it rejoins (ready, autopilot healthy,
  failure tolerance 1) and lists every lease;
- drain and resume of node 3 with quorumctl through its own published port (a lease for a drained
  node is refused, 409 ``node_draining``);
- ``down`` then ``up -d``: the same cluster from the named volumes, every lease still there;
- ``down -v``: no container, network or volume of the project is left.

Leftovers of a killed earlier run are removed first, and everything is removed at the end, also
when the test fails. Skipped unless ``QUORUMD_DOCKER_TESTS=1`` (``make compose-test`` sets it).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker_support import REPO, Stopwatch, doc_commands, sh, skip_unless_docker, wait_for

pytestmark = [skip_unless_docker, pytest.mark.timeout(1200)]

PROJECT = "quorumd"  # deploy/compose/.env: COMPOSE_PROJECT_NAME
DC = "docker-compose -f deploy/compose/docker-compose.yml"
CTL = "quorumctl --endpoint https://127.0.0.1:{port} --insecure --token-file admin.token"
API_PORT = {1: 5101, 2: 5102, 3: 5103}

# The docs' section, command for command (tests/test_deploy_docs.py checks it in `make test` too).
UP = f"{DC} up -d"
WAIT_INIT = f'docker wait "$({DC} ps -q init)"'
ADMIN_TOKEN = f"{DC} exec -T node1 cat /var/lib/quorumd/admin.token > admin.token"
MEMBERS = CTL.format(port=5101) + " members list"
AUTOPILOT = CTL.format(port=5101) + " autopilot"
TARGETS = "curl -s http://127.0.0.1:9090/api/v1/targets"
RULES = "curl -s http://127.0.0.1:9090/api/v1/rules"
KILL_NODE1 = f'docker kill "$({DC} ps -q node1)"'
START_NODE1 = f"{DC} start node1"
DRAIN3 = CTL.format(port=5103) + " members drain 3"
RESUME3 = CTL.format(port=5103) + " members resume 3"
DOWN = f"{DC} down"
DOWN_V = f"{DC} down -v"
DOC_COMMANDS = [
    UP, WAIT_INIT, ADMIN_TOKEN, MEMBERS, AUTOPILOT, TARGETS, RULES,
    KILL_NODE1, START_NODE1, DRAIN3, RESUME3,
    DOWN, UP, DOWN_V,
]  # fmt: skip
DOC_HEADING = "### docker-compose"


def ctl(node: int, args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return sh(CTL.format(port=API_PORT[node]) + " " + args, **kwargs)


def ctl_json(node: int, args: str, **kwargs: Any) -> Any:
    return json.loads(ctl(node, args + " -o json", **kwargs).stdout)


def project_leftovers() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = []
    for kind, cmd in (
        ("container", f"docker ps -aq --filter {label}"),
        ("network", f"docker network ls -q --filter {label}"),
        ("volume", f"docker volume ls -q --filter {label}"),
    ):
        found += [f"{kind} {x}" for x in sh(cmd, timeout=60).stdout.split()]
    return found


def remove_project(workdir: Path) -> None:
    """Everything of the project, whatever state a run left it in (bounded; never raises)."""
    try:
        sh(f"{DC} down -v --remove-orphans --timeout 10", cwd=workdir, timeout=180, check=False)
        label = f"label=com.docker.compose.project={PROJECT}"
        sh(f"docker ps -aq --filter {label} | xargs -r docker rm -f", timeout=120, check=False)
        sh(f"docker network ls -q --filter {label} | xargs -r docker network rm", timeout=60, check=False)
        sh(f"docker volume ls -q --filter {label} | xargs -r docker volume rm -f", timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        print(f"cleanup timed out: {exc}")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The operator's directory: the checkout's deploy/ (unchanged) and the admin.token written there."""
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    remove_project(tmp_path)  # a run that was killed may have left its containers and volumes
    assert project_leftovers() == []
    for port in (*API_PORT.values(), 9090):  # published by the compose file on 127.0.0.1
        with socket.socket() as probe:
            taken = probe.connect_ex(("127.0.0.1", port)) == 0
        assert not taken, f"127.0.0.1:{port} is in use (a host Prometheus? `service prometheus stop`)"
    try:
        yield tmp_path
    finally:
        if (tmp_path / "admin.token").exists():
            sh(f"{DC} logs --no-color --tail 40", cwd=tmp_path, timeout=60, check=False)
        remove_project(tmp_path)


def leader_of(node: int, cwd: Path) -> int:
    status = ctl_json(node, "status", cwd=cwd, timeout=20)
    return int(status["leaderNodeId"] or 0)


def three_voters_one_leader(cwd: Path) -> list[dict[str, Any]]:
    members = ctl_json(1, "members list", cwd=cwd, timeout=20)
    voters = [m for m in members if m["suffrage"] == "voter"]
    leaders = [m for m in members if m["isLeader"]]
    ok = len(members) == 3 and len(voters) == 3 and len(leaders) == 1
    return members if ok else []


def autopilot_tolerates_one(node: int, cwd: Path) -> bool:
    ap = ctl_json(node, "autopilot", cwd=cwd, timeout=20)
    return bool(ap["healthy"] and ap["failureTolerance"] == 1 and len(ap["voters"]) == 3)


def lease_ids(node: int, cwd: Path) -> set[int]:
    return {int(lease["id"]) for lease in ctl_json(node, "leases list", cwd=cwd, timeout=20)}


def wait_leases_everywhere(nodes: list[int], want: set[int], cwd: Path) -> None:
    for node in nodes:
        wait_for(f"leases {sorted(want)} on node {node}", lambda n=node: want <= lease_ids(n, cwd), 60)


def test_docs_compose_section_is_what_this_test_runs() -> None:
    assert doc_commands(DOC_HEADING) == DOC_COMMANDS


def test_compose_walkthrough(workdir: Path) -> None:
    assert doc_commands(DOC_HEADING) == DOC_COMMANDS
    cwd = workdir
    clock = Stopwatch()

    # --- bring-up ------------------------------------------------------------------------------------
    sh(UP, cwd=cwd, timeout=180)
    res = sh(WAIT_INIT, cwd=cwd, timeout=330)  # bringup.py's own deadline is 300 s
    assert res.stdout.strip() == "0", res.stdout
    clock.mark("init exited 0")
    sh(ADMIN_TOKEN, cwd=cwd, timeout=60)
    assert (cwd / "admin.token").read_text().startswith("qd_")
    members = wait_for("three voters, one leader", lambda: three_voters_one_leader(cwd), 120)
    assert [m["nodeId"] for m in members] == [1, 2, 3]
    assert all(m["drainState"] == "active" for m in members)
    table = sh(MEMBERS, cwd=cwd, timeout=30).stdout
    assert table.count("voter") >= 3, table
    wait_for("autopilot healthy, failure tolerance 1", lambda: autopilot_tolerates_one(1, cwd), 90)
    assert "yes" in sh(AUTOPILOT, cwd=cwd, timeout=30).stdout.lower()
    clock.mark("three voters, autopilot healthy")

    def targets_up() -> bool:
        active = json.loads(sh(TARGETS, cwd=cwd, timeout=30).stdout)["data"]["activeTargets"]
        up = sorted(t["labels"]["instance"] for t in active if t["health"] == "up")
        return up == ["node1:5002", "node2:5002", "node3:5002"]

    wait_for("Prometheus scraping the three nodes", targets_up, 90, interval=2)
    for service in ("node1", "node2", "node3", "prometheus"):
        cid = sh(f"{DC} ps -q {service}", cwd=cwd, timeout=30).stdout.strip()
        info = json.loads(sh(f"docker inspect {cid}", timeout=30).stdout)[0]
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"], (service, host)
        assert info["Config"]["User"] in ("quorumd", "prometheus"), (service, info["Config"]["User"])
        assert not info["Config"]["Image"].startswith(("docker.io", "prom/", "python")), info["Config"][
            "Image"
        ]
        if service != "prometheus":  # the image's HEALTHCHECK: /healthz over HTTPS inside the container
            wait_for(
                f"{service} healthy",
                lambda c=cid: (
                    sh(f"docker inspect -f '{{{{.State.Health.Status}}}}' {c}", timeout=30).stdout.strip()
                    == "healthy"
                ),
                60,
            )
    groups = json.loads(sh(RULES, cwd=cwd, timeout=30).stdout)["data"]["groups"]
    alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert {"QuorumdNoLeader", "QuorumdNodeDown", "QuorumdFailureToleranceZero"} <= alerts, alerts
    assert all(r["health"] == "ok" for g in groups for r in g["rules"] if r.get("lastEvaluation")), groups
    clock.mark("Prometheus: targets up, rules loaded")

    # --- a lease through node 2, on every node ----------------------------------------------------------
    ctl(2, "pools create ue 10.45.0.0/24", cwd=cwd, timeout=30)
    first = ctl_json(2, "leases allocate --pool ue --holder imsi-001", cwd=cwd, timeout=30)
    assert first["nodeId"] == 2 and first["address"].startswith("10.45.0.")
    wait_leases_everywhere([1, 2, 3], {int(first["id"])}, cwd)

    # --- the leader's container killed, then started again -------------------------------------------
    leader = leader_of(1, cwd)
    kill, start = KILL_NODE1, START_NODE1
    if leader != 1:  # rare (an election under load): the docs' commands, for the node that leads
        print(f"node {leader} leads, not node 1: the docs' kill and start are run for node {leader}")
        kill, start = (c.replace("node1", f"node{leader}") for c in (KILL_NODE1, START_NODE1))
    survivors = [n for n in API_PORT if n != leader]
    sh(kill, cwd=cwd, timeout=60)
    clock.mark("leader killed")
    a, b = survivors
    new_leader = wait_for(
        "a new leader among the survivors", lambda: leader_of(a, cwd) in survivors and leader_of(a, cwd), 60
    )
    wait_for("both survivors follow the same leader", lambda: leader_of(b, cwd) == new_leader, 30)
    second = ctl_json(b, "leases allocate --pool ue --holder imsi-002", cwd=cwd, timeout=30)
    wait_leases_everywhere(survivors, {int(first["id"]), int(second["id"])}, cwd)
    clock.mark(f"node {new_leader} leads, writes continue")
    sh(start, cwd=cwd, timeout=60)
    wait_for(f"node {leader} back and following", lambda: leader_of(leader, cwd) == new_leader, 90)
    # the lease written while it was down reaches it: it rejoined and caught up
    wait_leases_everywhere([leader], {int(first["id"]), int(second["id"])}, cwd)
    wait_for("autopilot healthy, failure tolerance 1", lambda: autopilot_tolerates_one(a, cwd), 90)
    clock.mark(f"node {leader} rejoined")

    # --- drain and resume of node 3 through its own port ----------------------------------------------
    out = sh(DRAIN3, cwd=cwd, timeout=60).stdout
    assert "drained" in out, out

    # node 1 lists its own replica, which may apply the drain a moment after the leader answered
    def drain_states() -> dict[int, str]:
        return {m["nodeId"]: m["drainState"] for m in ctl_json(1, "members list", cwd=cwd, timeout=20)}

    wait_for("node 1 sees node 3 drained", lambda: drain_states()[3] == "drained", 30)
    assert drain_states() == {1: "active", 2: "active", 3: "drained"}
    refused = ctl(
        3, "leases allocate --pool ue --holder imsi-003 --node-id 3", cwd=cwd, timeout=30, check=False
    )
    assert refused.returncode != 0 and "node_draining" in refused.stdout + refused.stderr, refused
    sh(RESUME3, cwd=cwd, timeout=60)
    wait_for(
        "node 3 active again",
        lambda: {m["drainState"] for m in ctl_json(2, "members list", cwd=cwd, timeout=20)} == {"active"},
        30,
    )
    third = ctl_json(3, "leases allocate --pool ue --holder imsi-003 --node-id 3", cwd=cwd, timeout=30)
    everything = {int(first["id"]), int(second["id"]), int(third["id"])}
    wait_leases_everywhere([1, 2, 3], everything, cwd)
    clock.mark("drain and resume")

    # --- down, up: the named volumes keep the cluster --------------------------------------------------
    sh(DOWN, cwd=cwd, timeout=180)
    assert [x for x in project_leftovers() if not x.startswith("volume")] == []
    sh(UP, cwd=cwd, timeout=180)
    assert sh(WAIT_INIT, cwd=cwd, timeout=330).stdout.strip() == "0"
    wait_for("three voters, one leader after up", lambda: three_voters_one_leader(cwd), 120)
    wait_for("autopilot healthy after up", lambda: autopilot_tolerates_one(1, cwd), 90)
    wait_leases_everywhere([1, 2, 3], everything, cwd)
    clock.mark("down and up: every lease still there")

    # --- down -v: nothing left --------------------------------------------------------------------------
    sh(DOWN_V, cwd=cwd, timeout=180)
    assert project_leftovers() == []
    clock.mark("down -v: clean")
