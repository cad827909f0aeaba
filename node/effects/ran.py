"""The RAN notifier seen by the drain logic: the ``RanNotifier`` protocol and its webhook stub.

Draining node X signals the RANs connected to X's AMF that X's GUAMI is unavailable. The drain
logic calls ``notify_guami_unavailable``; a real AMF integration implements the same protocol.

``WebhookRanNotifier`` records every event locally (a bounded list, newest last), logs it, calls
``on_event`` (the ``quorumd_ran_notifications_total`` counter), and, when a ``notify_url`` is
configured, POSTs ``{"event": "guami_unavailable", "nodeId", "reason", "ts" (RFC 3339 UTC),
"eventId", "fencingToken": {"term", "index"}}`` to it. ``eventId`` is unique per event so a
receiver can drop the duplicate that a retry after a lost response produces; ``fencingToken``
 is the ``(term, index)`` of the log entry that caused the event (the drain), so it
increases across the events a node sends and a receiver can drop stale or reordered ones.

Design choice: ``notify_guami_unavailable`` never waits for the network. Drain side effects must
finish quickly and a slow or dead webhook must not hold a drain; so the event is recorded at once
and delivered by one background task owned by the notifier, in order, with bounded retries
(``retries`` after the first attempt, exponential backoff from ``backoff_base_seconds`` capped at
``backoff_cap_seconds``, ``attempt_timeout_seconds`` per attempt). Connection errors, timeouts,
408, 429 and 5xx are retried; other 4xx mean the receiver rejects the event and are not. Pending
deliveries are bounded (``max_pending``; the oldest is dropped and counted as failed). ``close``
cancels the worker and closes the HTTP session; undelivered events are counted as failed.
``wait_idle`` returns once nothing is queued or in flight (for tests and graceful stops).
The URL is never logged in full (it may carry a secret); only its host is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from yarl import URL

from quorumd.node.effects.token import NO_TOKEN, FencingToken

log = logging.getLogger(__name__)

EVENT_GUAMI_UNAVAILABLE = "guami_unavailable"
MAX_EVENTS = 1000


def rfc3339_ms(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. ``2026-04-20T08:15:02.123Z``."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RanEvent:
    """One recorded "GUAMI unavailable" event."""

    seq: int  # 1, 2, ... per notifier
    event_id: str
    node_id: int
    reason: str
    at: float  # unix seconds
    fencing_token: FencingToken = NO_TOKEN

    def as_dict(self) -> dict[str, Any]:
        """The webhook body."""
        return {
            "event": EVENT_GUAMI_UNAVAILABLE,
            "nodeId": self.node_id,
            "reason": self.reason,
            "ts": rfc3339_ms(self.at),
            "eventId": self.event_id,
            "fencingToken": self.fencing_token.as_dict(),
        }


class RanNotifier(Protocol):
    """What the node needs from a RAN integration."""

    @property
    def events(self) -> Sequence[RanEvent]:
        """Recorded events, oldest first (bounded)."""
        ...

    @property
    def recorded(self) -> int:
        """Events recorded since start (not bounded like ``events``)."""
        ...

    async def start(self) -> None: ...

    async def notify_guami_unavailable(
        self, node_id: int, reason: str, *, token: FencingToken | None = None
    ) -> None:
        """Record the event and signal the RANs; returns without waiting for remote delivery.
        ``token``: the fencing token of the log entry that caused it."""
        ...

    async def close(self) -> None: ...


class _Retryable(Exception):
    """One failed attempt that may succeed later."""


class _Rejected(Exception):
    """The receiver refused the event (4xx other than 408/429); retrying will not help."""


class WebhookRanNotifier:
    """Records events; delivers them to an optional webhook from an owned background task."""

    def __init__(
        self,
        notify_url: str | None,
        *,
        on_event: Callable[[RanEvent], None] | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        retries: int = 5,
        backoff_base_seconds: float = 0.2,
        backoff_cap_seconds: float = 5.0,
        attempt_timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_events: int = MAX_EVENTS,
        max_pending: int = MAX_EVENTS,
    ) -> None:
        if retries < 0 or attempt_timeout_seconds <= 0 or max_events < 1 or max_pending < 1:
            raise ValueError("retries >= 0, attempt_timeout_seconds > 0, max_events/max_pending >= 1")
        self.notify_url = notify_url
        self._on_event = on_event
        self._session_factory = session_factory or aiohttp.ClientSession
        self._session: aiohttp.ClientSession | None = None
        self.retries = retries
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.attempt_timeout_seconds = attempt_timeout_seconds
        self._clock = clock
        self._sleep = sleep
        self._events: deque[RanEvent] = deque(maxlen=max_events)
        self._pending: deque[RanEvent] = deque()
        self._max_pending = max_pending
        self._seq = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._inflight: RanEvent | None = None
        self._closed = False
        self.delivered = 0
        self.failed = 0
        self._target = _safe_target(notify_url)

    # --- RanNotifier -------------------------------------------------------------------------
    @property
    def events(self) -> Sequence[RanEvent]:
        return tuple(self._events)

    @property
    def recorded(self) -> int:
        return self._seq

    @property
    def pending(self) -> int:
        """Events queued or in flight."""
        return len(self._pending) + (self._inflight is not None)

    async def start(self) -> None:
        """Nothing to do: the worker starts with the first event that needs delivery."""

    async def notify_guami_unavailable(
        self, node_id: int, reason: str, *, token: FencingToken | None = None
    ) -> None:
        self._seq += 1
        tok = NO_TOKEN if token is None else token
        event = RanEvent(self._seq, uuid.uuid4().hex, node_id, reason, self._clock(), tok)
        self._events.append(event)
        log.info(
            "ran_guami_unavailable node=%d reason=%s seq=%d token=%d/%d",
            node_id, reason, event.seq, tok.term, tok.index,
        )  # fmt: skip
        if self._on_event is not None:
            self._on_event(event)
        if self.notify_url is None:
            return
        if self._closed:
            self.failed += 1
            log.warning("ran_webhook_skipped reason=closed seq=%d", event.seq)
            return
        if len(self._pending) >= self._max_pending:
            dropped = self._pending.popleft()
            self.failed += 1
            log.warning("ran_webhook_dropped seq=%d reason=queue_full", dropped.seq)
        self._pending.append(event)
        self._idle.clear()
        self._wakeup.set()
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="ran-webhook")

    async def close(self) -> None:
        """Stop delivering (pending events count as failed) and close the HTTP session."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        abandoned = self.pending
        if abandoned:
            self.failed += abandoned
            log.warning("ran_webhook_abandoned count=%d", abandoned)
            self._pending.clear()
            self._inflight = None
        self._idle.set()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def wait_idle(self) -> None:
        """Return once every recorded event has been delivered or given up on."""
        await self._idle.wait()

    def snapshot(self) -> dict[str, Any]:
        """The notifier's part of ``/status``."""
        last = self._events[-1].as_dict() if self._events else None
        return {
            "webhook": self.notify_url is not None,
            "events": self._seq,
            "delivered": self.delivered,
            "failed": self.failed,
            "pending": self.pending,
            "lastEvent": last,
        }

    # --- delivery ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            event = self._inflight = self._pending.popleft()
            try:
                ok = await self._deliver(event)
            except Exception as exc:  # a bug must not stop later deliveries; CancelledError passes
                log.error("ran_webhook_error seq=%d error=%s", event.seq, type(exc).__name__)
                ok = False
            self._inflight = None
            if ok:
                self.delivered += 1
            else:
                self.failed += 1

    async def _deliver(self, event: RanEvent) -> bool:
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await self._post(event)
            except _Rejected as exc:
                log.warning("ran_webhook_rejected seq=%d target=%s error=%s", event.seq, self._target, exc)
                return False
            except _Retryable as exc:
                if attempt == attempts:
                    log.warning(
                        "ran_webhook_failed seq=%d node=%d target=%s attempts=%d error=%s",
                        event.seq,
                        event.node_id,
                        self._target,
                        attempts,
                        exc,
                    )
                    return False
                delay = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
                log.info(
                    "ran_webhook_retry seq=%d attempt=%d delay_seconds=%.3f error=%s",
                    event.seq,
                    attempt,
                    delay,
                    exc,
                )
                await self._sleep(delay)
            else:
                log.info(
                    "ran_webhook_delivered seq=%d target=%s attempts=%d", event.seq, self._target, attempt
                )
                return True
        return False  # unreachable: the loop always returns

    async def _post(self, event: RanEvent) -> None:
        assert self.notify_url is not None
        if self._session is None:
            self._session = self._session_factory()
        timeout = aiohttp.ClientTimeout(total=self.attempt_timeout_seconds)
        try:
            async with self._session.post(self.notify_url, json=event.as_dict(), timeout=timeout) as resp:
                status = resp.status
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await resp.read()
        except TimeoutError as exc:
            raise _Retryable("timeout") from exc
        except aiohttp.ClientError as exc:
            raise _Retryable(type(exc).__name__) from exc
        if 200 <= status < 300:
            return
        if status >= 500 or status in (408, 429):
            raise _Retryable(f"status={status}")
        raise _Rejected(f"status={status}")


def _safe_target(url: str | None) -> str:
    if url is None:
        return "-"
    try:
        u = URL(url)
    except (ValueError, TypeError):
        return "invalid"
    return f"{u.scheme}://{u.host}:{u.port}" if u.host else "invalid"
