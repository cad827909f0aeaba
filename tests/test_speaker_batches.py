"""The node's speaker follows one apply batch in log order, without a Raft driver.

A batch (a follower catching up after a partition or a fence) may allocate a lease to this node
and release it, or re-own it to another node, before the node sees either: the speaker must end
up announcing exactly the node's active leases, and record the fencing token of the last entry
that changed them. Found by the chaos run's announcement checker (a node announced a lease it no
longer owned after a heal).
"""

from __future__ import annotations

from quorumd.api.ports import DrainState
from quorumd.node.cluster.operations import ClusterNode
from quorumd.node.cluster.service import ClusterService, Identity
from quorumd.node.effects.bgp import StubBgpSpeaker
from quorumd.node.effects.ran import WebhookRanNotifier
from quorumd.node.effects.token import FencingToken
from quorumd.node.registry.autopilot import AutopilotSettings
from quorumd.node.registry.commands import AllocateLease, CreatePool, ReleaseLease, encode_command
from quorumd.node.registry.state import StateMachine
from quorumd.raft.codec import encode_conf_change
from quorumd.raft.core.types import ConfChange, ConfChangeType, Entry, EntryType
from tests.test_state import ctx

ME = 1


def node() -> tuple[ClusterNode, StubBgpSpeaker]:
    bgp = StubBgpSpeaker()
    service = ClusterService(
        Identity(ME, "c", "0.1.0", "10.0.0.1:7000", "https://10.0.0.1:5002", "sha256:00", "pem"),
        StateMachine(),
        cluster_enabled=True,
        propose_timeout_seconds=1.0,
        tick_seconds=0.01,
        max_trailing_logs=10,
    )
    n = ClusterNode(
        service,
        autopilot=AutopilotSettings(),
        reconcile_interval_seconds=1.0,
        bgp=bgp,
        bgp_enabled=True,
        ran=WebhookRanNotifier(None),
        election_timeout_seconds=1.0,
    )
    return n, bgp


class Log:
    def __init__(self, n: ClusterNode) -> None:
        self.n = n
        self.index = 0

    def entry(self, cmd: object, term: int = 2) -> Entry:
        self.index += 1
        if isinstance(cmd, ConfChange):
            return Entry(term, self.index, EntryType.CONF_CHANGE, encode_conf_change(cmd))
        return Entry(term, self.index, EntryType.NORMAL, encode_command(cmd))  # type: ignore[arg-type]

    def apply(self, *cmds: object) -> None:
        self.n.service.apply_entries([self.entry(c) for c in cmds])


def started() -> tuple[ClusterNode, StubBgpSpeaker, Log]:
    n, bgp = node()
    log = Log(n)
    log.apply(
        ConfChange(ConfChangeType.PROMOTE, ME, ctx(ME)),
        ConfChange(ConfChangeType.ADD_NONVOTER, 2, ctx(2)),
        CreatePool(1.0, "p", "10.9.0.0/24"),
    )
    me = n.service.sm.member(ME)
    assert me is not None and me.drain_state == DrainState.ACTIVE
    bgp.start()
    log.apply(CreatePool(1.5, "q", "10.8.0.0/24"))  # the first apply while running: the full set
    return n, bgp, log


def test_allocate_then_release_in_one_batch_withdraws_it() -> None:
    n, bgp, log = started()
    log.apply(AllocateLease(2.0, "p", "a", ME), AllocateLease(3.0, "p", "b", ME), ReleaseLease(4.0, 1))
    assert bgp.announced == frozenset(n.service.sm.announced_prefixes(ME))
    assert len(bgp.announced) == 1
    assert bgp.fencing_token == FencingToken(2, log.index)


def test_allocate_then_reown_in_one_batch_withdraws() -> None:
    n, bgp, log = started()
    log.apply(AllocateLease(2.0, "p", "a", ME), AllocateLease(3.0, "p", "a", 2))
    assert bgp.announced == frozenset() == frozenset(n.service.sm.announced_prefixes(ME))


def test_release_then_allocate_the_same_address_again_announces_it() -> None:
    n, bgp, log = started()
    log.apply(AllocateLease(2.0, "p", "a", ME))
    (first,) = bgp.announced
    token = bgp.fencing_token
    log.apply(ReleaseLease(3.0, 1), AllocateLease(4.0, "p", "c", ME))  # the freed address again
    assert bgp.announced == frozenset(n.service.sm.announced_prefixes(ME)) == {first}
    assert bgp.fencing_token == token  # nothing changed on the wire


def test_another_nodes_new_leases_leave_the_speaker_alone() -> None:
    n, bgp, log = started()
    log.apply(AllocateLease(2.0, "p", "mine", ME))
    token = bgp.fencing_token
    log.apply(*(AllocateLease(3.0 + i, "p", f"other{i}", 2) for i in range(5)), ReleaseLease(9.0, 3))
    assert bgp.announced == frozenset(n.service.sm.announced_prefixes(ME))
    assert len(bgp.announced) == 1
    assert bgp.fencing_token == token


def test_a_lease_reowned_away_in_a_later_batch_is_withdrawn() -> None:
    n, bgp, log = started()
    log.apply(AllocateLease(2.0, "p", "a", ME), AllocateLease(2.5, "p", "b", 2))
    assert len(bgp.announced) == 1
    log.apply(AllocateLease(3.0, "p", "c", 2), AllocateLease(4.0, "p", "a", 2))  # "a" moves to node 2
    assert bgp.announced == frozenset() == frozenset(n.service.sm.announced_prefixes(ME))
    assert bgp.fencing_token == FencingToken(2, log.index)


def test_a_new_lease_given_and_taken_back_within_one_batch_is_not_announced() -> None:
    n, bgp, log = started()
    log.apply(
        AllocateLease(2.0, "p", "x", 2),  # another node's
        AllocateLease(3.0, "p", "x", ME),  # moved here
        AllocateLease(4.0, "p", "x", 2),  # and back
        AllocateLease(5.0, "p", "y", ME),
    )
    assert bgp.announced == frozenset(n.service.sm.announced_prefixes(ME))
    assert len(bgp.announced) == 1
