"""Tests of the WGL linearizability checker (tests/chaos/linearizability.py) on hand-made lease
histories, known good and known bad: stale reads, lost writes, double allocations, concurrent
overlapping operations that are fine, indeterminate operations, and removals."""

from __future__ import annotations

from dataclasses import dataclass

from tests.chaos.history import ALLOCATE, FAIL, INFO, OK, READ, RELEASE, REMOVE, History, LeaseObs
from tests.chaos.linearizability import (
    Operation,
    check_history,
    check_operations,
    partitions,
)

P = "p"


def lease(lid: int, holder: str, addr: str, node: int = 1) -> LeaseObs:
    return LeaseObs(lid, P, addr, holder, node)


class H:
    """A tiny history builder: times are given explicitly."""

    def __init__(self) -> None:
        self.h = History()

    def alloc(
        self, t0: float, t1: float, holder: str, result: LeaseObs | None, status: str = OK, owner: int = 1
    ) -> H:
        op = self.h.invoke(ALLOCATE, client=0, node=1, at=t0, pool=P, holder=holder, owner=owner)
        op.lease = result
        self.h.complete(op, status, t1)
        return self

    def release(self, t0: float, t1: float, holder: str, lid: int, status: str = OK) -> H:
        op = self.h.invoke(RELEASE, client=0, node=1, at=t0, pool=P, holder=holder, lease_id=lid)
        self.h.complete(op, status, t1, http_status=404 if status == FAIL else 0)
        return self

    def read(self, t0: float, t1: float, *leases: LeaseObs) -> H:
        op = self.h.invoke(READ, client=0, node=1, at=t0, pool=P)
        op.leases = list(leases)
        self.h.complete(op, OK, t1)
        return self

    def remove(self, t0: float, t1: float, node: int, status: str = OK) -> H:
        op = self.h.invoke(REMOVE, client=-1, node=1, at=t0, pool="", owner=node)
        self.h.complete(op, status, t1)
        return self

    def ok(self) -> bool:
        rep = check_history(self.h, budget_seconds=20)
        assert not rep.unknown
        return rep.ok


A1 = lease(1, "a", "10.0.0.1")
B2 = lease(2, "b", "10.0.0.2")


# --- the engine on a plain register ---------------------------------------------------------


@dataclass(frozen=True)
class RegOp:
    write: int | None
    read: int | None


class Register:
    def init(self) -> int:
        return 0

    def step(self, state: int, op: RegOp) -> list[int]:
        if op.write is not None:
            return [op.write]
        return [state] if op.read == state else []


def test_engine_register_good_and_bad() -> None:
    good = [
        Operation(0, 10, RegOp(1, None)),
        Operation(1, 2, RegOp(None, 0)),  # concurrent with the write: may miss it
        Operation(3, 4, RegOp(None, 1)),  # ...or see it
        Operation(5, 6, RegOp(None, 1)),
    ]
    assert check_operations(Register(), good).ok is True
    bad = [
        Operation(0, 1, RegOp(1, None)),
        Operation(2, 3, RegOp(None, 1)),
        Operation(4, 5, RegOp(None, 0)),  # the write completed before: stale
    ]
    assert check_operations(Register(), bad).ok is False
    # seeing the new value, then a later read seeing the old one: not linearizable
    flip = [
        Operation(0, 10, RegOp(1, None)),
        Operation(1, 2, RegOp(None, 1)),
        Operation(3, 4, RegOp(None, 0)),
    ]
    assert check_operations(Register(), flip).ok is False


def test_engine_indeterminate_write_may_land_late_or_never() -> None:
    ops = [
        Operation(0, float("inf"), RegOp(1, None)),  # timed out
        Operation(5, 6, RegOp(None, 0)),
        Operation(7, 8, RegOp(None, 1)),  # landed late: fine
    ]
    assert check_operations(Register(), ops).ok is True
    never = [Operation(0, float("inf"), RegOp(1, None)), Operation(5, 6, RegOp(None, 0))]
    assert check_operations(Register(), never).ok is True
    back = [*ops, Operation(9, 10, RegOp(None, 0))]  # landed, then vanished: not linearizable
    assert check_operations(Register(), back).ok is False


# --- lease histories: known good -----------------------------------------------------------


def test_sequential_allocate_read_release_is_fine() -> None:
    h = H().alloc(0, 1, "a", A1).read(2, 3, A1).release(4, 5, "a", 1).read(6, 7)
    assert h.ok()


def test_concurrent_overlapping_ops_are_fine() -> None:
    # a read overlapping the allocation may or may not see it; one overlapping the release too
    h = (
        H()
        .alloc(0, 4, "a", A1)
        .read(1, 2)
        .read(3, 5, A1)
        .alloc(3, 6, "b", B2)
        .release(7, 10, "a", 1)
        .read(8, 9, A1, B2)
        .read(8.5, 9.5, B2)
        .read(11, 12, B2)
    )
    assert h.ok()


def test_reallocation_of_a_released_address_is_fine() -> None:
    a1 = lease(1, "a", "10.0.0.1")
    b3 = lease(3, "b", "10.0.0.1")
    h = H().alloc(0, 1, "a", a1).release(2, 3, "a", 1).alloc(4, 5, "b", b3).read(6, 7, b3)
    assert h.ok()


def test_same_holder_again_reowns() -> None:
    a1n2 = lease(1, "a", "10.0.0.1", node=2)
    h = H().alloc(0, 1, "a", A1).alloc(2, 3, "a", a1n2, owner=2).read(4, 5, a1n2)
    assert h.ok()


def test_indeterminate_allocation_may_appear_later() -> None:
    h = H().alloc(0, 1, "a", None, status=INFO).read(2, 3).read(4, 5, A1).read(6, 7, A1)
    assert h.ok()


def test_indeterminate_release_may_take_effect() -> None:
    h = H().alloc(0, 1, "a", A1).release(2, 3, "a", 1, status=INFO).read(4, 5, A1).read(6, 7)
    assert h.ok()


def test_removal_purges_owned_leases() -> None:
    a1n3 = lease(1, "a", "10.0.0.1", node=3)
    h = H().alloc(0, 1, "a", a1n3, owner=3).remove(2, 3, 3).read(4, 5)
    assert h.ok()


def test_release_404_after_release_is_fine() -> None:
    h = H().alloc(0, 1, "a", A1).release(2, 3, "a", 1).release(4, 5, "a", 1, status=FAIL)
    assert h.ok()


# --- lease histories: known bad ------------------------------------------------------------


def test_stale_read_is_caught() -> None:
    h = H().alloc(0, 1, "a", A1).release(2, 3, "a", 1).read(4, 5, A1)
    assert not h.ok()


def test_lost_write_is_caught() -> None:
    h = H().alloc(0, 1, "a", A1).read(2, 3, A1).read(4, 5)
    assert not h.ok()


def test_write_not_visible_to_later_read_is_caught() -> None:
    h = H().alloc(0, 1, "a", A1).read(2, 3)
    assert not h.ok()


def test_double_allocation_is_caught() -> None:
    b1 = lease(2, "b", "10.0.0.1")  # same address, no release of lease 1
    h = H().alloc(0, 1, "a", A1).alloc(2, 3, "b", b1)
    assert not h.ok()
    parts = {p.key[0] for p in partitions(h.h)}
    assert parts == {"holder", "address"}


def test_two_leases_for_one_holder_is_caught() -> None:
    a2 = lease(2, "a", "10.0.0.2")
    h = H().alloc(0, 1, "a", A1).alloc(2, 3, "a", a2)
    assert not h.ok()


def test_release_404_of_live_lease_is_caught() -> None:
    h = H().alloc(0, 1, "a", A1).release(2, 3, "a", 1, status=FAIL).read(4, 5, A1)
    assert not h.ok()


def test_removal_of_other_node_does_not_excuse_loss() -> None:
    h = H().alloc(0, 1, "a", A1).remove(2, 3, 4).read(4, 5)
    assert not h.ok()


def test_lease_surviving_owner_removal_is_caught() -> None:
    a1n3 = lease(1, "a", "10.0.0.1", node=3)
    h = H().alloc(0, 1, "a", a1n3, owner=3).remove(2, 3, 3).read(4, 5, a1n3)
    assert not h.ok()


def test_lease_ids_going_backwards_is_caught() -> None:
    a5 = lease(5, "a", "10.0.0.1")
    a3 = lease(3, "a", "10.0.0.1")
    h = H().alloc(0, 1, "a", a5).release(2, 3, "a", 5).alloc(4, 5, "a", a3)
    assert not h.ok()


def test_many_concurrent_clients_stay_tractable() -> None:
    # 8 clients x 40 rounds of overlapping allocate/read/release on 4 holders: decided quickly
    h = H()
    t = 0.0
    live: dict[str, LeaseObs] = {}
    next_id = 1
    for rnd in range(40):
        holder = f"h{rnd % 4}"
        if holder in live:
            lz = live.pop(holder)
            h.release(t, t + 3, holder, lz.lease_id)
        else:
            lz = lease(next_id, holder, f"10.0.0.{next_id}")
            next_id += 1
            live[holder] = lz
            h.alloc(t, t + 3, holder, lz)
        for c in range(4):
            h.read(t + 3.5 + c * 0.1, t + 5 + c * 0.1, *sorted(live.values(), key=lambda x: x.lease_id))
        t += 6
    assert h.ok()


def test_lease_from_timed_out_allocate_seen_then_acknowledged_again() -> None:
    # regression (chaos seed 1): a 504'd allocate created lease 7; a read saw it; a later allocate of
    # the same holder acknowledged it (the API answers 201 for a re-own too)
    a7 = lease(7, "a", "10.0.0.1")
    h = H().alloc(0, 10, "a", None, status=INFO).read(5, 6, a7).alloc(11, 12, "a", a7).read(13, 14, a7)
    assert h.ok()
    # ...but a read may not show a lease no allocate of its holder could have created yet
    h2 = H().read(0, 1, a7).alloc(2, 3, "a", a7)
    assert not h2.ok()
