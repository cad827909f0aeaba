"""WebhookRanNotifier against a local aiohttp receiver: retries, give-up, no-retry 4xx, no URL, close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from quorumd.node.effects.ran import RanEvent, RanNotifier, WebhookRanNotifier, rfc3339_ms
from quorumd.node.effects.token import FencingToken

T0 = 1_700_000_000.5


@dataclass
class Receiver:
    """A webhook receiver that answers the statuses in ``script`` then 200, or waits on ``gate``."""

    script: list[int] = field(default_factory=list)
    always: int | None = None
    gate: asyncio.Event | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.always is not None:
            return web.Response(status=self.always)
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/ran", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/ran"
    try:
        yield rec
    finally:
        if rec.gate is not None:
            rec.gate.set()
        await runner.cleanup()


def _recording_sleep() -> tuple[list[float], Callable[[float], Awaitable[None]]]:
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)
        await asyncio.sleep(0)

    return delays, sleep


def _notifier(url: str | None, **kw: Any) -> tuple[WebhookRanNotifier, list[float], list[RanEvent]]:
    delays, sleep = _recording_sleep()
    seen: list[RanEvent] = []
    n = WebhookRanNotifier(url, on_event=seen.append, clock=lambda: T0, sleep=sleep, **kw)
    return n, delays, seen


def test_rfc3339_ms() -> None:
    assert rfc3339_ms(T0) == "2023-11-14T22:13:20.500Z"


@pytest.mark.asyncio
async def test_no_url_records_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    n, _, seen = _notifier(None)
    notifier: RanNotifier = n
    with caplog.at_level(logging.INFO, logger="quorumd.node.effects.ran"):
        await notifier.notify_guami_unavailable(3, "drain")
    await n.wait_idle()
    assert [(e.node_id, e.reason, e.at, e.seq) for e in notifier.events] == [(3, "drain", T0, 1)]
    assert seen == list(notifier.events)
    assert (n.delivered, n.failed, n.pending) == (0, 0, 0)
    assert "ran_guami_unavailable node=3 reason=drain seq=1 token=0/0" in caplog.messages
    assert n.snapshot()["events"] == 1
    await n.close()


@pytest.mark.asyncio
async def test_fails_twice_then_delivers(receiver: Receiver) -> None:
    receiver.script = [500, 503]
    n, delays, _ = _notifier(receiver.url)
    await n.notify_guami_unavailable(2, "drain", token=FencingToken(3, 41))
    await n.wait_idle()
    assert (n.delivered, n.failed) == (1, 0)
    assert delays == [0.2, 0.4]
    assert len(receiver.bodies) == 3
    body = receiver.bodies[0]
    assert body == {
        "event": "guami_unavailable",
        "nodeId": 2,
        "reason": "drain",
        "ts": "2023-11-14T22:13:20.500Z",
        "eventId": n.events[0].event_id,
        "fencingToken": {"term": 3, "index": 41},
    }
    assert receiver.bodies[1] == body == receiver.bodies[2]  # same eventId on retries
    await n.close()


@pytest.mark.asyncio
async def test_always_failing_gives_up_after_bounded_retries(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.always = 502
    n, delays, _ = _notifier(receiver.url, retries=6, backoff_cap_seconds=1.0)
    with caplog.at_level(logging.INFO, logger="quorumd.node.effects.ran"):
        await n.notify_guami_unavailable(4, "drain")
        await n.wait_idle()
    assert (n.delivered, n.failed) == (0, 1)
    assert len(receiver.bodies) == 7
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    failed = [m for m in caplog.messages if m.startswith("ran_webhook_failed")]
    assert len(failed) == 1 and "attempts=7" in failed[0] and "status=502" in failed[0]
    assert all("/ran" not in m for m in caplog.messages)  # only scheme://host:port is logged
    await n.close()


@pytest.mark.asyncio
async def test_client_error_is_not_retried(receiver: Receiver) -> None:
    receiver.script = [400]
    n, delays, _ = _notifier(receiver.url)
    await n.notify_guami_unavailable(4, "drain")
    await n.wait_idle()
    assert (n.delivered, n.failed, delays, len(receiver.bodies)) == (0, 1, [], 1)
    await n.close()


@pytest.mark.asyncio
async def test_429_is_retried(receiver: Receiver) -> None:
    receiver.script = [429]
    n, delays, _ = _notifier(receiver.url)
    await n.notify_guami_unavailable(4, "drain")
    await n.wait_idle()
    assert (n.delivered, n.failed, delays) == (1, 0, [0.2])
    await n.close()


@pytest.mark.asyncio
async def test_connection_refused_is_retried_then_given_up() -> None:
    # Bind then close a port so nothing listens there.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    n, delays, _ = _notifier(f"http://127.0.0.1:{port}/ran", retries=2)
    await n.notify_guami_unavailable(1, "drain")
    await n.wait_idle()
    assert (n.delivered, n.failed, delays) == (0, 1, [0.2, 0.4])
    await n.close()


@pytest.mark.asyncio
async def test_notify_does_not_wait_for_delivery_and_keeps_order(receiver: Receiver) -> None:
    receiver.gate = asyncio.Event()
    n, _, _ = _notifier(receiver.url)
    await n.notify_guami_unavailable(1, "drain")  # returns while the receiver holds the request
    await receiver.arrived.wait()
    await n.notify_guami_unavailable(2, "drain")
    await n.notify_guami_unavailable(3, "shutdown")
    assert n.pending == 3 and n.delivered == 0
    receiver.gate.set()
    await n.wait_idle()
    assert [b["nodeId"] for b in receiver.bodies] == [1, 2, 3]
    assert [b["reason"] for b in receiver.bodies] == ["drain", "drain", "shutdown"]
    assert (n.delivered, n.failed, n.pending) == (3, 0, 0)
    await n.close()


@pytest.mark.asyncio
async def test_attempt_timeout_is_retried(receiver: Receiver) -> None:
    receiver.gate = asyncio.Event()  # never released while the notifier runs
    n, delays, _ = _notifier(receiver.url, retries=1, attempt_timeout_seconds=0.05)
    await n.notify_guami_unavailable(1, "drain")
    await n.wait_idle()
    assert (n.delivered, n.failed, delays, len(receiver.bodies)) == (0, 1, [0.2], 2)
    await n.close()


@pytest.mark.asyncio
async def test_close_abandons_in_flight_delivery_and_later_events(receiver: Receiver) -> None:
    receiver.gate = asyncio.Event()
    n, _, _ = _notifier(receiver.url)
    await n.notify_guami_unavailable(1, "drain")
    await receiver.arrived.wait()
    await n.notify_guami_unavailable(2, "drain")
    await n.close()
    assert (n.delivered, n.failed, n.pending) == (0, 2, 0)
    await n.notify_guami_unavailable(3, "drain")  # still recorded, never sent
    assert [e.node_id for e in n.events] == [1, 2, 3]
    assert (n.failed, len(receiver.bodies)) == (3, 1)
    await n.wait_idle()
    await n.close()  # idempotent


@pytest.mark.asyncio
async def test_events_and_pending_are_bounded(receiver: Receiver) -> None:
    receiver.gate = asyncio.Event()
    n, _, _ = _notifier(receiver.url, max_events=3, max_pending=2)
    await n.notify_guami_unavailable(1, "drain")
    await receiver.arrived.wait()  # event 1 is in flight
    for node in (2, 3, 4, 5):
        await n.notify_guami_unavailable(node, "drain")
    assert [e.node_id for e in n.events] == [3, 4, 5]
    assert [e.seq for e in n.events] == [3, 4, 5]
    assert n.failed == 2  # events 2 and 3 dropped from the queue
    receiver.gate.set()
    await n.wait_idle()
    assert [b["nodeId"] for b in receiver.bodies] == [1, 4, 5]
    assert (n.delivered, n.failed) == (3, 2)
    await n.close()


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        WebhookRanNotifier(None, retries=-1)


@pytest.mark.asyncio
async def test_recorded_counts_past_the_event_log_bound() -> None:
    n = WebhookRanNotifier(None, max_events=2)
    for i in range(5):
        await n.notify_guami_unavailable(i, "drain")
    assert n.recorded == 5 and len(n.events) == 2
    await n.close()
