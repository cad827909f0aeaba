"""Offline backup tools: ``quorumd backup verify FILE`` and ``quorumd restore --config F --from A``.

``verify`` decodes the archive (``quorumd.node.registry.archive``: magic, format version, lengths,
SHA-256) and loads its state exactly as a node would (``StateMachine.restore``), then prints a
summary. Every problem is a ``BackupToolError`` with the exit code and a message that names it.

``restore`` makes the configured node the founder of a cluster whose replicated state is the
archive's:
- the data-dir must be absent or empty (exit 2 naming it); a bad archive exits 1;
- everything is prepared in memory first (archive checked, state loaded and refounded, a new
  node certificate generated); only then are files written, and a failure while writing removes
  what this run wrote (the directory too when it created it): nothing is left on failure;
- the state: pools, leases (owner ids kept, members or not), API tokens are the archive's; the
  members (and so the certificate pins) are this node alone; the join key is new, so join tokens
  minted before are refused; a new admin token is added and written to ``<data-dir>/admin.token``;
- the Raft state is a snapshot at the archive's index + 1 (the refounded state differs from the
  archive's, so it gets an index of its own) whose configuration is this node as the only voter,
  written through ``LogStorage``, and a hard state at the archive's term with nothing voted;
- ``node.json`` pins the node id and the archive's cluster id, marked founder.
Then ``quorumd run`` leads at once; other hosts join with empty data dirs and new join tokens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.cluster import pki
from quorumd.node.config.schema import Config
from quorumd.node.daemon.datadir import ensure_data_dir, write_node_file
from quorumd.node.daemon.startup import api_url
from quorumd.node.registry import apitoken
from quorumd.node.registry.archive import (
    PROBE_BYTES,
    Archive,
    ArchiveError,
    declared_length,
    decode_archive,
)
from quorumd.node.registry.leases import SnapshotError
from quorumd.node.registry.records import SNAPSHOT_VERSION, ApiToken, Member
from quorumd.node.registry.state import StateMachine
from quorumd.node.version import VERSION
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.core.types import Configuration, HardState, Snapshot, SnapshotMeta


class BackupToolError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class LoadedArchive:
    archive: Archive
    state: StateMachine


def load_archive_bytes(data: bytes) -> LoadedArchive:
    """Decode and fully check an archive; raises ``ArchiveError`` only."""
    archive = decode_archive(data)
    h = archive.header
    if h.state_format > SNAPSHOT_VERSION:
        raise ArchiveError(
            f"unknown state format version {h.state_format} (this build reads up to {SNAPSHOT_VERSION})"
        )
    sm = StateMachine()
    try:
        sm.restore(archive.state)
    except (SnapshotError, RecursionError) as exc:
        raise ArchiveError(f"invalid state: {exc}") from None
    if sm.applied_index != h.index:
        raise ArchiveError(f"invalid state: it holds index {sm.applied_index}, the header says {h.index}")
    if sm.cluster_id != h.cluster_id:
        raise ArchiveError("invalid state: its cluster id differs from the header's")
    return LoadedArchive(archive, sm)


def read_archive_file(path: Path) -> bytes:
    """The bytes of the archive file at ``path``: a regular file (never a device or a pipe, which
    may not end), read only as far as the archive it starts with declares."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait for a writer
    except OSError as exc:
        raise BackupToolError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise BackupToolError(f"{path}: cannot read: it is a directory")
        if not stat.S_ISREG(mode):
            raise BackupToolError(f"{path}: cannot read: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            head = f.read(PROBE_BYTES)
            size = os.fstat(fd).st_size
            expected = declared_length(head)
            if expected is None or size <= len(head):
                return head
            if size < expected:
                raise BackupToolError(f"{path}: truncated: {size} bytes of {expected}")
            if size > expected:
                raise BackupToolError(f"{path}: trailing data: {size} bytes, the archive ends at {expected}")
            return head + f.read(expected - len(head))
    except OSError as exc:
        raise BackupToolError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except MemoryError:
        raise BackupToolError(f"{path}: cannot read: too large to check in memory") from None
    finally:
        os.close(fd)


def load_archive(path: Path) -> LoadedArchive:
    data = read_archive_file(path)
    try:
        return load_archive_bytes(data)
    except ArchiveError as exc:
        raise BackupToolError(f"{path}: {exc}") from None


def summary(loaded: LoadedArchive) -> str:
    a, sm = loaded.archive, loaded.state
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.header.created_at))
    return "\n".join(
        [
            f"cluster id: {a.header.cluster_id}",
            f"index:      {a.header.index} (term {a.header.term})",
            f"created:    {created} by node {a.header.node_id} (quorumd {a.header.version})",
            f"members:    {len(sm.members())}",
            f"pools:      {len(sm.pools())}",
            f"leases:     {sm.lease_count()}",
            f"tokens:     {len(sm.api_tokens())}",
            f"size:       {a.size} bytes",
            f"sha256:     {a.sha256}",
        ]
    )


def verify(path: Path) -> str:
    return "archive OK\n" + summary(load_archive(path))


def _check_empty(data_dir: Path) -> bool:
    """True when ``data_dir`` exists (and is empty); raises when it is in use."""
    if not data_dir.exists() and not data_dir.is_symlink():
        return False
    if not data_dir.is_dir():
        raise BackupToolError(f"data-dir {data_dir} exists and is not a directory", 2)
    if any(data_dir.iterdir()):
        raise BackupToolError(f"data-dir {data_dir} is not empty: restore needs an empty data dir", 2)
    return True


def restore(cfg: Config, archive_path: Path) -> str:
    data_dir = cfg.data_dir
    existed = _check_empty(data_dir)
    loaded = load_archive(archive_path)
    sm, header = loaded.state, loaded.archive.header
    node_id = cfg.node_id
    now = time.time()
    try:
        ident = pki.generate_node_identity(node_id, header.cluster_id)
    except pki.PkiError as exc:
        raise BackupToolError(f"{archive_path}: the archive's cluster id is not usable: {exc}") from None
    member = Member(
        node_id=node_id,
        raft_address=str(cfg.cluster.advertise_address),
        api_address=api_url(cfg),
        binary_version=VERSION,
        cert_fingerprint=ident.fingerprint,
        cert_pem=ident.cert_pem.decode(),
        drain_state=DrainState.ACTIVE,
        drain_changed_at=now,
        drain_deadline=None,
        left=False,
    )
    token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
    while sm.api_token(token_id) is not None:
        token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
    secret = secrets.token_bytes(32)
    admin = ApiToken(token_id, "admin", TokenRole.ADMIN, apitoken.hash_secret(secret), now, None)
    index = header.index + 1
    term = max(header.term, 1)
    sm.refound(index, member, secrets.token_bytes(32), admin)
    config = Configuration(voters=frozenset({node_id}), nonvoters=frozenset())
    snap = Snapshot(SnapshotMeta(index, term, config), sm.snapshot())
    top = data_dir  # the outermost directory this run creates (removed on failure)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        ensure_data_dir(data_dir)
        storage, _ = LogStorage.open(data_dir / "raft")
        with storage:
            storage.install_snapshot(snap)
            storage.set_hard_state(HardState(term=term, vote=0, commit=index))
            storage.sync()
        pki.write_private_file(data_dir / "tls" / "node.crt", ident.cert_pem)
        pki.write_private_file(data_dir / "tls" / "node.key", ident.key_pem)
        write_node_file(data_dir, {"node_id": node_id, "cluster_id": header.cluster_id, "founder": True})
        token_text = apitoken.format_api_token(token_id, secret)
        pki.write_private_file(data_dir / "admin.token", (token_text + "\n").encode())
    except BaseException as exc:  # Ctrl-C too: never a half-written data dir
        _undo(data_dir if existed else top, existed)
        if not isinstance(exc, Exception):
            raise
        raise BackupToolError(f"restore failed, nothing kept in {data_dir}: {exc}") from None
    return "\n".join(
        [
            f"restored cluster {header.cluster_id} from index {header.index} into {data_dir}",
            f"node {node_id} is the only voter; {len(sm.pools())} pools, {sm.lease_count()} leases, "
            f"{len(sm.api_tokens())} API tokens (the earlier ones keep working)",
            "join tokens minted before the restore are refused: mint new ones for the other hosts",
            f"admin token: {data_dir / 'admin.token'}",
            "next: start the node (quorumd run), then join the other hosts with empty data dirs",
        ]
    )


def _undo(data_dir: Path, existed: bool) -> None:
    if not existed:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for child in list(data_dir.iterdir()) if data_dir.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
