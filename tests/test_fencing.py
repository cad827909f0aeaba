"""The isolation fence's decision on explicit time: fence after isolation-fence-after
without quorum contact, rejoin after contact and catch-up held for the hold time, and the paused
process that judges on what it knew before the pause."""

from __future__ import annotations

from quorumd.node.cluster.fencing import FenceChange, IsolationFence

ET = 1.0  # election timeout
AFTER = 3.0  # isolation-fence-after


def fence() -> IsolationFence:
    return IsolationFence.start(0.0, fence_after_seconds=AFTER, election_timeout_seconds=ET)


def run(
    f: IsolationFence, start: float, end: float, contact: bool, ready: bool = True, step: float = 0.1
) -> list[tuple[float, FenceChange]]:
    """Check every ``step`` from ``start`` to ``end``; in contact means heard just now."""
    out = []
    for k in range(round((end - start) / step) + 1):
        t = round(start + k * step, 6)  # exact decimal times: no drift from repeated addition
        change = f.check(t, t if contact else None, ready)
        if change is not None:
            out.append((t, change))
    return out


def test_fences_once_silent_for_fence_after_and_not_before() -> None:
    f = fence()
    assert run(f, 0.1, 5.0, contact=True) == []
    changes = run(f, 5.1, 12.0, contact=False)
    assert changes == [(8.0, FenceChange.FENCED)]  # last contact at 5.0, + 3 s
    assert f.fenced


def test_rejoins_only_after_contact_and_catch_up_held_for_the_hold_time() -> None:
    f = fence()
    run(f, 0.1, 4.0, contact=False)
    assert f.fenced
    assert run(f, 4.1, 6.0, contact=True, ready=False) == []  # heard, but not caught up
    changes = run(f, 6.1, 8.0, contact=True, ready=True)
    assert changes == [(7.1, FenceChange.REJOINED)]  # one election timeout of good checks
    assert not f.fenced


def test_a_process_paused_past_fence_after_fences_on_waking_despite_fresh_stamps() -> None:
    """Frames read right after SIGCONT may have waited in the socket buffer for the whole pause:
    the first check after a stall ignores them and judges on the contact known before."""
    f = fence()
    run(f, 0.1, 2.0, contact=True)
    assert f.stalled(12.0)
    assert f.check(12.0, 12.0, True) is FenceChange.FENCED
    assert f.stalled_for >= 9.9
    # Fresh contact afterwards rejoins after the hold.
    changes = run(f, 12.1, 14.0, contact=True)
    assert changes and changes[0][1] is FenceChange.REJOINED


def test_a_short_pause_does_not_fence() -> None:
    f = fence()
    run(f, 0.1, 2.0, contact=True)
    assert f.check(3.5, 3.5, True) is None  # 1.5 s pause: silent 1.5 s < 3 s
    assert run(f, 3.6, 10.0, contact=True) == []
