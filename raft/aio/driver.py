"""RaftDriver: the asyncio loop that pumps one RaftCore.

It owns the core, the storage (used from one executor thread, so the event loop never blocks on
disk), the tick timer, and the futures of callers waiting for proposals, reads, applies and
leadership transfers. One task (``run``) does everything in order:

    inputs (ticks, peer messages, batched proposals) -> core
    while core.has_ready(): persist (one fsync for the batch) -> send -> apply -> advance

Everything that arrives while an fsync is in flight is batched into the next round, which gives
group commit for free. A leader sends its appends before its own fsync (thesis 10.2.1; the core
only counts the leader's entries once they are durable). Anything that needs a new term or vote
on disk is persisted before its messages leave. Storage calls refused for lack of file
descriptors are retried, never fatal (``quorumd.raft.aio.fdretry``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..codec import CodecError, decode_message, encode_message
from ..core.node import RaftCore
from ..core.ready import NotLeaderError, RaftError, Ready, SoftState, Status
from ..core.types import (
    ConfChange,
    Entry,
    HardState,
    Message,
    MessageType,
    NodeId,
    Role,
    Snapshot,
    SnapshotMeta,
)
from .fdretry import StorageRetries
from .policy import entries_per_snapshot, write_on_loop

log = logging.getLogger(__name__)

_TIMER_SLACK_SECONDS = 0.002  # a tick timer may fire up to ~1 ms before its deadline (libuv)


class DriverError(RaftError):
    """Root of the driver's errors."""


class ProposalLostError(DriverError):
    """The entry was overwritten by another leader: the proposal did not take effect."""


class DriverClosedError(DriverError):
    pass


class Application(Protocol):
    def apply_entries(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply committed entries in order; one result per entry."""
        ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes, meta: SnapshotMeta) -> None: ...


class Storage(Protocol):
    def append(self, entries: Sequence[Entry]) -> None: ...

    def set_hard_state(self, hs: HardState) -> None: ...

    def sync(self) -> float: ...

    def save_snapshot(self, snapshot: Snapshot) -> None: ...

    def install_snapshot(self, snapshot: Snapshot) -> None: ...

    def compact(self, upto_index: int) -> None: ...


@dataclass(slots=True)
class DriverHooks:
    """Callbacks for metrics and the node layer; all optional, all called on the loop."""

    on_soft_state: Callable[[SoftState, SoftState], None] | None = None
    on_fsync: Callable[[float], None] | None = None
    on_commit_latency: Callable[[float], None] | None = None
    on_snapshot: Callable[[int], None] | None = None
    on_bad_message: Callable[[NodeId, str], None] | None = None
    on_applied: Callable[[int], None] | None = None
    on_storage_retry: Callable[[str], None] | None = None  # what: "write" or "snapshot"


class RaftDriver:
    def __init__(
        self,
        core: RaftCore,
        storage: Storage,
        app: Application,
        send: Callable[[NodeId, bytes], bool],
        *,
        tick_seconds: float,
        snapshot_threshold: int,
        hooks: DriverHooks | None = None,
        commit_broadcast_delay: float = 0.002,
    ) -> None:
        self.core = core
        self._storage = storage
        self._app = app
        self._send = send
        self._tick_seconds = tick_seconds
        # At least ``snapshot_threshold`` entries between snapshots, more with a large state
        # (policy.entries_per_snapshot).
        self._snapshot_threshold = snapshot_threshold
        recovered = core.snapshot
        self._snapshot_every = self._entries_per_snapshot(len(recovered.data) if recovered is not None else 0)
        self.hooks = hooks or DriverHooks()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raft-storage")
        self._inbox: list[Message] = []
        self._proposals: list[tuple[bytes, asyncio.Future[Any], float]] = []
        # Actions to run on the core right after the queued proposals are fed (propose's ``then``).
        self._after_feed: list[Callable[[RaftCore], Any]] = []
        self._waiting: dict[int, tuple[int, asyncio.Future[Any], float]] = {}
        # Proposal deadlines (perf_counter, seq, future), checked on every tick: one heap push per
        # bounded proposal instead of a timer handle and a task cancellation per write.
        self._deadlines: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._deadline_seq = itertools.count()
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._read_seq = 0
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._leader_waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._soft = SoftState(core.leader_id, core.role)
        self._durable_term_vote = (core.term, core.vote)
        self._deferred_hs: HardState | None = None
        self._fsync_avg = 0.0  # seconds, moving average of this disk's fsyncs (see _persist_inline)
        self._timer_due = False
        self._snapshot_index = core.status().snapshot_index
        self._snapshotting = False
        self._resume_sync = False  # a transient failure hit the sync of a buffered batch
        self._retries = StorageRetries(self.hooks)  # counts through hooks.on_storage_retry
        self._snapshot_save: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # CoreConfig.lazy_commit_broadcast: how long a commit advance may wait for an append to
        # carry it before it is sent on its own.
        self._commit_broadcast_delay = commit_broadcast_delay
        self._commit_timer: asyncio.TimerHandle | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="raft-driver")
        return self._task

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(5.0):
                    await asyncio.shield(self._task)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._snapshot_save is not None and not self._snapshot_save.done():
            self._snapshot_save.cancel()  # only ever waiting to retry here: nothing half-done
        self._fail_all(DriverClosedError("raft driver stopped"))
        self._executor.shutdown(wait=True)

    def _fail_all(self, exc: Exception) -> None:
        for _, fut, _ in self._proposals:
            if not fut.done():
                fut.set_exception(exc)
        for _, fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        for rfut in self._reads.values():
            if not rfut.done():
                rfut.set_exception(exc)
        self._proposals.clear()
        self._waiting.clear()
        self._reads.clear()
        self._deadlines.clear()

    # --- inputs -------------------------------------------------------------------------------
    def deliver(self, from_id: NodeId, frame: bytes) -> None:
        """A Raft frame from an authenticated peer (called by the transport)."""
        try:
            msg = decode_message(frame)
        except CodecError as exc:
            if self.hooks.on_bad_message:
                self.hooks.on_bad_message(from_id, "decode")
            log.warning("raft_bad_frame peer=%s error=%s", from_id, exc)
            return
        if msg.frm != from_id or msg.to != self.core.node_id:
            if self.hooks.on_bad_message:
                self.hooks.on_bad_message(from_id, "spoofed")
            log.warning("raft_spoofed_frame peer=%s claimed=%s to=%s", from_id, msg.frm, msg.to)
            return
        self._inbox.append(msg)
        self._wake.set()

    def peer_connection_lost(self, node_id: NodeId) -> None:
        """Transport hint: the Raft connection with ``node_id`` closed (see the core's
        ``report_leader_connection_lost``)."""
        self.core.report_leader_connection_lost(node_id)
        self._wake.set()

    def step_now(self, action: Callable[[RaftCore], Any]) -> Any:
        """Run a synchronous action on the core inside the loop's next round."""
        result = action(self.core)
        self._wake.set()
        return result

    async def propose(
        self, data: bytes, timeout: float | None = None, *, then: Callable[[RaftCore], Any] | None = None
    ) -> Any:
        """Replicate ``data``; returns the application's result once applied here.

        Raises NotLeaderError/ProposalDroppedError at once, ProposalLostError if overwritten,
        TimeoutError when ``timeout`` seconds pass first (checked on each tick, so up to one
        tick late). A timed-out proposal may still commit later: only the wait ends.

        ``then`` runs on the core right after this proposal is appended (same round, before any
        later proposal): e.g. a leadership transfer that must follow the entry, since the core
        drops proposals while a transfer is under way. Its errors are logged, not raised."""
        if self.core.role != Role.LEADER:
            raise NotLeaderError(self.core.leader_id)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        now = time.perf_counter()
        self._proposals.append((data, fut, now))
        if then is not None:
            self._after_feed.append(then)
        if timeout is not None:
            heapq.heappush(self._deadlines, (now + timeout, next(self._deadline_seq), fut))
        self._wake.set()
        return await fut

    async def propose_conf_change(self, cc: ConfChange) -> Any:
        index = self.core.propose_conf_change(cc)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[index] = (self.core.term, fut, time.perf_counter())
        self._wake.set()
        return await fut

    async def read_index(self) -> int:
        """Linearizable read barrier: returns once this replica has applied a safe index."""
        self._read_seq += 1
        ctx = b"r%d" % self._read_seq
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reads[ctx] = fut
        try:
            self.core.read_index(ctx)
            self._wake.set()
            index = await fut
        finally:
            self._reads.pop(ctx, None)
        await self.wait_applied(index)
        return index

    async def wait_applied(self, index: int) -> None:
        if self.core.applied_index >= index:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._apply_waiters.append((index, fut))
        await fut

    def wait_leader_change(self) -> asyncio.Future[None]:
        """A future resolved at the next role or leader change. Registered before this returns:
        a caller that checked the leader and then awaits this cannot miss a change in between
        (as it could when the registration ran in a task that ``wait_for`` had yet to start)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leader_waiters.append(fut)
        return fut

    def status(self) -> Status:
        return self.core.status()

    # --- the loop ---------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer_due = True
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._tick_seconds
        timer = loop.call_at(next_tick, self._on_timer)  # one armed timer, no task per wait
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                if self._closed:
                    break
                now = loop.time()
                if self._timer_due or now >= next_tick:
                    # The timer is re-armed whenever it fired, even a hair early: libuv timers
                    # have millisecond granularity and uvloop's clock is cached, so the callback
                    # can see loop.time() just below the deadline. Waiting for ``now >= next_tick``
                    # alone then left no timer armed and the node never ticked again.
                    self._timer_due = False
                    if now + _TIMER_SLACK_SECONDS >= next_tick:
                        self.core.tick()
                        if self._deadlines:
                            self._expire_proposals()
                        next_tick += self._tick_seconds
                        if next_tick < now:  # the loop was stalled: do not replay every missed tick
                            next_tick = now + self._tick_seconds
                    timer.cancel()
                    timer = loop.call_at(next_tick, self._on_timer)
                await self._pump_async()
                if self.core.commit_broadcast_pending and self._commit_timer is None:
                    self._commit_timer = loop.call_later(self._commit_broadcast_delay, self._on_commit_timer)
        finally:
            timer.cancel()
            if self._commit_timer is not None:
                self._commit_timer.cancel()

    def _expire_proposals(self) -> None:
        heap = self._deadlines
        now = time.perf_counter()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_exception(TimeoutError("the proposal did not commit in time"))

    def flush_commit_broadcast(self) -> None:
        """Send a pending commit-index advance now (CoreConfig.lazy_commit_broadcast)."""
        if self.core.commit_broadcast_pending:
            self.core.flush_commit_broadcast()
            self._wake.set()

    def _on_commit_timer(self) -> None:
        self._commit_timer = None
        self.flush_commit_broadcast()

    async def _pump_async(self) -> None:
        self._feed_inputs()
        while self.core.has_ready():
            rd = self.core.ready()
            await self._handle_ready(rd)
            self.core.advance(rd)
            self._after_advance()
            if self._inbox or self._proposals:
                self._feed_inputs()

    def _feed_inputs(self) -> None:
        inbox, self._inbox = self._inbox, []
        for msg in inbox:
            self.core.step(msg)
        if self._proposals:
            batch, self._proposals = self._proposals, []
            batch = [p for p in batch if not p[1].done()]
            if batch:
                try:
                    first = self.core.propose_many([d for d, _, _ in batch])
                except RaftError as exc:
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    term = self.core.term
                    for i, (_, fut, t0) in enumerate(batch):
                        self._waiting[first + i] = (term, fut, t0)
        if self._after_feed:
            actions, self._after_feed = self._after_feed, []
            for action in actions:
                try:
                    action(self.core)
                except RaftError as exc:
                    log.info("raft_after_propose_skipped error=%s", exc)

    async def _handle_ready(self, rd: Ready) -> None:
        core = self.core
        if rd.soft_state is not None:
            old, self._soft = self._soft, rd.soft_state
            if old != rd.soft_state:
                self._on_soft_state(old, rd.soft_state)
        hs = rd.hard_state
        term_vote_changed = hs is not None and (hs.term, hs.vote) != self._durable_term_vote
        early = core.role == Role.LEADER and not term_vote_changed and rd.snapshot is None
        applied = False
        messages: Sequence[Message] = rd.messages
        if core.role == Role.CANDIDATE and term_vote_changed:
            # A candidate asks for votes while its own term and vote are being written: the
            # answers wait in the inbox until this batch is durable (the core is stepped only
            # between batches), so it still cannot win, and act as leader, on a vote it could
            # forget in a crash. Only its vote requests go early; anything else it says (a
            # rejection carrying the new term) waits for the write as before.
            asks = [m for m in messages if m.type == MessageType.VOTE]
            if asks:
                self._send_messages(asks)
                messages = [m for m in messages if m.type != MessageType.VOTE]
        if early:
            self._send_messages(rd.messages)
            # A leader's committed entries are durable on a quorum, its own disk included (it
            # counts itself only at its stable index): answer their clients while this batch's new
            # entries are written (thesis 10.2.1).
            if rd.committed_entries:
                self._apply(rd.committed_entries)
                applied = True
        if rd.snapshot is not None or rd.entries or rd.must_sync:
            hs_out = hs if hs is not None else self._deferred_hs
            self._deferred_hs = None
            fsync_seconds = await self._persist_retrying(rd, hs_out)
            if fsync_seconds is not None:
                self._fsync_avg += 0.2 * (fsync_seconds - self._fsync_avg)
                if self.hooks.on_fsync:
                    self.hooks.on_fsync(fsync_seconds)
            if hs is not None:
                self._durable_term_vote = (hs.term, hs.vote)
        elif hs is not None:
            # Only the commit index moved: it need not be durable (a restart relearns it), so it
            # rides along with the next write instead of costing a storage round trip now.
            self._deferred_hs = hs
        if not early:
            self._send_messages(messages)
        if rd.snapshot is not None:
            self._app.restore(rd.snapshot.data, rd.snapshot.meta)
            self._snapshot_index = rd.snapshot.meta.index
            self._snapshot_every = self._entries_per_snapshot(len(rd.snapshot.data))
            self._resolve_lost_upto(rd.snapshot.meta.index)
            log.info(
                "raft_snapshot_installed index=%d term=%d", rd.snapshot.meta.index, rd.snapshot.meta.term
            )
        if rd.committed_entries and not applied:
            self._apply(rd.committed_entries)
        for rs in rd.read_states:
            fut = self._reads.get(rs.context)
            if fut is not None and not fut.done():
                fut.set_result(rs.index)

    def _persist_inline(self, rd: Ready) -> bool:
        """Whether to write this batch on the loop thread (``policy.write_on_loop``)."""
        if rd.snapshot is not None or self._snapshotting:
            return False
        busy = self.core.role == Role.LEADER and bool(
            len(self._waiting) > len(rd.entries) or self._proposals or self._inbox
        )
        return write_on_loop(rd.entries, leader_has_more_in_flight=busy, fsync_avg_seconds=self._fsync_avg)

    @property
    def storage_retries(self) -> int:
        return self._retries.count

    async def _persist_retrying(self, rd: Ready, hs: HardState | None) -> float | None:
        loop = asyncio.get_running_loop()

        async def attempt(n: int) -> float | None:
            if n == 0 and self._persist_inline(rd):
                return self._persist(rd, hs)
            return await loop.run_in_executor(self._executor, self._persist, rd, hs)

        return await self._retries.run("write", attempt, lambda: self._closed)

    def _persist(self, rd: Ready, hs: HardState | None) -> float | None:
        st = self._storage
        if not self._resume_sync:  # (a transient failure in here stored nothing: retry it all)
            if rd.snapshot is not None:
                st.install_snapshot(rd.snapshot)
            if rd.entries:
                st.append(rd.entries)
            if hs is not None:
                st.set_hard_state(hs)
            self._resume_sync = True  # buffered: a retry only has to sync
        out = st.sync() if rd.must_sync or rd.snapshot is not None else None
        self._resume_sync = False
        return out

    def _send_messages(self, msgs: Sequence[Message]) -> None:
        for m in msgs:
            if not self._send(m.to, encode_message(m)):
                self.core.report_unreachable(m.to)

    def _apply(self, entries: Sequence[Entry]) -> None:
        results = self._app.apply_entries(entries)
        now = time.perf_counter()
        for e, res in zip(entries, results, strict=True):
            waiting = self._waiting.pop(e.index, None)
            if waiting is None:
                continue
            term, fut, t0 = waiting
            if fut.done():
                continue
            if term == e.term:
                fut.set_result(res)
                if self.hooks.on_commit_latency:
                    self.hooks.on_commit_latency(now - t0)
            else:
                fut.set_exception(ProposalLostError(f"entry {e.index} was overwritten"))
        applied = entries[-1].index
        self._notify_applied(applied)

    def _resolve_lost_upto(self, index: int) -> None:
        for i in [i for i in self._waiting if i <= index]:
            _, fut, _ = self._waiting.pop(i)
            if not fut.done():
                fut.set_exception(ProposalLostError(f"entry {i} replaced by a snapshot"))
        self._notify_applied(index)

    def _notify_applied(self, applied: int) -> None:
        if self._apply_waiters:
            keep = []
            for index, fut in self._apply_waiters:
                if index <= applied:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((index, fut))
            self._apply_waiters = keep
        if self.hooks.on_applied:
            self.hooks.on_applied(applied)

    def _on_soft_state(self, old: SoftState, new: SoftState) -> None:
        log.info(
            "raft_role_change node=%d role=%s leader=%d term=%d",
            self.core.node_id,
            new.role.name.lower(),
            new.leader_id,
            self.core.term,
        )
        if old.role == Role.LEADER and new.role != Role.LEADER:
            # Pending reads on a deposed leader will never be answered.
            for fut in self._reads.values():
                if not fut.done():
                    fut.set_exception(NotLeaderError(new.leader_id))
        waiters, self._leader_waiters = self._leader_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.hooks.on_soft_state:
            self.hooks.on_soft_state(old, new)

    def _entries_per_snapshot(self, snapshot_bytes: int) -> int:
        return entries_per_snapshot(self._snapshot_threshold, snapshot_bytes, self.core.node_id)

    def _after_advance(self) -> None:
        core = self.core
        if not self._snapshotting and core.applied_index - self._snapshot_index >= self._snapshot_every:
            self._snapshotting = True
            index = core.applied_index
            t0 = time.perf_counter()
            data = self._app.snapshot()
            core.compact(index, data)
            self._snapshot_every = self._entries_per_snapshot(len(data))
            log.info(
                "raft_snapshot_taken index=%d bytes=%d ms=%.1f",
                index,
                len(data),
                (time.perf_counter() - t0) * 1000,
            )
            snap = core.snapshot
            assert snap is not None
            self._snapshot_index = index
            first = core.status().first_index
            self._snapshot_save = asyncio.get_running_loop().create_task(self._save_snapshot(snap, first - 1))

    async def _save_snapshot(self, snap: Snapshot, compact_upto: int) -> None:
        """Store the snapshot on the storage thread; a transient failure stored nothing and is
        retried (``_snapshotting`` stays set meanwhile: no other snapshot starts)."""
        loop = asyncio.get_running_loop()

        def save() -> None:
            self._storage.save_snapshot(snap)
            self._storage.compact(compact_upto)

        try:
            await self._retries.run(
                "snapshot", lambda _n: loop.run_in_executor(self._executor, save), lambda: self._closed
            )
        except Exception as exc:
            log.error("raft_snapshot_failed error=%s", exc)
            return
        finally:
            self._snapshotting = False
        log.info("raft_snapshot_saved index=%d", self._snapshot_index)
        if self.hooks.on_snapshot:
            self.hooks.on_snapshot(self._snapshot_index)
