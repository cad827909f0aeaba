"""What the engine hands out: the Ready batch, read states, status snapshots, configuration, errors.

The driver loop is: feed inputs (``tick``, ``step``, ``propose`` ...), then while
``core.has_ready()``: ``rd = core.ready()``; persist ``rd.snapshot``, ``rd.entries`` and
``rd.hard_state`` (fsync); then send ``rd.messages``; apply ``rd.committed_entries``; hand
``rd.read_states`` to waiting readers; finally ``core.advance(rd)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .types import (
    Configuration,
    Entry,
    HardState,
    Message,
    NodeId,
    ProgressState,
    Role,
    Snapshot,
    immutable,
)


class RaftError(Exception):
    """Root of the engine's errors."""


class NotLeaderError(RaftError):
    def __init__(self, leader_id: NodeId) -> None:
        super().__init__(f"not the leader (leader={leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalDroppedError(RaftError):
    """The leader cannot take proposals now (leadership transfer in progress, removed, ...)."""


class ConfChangeError(RaftError):
    """A membership change is invalid or another one is still uncommitted."""


class InvariantError(RaftError):
    """A broken internal invariant: the process must stop rather than serve wrong data."""


class Rng(Protocol):
    """The slice of ``random.Random`` the engine uses (injected, seeded by the caller)."""

    def randrange(self, start: int, stop: int = ..., step: int = ...) -> int: ...


@dataclass(frozen=True, slots=True)
class CoreConfig:
    node_id: NodeId
    election_ticks: int = 10  # randomized per election in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 1
    max_entries_per_append: int = 256
    max_bytes_per_append: int = 1 << 20
    max_inflight_appends: int = 64  # pipelined appends per peer in REPLICATE state
    snapshot_chunk_bytes: int = 256 * 1024
    trailing_logs: int = 10240  # entries kept behind a snapshot for slow followers
    pre_vote: bool = True
    check_quorum: bool = True
    # A commit-index advance is not sent to followers at once: it is marked pending and rides on
    # the next append or heartbeat, or goes out when the driver calls flush_commit_broadcast()
    # (the daemon does so a couple of milliseconds later). Halves the messages per write at low
    # concurrency, where the next client write usually carries it.
    lazy_commit_broadcast: bool = False
    # Test-only switches used to prove the simulator's checkers can fail. Never set in production.
    bug_double_vote: bool = False
    bug_nonvoter_counts: bool = False
    bug_commit_old_term: bool = False


@immutable
class ReadState:
    """ReadIndex result: the read identified by ``context`` may be served once applied >= index."""

    index: int
    context: bytes


@immutable
class SoftState:
    leader_id: NodeId
    role: Role


@immutable
class Ready:
    soft_state: SoftState | None = None  # set when leader or role changed since the last Ready
    hard_state: HardState | None = None  # set when it changed; persist before sending
    snapshot: Snapshot | None = None  # received from a leader: persist, then restore the app
    entries: tuple[Entry, ...] = ()  # append to the log; entries[0].index may truncate the tail
    messages: tuple[Message, ...] = ()  # send after the above is durable
    committed_entries: tuple[Entry, ...] = ()  # apply in order
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False  # True when hard_state/entries/snapshot need an fsync

    def is_empty(self) -> bool:
        return not (
            self.soft_state
            or self.hard_state
            or self.snapshot
            or self.entries
            or self.messages
            or self.committed_entries
            or self.read_states
        )


@dataclass(frozen=True, slots=True)
class PeerStatus:
    node_id: NodeId
    voter: bool
    match_index: int
    next_index: int
    state: ProgressState
    last_contact_ticks: int  # ticks since the leader last heard from the peer (leader only)
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    node_id: NodeId
    role: Role
    term: int
    vote: NodeId
    leader_id: NodeId
    commit_index: int
    applied_index: int
    last_index: int
    last_term: int
    first_index: int  # first index still in the in-memory log (snapshot index + 1)
    snapshot_index: int
    config: Configuration
    pending_conf_index: int  # index of the latest uncommitted conf change (0 if none)
    transfer_target: NodeId  # leadership transfer in progress (0 if none)
    peers: tuple[PeerStatus, ...] = field(default_factory=tuple)  # leader only, sorted by id
    campaign_suppressed: bool = False
