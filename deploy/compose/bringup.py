#!/usr/bin/env python3
"""Mint join tokens for the joiners of a fresh quorumd cluster and hand them over as files.

Used by the one-shot ``init`` service of deploy/compose/docker-compose.yml, and usable against any
cluster (network namespaces, VMs)::

    bringup.py --endpoint https://node1:5002 --token-file /node1/admin.token \\
               --node-ids 2,3 --out-dir /join --insecure

Steps: wait until the admin token file exists (the founder writes ``<data-dir>/admin.token`` once it
leads), wait until the endpoint answers ``GET /api/v1/status`` with a known leader, then for each node
id ``POST /api/v1/cluster/pki/join-tokens {"nodeID": N, "ttlSeconds": TTL}`` and write the token to
``<out-dir>/node<N>.token`` (0600, written to a temporary file then renamed, so a joiner polling for
the file never reads half a token). The joiner's config points ``cluster.join-token-file`` at it.

Idempotent: a node whose token file already exists is skipped (unless ``--force``), and a node that is
already a member (409) is skipped. Retries 502/503/504 and connection errors until ``--timeout``.
Never prints a token. Standalone: Python 3.9+ standard library only.
Exit codes: 0 done, 1 failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RETRYABLE_STATUS = {502, 503, 504}


class BringupError(Exception):
    pass


def log(message: str) -> None:
    print(f"bringup: {message}", file=sys.stderr, flush=True)


def parse_node_ids(text: str) -> list[int]:
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= 63:
            raise argparse.ArgumentTypeError(f"node ids are integers 1..63, got {part!r}")
        if int(part) not in ids:
            ids.append(int(part))
    if not ids:
        raise argparse.ArgumentTypeError("at least one node id is required")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mint quorumd join tokens and write them to files.")
    p.add_argument("--endpoint", default="https://127.0.0.1:5002", help="API base URL of a cluster node")
    p.add_argument("--token-file", required=True, help="admin API token file (e.g. <data-dir>/admin.token)")
    p.add_argument("--node-ids", required=True, type=parse_node_ids, help="comma-separated ids, e.g. 2,3")
    p.add_argument("--out-dir", required=True, help="directory for node<N>.token files")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify the API certificate")
    tls.add_argument("--cacert", help="CA bundle or the API certificate to verify against")
    p.add_argument("--ttl", type=int, default=1800, help="join token lifetime in seconds (300..86400)")
    p.add_argument("--timeout", type=float, default=300.0, help="overall deadline in seconds")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between retries")
    p.add_argument("--force", action="store_true", help="mint again even when a token file exists")
    return p


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.endpoint.startswith("https://"):
        return None
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=args.cacert)


class Client:
    def __init__(self, endpoint: str, context: ssl.SSLContext | None, request_timeout: float = 5.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.context = context
        self.request_timeout = request_timeout

    def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout, context=self.context) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        return None


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict) and "error" in payload:
        return f"{payload.get('code', '?')}: {payload['error']}"
    return "unexpected response"


class Deadline:
    def __init__(self, seconds: float, poll_interval: float) -> None:
        self.end = time.monotonic() + seconds
        self.poll_interval = poll_interval

    def wait(self, what: str) -> None:
        if time.monotonic() + self.poll_interval > self.end:
            raise BringupError(f"timed out waiting for {what}")
        time.sleep(self.poll_interval)


def wait_for_token(path: Path, deadline: Deadline) -> str:
    announced = False
    while True:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            token = ""
        except OSError as exc:
            raise BringupError(f"cannot read {path}: {exc.strerror}") from exc
        if token:
            return token
        if not announced:
            log(f"waiting for the admin token file {path}")
            announced = True
        deadline.wait(f"the admin token file {path}")


def wait_for_leader(client: Client, deadline: Deadline) -> None:
    announced = False
    while True:
        try:
            status, payload = client.call("GET", "/api/v1/status")
            if status == 200 and isinstance(payload, dict):
                result = payload.get("result", {})
                if isinstance(result, dict) and result.get("leaderNodeId"):
                    log(f"cluster ready, leader is node {result['leaderNodeId']}")
                    return
        except (OSError, urllib.error.URLError):
            pass  # not listening yet
        if not announced:
            log(f"waiting for {client.endpoint} to serve with a leader")
            announced = True
        deadline.wait(f"{client.endpoint} to report a leader")


def write_secret_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def mint(client: Client, token: str, node_id: int, ttl: int, deadline: Deadline) -> str | None:
    """The join token for ``node_id``, or None when the node is already a member."""
    while True:
        try:
            status, payload = client.call(
                "POST", "/api/v1/cluster/pki/join-tokens", token, {"nodeID": node_id, "ttlSeconds": ttl}
            )
        except (OSError, urllib.error.URLError) as exc:
            log(f"node {node_id}: {exc}; retrying")
            deadline.wait(f"a join token for node {node_id}")
            continue
        if status == 201 and isinstance(payload, dict):
            result = payload.get("result")
            if isinstance(result, dict) and isinstance(result.get("token"), str) and result["token"]:
                return str(result["token"])
            raise BringupError(f"node {node_id}: malformed join-token response")
        if status == 409:
            log(f"node {node_id}: {_error_text(payload)}; skipping")
            return None
        if status in RETRYABLE_STATUS:
            log(f"node {node_id}: HTTP {status} ({_error_text(payload)}); retrying")
            deadline.wait(f"a join token for node {node_id}")
            continue
        raise BringupError(f"node {node_id}: HTTP {status} ({_error_text(payload)})")


def run(args: argparse.Namespace) -> int:
    if not 300 <= args.ttl <= 86400:
        raise BringupError("--ttl must be in 300..86400")
    deadline = Deadline(args.timeout, args.poll_interval)
    out_dir = Path(args.out_dir)
    pending = [n for n in args.node_ids if args.force or not (out_dir / f"node{n}.token").exists()]
    for n in args.node_ids:
        if n not in pending:
            log(f"node {n}: {out_dir / f'node{n}.token'} exists; skipping (use --force to mint again)")
    if not pending:
        return 0
    admin_token = wait_for_token(Path(args.token_file), deadline)
    client = Client(args.endpoint, ssl_context(args))
    wait_for_leader(client, deadline)
    for node_id in pending:
        join_token = mint(client, admin_token, node_id, args.ttl, deadline)
        if join_token is None:
            continue
        path = out_dir / f"node{node_id}.token"
        write_secret_file(path, join_token)
        log(f"node {node_id}: join token written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BringupError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
