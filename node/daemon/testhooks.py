"""Test-only hooks of the daemon, switched on by environment variables and logged when on.

``QUORUMD_TEST_BUGS`` plants engine bugs for the chaos tests' self-check; ``QUORUMD_TEST_APPLY_TRACE``
records every applied entry and snapshot for the crash tests; ``QUORUMD_TEST_LOOP_PROBE`` records
event-loop lag for the backup benchmark; ``QUORUMD_TEST_WAL_PREALLOCATE_BYTES`` sets the WAL's
preallocation step (the live disk-full test uses a small one, so a few writes use it up). None is
ever set in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quorumd.node.cluster.service import ClusterService
from quorumd.node.daemon.datadir import FatalError
from quorumd.raft.aio.wal import PREALLOCATE_BYTES
from quorumd.raft.core.types import Entry, SnapshotMeta

log = logging.getLogger(__name__)


def planted_bugs() -> dict[str, bool]:
    """Planted engine bugs for the chaos tests' self-check (QUORUMD_TEST_BUGS=name,...).

    Never set in production: the daemon logs a warning for each one switched on."""
    allowed = {"bug_double_vote", "bug_nonvoter_counts", "bug_commit_old_term"}
    names = {n.strip() for n in os.environ.get("QUORUMD_TEST_BUGS", "").split(",") if n.strip()}
    for n in sorted(names):
        if n not in allowed:
            raise FatalError(f"QUORUMD_TEST_BUGS: unknown planted bug {n!r}")
        log.warning("planted_bug_enabled name=%s (test-only)", n)
    return {n: True for n in names}


def wal_preallocate_bytes() -> int:
    """The WAL's preallocation step: ``QUORUMD_TEST_WAL_PREALLOCATE_BYTES`` (test-only, logged)
    or the storage's own."""
    text = os.environ.get("QUORUMD_TEST_WAL_PREALLOCATE_BYTES", "").strip()
    if not text:
        return PREALLOCATE_BYTES
    if not text.isdigit():
        raise FatalError(f"QUORUMD_TEST_WAL_PREALLOCATE_BYTES: not a byte count: {text!r}")
    log.warning("wal_preallocate_bytes_set bytes=%s (test-only)", text)
    return int(text)


class ApplyTrace:
    """Test-only record of what this node applies (``QUORUMD_TEST_APPLY_TRACE=<directory>``).

    Wraps the node's service as the driver's ``Application`` and appends, before the state machine sees
    them, one line per applied entry (``E <index> <term> <sha256 of type+data>``), per snapshot
    restored (``R``), installed (``S``) or taken (``C``: ``<index> <sha256 of the snapshot>``) to
    ``<directory>/apply-node<id>.trace`` with one unbuffered ``write`` per batch, so a SIGKILL
    never loses an entry that was applied. Crash tests compare the files of every node and every
    incarnation: two different entries or states at one index are a safety violation. Never
    set in production (the daemon logs a warning when it is on).
    """

    def __init__(self, directory: Path, node_id: int, app: ClusterService) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"apply-node{node_id}.trace"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._app = app
        self.write(f"P {os.getpid()}\n")
        log.warning("apply_trace_enabled path=%s (test-only)", self.path)

    @classmethod
    def from_env(cls, node_id: int, app: ClusterService) -> ApplyTrace | None:
        directory = os.environ.get("QUORUMD_TEST_APPLY_TRACE", "")
        return cls(Path(directory), node_id, app) if directory else None

    def write(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:32]

    def restored(self, kind: str, index: int, data: bytes) -> None:
        self.write(f"{kind} {index} {self.digest(data)}\n")

    # raft.aio.driver.Application
    def apply_entries(self, entries: Sequence[Entry]) -> list[Any]:
        self.write(
            "".join(f"E {e.index} {e.term} {self.digest(bytes([e.type]) + e.data)}\n" for e in entries)
        )
        return self._app.apply_entries(entries)

    def snapshot(self) -> bytes:
        data = self._app.snapshot()
        self.restored("C", self._app.sm.applied_index, data)
        return data

    def restore(self, data: bytes, meta: SnapshotMeta) -> None:
        self.restored("S", meta.index, data)
        self._app.restore(data, meta)


class LoopLagProbe:
    """Test-only event-loop lag probe (``QUORUMD_TEST_LOOP_PROBE=<file>``, used by
    bench/backup.py): a task sleeps 2 ms at a time and appends ``<unix time> <lag ms> <cpu ms>``
    for every wake-up more than 2 ms late. ``lag`` is wall time: how long the loop was blocked
    when the timer was due, including waits for the GIL and time the process was not scheduled
    (noise on a busy host); ``cpu`` is the CPU time the loop's thread used meanwhile, i.e. the
    loop's own work, whatever the host's load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> LoopLagProbe | None:
        path = os.environ.get("QUORUMD_TEST_LOOP_PROBE")
        if not path:
            return None
        log.warning("loop_lag_probe_enabled path=%s (test-only)", path)
        return cls(Path(path))

    async def run(self) -> None:
        period = 0.002
        with open(self.path, "a", buffering=1) as f:
            while True:
                t0, c0 = time.perf_counter(), time.thread_time()
                await asyncio.sleep(period)
                lag = time.perf_counter() - t0 - period
                if lag > period:
                    cpu = time.thread_time() - c0
                    f.write(f"{time.time():.4f} {lag * 1000:.2f} {cpu * 1000:.2f}\n")
