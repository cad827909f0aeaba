"""The node's data directory: layout, modes, and the node identity file (``node.json``).

``<data-dir>`` holds ``raft/`` (write-ahead log and snapshots), ``tls/`` (the node's certificate
and key, the self-signed API pair), ``node.json`` (node id and cluster id, pinned at first start)
and ``admin.token``; every directory is 0700 and every file 0600.

Formats (SPEC 13): the files under ``raft/`` carry their own format versions (checked by the
storage and the state machine); ``node.json`` may carry ``"format"``, the data dir's layout
version (absent: 1, the only layout so far). A newer one than this build knows is refused
with ``NewerFormatError`` (exit 2) before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quorumd.node.cluster import pki

DATA_DIR_FORMAT = 1


class FatalError(Exception):
    """Startup cannot continue; the message is for the operator (exit code 1)."""

    exit_code = 1


class NewerFormatError(FatalError):
    """A data dir file written in a newer format than this build reads (exit code 2: nothing
    was changed; run a newer build on it)."""

    exit_code = 2


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
    found = data.get("format", DATA_DIR_FORMAT)
    if isinstance(found, int) and found > DATA_DIR_FORMAT:
        raise NewerFormatError(
            f"{p} is in data dir format version {found}; this build reads up to version "
            f"{DATA_DIR_FORMAT} (run a newer build on this data dir)"
        )
    return data


def write_node_file(data_dir: Path, data: dict[str, Any]) -> None:
    pki.write_private_file(data_dir / "node.json", json.dumps(data, sort_keys=True).encode())


def load_identity_files(data_dir: Path) -> tuple[bytes, bytes]:
    return (data_dir / "tls" / "node.crt").read_bytes(), (data_dir / "tls" / "node.key").read_bytes()
