"""The composition root of ``quorumd run``: builds every runtime object from the validated config.

Each startup step is paired with its cleanup on one ``AsyncExitStack`` and unwound in reverse
order with bounded timeouts. SIGTERM/SIGINT set the stop event (a second signal exits at once);
a stopping leader hands leadership to the best voter first. Under systemd the daemon speaks
sd_notify (READY=1 once the API serves and the node has joined, WATCHDOG=1, STOPPING=1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import ssl
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from quorumd.api.app import build_app
from quorumd.api.errors import ApiError
from quorumd.api.extensions import BackupArchive
from quorumd.api.ports import DrainState, ForwardedRequest
from quorumd.api.server import ApiServer
from quorumd.node.cluster import pki
from quorumd.node.cluster.backup import take_archive
from quorumd.node.cluster.operations import ClusterNode
from quorumd.node.cluster.service import Identity, pack, unpack
from quorumd.node.config.schema import Config
from quorumd.node.daemon.backups import BackupScheduler
from quorumd.node.daemon.datadir import (
    FatalError,
    NewerFormatError,
    ensure_data_dir,
    load_identity_files,
    read_node_file,
    write_node_file,
)
from quorumd.node.daemon.gcpolicy import GcPolicy, gc_paused
from quorumd.node.daemon.metrics import Metrics
from quorumd.node.daemon.node_collector import NodeView, node_view
from quorumd.node.daemon.sdnotify import SdNotifier
from quorumd.node.daemon.testhooks import ApplyTrace, LoopLagProbe, planted_bugs
from quorumd.node.effects.bgp import StubBgpSpeaker
from quorumd.node.effects.ran import WebhookRanNotifier
from quorumd.node.registry import jointoken
from quorumd.node.registry.autopilot import AutopilotSettings
from quorumd.node.registry.commands import (
    CreateApiToken,
    EntryNeedsNewerProtocol,
    MarkNodeLeft,
    RegisterNodeInfo,
    SetClusterSecrets,
)
from quorumd.node.registry.state import (
    ApplyResult,
    SnapshotError,
    SnapshotFormatError,
    StateMachine,
    check_snapshot_format,
)
from quorumd.node.version import PROTOCOL_VERSION, VERSION
from quorumd.raft.aio.driver import DriverHooks, RaftDriver
from quorumd.raft.aio.storage import LogStorage, RecoveredState, StorageError, StorageFormatError
from quorumd.raft.aio.transport import ClusterTransport, JoinPinMismatch, join_call
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import CoreConfig, RaftError, SoftState
from quorumd.raft.core.types import ConfChange, Entry, HardState, Role, Snapshot

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


# --- the daemon ---------------------------------------------------------------------------
def check_state_format(raft_dir: Path, snapshot: Snapshot) -> None:
    """The storage's hook (before it changes anything): a state snapshot in a newer format."""
    try:
        check_snapshot_format(snapshot.data)
    except SnapshotFormatError as exc:
        m = snapshot.meta
        raise StorageFormatError(
            raft_dir / f"snap-{m.index:016x}-{m.term:016x}.snap", exc.found, exc.known, "state snapshot"
        ) from exc


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir
        self.stop_event = asyncio.Event()
        self.notifier = SdNotifier.from_env()
        self.metrics = Metrics(VERSION)
        self.metrics.set_source(self._node_view)
        self.timing = timing_for(cfg)
        self.node: ClusterNode | None = None
        self.transport: ClusterTransport | None = None
        self.driver: RaftDriver | None = None
        self.api_port = 0
        self.cluster_port = 0
        self._bootstrap_pins: dict[int, str] = {}
        self._bootstrap_addrs: dict[int, str] = {}
        self._founder = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._transport_seen: dict[str, int] = {}
        self.gc = GcPolicy()
        self.exit_code = 0

    # --- startup -----------------------------------------------------------------------------
    async def run(self) -> int:
        async with AsyncExitStack() as stack:
            await self._start(stack)
            await self.stop_event.wait()
            log.info("shutdown_start node=%d", self.cfg.node_id)
            self.notifier.notify("STOPPING=1")
            await self._graceful_stop()
        log.info("shutdown_done node=%d exit_code=%d", self.cfg.node_id, self.exit_code)
        return self.exit_code

    async def _start(self, stack: AsyncExitStack) -> None:
        cfg = self.cfg
        for note in cfg.notes:
            log.info("config_note %s", note)
        meta = read_node_file(self.data_dir)  # before anything is written: see NewerFormatError
        ensure_data_dir(self.data_dir)
        if meta is not None and meta["node_id"] != cfg.node_id:
            raise FatalError(
                f"data-dir {self.data_dir} belongs to node {meta['node_id']}, "
                f"but cluster.node-id is {cfg.node_id}"
            )
        loop = asyncio.get_running_loop()
        try:
            storage, recovered = await loop.run_in_executor(
                None,
                partial(
                    LogStorage.open,
                    self.data_dir / "raft",
                    check_snapshot=partial(check_state_format, self.data_dir / "raft"),
                ),
            )
        except StorageFormatError as exc:  # a newer build's data dir: refuse, change nothing
            raise NewerFormatError(str(exc)) from exc
        except StorageError as exc:  # corrupt beyond a torn tail, locked, unreadable: refuse to start
            raise FatalError(f"cannot open the Raft state: {exc}") from exc
        stack.callback(storage.close)
        has_state = bool(recovered.entries) or recovered.snapshot is not None or recovered.hard_state.term > 0
        claims: jointoken.JoinClaims | None = None
        if has_state:
            if meta is None:
                raise FatalError(f"{self.data_dir}: Raft state present but node.json is missing")
            cluster_id = str(meta["cluster_id"])
            self._founder = bool(meta.get("founder"))
            cert_pem, key_pem = load_identity_files(self.data_dir)
            log.info("node_restart node=%d cluster=%s", cfg.node_id, cluster_id)
        elif cfg.cluster.enabled and cfg.cluster.join_token is not None:
            try:
                claims = jointoken.parse_join_token(cfg.cluster.join_token)
            except jointoken.JoinTokenError as exc:
                raise FatalError(f"cluster.join-token: {exc}") from exc
            if claims.node_id != cfg.node_id:
                raise FatalError(f"join token is for node {claims.node_id}, this is node {cfg.node_id}")
            cluster_id = claims.cluster_id
            tls = self.data_dir / "tls"
            if (
                meta is not None
                and meta.get("cluster_id") == cluster_id
                and (tls / "node.crt").exists()
                and (tls / "node.key").exists()
            ):
                # A join that was cut short (the process died before any Raft state was stored):
                # keep the identity the leader may already have registered, so that a leader
                # that accepts retries by the same certificate can recognise this node.
                cert_pem, key_pem = load_identity_files(self.data_dir)
                log.info("join_retry node=%d cluster=%s (identity kept)", cfg.node_id, cluster_id)
            else:
                cert_pem, key_pem = self._new_identity(cluster_id, founder=False)
        else:
            cluster_id = uuid.uuid4().hex
            cert_pem, key_pem = self._new_identity(cluster_id, founder=True)
            self._founder = True
        fp = pki.fingerprint(pki.pem_to_der(cert_pem))
        identity = Identity(
            node_id=cfg.node_id,
            cluster_id=cluster_id,
            version=VERSION,
            raft_address=str(cfg.cluster.advertise_address),
            api_address=api_url(cfg),
            fingerprint=fp,
            cert_pem=cert_pem.decode(),
        )
        sm = StateMachine()
        if recovered.snapshot is not None:
            try:
                with gc_paused():
                    sm.restore(recovered.snapshot.data)
            except SnapshotFormatError as exc:
                snap = recovered.snapshot.meta
                snap_file = self.data_dir / "raft" / f"snap-{snap.index:016x}-{snap.term:016x}.snap"
                raise NewerFormatError(
                    f"{snap_file} holds a state snapshot in format version {exc.found}; this build reads "
                    f"up to version {exc.known} (run a newer build on this data dir)"
                ) from exc
            except SnapshotError as exc:
                snap = recovered.snapshot.meta
                raise FatalError(
                    f"stored snapshot {snap.index}/{snap.term} is not a valid state: {exc}"
                ) from exc
        node = self._build_node(identity, sm)
        self.node = node
        trace = ApplyTrace.from_env(cfg.node_id, node)
        if trace is not None:
            stack.callback(trace.close)
            if recovered.snapshot is not None:
                trace.restored("R", recovered.snapshot.meta.index, recovered.snapshot.data)
        if not has_state and claims is None:
            hs, entries = await loop.run_in_executor(None, self._bootstrap, storage, node)
            recovered = RecoveredState(hs, None, entries)
        core_config = CoreConfig(
            node_id=cfg.node_id,
            election_ticks=self.timing.election_ticks,
            heartbeat_ticks=self.timing.heartbeat_ticks,
            trailing_logs=cfg.cluster.trailing_logs,
            lazy_commit_broadcast=True,
            **planted_bugs(),
        )
        try:
            core = RaftCore(
                core_config,
                random.Random(secrets.randbits(64)),
                hard_state=recovered.hard_state,
                snapshot=recovered.snapshot,
                entries=recovered.entries,
            )
        except RaftError as exc:  # e.g. a stored commit index beyond the stored log
            raise FatalError(f"inconsistent Raft state in {self.data_dir / 'raft'}: {exc}") from exc
        transport: ClusterTransport | None = None
        if cfg.cluster.enabled:
            transport = ClusterTransport(
                node_id=cfg.node_id,
                cluster_id=cluster_id,
                cert_pem=cert_pem,
                key_pem=key_pem,
                pins={},
                addresses={},
                on_raft_frame=self._on_raft_frame,
            )
            self.transport = transport
            node.set_rpc(transport.rpc)
        driver = RaftDriver(
            core,
            storage,
            trace if trace is not None else node,
            transport.send if transport else (lambda _to, _frame: True),
            tick_seconds=self.timing.tick_seconds,
            snapshot_threshold=cfg.cluster.snapshot_threshold,
            hooks=DriverHooks(
                on_soft_state=self._on_soft_state,
                on_fsync=self.metrics.observe_fsync,
                on_commit_latency=self.metrics.observe_commit,
                on_snapshot=self._on_snapshot,
                on_bad_message=lambda _p, _r: self.metrics.count_bad_message(),
            ),
        )
        self.driver = driver
        node.driver = driver
        node.add_apply_listener(self._after_apply)
        self._update_pins()

        if transport is not None:
            transport.on_raft_peer_lost = driver.peer_connection_lost  # fast failover hint
            self._register_rpcs(transport, node)
            self.cluster_port = await transport.start(str(cfg.cluster.bind_address))
            stack.push_async_callback(self._bounded, transport.close(), 5.0)
        self.gc.settled()  # the replicated state is loaded: freeze it (see node/daemon/gcpolicy.py)
        core.fast_forward_election()
        driver.start().add_done_callback(self._on_driver_exit)
        stack.push_async_callback(self._bounded, driver.close(), 5.0)

        if claims is not None:
            await self._join(claims, node, transport)
        else:
            await self._replay_local_log(node, core.commit_index)

        # API server
        app = build_app(
            node,
            node_id=cfg.node_id,
            registry=self.metrics.registry,
            forward_timeout_seconds=cfg.cluster.propose_timeout_seconds,
            propose_timeout_seconds=cfg.cluster.propose_timeout_seconds,
        )
        self.app = app
        api_server = ApiServer(app)
        self.api_port = await api_server.start(cfg.api.address, cfg.api.port, ssl_context=self._api_ssl())
        stack.push_async_callback(self._bounded, api_server.close(), 5.0)
        log.info("api_listening node=%d address=%s port=%d", cfg.node_id, cfg.api.address, self.api_port)

        for coro, name in (
            (node.reconcile_loop(), "reconcile"),
            (self._announce_loop(), "announce"),
            (self._ready_loop(), "ready"),
        ):
            self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))
        if cfg.backup.dir is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._backups(node), name="backups"))
        if (probe := LoopLagProbe.from_env()) is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(probe.run(), name="loop-probe"))
        stack.push_async_callback(self._cancel_tasks)
        await node.ran.start()
        stack.push_async_callback(self._bounded, node.ran.close(), 3.0)
        if cfg.bgp.enabled:
            node.kick_drain_side_effects()

    def _new_identity(self, cluster_id: str, *, founder: bool) -> tuple[bytes, bytes]:
        ident = pki.generate_node_identity(self.cfg.node_id, cluster_id)
        pki.write_private_file(self.data_dir / "tls" / "node.crt", ident.cert_pem)
        pki.write_private_file(self.data_dir / "tls" / "node.key", ident.key_pem)
        write_node_file(
            self.data_dir, {"node_id": self.cfg.node_id, "cluster_id": cluster_id, "founder": founder}
        )
        return ident.cert_pem, ident.key_pem

    def _bootstrap(self, storage: LogStorage, node: ClusterNode) -> tuple[HardState, list[Entry]]:
        hs, entries = RaftCore.bootstrap_entries(self.cfg.node_id, node.member_context(None))
        storage.append(entries)
        storage.set_hard_state(hs)
        storage.sync()
        log.info("cluster_bootstrapped node=%d cluster=%s", self.cfg.node_id, node.identity.cluster_id)
        return hs, entries

    def _build_node(self, identity: Identity, sm: StateMachine) -> ClusterNode:
        cfg = self.cfg
        ap = cfg.cluster.autopilot
        bgp = StubBgpSpeaker(on_change=self.metrics.set_bgp)
        ran = WebhookRanNotifier(cfg.ran.notify_url, on_event=self.metrics.count_ran)
        node = ClusterNode(
            identity,
            sm,
            cluster_enabled=cfg.cluster.enabled,
            propose_timeout_seconds=cfg.cluster.propose_timeout_seconds,
            tick_seconds=self.timing.tick_seconds,
            max_trailing_logs=ap.max_trailing_logs,
            autopilot=AutopilotSettings(
                last_contact_threshold_seconds=ap.last_contact_threshold_seconds,
                max_trailing_logs=ap.max_trailing_logs,
                server_stabilization_seconds=ap.server_stabilization_time_seconds,
                cleanup_dead_servers=ap.cleanup_dead_servers,
                min_quorum=ap.min_quorum,
            ),
            reconcile_interval_seconds=ap.reconcile_interval_seconds,
            bgp=bgp,
            bgp_enabled=cfg.bgp.enabled,
            ran=ran,
            election_timeout_seconds=cfg.cluster.election_timeout_seconds,
        )
        node.trail.retention = cfg.audit.retention  # carried in every audit record's entry
        node.on_join_result = self.metrics.count_join
        return node

    def _api_ssl(self) -> ssl.SSLContext:
        cfg = self.cfg
        if cfg.api.tls is not None:
            cert, key = cfg.api.tls.cert, cfg.api.tls.key
        else:
            hosts = sorted({cfg.cluster.advertise_address.host, cfg.api.address} - {"0.0.0.0", "::"})
            cert, key = pki.load_or_create_api_cert(self.data_dir / "tls", hosts)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    # --- joining -------------------------------------------------------------------------------
    async def _join(
        self, claims: jointoken.JoinClaims, node: ClusterNode, transport: ClusterTransport | None
    ) -> None:
        assert transport is not None and self.cfg.cluster.join_token is not None
        cfg = self.cfg
        cert_pem, key_pem = load_identity_files(self.data_dir)
        payload = pack(
            {
                "token": cfg.cluster.join_token,
                "node_id": cfg.node_id,
                "context": node.member_context(claims.token_id),
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
                        log.warning(
                            "join_attempt_failed address=%s error=JoinPinMismatch detail=%s", addr, exc
                        )
                    else:
                        log.info("join_attempt_failed address=%s error=%s", addr, type(exc).__name__)
                    continue
                if resp.get("ok"):
                    for nid, raddr, fp in resp["members"]:
                        self._bootstrap_pins[int(nid)] = str(fp)
                        self._bootstrap_addrs[int(nid)] = str(raddr)
                    self._update_pins()
                    log.info("join_accepted node=%d members=%d", cfg.node_id, len(resp["members"]))
                    return
                reason = str(resp.get("reason"))
                if reason not in ("no_leader", "retry"):
                    raise FatalError(f"join refused: {reason}: {resp.get('message')}")
                last_error = f"{addr}: {reason}"
            attempt += 1
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise FatalError(f"could not join within {cfg.cluster.join_timeout_seconds:g}s: {last_error}")

    async def _replay_local_log(self, node: ClusterNode, commit: int) -> None:
        """Apply the locally known committed entries before the API serves anything.

        Without this, a restarted node answered from an empty (or snapshot-old) replica for the
        moment its first batch was being applied: 401 for valid API tokens, missing leases.
        Bounded: a node that cannot apply in time starts anyway (and is not ready); a stop
        (signal, dead driver) ends the wait at once."""
        if node.sm.applied_index >= commit:
            return
        started = time.monotonic()
        timeout = self.cfg.cluster.join_timeout_seconds
        applied = asyncio.ensure_future(node.wait_state(lambda: node.sm.applied_index >= commit, timeout))
        stopped = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({applied, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (applied, stopped):
                t.cancel()
        ok = node.sm.applied_index >= commit
        log.info(
            "local_log_replayed node=%d applied=%d commit=%d seconds=%.3f complete=%s",
            self.cfg.node_id, node.sm.applied_index, commit, time.monotonic() - started, ok,
        )  # fmt: skip

    def _on_driver_exit(self, task: asyncio.Task[None]) -> None:
        """A dead Raft driver must stop the process (better than serving stale data)."""
        if task.cancelled() or self.stop_event.is_set():
            return
        exc = task.exception()
        if exc is None:  # closed by the unwinding of a failed startup: that error is what matters
            return
        if isinstance(exc, EntryNeedsNewerProtocol):  # never skip it: stop until upgraded
            log.critical(
                "entry_needs_newer_protocol index=%d needs=%d have=%d", exc.index, exc.needs, exc.have
            )
        else:
            log.critical("raft_driver_died error=%r", exc)
        self.exit_code = 1
        self.stop_event.set()

    # --- runtime hooks --------------------------------------------------------------------------
    def _on_raft_frame(self, from_id: int, frame: bytes) -> None:
        if self.driver is not None:
            self.driver.deliver(from_id, frame)

    def _update_pins(self) -> None:
        if self.transport is None or self.node is None:
            return
        sm = self.node.sm
        pins = sm.pins()
        addrs = {m.node_id: m.raft_address for m in sm.members()}
        if self.cfg.node_id not in pins:
            # Not yet in our own replica (a joiner catching up): trust what the join returned.
            for nid, fp in self._bootstrap_pins.items():
                pins.setdefault(nid, fp)
                addrs.setdefault(nid, self._bootstrap_addrs[nid])
        pins.pop(self.cfg.node_id, None)
        addrs.pop(self.cfg.node_id, None)
        self.transport.update_pins(pins, addrs)

    def _on_snapshot(self, _index: int) -> None:
        self.metrics.count_snapshot()
        self.gc.after_snapshot()

    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        if not results or any(isinstance(r.command, ConfChange) for r in results):
            self._update_pins()

    def _on_soft_state(self, old: SoftState, new: SoftState) -> None:
        if old.leader_id != new.leader_id:
            self.metrics.count_leader_change()
        if self.node is not None and (old.role == Role.LEADER) != (new.role == Role.LEADER):
            self.node.on_leadership_change(new.role == Role.LEADER)
            if new.role == Role.LEADER:
                self._tasks.append(asyncio.get_running_loop().create_task(self._on_became_leader()))

    async def _on_became_leader(self) -> None:
        """Founder duties that need a leader: cluster secrets and the first admin token."""
        node = self.node
        assert node is not None
        try:
            if node.sm.cluster_id is None:
                await node.propose(
                    SetClusterSecrets(time.time(), node.identity.cluster_id, secrets.token_bytes(32))
                )
            token_file = self.data_dir / "admin.token"
            if self._founder and not token_file.exists():
                from quorumd.node.registry import apitoken

                token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
                secret = secrets.token_bytes(32)
                from quorumd.api.ports import TokenRole

                await node.propose(
                    CreateApiToken(
                        time.time(), token_id, "admin", TokenRole.ADMIN, apitoken.hash_secret(secret), None
                    )
                )
                pki.write_private_file(
                    token_file, (apitoken.format_api_token(token_id, secret) + "\n").encode()
                )
                log.info("admin_token_written path=%s", token_file)
        except ApiError as exc:
            log.warning("leader_init_deferred reason=%s", exc.code)

    async def _backups(self, node: ClusterNode) -> None:
        """Scheduled backups (config ``backup``): see node/daemon/backups.py."""

        async def archive() -> BackupArchive:
            return await take_archive(node, linearizable=False)

        async def ready() -> None:
            while not await node.wait_state(lambda: node.sm.cluster_id is not None, 60.0):
                pass

        sched = BackupScheduler(
            self.cfg.backup, self.cfg.node_id, node.identity.cluster_id, archive, self.metrics.backups
        )
        await sched.run(ready)

    async def _announce_loop(self) -> None:
        """Keep this node's registry record current (version, API address, left flag)."""
        node = self.node
        assert node is not None
        while True:
            m = node.sm.member(self.cfg.node_id)
            try:
                if m is not None and node.leader_id() != 0:
                    if m.binary_version != VERSION or m.api_address != node.identity.api_address:
                        await node.announce(
                            RegisterNodeInfo(
                                time.time(), self.cfg.node_id, node.identity.api_address, VERSION
                            )
                        )
                    elif m.left:
                        await node.announce(MarkNodeLeft(time.time(), self.cfg.node_id, False))
                    else:
                        if not node.is_leader():  # the leader asks in its reconcile loop
                            await node.versions.learn(node._rpc, node.d.core.config.members())
                        await asyncio.sleep(2.0)
                        continue
            except ApiError as exc:
                log.info("announce_retry reason=%s", exc.code)
            await asyncio.sleep(0.2)

    async def _ready_loop(self) -> None:
        node = self.node
        assert node is not None
        while not node.is_ready():
            await node.wait_state(node.is_ready, 0.5)
        self.notifier.notify("READY=1")
        log.info("node_ready node=%d", self.cfg.node_id)
        interval = self.notifier.watchdog_interval_seconds()
        if interval:
            while True:
                self.notifier.notify("WATCHDOG=1")
                await asyncio.sleep(interval / 2)

    def _node_view(self) -> NodeView | None:
        """One consistent view of the node for a Prometheus scrape (see node/daemon/node_collector.py)."""
        self._export_transport_stats()
        node, driver = self.node, self.driver
        if node is None or driver is None:
            return None
        view = node.evaluate_autopilot() if node.is_leader() else None
        return node_view(node, driver.core, self.timing.tick_seconds, view)

    def _export_transport_stats(self) -> None:
        """Move the transport's plain counters (refusals by reason, dropped and malformed frames)
        into the Prometheus counters, by the increase since the last call."""
        if self.transport is None:
            return
        stats, seen = self.transport.stats, self._transport_seen
        for reason, count in list(stats.refused_connections.items()):
            delta = count - seen.get(f"refused:{reason}", 0)
            if delta > 0:
                for _ in range(delta):
                    self.metrics.count_refused_connection(reason)
                seen[f"refused:{reason}"] = count
        dropped = stats.frames_dropped - seen.get("dropped", 0)
        if dropped > 0:
            self.metrics.count_dropped_frame(dropped)
            seen["dropped"] = stats.frames_dropped
        malformed = stats.malformed_frames - seen.get("malformed", 0)
        if malformed > 0:
            for _ in range(malformed):
                self.metrics.count_bad_message()
            seen["malformed"] = stats.malformed_frames

    def _register_rpcs(self, transport: ClusterTransport, node: ClusterNode) -> None:
        async def api_forward(from_id: int, payload: bytes) -> bytes:
            # 6 fields, or 8 with the audit trail's source address and receiving node (SPEC 11)
            method, path, query, body, token, hops, *origin = unpack(payload)
            source, via = origin if len(origin) == 2 else (None, None)
            req = ForwardedRequest(
                str(method),
                str(path),
                tuple((str(k), str(v)) for k, v in query) if query else (),
                bytes(body),
                str(token),
                int(hops),
                None if source is None else str(source),
                None if via is None else int(via),
            )
            resp = await self.app.dispatch_forwarded(req)
            if self.driver is not None:
                # The caller waits until its replica has applied resp.applied_index: tell it the
                # commit index now instead of after the lazy-broadcast delay.
                self.driver.flush_commit_broadcast()
            headers = [list(h) for h in resp.headers] if resp.headers else []
            return pack([resp.status, resp.body, headers, resp.applied_index])

        def wrap(fn: Any) -> Any:
            async def handler(from_id: int, payload: bytes) -> bytes:
                try:
                    return await fn(from_id, payload)  # type: ignore[no-any-return]
                except ApiError as exc:
                    raise RuntimeError(f"{exc.code}: {exc.message}") from exc

            return handler

        transport.register_rpc("api.forward", api_forward)
        transport.register_rpc("node.propose", wrap(node.rpc_node_propose))
        transport.register_rpc("member.remove", wrap(node.rpc_member_remove))
        transport.register_rpc("join.forward", node.rpc_join_forward)
        transport.register_rpc("node.info", node.versions.rpc_node_info)  # SPEC 13
        transport.register_join_handler(node.handle_join)

    # --- shutdown ------------------------------------------------------------------------------
    async def _graceful_stop(self) -> None:
        node = self.node
        if node is None or not self.cfg.cluster.enabled or self.exit_code != 0:
            return  # a dead driver (exit 1) cannot hand off or announce
        try:
            if node.is_leader() and len(node.d.core.config.voters) > 1:
                new = await asyncio.wait_for(
                    node.hand_off_leadership(), self.cfg.cluster.election_timeout_seconds * 3
                )
                await asyncio.wait_for(
                    node.trail.record_transfer(self.cfg.node_id, new, "stop", None),
                    self.cfg.cluster.propose_timeout_seconds,
                )
            if node.leader_id() != 0 and len(node.d.core.config.members()) > 1:
                await asyncio.wait_for(
                    node.announce(MarkNodeLeft(time.time(), self.cfg.node_id, True)),
                    self.cfg.cluster.propose_timeout_seconds,
                )
        except (TimeoutError, ApiError) as exc:
            log.info("graceful_stop_partial reason=%s", type(exc).__name__)

    async def _cancel_tasks(self) -> None:
        """Cancel the daemon's own tasks and wait for them; a task that had failed is logged with
        its error (never swallowed), and the stop goes on."""
        for t in self._tasks:
            t.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for t, result in zip(self._tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("task_failed task=%s error=%s", t.get_name(), result, exc_info=result)

    @staticmethod
    async def _bounded(aw: Any, timeout: float) -> None:
        try:
            await asyncio.wait_for(aw, timeout)
        except TimeoutError:
            log.warning("cleanup_timeout")


def install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    count = 0

    def on_signal(signame: str) -> None:
        nonlocal count
        count += 1
        if count > 1:
            log.warning("second_signal_exit signal=%s", signame)
            os._exit(1)
        log.info("signal_received signal=%s", signame)
        daemon.stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def main_async(cfg: Config) -> int:
    daemon = Daemon(cfg)
    install_signal_handlers(daemon)
    return await daemon.run()


__all__ = ["Daemon", "DrainState", "FatalError", "main_async"]
