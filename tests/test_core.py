"""Paper-level unit tests of RaftCore. Each test names the section of the Raft paper (Ongaro &
Ousterhout 2014, "§") or Ongaro's thesis (2014, "thesis") whose rule it checks."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import pytest

from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import (
    ConfChangeError,
    CoreConfig,
    NotLeaderError,
    ProposalDroppedError,
)
from quorumd.raft.core.types import (
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    HardState,
    Message,
    MessageType,
    ProgressState,
    Role,
    Snapshot,
    SnapshotMeta,
)
from tests.raftnet import Disk, Net, with_cfg


def three() -> Net:
    net = Net(1, 2, 3)
    net.elect(1)
    net.grow(2, 3)
    return net


# --- elections -------------------------------------------------------------------------------
def test_single_founder_elects_itself_after_timeout() -> None:
    """§5.2: a follower that hears no leader within the election timeout starts an election."""
    net = Net(1)
    core = net.nodes[1]
    assert core.role == Role.FOLLOWER
    net.tick(19)  # randomized timeout is in [10, 20) ticks
    assert core.role == Role.LEADER
    assert core.term == 2  # bootstrap term 1, first election term 2


def test_one_leader_per_term_and_all_agree() -> None:
    """§5.2 Election Safety: at most one leader can be elected in a given term."""
    net = three()
    net.tick(50)
    lead = net.leader()
    assert all(c.leader_id == lead.node_id and c.term == lead.term for c in net.nodes.values())


def test_vote_granted_once_per_term() -> None:
    """§5.2: each server votes for at most one candidate in a term (first-come-first-served)."""
    net = three()
    f = net.nodes[3]
    term = f.term + 5
    f.step(Message(MessageType.VOTE, to=3, frm=1, term=term, index=100, log_term=100, context=b"transfer"))
    f.step(Message(MessageType.VOTE, to=3, frm=2, term=term, index=100, log_term=100, context=b"transfer"))
    rd = f.ready()
    votes = [m for m in rd.messages if m.type == MessageType.VOTE_RESP]
    assert [(m.to, m.reject) for m in votes] == [(1, False), (2, True)]


def test_candidate_with_stale_log_cannot_win() -> None:
    """§5.4.1 election restriction: votes only for candidates at least as up to date."""
    net = three()
    net.isolate(3)
    for i in range(5):
        net.leader().propose(b"x%d" % i)
    net.pump()
    net.heal()
    stale = net.nodes[3]
    stale.step(
        Message(
            MessageType.VOTE,
            to=2,
            frm=3,
            term=stale.term + 1,
            index=stale.last_index,
            log_term=stale.log.last_term,
            context=b"transfer",
        )
    )  # misaddressed: ignored
    net.nodes[2].step(
        Message(
            MessageType.VOTE,
            to=2,
            frm=3,
            term=stale.term + 1,
            index=stale.last_index,
            log_term=stale.log.last_term,
            context=b"transfer",
        )
    )
    rd = net.nodes[2].ready()
    resp = [m for m in rd.messages if m.type == MessageType.VOTE_RESP]
    assert resp and resp[0].reject


def test_prevote_stops_a_rejoining_partitioned_node_from_disrupting() -> None:
    """thesis 9.6: PreVote keeps an isolated node from inflating its term and deposing the leader."""
    net = three()
    lead = net.leader()
    term = lead.term
    net.isolate(3)
    net.tick(100)  # node 3 times out repeatedly but never wins a pre-vote
    assert net.nodes[3].term == term
    net.heal()
    net.tick(5)
    assert net.leader() is lead and lead.term == term


def test_without_prevote_a_rejoining_node_disrupts() -> None:
    """thesis 9.6 (contrast): without PreVote the isolated node's term inflation deposes the leader."""
    net = Net(1, 2, 3, cfg=with_cfg(pre_vote=False, check_quorum=False))
    net.elect(1)
    net.grow(2, 3)
    term = net.leader().term
    net.isolate(3)
    net.tick(60, only=[3])
    assert net.nodes[3].term > term
    net.heal()
    net.nodes[3].campaign()
    net.pump()
    assert net.nodes[1].term > term


def test_check_quorum_partitioned_leader_steps_down() -> None:
    """thesis 6.2: a leader that hears from no quorum for an election timeout steps down."""
    net = three()
    lead = net.leader()
    net.isolate(lead.node_id)
    net.tick(9, only=[lead.node_id])
    assert lead.role == Role.LEADER  # contact seen in the current period still counts
    net.tick(12, only=[lead.node_id])  # at most two election timeouts after the cut
    assert lead.role == Role.FOLLOWER
    with pytest.raises(NotLeaderError):
        lead.propose(b"x")


# --- replication ---------------------------------------------------------------------------
def test_replication_commits_on_all_nodes_in_order() -> None:
    """§5.3: entries are replicated and applied in the same order everywhere."""
    net = three()
    for i in range(300):
        net.leader().propose(b"v%d" % i)
    net.pump()
    net.tick(2)
    expected = [b"v%d" % i for i in range(300)]
    for nid in (1, 2, 3):
        assert net.data_applied(nid) == expected


def test_divergent_follower_is_repaired_with_fast_backtracking() -> None:
    """§5.3 + thesis 3.5: conflicting uncommitted entries are overwritten; backtracking by term."""
    net = three()
    old = net.leader()
    net.isolate(old.node_id)
    for i in range(50):
        old.propose(b"lost%d" % i)  # never committed: no quorum
    net.pump()
    net.tick(30, only=[2, 3])
    new = next(c for c in net.nodes.values() if c.role == Role.LEADER and c is not old)
    for i in range(10):
        new.propose(b"kept%d" % i)
    net.pump()
    net.heal()
    net.tick(5)
    before = len(net.delivered)
    net.tick(3)
    assert old.role == Role.FOLLOWER
    assert net.data_applied(old.node_id)[-10:] == [b"kept%d" % i for i in range(10)]
    assert not any(d.startswith(b"lost") for d in net.data_applied(old.node_id))
    rejects = [m for m in net.delivered[:before] if m.type == MessageType.APPEND_RESP and m.reject]
    assert len(rejects) <= 3  # one probe per term, not one per entry


def _figure8(bug: bool) -> tuple[Net, RaftCore]:
    """Figure 8 (c): S1 leads term 4 holding (2, t2) which S2 has too; S5 holds (2, t3)."""
    net = Net(cfg=with_cfg(bug_commit_old_term=bug))
    voters = Configuration(voters=frozenset({1, 2, 3, 4, 5}))
    snap = Snapshot(SnapshotMeta(1, 1, voters), b"")
    logs = {1: [Entry(2, 2)], 2: [Entry(2, 2)], 3: [], 4: [], 5: [Entry(3, 2)]}
    for nid, entries in logs.items():
        net.disks[nid] = Disk(HardState(term=3, vote=0, commit=1), snap, entries)
        net.applied[nid] = []
        net.read_states[nid] = []
        net.restart(nid)
    net.isolate(5)
    # Hold back the new leader's no-op (index 3) so only the old-term entry spreads.
    net.filter = lambda m: replace(m, entries=tuple(e for e in m.entries if e.index < 3))
    net.elect(1)
    net.pump()
    return net, net.nodes[1]


def test_figure8_leader_does_not_commit_old_term_entries_by_counting() -> None:
    """§5.4.2 / Figure 8: an entry from an earlier term is not committed by counting replicas."""
    net, s1 = _figure8(bug=False)
    assert s1.term == 4
    assert net.nodes[3].log.term(2) == 2  # (2, t2) is now on S1, S2, S3: a majority
    assert s1.commit_index == 1  # ...but it is not committed
    net.filter = None
    net.tick(2)
    assert s1.commit_index == 3  # committed together with the current-term no-op


def test_figure8_bug_switch_commits_old_term_entry() -> None:
    """§5.4.2: the test-only switch really breaks the rule (the simulator checker test relies on it)."""
    _, s1 = _figure8(bug=True)
    assert s1.commit_index == 2


# --- membership ----------------------------------------------------------------------------
def test_nonvoter_never_counts_toward_quorum() -> None:
    """thesis 4.2.1: nonvoters receive the log but never count for commitment or elections."""
    net = Net(1, 2, 3)
    net.elect(1)
    net.grow(2)
    net.grow(3, voters=False)
    lead = net.leader()
    net.isolate(2)
    net.cut -= {(1, 3), (3, 1)}
    before = lead.commit_index
    lead.propose(b"needs-voter-2")
    net.pump()
    assert net.nodes[3].last_index == lead.last_index  # replicated to the nonvoter
    assert lead.commit_index == before  # but not committed
    net.heal()
    net.tick(2)
    assert lead.commit_index == lead.last_index


def test_nonvoter_never_campaigns() -> None:
    """thesis 4.2.1: a nonvoter never starts an election."""
    net = Net(1, 2)
    net.elect(1)
    net.grow(2, voters=False)
    net.isolate(1)
    net.tick(100, only=[2])
    assert net.nodes[2].role == Role.FOLLOWER and net.nodes[2].term == net.nodes[1].term


def test_one_membership_change_at_a_time() -> None:
    """thesis 4.1: a leader rejects a change while another is uncommitted."""
    net = three()
    net.add(4)
    net.add(5)
    lead = net.leader()
    net.isolate(2)
    net.isolate(3)
    lead.propose_conf_change(ConfChange(ConfChangeType.ADD_NONVOTER, 4))
    with pytest.raises(ConfChangeError):
        lead.propose_conf_change(ConfChange(ConfChangeType.ADD_NONVOTER, 5))


def test_cannot_remove_or_demote_last_voter() -> None:
    """thesis 4.1: a configuration always keeps at least one voter."""
    net = Net(1)
    net.elect(1)
    with pytest.raises(ConfChangeError):
        net.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE, 1))
    with pytest.raises(ConfChangeError):
        net.nodes[1].propose_conf_change(ConfChange(ConfChangeType.DEMOTE, 1))


def test_configuration_takes_effect_when_appended_and_rolls_back_on_truncation() -> None:
    """thesis 4.1: servers use the latest configuration in their log, committed or not, and a
    truncated configuration entry is rolled back."""
    net = three()
    net.add(4)
    old = net.leader()
    assert old.node_id == 1
    net.isolate(1)
    old.propose_conf_change(ConfChange(ConfChangeType.ADD_NONVOTER, 4))
    net.pump()
    assert 4 in old.config.nonvoters  # active as soon as appended, though uncommitted
    assert old.commit_index < old.pending_conf_index
    # Nodes 2 and 3 elect a new leader, which writes at that index.
    net.nodes[3].step(Message(MessageType.TIMEOUT_NOW, to=3, frm=1, term=net.nodes[3].term))
    net.pump()
    assert net.nodes[3].role == Role.LEADER
    net.nodes[3].propose(b"overwrite")
    net.pump()
    net.heal()
    net.tick(3)
    assert old.role == Role.FOLLOWER and 4 not in old.config.members()  # rolled back


def test_removed_leader_steps_down_after_commit() -> None:
    """thesis 4.2.2: a leader removed from the configuration steps down once the change commits."""
    net = three()
    lead = net.leader()
    lead.propose_conf_change(ConfChange(ConfChangeType.REMOVE, lead.node_id))
    net.pump()
    assert lead.role == Role.FOLLOWER
    net.tick(40, only=[n for n in net.nodes if n != lead.node_id])
    others = [c for c in net.nodes.values() if c.role == Role.LEADER]
    assert len(others) == 1 and others[0].node_id != lead.node_id
    assert lead.node_id not in others[0].config.members()


# --- leadership transfer -------------------------------------------------------------------
def test_transfer_to_up_to_date_voter() -> None:
    """thesis 3.10: TimeoutNow makes the target campaign at once and win."""
    net = three()
    net.leader().transfer_leadership(2)
    net.pump()
    assert net.leader().node_id == 2


def test_transfer_to_lagging_voter_catches_it_up_first() -> None:
    """thesis 3.10: the leader brings the target's log up to date before TimeoutNow."""
    net = three()
    lead = net.leader()
    net.isolate(3)
    for i in range(40):
        lead.propose(b"x%d" % i)
    net.pump()
    net.heal()
    lead.transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        lead.propose(b"during-transfer")
    net.pump()
    assert net.leader().node_id == 3
    assert net.data_applied(3)[-40:] == [b"x%d" % i for i in range(40)]


def test_transfer_aborts_after_election_timeout() -> None:
    """thesis 3.10: an unreachable target aborts the transfer after an election timeout."""
    net = three()
    lead = net.leader()
    net.cut |= {(lead.node_id, 3), (3, lead.node_id)}
    lead.transfer_leadership(3)
    assert lead.status().transfer_target == 3
    net.tick(11, only=[lead.node_id])
    assert lead.status().transfer_target == 0
    lead.propose(b"accepted-again")


# --- ReadIndex -----------------------------------------------------------------------------
def test_read_index_on_leader_and_follower() -> None:
    """thesis 6.4: ReadIndex returns the commit index after a heartbeat round confirms leadership."""
    net = three()
    lead = net.leader()
    lead.propose(b"w")
    net.pump()
    lead.read_index(b"a")
    net.nodes[2].read_index(b"b")
    net.pump()
    assert [(r.index, r.context) for r in net.read_states[lead.node_id]] == [(lead.commit_index, b"a")]
    assert [(r.index, r.context) for r in net.read_states[2]] == [(lead.commit_index, b"b")]


def test_read_index_needs_a_quorum() -> None:
    """thesis 6.4: a leader cut off from its quorum cannot serve a linearizable read."""
    net = three()
    lead = net.leader()
    net.isolate(lead.node_id)
    lead.read_index(b"a")
    net.pump()
    assert net.read_states[lead.node_id] == []


# --- snapshots -----------------------------------------------------------------------------
def test_snapshot_installs_on_new_member_in_chunks() -> None:
    """§7: a follower behind the compacted log gets the snapshot (sent in chunks)."""
    net = Net(1, 2, 3, cfg=with_cfg(trailing_logs=0, snapshot_chunk_bytes=1000))
    net.elect(1)
    net.grow(2, 3)
    lead = net.leader()
    for i in range(20):
        lead.propose(b"x%d" % i)
    net.pump()
    lead.compact(lead.applied_index, b"S" * 5500)
    net.add(4)
    net.grow(4)
    chunks = [m for m in net.delivered if m.type == MessageType.SNAPSHOT and m.to == 4]
    assert len(chunks) == 6 and chunks[-1].snapshot_done
    assert net.disks[4].snapshot is not None and net.disks[4].snapshot.data == b"S" * 5500
    assert net.nodes[4].commit_index == lead.commit_index
    assert 4 in lead.config.voters


def test_restart_recovers_log_term_vote_and_configuration() -> None:
    """§5 (persistent state): currentTerm, votedFor and log survive a restart."""
    net = three()
    for i in range(5):
        net.leader().propose(b"x%d" % i)
    net.pump()
    before = net.nodes[2]
    core = net.restart(2)
    assert (core.term, core.vote, core.last_index) == (before.term, before.vote, before.last_index)
    assert core.config == before.config
    net.tick(3)
    assert net.data_applied(2) == [b"x%d" % i for i in range(5)]


def test_bootstrap_entries() -> None:
    hs, entries = RaftCore.bootstrap_entries(7)
    assert hs.commit == 1 and entries == [entries[0]] and isinstance(entries[0], Entry)
    core = RaftCore(CoreConfig(node_id=7), __import__("random").Random(1), hard_state=hs, entries=entries)
    assert core.config.voters == frozenset({7})


def test_probe_state_after_rejection() -> None:
    """thesis 3.5: a rejected append moves the peer to probing."""
    net = three()
    lead = net.leader()
    st = {p.node_id: p.state for p in lead.status().peers}
    assert st[2] == ProgressState.REPLICATE


# --- failure-detection hint ------------------------------------------------------------------
def test_leader_connection_lost_hint_shortens_failover() -> None:
    """A closed leader connection lets followers campaign within two heartbeats instead of an
    election timeout; PreVote still decides (thesis 9.6)."""
    net = three()
    lead = net.leader()
    old, term = lead.node_id, lead.term
    survivors = [n for n in (1, 2, 3) if n != old]
    net.isolate(old)  # the leader process died: no more messages from it
    for nid in survivors:
        net.nodes[nid].report_leader_connection_lost(old)
        assert net.nodes[nid].leader_id == 0
    ticks = 0
    while not any(net.nodes[n].role == Role.LEADER for n in survivors) and ticks < 10:
        net.tick(1, only=survivors)
        ticks += 1
    assert ticks <= 2 * net.cfg(survivors[0]).heartbeat_ticks  # election_ticks is 10
    assert max(net.nodes[n].term for n in survivors) == term + 1


def test_leader_connection_lost_hint_alone_cannot_depose_a_live_leader() -> None:
    """Only one follower saw a (spurious) close: its PreVote fails while the other follower still
    hears the leader, so the term does not move."""
    net = three()
    lead = net.leader()
    term = lead.term
    follower = next(n for n in (1, 2, 3) if n != lead.node_id)
    net.nodes[follower].report_leader_connection_lost(lead.node_id)
    for _ in range(3):
        net.tick(1, only=[follower])
    assert net.leader() is lead and lead.term == term
    assert net.nodes[follower].term == term


def test_leader_connection_lost_hint_ignores_other_peers_and_non_followers() -> None:
    net = three()
    lead = net.leader()
    follower = next(n for n in (1, 2, 3) if n != lead.node_id)
    other = next(n for n in (1, 2, 3) if n not in (lead.node_id, follower))
    net.nodes[follower].report_leader_connection_lost(other)  # not its leader
    assert net.nodes[follower].leader_id == lead.node_id
    lead.report_leader_connection_lost(follower)  # a leader ignores the hint
    assert lead.role == Role.LEADER


# --- start-up and commit-broadcast optimisations -----------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_fast_forward_election_elects_a_cold_founder_within_one_base_timeout(seed: int) -> None:
    """etcd's initial-election-tick-advance: only the randomized part of the timeout is left."""
    net = Net(1, seed=seed)
    core = net.nodes[1]
    core.fast_forward_election()
    ticks = 0
    while core.role != Role.LEADER and ticks < 30:
        net.tick(1)
        ticks += 1
    assert 1 <= ticks <= 10  # randomized timeout in [10, 20) ticks, 9 of them skipped


def test_fast_forward_election_needs_prevote_and_no_known_leader() -> None:
    net = Net(1, cfg=with_cfg(pre_vote=False))
    net.nodes[1].fast_forward_election()
    assert net.nodes[1].election_elapsed == 0  # without PreVote an early campaign could disrupt
    live = three()
    follower = next(c for c in live.nodes.values() if c.role == Role.FOLLOWER)
    before = follower.election_elapsed
    follower.fast_forward_election()
    assert follower.election_elapsed == before  # it hears a leader: nothing to speed up


def test_lazy_commit_broadcast_rides_on_the_next_append_or_goes_out_when_flushed() -> None:
    net = Net(1, 2, 3, cfg=with_cfg(lazy_commit_broadcast=True))
    net.elect(1)
    net.grow(2, 3)
    net.tick(2)
    lead, f2, f3 = net.nodes[1], net.nodes[2], net.nodes[3]
    lead.propose(b"a")
    net.pump()
    a = lead.log.last_index
    assert lead.log.commit == a and lead.commit_broadcast_pending
    assert f2.log.commit < a and f3.log.commit < a  # committed, but nobody was told yet
    lead.propose(b"b")  # the next append carries the commit index
    net.pump()
    assert f2.log.commit >= a and f3.log.commit >= a
    b = lead.log.last_index
    assert lead.log.commit == b and f2.log.commit < b
    lead.flush_commit_broadcast()  # the driver's timer: sent on its own
    net.pump()
    assert not lead.commit_broadcast_pending
    assert f2.log.commit == b and f3.log.commit == b
    assert [e.data for e in net.applied[2][-2:]] == [b"a", b"b"]


def test_draining_follower_waits_three_timeouts_even_after_a_connection_lost_hint() -> None:
    """A draining node leaves the election to healthy peers: the connection-lost hint clears its
    leader but does not let it campaign before three election timeouts."""
    net = three()
    lead = net.leader()
    f = next(c for c in net.nodes.values() if c.role == Role.FOLLOWER)
    f.set_campaign_suppressed(True)
    net.isolate(lead.node_id)
    f.report_leader_connection_lost(lead.node_id)
    assert f.leader_id == 0
    for _ in range(2 * 10):  # past one (and the longest randomized) election timeout
        f.tick()
        assert f.role == Role.FOLLOWER
    for _ in range(3 * 20):
        f.tick()
    assert f.role != Role.FOLLOWER  # it does campaign when no one else leads for long


def test_connection_lost_hint_orders_the_survivors_so_they_do_not_split_the_vote() -> None:
    """Every survivor sees the leader's close at once: they campaign a heartbeat apart in node-id
    order, so the second has heard the first's vote request before its own turn comes."""
    net = Net(1, 2, 3, 4, 5, cfg=with_cfg(heartbeat_ticks=4))
    net.elect(1)
    net.grow(2, 3, 4, 5)
    net.tick(8)
    lead = net.leader()
    survivors = [n for n in net.nodes if n != lead.node_id]
    net.isolate(lead.node_id)
    for nid in survivors:
        net.nodes[nid].report_leader_connection_lost(lead.node_id)
    started: dict[int, int] = {}
    for t in range(1, 30):  # tick without delivering anything: when does each start on its own?
        for nid in survivors:
            net.nodes[nid].tick()
            if nid not in started and net.nodes[nid].role != Role.FOLLOWER:
                started[nid] = t
    order = sorted(survivors)
    assert [started[n] for n in order] == sorted(started[n] for n in order)
    gaps = [started[b] - started[a] for a, b in pairwise(order)]
    assert min(gaps) >= 3  # heartbeat 4 ticks, jitter under 2
    assert started[order[0]] <= 2


def test_connection_lost_hint_first_survivor_wins_in_one_round() -> None:
    net = Net(1, 2, 3, 4, 5, cfg=with_cfg(heartbeat_ticks=4))
    net.elect(1)
    net.grow(2, 3, 4, 5)
    net.tick(8)
    old = net.leader()
    term = old.term
    survivors = [n for n in net.nodes if n != old.node_id]
    net.isolate(old.node_id)
    for nid in survivors:
        net.nodes[nid].report_leader_connection_lost(old.node_id)
    net.tick(2, only=survivors)  # messages are delivered after every tick here
    leaders = [n for n in survivors if net.nodes[n].role == Role.LEADER]
    assert leaders == [min(survivors)]
    assert net.nodes[leaders[0]].term == term + 1  # one round: no split vote, no extra term


# --- a new leader's first probe --------------------------------------------------------------
def _new_leader_with_silent_peers() -> tuple[Net, RaftCore, int]:
    """Node 2 wins an election; its peers' append answers are held back (dropped)."""
    net = three()
    for i in range(3):
        net.leader().propose(b"before%d" % i)
    net.pump()
    new = net.nodes[2]
    net.filter = lambda m: None if m.type == MessageType.APPEND_RESP else m
    net.leader().transfer_leadership(2)
    net.pump()
    assert new.role == Role.LEADER
    return net, new, new.log.last_index - 1  # the probe point: the log end before the no-op


def test_new_leader_sends_a_write_before_its_first_probe_is_answered() -> None:
    """thesis 3.5 probing: a write proposed before a peer answers the new leader's first append
    goes out at once, resent from the probe point (a round trip sooner than behind the no-op's
    answer); once answers flow everyone applies it."""
    net, new, probe_point = _new_leader_with_silent_peers()
    new.propose(b"first write")
    rd = new.ready()
    appends = {m.to: m for m in rd.messages if m.type == MessageType.APPEND}
    assert set(appends) == {1, 3}
    for m in appends.values():
        assert m.index == probe_point
        assert [e.data for e in m.entries] == [b"", b"first write"]
    new.advance(rd)
    net.filter = None
    net.pump()
    net.tick(2)
    for nid in (1, 2, 3):
        assert net.data_applied(nid)[-1] == b"first write"


def test_new_leader_probes_plainly_after_a_tick_without_answers() -> None:
    """The early sends end at the first tick: a silent peer is not sent the log again with every
    write (it gets heartbeats, and appends resume when it answers)."""
    net, new, _ = _new_leader_with_silent_peers()
    new.tick()
    if new.has_ready():
        new.advance(new.ready())
    new.propose(b"later write")
    rd = new.ready()
    assert not [m for m in rd.messages if m.type == MessageType.APPEND and m.entries]
    new.advance(rd)
    net.filter = None
    net.tick(3)
    for nid in (1, 2, 3):
        assert net.data_applied(nid)[-1] == b"later write"


def test_new_leader_early_sends_still_repair_a_lagging_peer() -> None:
    """A peer that missed entries rejects the early sends; the leader backs off as usual."""
    net = three()
    net.isolate(3)
    for i in range(20):
        net.leader().propose(b"missed%d" % i)
    net.pump()
    net.heal()
    net.filter = lambda m: None if m.type == MessageType.APPEND and m.to == 3 else m
    net.leader().transfer_leadership(2)
    net.pump()
    new = net.nodes[2]
    assert new.role == Role.LEADER
    net.filter = None
    before = len(net.delivered)
    new.propose(b"after")
    net.pump()
    net.tick(3)
    rejects = [m for m in net.delivered[before:] if m.type == MessageType.APPEND_RESP and m.reject]
    assert rejects and all(m.frm == 3 for m in rejects)
    assert net.data_applied(3)[-21:] == [b"missed%d" % i for i in range(20)] + [b"after"]
