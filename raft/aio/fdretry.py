"""Retrying the storage calls refused for lack of file descriptors (``StorageTransientError``).

A process that hits its fd limit (too many client connections, a leak elsewhere) gets EMFILE
from the storage's ``open`` of a new WAL segment or snapshot file. That is not a disk failure:
nothing was changed and the same call works once descriptors are free. ``StorageRetries.run``
retries it with a backoff doubling from ``MIN_SECONDS`` and capped at ``MAX_SECONDS``, never
giving up while the owner runs (the event loop keeps serving meanwhile, so connections close and
free descriptors), logs at WARNING on attempts 1, 2, 4, 8, ... (bounded volume) and counts every
retry (``count``, and the ``on_storage_retry(what)`` hook the daemon turns into a metric).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from .storage import StorageTransientError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MIN_SECONDS = 0.01
MAX_SECONDS = 1.0


class RetryHooks(Protocol):
    on_storage_retry: Callable[[str], None] | None


class StorageRetries:
    def __init__(self, hooks: RetryHooks) -> None:
        self.count = 0
        self.hooks = hooks

    async def run(self, what: str, call: Callable[[int], Awaitable[_T]], stopped: Callable[[], bool]) -> _T:
        """``await call(attempt)`` until it does not raise ``StorageTransientError`` (re-raised
        once ``stopped()``)."""
        delay = MIN_SECONDS
        attempt = 0
        while True:
            try:
                return await call(attempt)
            except StorageTransientError as exc:
                if stopped():
                    raise
                attempt += 1
                self.count += 1
                if self.hooks.on_storage_retry is not None:
                    self.hooks.on_storage_retry(what)
                if attempt & (attempt - 1) == 0:
                    log.warning(
                        "raft_storage_retry what=%s attempt=%d delay_seconds=%.2f error=%s",
                        what, attempt, delay, exc,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_SECONDS)
