"""RaftDriver with real on-disk storage and an in-process transport: proposals, reads, restart,
snapshots and leadership transfer through the asyncio layer."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from quorumd.raft.aio.driver import RaftDriver
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.codec import decode_conf_change, decode_message
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import ConfChangeError, CoreConfig, SoftState
from quorumd.raft.core.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    MessageType,
    Role,
    SnapshotMeta,
)


class ListApp:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def apply_entries(self, entries: Sequence[Entry]) -> list[Any]:
        out: list[Any] = []
        for e in entries:
            if e.type == EntryType.NORMAL and e.data:
                self.values.append(e.data)
                out.append(len(self.values))
            else:
                if e.type == EntryType.CONF_CHANGE:
                    decode_conf_change(e.data)
                out.append(None)
        return out

    def snapshot(self) -> bytes:
        return b"\n".join(self.values)

    def restore(self, data: bytes, meta: SnapshotMeta) -> None:
        self.values = data.split(b"\n") if data else []


class DriverCluster:
    """In-process ``RaftDriver``s on real storage, frames delivered in memory (no daemons)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drivers: dict[int, RaftDriver] = {}
        self.apps: dict[int, ListApp] = {}
        self.storages: dict[int, LogStorage] = {}

    def send(self, to: int, frame: bytes, frm: int) -> bool:
        d = self.drivers.get(to)
        if d is None:
            return False
        d.deliver(frm, frame)
        return True

    def start(self, nid: int, *, founder: bool = False, snapshot_threshold: int = 10_000) -> RaftDriver:
        storage, rec = LogStorage.open(self.root / f"n{nid}")
        if founder and not rec.entries and rec.snapshot is None:
            hs, entries = RaftCore.bootstrap_entries(nid)
            storage.append(entries)
            storage.set_hard_state(hs)
            storage.sync()
            storage.close()
            storage, rec = LogStorage.open(self.root / f"n{nid}")
        app = ListApp()
        if rec.snapshot is not None:
            app.restore(rec.snapshot.data, rec.snapshot.meta)
        core = RaftCore(
            CoreConfig(node_id=nid, election_ticks=10, heartbeat_ticks=2, trailing_logs=5),
            random.Random(nid),
            hard_state=rec.hard_state,
            snapshot=rec.snapshot,
            entries=rec.entries,
        )
        d = RaftDriver(
            core,
            storage,
            app,
            lambda to, frame: self.send(to, frame, nid),
            tick_seconds=0.01,
            snapshot_threshold=snapshot_threshold,
        )
        self.drivers[nid], self.apps[nid], self.storages[nid] = d, app, storage
        d.start()
        return d

    async def stop(self, nid: int) -> None:
        d = self.drivers.pop(nid)
        await d.close()
        self.storages.pop(nid).close()

    async def close(self) -> None:
        for nid in list(self.drivers):
            await self.stop(nid)

    async def leader(self) -> RaftDriver:
        for _ in range(500):
            for d in self.drivers.values():
                if d.core.role == Role.LEADER:
                    return d
            await asyncio.sleep(0.01)
        raise AssertionError("no leader")

    async def wait_leader_is(self, nid: int, timeout: float = 5.0) -> RaftDriver:
        """Node ``nid`` once it leads (woken by its role changes, not by polling)."""
        d = self.drivers[nid]
        async with asyncio.timeout(timeout):
            while d.core.role != Role.LEADER:
                await d.wait_leader_change()
        return d

    async def add(self, nid: int, **kw: Any) -> None:
        self.start(nid, **kw)
        for cc in (ConfChange(ConfChangeType.ADD_NONVOTER, nid), ConfChange(ConfChangeType.PROMOTE, nid)):
            for _ in range(500):
                lead = await self.leader()
                try:
                    await asyncio.wait_for(lead.propose_conf_change(cc), 5)
                    break
                except ConfChangeError:  # the new leader's no-op has not committed yet
                    await asyncio.sleep(0.01)


async def three(tmp_path: Path, **kw: Any) -> DriverCluster:
    c = DriverCluster(tmp_path)
    c.start(1, founder=True, **kw)
    await c.leader()
    await c.add(2, **kw)
    await c.add(3, **kw)
    return c


@pytest.mark.asyncio
async def test_proposals_commit_and_apply_everywhere(tmp_path: Path) -> None:
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        results = await asyncio.wait_for(asyncio.gather(*(lead.propose(b"v%d" % i) for i in range(200))), 10)
        assert sorted(results) == list(range(1, 201))
        for nid in (1, 2, 3):
            await asyncio.wait_for(c.drivers[nid].wait_applied(lead.core.commit_index), 5)
            assert c.apps[nid].values == [b"v%d" % i for i in range(200)]
        idx = await asyncio.wait_for(c.drivers[2].read_index(), 5)
        assert idx >= lead.core.commit_index - 1
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_restart_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        for i in range(20):
            await asyncio.wait_for(lead.propose(b"w%d" % i), 5)
        follower = next(n for n in (1, 2, 3) if n != lead.core.node_id)
        await c.stop(follower)
        c.start(follower)
        await asyncio.wait_for(c.drivers[follower].wait_applied(lead.core.commit_index), 5)
        assert c.apps[follower].values == [b"w%d" % i for i in range(20)]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_snapshot_and_compaction_then_restart(tmp_path: Path) -> None:
    c = await three(tmp_path, snapshot_threshold=10)
    try:
        lead = await c.leader()
        for i in range(60):
            await asyncio.wait_for(lead.propose(b"s%d" % i), 5)
        assert lead.core.status().snapshot_index > 0
        nid, commit = lead.core.node_id, lead.core.commit_index
        await c.stop(nid)
        d = c.start(nid, snapshot_threshold=10)
        await asyncio.wait_for(d.wait_applied(commit), 10)
        assert c.apps[nid].values[-60:] == [b"s%d" % i for i in range(60)]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_snapshots_grow_apart_as_the_state_grows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At least one entry per KiB of the last snapshot between two snapshots: with entries of
    2 KiB each snapshot waits for about twice as many entries as the state held, instead of
    every ``snapshot_threshold`` (10) entries; a restart still recovers every write."""
    caplog.set_level(logging.INFO, logger="quorumd.raft.aio.driver")
    c = await three(tmp_path, snapshot_threshold=10)
    try:
        lead = await c.leader()
        for i in range(150):
            await asyncio.wait_for(lead.propose(b"%04d" % i + b"x" * 2048), 5)
        taken = [r.getMessage() for r in caplog.records if r.getMessage().startswith("raft_snapshot_taken")]
        # A fixed interval of 10 would take ~15 per node (45); growing intervals (10, ~30,
        # ~90) take 2-4 per node.
        assert 3 <= len(taken) <= 15, taken
        nid, commit = lead.core.node_id, lead.core.commit_index
        await c.stop(nid)
        d = c.start(nid, snapshot_threshold=10)
        await asyncio.wait_for(d.wait_applied(commit), 10)
        assert c.apps[nid].values[-150:] == [b"%04d" % i + b"x" * 2048 for i in range(150)]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_proposal_timeout_ends_the_wait_and_leaves_the_driver_usable(tmp_path: Path) -> None:
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        nid = lead.core.node_id
        real_send = c.send
        # the leader's messages are lost: nothing it proposes can commit
        c.send = lambda to, frame, frm: False if frm == nid else real_send(to, frame, frm)  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(lead.propose(b"stuck", timeout=0.03), 5)
        # expired on a tick (10 ms here), long before CheckQuorum (10 ticks) could end it
        assert loop.time() - started < 0.09
        c.send = real_send  # type: ignore[method-assign]
        new = await c.leader()
        assert await asyncio.wait_for(new.propose(b"after", timeout=5.0), 5) >= 1
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_leadership_transfer(tmp_path: Path) -> None:
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        target = next(n for n in (1, 2, 3) if n != lead.core.node_id)
        lead.step_now(lambda core: core.transfer_leadership(target))
        new = await c.wait_leader_is(target)
        assert await asyncio.wait_for(new.propose(b"after"), 5) >= 1
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_ticks_continue_when_the_timer_fires_before_the_clock_reaches_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop runs timers on a cached millisecond clock: a callback can see ``loop.time()`` a
    fraction of a millisecond before the deadline it was scheduled for. The driver must re-arm
    anyway (it once waited for ``time >= deadline`` with no timer left, and never ticked again)."""
    loop = asyncio.get_running_loop()
    real_call_at = loop.call_at

    def early_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        return real_call_at(when - 0.0015, callback, *args, **kw)  # fires 1.5 ms early

    monkeypatch.setattr(loop, "call_at", early_call_at)
    c = DriverCluster(tmp_path)
    try:
        d = c.start(1, founder=True)
        ticks = 0
        real_tick = d.core.tick

        def counting_tick() -> None:
            nonlocal ticks
            ticks += 1
            real_tick()

        monkeypatch.setattr(d.core, "tick", counting_tick)
        for _ in range(200):  # bounded: 2 s at most
            if ticks >= 20:
                break
            await asyncio.sleep(0.01)
        assert ticks >= 20
        assert d.core.role == Role.LEADER  # and the founder elected itself
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_propose_then_follows_the_entry_so_a_transfer_does_not_drop_it(tmp_path: Path) -> None:
    """``then`` runs on the core right after the proposal is appended: a transfer started that
    way follows the entry (the core drops proposals once a transfer is under way), the target
    takes over holding it, and the old leader's proposal still resolves when the new leader
    commits it."""
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        old = lead.core.node_id
        target = next(n for n in (1, 2, 3) if n != old)
        seen: list[int] = []

        def transfer(core: RaftCore) -> None:
            seen.append(core.log.last_index)  # the entry is already in the log
            core.transfer_leadership(target)

        position = await asyncio.wait_for(lead.propose(b"last words", then=transfer), 5)
        assert len(seen) == 1
        assert c.apps[old].values[position - 1] == b"last words"
        new = await c.wait_leader_is(target)
        assert await asyncio.wait_for(new.propose(b"after"), 5) == position + 1
        assert c.apps[target].values[position - 1 :] == [b"last words", b"after"]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_candidate_asks_for_votes_before_its_vote_is_durable_but_wins_only_after(
    tmp_path: Path,
) -> None:
    """The vote requests overlap the candidate's own write of its term and vote; the answers are
    stepped only once that write is done, so it never leads on a vote a crash could erase."""
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        target = next(n for n in (1, 2, 3) if n != lead.core.node_id)
        d = c.drivers[target]
        events: list[tuple[str, int]] = []
        storage = c.storages[target]
        real_sync, real_send = storage.sync, d._send

        def sync() -> float:
            events.append(("sync", storage.hard_state.term))
            return real_sync()

        def send(to: int, frame: bytes) -> bool:
            m = decode_message(frame)
            if m.type == MessageType.VOTE:
                events.append(("vote request", m.term))
            return real_send(to, frame)

        def on_soft_state(old: SoftState, new: SoftState) -> None:
            if new.role == Role.LEADER:
                events.append(("leader", d.core.term))

        storage.sync = sync  # type: ignore[method-assign]
        d._send = send
        d.hooks.on_soft_state = on_soft_state
        term = lead.core.term
        lead.step_now(lambda core: core.transfer_leadership(target))
        await c.wait_leader_is(target)
        new_term = term + 1
        assert ("leader", new_term) in events, events
        asks = events.index(("vote request", new_term))
        durable = events.index(("sync", new_term))
        assert asks < durable < events.index(("leader", new_term))
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_leader_writes_on_the_loop_only_when_the_batch_is_all_it_has_in_flight(
    tmp_path: Path,
) -> None:
    """Nothing else in flight: the leader writes the batch on the loop thread (no hand-off back
    from the storage thread on the write's path). An earlier batch still waiting to commit: the
    storage thread, so the loop keeps reading acks while the leader's own fsync runs."""
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        storage = c.storages[lead.core.node_id]
        real_sync = storage.sync
        threads: list[str] = []
        synced, synced_by_thread = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def sync() -> float:
            threads.append(threading.current_thread().name)
            if threading.current_thread() is threading.main_thread():
                synced.set()
            else:
                loop.call_soon_threadsafe(synced_by_thread.set)
            real_sync()
            return 0.0001  # a fast disk: this machine's real fsyncs may average over the inline limit

        storage.sync = sync  # type: ignore[method-assign]
        # A new leader's first entry may still be waiting to commit when a slow host gets here:
        # one committed write first, so that each write below is the only batch in flight.
        await asyncio.wait_for(lead.propose(b"warm-up"), 5)
        threads.clear()
        for i in range(5):
            await asyncio.wait_for(lead.propose(b"one%d" % i), 5)
        assert threads and set(threads) == {threading.main_thread().name}

        # hold the followers' traffic so the first batch stays uncommitted
        followers = [n for n in (1, 2, 3) if n != lead.core.node_id]
        held: list[tuple[int, bytes, int]] = []
        real_send = c.send

        def send(to: int, frame: bytes, frm: int) -> bool:
            if to in followers:
                held.append((to, frame, frm))
                return True
            return real_send(to, frame, frm)

        c.send = send  # type: ignore[method-assign]
        threads.clear()
        synced.clear()
        first = asyncio.ensure_future(lead.propose(b"first"))
        await asyncio.wait_for(synced.wait(), 5)  # written inline: the only batch in flight
        second = asyncio.ensure_future(lead.propose(b"second"))
        await asyncio.wait_for(synced_by_thread.wait(), 5)  # the second write: the storage thread
        assert threads[0] == threading.main_thread().name
        assert threads[1].startswith("raft-storage")
        c.send = real_send  # type: ignore[method-assign]
        for to, frame, frm in held:
            real_send(to, frame, frm)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        await asyncio.wait_for(c.drivers[followers[0]].wait_applied(lead.core.commit_index), 5)
        assert c.apps[followers[0]].values[-2:] == [b"first", b"second"]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_followers_write_on_the_loop_only_while_the_disk_is_fast(tmp_path: Path) -> None:
    """A follower's small batches are written on the loop thread while fsyncs are fast (the
    storage-thread hand-off then costs more than the fsync); when the disk turns slow (5 ms
    here), the writes move back to the storage thread so the follower's loop is not stalled."""
    c = await three(tmp_path)
    try:
        lead = await c.leader()
        follower = next(n for n in (1, 2, 3) if n != lead.core.node_id)
        storage = c.storages[follower]
        real_sync = storage.sync
        slow = False
        threads: list[str] = []

        def sync() -> float:
            # The disk's speed is the test's to choose: this shared machine's real fsyncs
            # sometimes average over the inline limit, which made the fast phase flaky.
            threads.append(threading.current_thread().name)
            real_sync()
            if slow:
                time.sleep(0.005)  # a slow disk, not a wait for another task
                return 0.005
            return 0.0001

        storage.sync = sync  # type: ignore[method-assign]
        for i in range(20):
            await asyncio.wait_for(lead.propose(b"fast%d" % i), 5)
        assert threads and threads[-1] == threading.main_thread().name
        slow = True
        for i in range(20):
            await asyncio.wait_for(lead.propose(b"slow%d" % i), 5)
        assert threads[-1].startswith("raft-storage")
        await asyncio.wait_for(c.drivers[follower].wait_applied(lead.core.commit_index), 5)
        assert c.apps[follower].values[-1] == b"slow19"
    finally:
        await c.close()


class _FdExhaustion:
    """``os.open`` failing with EMFILE for the storage's new files while the process "has hit its
    file-descriptor limit": the next ``per_kind`` snapshot temp files and WAL segments."""

    def __init__(self, per_kind: int) -> None:
        self.remaining = {"snapshot": per_kind, "wal": per_kind}
        self.refused = 0
        self._real = os.open
        self._lock = threading.Lock()

    def __call__(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        name = os.fspath(path)
        kind = None
        if name.endswith(".tmp"):
            kind = "snapshot"
        elif Path(name).name.startswith("wal-") and flags & os.O_CREAT:
            kind = "wal"
        if kind is not None:
            with self._lock:
                if self.remaining[kind] > 0:
                    self.remaining[kind] -= 1
                    self.refused += 1
                    raise OSError(errno.EMFILE, "Too many open files", name)
        return self._real(path, flags, mode, *a, **kw)


@pytest.mark.asyncio
async def test_out_of_file_descriptors_in_storage_is_retried_never_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Snapshots and WAL segment rolls refused with EMFILE: the driver backs off and retries,
    every proposal commits, the driver keeps running, and a restart recovers every write."""
    c = DriverCluster(tmp_path)
    try:
        lead = c.start(1, founder=True, snapshot_threshold=10)
        await c.leader()
        caplog.set_level(logging.WARNING, logger="quorumd.raft.aio.driver")
        exhaustion = _FdExhaustion(per_kind=3)
        monkeypatch.setattr(os, "open", exhaustion)
        n = 0
        deadline = time.monotonic() + 60
        while any(exhaustion.remaining.values()) and time.monotonic() < deadline:
            await asyncio.wait_for(lead.propose(b"f%d" % n), 10)  # a snapshot every 10 entries
            n += 1
        assert not any(exhaustion.remaining.values()), exhaustion.remaining
        retried = {m.split()[1] for m in caplog.messages if m.startswith("raft_storage_retry")}
        assert retried == {"what=snapshot", "what=write"}, caplog.messages  # snapshot files, WAL rolls
        assert lead.storage_retries >= 6
        for i in range(n, n + 40):  # the limit is gone: snapshots are taken and saved again
            await asyncio.wait_for(lead.propose(b"f%d" % i), 10)
        n += 40
        assert lead._task is not None and not lead._task.done()  # the driver survived
        monkeypatch.undo()
        assert lead.core.status().snapshot_index > 0
        commit = lead.core.commit_index
        await c.stop(1)
        d = c.start(1, snapshot_threshold=10)
        await asyncio.wait_for(d.wait_applied(commit), 10)
        assert c.apps[1].values[-n:] == [b"f%d" % i for i in range(n)]
    finally:
        monkeypatch.undo()
        await c.close()
