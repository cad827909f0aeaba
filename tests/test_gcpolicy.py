"""node/daemon/gcpolicy.py: the long-lived state is frozen, young cycles are still collected, and the
periodic full collection reclaims cycles that became garbage after they were frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from quorumd.node.daemon.gcpolicy import GcPolicy, HeapTrimmer


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()
    gc.collect()


def test_settled_freezes_the_long_lived_state() -> None:
    keep = [(i, str(i)) for i in range(1000)]
    policy = GcPolicy()
    policy.settled()
    assert gc.get_freeze_count() > len(keep) // 2
    assert policy.full_collections == 1 and policy.freezes == 1


def test_settled_raises_only_the_young_generations_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    GcPolicy().settled()
    assert gc.get_threshold() == (10_000, 10, 10)
    GcPolicy(young_threshold=2_000).settled()
    assert gc.get_threshold() == (2_000, 10, 10)


def test_a_young_cycle_is_collected_automatically_within_the_threshold() -> None:
    GcPolicy(young_threshold=1_000).settled()
    young = _cycle()
    keep = [[] for _ in range(3_000)]  # net container allocations past the threshold
    assert young() is None
    assert len(keep) == 3_000


def test_young_cycles_are_collected_at_snapshots_and_frozen_ones_at_the_full_pass() -> None:
    policy = GcPolicy(full_every=3)
    policy.settled()
    young = _cycle()  # garbage before the next snapshot: collected then
    policy.after_snapshot()
    assert young() is None
    holder = [_Node()]
    holder[0].other = holder[0]  # alive (and cyclic) when frozen
    frozen = weakref.ref(holder[0])
    policy.after_snapshot()  # frozen while alive
    holder.clear()  # now unreachable, but the collector skips frozen objects
    gc.collect()
    assert frozen() is not None
    policy.after_snapshot()  # the third call is the periodic full pass
    assert frozen() is None
    assert policy.full_collections == 2


def test_gc_paused_restores_the_previous_setting() -> None:
    from quorumd.node.daemon.gcpolicy import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause does not re-enable inside the outer one
    assert gc.isenabled()


def test_heap_trimmer_trims_at_most_every_interval() -> None:
    now = [100.0]
    trimmer = HeapTrimmer(every_seconds=30.0, clock=lambda: now[0])
    if not trimmer.available:
        pytest.skip("not glibc: malloc_trim is unavailable")
    assert not trimmer.maybe_trim()  # just started
    now[0] += 29.0
    assert not trimmer.maybe_trim()
    now[0] += 1.5
    assert trimmer.maybe_trim() and trimmer.trims == 1
    assert not trimmer.maybe_trim()
    now[0] += 30.0
    assert trimmer.maybe_trim() and trimmer.trims == 2 and trimmer.last_ms >= 0.0
