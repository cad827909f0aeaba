"""Backup and restore benchmark: archive size, backup and restore times, and the longest
event-loop stall of the serving node during a backup.

Target: a backup of a node holding 100,000 leases never stalls its event loop for more than 50 ms.

How it runs (the product's own modules and commands, nothing mocked):
1. offline, a ``StateMachine`` gets ``--leases`` real ``AllocateLease`` commands (owners 1..3 round
   robin, one IPv4 /8 pool, 3 members, an API token) and is written as a backup archive
   (``encode_archive``): the archive a 3-node cluster with that state would give;
2. ``quorumd backup verify`` and ``quorumd restore`` run on it (wall times); the restored node
   (a one-voter cluster) starts and is waited for until ready;
3. the event loop's stalls are measured twice. Inside the daemon (``QUORUMD_TEST_LOOP_PROBE``):
   a task sleeping 2 ms at a time records how late each wake-up is, in wall time and in CPU time
   of the loop's thread (the loop's own work, immune to the host's load; wall time adds waits
   for the GIL and time the process was not scheduled). From the outside: one keep-alive HTTPS
   connection sends ``GET /healthz`` back to back (a few hundred µs each when idle); the loop
   answers nothing while blocked, so the longest round trip in a window bounds the longest stall
   in it from above. Wall-time figures include the host's noise on a busy shared machine, so an
   idle baseline window is measured first;
4. ``GET /api/v1/backup`` is called ``--rounds`` times (the first right after the start, with the
   lease table's snapshot cache cold: the worst case; the others warm), each time recording wall
   time, size, whether the digest matches and the probe's longest round trip during the call;
5. with ``--writers`` > 0 the backups run while that many threads allocate leases;
6. with ``--via-follower`` a second node joins (promoted by autopilot and caught up before the
   rounds, with its own loop probe) and ``--rounds`` more backups are requested through it: the
   leader makes each archive and the follower relays it in chunks (``follower_rounds``: the
   stalls of both loops).

Run: ``.venv/bin/python bench/backup.py [--leases N] [--rounds R] [--writers W] [--via-follower]
[--dir DIR]`` (``make bench-backup`` runs 100,000 leases through the leader and through a
follower); prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from procs import free_port, stop_processes

from quorumd.api.ports import TokenRole
from quorumd.node.registry.apitoken import format_api_token, hash_secret
from quorumd.node.registry.archive import ArchiveHeader, encode_archive
from quorumd.node.registry.commands import (
    AllocateLease,
    CreateApiToken,
    CreatePool,
    MemberContext,
    SetClusterSecrets,
    encode_command,
    encode_member_context,
)
from quorumd.node.registry.records import SNAPSHOT_VERSION
from quorumd.node.registry.state import StateMachine
from quorumd.raft.core.types import ConfChange, ConfChangeType

_SSL = ssl.create_default_context()
_SSL.check_hostname = False
_SSL.verify_mode = ssl.CERT_NONE


def build_state(leases: int) -> tuple[StateMachine, str]:
    sm = StateMachine()
    index = 0
    for nid in (1, 2, 3):
        addr, api = f"10.0.0.{nid}:7000", f"https://10.0.0.{nid}:5002"
        ctx = MemberContext(addr, api, "bench", "sha256:" + "ab" * 32, "pem", None, 1.0)
        kind = ConfChangeType.PROMOTE if nid == 1 else ConfChangeType.ADD_NONVOTER
        index += 1
        sm.apply_conf_change(index, ConfChange(kind, nid, encode_member_context(ctx)))
    secret = b"s" * 32
    for cmd in (
        SetClusterSecrets(1.0, "bench0000000000000000000000000000", os.urandom(32)),
        CreateApiToken(1.0, "0123456789ab", "bench", TokenRole.ADMIN, hash_secret(secret), None),
        CreatePool(1.0, "bench", "10.0.0.0/8"),
    ):
        index += 1
        assert sm.apply(index, encode_command(cmd)).ok
    for i in range(leases):
        index += 1
        res = sm.apply(index, encode_command(AllocateLease(2.0, "bench", f"imsi-{i:09d}", 1 + i % 3)))
        assert res.ok, res
    return sm, format_api_token("0123456789ab", secret)


class LoopProbe:
    """Back-to-back GET /healthz on one keep-alive connection; (start, round trip) per request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoopProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=_SSL, timeout=10)
        conn.request("GET", "/healthz")  # connect and handshake outside the measured samples
        conn.getresponse().read()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            self.samples.append((t0, time.perf_counter() - t0))
        conn.close()

    def between(self, start: float, end: float) -> list[float]:
        """Round trips of the requests in flight at some point in [start, end]."""
        return [rt for t0, rt in list(self.samples) if t0 <= end and t0 + rt >= start]

    def worst_between(self, start: float, end: float) -> float:
        return max(self.between(start, end), default=0.0)


def profile_ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    xs = sorted(samples)
    pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2)  # noqa: E731
    return {"n": len(xs), "p50": pick(0.5), "p99": pick(0.99), "max": round(xs[-1] * 1000, 2)}


def max_lag(path: Path, start: float, end: float) -> dict[str, float]:
    """Largest wall lag and loop-thread CPU the daemon's own probe (QUORUMD_TEST_LOOP_PROBE)
    recorded in [start, end] (a record is written when the late wake-up happens)."""
    wall = cpu = 0.0
    if path.exists():
        for line in path.read_text().splitlines():
            t, lag, used = (float(x) for x in line.split())
            if start <= t <= end + 0.05:
                wall, cpu = max(wall, lag), max(cpu, used)
    return {"wall_ms": wall, "cpu_ms": cpu}


def get_json(port: int, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_SSL, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body)
        headers["Content-Type"] = "application/json"
    try:
        conn.request("POST" if body is not None else "GET", path, data, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def wait_until(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling interval of a bounded wait


def fetch_backup(port: int, token: str) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_SSL, timeout=120)
    conn.request("GET", "/api/v1/backup", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, dict(resp.getheaders())


def writer(port: int, token: str, stop: threading.Event, counter: list[int], seed: int) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_SSL, timeout=30)
    i = 0
    while not stop.is_set():
        i += 1
        body = json.dumps({"pool": "bench", "holder": f"w{seed}-{i}"})
        conn.request("POST", "/api/v1/leases", body, {"Authorization": f"Bearer {token}",
                                                       "Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        resp.read()
        if resp.status in (200, 201):
            counter[0] += 1
    conn.close()


def join_follower(directory: Path, leader_api: int, leader_raft: int, admin: str,
                  procs: list[subprocess.Popen[bytes]]) -> tuple[int, Path]:  # fmt: skip
    """Node 2 joined to the restored node, a voter and caught up: (its API port, its probe file)."""
    status, body = get_json(leader_api, "/api/v1/cluster/pki/join-tokens", admin, {"nodeID": 2})
    assert status == 201, body
    token_file = directory / "node2.join-token"
    token_file.write_text(body["result"]["token"] + "\n")
    api_port, raft_port = free_port(), free_port()
    cfg = directory / "node2.yaml"
    cfg.write_text(yaml.safe_dump({
        "data-dir": str(directory / "data2"),
        "api": {"address": "127.0.0.1", "port": api_port},
        "cluster": {"node-id": 2, "bind-address": f"127.0.0.1:{raft_port}",
                    "peers": [f"127.0.0.1:{leader_raft}"], "join-token-file": str(token_file)},
    }))  # fmt: skip
    lag_file = directory / "loop-lag-2.txt"
    log = open(directory / "node2.log", "wb")  # noqa: SIM115 - inherited by the child
    env = {**os.environ, "QUORUMD_TEST_LOOP_PROBE": str(lag_file)}
    procs.append(subprocess.Popen([sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(cfg)],
                                  stdout=log, stderr=log, env=env))  # fmt: skip
    log.close()

    def caught_up() -> bool:
        s0, members = get_json(leader_api, "/api/v1/cluster/members", admin)
        s1, lead = get_json(leader_api, "/api/v1/status")
        s2, me = get_json(api_port, "/api/v1/status")
        voter = s0 == 200 and any(m["nodeId"] == 2 and m["suffrage"] == "voter" for m in members["result"])
        return (
            voter
            and s1 == s2 == 200
            and me["result"]["ready"]
            and (me["result"]["appliedIndex"] >= lead["result"]["commitIndex"])
        )

    # Promoted by autopilot, then caught up: the join's own work (the snapshot sent and
    # installed, the promotion) is over before the measured rounds start.
    wait_until("node 2 a voter, caught up", caught_up, 600)
    return api_port, lag_file


def run(leases: int, rounds: int, writers: int, directory: Path, via_follower: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"leases": leases, "host_cpus": os.cpu_count()}
    t0 = time.perf_counter()
    sm, token = build_state(leases)
    out["build_state_s"] = round(time.perf_counter() - t0, 2)
    cid = sm.cluster_id or ""
    header = ArchiveHeader(cid, sm.applied_index, 1, time.time(), 1, "bench", SNAPSHOT_VERSION)
    t0 = time.perf_counter()
    data, _ = encode_archive(header, sm.snapshot())
    out["encode_archive_s"] = round(time.perf_counter() - t0, 3)
    archive = directory / "bench.backup"
    archive.write_bytes(data)
    out["archive_bytes"] = len(data)
    out["archive_bytes_per_lease"] = round(len(data) / max(1, leases), 1)
    del sm

    cli = [sys.executable, "-m", "quorumd.node.cli"]
    t0 = time.perf_counter()
    res = subprocess.run(
        [*cli, "backup", "verify", str(archive)], capture_output=True, text=True, timeout=600, check=False
    )
    out["verify_s"] = round(time.perf_counter() - t0, 2)
    assert res.returncode == 0, res.stderr

    api_port, raft_port = free_port(), free_port()
    cfg = directory / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "data-dir": str(directory / "data"),
        "api": {"address": "127.0.0.1", "port": api_port},
        "cluster": {"node-id": 1, "bind-address": f"127.0.0.1:{raft_port}"},
    }))  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run([*cli, "restore", "--config", str(cfg), "--from", str(archive)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    out["restore_s"] = round(time.perf_counter() - t0, 2)
    assert res.returncode == 0, res.stderr
    admin = (directory / "data" / "admin.token").read_text().strip()

    log = open(directory / "node.log", "wb")  # noqa: SIM115 - inherited by the child
    lag_file = directory / "loop-lag.txt"
    env = {**os.environ, "QUORUMD_TEST_LOOP_PROBE": str(lag_file)}
    proc = subprocess.Popen([*cli, "run", "--config", str(cfg)], stdout=log, stderr=log, env=env)
    procs = [proc]
    try:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", api_port, context=_SSL, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the restored node did not become ready")
            time.sleep(0.05)  # polling interval of a bounded wait
        out["restored_node_ready_s"] = round(time.perf_counter() - t0, 2)

        probe = LoopProbe(api_port).start()
        idle_start, idle_wall = time.perf_counter(), time.time()
        time.sleep(5.0)  # the idle baseline window: what the host's own noise looks like
        out["probe_idle_ms"] = profile_ms(probe.between(idle_start, time.perf_counter()))
        out["loop_lag_idle_ms"] = max_lag(lag_file, idle_wall, time.time())
        stop = threading.Event()
        counter = [0]
        threads = [threading.Thread(target=writer, args=(api_port, admin, stop, counter, w), daemon=True)
                   for w in range(writers)]  # fmt: skip
        for t in threads:
            t.start()
        results = []
        in_backups: list[float] = []
        for r in range(rounds):
            start, wall = time.perf_counter(), time.time()
            status, body, headers = fetch_backup(api_port, token if r % 2 else admin)
            end, wall_end = time.perf_counter(), time.time()
            assert status == 200, (status, body[:200])
            results.append({
                "round": r,
                "cache": "cold" if r == 0 else "warm",
                "seconds": round(end - start, 3),
                "bytes": len(body),
                "index": int(headers["X-Quorumd-Backup-Index"]),
                "digest_ok": headers["X-Quorumd-Backup-Sha256"] == hashlib.sha256(body).hexdigest(),
                "probe_worst_ms": round(probe.worst_between(start, end) * 1000, 2),
                "loop_lag_max_ms": max_lag(lag_file, wall, wall_end),
            })  # fmt: skip
            in_backups += probe.between(start, end)
            time.sleep(0.5)  # spacing between rounds, so each window is its own
        stop.set()
        for t in threads:
            t.join(30)
        probe.stop()
        out["writes_during_backups"] = counter[0]
        out["rounds"] = results
        out["probe_during_backups_ms"] = profile_ms(in_backups)
        out["worst_probe_ms"] = max(x["probe_worst_ms"] for x in results)
        out["worst_loop_lag_wall_ms"] = max(x["loop_lag_max_ms"]["wall_ms"] for x in results)
        out["worst_loop_lag_cpu_ms"] = max(x["loop_lag_max_ms"]["cpu_ms"] for x in results)
        out["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        out["probe_requests"] = len(probe.samples)
        lines = [x for x in (directory / "node.log").read_text().splitlines() if "backup_taken" in x]
        out["daemon_log"] = lines[-rounds:]
        if via_follower:
            out.update(relay_rounds(directory, api_port, raft_port, admin, lag_file, rounds, procs))
    finally:
        stop_processes(procs, 15)
        log.close()
    return out


def relay_rounds(directory: Path, api_port: int, raft_port: int, admin: str, lag_file: Path, rounds: int,
                 procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:  # fmt: skip
    """Step 6 of the module docstring."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    port2, lag_file2 = join_follower(directory, api_port, raft_port, admin, procs)
    out["follower_caught_up_s"] = round(time.perf_counter() - t0, 1)
    probe = LoopProbe(port2).start()
    idle_start, idle_wall = time.perf_counter(), time.time()
    time.sleep(3.0)  # the follower's idle baseline window
    out["follower_probe_idle_ms"] = profile_ms(probe.between(idle_start, time.perf_counter()))
    out["follower_loop_lag_idle_ms"] = max_lag(lag_file2, idle_wall, time.time())
    results = []
    for r in range(rounds):
        start, wall = time.perf_counter(), time.time()
        status, body, headers = fetch_backup(port2, admin)
        end, wall_end = time.perf_counter(), time.time()
        assert status == 200, (status, body[:200])
        results.append({
            "round": r,
            "seconds": round(end - start, 3),
            "bytes": len(body),
            "digest_ok": headers["X-Quorumd-Backup-Sha256"] == hashlib.sha256(body).hexdigest(),
            "follower_probe_worst_ms": round(probe.worst_between(start, end) * 1000, 2),
            "follower_loop_lag_max_ms": max_lag(lag_file2, wall, wall_end),
            "leader_loop_lag_max_ms": max_lag(lag_file, wall, wall_end),
        })  # fmt: skip
        time.sleep(0.5)  # spacing between rounds, so each window is its own
    probe.stop()
    out["follower_rounds"] = results
    for who in ("follower", "leader"):
        for kind in ("cpu_ms", "wall_ms"):
            worst = max(x[f"{who}_loop_lag_max_ms"][kind] for x in results)
            out[f"relay_worst_{who}_loop_lag_{kind}"] = worst
    relayed = [x for x in (directory / "node2.log").read_text().splitlines() if "backup_relayed" in x]
    out["follower_log"] = relayed[-rounds:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--leases", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--writers", type=int, default=0)
    p.add_argument("--via-follower", action="store_true")
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    if a.dir:
        directory = Path(a.dir)
        directory.mkdir(parents=True, exist_ok=False)
        print(json.dumps(run(a.leases, a.rounds, a.writers, directory, a.via_follower), indent=2))
    else:
        with tempfile.TemporaryDirectory(prefix="qd-bench-backup-") as tmp:
            print(json.dumps(run(a.leases, a.rounds, a.writers, Path(tmp), a.via_follower), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
