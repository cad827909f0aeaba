"""Retrying the storage calls refused for lack of file descriptors or of disk space
(``StorageTransientError``, ``StorageFullError``).

A process that hits its fd limit (too many client connections, a leak elsewhere) gets EMFILE
from the storage's ``open`` of a new WAL segment or snapshot file. That is not a disk failure:
nothing was changed and the same call works once descriptors are free. ``StorageRetries.run``
retries it with a backoff doubling from ``MIN_SECONDS`` and capped at ``MAX_SECONDS``, never
giving up while the owner runs (the event loop keeps serving meanwhile, so connections close and
free descriptors), logs at WARNING on attempts 1, 2, 4, 8, ... (bounded volume) and counts every
retry (``count``, and the ``on_storage_retry(what)`` hook the daemon turns into a metric).

A full disk is the same kind of condition: the storage changed nothing and the write works once
an operator (or compaction) frees space. It is retried the same way, with a backoff doubling
from ``FULL_MIN_SECONDS`` to ``FULL_MAX_SECONDS``, and said at ERROR in one line, ``disk_full
path=<file> free=<bytes>``, at most once every ``FULL_LOG_SECONDS``; ``disk_space_recovered``
follows once a write fits again. While the driver waits here it steps nothing: a follower stops
acknowledging and voting, a leader stops heartbeating (the others elect a leader whose disk has
room) and answers no client, so nothing unwritten is ever acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from .storage import StorageFullError, StorageTransientError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MIN_SECONDS = 0.01
MAX_SECONDS = 1.0
FULL_MIN_SECONDS = 0.1
FULL_MAX_SECONDS = 5.0
FULL_LOG_SECONDS = 60.0


class RetryHooks(Protocol):
    on_storage_retry: Callable[[str], None] | None


class StorageRetries:
    def __init__(self, hooks: RetryHooks) -> None:
        self.count = 0
        self.hooks = hooks
        self.full_since: float | None = None  # monotonic time the disk was first found full
        self._full_logged_at: float | None = None  # kept across episodes: a flapping disk logs rarely
        self._full_reported = False  # this episode's disk_full was logged (so is its recovery)
        self._full_path = ""

    async def run(self, what: str, call: Callable[[int], Awaitable[_T]], stopped: Callable[[], bool]) -> _T:
        """``await call(attempt)`` until it does not raise ``StorageTransientError`` (re-raised
        once ``stopped()``)."""
        delay = MIN_SECONDS
        full_delay = FULL_MIN_SECONDS
        attempt = 0
        while True:
            try:
                result = await call(attempt)
            except StorageTransientError as exc:
                if stopped():
                    raise
                attempt += 1
                self.count += 1
                if self.hooks.on_storage_retry is not None:
                    self.hooks.on_storage_retry(what)
                if isinstance(exc, StorageFullError):
                    self._disk_full(what, exc)
                    await asyncio.sleep(full_delay)
                    full_delay = min(full_delay * 2, FULL_MAX_SECONDS)
                    continue
                if attempt & (attempt - 1) == 0:
                    log.warning(
                        "raft_storage_retry what=%s attempt=%d delay_seconds=%.2f error=%s",
                        what, attempt, delay, exc,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_SECONDS)
                continue
            if self.full_since is not None:
                self._recovered(what)
            return result

    def _disk_full(self, what: str, exc: StorageFullError) -> None:
        now = time.monotonic()
        if self.full_since is None:
            self.full_since = now
        self._full_path = str(exc.path)
        if self._full_logged_at is None or now - self._full_logged_at >= FULL_LOG_SECONDS:
            self._full_logged_at = now
            self._full_reported = True
            log.error(
                "disk_full path=%s free=%d what=%s waiting_seconds=%.0f (writes resume once space is free)",
                exc.path, exc.free, what, now - self.full_since,
            )  # fmt: skip
        else:
            log.debug("disk_full_retry path=%s free=%d what=%s", exc.path, exc.free, what)

    def _recovered(self, what: str) -> None:
        assert self.full_since is not None
        level = logging.WARNING if self._full_reported else logging.DEBUG
        log.log(
            level, "disk_space_recovered path=%s what=%s waited_seconds=%.1f",
            self._full_path, what, time.monotonic() - self.full_since,
        )  # fmt: skip
        self.full_since = None
        self._full_reported = False
