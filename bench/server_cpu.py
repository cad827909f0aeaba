"""CPU per request of the API server alone: ``ApiServer`` in front of a FakeNode (no Raft, no disk),
over TLS on uvloop, driven by wrk; prints the server process's user + system CPU per request.

Runs with whichever quorumd the interpreter imports, so two builds compare by running it with
each build's virtualenv, alternating:

    for i in 1 2 3; do for b in /tmp/old .; do $b/.venv/bin/python bench/server_cpu.py; done; done

``--path /api/v1/status`` (default) is a public read; ``--path /api/v1/tokens`` posts a small JSON
body per request with an admin token (bench/wrk_post.lua), the shape of a lease write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import subprocess
import tempfile
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry

from quorumd.api.app import build_app
from quorumd.api.ports import TokenRole
from quorumd.api.server import ApiServer
from quorumd.node.cluster.pki import load_or_create_api_cert
from tests.fakes.node import FakeCluster, FakeNode

SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"


async def measure(path: str, connections: int, seconds: int) -> dict[str, float]:
    cluster = FakeCluster()
    for node_id in (1, 2, 3):
        cluster.add_member(node_id)
    cluster.leader_id = 1
    api = build_app(FakeNode(cluster, 1), node_id=1, registry=CollectorRegistry())
    _, admin = cluster.add_token(TokenRole.ADMIN, name="bench")
    cert, key = load_or_create_api_cert(Path(tempfile.mkdtemp(prefix="quorumd-cpu-")), ["127.0.0.1"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = ApiServer(api)
    port = await server.start("127.0.0.1", 0, ssl_context=ctx)
    url = f"https://127.0.0.1:{port}{path}"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    env = dict(os.environ)
    if path == "/api/v1/tokens":
        argv += ["-s", str(SCRIPT)]
        env.update(WRK_BODY='{"name":"t$key","role":"readonly"}', WRK_AUTH=admin)
    before = resource.getrusage(resource.RUSAGE_SELF)
    proc = await asyncio.create_subprocess_exec(*argv, url, stdout=subprocess.PIPE, env=env)
    out, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_SELF)
    await server.close()
    text = out.decode()
    if path == "/api/v1/tokens":
        requests = int(json.loads(text.strip().splitlines()[-1])["requests"])
    else:
        requests = int(next(line.split()[0] for line in text.splitlines() if "requests in" in line))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "requests_per_s": round(requests / seconds),
        "server_cpu_us_per_request": round(1e6 * cpu / requests, 1),
        "server_cpu_pct": round(100 * cpu / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="/api/v1/status", choices=("/api/v1/status", "/api/v1/tokens"))
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    result = uvloop.run(measure(args.path, args.connections, args.seconds))
    print(json.dumps({"path": args.path, **result}))


if __name__ == "__main__":
    main()
