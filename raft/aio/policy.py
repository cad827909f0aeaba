"""The driver's two decisions taken from sizes and measurements: where a batch is written (on the
event loop or on the storage thread) and how many entries pass between two snapshots.

Pure functions of their arguments, so the reasoning and the figures behind each live here and the
driver (``driver.py``) only supplies its state.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.types import Entry

# A batch written on the loop thread at most this big (else the storage thread) ...
INLINE_MAX_ENTRIES = 1024
INLINE_MAX_BYTES = 1 << 20
# ... and only while this disk's fsyncs are fast (moving average): on a slow disk the loop would
# stall for every write, and the hand-off is then a small share of the wait.
INLINE_MAX_FSYNC_SECONDS = 0.001

# The log may grow by one entry per this many bytes of the last snapshot before the next one is
# taken, when that is more than the configured threshold (see entries_per_snapshot).
SNAPSHOT_BYTES_PER_ENTRY = 1024


def write_on_loop(
    entries: Sequence[Entry],
    *,
    leader_has_more_in_flight: bool,
    fsync_avg_seconds: float,
) -> bool:
    """Whether to write a batch of ``entries`` on the loop thread instead of the storage thread
    (the caller has excluded snapshots and any batch while a snapshot save holds the thread: the
    storage is not shared between threads).

    A follower or candidate cannot answer the leader before its write is durable; handing the
    write to the storage thread and back cost more than the fsync itself here (measured per
    write: handoffs p50 0.22 ms, p90 1.2 ms; fsync p50 0.2 ms), and every Raft round (append,
    vote, the new leader's first entry) pays it. Its API stalls meanwhile, so only while this
    disk's fsyncs average under a millisecond; on a slower disk the hand-off is a small share of
    the wait and the loop stays free. A leader writes inline only when this batch is all it has
    in flight (nothing else waits to commit, no proposal or message is queued:
    ``leader_has_more_in_flight`` is False): the usual case at one client, where the hand-off back
    from the thread was a round trip's worth of the write's latency (wrk, 1 client: p50 1.06 ->
    0.99 ms, A/B 3 runs each). With more in flight the thread lets it parse requests and read
    acks during its own fsync. Large batches stay on the thread."""
    if leader_has_more_in_flight or fsync_avg_seconds > INLINE_MAX_FSYNC_SECONDS:
        return False
    if len(entries) > INLINE_MAX_ENTRIES:
        return False
    return sum(len(e.data) for e in entries) <= INLINE_MAX_BYTES


def entries_per_snapshot(threshold: int, snapshot_bytes: int, node_id: int) -> int:
    """How many applied entries after a snapshot of ``snapshot_bytes`` start the next one.

    At least the configured ``threshold``, and at least one entry per ``SNAPSHOT_BYTES_PER_ENTRY``
    bytes of the last snapshot: taking a snapshot costs in proportion to the state (encoding it
    stops the loop, ~57 ms at a million leases, and its ~37 MB are written and synced on the disk
    the log's fsyncs wait for), so with a fixed count its cost per write grew with the state;
    this way it stays about the same per write at any size (a million leases: every ~36,000
    entries instead of 8,192). The log kept meanwhile stays bounded by the same rule (~200 bytes
    an entry in memory: a fifth of the snapshot's size at most), and so does what a restart
    replays after loading the snapshot.

    Members snapshot at different log positions (up to 3/16 of the count apart, by node id):
    taking a snapshot stops a node's loop for tens of milliseconds with a large state, and when
    every member stopped at the same index, commits stalled too."""
    base = max(threshold, snapshot_bytes // SNAPSHOT_BYTES_PER_ENTRY)
    return base + (node_id % 4) * (base // 16)
