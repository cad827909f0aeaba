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
  tracebacks) are reclaimed, not kept forever;
- a young generation of ``YOUNG_THRESHOLD`` objects instead of CPython's 700. The collector
  counts container allocations minus deallocations; under write load the objects of the requests
  in flight (tasks, futures, aiohttp's request and response objects, commands) swing that count
  past 700 and back many times a second, and each swing past it started a collection that
  traversed every young object (the leader at 64 clients: ~2,700 young collections in 15 s,
  0.23 ms each, about 5% of its CPU, finding nothing). With 10,000 the swing stays under the
  threshold: 15 collections in the same run, 0.07 s in all. Cyclic garbage waits for at most
  10,000 net allocations (a few MB) before it is found, as before it waited for 700.

The C heap gets the same care: ``HeapTrimmer`` calls glibc's ``malloc_trim(0)`` at most every
``every_seconds`` (from the daemon's once-a-second metrics loop), which hands the free pages in
the middle of malloc's heaps back to the kernel. Without it a burst of short-lived TLS
connections (each handshake allocates and frees OpenSSL and Python buffers in the middle of the
heap) left the freed memory resident: see ``HeapTrimmer`` for the measurement.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, Iterator
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


YOUNG_THRESHOLD = 10_000  # net container allocations before a young collection (CPython: 700)


class GcPolicy:
    def __init__(self, *, full_every: int = 64, young_threshold: int = YOUNG_THRESHOLD) -> None:
        self.full_every = max(1, full_every)
        self.young_threshold = max(1, young_threshold)
        self._since_full = 0
        self.freezes = 0
        self.full_collections = 0

    def settled(self) -> None:
        """The long-lived state is loaded: collect everything once, freeze it, and set the young
        generation's threshold (the older generations keep CPython's)."""
        _young, older, oldest = gc.get_threshold()
        gc.set_threshold(self.young_threshold, older, oldest)
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


class HeapTrimmer:
    """Periodic ``malloc_trim(0)`` (glibc only; a no-op elsewhere). Measured with
    ``bench/tls_rss.py`` (one node, 28,000 short-lived TLS connections to the API): RSS 57 -> 109
    MB without trimming, 57 -> 75 MB with it after a quiet period (256 clients; 97 vs 73 MB with
    32); ``MALLOC_ARENA_MAX=2`` alone changed little (91 MB): the growth is freed memory left
    resident in the main heap, not per-thread arenas. A trim blocks the loop for well under a
    millisecond (0.05 ms on a fragmented 100 MB test heap; ``last_ms``)."""

    def __init__(self, *, every_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_seconds = every_seconds
        self.clock = clock
        self.trims = 0
        self.last_ms = 0.0
        self._last = clock()
        self._trim: Callable[[int], int] | None = None
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            self._trim = libc.malloc_trim if libc is not None else None
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            self._trim = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    async def run(self, check_seconds: float = 1.0) -> None:
        """Trim now and then, for as long as the daemon runs (``maybe_trim`` decides when)."""
        while True:
            self.maybe_trim()
            await asyncio.sleep(check_seconds)

    def maybe_trim(self) -> bool:
        """Trim when ``every_seconds`` have passed since the last trim; True when it trimmed."""
        now = self.clock()
        if self._trim is None or now - self._last < self.every_seconds:
            return False
        self._last = now
        t0 = time.perf_counter()
        self._trim(0)
        self.last_ms = (time.perf_counter() - t0) * 1000
        self.trims += 1
        log.debug("heap_trimmed ms=%.1f", self.last_ms)
        return True
