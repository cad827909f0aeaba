"""etcd 3-member cluster on loopback with client TLS (``--auto-tls``) and peer TLS, for the
like-with-like throughput comparison: quorumd's API and cluster port are TLS, so etcd pays for TLS
too. Driven through its v3 HTTP gateway (POST /v3/kv/put) by wrk, the same generator as quorumd.
Default etcd timing (heartbeat 100 ms, election 1000 ms), fsync on. Every wait is bounded."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from procs import free_port, stop_processes
from wrk import run_wrk

BODY = '{"key":"$key_b64","value":"dmFsdWUtMDEyMzQ1Njc4OQ=="}'


_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE


def _post(url: str, body: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_CTX) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


class EtcdTls:
    def __init__(self, members: int = 3) -> None:
        self.n = members
        self.dir = Path(tempfile.mkdtemp(prefix="bench-etcd-tls-"))
        self.client = [free_port() for _ in range(members)]
        self.peer = [free_port() for _ in range(members)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def url(self, i: int, path: str) -> str:
        return f"https://127.0.0.1:{self.client[i]}{path}"

    def start(self) -> None:
        initial = ",".join(f"n{j}=https://127.0.0.1:{self.peer[j]}" for j in range(self.n))
        for i in range(self.n):
            log = open(self.dir / f"n{i}.log", "wb")  # noqa: SIM115 - handed to the child
            argv = [
                shutil.which("etcd") or "/usr/bin/etcd",
                "--name", f"n{i}", "--data-dir", str(self.dir / f"n{i}"),
                "--auto-tls", "--peer-auto-tls",
                "--listen-client-urls", f"https://127.0.0.1:{self.client[i]}",
                "--advertise-client-urls", f"https://127.0.0.1:{self.client[i]}",
                "--listen-peer-urls", f"https://127.0.0.1:{self.peer[i]}",
                "--initial-advertise-peer-urls", f"https://127.0.0.1:{self.peer[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--logger", "zap", "--log-outputs", "stderr",
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
            log.close()

    def leader(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(self.n):
                st = _post(self.url(i, "/v3/maintenance/status"), {})
                if st and st.get("leader") == st["header"]["member_id"]:
                    if _post(self.url(i, "/v3/kv/put"), {"key": "cHJvYmU=", "value": "eA=="}):
                        return i
            time.sleep(0.1)  # polling interval of a bounded wait
        raise TimeoutError("etcd: no leader")

    def term(self, i: int) -> str | None:
        st = _post(self.url(i, "/v3/maintenance/status"), {})
        return None if st is None else str(st.get("raftTerm"))

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for i, p in enumerate(self.procs):
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[f"n{i}"] = round(int(line.split()[1]) / 1024, 1)
            except OSError:
                pass
        return out

    def stop(self) -> None:
        stop_processes(self.procs, 15)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_etcd_tls(levels: list[int], duration: float, long_duration: float) -> dict[str, Any]:
    """Throughput/latency per level through the leader's HTTPS gateway (the last level runs for
    ``long_duration`` and checks that the leader did not change)."""
    if shutil.which("etcd") is None:
        return {"error": "etcd not installed (apt-get install etcd-server etcd-client)"}
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    e = EtcdTls()
    res: dict[str, Any] = {"system": "etcd", "version": version, "tls": "client+peer auto-tls", "wrk": {}}
    try:
        e.start()
        lead = e.leader()
        for n, conc in enumerate(levels):
            dur = long_duration if n == len(levels) - 1 else duration
            t0 = e.term(lead)
            r = run_wrk(e.url(lead, "/v3/kv/put"), BODY, conc, dur, ok_substring="revision")
            r["leader_changed"] = e.term(lead) != t0
            res["wrk"][str(conc)] = r
            tput, p50 = r.get("throughput_ok_per_s"), r.get("p50_ms")
            print(f"etcd-tls c={conc}: {tput} ok/s p50={p50} ms", flush=True)
        res["rss_mb"] = e.rss_mb()
    finally:
        e.stop()
    return res


if __name__ == "__main__":
    print(json.dumps(run_etcd_tls([1, 64], 5, 5)))
