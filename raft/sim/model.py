"""The simulator's value types: options, results, the per-seed fault profile, a simulated node."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..core.node import RaftCore
from ..core.types import NodeId
from .app import AppState
from .disk import SimDisk
from .network import TICK_UNITS, NetworkProfile

BUG_SWITCHES = ("double_vote", "nonvoter_counts", "commit_old_term")
DEFAULT_LIVENESS_TICKS = 600

# Counters every run reports (SimResult.stats), in report order.
STAT_NAMES = (
    "elections",
    "msgs_sent",
    "msgs_lost",
    "proposals",
    "proposals_refused",
    "reads",
    "reads_refused",
    "conf_changes",
    "crashes",
    "crashes_mid_ready",
    "unsynced_lost",
    "restarts",
    "partitions",
    "transfers",
    "compactions",
    "snapshots_installed",
    "campaigns",
    "suppressions",
)

EV_TICK = 0
EV_DELIVER = 1
EV_CLIENT = 2
EV_FAULT = 3
EV_MEMBER = 4
EV_RESTART = 5
EV_HEAL = 6
EV_SHUTDOWN = 7
EV_UNSUPPRESS = 8
EV_DEPOSE = 9

Event = tuple[int, object, int]


@dataclass(frozen=True, slots=True)
class SimOptions:
    seed: int
    steps: int = 5000
    nodes: int = 3  # target number of voters
    bugs: tuple[str, ...] = ()  # CoreConfig bug switches to turn on, without the "bug_" prefix
    liveness: bool = True
    liveness_ticks: int = DEFAULT_LIVENESS_TICKS
    trace_tail: int = 30

    def replay_command(self) -> str:
        cmd = f"python -m quorumd.raft.sim --seed {self.seed} --steps {self.steps} --nodes {self.nodes}"
        for b in self.bugs:
            cmd += f" --bug {b}"
        if not self.liveness:
            cmd += " --no-liveness"
        elif self.liveness_ticks != DEFAULT_LIVENESS_TICKS:
            cmd += f" --liveness-ticks {self.liveness_ticks}"
        return cmd


@dataclass(frozen=True, slots=True)
class SimResult:
    options: SimOptions
    ok: bool
    kind: str  # "" when ok, else the violation kind
    violation: str
    trace_tail: tuple[str, ...]
    trace_hash: str
    steps: int  # chaos steps executed (== options.steps unless a violation stopped the run)
    liveness_steps: int
    sim_ticks: int
    leader: NodeId
    term: int
    commit_index: int
    applied_entries: int  # length of the globally committed (applied) prefix
    stats: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def summary_line(self) -> str:
        o = self.options
        head = (
            f"seed={o.seed} nodes={o.nodes} steps={self.steps}+{self.liveness_steps} ticks={self.sim_ticks} "
            f"leader={self.leader} term={self.term} commit={self.commit_index} "
            f"applied={self.applied_entries} hash={self.trace_hash[:16]}"
        )
        return f"{head} ok" if self.ok else f"{head} FAILED {self.kind}"

    def stats_line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.stats)


@dataclass(frozen=True, slots=True)
class ChaosProfile:
    """Per-seed fault rates (swarm testing: each seed stresses a different mix)."""

    network: NetworkProfile
    client_gap_units: int
    fault_gap_units: int
    member_gap_units: int
    mid_ready_crash: float
    depose: float  # probability that a new leader is crashed or isolated within a few ticks
    depose_on_commit: float  # probability, per commit advance, that the leader is cut off at once
    weights: tuple[tuple[str, int], ...]
    core: tuple[tuple[str, int | bool], ...]


def draw_profile(rng: random.Random) -> ChaosProfile:
    net = NetworkProfile(
        drop=rng.choice((0.0, 0.01, 0.03, 0.08)),
        dup=rng.choice((0.0, 0.01, 0.05)),
        slow=rng.choice((0.0, 0.01, 0.05)),
        latency_units=rng.choice((10, 30, 60)),
        slow_units=rng.choice((3, 10, 30)) * TICK_UNITS,
    )
    weights: tuple[tuple[str, int], ...] = (
        ("crash", rng.choice((0, 2, 4))),
        ("partition", rng.choice((0, 2, 4))),
        ("oneway", rng.choice((0, 1, 3))),
        ("transfer", rng.choice((0, 1, 2))),
        ("compact", rng.choice((2, 4, 8))),
        ("campaign", rng.choice((0, 1))),
        ("suppress", rng.choice((0, 1))),
    )
    if sum(w for _, w in weights) == 0:
        weights = (("compact", 1),)
    core: tuple[tuple[str, int | bool], ...] = (
        ("election_ticks", 10),
        ("heartbeat_ticks", rng.choice((1, 2, 3))),
        ("max_entries_per_append", rng.choice((1, 3, 64))),
        ("max_inflight_appends", rng.choice((1, 2, 8))),
        ("snapshot_chunk_bytes", rng.choice((7, 16, 4096))),
        ("trailing_logs", rng.choice((0, 2, 10))),
        ("pre_vote", rng.random() < 0.8),
        ("check_quorum", rng.random() < 0.8),
        ("lazy_commit_broadcast", rng.random() < 0.5),
    )
    return ChaosProfile(
        network=net,
        client_gap_units=rng.choice((20, 50, 150)),
        fault_gap_units=rng.choice((3, 8, 20)) * TICK_UNITS,
        member_gap_units=rng.choice((20, 60)) * TICK_UNITS,
        mid_ready_crash=rng.choice((0.0, 0.5)),
        depose=rng.choice((0.0, 0.0, 0.3, 0.7)),
        depose_on_commit=rng.choice((0.0, 0.03, 0.1, 0.3)),
        weights=weights,
        core=core,
    )


class SimNode:
    __slots__ = (
        "alive",
        "app",
        "core",
        "disk",
        "doomed",
        "incarnation",
        "is_leader",
        "node_id",
        "retired",
        "suppressed",
    )

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self.core: RaftCore | None = None
        self.disk = SimDisk()
        self.app = AppState()
        self.incarnation = 0
        self.alive = False
        self.retired = False  # removed from the cluster and shut down for good
        self.is_leader = False
        self.suppressed = False
        self.doomed = False  # crash in the middle of the next Ready
