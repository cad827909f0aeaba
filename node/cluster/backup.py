"""Backups taken by the running node: ``GET /api/v1/backup`` and the scheduled archives.

Where the archive comes from (the follower path). A backup must hold the state at a
ReadIndex-confirmed commit index. Every node serves the request itself: it runs a ReadIndex
round (``ClusterService.linearizable_barrier``: on the leader the usual heartbeat quorum check,
on a follower a READ_INDEX request to the leader, which answers with its confirmed commit index
after the same quorum check) and waits until its own replica has applied that index. Replicas
that have applied the same index hold byte-identical states, so the archive is the one the
leader would have sent, at least as recent as the leader's commit index when the request
arrived: a linearizable read. The archive bytes never cross the cluster channel, whose frames
are limited to 32 MiB (a million leases make a ~60 MB archive), and nothing moves twice.
No leader known, or no confirmation in time: 503 as for any leader-bound read.

Keeping the event loop responsive. The work on the loop is bounded per step:
1. the lease table's snapshot encoding is a cache of 4096-lease chunks; chunks changed since the
   last snapshot (all of them after a restart) are re-encoded a few at a time with a yield
   between steps (``StateMachine.prepare_snapshot``);
2. ``StateMachine.snapshot_parts()`` then returns the cached chunk encodings themselves (no
   copy: a list of references, one per 4096 leases) -- this one synchronous call is what makes
   the archive a consistent cut (the cached chunks are immutable bytes);
3. the SHA-256 (one pass; hashlib releases the GIL) and the one copy of the state into the
   archive run in a worker thread. That copy (``bytes.join``) holds the GIL while it runs:
   ~1-4 ms per MB on a slow VM, so ~5-15 ms at 100,000 leases (4 MB) and ~100 ms at a million;
   an HTTP server that streams a body from pieces would remove it (the pieces could be sent
   as they are).
The reply is one complete body; the HTTP server writes it (see ``api/routes_backup.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING

from quorumd.api.extensions import BackupArchive
from quorumd.node.daemon.gcpolicy import gc_paused
from quorumd.node.registry.archive import ArchiveHeader, encode_archive
from quorumd.node.registry.records import SNAPSHOT_VERSION

if TYPE_CHECKING:
    from quorumd.node.cluster.service import ClusterService

log = logging.getLogger(__name__)

# Chunks of 4096 leases encoded per event-loop step (~4 ms each on a slow host).
WARM_CHUNKS_PER_STEP = 2
_LOCKS: weakref.WeakKeyDictionary[ClusterService, asyncio.Lock] = weakref.WeakKeyDictionary()


async def take_archive(node: ClusterService, *, linearizable: bool) -> BackupArchive:
    """An archive of ``node``'s replica: after a ReadIndex barrier when ``linearizable``
    (the API), else of the applied state as it is (scheduled backups)."""
    async with _lock(node):
        return await _take(node, linearizable)


def _lock(node: ClusterService) -> asyncio.Lock:
    """One archive at a time per node: each holds a copy of the state (concurrent requests
    queue instead of multiplying the memory)."""
    lock = _LOCKS.get(node)
    if lock is None:
        lock = _LOCKS[node] = asyncio.Lock()
    return lock


async def _take(node: ClusterService, linearizable: bool) -> BackupArchive:
    if linearizable:
        await node.linearizable_barrier()
    sm = node.sm
    # Bounded: under a write load new changes keep arriving; whatever is left after this many
    # steps (a chunk or two) is encoded by snapshot() itself.
    steps = sm.prepare_snapshot(0) // WARM_CHUNKS_PER_STEP + 8
    while sm.prepare_snapshot(WARM_CHUNKS_PER_STEP) > 0 and steps > 0:
        steps -= 1
        await asyncio.sleep(0)
    # No await from here until ``state`` is taken: index, term and state are one cut.
    t0 = time.perf_counter()
    with gc_paused():
        state = sm.snapshot_parts()
    index = sm.applied_index
    core = node.driver.core if node.driver is not None else None
    term = (core.log.term(index) or core.term) if core is not None else 0
    cluster_id = sm.cluster_id or node.identity.cluster_id
    loop_ms = (time.perf_counter() - t0) * 1000
    header = ArchiveHeader(
        cluster_id=cluster_id,
        index=index,
        term=term,
        created_at=time.time(),
        node_id=node.identity.node_id,
        version=node.identity.version,
        state_format=SNAPSHOT_VERSION,
    )
    body, sha256 = await asyncio.get_running_loop().run_in_executor(None, encode_archive, header, state)
    log.info(
        "backup_taken index=%d bytes=%d loop_ms=%.1f linearizable=%s",
        index, len(body), loop_ms, linearizable,
    )  # fmt: skip
    return BackupArchive(body=body, index=index, sha256=sha256, cluster_id=cluster_id)
