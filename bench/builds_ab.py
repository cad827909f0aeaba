"""API write throughput of two quorumd builds, side by side, in alternating rounds.

Each run starts a fresh 3-node ``quorumd demo`` cluster (real join flow, TLS API, fsync on) from one
build's ``quorumd`` executable, creates the ``bench`` pool on the leader, drives
``POST /api/v1/leases`` on the leader with wrk (bench/wrk_post.lua, the bench's script) at
``--connections`` for ``--seconds``, records acknowledged writes per second, latency and the
leader's CPU microseconds per acknowledged write, then stops the cluster. ``--workload status``
drives ``GET /api/v1/status`` on the leader instead (plain wrk, no script): no Raft work, so it
measures the HTTP server and the pipeline alone. Builds alternate
within each round (the order flips every round) so both see the same host: this machine's speed
moves by 2-3x within minutes, so compare medians and per-round ratios, not single runs.

    python bench/builds_ab.py --build old=/tmp/old/.venv/bin/quorumd --build new=.venv/bin/quorumd \\
        --rounds 3 --connections 64 --seconds 10 [--workload writes|status]

Prints one JSON line per run and a summary (medians, median of the per-round new/old ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from procs import proc_cpu_s  # noqa: E402
from wrk import available as wrk_available  # noqa: E402
from wrk import run_wrk  # noqa: E402

LEASE_BODY = '{"pool":"bench","holder":"$key"}'
_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE


def _call(url: str, token: str | None = None, body: Any = None, timeout: float = 5.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout, context=_CTX) as resp:
        return json.loads(resp.read())["result"]


def _ports_free(base: int) -> bool:
    for port in (*(base + i for i in (1, 2, 3)), *(base + 100 + i for i in (1, 2, 3))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _base_port(seed: int) -> int:
    """A base port whose six ports are free, below Linux's ephemeral range (32768-60999), where
    other processes' outgoing connections would take ports at random."""
    for k in range(80):
        base = 20000 + ((seed * 37 + k * 11) % 80) * 150
        if _ports_free(base):
            return base
    raise RuntimeError("no free port range")


def _node_pids(directory: Path) -> dict[int, int]:
    """node id -> pid of the demo's daemons (their command line names the node's config)."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            name = Path(arg.decode(errors="replace")).name
            if arg.startswith(str(directory).encode()) and name.startswith("node") and name.endswith(".yaml"):
                found[int(name[4:-5])] = int(entry)
    return found


def _wrk_get(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """Plain wrk GETs: requests per second (all must be 2xx) and latency percentiles."""
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{round(seconds)}s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False).stdout
    figures: dict[str, Any] = {"errors": 0}
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            figures["throughput_ok_per_s"] = float(parts[1])
        elif "requests in" in line:
            figures["ok"] = int(parts[0])
        elif line.strip().startswith(("50%", "99%")) and len(parts) == 2:
            value = parts[1]
            unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
            figures[f"p{parts[0][:2]}_ms"] = round(float(value[: -len(unit)]) * units[unit], 3)
        elif "Non-2xx" in line or line.strip().startswith("Socket errors"):
            figures["errors"] += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    if "throughput_ok_per_s" not in figures:
        return {"error": out[-1500:]}
    return figures


def run_once(
    name: str, quorumd: str, connections: int, seconds: float, seed: int, workload: str
) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix=f"quorumd-ab-{name}-"))
    base = _base_port(seed)
    demo = subprocess.Popen(
        [quorumd, "demo", "--nodes", "3", "--base-port", str(base), "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                raise RuntimeError(f"{name}: the demo exited before the cluster was up (logs in {directory})")
            if "cluster is up" in line:
                break
        else:
            raise RuntimeError(f"{name}: the cluster did not come up")
        token = (directory / "node1" / "admin.token").read_text().strip()
        status = _call(f"https://127.0.0.1:{base + 101}/api/v1/status")
        leader_id = int(status["leaderNodeId"])
        leader_api = f"https://127.0.0.1:{base + 100 + leader_id}"
        _call(leader_api + "/api/v1/pools", token, {"name": "bench", "cidr": "10.0.0.0/8"})
        pid = _node_pids(directory).get(leader_id)
        cpu_before = proc_cpu_s(pid) if pid else float("nan")
        if workload == "writes":
            result = run_wrk(leader_api + "/api/v1/leases", LEASE_BODY, connections, seconds, auth=token)
        else:
            result = _wrk_get(leader_api + "/api/v1/status", connections, seconds)
        cpu_after = proc_cpu_s(pid) if pid else float("nan")
        if "error" in result:
            raise RuntimeError(f"{name}: wrk failed: {result['error']}")
        ok = int(result["ok"])
        return {
            "build": name,
            "ok_per_s": result["throughput_ok_per_s"],
            "errors": result["errors"],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "leader_cpu_us_per_ok": round(1e6 * (cpu_after - cpu_before) / ok, 1) if ok else None,
            "leader_cpu_pct": round(100 * (cpu_after - cpu_before) / seconds, 1),
        }
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=PATH to a quorumd executable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workload", choices=("writes", "status"), default="writes")
    args = parser.parse_args()
    if not wrk_available():
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    builds = [tuple(b.split("=", 1)) for b in args.build]
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = builds if rnd % 2 == 0 else builds[::-1]
        for name, exe in order:
            try:
                run = run_once(name, exe, args.connections, args.seconds, len(runs), args.workload)
            except RuntimeError as exc:  # e.g. a port taken meanwhile: once more, elsewhere
                print(f"retrying once: {exc}", file=sys.stderr, flush=True)
                run = run_once(name, exe, args.connections, args.seconds, len(runs) + 41, args.workload)
            run["round"] = rnd + 1
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary: dict[str, Any] = {
        "workload": args.workload,
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
    }
    for name, _ in builds:
        mine = [r for r in runs if r["build"] == name]
        summary[name] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("ok_per_s", "p50_ms", "p99_ms", "leader_cpu_us_per_ok", "leader_cpu_pct")
        }
    if len(builds) == 2:
        (a, _), (b, _) = builds
        ratios = [
            next(r for r in runs if r["round"] == k and r["build"] == b)["ok_per_s"]
            / next(r for r in runs if r["round"] == k and r["build"] == a)["ok_per_s"]
            for k in range(1, args.rounds + 1)
        ]
        summary[f"{b}/{a} ok_per_s per round"] = [round(x, 3) for x in ratios]
        summary[f"{b}/{a} ok_per_s median ratio"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
