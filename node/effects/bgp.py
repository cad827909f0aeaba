"""The BGP speaker seen by the drain logic: the ``BgpSpeaker`` protocol and its stub.

The node owns one speaker. The desired set of prefixes is the ``/32`` or ``/128`` host route of
every active lease owned by this node; the node pushes it with ``set_prefixes`` after each apply.
While the speaker runs it announces exactly the desired set; ``stop`` (drain) withdraws every
prefix, ``start`` (resume) re-announces the desired set. A real speaker implements the same
protocol and replaces ``StubBgpSpeaker`` without touching the drain logic: ``bgp.speaker: gobgp``
is ``GoBgpSpeaker`` in ``node/effects/gobgp.py``, whose ``running`` is the state the node
asked for and whose ``announced`` and ``snapshot()`` are read back from the speaker process.

``StubBgpSpeaker`` holds the state a real speaker would have, logs each change at INFO (one line
per prefix for small changes, counts and a sample for large batches) and calls ``on_change`` with
``(running, announced_count)`` after every change so the metrics ``quorumd_bgp_speaker_running``
and ``quorumd_bgp_announced_prefixes`` follow it. Pure and synchronous: no asyncio, no I/O.
Output never depends on set iteration order: prefixes are sorted by address family, address and
length wherever they are listed.

Fencing tokens: every change takes the ``(term, index)`` of the log entry that caused it
(``token``); the speaker keeps the token of its last change (``fencing_token``, in ``/status`` as
``bgp.fencingToken``) and logs it with the change, so announcements can be ordered by a receiver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from quorumd.node.effects.token import FencingToken

log = logging.getLogger(__name__)

SAMPLE_PREFIXES = 5
LOG_EACH_LIMIT = 16  # above this many prefixes in one change, log counts and a sample instead


class BgpSpeaker(Protocol):
    """What the node needs from a BGP speaker."""

    @property
    def running(self) -> bool: ...

    @property
    def announced(self) -> frozenset[str]:
        """The prefixes currently announced to peers (empty while stopped)."""
        ...

    @property
    def fencing_token(self) -> FencingToken | None:
        """The token of the last change (None before the first)."""
        ...

    def start(self, *, token: FencingToken | None = None) -> None:
        """Start the speaker and announce the desired set. Idempotent."""
        ...

    def stop(self, *, token: FencingToken | None = None) -> None:
        """Withdraw every prefix and stop the speaker. Idempotent."""
        ...

    def set_prefixes(
        self, prefixes: Iterable[str], *, canonical: bool = False, token: FencingToken | None = None
    ) -> None:
        """Replace the desired set; announced at once while running, kept for ``start`` otherwise.
        ``canonical``: the caller vouches that every prefix is a canonical host route (no parsing)."""
        ...

    def update(
        self, add: Iterable[str], withdraw: Iterable[str], *, token: FencingToken | None = None
    ) -> None:
        """Change the desired set by a delta of canonical host routes (``Lease.prefix``): O(delta),
        so a node holding 100,000 leases pays nothing per allocation for the other 99,999."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """The speaker's part of ``/status``."""
        ...


def prefix_sort_key(prefix: str) -> tuple[int, int, int]:
    """Numeric order: IPv4 before IPv6, then address, then prefix length."""
    addr, _, length = prefix.partition("/")
    try:  # fast path for canonical text (10x cheaper than ipaddress: 100k prefixes sort in 0.1 s)
        v6 = ":" in addr
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr)
        bits = int(length) if length else (128 if v6 else 32)
        value = int.from_bytes(packed, "big")
        host_bits = (128 if v6 else 32) - bits
        if host_bits >= 0 and value & ((1 << host_bits) - 1) == 0:
            return (6 if v6 else 4, value, bits)
    except (OSError, ValueError):
        pass
    net = ipaddress.ip_network(prefix, strict=False)
    return (net.version, int(net.network_address), net.prefixlen)


def sorted_prefixes(prefixes: Iterable[str]) -> list[str]:
    return sorted(prefixes, key=prefix_sort_key)


def normalize_prefix(prefix: str) -> str:
    """Canonical text of a prefix; a bare address becomes its host route. Raises ``ValueError``."""
    return str(ipaddress.ip_network(prefix.strip(), strict=True))


class StubBgpSpeaker:
    """In-memory speaker: the state a real one would have, logged and reported, nothing on the wire."""

    __slots__ = ("_announced", "_desired", "_on_change", "_running", "_token", "rejected_prefixes")

    def __init__(self, on_change: Callable[[bool, int], None] | None = None) -> None:
        self._on_change = on_change
        self._running = False
        # Insertion-ordered sets (dict keys): O(1) add/remove, and a cheap stable sample for /status.
        self._desired: dict[str, None] = {}
        self._announced: dict[str, None] = {}
        self.rejected_prefixes = 0  # invalid prefixes passed to set_prefixes (skipped)
        self._token: FencingToken | None = None

    @property
    def fencing_token(self) -> FencingToken | None:
        return self._token

    def _stamp(self, token: FencingToken | None) -> None:
        if token is not None:
            self._token = token

    @property
    def running(self) -> bool:
        return self._running

    @property
    def announced(self) -> frozenset[str]:
        return frozenset(self._announced)

    @property
    def desired(self) -> frozenset[str]:
        return frozenset(self._desired)

    def start(self, *, token: FencingToken | None = None) -> None:
        if self._running:
            return
        self._running = True
        self._stamp(token)
        log.info("bgp_speaker_started prefixes=%d%s", len(self._desired), _fmt(self._token))
        self._apply(self._desired)
        self._changed()

    def stop(self, *, token: FencingToken | None = None) -> None:
        if not self._running:
            return
        self._stamp(token)
        # O(1) on the drain's critical path: swap the announced set out instead of diffing it
        # (a node with 190,000 leases spent 5-11 ms here before its leadership could move).
        withdrawn, self._announced = self._announced, {}
        self._running = False
        _log_change("bgp_withdraw", withdrawn)
        log.info("bgp_speaker_stopped%s", _fmt(self._token))
        self._changed()
        _release_later(withdrawn)

    def set_prefixes(
        self, prefixes: Iterable[str], *, canonical: bool = False, token: FencingToken | None = None
    ) -> None:
        if canonical:  # the node's own host routes (Lease.prefix): already canonical, in lease order
            self._desired = dict.fromkeys(prefixes)
            if self._running and self._apply(self._desired):
                self._stamp(token)
                self._changed()
            return
        desired: set[str] = set()
        bad = 0
        for p in prefixes:
            try:
                desired.add(normalize_prefix(p))
            except ValueError:
                bad += 1
        if bad:
            self.rejected_prefixes += bad
            log.warning("bgp_prefixes_rejected count=%d", bad)
        self._desired = dict.fromkeys(sorted_prefixes(desired))
        if self._running and self._apply(self._desired):
            self._stamp(token)
            self._changed()

    def update(
        self, add: Iterable[str], withdraw: Iterable[str], *, token: FencingToken | None = None
    ) -> None:
        changed = False
        for p in withdraw:
            self._desired.pop(p, None)
            if self._running and self._announced.pop(p, 0) is None:
                log.debug("bgp_withdraw prefix=%s", p)
                changed = True
        for p in add:
            self._desired[p] = None
            if self._running and p not in self._announced:
                self._announced[p] = None
                log.debug("bgp_announce prefix=%s", p)
                changed = True
        if changed:
            self._stamp(token)
            self._changed()

    def snapshot(self) -> dict[str, Any]:
        sample: list[str] = []
        for p in self._announced:  # the oldest announcements: O(sample), not O(prefixes)
            if len(sample) == SAMPLE_PREFIXES:
                break
            sample.append(p)
        return {
            "running": self._running,
            "announcedPrefixes": len(self._announced),
            "samplePrefixes": sorted_prefixes(sample),
            "fencingToken": None if self._token is None else self._token.as_dict(),
        }

    # --- internals -----------------------------------------------------------------------------
    def _apply(self, target: dict[str, None]) -> bool:
        """Move the announced set to ``target``, logging the difference; True when it changed.

        O(prefixes) dict lookups and nothing more per prefix: a drain withdraws every prefix of
        the node at once (100,000 with as many leases) while the drain call waits."""
        announced = self._announced
        withdrawn = [p for p in announced if p not in target] if target else list(announced)
        added = [p for p in target if p not in announced] if announced else list(target)
        if not withdrawn and not added:
            return False
        _log_change("bgp_withdraw", withdrawn)
        _log_change("bgp_announce", added)
        self._announced = dict(target)
        return True

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._running, len(self._announced))


def _fmt(token: FencingToken | None) -> str:
    return "" if token is None else f" token={token.term}/{token.index}"


def _release_later(prefixes: dict[str, None]) -> None:
    """Free a large withdrawn set a second later, off the critical path of the drain that
    withdrew it (deallocating 190,000 entries takes ~2 ms of the event loop)."""
    if len(prefixes) <= LOG_EACH_LIMIT:
        return
    try:
        asyncio.get_running_loop().call_later(1.0, prefixes.clear)
    except RuntimeError:  # no loop (tests, tools): free it now
        prefixes.clear()


def _log_change(event: str, prefixes: Collection[str]) -> None:
    """One line per prefix for small changes; for large ones the count and a sample: the first
    prefixes in the speaker's (lease) order, listed sorted. Picking the numerically smallest
    would parse every prefix, which is what made draining a node with many leases slow."""
    if not prefixes:
        return
    if len(prefixes) <= LOG_EACH_LIMIT:
        for p in sorted_prefixes(prefixes):
            log.info("%s prefix=%s", event, p)
    else:
        sample = sorted_prefixes(itertools.islice(prefixes, SAMPLE_PREFIXES))
        log.info("%s count=%d sample=%s", event, len(prefixes), ",".join(sample))
