"""raft/aio/policy.py: where the driver writes a batch, and how far apart its snapshots are."""

from __future__ import annotations

from quorumd.raft.aio.policy import (
    INLINE_MAX_BYTES,
    INLINE_MAX_ENTRIES,
    SNAPSHOT_BYTES_PER_ENTRY,
    entries_per_snapshot,
    write_on_loop,
)
from quorumd.raft.core.types import Entry


def _entries(n: int, size: int = 10) -> list[Entry]:
    return [Entry(1, i + 1, data=b"x" * size) for i in range(n)]


def test_a_small_state_snapshots_every_threshold_entries_staggered_by_node() -> None:
    assert [entries_per_snapshot(8192, 3_400_000, nid) for nid in (4, 1, 2, 3)] == [8192, 8704, 9216, 9728]
    assert entries_per_snapshot(10, 0, 1) == 10


def test_a_large_state_snapshots_once_per_kib_of_the_last_snapshot() -> None:
    one_million_leases = 36_995_185  # bytes of the snapshot at a million leases
    base = one_million_leases // SNAPSHOT_BYTES_PER_ENTRY
    assert base == 36_128
    assert entries_per_snapshot(8192, one_million_leases, 4) == base
    assert entries_per_snapshot(8192, one_million_leases, 3) == base + 3 * (base // 16)
    assert entries_per_snapshot(50_000, one_million_leases, 4) == 50_000  # the threshold still wins


def test_small_batches_are_written_on_the_loop_while_the_disk_is_fast() -> None:
    assert write_on_loop(_entries(3), leader_has_more_in_flight=False, fsync_avg_seconds=0.0002)
    assert not write_on_loop(_entries(3), leader_has_more_in_flight=False, fsync_avg_seconds=0.002)
    assert not write_on_loop(_entries(3), leader_has_more_in_flight=True, fsync_avg_seconds=0.0002)


def test_large_batches_go_to_the_storage_thread() -> None:
    assert write_on_loop(_entries(INLINE_MAX_ENTRIES), leader_has_more_in_flight=False, fsync_avg_seconds=0)
    assert not write_on_loop(
        _entries(INLINE_MAX_ENTRIES + 1), leader_has_more_in_flight=False, fsync_avg_seconds=0
    )
    big = _entries(2, INLINE_MAX_BYTES // 2 + 1)
    assert not write_on_loop(big, leader_has_more_in_flight=False, fsync_avg_seconds=0)
