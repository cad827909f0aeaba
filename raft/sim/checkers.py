"""Invariant checkers: the simulator feeds them every durable write, apply, election and read.

``SafetyChecker`` keeps the global history the invariants are stated over and raises ``Violation``
(never returns a flag) the moment one breaks:

- election safety: at most one leader per term; a node never votes twice in one term and its
  durable term never goes back;
- log matching: every entry ever written at (index, term) has the same type, data and previous
  term, so two durable logs that agree at (index, term) agree on the whole prefix (by induction
  over appends, O(1) per entry);
- leader completeness: when a node becomes leader its log holds every entry committed before (the
  committed prefix is learned from applies, so it only ever under-approximates);
- state machine safety: no two nodes apply different entries at one index, applies are contiguous,
  and a restored snapshot's digest equals the committed prefix's digest at its index (so nothing
  applied is lost or rewritten);
- configuration safety: every conf change moves one member; the engine's configuration is the one
  its durable log implies; a leader carries at most one uncommitted change and its view of the
  committed configuration is the global one. (The "at most one change from committed" rule is
  checked on leaders only: a follower's commit index may lag two changes behind its log
  legitimately, and a partitioned node may hold a configuration many changes old; such nodes can
  only lead after catching up, which leader completeness already covers.)
- linearizable reads: a ReadState index is >= the committed prefix known when the read was issued.

Liveness is checked by the simulator itself at the end of a run (``LIVENESS``).
"""

from __future__ import annotations

from typing import Protocol

from ..codec import decode_conf_change
from ..core.ready import ReadState
from ..core.types import Configuration, Entry, EntryType, HardState, NodeId, Snapshot
from .app import EMPTY_DIGEST, AppState, chain_digest
from .membership import apply_conf_change, changed_nodes, describe, majorities_overlap

ELECTION_SAFETY = "election_safety"
LOG_MATCHING = "log_matching"
LEADER_COMPLETENESS = "leader_completeness"
STATE_MACHINE_SAFETY = "state_machine_safety"
CONFIG_SAFETY = "config_safety"
LINEARIZABLE_READ = "linearizable_read"
DURABILITY = "durability"
LIVENESS = "liveness"
ENGINE_ERROR = "engine_error"


class Violation(Exception):
    """A broken invariant: ``kind`` is one of the constants above."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class LogView(Protocol):
    """The read side of a node's durable log (``SimDisk`` implements it)."""

    @property
    def snapshot_index(self) -> int: ...
    @property
    def last_index(self) -> int: ...
    def term_at(self, index: int) -> int | None: ...
    def entry_at(self, index: int) -> Entry | None: ...
    def config_latest(self) -> Configuration: ...
    def config_at(self, index: int) -> Configuration: ...
    def conf_indexes_above(self, index: int) -> list[int]: ...


def _show(e: Entry) -> str:
    return f"(i{e.index} t{e.term} {e.type.name} {e.data[:24]!r})"


class SafetyChecker:
    def __init__(self) -> None:
        self.leaders: dict[int, NodeId] = {}
        self.seen: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.committed: list[Entry] = []  # committed[i - 1] is the entry applied at index i
        self.digests: list[bytes] = [EMPTY_DIGEST]  # digests[i] = app digest after index i
        self.committed_config = Configuration()
        self.reads: dict[bytes, int] = {}
        self.reads_checked = 0
        self.leader_checks = 0

    @property
    def committed_index(self) -> int:
        return len(self.committed)

    # ----- election safety
    def on_leader(self, node: NodeId, term: int) -> None:
        prev = self.leaders.setdefault(term, node)
        if prev != node:
            raise Violation(ELECTION_SAFETY, f"two leaders in term {term}: {prev} and {node}")

    def on_hard_state(self, node: NodeId, prev: HardState, hs: HardState) -> None:
        if hs.term < prev.term:
            raise Violation(DURABILITY, f"node {node} term went back from {prev.term} to {hs.term}")
        if hs.term == prev.term and prev.vote and hs.vote != prev.vote:
            raise Violation(
                ELECTION_SAFETY, f"node {node} voted twice in term {hs.term}: {prev.vote} then {hs.vote}"
            )

    # ----- log matching
    def on_append(self, node: NodeId, entries: tuple[Entry, ...] | list[Entry], log: LogView) -> None:
        seen = self.seen
        for e in entries:
            prev_term = log.term_at(e.index - 1)
            if prev_term is None:
                raise Violation(LOG_MATCHING, f"node {node} wrote {_show(e)} with no entry before it")
            if e.term < prev_term:
                raise Violation(LOG_MATCHING, f"node {node} wrote {_show(e)} after term {prev_term}")
            rec = (int(e.type), e.data, prev_term)
            old = seen.setdefault((e.index, e.term), rec)
            if old != rec:
                raise Violation(
                    LOG_MATCHING,
                    f"node {node} wrote {_show(e)} after term {prev_term}; another log has at "
                    f"(i{e.index} t{e.term}) type={old[0]} data={old[1][:24]!r} after term {old[2]}",
                )

    # ----- state machine safety
    def on_apply(self, node: NodeId, entry: Entry) -> bool:
        """Record an apply; returns True when it extends the globally committed prefix."""
        n = len(self.committed)
        i = entry.index
        if i <= n:
            c = self.committed[i - 1]
            if c.term != entry.term or c.type != entry.type or c.data != entry.data:
                raise Violation(
                    STATE_MACHINE_SAFETY,
                    f"node {node} applied {_show(entry)}, another applied {_show(c)}",
                )
            return False
        if i != n + 1:
            raise Violation(
                STATE_MACHINE_SAFETY, f"node {node} applied {_show(entry)} beyond the committed prefix {n}"
            )
        self.committed.append(entry)
        self.digests.append(chain_digest(self.digests[-1], entry))
        if entry.type == EntryType.CONF_CHANGE:
            self.committed_config = apply_conf_change(self.committed_config, decode_conf_change(entry.data))
        return True

    def on_snapshot(self, node: NodeId, snap: Snapshot) -> AppState:
        """Check a snapshot a node restores its app from; returns the restored app state."""
        try:
            app = AppState.decode(snap.data)
        except ValueError as exc:
            raise Violation(STATE_MACHINE_SAFETY, f"node {node} got a corrupt snapshot: {exc}") from None
        idx = snap.meta.index
        if app.applied_index != idx:
            raise Violation(
                STATE_MACHINE_SAFETY,
                f"node {node} snapshot meta index {idx} but its data is the state at {app.applied_index}",
            )
        if idx > len(self.committed):
            raise Violation(
                STATE_MACHINE_SAFETY,
                f"node {node} snapshot at {idx} beyond committed {len(self.committed)}",
            )
        if app.digest != self.digests[idx]:
            raise Violation(STATE_MACHINE_SAFETY, f"node {node} snapshot at {idx} differs from committed")
        if idx and snap.meta.term != self.committed[idx - 1].term:
            raise Violation(
                STATE_MACHINE_SAFETY,
                f"node {node} snapshot at {idx} has term {snap.meta.term}, committed entry has "
                f"{self.committed[idx - 1].term}",
            )
        return app

    # ----- leader completeness
    def check_leader_log(self, node: NodeId, term: int, log: LogView) -> None:
        self.leader_checks += 1
        n = len(self.committed)
        snap = log.snapshot_index
        if 0 < snap <= n and log.term_at(snap) != self.committed[snap - 1].term:
            raise Violation(
                LEADER_COMPLETENESS, f"leader {node} of term {term} has a snapshot at {snap} of another term"
            )
        for i in range(snap + 1, n + 1):
            e = log.entry_at(i)
            c = self.committed[i - 1]
            if e is None or e.term != c.term or e.data != c.data or e.type != c.type:
                got = "nothing" if e is None else _show(e)
                raise Violation(
                    LEADER_COMPLETENESS,
                    f"leader {node} of term {term} has {got} at {i}, committed entry is {_show(c)}",
                )

    # ----- configuration safety
    def check_conf_step(self, node: NodeId, index: int, before: Configuration, after: Configuration) -> None:
        changed = changed_nodes(before, after)
        if len(changed) > 1 or not majorities_overlap(before, after):
            raise Violation(
                CONFIG_SAFETY,
                f"node {node} conf change at {index} moves {changed}: "
                f"{describe(before)} -> {describe(after)}",
            )

    def check_node_config(self, node: NodeId, engine_config: Configuration, log: LogView) -> None:
        durable = log.config_latest()
        if engine_config != durable:
            raise Violation(
                CONFIG_SAFETY,
                f"node {node} uses {describe(engine_config)} but its durable log implies {describe(durable)}",
            )

    def check_leader_config(self, node: NodeId, commit_index: int, log: LogView) -> None:
        c = max(commit_index, len(self.committed))
        pending = log.conf_indexes_above(c)
        if len(pending) > 1:
            raise Violation(CONFIG_SAFETY, f"leader {node} has uncommitted conf changes at {pending}")
        n = len(self.committed)
        # A stale leader (an older term, cut off) may hold divergent uncommitted entries past its
        # own commit index; only a leader that has itself committed index n must agree there.
        if commit_index >= n and n >= log.snapshot_index:
            theirs = log.config_at(n)
            if theirs != self.committed_config:
                raise Violation(
                    CONFIG_SAFETY,
                    f"leader {node} sees committed config {describe(theirs)} at {n}, "
                    f"the cluster committed {describe(self.committed_config)}",
                )
            latest = log.config_latest()
            if len(changed_nodes(theirs, latest)) > 1 or not majorities_overlap(theirs, latest):
                raise Violation(
                    CONFIG_SAFETY,
                    f"leader {node} uses {describe(latest)}, more than one change from the committed "
                    f"{describe(theirs)}",
                )

    # ----- linearizable reads
    def on_read_issued(self, context: bytes) -> None:
        self.reads[context] = len(self.committed)

    def on_read_state(self, node: NodeId, rs: ReadState) -> None:
        need = self.reads.get(rs.context)
        if need is None:
            raise Violation(LINEARIZABLE_READ, f"node {node} got a ReadState for unknown {rs.context!r}")
        if rs.index < need:
            raise Violation(
                LINEARIZABLE_READ,
                f"node {node} read {rs.context!r} at index {rs.index}, but index {need} was committed "
                "before the read was issued",
            )
        self.reads_checked += 1
