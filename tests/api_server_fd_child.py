"""Child process for the descriptor-reserve test (tests/test_api_server.py::test_fd_reserve_*).

Usage: python api_server_fd_child.py SOFT_LIMIT FD_RESERVE CERT_DIR

Lowers its own RLIMIT_NOFILE soft limit to SOFT_LIMIT, serves a FakeNode API over TLS on uvloop
(as the daemon does) with ``fd_reserve=FD_RESERVE`` and a long handshake timeout (connections that
never start TLS stay open until the test closes them), prints ``{"port": P}``, then answers each
``stats`` line on stdin with one JSON line: open and refused API connections, descriptors in use,
and whether it could still open FD_RESERVE // 2 files (what the storage would need). Exits on EOF.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
import sys
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry

from quorumd.api.app import build_app
from quorumd.api.server import ApiServer
from quorumd.node.cluster.pki import load_or_create_api_cert
from tests.fakes.node import FakeCluster, FakeNode


def _can_open(count: int) -> bool:
    files = []
    try:
        for _ in range(count):
            files.append(open(os.devnull, "rb"))  # noqa: SIM115 - closed below
        return True
    except OSError:
        return False
    finally:
        for f in files:
            f.close()


async def serve(reserve: int, cert_dir: Path) -> None:
    cluster = FakeCluster()
    for node_id in (1, 2, 3):
        cluster.add_member(node_id)
    cluster.leader_id = 1
    api = build_app(FakeNode(cluster, 1), node_id=1, registry=CollectorRegistry())
    cert, key = load_or_create_api_cert(cert_dir, ["127.0.0.1"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = ApiServer(api, fd_reserve=reserve, handshake_timeout=60.0)
    port = await server.start("127.0.0.1", 0, ssl_context=ctx)
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        if line.strip() != b"stats":
            continue
        fds = len(os.listdir("/proc/self/fd")) - 1
        stats = {
            "open": getattr(server, "open_connections", None),
            "refused": getattr(server, "refused_connections", None),
            "fds": fds,
            "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "can_open_half_reserve": _can_open(reserve // 2),
        }
        print(json.dumps(stats), flush=True)
    await server.close()


def main() -> None:
    soft, reserve, cert_dir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    uvloop.run(serve(reserve, cert_dir))


if __name__ == "__main__":
    main()
