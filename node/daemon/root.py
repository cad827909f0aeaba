"""The composition root of ``quorumd run``: builds every runtime object from the validated config.

Each startup step is paired with its cleanup on one ``AsyncExitStack`` and unwound in reverse
order with bounded timeouts. SIGTERM/SIGINT set the stop event (a second signal exits at once);
SIGHUP reloads the API certificate (node/daemon/apitls.py); a stopping leader hands leadership
to the best voter first. Under systemd the daemon speaks sd_notify (READY=1 once the API serves
and the node has joined, WATCHDOG=1, STOPPING=1).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from quorumd.api.app import build_app
from quorumd.api.errors import ApiError
from quorumd.api.ports_backup import BackupArchive
from quorumd.api.server import ApiServer
from quorumd.node.cluster import pki
from quorumd.node.cluster.backup import take_archive
from quorumd.node.cluster.certificates import CertificateRotation
from quorumd.node.cluster.operations import ClusterNode
from quorumd.node.cluster.rpcs import register_internal_rpcs
from quorumd.node.cluster.service import ClusterService, Identity
from quorumd.node.config.schema import Config
from quorumd.node.daemon.apitls import ApiTlsReloader
from quorumd.node.daemon.backups import BackupScheduler
from quorumd.node.daemon.datadir import (
    FatalError,
    disk_full_message,
    ensure_data_dir,
    read_node_file,
)
from quorumd.node.daemon.gcpolicy import GcPolicy, HeapTrimmer
from quorumd.node.daemon.metrics import Metrics
from quorumd.node.daemon.node_collector import NodeView, node_view
from quorumd.node.daemon.pins import PEERS_CHANGED, PinBook
from quorumd.node.daemon.sdnotify import SdNotifier, install_signal_handlers
from quorumd.node.daemon.startup import (
    StartIdentity,
    api_ssl_context,
    api_url,
    heap_trim_seconds,
    join_cluster,
    open_storage,
    resolve_identity,
    restore_state,
    timing_for,
    wait_for_disk_space,
)
from quorumd.node.daemon.testhooks import ApplyTrace, LoopLagProbe, planted_bugs
from quorumd.node.effects.gobgp import GoBgpSpeaker, SpeakerError, build_bgp_speaker
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
from quorumd.node.registry.records import ApplyResult
from quorumd.node.registry.state import StateMachine
from quorumd.node.version import VERSION
from quorumd.raft.aio.driver import DriverHooks, RaftDriver
from quorumd.raft.aio.storage import LogStorage, RecoveredState
from quorumd.raft.aio.transport import ClusterTransport
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import CoreConfig, RaftError, SoftState
from quorumd.raft.core.types import Entry, HardState, Role

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir
        self.stop_event = asyncio.Event()
        self.notifier = SdNotifier.from_env()
        self.metrics = Metrics(VERSION)
        self.metrics.set_source(self._node_view)
        self.api_tls = ApiTlsReloader(self.metrics.registry)  # SIGHUP
        self.timing = timing_for(cfg)
        self.node: ClusterNode | None = None
        self.trace: ApplyTrace | None = None  # test-only (QUORUMD_TEST_APPLY_TRACE)
        self.transport: ClusterTransport | None = None
        self.driver: RaftDriver | None = None
        self.api_port = 0
        self.cluster_port = 0
        self.pins = PinBook(cfg.node_id)
        self._founder = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.gc = GcPolicy()
        self.heap = HeapTrimmer(every_seconds=heap_trim_seconds())
        self.exit_code = 0
        self.fatal_message: str | None = None  # said once more by ``quorumd run`` on stderr

    # --- startup -----------------------------------------------------------------------------
    async def run(self) -> int:
        if not await wait_for_disk_space(self.data_dir, self.stop_event, self.notifier.notify):
            log.info("shutdown_done node=%d exit_code=0 (stopped while the disk was full)", self.cfg.node_id)
            return 0
        async with AsyncExitStack() as stack:
            await self._start(stack)
            await self.stop_event.wait()
            log.info("shutdown_start node=%d", self.cfg.node_id)
            self.notifier.notify("STOPPING=1")
            await self._graceful_stop()
        log.info("shutdown_done node=%d exit_code=%d", self.cfg.node_id, self.exit_code)
        if self.fatal_message is not None:
            raise FatalError(self.fatal_message)
        return self.exit_code

    async def _start(self, stack: AsyncExitStack) -> None:
        """Each step of the start, in order; each pairs what it opens with its cleanup."""
        for note in self.cfg.notes:
            log.info("config_note %s", note)
        storage, recovered, ident = await self._open_state(stack)
        node = await self._start_node(stack, ident, recovered)
        if not recovered.entries and recovered.snapshot is None and recovered.hard_state.term == 0:
            if ident.claims is None:  # founding: the first configuration, written before anything runs
                hs, entries = await asyncio.get_running_loop().run_in_executor(
                    None, self._bootstrap, storage, node
                )
                recovered = RecoveredState(hs, None, entries)
        core = self._raft_core(recovered)
        transport = self._cluster_transport(ident, node)
        driver = self._raft_driver(core, storage, node, transport)
        if transport is not None:
            transport.on_raft_peer_lost = driver.peer_connection_lost  # fast failover hint
            self._register_rpcs(transport, node)
            self.cluster_port = await transport.start(str(self.cfg.cluster.bind_address))
            stack.push_async_callback(self._bounded, transport.close(), 5.0)
        self.gc.settled()  # the replicated state is loaded: freeze it (see node/daemon/gcpolicy.py)
        core.fast_forward_election()
        driver.start().add_done_callback(self._on_driver_exit)
        stack.push_async_callback(self._close_driver, driver)
        if ident.claims is not None:
            await self._join(ident.claims, node)
        else:
            await self._replay_local_log(node, core.commit_index)
        await self._serve_api(stack, node)
        await self._start_tasks(stack, node, transport)

    async def _open_state(self, stack: AsyncExitStack) -> tuple[LogStorage, RecoveredState, StartIdentity]:
        """The data dir, the stored Raft state and who this node is (restart, join or founding)."""
        cfg = self.cfg
        meta = read_node_file(self.data_dir)  # before anything is written: see NewerFormatError
        ensure_data_dir(self.data_dir)
        if meta is not None and meta["node_id"] != cfg.node_id:
            raise FatalError(
                f"data-dir {self.data_dir} belongs to node {meta['node_id']}, "
                f"but cluster.node-id is {cfg.node_id}"
            )
        storage, recovered = await asyncio.get_running_loop().run_in_executor(
            None, open_storage, self.data_dir
        )
        stack.callback(storage.close)
        has_state = bool(recovered.entries) or recovered.snapshot is not None or recovered.hard_state.term > 0
        ident = resolve_identity(cfg, meta, has_state=has_state)
        self._founder = ident.founder
        return storage, recovered, ident

    async def _start_node(
        self, stack: AsyncExitStack, ident: StartIdentity, recovered: RecoveredState
    ) -> ClusterNode:
        """The node over the restored state, with its BGP speaker and the test-only apply trace."""
        cfg = self.cfg
        identity = Identity(
            node_id=cfg.node_id,
            cluster_id=ident.cluster_id,
            version=VERSION,
            raft_address=str(cfg.cluster.advertise_address),
            api_address=api_url(cfg),
            fingerprint=pki.fingerprint(pki.pem_to_der(ident.cert_pem)),
            cert_pem=ident.cert_pem.decode(),
        )
        node = self._build_node(identity, restore_state(self.data_dir, recovered.snapshot))
        if isinstance(node.bgp, GoBgpSpeaker):  # a supervised gobgpd, stopped with us
            try:
                await node.bgp.open()
            except (SpeakerError, OSError) as exc:
                raise FatalError(f"bgp.speaker gobgp: {exc}") from exc
            stack.push_async_callback(self._bounded, node.bgp.close(2.0), 5.0)
        self.node = node
        self.trace = ApplyTrace.from_env(cfg.node_id, node.service)
        if self.trace is not None:
            stack.callback(self.trace.close)
            if recovered.snapshot is not None:
                self.trace.restored("R", recovered.snapshot.meta.index, recovered.snapshot.data)
        return node

    def _raft_core(self, recovered: RecoveredState) -> RaftCore:
        cfg = self.cfg
        core_config = CoreConfig(
            node_id=cfg.node_id,
            election_ticks=self.timing.election_ticks,
            heartbeat_ticks=self.timing.heartbeat_ticks,
            trailing_logs=cfg.cluster.trailing_logs,
            lazy_commit_broadcast=True,
            **planted_bugs(),
        )
        try:
            return RaftCore(
                core_config,
                random.Random(secrets.randbits(64)),
                hard_state=recovered.hard_state,
                snapshot=recovered.snapshot,
                entries=recovered.entries,
            )
        except RaftError as exc:  # e.g. a stored commit index beyond the stored log
            raise FatalError(f"inconsistent Raft state in {self.data_dir / 'raft'}: {exc}") from exc

    def _cluster_transport(self, ident: StartIdentity, node: ClusterNode) -> ClusterTransport | None:
        if not self.cfg.cluster.enabled:
            return None
        transport = ClusterTransport(
            node_id=self.cfg.node_id,
            cluster_id=ident.cluster_id,
            cert_pem=ident.cert_pem,
            key_pem=ident.key_pem,
            pins={},
            addresses={},
            on_raft_frame=self._on_raft_frame,
        )
        self.transport = transport
        node.service.set_rpc(transport.rpc)
        if node.certificates is not None:
            node.certificates.transport = transport
        return transport

    def _raft_driver(
        self, core: RaftCore, storage: LogStorage, node: ClusterNode, transport: ClusterTransport | None
    ) -> RaftDriver:
        driver = RaftDriver(
            core,
            storage,
            self.trace if self.trace is not None else node.service,
            transport.send if transport else (lambda _to, _frame: True),
            tick_seconds=self.timing.tick_seconds,
            snapshot_threshold=self.cfg.cluster.snapshot_threshold,
            hooks=DriverHooks(
                on_soft_state=self._on_soft_state,
                on_fsync=self.metrics.observe_fsync,
                on_commit_latency=self.metrics.observe_commit,
                on_snapshot=self._on_snapshot,
                on_bad_message=lambda _p, _r: self.metrics.count_bad_message(),
                on_storage_retry=self.metrics.count_storage_retry,
            ),
        )
        self.driver = driver
        node.service.driver = driver
        node.service.add_apply_listener(self._after_apply)
        node.service.on_pins_changed = self._update_pins
        self._update_pins()
        return driver

    async def _serve_api(self, stack: AsyncExitStack, node: ClusterNode) -> None:
        cfg = self.cfg
        app = build_app(
            node,
            node_id=cfg.node_id,
            registry=self.metrics.registry,
            forward_timeout_seconds=cfg.cluster.propose_timeout_seconds,
            propose_timeout_seconds=cfg.cluster.propose_timeout_seconds,
        )
        self.app = app
        api_server = ApiServer(app, max_connections=cfg.api.max_connections)
        tls = api_ssl_context(cfg)
        self.api_port = await api_server.start(cfg.api.address, cfg.api.port, ssl_context=tls.context)
        self.api_tls.serve(api_server, tls)
        stack.push_async_callback(self._bounded, api_server.close(), 5.0)
        stack.push_async_callback(self.api_tls.close)
        log.info("api_listening node=%d address=%s port=%d", cfg.node_id, cfg.api.address, self.api_port)

    async def _start_tasks(
        self, stack: AsyncExitStack, node: ClusterNode, transport: ClusterTransport | None
    ) -> None:
        """The node's long-running loops, then its side effects (RAN notifier, BGP speaker)."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        seeds = [str(p) for p in cfg.cluster.peers]  # where to look when restarted elsewhere
        for coro, name in (
            (node.reconcile_loop(), "reconcile"),
            (node.isolation.fence_loop(), "fence"),
            (self.heap.run(), "heap"),
            (self._announce_loop(), "announce"),
            (node.addresses.keep_own_address(seeds, transport.rpc_at if transport else None), "own-address"),
            (self._ready_loop(), "ready"),
            *([(node.certificates.run(), "certificates")] if transport and node.certificates else []),
        ):
            self._tasks.append(loop.create_task(coro, name=name))
        if cfg.backup.dir is not None:
            self._tasks.append(loop.create_task(self._backups(node), name="backups"))
        if (probe := LoopLagProbe.from_env()) is not None:
            self._tasks.append(loop.create_task(probe.run(), name="loop-probe"))
        stack.push_async_callback(self._cancel_tasks)
        await node.ran.start()
        stack.push_async_callback(self._bounded, node.ran.close(), 3.0)
        if cfg.bgp.enabled:
            node.drain.kick()

    def _bootstrap(self, storage: LogStorage, node: ClusterNode) -> tuple[HardState, list[Entry]]:
        svc = node.service
        hs, entries = RaftCore.bootstrap_entries(self.cfg.node_id, svc.member_context(None))
        storage.append(entries)
        storage.set_hard_state(hs)
        storage.sync()
        log.info("cluster_bootstrapped node=%d cluster=%s", self.cfg.node_id, svc.identity.cluster_id)
        return hs, entries

    def _build_node(self, identity: Identity, sm: StateMachine) -> ClusterNode:
        cfg = self.cfg
        ap = cfg.cluster.autopilot
        bgp = build_bgp_speaker(cfg.bgp, self.data_dir, on_change=self.metrics.set_bgp)
        ran = WebhookRanNotifier(cfg.ran.notify_url, on_event=self.metrics.count_ran)
        service = ClusterService(
            identity,
            sm,
            cluster_enabled=cfg.cluster.enabled,
            propose_timeout_seconds=cfg.cluster.propose_timeout_seconds,
            tick_seconds=self.timing.tick_seconds,
            max_trailing_logs=ap.max_trailing_logs,
        )
        service.trail.retention = cfg.audit.retention  # carried in every audit record's entry
        service.on_join_result = self.metrics.count_join
        node = ClusterNode(
            service,
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
            isolation_fence_after_seconds=cfg.cluster.isolation_fence_after_seconds,
        )
        c = cfg.cluster
        node.certificates = CertificateRotation(
            service, self.data_dir, c.certificate_lifetime_seconds, c.certificate_renew_before_seconds
        )
        node.addresses.on_dial_addresses_changed = self._update_pins
        node.isolation.on_isolation = self.metrics.set_isolated
        return node

    # --- joining -------------------------------------------------------------------------------
    async def _join(self, claims: jointoken.JoinClaims, node: ClusterNode) -> None:
        members = await join_cluster(self.cfg, claims, node.service.member_context(claims.token_id))
        self.pins.joined(members)
        self._update_pins()

    async def _replay_local_log(self, node: ClusterNode, commit: int) -> None:
        """Apply the locally known committed entries before the API serves anything.

        Without this, a restarted node answered from an empty (or snapshot-old) replica for the
        moment its first batch was being applied: 401 for valid API tokens, missing leases.
        Bounded: a node that cannot apply in time starts anyway (and is not ready); a stop
        (signal, dead driver) ends the wait at once."""
        svc = node.service
        if svc.sm.applied_index >= commit:
            return
        started = time.monotonic()
        timeout = self.cfg.cluster.join_timeout_seconds
        applied = asyncio.ensure_future(svc.wait_state(lambda: svc.sm.applied_index >= commit, timeout))
        stopped = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({applied, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (applied, stopped):
                t.cancel()
        ok = svc.sm.applied_index >= commit
        log.info(
            "local_log_replayed node=%d applied=%d commit=%d seconds=%.3f complete=%s",
            self.cfg.node_id, svc.sm.applied_index, commit, time.monotonic() - started, ok,
        )  # fmt: skip

    def _on_driver_exit(self, task: asyncio.Task[None]) -> None:
        """A dead Raft driver must stop the process (better than serving stale data)."""
        if task.cancelled() or self.stop_event.is_set():
            return
        exc = task.exception()
        if exc is None:  # closed by the unwinding of a failed startup: that error is what matters
            return
        full = disk_full_message(exc)
        if isinstance(exc, EntryNeedsNewerProtocol):  # never skip it: stop until upgraded
            log.critical(
                "entry_needs_newer_protocol index=%d needs=%d have=%d", exc.index, exc.needs, exc.have
            )
        elif full is not None:
            log.critical("disk_full %s", full)
            self.fatal_message = full
        else:
            log.critical("raft_driver_died error=%r", exc)
        self.exit_code = 1
        self.stop_event.set()

    async def _close_driver(self, driver: RaftDriver) -> None:
        """Stop the driver; its own death was reported by ``_on_driver_exit``, not raised again."""
        try:
            await self._bounded(driver.close(), 5.0)
        except Exception as exc:
            if self.exit_code == 0:
                raise
            log.debug("driver_close error=%r", exc)

    # --- runtime hooks --------------------------------------------------------------------------
    def _on_raft_frame(self, from_id: int, frame: bytes) -> None:
        if self.driver is not None:
            if self.node is not None:
                self.node.isolation.heard_from(from_id)  # isolation fencing
            self.driver.deliver(from_id, frame)

    def _update_pins(self) -> None:
        if self.transport is not None and self.node is not None:
            self.pins.update(self.transport, self.node.service, self.node.addresses)

    def _on_snapshot(self, _index: int) -> None:
        self.metrics.count_snapshot()
        self.gc.after_snapshot()

    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        if not results or any(isinstance(r.command, PEERS_CHANGED) for r in results):
            self._update_pins()  # a member moved: every node dials its new address

    def _on_soft_state(self, old: SoftState, new: SoftState) -> None:
        if old.leader_id != new.leader_id:
            self.metrics.count_leader_change()
        if self.node is not None and (old.role == Role.LEADER) != (new.role == Role.LEADER):
            self.node.foresight.on_leadership_change(new.role == Role.LEADER)
            if new.role == Role.LEADER:
                self._keep_task(asyncio.get_running_loop().create_task(self._on_became_leader()))

    def _keep_task(self, task: asyncio.Task[Any]) -> None:
        """One more task of the daemon's own (cancelled and awaited at the stop); those that ended
        without an error are let go, so that every leadership gained does not keep one for ever
        (one that failed stays, for the stop to log)."""
        self._tasks = [t for t in self._tasks if not (t.done() and (t.cancelled() or t.exception() is None))]
        self._tasks.append(task)

    async def _on_became_leader(self) -> None:
        """Founder duties that need a leader: cluster secrets and the first admin token."""
        assert self.node is not None
        svc = self.node.service
        try:
            if svc.sm.cluster_id is None:
                await svc.propose(
                    SetClusterSecrets(time.time(), svc.identity.cluster_id, secrets.token_bytes(32))
                )
            token_file = self.data_dir / "admin.token"
            if self._founder and not token_file.exists():
                from quorumd.node.registry import apitoken

                token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
                secret = secrets.token_bytes(32)
                from quorumd.api.ports import TokenRole

                await svc.propose(
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
        svc = node.service

        async def archive() -> BackupArchive:
            return await take_archive(svc, linearizable=False)

        async def ready() -> None:
            while not await svc.wait_state(lambda: svc.sm.cluster_id is not None, 60.0):
                pass

        sched = BackupScheduler(
            self.cfg.backup, self.cfg.node_id, svc.identity.cluster_id, archive, self.metrics.backups
        )
        await sched.run(ready)

    async def _announce_loop(self) -> None:
        """Keep this node's registry record current (version, API address, left flag)."""
        assert self.node is not None
        svc = self.node.service
        while True:
            m = svc.sm.member(self.cfg.node_id)
            try:
                if m is not None and svc.leader_id() != 0:
                    if m.binary_version != VERSION or m.api_address != svc.identity.api_address:
                        await svc.announce(
                            RegisterNodeInfo(time.time(), self.cfg.node_id, svc.identity.api_address, VERSION)
                        )
                    elif m.left:
                        await svc.announce(MarkNodeLeft(time.time(), self.cfg.node_id, False))
                    else:
                        if not svc.is_leader():  # the leader asks in its reconcile loop
                            await svc.versions.learn(svc.rpc, svc.running_driver.core.config.members())
                        await asyncio.sleep(2.0)
                        continue
            except ApiError as exc:
                log.info("announce_retry reason=%s", exc.code)
            await asyncio.sleep(0.2)

    async def _ready_loop(self) -> None:
        assert self.node is not None
        svc = self.node.service
        while not svc.is_ready():
            await svc.wait_state(svc.is_ready, 0.5)
        self.notifier.notify("READY=1")
        log.info("node_ready node=%d", self.cfg.node_id)
        interval = self.notifier.watchdog_interval_seconds()
        if interval:
            while True:
                self.notifier.notify("WATCHDOG=1")
                await asyncio.sleep(interval / 2)

    def _node_view(self) -> NodeView | None:
        """One consistent view of the node for a Prometheus scrape (see node/daemon/node_collector.py)."""
        if self.transport is not None:
            self.metrics.absorb_transport_stats(self.transport.stats)
        node, driver = self.node, self.driver
        if node is None or driver is None:
            return None
        view = node.foresight.evaluate_autopilot() if node.is_leader() else None
        expiry = node.certificates.expires_at() if node.certificates is not None else None
        return node_view(node.service, driver.core, self.timing.tick_seconds, view, expiry)

    def _register_rpcs(self, transport: ClusterTransport, node: ClusterNode) -> None:
        """Who may call what: see node/cluster/rpcs.py."""

        def flush() -> None:
            if self.driver is not None:
                self.driver.flush_commit_broadcast()

        register_internal_rpcs(
            transport, node, lambda req, source: self.app.dispatch_forwarded(req, source=source), flush
        )

    # --- shutdown ------------------------------------------------------------------------------
    async def _graceful_stop(self) -> None:
        node = self.node
        if node is None or not self.cfg.cluster.enabled or self.exit_code != 0:
            return  # a dead driver (exit 1) cannot hand off or announce
        try:
            if node.is_leader() and len(node.service.running_driver.core.config.voters) > 1:
                async with asyncio.timeout(self.cfg.cluster.election_timeout_seconds * 3):
                    new = await node.hand_off_leadership()
                async with asyncio.timeout(self.cfg.cluster.propose_timeout_seconds):
                    await node.trail.record_transfer(self.cfg.node_id, new, "stop", None)
            if node.leader_id() != 0 and len(node.service.running_driver.core.config.members()) > 1:
                async with asyncio.timeout(self.cfg.cluster.propose_timeout_seconds):
                    await node.service.announce(MarkNodeLeft(time.time(), self.cfg.node_id, True))
        except (TimeoutError, ApiError) as exc:
            log.info("graceful_stop_partial reason=%s", type(exc).__name__)

    async def _cancel_tasks(self) -> None:
        """Cancel the daemon's own tasks and wait for them; a task that had failed is logged with
        its error (never swallowed), and the stop goes on."""
        awaited: set[asyncio.Task[Any]] = set()
        while pending := [t for t in self._tasks if t not in awaited]:  # (a task may start meanwhile)
            for t in pending:
                t.cancel()
            results = await asyncio.gather(*pending, return_exceptions=True)
            for t, result in zip(pending, results, strict=True):
                if isinstance(result, Exception):
                    log.error("task_failed task=%s error=%s", t.get_name(), result, exc_info=result)
            awaited.update(pending)

    @staticmethod
    async def _bounded(aw: Any, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await aw
        except TimeoutError:
            log.warning("cleanup_timeout")


async def main_async(cfg: Config) -> int:
    daemon = Daemon(cfg)
    install_signal_handlers(daemon.stop_event, reload=daemon.api_tls.request)
    return await daemon.run()
