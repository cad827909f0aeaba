"""Scheduled backups (config ``backup: {dir, interval, keep}``).

Every ``interval`` the node writes an archive of its applied state (no ReadIndex round: each
node backs up its own replica, which also works while the cluster has no leader) into
``backup.dir`` and keeps the newest ``keep`` of its archives there.

- File name ``quorumd-<clusterId>-<UTC yyyymmddTHHMMSSZ>-n<nodeId>-<index>.backup``: sorting the
  names sorts by time; only names of this cluster and node are counted and pruned, so nodes may
  share a directory.
- Written atomically in a worker thread (temporary file in the same directory, fsync, rename,
  fsync of the directory; mode 0600). A failure (a full disk, a read-only mount) removes the
  temporary file, leaves every earlier archive in place, counts ``failed`` and is retried one
  interval later. Old archives are pruned only after a success.
- The first backup runs one interval after the newest archive already in the directory (at once
  when there is none, as soon as the replica holds the cluster secrets); the last-success metric
  starts from that file's time, so a restart does not hide a stale backup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from quorumd.api.errors import ApiError
from quorumd.api.ports_backup import BackupArchive
from quorumd.node.cluster import pki
from quorumd.node.config.schema import BackupConfig
from quorumd.node.daemon.backupmetrics import BackupMetrics

log = logging.getLogger(__name__)

ArchiveFn = Callable[[], Awaitable[BackupArchive]]


class BackupScheduler:
    """See the module docstring. ``archive`` produces one archive of the applied state."""

    def __init__(
        self, cfg: BackupConfig, node_id: int, cluster_id: str, archive: ArchiveFn, metrics: BackupMetrics
    ) -> None:
        assert cfg.dir is not None
        self.dir: Path = cfg.dir
        self.interval = cfg.interval_seconds
        self.keep = cfg.keep
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._archive = archive
        self.metrics = metrics
        self._name_re = re.compile(
            rf"quorumd-{re.escape(cluster_id)}-\d{{8}}T\d{{6}}Z-n{node_id}-\d+\.backup"
        )

    def archives(self) -> list[Path]:
        """This node's archives in the directory, oldest first."""
        try:
            names = [n for n in os.listdir(self.dir) if self._name_re.fullmatch(n)]
        except FileNotFoundError:
            return []
        return [self.dir / n for n in sorted(names)]

    def first_delay_seconds(self, now: float) -> float:
        existing = self.archives()
        if not existing:
            return 0.0
        newest = existing[-1].stat().st_mtime
        self.metrics.last_success = newest
        return max(0.0, newest + self.interval - now)

    async def run(self, ready: Callable[[], Awaitable[None]]) -> None:
        """The schedule; cancelled by the daemon at shutdown. ``ready`` returns once the replica
        holds the cluster secrets."""
        loop = asyncio.get_running_loop()
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            delay = await loop.run_in_executor(None, self.first_delay_seconds, time.time())
        except OSError as exc:  # counted by the first backup, which fails the same way or works
            log.error("backup_dir_unusable dir=%s reason=%s", self.dir, exc.strerror or type(exc).__name__)
            delay = 0.0
        self.metrics.enable(self.interval, self.metrics.last_success)
        log.info("backup_schedule dir=%s interval=%.0fs keep=%d first_in=%.0fs",
                 self.dir, self.interval, self.keep, delay)  # fmt: skip
        await ready()
        while True:
            await asyncio.sleep(delay)
            await self.run_once()
            delay = self.interval

    async def run_once(self) -> Path | None:
        """One scheduled backup; the path written, or None after a counted failure."""
        loop = asyncio.get_running_loop()
        try:
            archive = await self._archive()
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            path = self.dir / f"quorumd-{self.cluster_id}-{stamp}-n{self.node_id}-{archive.index}.backup"
            await loop.run_in_executor(None, self._write_and_prune, path, archive.body)
        except (OSError, ApiError) as exc:
            self.metrics.count("failed")
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.error("backup_failed dir=%s reason=%s", self.dir, reason)
            return None
        self.metrics.count("ok", now)
        log.info("backup_written path=%s index=%d bytes=%d", path, archive.index, len(archive.body))
        return path

    def _write_and_prune(self, path: Path, body: bytes) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki.write_private_file(path, body)  # temp file, fsync, rename, fsync dir; 0600
        others = [p for p in self.archives() if p != path]  # never the one just written (clock set back)
        for old in others[: max(0, len(others) - (self.keep - 1))]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("backup_prune_failed path=%s reason=%s", old, exc.strerror)
