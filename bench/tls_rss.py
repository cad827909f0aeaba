"""RSS of one node across many short-lived TLS connections to its API (the C-heap trim measurement).

Starts a one-node cluster with the test harness, opens ``N`` TLS connections to its API from ``T``
client threads, each sending one authenticated ``GET /api/v1/cluster/members`` with
``Connection: close``, and reads the node's VmRSS before, after each quarter, and after ``IDLE``
seconds of quiet (long enough for the daemon's periodic ``malloc_trim``, node/daemon/gcpolicy.py).
Extra ``KEY=VALUE`` arguments go to the node's environment, e.g. ``QUORUMD_HEAP_TRIM_SECONDS=inf``
(trimming off) or ``MALLOC_ARENA_MAX=2``.

    .venv/bin/python bench/tls_rss.py 28000 trim-off QUORUMD_HEAP_TRIM_SECONDS=inf
    T=256 .venv/bin/python bench/tls_rss.py 28160 trim-on

Results (2-core shared VM, Python 3.11, 2026-12-06; MB):

| clients | variant                   | start | after 28k | after 70 s idle |
|---------|---------------------------|-------|-----------|-----------------|
| 32      | no trim                   | 58    | 97        | 97              |
| 32      | no trim, MALLOC_ARENA_MAX=2 | 57  | 91        | 91              |
| 32      | trim every 30 s (default) | 57    | 85        | 73              |
| 256     | no trim                   | 57    | 109       | 109             |
| 256     | trim every 30 s (default) | 57    | 90        | 75              |

The growth is freed memory left resident in the main heap (the handshakes run on the loop
thread, so the arena count hardly matters); ``malloc_trim(0)`` returns most of it.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    n, label = int(sys.argv[1]), sys.argv[2]
    env = dict(a.split("=", 1) for a in sys.argv[3:])
    threads = int(os.environ.get("T", "32"))
    idle = float(os.environ.get("IDLE", "70"))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with tempfile.TemporaryDirectory(prefix="quorumd-tls-rss-") as tmp:
        c = Cluster(Path(tmp), 1, env=env)
        try:
            c.form()
            node = c.nodes[1]
            assert node.proc is not None
            pid, port = node.proc.pid, node.api_port
            request = (
                b"GET /api/v1/cluster/members HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                + c.token.encode()
                + b"\r\nConnection: close\r\n\r\n"
            )
            done = 0
            lock = threading.Lock()

            def worker(k: int) -> None:
                nonlocal done
                for _ in range(k):
                    with (
                        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                        ctx.wrap_socket(raw) as s,
                    ):
                        s.sendall(request)
                        while s.recv(65536):
                            pass
                    with lock:
                        done += 1

            points = [("start", 0, rss_mb(pid))]
            t0 = time.monotonic()
            for _ in range(4):
                ts = [threading.Thread(target=worker, args=(n // (4 * threads),)) for _ in range(threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                points.append(("after", done, rss_mb(pid)))
            time.sleep(idle)  # the quiet period being measured
            points.append((f"idle{idle:g}s", done, rss_mb(pid)))
            print(label, env, f"clients={threads}", f"{time.monotonic() - t0:.0f}s", points, flush=True)
        finally:
            c.close()


if __name__ == "__main__":
    main()
