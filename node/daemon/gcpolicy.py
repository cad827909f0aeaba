"""Cyclic-GC policy of the daemon: freeze the long-lived state so collections stay short.

A node holds its whole replicated state in Python objects (a lease is a small tuple, and there may
be hundreds of thousands of them). CPython's cyclic collector scans every tracked object on a full
(generation 2) collection: with ~150k leases that is 20-60 ms with the event loop stopped, several
times a minute under write load, and it finds next to nothing (leases, log entries and most
request objects are acyclic and freed by reference counting).

``gc.freeze()`` moves every tracked object to a permanent generation the collector skips;
reference counting still frees frozen objects, so released leases are reclaimed as before. The
policy (as recommended by the ``gc.freeze`` documentation for long-lived servers):

- ``settled()`` once the state is loaded at startup: full collection, then freeze;
- ``after_snapshot()`` whenever the node took a snapshot (every few thousand entries): collect
  (a full collection, which only scans the objects allocated since the last freeze) and freeze
  what survived, so later collections only ever scan what was allocated since;
- every ``full_every`` such calls, ``unfreeze`` and one full collection, so objects frozen while
  alive that later became unreachable *cycles* (closed connections, finished tasks with
  tracebacks) are reclaimed, not kept forever.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic collection inside: taking or restoring a snapshot allocates one object per
    lease, and every few hundred allocations would otherwise start a collection that rescans the
    whole state (with 100k leases that tripled the time of a snapshot)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class GcPolicy:
    def __init__(self, *, full_every: int = 64) -> None:
        self.full_every = max(1, full_every)
        self._since_full = 0
        self.freezes = 0
        self.full_collections = 0

    def settled(self) -> None:
        """The long-lived state is loaded: collect everything once, then freeze it."""
        self._full("startup")

    def after_snapshot(self) -> None:
        self._since_full += 1
        if self._since_full >= self.full_every:
            self._full("periodic")
            return
        # A full collection here only scans what was allocated since the last freeze (everything
        # older is frozen), so it is cheap, and cyclic garbage is never frozen with the state.
        gc.collect()
        gc.freeze()
        self.freezes += 1

    def _full(self, why: str) -> None:
        t0 = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._since_full = 0
        self.freezes += 1
        self.full_collections += 1
        log.info(
            "gc_full_collection reason=%s unreachable=%d frozen=%d ms=%.1f",
            why,
            found,
            gc.get_freeze_count(),
            (time.perf_counter() - t0) * 1000,
        )
