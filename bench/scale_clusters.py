"""Clusters and measurements for the scale benchmark (bench/scale.py).

- ``grown_cluster``: a 3-voter quorumd cluster holding N leases. The state is written offline
  with the product's own modules by bench/startup.py's ``generate`` (N real ``AllocateLease``
  commands in the log, the driver's snapshot sequence, a tail of allocate/release pairs after
  the last snapshot that every node replays at startup); then the three nodes start at once.
  Driving a million allocations through the API would take ~5 minutes here, and the figures
  measured afterwards are those of a node whose state came from its log and snapshot either way.
- ``voters_cluster``: an empty quorumd cluster of N voters (autopilot promotes the joiners), or 3
  voters plus nonvoters (autopilot promotion pushed out to 24 h, two joiners promoted by hand).
- ``etcd_cluster``: etcd with N members, client and peer TLS (bench/etcd_tls.py).
- ``Target``: one system to drive with wrk at 64 clients, recording the leader's CPU per
  acknowledged write; ``list_latency`` (``GET /api/v1/leases?limit=1000`` over one kept-alive
  HTTPS connection), ``catch_up`` (a new node joins and catches up by snapshot), ``profile``
  (py-spy on the leader during a write run).
Every wait is bounded; every process started here is stopped by the caller's ``close``.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_tls import BODY as ETCD_BODY
from etcd_tls import EtcdTls
from procs import proc_cpu_s
from run import KeepAlive, wait_quiet
from startup import POOL, form_cluster, generate, log_breakdown, proc_mem_mb, single_restart, start_and_probe
from wrk import run_wrk

from quorumd.node.config.schema import load_config
from tests.cluster import Cluster, wait_for

PRODUCTION_TIMING = {"heartbeat-interval": "100ms", "election-timeout": "1000ms"}
CONCURRENCY = 64


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _pids(c: Cluster) -> dict[int, int]:
    return {n: node.proc.pid for n, node in c.nodes.items() if node.proc is not None and node.alive()}


def mem(c: Cluster) -> dict[str, dict[str, float]]:
    """VmRSS and VmHWM (MB) of every running node."""
    out = {}
    for n, pid in _pids(c).items():
        with contextlib.suppress(OSError):
            out[str(n)] = proc_mem_mb(pid)
    return out


def lease_count(c: Cluster) -> int:
    return int(c.ok(c.wait_leader(), "GET", f"/api/v1/pools/{POOL}")["allocated"])


# --- clusters ---------------------------------------------------------------------------------------
def grown_cluster(work: Path, leases: int) -> tuple[Cluster, dict[str, Any]]:
    """A running 3-voter cluster holding ``leases`` leases in pool ``bench`` (see the module docstring)."""
    d = Path(tempfile.mkdtemp(prefix=f"scale-{leases}-", dir=work))
    t = time.perf_counter()
    c = form_cluster(d)
    info: dict[str, Any] = {"leases": leases}
    try:
        if leases:
            cfg = load_config(c.nodes[1].config_path)
            threshold, trailing = cfg.cluster.snapshot_threshold, cfg.cluster.trailing_logs
            c.close()
            gen = generate(
                {n: node.data_dir for n, node in c.nodes.items()},
                leases=leases,
                log_index=leases + 3 * threshold + 1000,
                snapshot_threshold=threshold,
                trailing_logs=trailing,
                tail=threshold - 1,
            )
            info["snapshot_mb"] = round(gen.snapshot_bytes / 2**20, 1)
            info["generate_s"] = round(time.perf_counter() - t, 1)
            probes, logs = start_and_probe(c, sorted(c.nodes))
            info["startup_three_at_once_s"] = {str(n): p.ready_s for n, p in probes.items()}
            info["startup_log_breakdown_s"] = logs
            errors = {n: p.error for n, p in probes.items() if p.error}
            if errors:
                raise RuntimeError(f"nodes did not become ready: {errors}")
        info["leases_at_start"] = lease_count(c)
        info["mem_at_ready_mb"] = mem(c)
    except BaseException:
        c.close()
        raise
    return c, info


def voters_cluster(work: Path, voters: int, nonvoters: int = 0) -> Cluster:
    """An empty cluster of ``voters`` voters and ``nonvoters`` nonvoters with pool ``bench``."""
    d = Path(tempfile.mkdtemp(prefix=f"scale-v{voters}n{nonvoters}-", dir=work))
    overrides: dict[str, Any] = dict(PRODUCTION_TIMING)
    if nonvoters:  # autopilot would promote every healthy nonvoter after the stabilization time
        overrides["autopilot"] = {"server-stabilization-time": "24h"}
    c = Cluster(d, voters + nonvoters, cluster_overrides=overrides)
    try:
        c.form(voters=not nonvoters)
        if nonvoters:
            wait_for("every member", lambda: len(c.members()) == voters + nonvoters, 120)
            for nid in range(2, voters + 1):
                wait_for(f"promote {nid}", lambda nid=nid: _promote(c, nid), 60)  # type: ignore[misc]
            c.wait_voters(set(range(1, voters + 1)), 60)
        lead = c.wait_leader()
        c.ok(lead, "POST", "/api/v1/pools", {"name": POOL, "cidr": "10.0.0.0/8"})
    except BaseException:
        c.close()
        raise
    return c


def _promote(c: Cluster, nid: int) -> bool:
    status, body, _ = c.api(c.wait_leader(), "POST", f"/api/v1/cluster/members/{nid}/promote")
    return status < 300 or (status == 409 and "already_voter" in str(body))


def etcd_cluster(members: int) -> EtcdTls:
    e = EtcdTls(members)
    try:
        e.start()
        e.leader()
    except BaseException:
        e.stop()
        raise
    return e


# --- driving ----------------------------------------------------------------------------------------
@dataclass
class Target:
    """One system under test: a quorumd cluster or an etcd cluster."""

    name: str
    cluster: Cluster | None = None
    etcd: EtcdTls | None = None
    runs: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        if self.cluster is not None:
            return {str(n): pid for n, pid in _pids(self.cluster).items()}
        assert self.etcd is not None
        return {f"n{i}": p.pid for i, p in enumerate(self.etcd.procs) if p.poll() is None}

    def leader(self) -> tuple[str, str, int]:
        """(URL to POST to, leader name, leader pid)."""
        if self.cluster is not None:
            lead = self.cluster.wait_leader()
            node = self.cluster.nodes[lead]
            assert node.proc is not None
            return f"{node.api}/api/v1/leases", str(lead), node.proc.pid
        assert self.etcd is not None
        i = self.etcd.leader()
        return self.etcd.url(i, "/v3/kv/put"), f"n{i}", self.etcd.procs[i].pid

    def drive(self, seconds: float, concurrency: int = CONCURRENCY) -> dict[str, Any]:
        """wrk for ``seconds``; the leader's and every member's CPU per acknowledged write."""
        url, lead, _ = self.leader()
        pids = self.pids()
        self.runs += 1
        cpu0 = {k: _cpu(p) for k, p in pids.items()}
        if self.cluster is not None:  # new holders each run: every write adds a lease
            body = '{"pool":"' + POOL + '","holder":"r' + str(self.runs) + '-$key"}'
            r = run_wrk(url, body, concurrency, seconds, auth=self.cluster.token)
        else:
            r = run_wrk(url, ETCD_BODY, concurrency, seconds, ok_substring="revision")
        cpu1 = {k: _cpu(p) for k, p in pids.items()}
        ok = max(1, int(r.get("ok", 0)))
        cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in pids}
        out = {k: r.get(k) for k in ("throughput_ok_per_s", "p50_ms", "p99_ms", "errors", "ok")}
        out.update(
            leader=lead,
            cpu_s=cpu,
            leader_cpu_us_per_write=round(1e6 * cpu[lead] / ok, 1),
            all_cpu_us_per_write=round(1e6 * sum(cpu.values()) / ok, 1),
        )
        if "error" in r:
            out["error"] = r["error"]
        out["settle_s"] = wait_quiet(list(pids.values()))
        self.results.append(out)
        return out

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            shutil.rmtree(self.cluster.directory, ignore_errors=True)
        if self.etcd is not None:
            self.etcd.stop()


def _cpu(pid: int) -> float:
    try:
        return proc_cpu_s(pid)
    except OSError:
        return 0.0


def rounds(targets: list[Target], n: int, seconds: float) -> list[dict[str, dict[str, Any]]]:
    """``n`` rounds; each drives every target once, the order rotated by one each round, so every
    system comes first, middle and last; per round one dict target name -> its run."""
    out = []
    for i in range(n):
        k = i % len(targets)
        order = targets[k:] + targets[:k]
        row: dict[str, dict[str, Any]] = {}
        for t in order:
            row[t.name] = t.drive(seconds)
            log(f"round {i + 1} {t.name}: {row[t.name]['throughput_ok_per_s']} ok/s "
                f"leader CPU {row[t.name]['leader_cpu_us_per_write']} us/write")  # fmt: skip
        out.append(row)
    return out


# --- other measurements --------------------------------------------------------------------------
def list_latency(c: Cluster, requests: int = 200) -> dict[str, Any]:
    """``GET /api/v1/leases?limit=1000`` on the leader over one kept-alive HTTPS connection: the
    first page, and pages at spread ``after`` values; p50/p90 in ms."""
    lead = c.wait_leader()
    ka = KeepAlive(c.nodes[lead].api, c.token)
    try:
        n = lease_count(c)
        out: dict[str, Any] = {"leases": n}
        spread = [k * n // requests for k in range(requests)]
        for name, afters in (("first_page", [None] * requests), ("spread", spread)):
            times: list[float] = []
            for after in afters:
                path = "/api/v1/leases?limit=1000" + ("" if after is None else f"&after={after}")
                t0 = time.perf_counter()
                status, body = ka.call("GET", path, timeout=10.0)
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status} {str(body)[:200]}")
            times.sort()
            out[f"{name}_p50_ms"] = round(1000 * statistics.median(times), 2)
            out[f"{name}_p90_ms"] = round(1000 * times[int(0.9 * len(times))], 2)
        return out
    finally:
        ka.close()


def list_latency_wrk(c: Cluster, seconds: float = 5.0) -> dict[str, Any]:
    """The same first page driven by wrk, one connection (a C client: no JSON parsing in the
    client's time): p50/p90 in ms and pages per second."""
    url = f"{c.nodes[c.wait_leader()].api}/api/v1/leases?limit=1000"
    argv = ["wrk", "-t1", "-c1", f"-d{max(1, round(seconds))}s", "--latency", "-H",
            f"Authorization: Bearer {c.token}", url]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False).stdout
    res: dict[str, Any] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            res[f"p{parts[0][:-1]}_ms"] = _ms(parts[1])
        elif line.startswith("Requests/sec:"):
            res["pages_per_s"] = float(parts[1])
        elif "Non-2xx" in line:
            res["errors"] = int(parts[-1])
    return res or {"error": out[-500:]}


def _ms(text: str) -> float:
    """wrk's latency text (``812.00us``, ``5.10ms``, ``1.20s``) in ms."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * scale, 3)
    return float("nan")


def catch_up(c: Cluster, node_id: int, timeout: float = 120.0) -> dict[str, Any]:
    """Start a new node and time it from its process start until it has applied the leader's
    commit index of that moment; says whether it installed a snapshot."""
    lead = c.wait_leader()
    node = c.nodes.get(node_id) or c.make_node(node_id)
    token = wait_for(f"join token for {node_id}", lambda: c.mint(node_id))
    c.write_config(node, join_token=token)
    target = int(c.status(lead)["commitIndex"])
    offset = node.log_path.stat().st_size if node.log_path.exists() else 0
    t0, started = time.perf_counter(), time.time()
    c.start(node)

    def applied() -> bool:
        try:
            return int(c.status(node_id)["appliedIndex"]) >= target
        except Exception:  # not serving yet
            return False

    wait_for(f"node {node_id} caught up", applied, timeout, interval=0.05)
    secs = time.perf_counter() - t0
    text = node.log_text()[offset:]
    out = {
        "seconds": round(secs, 2),
        "target_index": target,
        "by_snapshot": "state_restored" in text,
        "cpu_s": _cpu(node.proc.pid) if node.proc is not None else None,
        "mem_mb": mem(c).get(str(node_id)),
        "log_breakdown_s": log_breakdown(text, started),
    }
    c.stop(node_id)  # the measured cluster stays as it was (the member is left in, stopped)
    return out


def restart_one(c: Cluster) -> dict[str, Any]:
    """One follower restarted while the other two run (bench/startup.py's single restart)."""
    return single_restart(c, 3)


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (GIL-holding samples, raw collapsed stacks) on ``pid`` for ``seconds``, started in
    the background; None when py-spy is missing."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--gil",
            "--rate", "200", "--format", "raw", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Shares of GIL-holding samples: each leaf function's own, and per product area inclusive."""
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    area_of = (
        ("snapshot", ("snapshot", "packed_dump", "save_snapshot", "write_snapshot")),
        ("storage/WAL", ("raft/aio/storage", "raft/aio/wal", "fdretry")),
        ("raft core", ("raft/core/",)),
        ("raft driver", ("raft/aio/driver",)),
        ("cluster transport", ("raft/aio/transport",)),
        ("lease table", ("node/registry/leases", "node/registry/lease_store")),
        ("state machine", ("node/registry/",)),
        ("API", ("api/", "aiohttp")),
        ("gc", ("gc_collect", "(garbage collection)")),
    )
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            k = int(count)
            total += k
            frames = stack.split(";")
            own[frames[-1]] += k
            for area, needles in area_of:
                if any(nd in stack for nd in needles):
                    areas[area] += k
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "areas_inclusive_pct": {a: round(100 * v / total, 1) for a, v in areas.most_common()},
        "top_own_pct": [[f, round(100 * v / total, 1)] for f, v in own.most_common(top)],
    }


def profiled_drive(t: Target, seconds: float, out: Path) -> dict[str, Any]:
    """One extra write run of ``t`` with py-spy on its leader."""
    _, _, pid = t.leader()
    spy = profile(pid, seconds, out)
    res = t.drive(seconds)
    if spy is not None:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    res["profile"] = summarize_profile(out) if spy is not None else {"error": "py-spy not installed"}
    res["profile_file"] = out.name
    return res
