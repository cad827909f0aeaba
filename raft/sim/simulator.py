"""The deterministic cluster simulator (after TigerBeetle's VOPR and FoundationDB's simulation).

One seed drives everything through one ``random.Random``: the per-run fault profile (swarm
testing: drop, duplicate and delay rates, crash and partition rates differ per seed), every node's
engine seed, message fates, faults and client actions. A *step* is one scheduler event popped from
the heap (``(time, seq, event)``): a node tick, a message delivery, a client action, a fault, a
restart, a partition heal or a membership action. After each step the touched node's Readys are
driven exactly like the production driver (persist snapshot, entries, hard state; sync; send;
apply; deliver read states; advance) while the checkers watch every durable write and apply.

Crashes lose what was not durable: the core's memory, the disk's unsynced tail (``SimDisk``) and,
for a crash between ``ready()`` and ``advance()``, any prefix of the Ready's processing (nothing,
the snapshot, the entries, the hard state, the fsync, some messages, some applies).

After ``steps`` steps the run heals the network, restarts every crashed node, stops all faults and
requires a leader to commit a fresh proposal on every live member within ``liveness_ticks``.

The trace is one short line per event; its sha256 is the replay fingerprint and its tail is printed
with a violation.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import traceback
from collections import deque

from ..codec import decode_conf_change
from ..core.node import RaftCore
from ..core.ready import (
    CoreConfig,
    InvariantError,
    NotLeaderError,
    ProposalDroppedError,
    Ready,
)
from ..core.types import (
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    Role,
    Snapshot,
    SnapshotMeta,
)
from .app import AppState
from .checkers import (
    ENGINE_ERROR,
    LIVENESS,
    STATE_MACHINE_SAFETY,
    SafetyChecker,
    Violation,
)
from .disk import DiskError
from .model import (
    BUG_SWITCHES,
    EV_CLIENT,
    EV_DELIVER,
    EV_DEPOSE,
    EV_FAULT,
    EV_HEAL,
    EV_MEMBER,
    EV_RESTART,
    EV_SHUTDOWN,
    EV_TICK,
    EV_UNSUPPRESS,
    STAT_NAMES,
    Event,
    SimNode,
    SimOptions,
    SimResult,
    draw_profile,
)
from .nemesis import Nemesis
from .network import CALM, TICK_UNITS, SimNetwork

_MT = {int(t): t.name for t in MessageType}
_FULL = 7  # _handle_ready stage: everything


class Simulation:
    def __init__(self, opts: SimOptions) -> None:
        for b in opts.bugs:
            if b not in BUG_SWITCHES:
                raise ValueError(f"unknown bug switch {b!r} (known: {', '.join(BUG_SWITCHES)})")
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.profile = draw_profile(self.rng)
        core_kwargs: dict[str, int | bool] = dict(self.profile.core)
        for b in opts.bugs:
            core_kwargs["bug_" + b] = True
        self.core_kwargs = core_kwargs
        self.net = SimNetwork(self.rng, self.profile.network)
        self.checker = SafetyChecker()
        self.nodes: dict[NodeId, SimNode] = {}
        self.live: list[NodeId] = []  # sorted ids of running nodes
        self.heap: list[tuple[int, int, Event]] = []
        self.seq = 0
        self.now = 0
        self.steps = 0
        self.liveness_steps = 0
        self.next_id = 1
        self.writes = 0
        self.reads = 0
        self.chaos = True
        self.fault_names = [name for name, _ in self.profile.weights]
        self.fault_weights = [w for _, w in self.profile.weights]
        self.trace: deque[str] = deque(maxlen=opts.trace_tail)
        self.hasher = hashlib.sha256()
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.marker_data = b""
        self.marker_index = 0
        self.nemesis = Nemesis(self)

    # ------------------------------------------------------------------ plumbing
    def _push(self, at: int, ev: Event) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, ev))

    def _log(self, line: str) -> None:
        self.hasher.update(line.encode())
        self.hasher.update(b"\n")
        self.trace.append(line)

    def _core_config(self, node_id: NodeId) -> CoreConfig:
        return CoreConfig(node_id=node_id, **self.core_kwargs)  # type: ignore[arg-type]

    def _set_live(self, node: SimNode, alive: bool) -> None:
        node.alive = alive
        if alive:
            if node.node_id not in self.live:
                self.live.append(node.node_id)
                self.live.sort()
        elif node.node_id in self.live:
            self.live.remove(node.node_id)

    def _start(self, node: SimNode) -> None:
        """Build the node's core from its disk, as a restarting driver would."""
        hs, snap, entries = node.disk.load()
        node.app = self.checker.on_snapshot(node.node_id, snap) if snap is not None else AppState()
        rng = random.Random(self.rng.getrandbits(64))
        node.core = RaftCore(
            self._core_config(node.node_id), rng, hard_state=hs, snapshot=snap, entries=entries
        )
        node.incarnation += 1
        node.is_leader = False
        node.suppressed = False
        node.doomed = False
        self._set_live(node, True)
        self.checker.check_node_config(node.node_id, node.core.config, node.disk)
        self._push(self.now + self.rng.randint(1, TICK_UNITS), (EV_TICK, node, node.incarnation))
        self._drain(node)

    def _new_node(self) -> SimNode:
        node = SimNode(self.next_id)
        self.next_id += 1
        self.nodes[node.node_id] = node
        return node

    def _leader(self) -> SimNode | None:
        best: SimNode | None = None
        for nid in self.live:
            n = self.nodes[nid]
            if n.is_leader and n.core is not None and (best is None or n.core.term > best.core.term):  # type: ignore[union-attr]
                best = n
        return best

    # ------------------------------------------------------------------ Ready handling
    def _drain(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        while core.has_ready():
            rd = core.ready()
            if node.doomed:
                self._crash(node, rd)
                return
            unreachable = self._handle_ready(node, rd, _FULL)
            core.advance(rd)
            for nid in unreachable:
                core.report_unreachable(nid)

    def _handle_ready(self, node: SimNode, rd: Ready, stage: int) -> list[NodeId]:
        """Drive one Ready up to ``stage`` (0 nothing, 1 snapshot, 2 entries, 3 hard state, 4 fsync
        when ``must_sync``, 5 some messages, 6 all messages and some applies, 7 everything).
        Returns peers found unreachable while sending."""
        nid = node.node_id
        disk = node.disk
        checker = self.checker
        core = node.core
        assert core is not None
        config_moved = False
        snap = rd.snapshot
        if snap is not None and stage >= 1:
            if snap.meta.index < node.app.applied_index:
                raise Violation(
                    STATE_MACHINE_SAFETY,
                    f"node {nid} got snapshot at {snap.meta.index} below applied {node.app.applied_index}",
                )
            disk.install_snapshot(snap)
            node.app = checker.on_snapshot(nid, snap)
            self.stats["snapshots_installed"] += 1
            self._log(f"{self.now} snap {nid} i{snap.meta.index} t{snap.meta.term}")
            config_moved = True
        if stage < 2:
            return []
        if rd.entries:
            try:
                steps, moved = disk.append(rd.entries, synced=False)
            except DiskError as exc:
                raise Violation(ENGINE_ERROR, f"node {nid}: {exc}") from None
            checker.on_append(nid, rd.entries, disk)
            for index, before, after in steps:
                checker.check_conf_step(nid, index, before, after)
            config_moved = config_moved or moved
        if stage < 3:
            return []
        hs = rd.hard_state
        if hs is not None:
            checker.on_hard_state(nid, disk.hard_state, hs)
            disk.set_hard_state(hs, synced=False)
        if stage < 4:
            return []
        if rd.must_sync:
            disk.sync()
        if stage < 5:
            return []
        if stage == _FULL:
            if config_moved:
                checker.check_node_config(nid, core.config, disk)
            soft = rd.soft_state
            if soft is not None:
                was = node.is_leader
                node.is_leader = soft.role == Role.LEADER
                if node.is_leader and not was:
                    term = core.term
                    self.stats["elections"] += 1
                    self._log(f"{self.now} leader {nid} t{term}")
                    checker.on_leader(nid, term)
                    checker.check_leader_log(nid, term, disk)
                    if self.chaos and self.profile.depose and self.rng.random() < self.profile.depose:
                        at = self.now + self.rng.randint(0, 3 * TICK_UNITS)
                        self._push(at, (EV_DEPOSE, node, node.incarnation))
                    config_moved = True
            if node.is_leader and config_moved:
                checker.check_leader_config(nid, core.commit_index, disk)
        unreachable: list[NodeId] = []
        msgs = rd.messages
        if stage < 6 and msgs:
            msgs = tuple(m for m in msgs if self.rng.random() < 0.5)
        for m in msgs:
            if self._send(m) and self.rng.random() < 0.2:
                unreachable.append(m.to)
        if stage < 6:
            return []
        committed = rd.committed_entries
        if committed and node.is_leader and self.chaos and self.profile.depose_on_commit:
            # The moment only the leader knows an entry is committed: cut it off before the
            # followers hear (isolation also drops the messages still in flight).
            if self.rng.random() < self.profile.depose_on_commit:
                self._push(self.now + self.rng.randint(0, 40), (EV_DEPOSE, node, node.incarnation))
        if stage < _FULL and committed:
            committed = committed[: self.rng.randint(0, len(committed))]
        for e in committed:
            self._apply(node, e)
        if stage < _FULL:
            return []
        for rs in rd.read_states:
            checker.on_read_state(nid, rs)
        return unreachable

    def _send(self, m: Message) -> bool:
        """Put a message on the network; True when the link is cut or the peer is down."""
        self.stats["msgs_sent"] += 1
        delays = self.net.delays(m.frm, m.to)
        if not delays:
            self.stats["msgs_lost"] += 1
        for d in delays:
            self._push(self.now + d, (EV_DELIVER, m, 0))
        peer = self.nodes.get(m.to)
        return self.net.is_blocked(m.frm, m.to) or peer is None or not peer.alive

    def _apply(self, node: SimNode, e: Entry) -> None:
        app = node.app
        if e.index != app.applied_index + 1:
            raise Violation(
                STATE_MACHINE_SAFETY,
                f"node {node.node_id} applied index {e.index} after {app.applied_index} (not contiguous)",
            )
        if self.checker.on_apply(node.node_id, e):
            if e.type == EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                self.stats["conf_changes"] += 1
                self._log(f"{self.now} committed i{e.index} {cc.type.name} {cc.node_id}")
                if cc.type == ConfChangeType.REMOVE:
                    at = self.now + self.rng.randint(0, 30) * TICK_UNITS
                    self._push(at, (EV_SHUTDOWN, cc.node_id, 0))
            elif e.data and e.data == self.marker_data:
                self.marker_index = e.index
        node.app = app.apply(e)

    # ------------------------------------------------------------------ events
    def _step(self) -> bool:
        """Run one scheduler event. Returns False for a stale event that does not count."""
        at, _, ev = heapq.heappop(self.heap)
        kind, obj, num = ev
        if kind == EV_TICK:
            node = obj
            assert isinstance(node, SimNode)
            if node.incarnation != num or not node.alive:
                return False
            self.now = at
            core = node.core
            assert core is not None
            self._log(f"{at} tick {node.node_id}")
            core.tick()
            core.flush_commit_broadcast()  # a lazy commit broadcast waits at most one tick here
            self._drain(node)
            self._push(at + TICK_UNITS, ev)
            return True
        self.now = at
        if kind == EV_DELIVER:
            assert isinstance(obj, Message)
            self._deliver(obj)
        elif kind == EV_CLIENT:
            self._client()
        elif kind == EV_FAULT:
            self.nemesis.fault()
        elif kind == EV_MEMBER:
            self.nemesis.member()
        elif kind == EV_RESTART:
            assert isinstance(obj, SimNode)
            if obj.retired or obj.alive:
                return False
            self._log(f"{at} restart {obj.node_id}")
            self.stats["restarts"] += 1
            self._start(obj)
        elif kind == EV_HEAL:
            assert isinstance(obj, list)
            self._log(f"{at} heal {len(obj)}")
            self.net.unblock(obj)
        elif kind == EV_SHUTDOWN:
            assert isinstance(obj, int)
            self._shutdown(obj)
        elif kind == EV_DEPOSE:
            assert isinstance(obj, SimNode)
            if obj.incarnation != num or not obj.alive or not obj.is_leader or not self.chaos:
                return False
            self.nemesis.depose(obj)
        elif kind == EV_UNSUPPRESS:
            assert isinstance(obj, SimNode)
            if obj.incarnation != num or not obj.alive or obj.core is None:
                return False
            obj.suppressed = False
            obj.core.set_campaign_suppressed(False)
            self._drain(obj)
        return True

    def _deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        tag = (
            f"{self.now} {m.frm}>{m.to} {_MT[m.type]} t{m.term} i{m.index} lt{m.log_term} "
            f"n{len(m.entries)} c{m.commit}"
        )
        if node is None or not node.alive or self.net.is_blocked(m.frm, m.to):
            self._log(tag + " lost")
            return
        self._log(tag + (" R" if m.reject else ""))
        core = node.core
        assert core is not None
        core.step(m)
        self._drain(node)

    def _client(self) -> None:
        rng = self.rng
        if not self.chaos:
            return
        self._push(self.now + rng.randint(1, 2 * self.profile.client_gap_units), (EV_CLIENT, None, 0))
        if not self.live:
            return
        node = self.nodes[rng.choice(self.live)]
        core = node.core
        assert core is not None
        if rng.random() < 0.7:
            target = node
            if not node.is_leader:
                hint = self.nodes.get(core.leader_id)
                if hint is None or not hint.alive:
                    self.stats["proposals_refused"] += 1
                    return
                target = hint
            self.writes += 1
            data = b"w%d" % self.writes
            tcore = target.core
            assert tcore is not None
            try:
                index = tcore.propose(data)
            except (NotLeaderError, ProposalDroppedError):
                self.stats["proposals_refused"] += 1
                self._log(f"{self.now} propose {target.node_id} refused")
                return
            self.stats["proposals"] += 1
            self._log(f"{self.now} propose {target.node_id} i{index}")
            self._drain(target)
        else:
            self.reads += 1
            ctx = b"r%d" % self.reads
            self.checker.on_read_issued(ctx)
            try:
                core.read_index(ctx)
            except NotLeaderError:
                self.stats["reads_refused"] += 1
                return
            self.stats["reads"] += 1
            self._log(f"{self.now} read {node.node_id} {ctx.decode()}")
            self._drain(node)

    def _compact(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        disk = node.disk
        idx = node.app.applied_index
        if idx <= disk.snapshot_index:
            return
        term = disk.term_at(idx)
        if term is None:
            raise Violation(ENGINE_ERROR, f"node {node.node_id} applied {idx}, not in its durable log")
        snap = Snapshot(SnapshotMeta(idx, term, disk.config_at(idx)), node.app.encode())
        self.checker.on_snapshot(node.node_id, snap)
        disk.compact(snap)
        core.compact(idx, snap.data)
        self.stats["compactions"] += 1
        self._log(f"{self.now} compact {node.node_id} i{idx}")
        self._drain(node)

    def _crash(self, node: SimNode, rd: Ready | None = None) -> None:
        """Crash now; with ``rd`` (taken by ``ready()``, never advanced) after a random prefix of
        its processing."""
        self.stats["crashes"] += 1
        stage = 7
        if rd is not None:
            stage = self.rng.randint(0, 6)
            self.stats["crashes_mid_ready"] += 1
            self._handle_ready(node, rd, stage)
        lost = node.disk.crash(self.rng)
        self.stats["unsynced_lost"] += lost
        node.core = None
        node.is_leader = False
        node.doomed = False
        self._set_live(node, False)
        self._log(f"{self.now} crash {node.node_id} stage={stage} lost={lost}")
        self._push(self.now + self.rng.randint(1, 40) * TICK_UNITS, (EV_RESTART, node, 0))

    def _shutdown(self, node_id: NodeId) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.retired:
            return
        node.retired = True
        node.core = None
        node.is_leader = False
        self._set_live(node, False)
        self._log(f"{self.now} retire {node_id}")

    # ------------------------------------------------------------------ run
    def _bootstrap(self) -> None:
        node = self._new_node()
        hs, entries = RaftCore.bootstrap_entries(node.node_id)
        steps, _ = node.disk.append(entries, synced=True)
        self.checker.on_append(node.node_id, entries, node.disk)
        for index, before, after in steps:
            self.checker.check_conf_step(node.node_id, index, before, after)
        self.checker.on_hard_state(node.node_id, HardState(), hs)
        node.disk.set_hard_state(hs, synced=True)
        self._start(node)
        self._push(self.now + 1, (EV_CLIENT, None, 0))
        self._push(self.now + self.profile.fault_gap_units, (EV_FAULT, None, 0))
        self._push(self.now + 2, (EV_MEMBER, None, 0))

    def _liveness(self) -> None:
        """Heal everything, stop faults and require a fresh proposal to commit on every member."""
        self.chaos = False
        self.net.heal_all()
        self.net.profile = CALM
        self._log(f"{self.now} liveness")
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            node.doomed = False
            if node.retired:
                continue
            if not node.alive:
                self._start(node)
            elif node.suppressed and node.core is not None:
                node.suppressed = False
                node.core.set_campaign_suppressed(False)
                self._drain(node)
        start = self.now
        deadline = self.now + self.opts.liveness_ticks * TICK_UNITS
        next_try = self.now
        attempt = 0
        while True:
            if self.marker_index and self._marker_everywhere():
                return
            if self.now >= deadline:
                break
            if not self.marker_index and self.now >= next_try:
                leader = self._leader()
                if leader is not None and leader.core is not None:
                    attempt += 1
                    self.marker_data = b"liveness-%d" % attempt
                    try:
                        leader.core.propose(self.marker_data)
                        self._drain(leader)
                    except (NotLeaderError, ProposalDroppedError):
                        pass
                    next_try = self.now + 30 * TICK_UNITS
            if self._step():
                self.liveness_steps += 1
        leader = self._leader()
        lagging = []
        for nid in self._members():
            n = self.nodes[nid]
            lagging.append(f"{nid}:applied={n.app.applied_index}")
        raise Violation(
            LIVENESS,
            f"no proposal committed on every member within {self.opts.liveness_ticks} ticks after healing "
            f"(from t={start}; leader={leader.node_id if leader else 0}, marker index={self.marker_index}, "
            f"members {' '.join(lagging)})",
        )

    def _members(self) -> list[NodeId]:
        leader = self._leader()
        if leader is None or leader.core is None:
            return [nid for nid in self.live]
        return [nid for nid in sorted(leader.core.config.members()) if nid in self.nodes]

    def _marker_everywhere(self) -> bool:
        leader = self._leader()
        if leader is None:
            return False
        for nid in self._members():
            n = self.nodes[nid]
            if n.retired:
                continue
            if not n.alive or n.app.applied_index < self.marker_index:
                return False
        return True

    def run(self) -> SimResult:
        kind = ""
        detail = ""
        try:
            self._bootstrap()
            while self.steps < self.opts.steps:
                if self._step():
                    self.steps += 1
            if self.opts.liveness:
                self._liveness()
        except Violation as v:
            kind, detail = v.kind, v.detail
        except InvariantError as exc:
            kind, detail = ENGINE_ERROR, f"InvariantError: {exc}"
        except Exception as exc:
            tb = traceback.format_exc(limit=-6)
            kind, detail = ENGINE_ERROR, f"{type(exc).__name__}: {exc}\n{tb}"
        if kind:
            self._log(f"{self.now} VIOLATION {kind}")
        leader = self._leader()
        lcore = leader.core if leader is not None else None
        stats = dict(self.stats)
        stats["reads_checked"] = self.checker.reads_checked
        stats["nodes_created"] = self.next_id - 1
        return SimResult(
            options=self.opts,
            ok=not kind,
            kind=kind,
            violation=detail,
            trace_tail=tuple(self.trace),
            trace_hash=self.hasher.hexdigest(),
            steps=self.steps,
            liveness_steps=self.liveness_steps,
            sim_ticks=self.now // TICK_UNITS,
            leader=leader.node_id if leader is not None else 0,
            term=lcore.term if lcore is not None else 0,
            commit_index=lcore.commit_index if lcore is not None else 0,
            applied_entries=self.checker.committed_index,
            stats=tuple(sorted(stats.items())),
        )


def run_simulation(opts: SimOptions) -> SimResult:
    return Simulation(opts).run()
