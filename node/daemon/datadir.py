"""The node's data directory: layout, modes, and the node identity file (``node.json``).

``<data-dir>`` holds ``raft/`` (write-ahead log and snapshots), ``tls/`` (the node's certificate
and key, the self-signed API pair), ``node.json`` (node id and cluster id, pinned at first start)
and ``admin.token``; every directory is 0700 and every file 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quorumd.node.cluster import pki


class FatalError(Exception):
    """Startup cannot continue; the message is for the operator (exit code 1)."""


def ensure_data_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for sub in ("raft", "tls"):
        (path / sub).mkdir(exist_ok=True)
        os.chmod(path / sub, 0o700)


def read_node_file(data_dir: Path) -> dict[str, Any] | None:
    p = data_dir / "node.json"
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise FatalError(f"{p}: unreadable node identity file: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("node_id"), int):
        raise FatalError(f"{p}: malformed node identity file")
    return data


def write_node_file(data_dir: Path, data: dict[str, Any]) -> None:
    pki.write_private_file(data_dir / "node.json", json.dumps(data, sort_keys=True).encode())


def load_identity_files(data_dir: Path) -> tuple[bytes, bytes]:
    return (data_dir / "tls" / "node.crt").read_bytes(), (data_dir / "tls" / "node.key").read_bytes()
