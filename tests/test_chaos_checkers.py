"""Unit tests of the chaos checkers on synthetic histories and final states: 1 (exclusive),
2 (durable), 4 (converged), 5 (fencing, announcements), 6 (moves), 7 (the route collector's RIB)
and the parsing of the collector's routes; each checker is shown to pass a good input and to fail
a bad one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.chaos.checkers import NodeView, check_converged, check_durable, check_exclusive
from tests.chaos.history import ALLOCATE, FAIL, INFO, OK, READ, RELEASE, REMOVE, History, LeaseObs

P = "p"


def lease(lid: int, holder: str, addr: str, node: int = 1) -> LeaseObs:
    return LeaseObs(lid, P, addr, holder, node)


def alloc(
    h: History, t0: float, t1: float, holder: str, result: LeaseObs | None, status: str = OK, owner: int = 1
) -> None:
    op = h.invoke(ALLOCATE, client=0, node=1, at=t0, pool=P, holder=holder, owner=owner)
    op.lease = result
    h.complete(op, status, t1)


def release(h: History, t0: float, t1: float, holder: str, lid: int, status: str = OK) -> None:
    op = h.invoke(RELEASE, client=0, node=1, at=t0, pool=P, holder=holder, lease_id=lid)
    h.complete(op, status, t1)


def read(h: History, t0: float, t1: float, *leases: LeaseObs) -> None:
    op = h.invoke(READ, client=0, node=1, at=t0, pool=P)
    op.leases = list(leases)
    h.complete(op, OK, t1)


def remove(h: History, t0: float, t1: float, node: int, status: str = OK) -> None:
    op = h.invoke(REMOVE, client=-1, node=1, at=t0, owner=node)
    h.complete(op, status, t1)


# --- 1: exclusive ------------------------------------------------------------------------------


def test_exclusive_passes_reuse_after_release() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    read(h, 2, 3, lease(1, "a", "10.0.0.1"))
    release(h, 4, 5, "a", 1)
    alloc(h, 6, 7, "b", lease(2, "b", "10.0.0.1"))
    read(h, 8, 9, lease(2, "b", "10.0.0.1"))
    assert check_exclusive(h) == []


def test_exclusive_passes_concurrent_handover() -> None:
    # lease 1 last seen in a read overlapping lease 2's allocation: no certain overlap
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    read(h, 2, 6, lease(1, "a", "10.0.0.1"))
    alloc(h, 3, 5, "b", lease(2, "b", "10.0.0.1"))
    assert check_exclusive(h) == []


def test_exclusive_fails_on_two_holders_of_one_address() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    alloc(h, 2, 3, "b", lease(2, "b", "10.0.0.1"))
    read(h, 4, 5, lease(1, "a", "10.0.0.1"))  # lease 1 still alive after lease 2 was acked
    v = check_exclusive(h)
    assert v and "10.0.0.1" in v[0].message


def test_exclusive_fails_on_read_with_duplicate_address() -> None:
    h = History()
    read(h, 0, 1, lease(1, "a", "10.0.0.1"), lease(2, "b", "10.0.0.1"))
    assert any("one read lists address" in str(x) for x in check_exclusive(h))


def test_exclusive_fails_on_one_holder_with_two_leases() -> None:
    h = History()
    read(h, 0, 1, lease(1, "a", "10.0.0.1"))
    read(h, 2, 3, lease(1, "a", "10.0.0.1"), lease(2, "a", "10.0.0.2"))
    assert any("holder a" in str(x) for x in check_exclusive(h))


def test_exclusive_fails_on_lease_id_with_two_addresses() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    read(h, 2, 3, lease(1, "a", "10.0.0.9"))
    assert check_exclusive(h)


# --- 2: durable --------------------------------------------------------------------------------


def test_durable_passes() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    alloc(h, 0, 1, "b", lease(2, "b", "10.0.0.2"))
    release(h, 2, 3, "b", 2, status=INFO)  # indeterminate release excuses absence
    alloc(h, 0, 1, "c", lease(3, "c", "10.0.0.3", node=4), owner=4)
    remove(h, 5, 6, 4)  # removal purges node 4's leases
    alloc(h, 0, 9, "d", None, status=INFO)  # indeterminate: may be present
    final = [lease(1, "a", "10.0.0.1"), lease(4, "d", "10.0.0.4")]
    assert check_durable(h, final) == []


def test_durable_fails_on_lost_acknowledged_lease() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    alloc(h, 0, 1, "b", lease(2, "b", "10.0.0.2"))
    release(h, 2, 3, "b", 2, status=FAIL)  # a definite failure does not excuse
    remove(h, 5, 6, 3)  # removal of another node does not excuse
    v = check_durable(h, [lease(1, "a", "10.0.0.1")])
    assert len(v) == 1 and "lease 2" in v[0].message


def test_durable_fails_on_phantom_and_changed_lease() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    alloc(h, 0, 1, "x", None, status=FAIL)
    v = check_durable(h, [lease(1, "a", "10.0.0.7"), lease(2, "x", "10.0.0.2")])
    assert len(v) == 2


def test_durable_reown_then_removal_excuses() -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1", node=1), owner=1)
    alloc(h, 2, 9, "a", None, status=INFO, owner=2)  # may have re-owned it to node 2
    remove(h, 10, 11, 2)
    assert check_durable(h, []) == []


def test_history_round_trips_through_json(tmp_path: Path) -> None:
    h = History()
    alloc(h, 0, 1, "a", lease(1, "a", "10.0.0.1"))
    read(h, 2, 3, lease(1, "a", "10.0.0.1"))
    h.save(tmp_path / "h.json", {"seed": 1})
    h2 = History.load(tmp_path / "h.json")
    assert [o.to_json() for o in h2.ops] == [o.to_json() for o in h.ops]


# --- 4: converged ------------------------------------------------------------------------------


def _status(nid: int, applied: int = 100, leader: int = 1) -> dict[str, Any]:
    return {
        "nodeId": nid,
        "appliedIndex": applied,
        "leaderNodeId": leader,
        "role": "leader" if nid == leader else "follower",
    }


def _autopilot(healthy: bool = True, tol: int = 2, voters: int = 5) -> dict[str, Any]:
    return {
        "healthy": healthy,
        "failureTolerance": tol,
        "voters": list(range(1, voters + 1)),
        "servers": [{"nodeId": i, "healthy": healthy} for i in range(1, voters + 1)],
    }


def _views(**over: Any) -> list[NodeView]:
    leases = [lease(1, "a", "10.0.0.1")]
    return [NodeView(i, _status(i, **over), list(leases)) for i in range(1, 6)]


def test_converged_passes() -> None:
    assert check_converged(_views(), _autopilot(), 5) == []


def test_converged_fails_on_applied_index_and_leases() -> None:
    views = _views()
    views[2].status = _status(3, applied=99)
    views[4].leases = []
    v = check_converged(views, _autopilot(), 5)
    assert any("appliedIndex" in x.message for x in v)
    assert any("lease lists differ" in x.message for x in v)


def test_converged_fails_on_autopilot_and_silent_node() -> None:
    views = _views()
    views[1].status = None
    v = check_converged(views, _autopilot(healthy=False, tol=1, voters=4), 5)
    msgs = " ".join(x.message for x in v)
    assert "did not answer" in msgs and "not healthy" in msgs and "failureTolerance" in msgs
    assert "voters" in msgs
    assert check_converged(_views(), None, 5)


def test_converged_fails_on_two_leaders() -> None:
    views = _views()
    views[3].status = {**_status(4, leader=4)}
    v = check_converged(views, _autopilot(), 5)
    assert any("leader" in x.message for x in v)


# --- 5. isolation fencing ---------------------------------------------------------------------------
def test_fenced_silent_flags_a_fenced_node_that_announces() -> None:
    from tests.chaos.checkers import SpeakerSample, check_fenced_silent

    ok = [SpeakerSample(1.0, 1, True, False, 0), SpeakerSample(1.0, 2, False, True, 3)]
    assert check_fenced_silent(ok) == []
    bad = check_fenced_silent([*ok, SpeakerSample(2.0, 1, True, True, 2)])
    assert len(bad) == 1 and "node 1 is fenced" in str(bad[0])
    # a real speaker: the read-back may show prefixes for a moment after the fence, never long
    spell = [
        SpeakerSample(0.5, 3, False, True, 2),
        SpeakerSample(1.0, 3, True, False, 2),  # fenced: stopped at once, withdrawal read back later
        SpeakerSample(1.3, 3, True, False, 2),
        SpeakerSample(1.6, 3, True, False, 0),
        SpeakerSample(3.0, 3, False, True, 2),  # rejoined
        SpeakerSample(4.0, 3, True, False, 2),  # a new spell starts its own grace
    ]
    assert check_fenced_silent(spell, withdraw_grace=0.5) == []
    assert len(check_fenced_silent(spell)) == 3  # the stub: at once
    late = check_fenced_silent([*spell, SpeakerSample(4.6, 3, True, False, 1)], withdraw_grace=0.5)
    assert len(late) == 1 and "t=4.600: node 3 is fenced but its speaker stopped with 1" in str(late[0])
    running = check_fenced_silent([SpeakerSample(1.0, 4, True, True, 0)], withdraw_grace=5.0)
    assert len(running) == 1 and "speaker runs" in str(running[0])


def test_fence_logs_flag_a_speaker_change_inside_a_fenced_interval() -> None:
    from tests.chaos.checkers import check_fence_logs

    good = (
        "t0 WARNING x node=1 node_isolated node=1 silent_seconds=3\n"
        "t1 INFO x node=1 bgp_speaker_stopped token=2/9\n"
        "t2 INFO x node=1 node_rejoined node=1 applied=10\n"
        "t3 INFO x node=1 bgp_speaker_started prefixes=1 token=3/10\n"
        "t4 INFO x node=1 bgp_announce prefix=10.0.0.1/32\n"
        "t5 WARNING x node=1 node_isolated node=1 silent_seconds=3\n"
        "\n===== start #1 generation 0 =====\n"
        "t6 INFO x node=1 bgp_speaker_started prefixes=1 token=3/12\n"  # a new process: not fenced
    )
    assert check_fence_logs({1: good}) == []
    bad = check_fence_logs(
        {2: "t0 WARNING x node=2 node_isolated node=2\nt1 INFO x node=2 bgp_announce prefix=10.0.0.2/32\n"}
    )
    assert len(bad) == 1 and "node 2 changed its speaker while fenced" in str(bad[0])
    # a real speaker: a change sent before the fence (a SIGSTOP in between) is confirmed after it
    real = (
        "2026-12-07T01:53:37.533Z WARNING x node=5 node_isolated node=5 stalled_seconds=4.2\n"
        "2026-12-07T01:53:37.533Z INFO x node=5 bgp_speaker_stopped speaker=gobgp\n"
        "2026-12-07T01:53:37.877Z INFO x node=5 bgp_announce prefix=198.18.0.10/32\n"
    )
    assert check_fence_logs({5: real}, in_flight_grace=2.0) == []
    assert len(check_fence_logs({5: real})) == 1  # the stub: never
    late = real + "2026-12-07T01:53:39.600Z INFO x node=5 bgp_announce prefix=198.18.0.11/32\n"
    (v,) = check_fence_logs({5: late}, in_flight_grace=2.0)
    assert "198.18.0.11/32" in str(v)
    started = real + "2026-12-07T01:53:37.900Z INFO x node=5 bgp_speaker_started prefixes=1\n"
    (v,) = check_fence_logs({5: started}, in_flight_grace=2.0)
    assert "bgp_speaker_started" in str(v)


def test_announcements_match_the_active_nodes_leases() -> None:
    from tests.chaos.checkers import SpeakerView, check_announcements

    leases = [
        lease(1, "a", "10.0.0.1", node=1),
        lease(2, "b", "10.0.0.2", node=2),
        lease(3, "c", "10.0.0.3", node=2),
    ]
    views = [
        SpeakerView(1, False, True, 1, ("10.0.0.1/32",), "active", 1),
        SpeakerView(2, False, False, 0, (), "drained", 2),  # drained: owns leases, announces none
    ]
    assert check_announcements(views, leases, "final") == []
    wrong = [
        SpeakerView(1, False, True, 1, ("10.0.0.2/32",), "active", 1),  # announces another's lease
        SpeakerView(2, False, True, 2, ("10.0.0.2/32",), "drained", 2),  # drained but running
        SpeakerView(3, True, False, 0, (), "active", 0),  # still fenced
        SpeakerView(4, False, True, 0, (), "active", 2),  # misses its leases
    ]
    found = [str(v) for v in check_announcements(wrong, leases, "after the heal")]
    assert len(found) == 4, found
    assert "does not own" in found[0] and "running=True while drained" in found[1]
    assert "still fenced" in found[2] and "announces 0 prefixes, owns 2" in found[3]


def test_no_unauthorized_membership_change_checker() -> None:
    from tests.chaos.checkers import check_no_unauthorized_membership_change

    same = [(1, "voter", "active", "a", "b"), (2, "voter", "active", "c", "d")]
    gone = [(1, "voter", "active", "a", "b")]
    drained = [(1, "voter", "active", "a", "b"), (2, "voter", "drained", "c", "d")]
    assert check_no_unauthorized_membership_change([("rogue 41", same, list(same))]) == []
    for after in (gone, drained, None):
        (v,) = check_no_unauthorized_membership_change([("rogue 41", same, after)])
        assert v.checker == "unauthorized_membership" and "rogue 41" in v.message


# --- 6. moves --------------------------------------------------------------------------------------
OLD, NEW = ("10.9.0.12:7000", "https://10.9.0.12:5002"), ("10.9.0.32:7000", "https://10.9.0.32:5002")


def _op_through(h: History, node: int, addr: str, at: float, status: str = OK) -> None:
    op = h.invoke(READ, client=0, node=node, at=at, pool=P, addr=addr)
    op.leases = []
    h.complete(op, status, at + 0.1)


def _move(**over: Any) -> Any:
    from tests.chaos.netcheckers import MoveRecord

    fields: dict[str, Any] = {
        "node": 2,
        "at": 10.0,
        "old_raft": OLD[0],
        "raft": NEW[0],
        "api": NEW[1],
        "listings": {1: NEW, 2: NEW, 3: NEW},
        "ready": True,
        "settled_seconds": 1.5,
    }
    return MoveRecord(**{**fields, **over})


def test_moves_pass_when_every_node_lists_the_new_address_and_the_node_serves() -> None:
    from tests.chaos.netcheckers import check_moves

    h = History()
    _op_through(h, 2, OLD[1], 5.0)
    _op_through(h, 2, NEW[1], 11.0)
    final = {n: {1: ("a", "b"), 2: NEW} for n in (1, 2, 3)}
    assert check_moves([_move()], h, final, {1: ("a", "b"), 2: NEW}) == []
    # back and forth: a second move to the old address, served there too
    _op_through(h, 2, OLD[1], 21.0)
    back = _move(at=20.0, old_raft=NEW[0], raft=OLD[0], api=OLD[1], listings={1: OLD, 2: OLD, 3: OLD})
    assert check_moves([_move(), back], h) == []


def test_moves_fail_on_a_stale_listing_a_node_not_ready_or_not_serving() -> None:
    from tests.chaos.netcheckers import check_moves

    h = History()
    _op_through(h, 2, OLD[1], 11.0)  # through the old address: does not count
    _op_through(h, 2, NEW[1], 9.0)  # before the move: does not count
    _op_through(h, 2, NEW[1], 12.0, status=INFO)  # not acknowledged: does not count
    _op_through(h, 3, NEW[1], 12.0)  # another node's client: does not count
    found = [str(v) for v in check_moves([_move()], h)]
    assert len(found) == 1 and "no operation through https://10.9.0.32:5002 succeeded" in found[0]
    _op_through(h, 2, NEW[1], 12.0)
    bad = _move(listings={1: NEW, 2: NEW, 3: OLD, 4: None}, ready=False)
    found = [str(v) for v in check_moves([bad], h)]
    assert len(found) == 3, found
    assert "node 3 lists it at ('10.9.0.12:7000'" in found[0] and "node 4 lists it at None" in found[1]
    assert "never reported ready" in found[2]
    (same,) = check_moves([_move(raft=OLD[0], api=NEW[1])], h)[:1]
    assert "did not change" in str(same)
    assert "no node's members list" in str(check_moves([_move(listings={})], h)[0])


def test_moves_final_listing_must_show_every_member_where_it_is() -> None:
    from tests.chaos.netcheckers import check_moves

    current = {1: ("a", "b"), 2: NEW}
    final = {1: {1: ("a", "b"), 2: NEW}, 2: {1: ("a", "b"), 2: OLD}, 3: None}
    found = [str(v) for v in check_moves([], History(), final, current)]
    assert len(found) == 2, found
    assert "node 2 lists node 2 at ('10.9.0.12:7000'" in found[0] and "node 3's members unread" in found[1]


# --- 7. the route collector ---------------------------------------------------------------------------
BIRD_ROUTES = """BIRD 2.0.12 ready.
Table master4:
198.18.0.3/32        unicast [n3 01:31:12.944] * (100) [AS65003?]
	via 10.213.78.13 on eth0
198.18.0.2/32        unicast [n12 01:31:14.978] * (100) [AS65012?]
	via 10.213.78.32 on eth0
198.18.0.1/32        unicast [n1 01:31:11.388] * (100) [AS65001?]
	via 10.213.78.11 on eth0
198.18.0.9/32        unicast [n1 01:31:11.388] * (100) [AS65001?]
	via 10.213.78.11 on eth0

Table master6:
"""


def test_collector_routes_parse_per_session_with_next_hops() -> None:
    from tests.chaos.collector import parse_routes

    rib = parse_routes(BIRD_ROUTES, [1, 2, 3, 12])
    assert rib == {
        1: {"198.18.0.1/32": "10.213.78.11", "198.18.0.9/32": "10.213.78.11"},
        2: {},
        3: {"198.18.0.3/32": "10.213.78.13"},
        12: {"198.18.0.2/32": "10.213.78.32"},
    }


def test_rib_diff_names_missing_extra_and_wrong_next_hop_routes() -> None:
    from tests.chaos.collector import rib_diff

    rib = {1: {"10.0.0.1/32": "10.9.0.11", "10.0.0.2/32": "10.9.0.11"}, 2: {"10.0.0.3/32": "10.9.0.12"}}
    assert rib_diff({1: dict(rib[1]), 2: {"10.0.0.3/32": ""}}, rib) == []  # "" = any next hop
    assert rib_diff({1: dict(rib[1])}, rib) == []  # only the checked nodes count
    diff = rib_diff({1: {"10.0.0.1/32": "10.9.0.31", "10.0.0.4/32": "10.9.0.11"}, 2: {}, 3: {}}, rib)
    assert len(diff) == 4, diff
    assert "node 1: 1 routes missing" in diff[0] and "10.0.0.4/32" in diff[0]
    assert "node 1: 1 routes not wanted" in diff[1] and "10.0.0.2/32" in diff[1]
    assert "10.0.0.1/32 via 10.9.0.11 not 10.9.0.31" in diff[2]
    assert "node 2: 1 routes not wanted" in diff[3]


class _FakeCollector:
    def __init__(self, ribs: list[dict[int, dict[str, str]]]) -> None:
        self.ribs = ribs

    def routes(self) -> dict[int, dict[str, str]]:
        return self.ribs.pop(0) if len(self.ribs) > 1 else self.ribs[0]


def test_route_watch_records_convergence_and_its_failure() -> None:
    from typing import cast

    from tests.chaos.collector import Collector, RouteWatch
    from tests.chaos.netcheckers import check_routes

    stale = {1: {"10.0.0.1/32": "10.9.0.11"}, 2: {}}
    fresh: dict[int, dict[str, str]] = {1: {}, 2: {}}
    watch = RouteWatch(cast(Collector, _FakeCollector([stale, stale, fresh])), lambda: 7.0, bound_seconds=5.0)
    ok = watch.withdrawn("node 1 drained", [1])
    assert ok.seconds is not None and ok.last_diff == ()
    never = RouteWatch(cast(Collector, _FakeCollector([stale])), lambda: 9.0, bound_seconds=0.3)
    bad = never.converge("after the heal", lambda: {1: {}, 2: {"10.0.0.5/32": "10.9.0.12"}})
    assert bad.seconds is None and len(bad.last_diff) == 2
    unread = never.converge("unreadable intended state", lambda: None)
    assert unread.seconds is None and "could not be read" in unread.last_diff[0]
    assert check_routes(watch.checks) == []
    found = [str(v) for v in check_routes(never.checks)]
    assert len(found) == 2 and found[0].startswith("[routes] t=9.0s after the heal:")
    assert "node 1: 1 routes not wanted" in found[0] and "node 2: 1 routes missing" in found[0]
    assert "2 checks, 2 never converged" in never.summary()
