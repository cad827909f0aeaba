"""The three-host systemd walk-through of docs/operations.md, for real (``make systemd-test``).

Three containers boot systemd as PID 1 from the debootstrapped Debian base (quorumd-host:bookworm,
deploy/image/host.Dockerfile) on a docker network 10.0.0.0/24 that the test creates, as hosts
``q1`` 10.0.0.1, ``q2`` 10.0.0.2 and ``q3`` 10.0.0.3: the addresses of the docs. The commands of the
docs' section are the constants below (the test checks first that the docs show exactly them), run
on the hosts the docs say, in the documented order; only the copying between machines (the docs:
"copy ... to every host") is ``docker cp``. The configurations are the docs' YAML blocks. Checks:

- the shipped unit and sysusers file install as documented; ``systemctl enable --now`` returns only
  after READY=1: right after it returns, ``/readyz`` answers 200 (the founder serves and leads, a
  joiner has joined and caught up) and the unit is ``active``;
- three voters, one leader, autopilot healthy with failure tolerance 1; ``/readyz`` on every host;
  ``systemctl status`` active (running); the watchdog armed (``WatchdogUSec=30s``) and fed (its
  timestamp moves);
- ``systemctl stop`` on the leader exits 0 within ``TimeoutStopSec`` with a clean exit, after
  handing leadership over (``leader_transfer_start`` in its journal, another node leads at once);
  ``systemctl start`` brings it back and it rejoins;
- a mistake in the configuration: ``systemctl start`` fails, the daemon exited 2, the journal
  names the key, and systemd does not restart it (``NRestarts=0`` after several ``RestartSec``);
  fixed, it starts again.

Leftovers of a killed earlier run are removed first; containers and network are removed at the
end, also when the test fails. Skipped unless ``QUORUMD_DOCKER_TESTS=1``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker_support import REPO, Stopwatch, doc_blocks, doc_commands, sh, skip_unless_docker, wait_for

pytestmark = [skip_unless_docker, pytest.mark.timeout(1200)]

DOC_HEADING = "### systemd on three hosts"
IMAGE = "quorumd-host:bookworm"
NETWORK = "quorumd-systemd-test"
LABEL = "quorumd.test=systemd"
HOSTS = {1: "q1", 2: "q2", 3: "q3"}
ADDR = {1: "10.0.0.1", 2: "10.0.0.2", 3: "10.0.0.3"}
RUN_FLAGS = (
    "--cap-add SYS_ADMIN --security-opt seccomp=unconfined --cgroupns=host "
    "-v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock"
)

# The docs' section, command for command (tests/test_deploy_docs.py checks it in `make test` too).
BUILD_WHEELS = "pip wheel . -w build/wheels"
INSTALL = [
    "python3 -m venv /opt/quorumd && /opt/quorumd/bin/pip install --no-index --find-links wheels quorumd",
    "ln -s /opt/quorumd/bin/quorumd /opt/quorumd/bin/quorumctl /usr/local/bin/",
    "install -D -m 0644 deploy/systemd/quorumd.sysusers.conf /etc/sysusers.d/quorumd.conf"
    " && systemd-sysusers",
    "install -m 0644 deploy/systemd/quorumd.service /etc/systemd/system/ && systemctl daemon-reload",
    "install -d -m 0750 -g quorumd /etc/quorumd",
]
INSTALL_CONFIG = "install -m 0640 -g quorumd quorumd.yaml /etc/quorumd/quorumd.yaml"
ENABLE = "systemctl enable --now quorumd"
JOURNAL = "journalctl -u quorumd -n 20"
BRINGUP = (
    "python3 deploy/compose/bringup.py --endpoint https://10.0.0.1:5002"
    " --token-file /var/lib/quorumd/admin.token --cacert /var/lib/quorumd/tls/api.crt"
    " --node-ids 2,3 --out-dir join"
)
INSTALL_TOKEN = "install -m 0640 -g quorumd node2.token /etc/quorumd/join.token && rm node2.token"  # q2
SPENT = "sed -i '/join-token-file/d' /etc/quorumd/quorumd.yaml && rm /etc/quorumd/join.token"
DELETE_MINTED = "rm -r join"
CTL = (
    "quorumctl --endpoint https://10.0.0.1:5002 --cacert /var/lib/quorumd/tls/api.crt"
    " --token-file /var/lib/quorumd/admin.token"
)
MEMBERS = f"{CTL} members list"
AUTOPILOT = f"{CTL} autopilot"
READYZ = "curl -sf --cacert /var/lib/quorumd/tls/api.crt https://127.0.0.1:5002/readyz"
STATUS = "systemctl status quorumd"
WATCHDOG = "systemctl show quorumd -p WatchdogUSec -p WatchdogTimestamp"
STOP = "systemctl stop quorumd"
START = "systemctl start quorumd"
SHOW_FAILED = "systemctl show quorumd -p ExecMainStatus -p NRestarts"
JOURNAL_5 = "journalctl -u quorumd -n 5"
DOC_COMMANDS = [
    BUILD_WHEELS, *INSTALL, INSTALL_CONFIG, ENABLE, JOURNAL, BRINGUP, INSTALL_TOKEN, ENABLE, SPENT,
    DELETE_MINTED, MEMBERS, AUTOPILOT, READYZ, STATUS, WATCHDOG,
    STOP, START,
    START, SHOW_FAILED, JOURNAL_5,
]  # fmt: skip


def container(node: int) -> str:
    return f"quorumd-{HOSTS[node]}"


def on(node: int, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``command`` as root in root's home directory of host ``node``, bounded in time."""
    argv = ["docker", "exec", "-w", "/root", container(node), "bash", "-o", "pipefail", "-c", command]
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    print(f"{HOSTS[node]}# {command}  -> {res.returncode} ({time.monotonic() - started:.1f}s)", flush=True)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{HOSTS[node]}: {command!r} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def put(node: int, path: str, text: str) -> None:
    subprocess.run(
        ["docker", "exec", "-i", container(node), "sh", "-c", f"cat > {path}"],
        input=text, text=True, check=True, timeout=30, capture_output=True,
    )  # fmt: skip


def show(node: int, *props: str) -> dict[str, str]:
    out = on(node, "systemctl show quorumd " + " ".join(f"-p {p}" for p in props), timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def ctl_json(node: int, args: str) -> Any:
    """quorumctl on q1 (which holds the admin token) against node ``node``'s API (the test's own
    probes, not a documented step: without certificate checks, which the docs' commands make)."""
    endpoint = f"https://{ADDR[node]}:5002"
    command = (
        f"quorumctl --endpoint {endpoint} --insecure --token-file /var/lib/quorumd/admin.token {args} -o json"
    )
    return json.loads(on(1, command, timeout=30).stdout)


def remove_hosts() -> None:
    """The test's containers and network, whatever state a run left them in (bounded; never raises)."""
    try:
        sh(f"docker ps -aq --filter label={LABEL} | xargs -r docker rm -f", timeout=120, check=False)
        sh(
            f"docker network ls -q --filter label={LABEL} | xargs -r docker network rm",
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        print(f"cleanup timed out: {exc}")


@pytest.fixture
def hosts() -> Iterator[None]:
    remove_hosts()  # a run that was killed may have left its containers
    try:
        sh(f"docker image inspect {IMAGE} >/dev/null", timeout=30)
        sh(
            f"docker network create --label {LABEL} --subnet 10.0.0.0/24 --gateway 10.0.0.254 {NETWORK}",
            timeout=60,
        )
        for node in HOSTS:
            sh(
                f"docker run -d --name {container(node)} --hostname {HOSTS[node]} --label {LABEL}"
                f" --network {NETWORK} --ip {ADDR[node]} {RUN_FLAGS} {IMAGE}",
                timeout=60,
            )
        for node in HOSTS:

            def booted(n: int = node) -> str:
                res = on(n, "systemctl is-system-running --wait", timeout=60, check=False)
                return res.stdout.strip() if res.stdout.strip() in ("running", "degraded") else ""

            if wait_for(f"systemd on {HOSTS[node]} booted", booted, 90) == "degraded":
                print(on(node, "systemctl --failed --no-legend", check=False).stdout)
        yield
    finally:
        for node in HOSTS:
            with contextlib.suppress(subprocess.TimeoutExpired):
                on(node, "journalctl -u quorumd -n 30 --no-pager", timeout=30, check=False)
        remove_hosts()


def q3_config(q2_yaml: str) -> str:
    """The docs: q3 is q2's configuration with node-id 3, its own address, q1 and q2 as peers."""
    text = q2_yaml.replace("node-id: 2", "node-id: 3").replace("10.0.0.2:7000", "10.0.0.@:7000")
    return text.replace("10.0.0.3:7000", "10.0.0.2:7000").replace("10.0.0.@:7000", "10.0.0.3:7000")


def enable_returns_ready(node: int) -> None:
    """``systemctl enable --now`` returns after READY=1: at that instant the node is ready."""
    on(node, ENABLE, timeout=200)
    assert show(node, "ActiveState")["ActiveState"] == "active"
    on(node, READYZ, timeout=10)  # no wait: READY=1 came after the API served and the node joined


def three_voters(node: int = 1) -> bool:
    members = ctl_json(node, "members list")
    return len(members) == 3 and all(m["suffrage"] == "voter" for m in members)


def autopilot_tolerates_one(node: int = 1) -> bool:
    ap = ctl_json(node, "autopilot")
    return bool(ap["healthy"] and ap["failureTolerance"] == 1)


def server_healthy(via: int, node: int) -> bool:
    """Whether the leader's autopilot (asked through ``via``) counts ``node`` healthy."""
    servers = {int(srv["nodeId"]): srv for srv in ctl_json(via, "autopilot")["servers"]}
    return bool(servers[node]["healthy"])


def leader_seen_by(node: int) -> int:
    return int(ctl_json(node, "status")["leaderNodeId"] or 0)


def test_docs_systemd_section_is_what_this_test_runs() -> None:
    assert doc_commands(DOC_HEADING) == DOC_COMMANDS
    assert len(doc_blocks(DOC_HEADING, "yaml")) == 2


def test_systemd_walkthrough(hosts: None, tmp_path: Path) -> None:
    assert doc_commands(DOC_HEADING) == DOC_COMMANDS
    q1_yaml, q2_yaml = doc_blocks(DOC_HEADING, "yaml")
    configs = {1: q1_yaml, 2: q2_yaml, 3: q3_config(q2_yaml)}
    for node, text in configs.items():
        cfg = yaml.safe_load(text)["cluster"]
        assert cfg["node-id"] == node and cfg["advertise-address"] == f"{ADDR[node]}:7000"
        assert sorted(cfg["peers"]) == [f"{ADDR[n]}:7000" for n in HOSTS if n != node]
    clock = Stopwatch()

    # 1. wheels, on the build machine (this checkout); copied to every host
    sh(BUILD_WHEELS, cwd=REPO, timeout=300)
    for node in HOSTS:
        sh(f"docker cp build/wheels {container(node)}:/root/wheels", cwd=REPO, timeout=60)
        sh(f"docker cp deploy {container(node)}:/root/deploy", cwd=REPO, timeout=60)
    clock.mark("wheels built and copied")

    # 2. install, on every host (in parallel: the hosts are independent)
    def install(node: int) -> None:
        for command in INSTALL:
            on(node, command, timeout=300)
        assert on(node, "id -u quorumd").stdout.strip().isdigit()
        assert on(node, "stat -c '%a %G' /etc/quorumd").stdout.split() == ["750", "quorumd"]

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(install, HOSTS))
    clock.mark("installed on three hosts")

    # 3. configuration of each host
    for node, text in configs.items():
        put(node, "/root/quorumd.yaml", text)
        on(node, INSTALL_CONFIG)
        assert on(node, "stat -c '%a %U %G' /etc/quorumd/quorumd.yaml").stdout.split() == [
            "640",
            "root",
            "quorumd",
        ]

    # 4. the founder
    enable_returns_ready(1)
    journal = on(1, JOURNAL).stdout
    assert "cluster_bootstrapped" in journal and "node_ready" in journal, journal
    admin = on(1, "cat /var/lib/quorumd/admin.token").stdout.strip()
    assert admin.startswith("qd_") and admin not in on(1, "journalctl -u quorumd --no-pager").stdout
    clock.mark("q1 founded the cluster")

    # 5. join tokens, minted on q1 and copied to their hosts
    res = on(1, BRINGUP, timeout=120)
    assert res.stdout == "" and "join token written" in res.stderr, res.stderr
    for node in (2, 3):
        assert on(1, f"stat -c %a join/node{node}.token").stdout.strip() == "600"
        sh(f"docker cp {container(1)}:/root/join/node{node}.token {tmp_path}/node{node}.token", timeout=30)
        sh(f"docker cp {tmp_path}/node{node}.token {container(node)}:/root/node{node}.token", timeout=30)
        on(node, INSTALL_TOKEN.replace("node2.token", f"node{node}.token"))

    # 6. the joiners, q2 then q3
    for node in (2, 3):
        enable_returns_ready(node)
        on(node, SPENT)
        assert (
            on(node, "grep -c join-token-file /etc/quorumd/quorumd.yaml", check=False).stdout.strip() == "0"
        )
        assert on(node, "stat -c '%a %G' /etc/quorumd/quorumd.yaml").stdout.split() == ["640", "quorumd"]
        assert on(node, "test -e /etc/quorumd/join.token", check=False).returncode == 1
    on(1, DELETE_MINTED)
    assert on(1, "test -e join", check=False).returncode == 1
    clock.mark("q2 and q3 joined")

    # 7. checks
    wait_for("three voters", three_voters, 90)
    wait_for("autopilot healthy, failure tolerance 1", autopilot_tolerates_one, 60)
    table = on(1, MEMBERS).stdout
    assert table.count("voter") >= 3 and table.count("active") >= 3, table
    assert on(1, AUTOPILOT).stdout.strip(), "autopilot printed nothing"
    fed_at: dict[int, str] = {}
    for node in HOSTS:
        assert on(node, READYZ).returncode == 0
        assert "active (running)" in on(node, STATUS).stdout
        watchdog = on(node, WATCHDOG).stdout
        assert "WatchdogUSec=30s" in watchdog, watchdog
        assert "WatchdogTimestamp=\n" not in watchdog + "\n", watchdog  # armed: a keep-alive was received
        fed_at[node] = show(node, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    clock.mark("three voters, autopilot healthy, every host ready")

    # stop on the leader: leadership handed over, exit 0 within TimeoutStopSec
    leader = leader_seen_by(1)
    assert leader in HOSTS
    others = [n for n in HOSTS if n != leader]
    started = time.monotonic()
    on(leader, STOP, timeout=60)
    took = time.monotonic() - started
    assert took < 45, f"systemctl stop took {took:.1f}s (TimeoutStopSec=45s)"
    stopped = show(leader, "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, stopped
    journal = on(leader, "journalctl -u quorumd -n 60 --no-pager").stdout
    assert "leader_transfer_start" in journal and "shutdown_done" in journal, journal
    new_leader = wait_for(
        "a new leader", lambda: leader_seen_by(others[0]) in others and leader_seen_by(others[0]), 10
    )
    clock.mark(f"stop of leader q{leader} took {took:.1f}s; q{new_leader} leads")
    wait_for(f"autopilot: q{leader} gone", lambda: not server_healthy(new_leader, leader), 30)
    on(leader, START, timeout=200)
    on(leader, READYZ, timeout=10)
    assert leader_seen_by(leader) == new_leader
    wait_for(f"q{leader} rejoined, healthy", lambda: server_healthy(new_leader, leader), 60)
    wait_for("autopilot healthy, failure tolerance 1", lambda: autopilot_tolerates_one(new_leader), 60)
    clock.mark("it rejoined")

    # the watchdog is fed: every host's keep-alive timestamp moved since (WatchdogSec/2 = 15 s)
    for node in others:
        wait_for(
            f"a new watchdog keep-alive on {HOSTS[node]}",
            lambda n=node: show(n, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != fed_at[n],
            30,
        )

    # a configuration mistake: start fails with exit code 2, no restart loop; fixed, it starts
    broken = 3 if leader_seen_by(1) != 3 else 2
    on(broken, STOP, timeout=60)
    on(broken, "printf 'cluster-size: 3\\n' >> /etc/quorumd/quorumd.yaml")
    res = on(broken, START, timeout=60, check=False)
    assert res.returncode != 0, res
    failed = on(broken, SHOW_FAILED).stdout
    assert "ExecMainStatus=2" in failed and "NRestarts=0" in failed, failed
    time.sleep(7)  # over three RestartSec=2s periods: a restart would have happened by now
    after = show(broken, "ActiveState", "ExecMainStatus", "NRestarts")
    assert after == {"ActiveState": "failed", "ExecMainStatus": "2", "NRestarts": "0"}, after
    assert "cluster-size" in on(broken, JOURNAL_5).stdout
    on(broken, "sed -i '/^cluster-size:/d' /etc/quorumd/quorumd.yaml")
    on(broken, START, timeout=200)
    on(broken, READYZ, timeout=10)
    wait_for(f"q{broken} healthy again", lambda: server_healthy(1, broken), 60)
    wait_for("every node healthy again", autopilot_tolerates_one, 60)
    clock.mark(f"bad config on q{broken}: exit 2, not restarted; fixed, back")
