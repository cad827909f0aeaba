"""quorumd benchmark (``make bench``): a 3-node cluster on loopback, production timing defaults,
fsync on, driven by the shared load generator (../shared/bench/loadgen.py) exactly like the peer
benchmarks, then the peers (etcd, PySyncObj) in the same run when available.

Measures: acknowledged POST /api/v1/leases per second and latency at 1, 16 and 64 clients;
failover (SIGKILL the leader -> first acknowledged write through a survivor, 5 tries); leadership
transfer through drain (drain call -> first write accepted by the new leader); follower-proxied vs
leader-direct autopilot latency; peak RSS per node. Writes bench/results/quorumd_<ts>.json and
BENCHMARKS.md (with the machine, the date and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster, http, wait_for  # noqa: E402


def shared_copy() -> Path:
    """The shared bench folder is read-only in CI: work on a private copy."""
    dst = Path(tempfile.mkdtemp(prefix="quorumd-bench-"))
    for f in SHARED.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def loadgen(bench: Path, url: str, token: str, concurrency: int, duration: float) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(bench / "loadgen.py"),
        "--url",
        url,
        "--method",
        "POST",
        "--header",
        f"Authorization: Bearer {token}",
        "--insecure",
        "--body",
        '{"pool":"bench","holder":"$key"}',
        "--key-template",
        "h$worker-$seq",
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--warmup",
        "1",
        "--timeout",
        "5",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": (out.stdout + out.stderr)[-2000:]}


def first_write_after(c: Cluster, nodes: list[int], t0: float, max_wait: float = 30.0) -> float:
    deadline = t0 + max_wait
    i = 0
    while time.monotonic() < deadline:
        nid = nodes[i % len(nodes)]
        i += 1
        try:
            st, _, _ = http(
                "POST",
                f"{c.nodes[nid].api}/api/v1/leases",
                c.token,
                {"pool": "bench", "holder": f"probe-{i}"},
                timeout=1.0,
            )
        except OSError:
            continue
        if st in (200, 201):
            return time.monotonic() - t0
    return float("nan")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_quorumd(bench: Path, duration: float, tries: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="quorumd-bench-cluster-"))
    c = Cluster(tmp, 3, cluster_overrides={"heartbeat-interval": "100ms", "election-timeout": "1000ms"})
    res: dict[str, Any] = {"system": "quorumd", "load": {}}
    try:
        c.form()
        lead = c.wait_leader()
        c.ok(lead, "POST", "/api/v1/pools", {"name": "bench", "cidr": "10.0.0.0/8"})
        for conc in (1, 16, 64):
            lead = c.wait_leader()
            r = loadgen(bench, f"{c.nodes[lead].api}/api/v1/leases", c.token, conc, duration)
            res["load"][str(conc)] = r
            print(
                f"quorumd c={conc}: {r.get('throughput_ok_per_s')} ok/s "
                f"p50={r.get('latency_ms', {}).get('p50')} ms"
            )
        # autopilot: leader-direct vs follower-proxied
        lead = c.wait_leader()
        follower = next(n for n in c.nodes if n != lead)
        for label, nid in (("leader", lead), ("follower", follower)):
            samples = []
            for _ in range(50):
                t = time.perf_counter()
                c.ok(nid, "GET", "/api/v1/cluster/autopilot")
                samples.append((time.perf_counter() - t) * 1000)
            res[f"autopilot_{label}_ms_p50"] = statistics.median(samples)
        res["rss_mb"] = {str(n): rss_mb(c.nodes[n].proc.pid) for n in c.nodes if c.nodes[n].proc}
        # failover
        failovers = []
        for _ in range(tries):
            lead = c.wait_leader()
            survivors = [n for n in c.nodes if n != lead]
            t0 = time.monotonic()
            c.kill(lead)
            failovers.append(first_write_after(c, survivors, t0))
            c.restart(lead)
            c.wait_ready(lead, 60)
            wait_for(
                "3 healthy", lambda: c.ok(c.wait_leader(), "GET", "/api/v1/cluster/autopilot")["healthy"], 60
            )
        res["failover_s"] = failovers
        # transfer through drain
        transfers, drain_calls = [], []
        for _ in range(tries):
            lead = c.wait_leader()
            others = [n for n in c.nodes if n != lead]
            t0 = time.monotonic()
            c.api(lead, "POST", f"/api/v1/cluster/members/{lead}/drain", {"deadlineSeconds": 0})
            drain_calls.append(time.monotonic() - t0)
            transfers.append(first_write_after(c, others, t0))
            c.ok(c.wait_leader(), "POST", f"/api/v1/cluster/members/{lead}/resume")
        res["transfer_s"] = transfers
        res["drain_call_s"] = drain_calls
    finally:
        c.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def run_peer(bench: Path, script: str) -> dict[str, Any] | None:
    if not (bench / script).exists():
        return None
    before = set((bench / "results").glob("*.json")) if (bench / "results").exists() else set()
    subprocess.run(["bash", str(bench / script)], timeout=900, check=False, cwd=bench)
    after = set((bench / "results").glob("*.json")) - before
    if not after:
        return None
    return dict(json.loads(max(after, key=lambda p: p.stat().st_mtime).read_text()))


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def write_report(q: dict[str, Any], etcd: dict[str, Any] | None, pso: dict[str, Any] | None, cmd: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `{cmd}`.",
        "3 nodes and the load generator share the machine; numbers from one run (compare only within a run).",
        "",
        "| clients | quorumd ok/s | quorumd p50 ms |",
        "|---|---|---|",
    ]
    for conc, r in q["load"].items():
        lines.append(f"| {conc} | {r.get('throughput_ok_per_s')} | {r.get('latency_ms', {}).get('p50')} |")
    lines += [
        "",
        f"Failover (SIGKILL leader -> first acknowledged write), median of {len(q['failover_s'])}: "
        f"{med(q['failover_s']):.3f} s (all: {', '.join(f'{x:.3f}' for x in q['failover_s'])})",
        "Leadership transfer through drain -> first write on the new leader, median: "
        f"{med(q['transfer_s']) * 1000:.1f} ms; "
        f"drain call returned after {med(q['drain_call_s']) * 1000:.1f} ms (median)",
        f"Autopilot p50: leader-direct {q['autopilot_leader_ms_p50']:.2f} ms, follower-proxied "
        f"{q['autopilot_follower_ms_p50']:.2f} ms",
        f"Peak RSS per node (MB): {q['rss_mb']}",
        "",
    ]
    for name, peer in (("etcd", etcd), ("PySyncObj", pso)):
        if peer is None:
            lines.append(f"{name}: not run in this run (see ../shared/bench/README.md).")
            continue
        lines.append(f"{name} raw results (same run): `{json.dumps(peer)[:1500]}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args()
    bench = shared_copy()
    q = run_quorumd(bench, args.duration, args.tries)
    etcd = pso = None
    if not args.no_peers:
        if shutil.which("etcd"):
            etcd = run_peer(bench, "run_etcd.sh")
        pso = run_peer(bench, "run_pysyncobj.sh")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quorumd_{int(time.time())}.json").write_text(
        json.dumps({"quorumd": q, "etcd": etcd, "pysyncobj": pso})
    )
    report = write_report(q, etcd, pso, "make bench")
    (ROOT / "BENCHMARKS.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
