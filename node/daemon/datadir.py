"""The node's data directory: layout, modes, and the node identity file (``node.json``).

``<data-dir>`` holds ``raft/`` (write-ahead log and snapshots), ``tls/`` (the node's certificate
and key, the self-signed API pair), ``node.json`` (node id and cluster id, pinned at first start)
and ``admin.token``; every directory is 0700 and every file 0600. ``ensure_data_dir`` enforces
that at every start: a file or directory anyone but the owner may read, write or enter (say after
a ``chmod -R a+rwX``) is tightened, and each one fixed is named in a WARNING (the keys, tokens and
the log it held may have been read meanwhile: an operator should know).

Formats: the files under ``raft/`` carry their own format versions (checked by the storage and
the state machine); ``node.json`` may carry ``"format"``, the data dir's layout version (absent:
1, the only layout so far). A newer one than this build knows is refused with
``NewerFormatError`` (exit 2) before anything is written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from quorumd.node.cluster import pki

DATA_DIR_FORMAT = 1

log = logging.getLogger(__name__)


class FatalError(Exception):
    """Startup cannot continue; the message is for the operator (exit code 1)."""

    exit_code = 1


class NewerFormatError(FatalError):
    """A data dir file written in a newer format than this build reads (exit code 2: nothing
    was changed; run a newer build on it)."""

    exit_code = 2


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_message(exc: BaseException | None) -> str | None:
    """``"disk full: <path>"`` when ``exc`` or one of its causes is ENOSPC/EDQUOT, else None.

    The path is the failing file's when the OS error names it, else the first absolute path in
    the messages of the chain (the storage's errors name the file they were writing)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 16:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if not any(isinstance(e, OSError) and e.errno in _DISK_FULL for e in chain):
        return None
    path = next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), None)
    if path is None:
        words = (w.strip("'\",:") for e in chain for w in str(e).split())
        path = next((w for w in words if w.startswith("/")), "the data directory")
    return f"disk full: {path}: no space left on the device (free space: a new start waits for it)"


def ensure_data_dir(path: Path) -> list[Path]:
    """Create the layout and tighten every mode under ``path``; returns what was fixed."""
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("raft", "tls"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)
    return tighten_modes(path)


def tighten_modes(root: Path) -> list[Path]:
    """Directories 0700, files 0600 when group or others have any access (symlinks are not
    followed; a stricter file, e.g. 0400, is left alone). Each change is logged at WARNING."""
    fixed: list[Path] = []

    def fix(p: Path, want: int) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        loose = mode != 0o700 if stat.S_ISDIR(st.st_mode) else bool(mode & 0o077)
        if loose:
            os.chmod(p, want)
            fixed.append(p)
            log.warning("data_dir_mode_fixed path=%s mode=%s new_mode=%s", p, oct(mode), oct(want))

    fix(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames):
            fix(Path(dirpath) / name, 0o700)
        for name in sorted(filenames):
            fix(Path(dirpath) / name, 0o600)
    return fixed


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
    """The node certificate and key in use (``pki.IdentityFiles``)."""
    return pki.IdentityFiles(data_dir).load()
