"""A tiny synchronous in-memory network of RaftCores for unit tests (explicit time, no sockets).

``Net.pump()`` processes every Ready (persisting into an in-memory "disk" per node, then
delivering messages) until the network is quiet; ``drop``/``isolate`` cut links; ``tick`` moves
every node's clock by one tick.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from quorumd.raft.codec import decode_conf_change
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import CoreConfig, ReadState
from quorumd.raft.core.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    Role,
    Snapshot,
)


@dataclass
class Disk:
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def append(self, entries: tuple[Entry, ...]) -> None:
        if not entries:
            return
        first = entries[0].index
        self.entries = [e for e in self.entries if e.index < first] + list(entries)


class Net:
    def __init__(self, *ids: int, cfg: Callable[[int], CoreConfig] | None = None, seed: int = 1) -> None:
        self.cfg = cfg or (lambda nid: CoreConfig(node_id=nid, election_ticks=10, heartbeat_ticks=1))
        self.nodes: dict[int, RaftCore] = {}
        self.disks: dict[int, Disk] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.cut: set[tuple[int, int]] = set()
        self.filter: Callable[[Message], Message | None] | None = None  # may rewrite or drop
        self.delivered: list[Message] = []
        self.seed = seed
        for nid in ids:
            self.add(nid, founder=nid == ids[0])

    def add(self, nid: int, *, founder: bool = False) -> RaftCore:
        disk = Disk()
        if founder:
            hs, entries = RaftCore.bootstrap_entries(nid)
            disk.hard_state, disk.entries = hs, entries
        self.disks[nid] = disk
        self.applied[nid] = []
        self.read_states[nid] = []
        return self.restart(nid)

    def restart(self, nid: int) -> RaftCore:
        d = self.disks[nid]
        core = RaftCore(
            self.cfg(nid),
            random.Random(self.seed * 100 + nid),
            hard_state=d.hard_state,
            snapshot=d.snapshot,
            entries=list(d.entries),
        )
        self.nodes[nid] = core
        # The state machine is rebuilt: the snapshot, then committed entries are applied again.
        snap_index = d.snapshot.meta.index if d.snapshot else 0
        self.applied[nid] = [e for e in self.applied[nid] if e.index <= snap_index]
        return core

    def isolate(self, nid: int) -> None:
        for other in self.nodes:
            if other != nid:
                self.cut.add((nid, other))
                self.cut.add((other, nid))

    def heal(self) -> None:
        self.cut.clear()

    def pump(self, max_rounds: int = 10000) -> None:
        for _ in range(max_rounds):
            outbox: list[Message] = []
            for nid, core in list(self.nodes.items()):
                while core.has_ready():
                    rd = core.ready()
                    d = self.disks[nid]
                    if rd.snapshot is not None:
                        d.snapshot = rd.snapshot
                        d.entries = [e for e in d.entries if e.index > rd.snapshot.meta.index]
                        self.applied[nid] = [
                            e for e in self.applied[nid] if e.index <= rd.snapshot.meta.index
                        ]
                    d.append(rd.entries)
                    if rd.hard_state is not None:
                        d.hard_state = rd.hard_state
                    outbox.extend(rd.messages)
                    self.applied[nid].extend(rd.committed_entries)
                    self.read_states[nid].extend(rd.read_states)
                    core.advance(rd)
                # has_ready() answers from a few fields without building a Ready: it must agree.
                assert core.ready().is_empty(), f"node {nid}: has_ready() is False but ready() is not empty"
            if not outbox:
                return
            for m in outbox:
                if (m.frm, m.to) in self.cut or m.to not in self.nodes:
                    continue
                if self.filter is not None:
                    filtered = self.filter(m)
                    if filtered is None:
                        continue
                    m = filtered
                self.delivered.append(m)
                self.nodes[m.to].step(m)
        raise AssertionError("network did not quiesce")

    def tick(self, n: int = 1, only: list[int] | None = None) -> None:
        for _ in range(n):
            for nid, core in self.nodes.items():
                if only is None or nid in only:
                    core.tick()
            self.pump()

    def elect(self, nid: int) -> None:
        self.nodes[nid].campaign()
        self.pump()
        assert self.nodes[nid].role == Role.LEADER, f"node {nid} did not win: {self.nodes[nid].role}"

    def leader(self) -> RaftCore:
        leaders = [c for c in self.nodes.values() if c.role == Role.LEADER]
        assert len(leaders) == 1, f"expected one leader, got {[c.node_id for c in leaders]}"
        return leaders[0]

    def grow(self, *ids: int, voters: bool = True) -> None:
        """Add members through the leader's conf changes, like production joins."""
        for nid in ids:
            if nid not in self.nodes:
                self.add(nid)
            lead = self.leader()
            lead.propose_conf_change(ConfChange(ConfChangeType.ADD_NONVOTER, nid))
            self.pump()
            if voters:
                self.leader().propose_conf_change(ConfChange(ConfChangeType.PROMOTE, nid))
                self.pump()

    def data_applied(self, nid: int) -> list[bytes]:
        return [e.data for e in self.applied[nid] if e.type == EntryType.NORMAL and e.data]


def conf_changes(entries: list[Entry]) -> list[ConfChange]:
    return [decode_conf_change(e.data) for e in entries if e.type == EntryType.CONF_CHANGE]


def with_cfg(**kw: object) -> Callable[[int], CoreConfig]:
    return lambda nid: replace(CoreConfig(node_id=nid, election_ticks=10, heartbeat_ticks=1), **kw)  # type: ignore[arg-type]
