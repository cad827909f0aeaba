"""The steps of a node's start that need no running node: storage, identity, state, TLS, joining.

``wait_for_disk_space`` holds the start while the data dir's file system is full (see its
docstring); ``open_storage`` opens the write-ahead log (refusing a newer build's data dir with exit 2 and a
corrupt one with exit 1); ``resolve_identity`` decides whether this start is a restart, a join or
a founding and loads or mints the node certificate accordingly; ``restore_state`` loads the
stored snapshot into a ``StateMachine``; ``join_cluster`` runs the joiner's side of the join
bootstrap against the leader the token names and the configured peers; ``api_ssl_context`` loads
or generates the API certificate. The composition root (``root.py``) calls them in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from quorumd.node.cluster import pki
from quorumd.node.cluster.service import pack, unpack
from quorumd.node.config.schema import Config
from quorumd.node.daemon.apitls import ApiTlsError, ApiTlsPair, load_api_tls
from quorumd.node.daemon.datadir import FatalError, NewerFormatError, load_identity_files, write_node_file
from quorumd.node.daemon.gcpolicy import gc_paused
from quorumd.node.daemon.testhooks import wal_preallocate_bytes
from quorumd.node.registry import jointoken
from quorumd.node.registry.leases import SnapshotError
from quorumd.node.registry.records import SnapshotFormatError
from quorumd.node.registry.snapshot_codec import check_snapshot_format
from quorumd.node.registry.state import StateMachine
from quorumd.node.version import PROTOCOL_VERSION
from quorumd.raft.aio.storage import LogStorage, RecoveredState, StorageError, StorageFormatError
from quorumd.raft.aio.storage_errors import free_bytes
from quorumd.raft.aio.transport import JoinPinMismatch, join_call
from quorumd.raft.core.types import Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timing:
    tick_seconds: float
    heartbeat_ticks: int
    election_ticks: int


def timing_for(cfg: Config) -> Timing:
    hb = cfg.cluster.heartbeat_interval_seconds
    tick = min(hb / 2.0, 0.025)
    return Timing(tick, max(1, round(hb / tick)), max(2, round(cfg.cluster.election_timeout_seconds / tick)))


def api_url(cfg: Config) -> str:
    host = cfg.api.address
    if host in ("0.0.0.0", "::", ""):
        host = cfg.cluster.advertise_address.host
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{cfg.api.port}"


def heap_trim_seconds() -> float:
    """How often the C heap is trimmed (node/daemon/gcpolicy.py): 30 s, or
    ``QUORUMD_HEAP_TRIM_SECONDS`` (a measurement knob: ``inf`` turns trimming off)."""
    try:
        value = float(os.environ.get("QUORUMD_HEAP_TRIM_SECONDS", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


# --- storage and state ------------------------------------------------------------------------
START_FREE_BYTES = 1 << 20  # free space the start waits for: node.json, keys, the first records
DISK_WAIT_MIN_SECONDS = 0.5
DISK_WAIT_MAX_SECONDS = 10.0
DISK_FULL_LOG_SECONDS = 60.0


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a first start's data dir may not exist yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


async def wait_for_disk_space(
    data_dir: Path,
    stop: asyncio.Event,
    notify: Callable[[str], object],
    need: int = START_FREE_BYTES,
) -> bool:
    """Hold the start until the data dir's file system has ``need`` bytes free; False when
    ``stop`` is set first (a clean stop, exit 0).

    A full disk at start is a condition to wait out, not a failure to exit on: exiting would
    have systemd restart the node every ``RestartSec`` until ``StartLimitBurst`` gives up on it
    for good (systemd 252, Debian bookworm's, has no growing restart delay). So: one ERROR line
    ``disk_full path=... free=...`` (again at most every ``DISK_FULL_LOG_SECONDS``), a check
    every 0.5 s doubling to ``DISK_WAIT_MAX_SECONDS``, and under systemd ``STATUS=`` plus
    ``EXTEND_TIMEOUT_USEC=`` so that ``TimeoutStartSec`` does not kill the wait. Nothing in the
    data dir is touched before there is room."""
    started = time.monotonic()
    delay = DISK_WAIT_MIN_SECONDS
    logged_at: float | None = None
    attempt = 0
    while True:
        path = _existing(data_dir)
        free = free_bytes(path)
        if free < 0 or free >= need:  # unknown (statvfs failed): opening the storage will tell
            if logged_at is not None:
                log.warning(
                    "disk_space_recovered path=%s free=%d waited_seconds=%.1f",
                    data_dir, free, time.monotonic() - started,
                )  # fmt: skip
                notify("STATUS=starting")
            return True
        attempt += 1
        now = time.monotonic()
        if logged_at is None or now - logged_at >= DISK_FULL_LOG_SECONDS:
            logged_at = now
            log.error(
                "disk_full path=%s free=%d need=%d (the start waits until there is room)",
                data_dir, free, need,
            )  # fmt: skip
        log.debug("disk_space_wait attempt=%d free=%d delay_seconds=%.1f", attempt, free, delay)
        notify(
            f"STATUS=disk full: {data_dir}: {free} bytes free, waiting for {need}\n"
            f"EXTEND_TIMEOUT_USEC={int((delay + 30.0) * 1_000_000)}"
        )
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
            return False
        except TimeoutError:
            pass
        delay = min(delay * 2, DISK_WAIT_MAX_SECONDS)


def check_state_format(raft_dir: Path, snapshot: Snapshot) -> None:
    """The storage's hook (before it changes anything): a state snapshot in a newer format."""
    try:
        check_snapshot_format(snapshot.data)
    except SnapshotFormatError as exc:
        m = snapshot.meta
        raise StorageFormatError(
            raft_dir / f"snap-{m.index:016x}-{m.term:016x}.snap", exc.found, exc.known, "state snapshot"
        ) from exc


def open_storage(data_dir: Path) -> tuple[LogStorage, RecoveredState]:
    """Open ``<data-dir>/raft`` (blocking: run it in an executor)."""
    raft_dir = data_dir / "raft"
    try:
        return LogStorage.open(
            raft_dir,
            preallocate_bytes=wal_preallocate_bytes(),
            check_snapshot=partial(check_state_format, raft_dir),
        )
    except StorageFormatError as exc:  # a newer build's data dir: refuse, change nothing
        raise NewerFormatError(str(exc)) from exc
    except StorageError as exc:  # corrupt beyond a torn tail, locked, unreadable: refuse to start
        raise FatalError(f"cannot open the Raft state: {exc}") from exc


def restore_state(data_dir: Path, snapshot: Snapshot | None) -> StateMachine:
    """The replicated state of the stored snapshot (an empty one without)."""
    sm = StateMachine()
    if snapshot is None:
        return sm
    meta = snapshot.meta
    try:
        with gc_paused():
            sm.restore(snapshot.data)
    except SnapshotFormatError as exc:
        snap_file = data_dir / "raft" / f"snap-{meta.index:016x}-{meta.term:016x}.snap"
        raise NewerFormatError(
            f"{snap_file} holds a state snapshot in format version {exc.found}; this build reads "
            f"up to version {exc.known} (run a newer build on this data dir)"
        ) from exc
    except SnapshotError as exc:
        raise FatalError(f"stored snapshot {meta.index}/{meta.term} is not a valid state: {exc}") from exc
    return sm


# --- identity ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartIdentity:
    """Who this node is at this start: its cluster, its certificate, and how it starts."""

    cluster_id: str
    cert_pem: bytes
    key_pem: bytes
    founder: bool  # this node founded its cluster (now or at its first start)
    claims: jointoken.JoinClaims | None = None  # set: this start joins with these claims


def new_identity(
    data_dir: Path, node_id: int, cluster_id: str, *, founder: bool, lifetime_seconds: float
) -> tuple[bytes, bytes]:
    ident = pki.generate_node_identity(node_id, cluster_id, lifetime_seconds=lifetime_seconds)
    pki.IdentityFiles(data_dir).write(ident.cert_pem, ident.key_pem)
    write_node_file(data_dir, {"node_id": node_id, "cluster_id": cluster_id, "founder": founder})
    return ident.cert_pem, ident.key_pem


def resolve_identity(cfg: Config, meta: dict[str, Any] | None, *, has_state: bool) -> StartIdentity:
    """A restart (stored Raft state), a join (a join token and no state) or a founding."""
    data_dir = cfg.data_dir
    lifetime = cfg.cluster.certificate_lifetime_seconds
    if has_state:
        if meta is None:
            raise FatalError(f"{data_dir}: Raft state present but node.json is missing")
        cert_pem, key_pem = load_identity_files(data_dir)
        log.info("node_restart node=%d cluster=%s", cfg.node_id, meta["cluster_id"])
        return StartIdentity(str(meta["cluster_id"]), cert_pem, key_pem, bool(meta.get("founder")))
    if cfg.cluster.enabled and cfg.cluster.join_token is not None:
        try:
            claims = jointoken.parse_join_token(cfg.cluster.join_token)
        except jointoken.JoinTokenError as exc:
            raise FatalError(f"cluster.join-token: {exc}") from exc
        if claims.node_id != cfg.node_id:
            raise FatalError(f"join token is for node {claims.node_id}, this is node {cfg.node_id}")
        cluster_id = claims.cluster_id
        tls = data_dir / "tls"
        if (
            meta is not None
            and meta.get("cluster_id") == cluster_id
            and (tls / "node.crt").exists()
            and (tls / "node.key").exists()
        ):
            # A join that was cut short (the process died before any Raft state was stored):
            # keep the identity the leader may already have registered, so that a leader
            # that accepts retries by the same certificate can recognise this node.
            cert_pem, key_pem = load_identity_files(data_dir)
            log.info("join_retry node=%d cluster=%s (identity kept)", cfg.node_id, cluster_id)
        else:
            cert_pem, key_pem = new_identity(
                data_dir, cfg.node_id, cluster_id, founder=False, lifetime_seconds=lifetime
            )
        return StartIdentity(cluster_id, cert_pem, key_pem, False, claims)
    cluster_id = uuid.uuid4().hex
    cert_pem, key_pem = new_identity(
        data_dir, cfg.node_id, cluster_id, founder=True, lifetime_seconds=lifetime
    )
    return StartIdentity(cluster_id, cert_pem, key_pem, True)


def api_ssl_context(cfg: Config) -> ApiTlsPair:
    """The API's TLS pair and context: ``api.tls`` when configured, else a self-signed pair kept
    in the data dir (generated once). Built by ``load_api_tls``, as every SIGHUP reload is; a pair
    that cannot serve stops the start (exit 1, naming the file)."""
    if cfg.api.tls is not None:
        cert, key = cfg.api.tls.cert, cfg.api.tls.key
    else:
        hosts = sorted({cfg.cluster.advertise_address.host, cfg.api.address} - {"0.0.0.0", "::"})
        cert, key = pki.load_or_create_api_cert(cfg.data_dir / "tls", hosts)
    try:
        return load_api_tls(cert, key)
    except ApiTlsError as exc:
        raise FatalError(f"API certificate: {exc}") from None


# --- joining ----------------------------------------------------------------------------------
async def join_cluster(
    cfg: Config, claims: jointoken.JoinClaims, member_context: bytes
) -> list[tuple[int, str, str]]:
    """The joiner's side of the join bootstrap: ask the token's leader, then the configured
    peers, until one admits this node (answers its members: ``(node id, raft address,
    fingerprint)``), refuses it (``FatalError`` with the reason), or ``join-timeout`` passes."""
    assert cfg.cluster.join_token is not None
    cert_pem, key_pem = load_identity_files(cfg.data_dir)
    payload = pack(
        {
            "token": cfg.cluster.join_token,
            "node_id": cfg.node_id,
            "context": member_context,
            "protocol_version": PROTOCOL_VERSION,  # absent (the baseline build): 1
        }
    )
    addresses = list(dict.fromkeys([*claims.leader_addresses, *(str(p) for p in cfg.cluster.peers)]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.cluster.join_timeout_seconds
    attempt = 0
    last_error = "no peer answered"
    while loop.time() < deadline:
        for addr in addresses:
            try:
                raw = await join_call(
                    addr, claims.leader_fingerprint, payload, cert_pem, key_pem, timeout=10.0
                )
                resp = unpack(raw)
            except Exception as exc:  # network errors, pin mismatch: try the next peer
                last_error = f"{addr}: {type(exc).__name__}: {exc}"
                if isinstance(exc, JoinPinMismatch):  # fingerprints only: nothing secret
                    log.warning("join_attempt_failed address=%s error=JoinPinMismatch detail=%s", addr, exc)
                else:
                    log.info("join_attempt_failed address=%s error=%s", addr, type(exc).__name__)
                continue
            if resp.get("ok"):
                members = [(int(nid), str(raddr), str(fp)) for nid, raddr, fp in resp["members"]]
                log.info("join_accepted node=%d members=%d", cfg.node_id, len(members))
                return members
            reason = str(resp.get("reason"))
            if reason not in ("no_leader", "retry"):
                raise FatalError(f"join refused: {reason}: {resp.get('message')}")
            last_error = f"{addr}: {reason}"
        attempt += 1
        await asyncio.sleep(min(2.0, 0.1 * 2**attempt))  # backoff between rounds of attempts
    raise FatalError(f"could not join within {cfg.cluster.join_timeout_seconds:g}s: {last_error}")
