"""Autopilot foresight on the pure model: reasons, promotion predictions, clocks and
membership, what-if against a table of cluster shapes, the quorum guard, and a property: what-if's
answer for "remove X" is what autopilot reports once X is really gone.

Everything here is synchronous with explicit time (``now``); no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.api.ports import DrainState
from quorumd.node.registry.autopilot import (
    Autopilot,
    AutopilotSettings,
    AutopilotView,
    Scenario,
    ServerInput,
    TransferCandidate,
    quorum_of,
    removal_refusal,
    rfc3339_ms_ceil,
    transfer_target,
    what_if,
    without,
)

TERM = 3
LAST = 100
SETTINGS = AutopilotSettings(
    last_contact_threshold_seconds=2.0,
    max_trailing_logs=50,
    server_stabilization_seconds=5.0,
    cleanup_dead_servers=False,
)
CONTACT = 1.0  # the transfer contact threshold (an election timeout)
NOW = 1_700_000_000.0

ACTIVE, DRAINING, DRAINED = DrainState.ACTIVE, DrainState.DRAINING, DrainState.DRAINED


def srv(
    nid: int,
    *,
    voter: bool = True,
    leader: bool = False,
    contact: float = 0.1,
    match: int = LAST,
    term: int = TERM,
    left: bool = False,
    drain: DrainState = ACTIVE,
    inc: str = "",
) -> ServerInput:
    return ServerInput(
        node_id=nid,
        raft_address=f"10.0.0.{nid}:7000",
        voter=voter,
        is_leader=leader,
        last_contact_seconds=0.0 if leader else contact,
        match_index=match,
        last_term=term,
        left=left,
        drain_state=drain,
        incarnation=inc or f"fp{nid}",
    )


def view_of(
    servers: list[ServerInput],
    *,
    now: float = NOW,
    ap: Autopilot | None = None,
    s: AutopilotSettings = SETTINGS,
) -> AutopilotView:
    ap = ap or Autopilot(s)
    leader = next(x.node_id for x in servers if x.is_leader)
    return ap.evaluate(now=now, leader_id=leader, leader_term=TERM, leader_last_index=LAST, servers=servers)


def cluster(voters: int, **overrides: dict[str, Any]) -> list[ServerInput]:
    """``voters`` voters, node 1 the leader; ``overrides`` by "n<id>" change one server (or add one)."""
    kwargs: dict[int, dict[str, Any]] = {n: {"leader": n == 1} for n in range(1, voters + 1)}
    for key, kw in overrides.items():
        kwargs.setdefault(int(key[1:]), {}).update(kw)
    return [srv(n, **kwargs[n]) for n in sorted(kwargs)]


# --- reasons -------------------------------------------------------------------------------------

REASONS = [
    ("healthy voter", {}, [], None),
    ("failed voter", {"last_contact_seconds": 5.0}, ["no_contact"], None),
    ("left voter", {"left": True}, ["left"], None),
    ("left and silent", {"left": True, "last_contact_seconds": 9.0}, ["no_contact", "left"], None),
    ("term behind", {"last_term": TERM - 1}, ["term_behind"], None),
    ("log behind", {"match_index": 10}, ["log_behind"], None),
    ("draining voter", {"drain_state": DRAINING}, ["draining"], None),
    ("drained voter", {"drain_state": DRAINED}, ["drained"], None),
    ("healthy nonvoter", {"voter": False}, ["stabilizing"], NOW + 5.0),
    ("nonvoter never heard", {"voter": False, "match_index": 0}, ["log_behind", "not_caught_up"], None),
    ("nonvoter draining", {"voter": False, "drain_state": DRAINING}, ["draining"], None),
    ("nonvoter drained", {"voter": False, "drain_state": DRAINED}, ["drained"], None),
    (
        "lagging silent drained nonvoter",
        {"voter": False, "match_index": 3, "last_contact_seconds": 7.0, "drain_state": DRAINED},
        ["no_contact", "log_behind", "drained", "not_caught_up"],
        None,
    ),
    (
        "everything at once",
        {
            "left": True,
            "last_contact_seconds": 7.0,
            "last_term": 1,
            "match_index": 1,
            "drain_state": DRAINING,
        },
        ["no_contact", "left", "term_behind", "log_behind", "draining"],
        None,
    ),
]


@pytest.mark.parametrize(("name", "change", "reasons", "promotion"), REASONS, ids=[r[0] for r in REASONS])
def test_reasons_list_every_code_that_applies(
    name: str, change: dict[str, Any], reasons: list[str], promotion: float | None
) -> None:
    servers = cluster(3)
    servers[1] = replace(servers[1], **change)
    v = view_of(servers)
    h = v.server(2)
    assert h is not None
    d = h.as_dict()
    assert d["reasons"] == reasons
    assert d["trailingLogs"] == LAST - servers[1].match_index
    assert h.promotion_at == promotion
    assert d["promotionAt"] == (None if promotion is None else rfc3339_ms_ceil(promotion))
    assert v.server(1) is not None and v.server(1).as_dict()["reasons"] == []  # type: ignore[union-attr]


def test_promotion_at_is_shown_with_milliseconds_and_never_early() -> None:
    assert rfc3339_ms_ceil(NOW + 0.0004) == "2023-11-14T22:13:20.001Z"
    assert rfc3339_ms_ceil(NOW + 5.0) == "2023-11-14T22:13:25.000Z"


@pytest.mark.parametrize("reconcile", [0.2, 0.7, 2.0])
def test_predicted_promotion_is_kept_within_one_reconcile_interval(reconcile: float) -> None:
    """Autopilot decides at reconcile ticks (the node also wakes at the predicted time; here only
    the ticks): the promotion comes at the first tick at or after promotionAt, so no later than
    promotionAt + one interval, and never before it. The prediction does not move meanwhile."""
    ap = Autopilot(SETTINGS)
    t = NOW + 0.013
    servers = cluster(3, n4={"voter": False})
    predicted = view_of(servers, now=t, ap=ap).server(4).promotion_at  # type: ignore[union-attr]
    assert predicted == t + SETTINGS.server_stabilization_seconds
    promoted_at = None
    while promoted_at is None:
        t += reconcile
        v = view_of(servers, now=t, ap=ap)
        assert v.server(4).promotion_at == predicted  # type: ignore[union-attr]
        if ap.decide(v, t).promote == (4,):
            promoted_at = t
    assert predicted <= promoted_at <= predicted + reconcile


def test_health_flip_resets_the_clock_and_moves_the_prediction() -> None:
    ap = Autopilot(SETTINGS)
    healthy = cluster(3, n4={"voter": False})
    view_of(healthy, now=NOW, ap=ap)
    lagging = cluster(3, n4={"voter": False, "match": 1})
    v = view_of(lagging, now=NOW + 3, ap=ap)
    assert v.server(4).promotion_at is None and v.server(4).reasons  # type: ignore[union-attr]
    v = view_of(healthy, now=NOW + 4, ap=ap)
    assert v.server(4).promotion_at == NOW + 9  # type: ignore[union-attr]
    assert ap.decide(v, NOW + 8.9).promote == ()


def test_a_removed_servers_clock_is_forgotten_when_it_leaves_the_configuration() -> None:
    """A new node that joins with a removed node's id starts a fresh stabilization clock, even
    when removal and re-join both happen between two evaluations."""
    ap = Autopilot(SETTINGS)
    old = cluster(3, n4={"voter": False, "inc": "fp-old"})
    view_of(old, now=NOW, ap=ap)
    assert ap.decide(view_of(old, now=NOW + 60, ap=ap), NOW + 60).promote == (4,)
    ap.forget(4)  # the REMOVE of node 4 applied
    # Same id, and even the same incarnation text: the clock starts again.
    v = view_of(old, now=NOW + 61, ap=ap)
    assert v.server(4).stable_since == NOW + 61  # type: ignore[union-attr]
    assert ap.decide(v, NOW + 61).promote == ()


def test_a_new_incarnation_never_inherits_the_old_clock() -> None:
    ap = Autopilot(SETTINGS)
    view_of(cluster(3, n4={"voter": False, "inc": "fp-old"}), now=NOW, ap=ap)
    new = cluster(3, n4={"voter": False, "inc": "fp-new"})
    v = view_of(new, now=NOW + 60, ap=ap)
    assert v.server(4).stable_since == NOW + 60  # type: ignore[union-attr]
    assert ap.decide(v, NOW + 60).promote == ()
    assert ap.decide(view_of(new, now=NOW + 65, ap=ap), NOW + 65).promote == (4,)


def test_draining_and_drained_nonvoters_are_never_promoted() -> None:
    ap = Autopilot(SETTINGS)
    servers = cluster(3, n4={"voter": False, "drain": DRAINING}, n5={"voter": False, "drain": DRAINED})
    for t in (0.0, 10.0, 100.0):
        assert ap.decide(view_of(servers, now=NOW + t, ap=ap), NOW + t).promote == ()


# --- what-if ---------------------------------------------------------------------------------------

WHAT_IF = [
    # (name, cluster, scenario kwargs, voters, quorum, healthy, tolerance, leader, warnings)
    ("3 remove follower", cluster(3), {"remove": {3}}, [1, 2], 2, 2, 0, 1, ["failure_tolerance_zero"]),
    (
        "3 one failed: remove it",
        cluster(3, n3={"contact": 9.0}),
        {"remove": {3}},
        [1, 2],
        2,
        2,
        0,
        1,
        ["failure_tolerance_zero"],
    ),
    (
        "3 one failed: remove healthy",
        cluster(3, n3={"contact": 9.0}),
        {"remove": {2}},
        [1, 3],
        2,
        1,
        0,
        1,
        ["quorum_lost"],
    ),
    (
        "3 fail the leader",
        cluster(3, n3={"match": 90}),
        {"fail": {1}},
        [1, 2, 3],
        2,
        2,
        0,
        2,
        ["failure_tolerance_zero", "leader_moves"],
    ),
    ("3 drain the leader", cluster(3), {"drain": {1}}, [1, 2, 3], 2, 3, 1, 2, ["leader_moves"]),
    (
        "3 drain leader, 2 draining",
        cluster(3, n2={"drain": DRAINING}),
        {"drain": {1}},
        [1, 2, 3],
        2,
        3,
        1,
        3,
        ["leader_moves"],
    ),
    (
        "3 drain leader, no one can take over",
        cluster(3, n2={"drain": DRAINED}, n3={"contact": 9.0}),
        {"drain": {1}},
        [1, 2, 3],
        2,
        2,
        0,
        1,
        ["failure_tolerance_zero"],
    ),
    (
        "3 fail leader, no one can take over",
        cluster(3, n2={"drain": DRAINED}, n3={"contact": 9.0}),
        {"fail": {1}},
        [1, 2, 3],
        2,
        1,
        0,
        0,
        ["quorum_lost", "leader_moves"],
    ),
    (
        "3 remove all",
        cluster(3),
        {"remove": {1, 2, 3}},
        [],
        1,
        0,
        0,
        0,
        ["quorum_lost", "leader_moves", "last_voter"],
    ),
    ("5 fail two", cluster(5), {"fail": {4, 5}}, [1, 2, 3, 4, 5], 3, 3, 0, 1, ["failure_tolerance_zero"]),
    ("5 fail three", cluster(5), {"fail": {3, 4, 5}}, [1, 2, 3, 4, 5], 3, 2, 0, 1, ["quorum_lost"]),
    (
        "5 lagging one, remove a failed one",
        cluster(5, n4={"match": 1}, n5={"contact": 9.0}),
        {"remove": {5}},
        [1, 2, 3, 4],
        3,
        3,
        0,
        1,
        ["failure_tolerance_zero"],
    ),
    (
        "5 drained voter still counts",
        cluster(5, n2={"drain": DRAINED}),
        {"fail": {3}},
        [1, 2, 3, 4, 5],
        3,
        4,
        1,
        1,
        [],
    ),
    (
        "7 remove two failed",
        cluster(7, n6={"contact": 9.0}, n7={"contact": 9.0}),
        {"remove": {6, 7}},
        [1, 2, 3, 4, 5],
        3,
        5,
        2,
        1,
        [],
    ),
    (
        "7 fail three",
        cluster(7),
        {"fail": {5, 6, 7}},
        [1, 2, 3, 4, 5, 6, 7],
        4,
        4,
        0,
        1,
        ["failure_tolerance_zero"],
    ),
    (
        "3 promote caught-up nonvoter",
        cluster(3, n4={"voter": False}),
        {"promote": {4}},
        [1, 2, 3, 4],
        3,
        4,
        1,
        1,
        [],
    ),
    (
        "3 promote lagging nonvoter",
        cluster(3, n4={"voter": False, "match": 10}),
        {"promote": {4}},
        [1, 2, 3, 4],
        3,
        3,
        0,
        1,
        ["failure_tolerance_zero", "not_caught_up"],
    ),
    ("5 remove nonvoter", cluster(5, n6={"voter": False}), {"remove": {6}}, [1, 2, 3, 4, 5], 3, 5, 2, 1, []),
]


@pytest.mark.parametrize(
    ("name", "servers", "scenario", "voters", "quorum", "healthy", "tolerance", "leader", "warnings"),
    WHAT_IF,
    ids=[w[0] for w in WHAT_IF],
)
def test_what_if_table(
    name: str,
    servers: list[ServerInput],
    scenario: dict[str, set[int]],
    voters: list[int],
    quorum: int,
    healthy: int,
    tolerance: int,
    leader: int,
    warnings: list[str],
) -> None:
    sc = Scenario(**{k: frozenset(v) for k, v in scenario.items()})
    before = view_of(servers)
    answer = what_if(before, sc, transfer_contact_seconds=CONTACT).as_dict()
    assert answer == {
        "voters": voters,
        "quorum": quorum,
        "healthyVoters": healthy,
        "failureTolerance": tolerance,
        "leaderNodeId": leader,
        "safe": "quorum_lost" not in warnings and "last_voter" not in warnings,
        "warnings": warnings,
    }
    assert view_of(servers).as_dict() == before.as_dict()  # pure: nothing changed


def test_what_if_below_min_quorum() -> None:
    s = replace(SETTINGS, min_quorum=3)
    v = view_of(cluster(3), s=s)
    answer = what_if(v, Scenario(remove=frozenset({3})), transfer_contact_seconds=CONTACT)
    assert [str(w) for w in answer.warnings] == ["failure_tolerance_zero", "below_min_quorum"]
    assert answer.safe


def test_transfer_target_is_the_most_up_to_date_active_recent_voter() -> None:
    c = [
        TransferCandidate(1, True, ACTIVE, 0.0, 100),
        TransferCandidate(2, True, ACTIVE, 0.2, 90),
        TransferCandidate(3, True, DRAINING, 0.1, 100),
        TransferCandidate(4, True, ACTIVE, 5.0, 100),  # silent too long
        TransferCandidate(5, False, ACTIVE, 0.1, 100),  # nonvoter
        TransferCandidate(6, True, ACTIVE, 0.1, 95),
    ]
    assert transfer_target(c, exclude=[1], contact_threshold_seconds=CONTACT) == 6
    assert transfer_target(c, exclude=[1, 6], contact_threshold_seconds=CONTACT) == 2
    assert transfer_target(c[2:5], exclude=[], contact_threshold_seconds=CONTACT) == 0


# --- quorum guard ----------------------------------------------------------------------------------


def test_removal_guard_allows_the_failed_voter_and_refuses_a_healthy_one() -> None:
    v = view_of(cluster(3, n3={"contact": 9.0}))
    assert removal_refusal(v, 3, transfer_contact_seconds=CONTACT) is None
    refusal = removal_refusal(v, 2, transfer_contact_seconds=CONTACT)
    assert refusal is not None and (refusal.healthy_voters, refusal.quorum) == (1, 2)


def test_cleanup_removes_failed_servers_only_while_quorum_holds() -> None:
    s = replace(SETTINGS, cleanup_dead_servers=True)
    ap = Autopilot(s)
    # 3 voters, one failed: removed.
    d = ap.decide(view_of(cluster(3, n3={"contact": 9.0}), s=s, ap=ap), NOW, transfer_contact_seconds=CONTACT)
    assert (d.remove, d.refused) == ((3,), ())
    # 5 voters, two failed and one lagging: only two healthy, removing a failed voter leaves 4
    # voters with a quorum of 3: refused (the old rule, "a minority at once", removed both).
    servers = cluster(5, n3={"match": 1}, n4={"contact": 9.0}, n5={"contact": 9.0})
    d = ap.decide(view_of(servers, s=s, ap=ap), NOW, transfer_contact_seconds=CONTACT)
    assert d.remove == () and d.refused == (4, 5)
    # Failed nonvoters go regardless.
    servers = cluster(3, n4={"voter": False, "contact": 9.0})
    assert ap.decide(view_of(servers, s=s, ap=ap), NOW, transfer_contact_seconds=CONTACT).remove == (4,)


# --- the property: what-if "remove X" == autopilot after X is removed ------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> list[ServerInput]:
    n_voters = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7]))
    n_nonvoters = draw(st.integers(0, 3))
    out = []
    for i in range(1, n_voters + n_nonvoters + 1):
        voter = i <= n_voters
        out.append(
            srv(
                i,
                voter=voter,
                leader=i == 1,
                contact=draw(st.sampled_from([0.0, 0.5, 1.5, 3.0, 30.0])),
                match=draw(st.sampled_from([0, 10, 49, 50, 51, 99, 100])),
                term=draw(st.sampled_from([TERM, TERM, TERM - 1])),
                left=draw(st.booleans()) and draw(st.booleans()),
                drain=draw(st.sampled_from([ACTIVE, ACTIVE, DRAINING, DRAINED])),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(servers=clusters(), data=st.data())
def test_what_if_remove_matches_autopilot_after_the_removal(
    servers: list[ServerInput], data: st.DataObject
) -> None:
    followers = [s.node_id for s in servers if not s.is_leader]
    if not followers:
        return
    x = data.draw(st.sampled_from(followers), label="remove")
    extra_fail = data.draw(st.sets(st.sampled_from(followers)), label="fail")
    before = view_of(servers)
    answer = what_if(before, Scenario(remove=frozenset({x})), transfer_contact_seconds=CONTACT)
    after = view_of([s for s in servers if s.node_id != x])  # X really removed, the rest as measured
    assert list(answer.voters) == list(after.voters)
    assert answer.quorum == quorum_of(len(after.voters))
    assert answer.healthy_voters == after.healthy_voters
    assert answer.failure_tolerance == after.failure_tolerance
    assert answer.leader_node_id == after.leader_node_id
    assert ("quorum_lost" in answer.warnings) == (
        removal_refusal(before, x, transfer_contact_seconds=CONTACT) is not None
    )
    # Failing servers is removing their health, not their votes.
    failed = what_if(before, Scenario(fail=frozenset(extra_fail)), transfer_contact_seconds=CONTACT)
    assert list(failed.voters) == list(before.voters)
    assert failed.healthy_voters == sum(
        1 for h in before.servers if h.voter and h.healthy and h.node_id not in extra_fail
    )
    # Cleanup never removes a voter whose removal what-if calls quorum-losing.
    s = replace(SETTINGS, cleanup_dead_servers=True)
    ap = Autopilot(s)
    v = view_of(servers, s=s, ap=ap)
    state = v
    for nid in ap.decide(v, NOW, transfer_contact_seconds=CONTACT).remove:
        assert (
            removal_refusal(state, nid, transfer_contact_seconds=CONTACT) is None
            or not state.server(nid).voter
        )  # type: ignore[union-attr]
        state = without(state, nid)
