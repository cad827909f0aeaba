"""Every checker can fail: hand-built bad histories, and the engine's bug switches under the simulator.

The bug-switch tests run the simulator with a CoreConfig bug switch over fixed seeds and require
the matching checker to fire (seeds and the replay command are printed).
"""

from __future__ import annotations

import random

import pytest

from quorumd.raft.codec import encode_conf_change
from quorumd.raft.core.ready import ReadState
from quorumd.raft.core.types import (
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from quorumd.raft.sim import SimOptions, Violation, run_simulation
from quorumd.raft.sim import checkers as ck
from quorumd.raft.sim.app import AppState
from quorumd.raft.sim.disk import SimDisk
from quorumd.raft.sim.membership import apply_conf_change, majorities_overlap
from quorumd.raft.sim.network import NetworkProfile, SimNetwork


def cc_entry(index: int, term: int, kind: ConfChangeType, node: int) -> Entry:
    return Entry(term, index, EntryType.CONF_CHANGE, encode_conf_change(ConfChange(kind, node)))


def disk_with(entries: list[Entry]) -> SimDisk:
    d = SimDisk()
    d.append(entries, synced=True)
    return d


BOOT = cc_entry(1, 1, ConfChangeType.PROMOTE, 1)


# ----------------------------------------------------------------- election safety
def test_two_leaders_in_one_term() -> None:
    c = ck.SafetyChecker()
    c.on_leader(1, 5)
    c.on_leader(1, 5)  # the same leader seen twice is fine
    c.on_leader(2, 6)
    with pytest.raises(Violation) as exc:
        c.on_leader(3, 5)
    assert exc.value.kind == ck.ELECTION_SAFETY


def test_vote_twice_and_term_going_back() -> None:
    c = ck.SafetyChecker()
    c.on_hard_state(1, HardState(3, 0, 0), HardState(3, 2, 0))
    with pytest.raises(Violation) as exc:
        c.on_hard_state(1, HardState(3, 2, 0), HardState(3, 4, 0))
    assert exc.value.kind == ck.ELECTION_SAFETY
    with pytest.raises(Violation) as exc:
        c.on_hard_state(1, HardState(3, 2, 0), HardState(2, 0, 0))
    assert exc.value.kind == ck.DURABILITY


# ----------------------------------------------------------------- log matching
def test_log_matching_same_index_term_different_data() -> None:
    c = ck.SafetyChecker()
    a = disk_with([BOOT, Entry(2, 2, data=b"x")])
    c.on_append(1, a.log, a)
    b = disk_with([BOOT, Entry(2, 2, data=b"y")])
    with pytest.raises(Violation) as exc:
        c.on_append(2, b.log, b)
    assert exc.value.kind == ck.LOG_MATCHING


def test_log_matching_different_prefix() -> None:
    c = ck.SafetyChecker()
    a = disk_with([BOOT, Entry(2, 2, data=b"x"), Entry(3, 3, data=b"z")])
    c.on_append(1, a.log, a)
    b = disk_with([BOOT, Entry(1, 2, data=b"x"), Entry(3, 3, data=b"z")])  # same (3, 3), other prefix
    with pytest.raises(Violation) as exc:
        c.on_append(2, b.log, b)
    assert exc.value.kind == ck.LOG_MATCHING


# ----------------------------------------------------------------- state machine safety
def test_divergent_applies() -> None:
    c = ck.SafetyChecker()
    assert c.on_apply(1, BOOT)
    assert c.on_apply(1, Entry(2, 2, data=b"a"))
    assert not c.on_apply(2, BOOT)
    with pytest.raises(Violation) as exc:
        c.on_apply(2, Entry(2, 2, data=b"b"))
    assert exc.value.kind == ck.STATE_MACHINE_SAFETY


def test_apply_beyond_committed_prefix() -> None:
    c = ck.SafetyChecker()
    c.on_apply(1, BOOT)
    with pytest.raises(Violation) as exc:
        c.on_apply(1, Entry(2, 3, data=b"a"))
    assert exc.value.kind == ck.STATE_MACHINE_SAFETY


def test_snapshot_must_match_committed_state() -> None:
    c = ck.SafetyChecker()
    good = AppState()
    for e in (BOOT, Entry(1, 2, data=b"a"), Entry(1, 3, data=b"b")):
        c.on_apply(1, e)
        good = good.apply(e)
    cfg = Configuration(frozenset({1}))
    assert c.on_snapshot(2, Snapshot(SnapshotMeta(3, 1, cfg), good.encode())) == good
    bad = AppState().apply(BOOT).apply(Entry(1, 2, data=b"a")).apply(Entry(1, 3, data=b"LOST"))
    with pytest.raises(Violation) as exc:
        c.on_snapshot(2, Snapshot(SnapshotMeta(3, 1, cfg), bad.encode()))
    assert exc.value.kind == ck.STATE_MACHINE_SAFETY
    with pytest.raises(Violation):
        c.on_snapshot(2, Snapshot(SnapshotMeta(2, 1, cfg), good.encode()))  # meta says 2, data is 3


# ----------------------------------------------------------------- leader completeness
def test_leader_missing_a_committed_entry() -> None:
    c = ck.SafetyChecker()
    for e in (BOOT, Entry(2, 2, data=b"a")):
        c.on_apply(1, e)
    c.check_leader_log(1, 3, disk_with([BOOT, Entry(2, 2, data=b"a"), Entry(3, 3)]))
    with pytest.raises(Violation) as exc:
        c.check_leader_log(2, 3, disk_with([BOOT, Entry(3, 2)]))  # Figure 8: overwritten
    assert exc.value.kind == ck.LEADER_COMPLETENESS
    with pytest.raises(Violation):
        c.check_leader_log(3, 4, disk_with([BOOT]))  # simply missing


# ----------------------------------------------------------------- configuration safety
def test_conf_step_moving_two_members() -> None:
    c = ck.SafetyChecker()
    one = Configuration(frozenset({1, 2, 3}))
    c.check_conf_step(1, 5, one, Configuration(frozenset({1, 2, 3, 4})))
    with pytest.raises(Violation) as exc:
        c.check_conf_step(1, 5, one, Configuration(frozenset({1, 4, 5})))
    assert exc.value.kind == ck.CONFIG_SAFETY


def test_engine_config_must_match_durable_log() -> None:
    c = ck.SafetyChecker()
    d = disk_with([BOOT, cc_entry(2, 1, ConfChangeType.ADD_NONVOTER, 2)])
    c.check_node_config(1, Configuration(frozenset({1}), frozenset({2})), d)
    with pytest.raises(Violation) as exc:
        c.check_node_config(1, Configuration(frozenset({1})), d)
    assert exc.value.kind == ck.CONFIG_SAFETY


def test_leader_with_two_uncommitted_changes() -> None:
    c = ck.SafetyChecker()
    c.on_apply(1, BOOT)
    d = disk_with(
        [BOOT, cc_entry(2, 1, ConfChangeType.ADD_NONVOTER, 2), cc_entry(3, 1, ConfChangeType.PROMOTE, 2)]
    )
    c.check_leader_config(1, 2, d)  # change at 2 committed, one pending: fine
    with pytest.raises(Violation) as exc:
        c.check_leader_config(1, 1, d)
    assert exc.value.kind == ck.CONFIG_SAFETY


def test_leader_disagreeing_with_committed_config() -> None:
    c = ck.SafetyChecker()
    c.on_apply(1, BOOT)
    c.on_apply(1, cc_entry(2, 1, ConfChangeType.ADD_NONVOTER, 2))
    with pytest.raises(Violation) as exc:
        c.check_leader_config(3, 2, disk_with([BOOT, cc_entry(2, 1, ConfChangeType.ADD_NONVOTER, 3)]))
    assert exc.value.kind == ck.CONFIG_SAFETY


def test_membership_arithmetic() -> None:
    three = Configuration(frozenset({1, 2, 3}))
    assert majorities_overlap(three, Configuration(frozenset({1, 2, 3, 4})))
    assert not majorities_overlap(three, Configuration(frozenset({3, 4, 5})))
    assert apply_conf_change(three, ConfChange(ConfChangeType.ADD_NONVOTER, 2)) == three  # no-op
    assert apply_conf_change(Configuration(frozenset({1})), ConfChange(ConfChangeType.REMOVE, 1)).voters == {
        1
    }


# ----------------------------------------------------------------- linearizable reads
def test_stale_read_index() -> None:
    c = ck.SafetyChecker()
    c.on_apply(1, BOOT)
    c.on_apply(1, Entry(1, 2, data=b"w"))
    c.on_read_issued(b"r1")
    c.on_read_state(2, ReadState(2, b"r1"))
    with pytest.raises(Violation) as exc:
        c.on_read_state(2, ReadState(1, b"r1"))
    assert exc.value.kind == ck.LINEARIZABLE_READ
    with pytest.raises(Violation):
        c.on_read_state(2, ReadState(5, b"never-issued"))


# ----------------------------------------------------------------- liveness
def test_liveness_bound_can_fail() -> None:
    r = run_simulation(SimOptions(seed=1, steps=2000, nodes=3, liveness_ticks=0))
    print(r.summary_line())
    assert not r.ok and r.kind == ck.LIVENESS


# ----------------------------------------------------------------- fault models
def test_disk_crash_loses_only_unsynced_suffix() -> None:
    d = disk_with([BOOT])
    d.set_hard_state(HardState(1, 0, 1), synced=True)
    d.append([Entry(2, 2, data=b"a")], synced=False)
    d.set_hard_state(HardState(2, 1, 1), synced=False)
    kept = set()
    for seed in range(40):
        e = SimDisk()
        e.append([BOOT], synced=True)
        e.set_hard_state(HardState(1, 0, 1), synced=True)
        e.append([Entry(2, 2, data=b"a")], synced=False)
        e.set_hard_state(HardState(2, 1, 1), synced=False)
        lost = e.crash(random.Random(seed))
        kept.add((e.last_index, e.hard_state.term, lost))
        assert not (e.last_index == 1 and e.hard_state.term == 2)  # never a hole: suffix only
    assert kept == {(1, 1, 2), (2, 1, 1), (2, 2, 0)}
    d.sync()
    assert d.crash(random.Random(0)) == 0 and d.last_index == 2


def test_disk_truncation_rolls_back_on_crash() -> None:
    d = disk_with([BOOT, Entry(1, 2, data=b"a"), cc_entry(3, 1, ConfChangeType.ADD_NONVOTER, 2)])
    before = d.config_latest()
    d.append([Entry(2, 2, data=b"b")], synced=False)
    assert d.last_index == 2 and d.config_latest() == Configuration(frozenset({1}))
    assert d.crash(random.Random(3)) in (0, 1)
    assert (d.last_index, d.config_latest()) in ((2, Configuration(frozenset({1}))), (3, before))


def test_network_partitions_are_reference_counted() -> None:
    net = SimNetwork(random.Random(1), NetworkProfile(drop=0.0, dup=0.0, slow=0.0))
    a = SimNetwork.split_links([1], [2, 3], one_way=False)
    b = SimNetwork.split_links([1], [2], one_way=True)
    net.block(a)
    net.block(b)
    assert net.delays(1, 2) == [] and net.delays(3, 1) == []
    net.unblock(a)
    assert net.is_blocked(1, 2) and not net.is_blocked(2, 1) and not net.is_blocked(1, 3)
    net.unblock(b)
    assert len(net.delays(1, 2)) == 1


# ----------------------------------------------------------------- engine bug switches
def _find(bug: str, seeds: range, kinds: set[str], steps: int = 5000) -> list[str]:
    found = []
    for seed in seeds:
        opts = SimOptions(seed=seed, steps=steps, nodes=3 + 2 * (seed % 2), bugs=(bug,), liveness=False)
        r = run_simulation(opts)
        print(r.summary_line(), r.violation.splitlines()[0] if r.violation else "")
        if r.kind in kinds:
            print(f"caught: {opts.replay_command()}")
            found.append(r.violation)
            if len(found) >= 2:
                break
    return found


def test_bug_double_vote_caught_by_election_safety() -> None:
    assert _find("double_vote", range(0, 40), {ck.ELECTION_SAFETY})


def test_bug_double_vote_two_leaders_in_a_term(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the vote-record check switched off, the leader-per-term check itself catches it."""
    monkeypatch.setattr(ck.SafetyChecker, "on_hard_state", lambda self, node, prev, hs: None)
    found = _find("double_vote", range(0, 60), {ck.ELECTION_SAFETY})
    assert any("two leaders in term" in v for v in found), found


SAFETY = {
    ck.STATE_MACHINE_SAFETY,
    ck.LEADER_COMPLETENESS,
    ck.LOG_MATCHING,
    ck.CONFIG_SAFETY,
    ck.LINEARIZABLE_READ,
}


def test_bug_nonvoter_counts_caught() -> None:
    assert _find("nonvoter_counts", range(0, 60), SAFETY)


# Figure 8 of the Raft paper needs a rare interleaving (about 1 seed in 600 at 5,000 steps): these
# seeds were found with `python -m quorumd.raft.sim --sweep 3000 --start 1200 --nodes 3 --bug commit_old_term
# --no-liveness` (even seeds: the test runs even seeds with 3 nodes; 2026-11-27, after new leaders
# began sending early appends, the sweep found 2007, 2176, 2264, 2500, 2888, 3095 and 3512)
# and depend on the engine's exact behaviour; when an engine change moves them, re-run that sweep.
FIGURE8_SEEDS = (2176, 2264)


def test_bug_commit_old_term_caught() -> None:
    found = []
    for seed in FIGURE8_SEEDS:
        found += _find("commit_old_term", range(seed, seed + 1), SAFETY)
    assert found
