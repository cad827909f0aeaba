"""Scale benchmark (``make bench-scale``): quorumd with a large state and with more members.

1. In one process (bench/scale_inproc.py, deterministic): the lease table's bytes per lease,
   snapshot and restore time, and an API page's time, at each size.
2. State size: three 3-voter clusters up at once, holding 0, 100,000 and 1,000,000 leases
   (``--sizes``; filled offline, bench/scale_clusters.py says how). At each size: startup to
   ready (the three nodes at once, and one follower alone), ``GET /api/v1/leases?limit=1000``
   p50, then paired rounds of acknowledged ``POST /api/v1/leases`` per second at 64 wrk clients
   (each round drives every cluster once, the order rotated; every write adds a lease), RSS per
   node, a py-spy profile of the empty and the largest cluster's leader, and a new node that
   joins and catches up by snapshot.
3. Cluster size: quorumd with 3, 5 and 7 voters and with 3 voters + 4 nonvoters, etcd (client
   and peer TLS) with 3, 5 and 7 members, all up at once, in paired rounds as above; the leader's
   CPU per acknowledged write; py-spy on the 3- and 7-voter leaders.
Ratios are medians over the rounds of the per-round ratios (bench/run.py's paired rounds).
Writes ``bench/runs/<time>-scale.json``, ``bench/runs/<time>-scale.png`` and the "Scale"
section of BENCHMARKS.md (and of bench/notes.md, which ``make bench`` appends to its page).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import scale_clusters as sc  # noqa: E402
import scale_inproc  # noqa: E402
import scale_report  # noqa: E402
from run import Phases  # noqa: E402
from scale_clusters import Target, log  # noqa: E402

RUNS = BENCH / "runs"


def state_phase(work: Path, sizes: list[int], n_rounds: int, seconds: float, stamp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": sizes, "clusters": {}, "list": {}, "profiles": {}}
    targets: list[Target] = []
    try:
        for n in sizes:
            log(f"state: cluster with {n:,} leases")
            c, info = sc.grown_cluster(work, n)
            targets.append(Target(str(n), cluster=c))
            out["clusters"][str(n)] = info
        for t in targets:
            assert t.cluster is not None
            out["list"][t.name] = sc.list_latency(t.cluster)
            out["list"][t.name]["wrk"] = sc.list_latency_wrk(t.cluster)
            out["clusters"][t.name]["restart_one"] = sc.restart_one(t.cluster)
            ready = out["clusters"][t.name]["restart_one"]["ready_s"]
            log(f"state {t.name}: list {out['list'][t.name]} restart {ready} s")
        out["rounds"] = sc.rounds(targets, n_rounds, seconds)
        for t in (targets[0], targets[-1]):
            name = f"{stamp}-scale-state-{t.name}.pyspy.txt"
            out["profiles"][t.name] = sc.profiled_drive(t, seconds, RUNS / name)
        for t in targets:
            assert t.cluster is not None
            info = out["clusters"][t.name]
            info["leases_after_rounds"] = sc.lease_count(t.cluster)
            info["mem_after_rounds_mb"] = sc.mem(t.cluster)
        for t in targets[1:]:
            assert t.cluster is not None
            out["clusters"][t.name]["catch_up"] = sc.catch_up(t.cluster, 4)
            log(f"state {t.name}: catch-up {out['clusters'][t.name]['catch_up']}")
    finally:
        for t in targets:
            t.close()
    return out


def size_phase(work: Path, n_rounds: int, seconds: float, stamp: str, etcd: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"profiles": {}}
    targets: list[Target] = []
    try:
        for voters, nonvoters in ((3, 0), (5, 0), (7, 0), (3, 4)):
            name = f"quorumd-{voters}" + (f"+{nonvoters}nv" if nonvoters else "")
            log(f"size: {name}")
            targets.append(Target(name, cluster=sc.voters_cluster(work, voters, nonvoters)))
            members = targets[-1].cluster.members()  # type: ignore[union-attr]
            out.setdefault("members", {})[name] = {str(m["nodeId"]): m["suffrage"] for m in members}
        if etcd and shutil.which("etcd"):
            for members in (3, 5, 7):
                log(f"size: etcd-{members}")
                targets.append(Target(f"etcd-{members}", etcd=sc.etcd_cluster(members)))
        for t in targets:  # warm-up: connections, caches, first snapshots
            t.drive(min(seconds, 3.0))
        out["rounds"] = sc.rounds(targets, n_rounds, seconds)
        for t in targets:
            if t.name in ("quorumd-3", "quorumd-7"):
                out["profiles"][t.name] = sc.profiled_drive(
                    t, seconds, RUNS / f"{stamp}-scale-{t.name}.pyspy.txt"
                )
    finally:
        for t in targets:
            t.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="0,100000,1000000", help="lease counts of the state phase")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="length of one wrk run")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: inproc,state,size")
    p.add_argument("--no-etcd", action="store_true")
    p.add_argument("--baseline", default=None, help="a revision whose lease table is measured in-process too")
    p.add_argument("--report-only", metavar="JSON", help="rewrite the report and plot from a saved run")
    args = p.parse_args()
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        scale_report.publish(res, Path(args.report_only))
        return 0
    if not shutil.which("wrk"):
        print("wrk is missing (make bench-scale installs it)", file=sys.stderr)
        return 2
    started = time.time()
    stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime(started))
    sizes = [int(x) for x in args.sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    RUNS.mkdir(exist_ok=True)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["bench/scale.py", *sys.argv[1:]]),
        "rounds": args.rounds,
        "seconds": args.seconds,
    }
    phases = Phases()
    work = Path(tempfile.mkdtemp(prefix="quorumd-scale-"))
    out_json = RUNS / f"{stamp}-scale.json"
    try:
        if "inproc" not in skip:
            with phases.phase("inproc"):
                res["inproc"] = {str(n): scale_inproc.run(n) for n in sizes if n}
                if args.baseline:
                    res["inproc_baseline"] = _baseline(args.baseline, [n for n in sizes if n])
            log(f"in-process: {json.dumps(res['inproc'])}")
        if "state" not in skip:
            with phases.phase("state"):
                res["state"] = state_phase(work, sizes, args.rounds, args.seconds, stamp)
        if "size" not in skip:
            with phases.phase("size"):
                res["size"] = size_phase(work, args.rounds, args.seconds, stamp, not args.no_etcd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        res["steal_pct"] = phases.steal_pct
        res["loop_ms"] = phases.loop_ms
        res["wall_s"] = round(time.time() - started, 1)
        out_json.write_text(json.dumps(res, indent=1, default=str))
        log(f"results: {out_json}")
    scale_report.publish(res, out_json)
    return 0


def _baseline(rev: str, sizes: list[int]) -> dict[str, Any]:
    """The in-process figures of another revision's tree (``git archive``)."""
    import subprocess

    tree = Path(tempfile.mkdtemp(prefix="quorumd-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        out: dict[str, Any] = {"revision": rev}
        out.update({str(n): scale_inproc.run(n, tree) for n in sizes})
        return out
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
