"""Answers written whole (``quorumd.api.answers``): which answers the server writes itself and
which go through aiohttp's ``web.Response``, and that a client cannot tell them apart.

Runs on both event loops, over raw sockets, with the helpers of ``test_api_server``.
"""

from __future__ import annotations

from typing import Any

import pytest

from quorumd.api import answers
from quorumd.api.answers import WholeAnswer
from tests.test_api_server import (  # noqa: F401  (fixtures: event_loop_policy, srv)
    Response,
    Served,
    bearer,
    connection,
    event_loop_policy,
    read_response,
    read_to_eof,
    req,
    send,
    srv,
)

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning'),
]


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of every answer the server builds, in order: ``whole`` or ``response``."""
    seen: list[str] = []
    real = answers.answer

    def spy(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)
        seen.append("whole" if isinstance(built, WholeAnswer) else "response")
        return built

    monkeypatch.setattr("quorumd.api.server.answer", spy)
    return seen


def _same_head(whole: Response, other: Response) -> None:
    """The two answers carry the same status and headers (the date aside)."""
    assert (whole.version, whole.status, whole.reason) == (other.version, other.status, other.reason)
    left = {k: v for k, v in whole.headers.items() if k != "date"}
    right = {k: v for k, v in other.headers.items() if k != "date"}
    assert left == right
    assert set(whole.headers) == set(other.headers)


async def test_a_keep_alive_get_is_written_whole(srv: Served, kinds: list[str]) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz"))
        get = await read_response(reader)
        await send(writer, req("/healthz"))  # the connection stays open for the next request
        again = await read_response(reader)
    assert kinds == ["whole", "whole"]
    assert get.status == 200 and get.reason == "OK" and get.json == {"result": {"status": "ok"}}
    assert set(get.headers) == {"content-type", "content-length", "date", "server", "cache-control"}
    assert get.headers["content-type"].startswith("application/json")
    assert again.body == get.body


async def test_whole_and_aiohttp_answers_look_the_same(srv: Served, kinds: list[str]) -> None:
    auth = bearer(srv.admin)
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/api/v1/pools", auth))
        whole = await read_response(reader)
        # the same answer through aiohttp: the client asks to close after it
        await send(writer, req("/api/v1/pools", auth, "Connection: close"))
        closing = await read_response(reader)
        assert await read_to_eof(reader) == b""
    assert kinds == ["whole", "response"]
    assert whole.body == closing.body
    assert closing.headers.pop("connection").lower() == "close"
    _same_head(whole, closing)


async def test_errors_and_created_answers_are_written_whole_too(srv: Served, kinds: list[str]) -> None:
    auth = bearer(srv.admin)
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/api/v1/pools", auth, method="POST", body=b'{"name": "p", "cidr": "10.0.0.0/24"}'))
        created = await read_response(reader)
        await send(writer, req("/api/v1/pools", auth, method="POST", body=b"{"))
        bad = await read_response(reader)
        await send(writer, req("/api/v1/nope"))
        missing = await read_response(reader)
    assert kinds == ["whole", "whole", "whole"]
    assert created.status == 201 and created.reason == "Created"
    assert (bad.status, bad.reason, bad.code) == (400, "Bad Request", "invalid_json")
    assert (missing.status, missing.reason, missing.code) == (404, "Not Found", "not_found")
    for r in (created, bad, missing):
        assert int(r.headers["content-length"]) == len(r.body)
        assert r.headers["server"] == "quorumd" and r.headers["cache-control"] == "no-store"


async def test_answers_with_headers_of_their_own_go_through_aiohttp(srv: Served, kinds: list[str]) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/api/v1/pools"))  # no token: 401 with WWW-Authenticate
        unauthorized = await read_response(reader)
        await send(writer, req("/healthz", method="POST"))  # 405 with Allow
        not_allowed = await read_response(reader)
    assert kinds == ["response", "response"]
    assert unauthorized.status == 401 and unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert not_allowed.status == 405 and not_allowed.headers["allow"] == "GET"


async def test_http10_and_head_go_through_aiohttp(srv: Served, kinds: list[str]) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, b"GET /healthz HTTP/1.0\r\n\r\n")
        old = await read_response(reader, version="HTTP/1.x")
        assert old.status == 200
        assert await read_to_eof(reader) == b""  # HTTP/1.0 without keep-alive: closed after it
    async with connection(srv.port) as (reader, writer):
        # HEAD (405 here: no route takes it) and the next request on the same connection
        await send(writer, req("/healthz", method="HEAD") + req("/healthz", method="PUT"))
        head = await read_response(reader, head=True)
        after = await read_response(reader)
    assert kinds == ["response", "response", "response"]
    assert head.status == after.status == 405
    assert int(head.headers["content-length"]) == len(after.body)
    _same_head(after, head)


async def test_pipelined_whole_answers_come_in_order(srv: Served, kinds: list[str]) -> None:
    auth = bearer(srv.admin)
    names = [f"p{i}" for i in range(6)]
    batch = b"".join(
        req("/api/v1/pools", auth, method="POST", body=f'{{"name": "{n}", "cidr": "10.{i}.0.0/24"}}'.encode())
        for i, n in enumerate(names)
    )
    async with connection(srv.port) as (reader, writer):
        await send(writer, batch)
        got = [await read_response(reader) for _ in names]
    assert kinds == ["whole"] * len(names)
    assert [r.json["result"]["name"] for r in got] == names
