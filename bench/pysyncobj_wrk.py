"""PySyncObj 3-node cluster (the shared ../shared/bench/pso_node.py: PySyncObj plus its small
aiohttp front end) driven by wrk, the generator quorumd and etcd get in the throughput table.

The shared peer script drives PySyncObj with the shared Python generator, which saturates near
the rates being compared (3-4k requests/s here); with wrk the comparison measures the systems, not
the generator. Both of PySyncObj's configurations are run (AppendEntries batching on, its
default, and off) and the better one counts, as in the shared script. PySyncObj has no fsync
(in-memory journal) and serves plain HTTP. Every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from procs import free_port, stop_processes
from wrk import run_wrk

BODY = '{"key":"$key","value":"value-0123456789"}'
CONFIGS = {"default": [], "nobatch": ["--no-batch"]}


def _get(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


def _put(url: str) -> bool:
    req = urllib.request.Request(url, b'{"key":"probe","value":"x"}', method="POST")
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class PsoCluster:
    def __init__(self, python: str, script: Path, extra: list[str]) -> None:
        self.raft = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.http = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pso-wrk-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(3):
            argv = [python, str(script), "--self", self.raft[i], "--http", self.http[i], *extra]
            for j in range(3):
                if j != i:
                    argv += ["--partner", self.raft[j]]
            log = open(self.dir / f"n{i}.log", "wb")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
            log.close()

    def leader(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(3):
                st = _get(f"http://{self.http[i]}/status")
                if st and st.get("is_leader") and _put(f"http://{self.http[i]}/put"):
                    return i
            time.sleep(0.1)  # polling interval of a bounded wait
        raise TimeoutError("pysyncobj: no leader")

    def term(self, i: int) -> Any:
        st = _get(f"http://{self.http[i]}/status")
        return None if st is None else (st.get("term"), st.get("leader"))

    def stop(self) -> None:
        stop_processes(self.procs, 10)


def run_pysyncobj_wrk(python: str, shared: Path, levels: list[int], duration: float) -> dict[str, Any]:
    """{config: {concurrency: wrk result}} plus ``best`` ({concurrency: the better config's result})."""
    script = shared / "pso_node.py"
    res: dict[str, Any] = {"system": "pysyncobj", "generator": "wrk", "configs": {}}
    for name, extra in CONFIGS.items():
        cluster = PsoCluster(python, script, extra)
        runs: dict[str, Any] = {}
        try:
            lead = cluster.leader()
            for conc in levels:
                t0 = cluster.term(lead)
                r = run_wrk(f"http://{cluster.http[lead]}/put", BODY, conc, duration)
                r["leader_changed"] = cluster.term(lead) != t0
                runs[str(conc)] = r
                print(f"pysyncobj-wrk {name} c={conc}: {r.get('throughput_ok_per_s')} ok/s", flush=True)
        except TimeoutError as exc:
            runs["error"] = str(exc)
        finally:
            cluster.stop()
        res["configs"][name] = runs
    best: dict[str, Any] = {}
    for name, runs in res["configs"].items():
        for conc, r in runs.items():
            if not isinstance(r, dict) or "throughput_ok_per_s" not in r:
                continue
            if r["throughput_ok_per_s"] > best.get(conc, {}).get("throughput_ok_per_s", -1):
                best[conc] = dict(r, config=name)
    res["best"] = best
    return res
