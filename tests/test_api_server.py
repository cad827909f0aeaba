"""The HTTP/1.1 server (``quorumd.api.server``) over raw sockets: keep-alive, pipelining, limits,
timeouts, HEAD, Expect, Host and version checks, disconnects, metrics, graceful shutdown, the
connection cap, the descriptor reserve, TLS and the answers written whole, against a FakeNode
leader.

Every test runs on both event loops (asyncio's and uvloop, the daemon's). Waits end on observable
events (an answer, an EOF, a released connection); ``WAIT`` is only the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvloop
from prometheus_client import CollectorRegistry

from quorumd.api import answers
from quorumd.api.answers import WholeAnswer
from quorumd.api.app import MAX_BODY_BYTES, Api, build_app
from quorumd.api.ports import DrainState, TokenRole
from quorumd.api.server import MAX_FIELD_BYTES, MAX_HEADERS, MAX_TARGET_BYTES, ApiServer
from quorumd.node.cluster.pki import load_or_create_api_cert
from tests.fakes.node import FakeCluster, FakeNode

pytestmark = [
    pytest.mark.asyncio,
    # the module's event_loop_policy fixture runs every test on both loops (see below)
    pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning'),
]

# Safety net only: every wait below ends on an observable event long before this.
WAIT = 5.0
M = "/api/v1/cluster/members"
ROOT = Path(__file__).resolve().parent.parent
ANY_1X = "HTTP/1.x"  # an HTTP/1.0 request may be answered as HTTP/1.0 or HTTP/1.1 (RFC 9110 6.2)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# --- fixtures and helpers -----------------------------------------------------------------------


class GatedNode(FakeNode):
    """A FakeNode that reports when ``resume_member`` starts waiting on its gate and when it ends,
    and whose ``status()`` can return a value JSON cannot encode."""

    def __init__(self, cluster: FakeCluster, node_id: int) -> None:
        super().__init__(cluster, node_id)
        self.resume_entered = asyncio.Event()
        self.resume_done = asyncio.Event()
        self.unencodable_status = False

    async def resume_member(self, node_id: int) -> None:
        self.resume_entered.set()
        try:
            await super().resume_member(node_id)
        finally:
            self.resume_done.set()

    def status(self) -> dict[str, Any]:
        doc = super().status()
        if self.unencodable_status:
            self.unencodable_status = False
            doc["oops"] = object()
        return doc


@dataclass
class Served:
    cluster: FakeCluster
    node: GatedNode
    api: Api
    server: ApiServer
    port: int
    admin: str
    readonly: str
    registry: CollectorRegistry
    released: asyncio.Queue[int]  # open_connections after each release


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    version: str = "HTTP/1.1"

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        doc = self.json
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc
        return str(doc["code"])


async def _serve(ssl_context: ssl.SSLContext | None = None, **options: Any) -> Served:
    cluster = FakeCluster()
    for node_id in (1, 2, 3):
        cluster.add_member(node_id)
    cluster.leader_id = 1
    node = GatedNode(cluster, 1)
    registry = CollectorRegistry()
    api = build_app(node, node_id=1, registry=registry)
    _, admin = cluster.add_token(TokenRole.ADMIN, name="admin")
    _, readonly = cluster.add_token(TokenRole.READONLY, name="reader")
    server = ApiServer(api, **options)
    released: asyncio.Queue[int] = asyncio.Queue()
    release = server._release

    def tracked_release(conn: Any) -> None:
        before = server.open_connections
        release(conn)
        if server.open_connections != before:
            released.put_nowait(server.open_connections)

    server._release = tracked_release  # type: ignore[method-assign]
    port = await server.start("127.0.0.1", 0, ssl_context=ssl_context)
    return Served(cluster, node, api, server, port, admin, readonly, registry, released)


@pytest_asyncio.fixture
async def srv() -> AsyncIterator[Served]:
    s = await _serve()
    try:
        yield s
    finally:
        await s.server.close()


async def connect(
    port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ssl_context), WAIT)


@contextlib.asynccontextmanager
async def connection(
    port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``connect``, closed at the end of the block (also on failure)."""
    reader, writer = await connect(port, ssl_context)
    try:
        yield reader, writer
    finally:
        await close(writer)


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await asyncio.wait_for(writer.drain(), WAIT)


async def read_response(
    reader: asyncio.StreamReader, *, head: bool = False, version: str = "HTTP/1.1"
) -> Response:
    """Status line and headers up to CRLFCRLF, then exactly Content-Length bytes (none for HEAD)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = raw[:-4].decode("latin-1").split("\r\n")
    got_version, status, reason = lines[0].split(" ", 2)
    assert got_version == version or (version == ANY_1X and got_version in ("HTTP/1.0", "HTTP/1.1")), lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    if int(status) < 200:  # interim: no body
        return Response(int(status), reason, headers, b"", got_version)
    length = int(headers["content-length"])
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), WAIT)
    return Response(int(status), reason, headers, body, got_version)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), WAIT)


def req(path: str, *extra: str, method: str = "GET", body: bytes = b"", host: bool = True) -> bytes:
    """One request's bytes; Content-Length is added for a body (or a POST) unless ``extra`` frames
    the body itself."""
    lines = [f"{method} {path} HTTP/1.1", *(["Host: test"] if host else []), *extra]
    framed = any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in extra)
    if not framed and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def assert_standard_headers(r: Response) -> None:
    assert int(r.headers["content-length"]) == len(r.body)
    assert r.headers["server"] == "quorumd"
    assert r.headers["cache-control"] == "no-store"
    assert parsedate_to_datetime(r.headers["date"]).tzinfo is not None


def assert_closing_error(r: Response, status: int, code: str) -> None:
    assert (r.status, r.code) == (status, code), r
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["connection"].lower() == "close"
    assert_standard_headers(r)


def drain_state(s: Served, node_id: int) -> DrainState:
    return s.cluster.members[node_id].drain_state


async def request_once(s: Served, data: bytes) -> Response:
    async with connection(s.port) as (reader, writer):
        await send(writer, data)
        return await read_response(reader)


async def metrics_text(s: Served) -> str:
    r = await request_once(s, req("/metrics"))
    assert r.status == 200
    return r.body.decode()


# --- 1. keep-alive ---------------------------------------------------------------------------------


async def test_keep_alive_two_requests_on_one_connection(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        for _ in range(2):
            await send(writer, req("/healthz"))
            r = await read_response(reader)
            assert r.status == 200 and r.reason == "OK"
            assert_standard_headers(r)
            assert r.headers["content-type"].startswith("application/json")
            assert "connection" not in r.headers
            assert r.json == {"result": {"status": "ok"}}


# --- 2. pipelining ---------------------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz") + req("/api/v1/nope") + req("/readyz"))
        first, second, third = [await read_response(reader) for _ in range(3)]
        assert (first.status, second.status, third.status) == (200, 404, 200)
        assert first.json == {"result": {"status": "ok"}}
        assert second.code == "not_found"
        assert third.json == {"result": {"ready": True}}
        # the connection is still usable afterwards
        await send(writer, req("/healthz"))
        assert (await read_response(reader)).status == 200


async def test_pipelined_request_after_a_failed_encoding_is_answered(srv: Served) -> None:
    """A result JSON cannot encode is a 500 envelope on a connection that stays usable."""
    srv.node.unencodable_status = True
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/api/v1/status") + req("/healthz"))
        failed = await read_response(reader)
        assert (failed.status, failed.code) == (500, "internal")
        assert "connection" not in failed.headers
        after = await read_response(reader)
        assert after.status == 200 and after.json == {"result": {"status": "ok"}}
    text = await metrics_text(srv)
    assert 'quorumd_api_requests_total{method="GET",route="/api/v1/status",status="500"} 1.0' in text


# --- 3. Connection: close and HTTP/1.0 -----------------------------------------------------------


async def test_connection_close_honoured(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz", "Connection: close"))
        r = await read_response(reader)
        assert r.status == 200 and r.json == {"result": {"status": "ok"}}
        assert r.headers["connection"].lower() == "close"
        assert_standard_headers(r)
        assert await read_to_eof(reader) == b""


async def test_http10_closes_unless_keep_alive_is_asked_for(srv: Served) -> None:
    # Plain HTTP/1.0 (no Host: RFC 9112 allows it): one answer, no keep-alive offered, then EOF.
    async with connection(srv.port) as (reader, writer):
        await send(writer, b"GET /healthz HTTP/1.0\r\n\r\n")
        r = await read_response(reader, version=ANY_1X)
        assert r.status == 200 and r.json == {"result": {"status": "ok"}}
        assert r.headers.get("connection", "close").lower() == "close"
        assert_standard_headers(r)
        assert await read_to_eof(reader) == b""
    # HTTP/1.0 with Connection: keep-alive: the answer says keep-alive, and the connection serves
    # the next request.
    async with connection(srv.port) as (reader, writer):
        for _ in range(2):
            await send(writer, b"GET /healthz HTTP/1.0\r\nHost: test\r\nConnection: keep-alive\r\n\r\n")
            r = await read_response(reader, version=ANY_1X)
            assert r.status == 200
            assert r.headers.get("connection", "").lower() == "keep-alive", r.headers
        await send(writer, b"GET /readyz HTTP/1.0\r\nHost: test\r\n\r\n")
        r = await read_response(reader, version=ANY_1X)
        assert r.status == 200 and r.headers.get("connection", "close").lower() == "close"
        assert await read_to_eof(reader) == b""


# --- 4. Expect: 100-continue ----------------------------------------------------------------------


def _pool_post(token: str | None, body: bytes, *extra: str, version: str = "HTTP/1.1") -> bytes:
    head = req(
        "/api/v1/pools",
        *([bearer(token)] if token else []),
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Expect: 100-continue",
        *extra,
        method="POST",
    )
    return head.replace(b"HTTP/1.1\r\n", version.encode() + b"\r\n", 1)


async def test_expect_100_continue(srv: Served) -> None:
    body = json.dumps({"name": "pool-a", "cidr": "10.0.0.0/24"}).encode()
    async with connection(srv.port) as (reader, writer):
        await send(writer, _pool_post(srv.admin, body))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await send(writer, body)
        r = await read_response(reader)
        assert r.status == 201, r.body
        assert r.json["result"]["name"] == "pool-a"
        assert "pool-a" in srv.cluster.pools


@pytest.mark.parametrize(
    ("who", "path", "status", "code"),
    [
        ("nobody", "/api/v1/pools", 401, "unauthorized"),
        ("wrong", "/api/v1/pools", 401, "unauthorized"),
        ("readonly", "/api/v1/pools", 403, "forbidden"),
        ("admin", "/api/v1/nope", 404, "not_found"),
        ("admin", "/healthz", 405, "method_not_allowed"),
    ],
)
async def test_expect_100_continue_only_after_authentication(
    srv: Served, who: str, path: str, status: int, code: str
) -> None:
    """A head that cannot succeed gets its final answer instead of a 100: no upload happens."""
    token = {"nobody": None, "wrong": "not-a-token", "readonly": srv.readonly, "admin": srv.admin}[who]
    body = json.dumps({"name": "pool-x", "cidr": "10.9.0.0/24"}).encode()
    head = _pool_post(token, body).replace(b"POST /api/v1/pools ", f"POST {path} ".encode(), 1)
    async with connection(srv.port) as (reader, writer):
        await send(writer, head)
        r = await read_response(reader)
        assert r.status != 100, "100 Continue sent before the request was authorised"
        assert_closing_error(r, status, code)
        writer.write_eof()  # the client gives up on the body: the server closes at once
        assert await read_to_eof(reader) == b""
    assert "pool-x" not in srv.cluster.pools


async def test_expect_100_continue_ignored_for_http10(srv: Served) -> None:
    body = json.dumps({"name": "pool-h", "cidr": "10.8.0.0/24"}).encode()
    async with connection(srv.port) as (reader, writer):
        # RFC 9110 10.1.1: an HTTP/1.0 expectation is ignored; the body follows the head at once.
        await send(writer, _pool_post(srv.admin, body, version="HTTP/1.0") + body)
        r = await read_response(reader, version=ANY_1X)
        assert r.status == 201, r.body
        assert await read_to_eof(reader) == b""


# --- 5. body limits --------------------------------------------------------------------------------


async def test_content_length_over_limit_refused_before_body(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        # the body is never sent: the server answers from the header alone
        await send(
            writer,
            req("/api/v1/pools", bearer(srv.admin), f"Content-Length: {MAX_BODY_BYTES + 1}", method="POST"),
        )
        r = await read_response(reader)
        assert_closing_error(r, 413, "payload_too_large")
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    assert srv.cluster.pools == {}


async def test_chunked_body_growing_over_limit_refused(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(
            writer, req("/api/v1/pools", bearer(srv.admin), "Transfer-Encoding: chunked", method="POST")
        )
        await send(writer, b"%x\r\n" % MAX_BODY_BYTES + b"a" * MAX_BODY_BYTES + b"\r\n1\r\na")
        r = await read_response(reader)
        assert_closing_error(r, 413, "payload_too_large")
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    assert srv.cluster.pools == {}


async def test_chunked_body_within_limit_accepted(srv: Served) -> None:
    body = json.dumps({"name": "pool-c", "cidr": "10.2.0.0/24"}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    r = await request_once(
        srv, req("/api/v1/pools", bearer(srv.admin), "Transfer-Encoding: chunked", method="POST") + chunked
    )
    assert r.status == 201, r.body
    assert r.json["result"]["name"] == "pool-c"


# --- 6. malformed requests, Host and version -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"BLAH\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,  # TLS on the plain port
    ],
    ids=["garbage", "header-without-colon", "length-and-chunked", "tls-hello"],
)
async def test_malformed_request_is_400_and_closed(srv: Served, raw: bytes) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, raw)
        r = await read_response(reader)
        assert_closing_error(r, 400, "bad_request")
        assert await read_to_eof(reader) == b""


async def test_malformed_body_framing_is_one_400(srv: Served) -> None:
    """A head the handler has accepted (it sent 100 Continue), then a chunk size that is not hex:
    one 400 envelope, then the close."""
    async with connection(srv.port) as (reader, writer):
        await send(
            writer,
            req(
                "/api/v1/pools",
                bearer(srv.admin),
                "Transfer-Encoding: chunked",
                "Expect: 100-continue",
                method="POST",
            ),
        )
        assert (await read_response(reader)).status == 100
        await send(writer, b"zz\r\n{}\r\n0\r\n\r\n")
        r = await read_response(reader)
        assert_closing_error(r, 400, "bad_request")
        assert await read_to_eof(reader) == b""


async def test_malformed_request_after_an_answered_one(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz"))
        first = await read_response(reader)
        assert first.status == 200 and "connection" not in first.headers
        await send(writer, b"BLAH\r\n\r\n")
        second = await read_response(reader)
        assert_closing_error(second, 400, "bad_request")
        assert await read_to_eof(reader) == b""


async def test_request_in_the_same_read_as_garbage_is_answered_or_never_run(srv: Served) -> None:
    """aiohttp drops requests parsed in the same read as a malformed one after them: such a request
    must then not have been executed (the client sees the 400 and nothing else)."""
    body = json.dumps({"name": "pool-g", "cidr": "10.7.0.0/24"}).encode()
    async with connection(srv.port) as (reader, writer):
        await send(
            writer, req("/api/v1/pools", bearer(srv.admin), method="POST", body=body) + b"BLAH\r\n\r\n"
        )
        first = await read_response(reader)
        if first.status == 201:
            assert "pool-g" in srv.cluster.pools
            first = await read_response(reader)
        else:
            assert "pool-g" not in srv.cluster.pools
        assert_closing_error(first, 400, "bad_request")
        assert await read_to_eof(reader) == b""


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (req("/healthz", host=False), "bad_request"),
        (req("/healthz", "Host: other"), "bad_request"),
        (req("/healthz", "host: test"), "bad_request"),
        (b"GET /healthz HTTP/2.0\r\nHost: test\r\n\r\n", "unsupported_http_version"),
        (b"GET /healthz HTTP/0.9\r\nHost: test\r\n\r\n", "unsupported_http_version"),
        (b"GET /healthz HTTP/1.2\r\nHost: test\r\n\r\n", "bad_request"),
        (b"GET /healthz HTTP/3.0\r\nHost: test\r\n\r\n", "bad_request"),
    ],
    ids=["no-host", "two-hosts", "two-hosts-case", "http-2.0", "http-0.9", "http-1.2", "http-3.0"],
)
async def test_host_and_version_checked(srv: Served, raw: bytes, code: str) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or any with two, is 400; a version the
    server does not speak is 400 (RFC 9112 2.3), answered as HTTP/1.1."""
    async with connection(srv.port) as (reader, writer):
        await send(writer, raw)
        r = await read_response(reader)
        assert_closing_error(r, 400, code)
        assert await read_to_eof(reader) == b""


# --- 7. header and target limits ------------------------------------------------------------------


async def test_header_field_too_large_is_431(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        # aiohttp counts the name of a request's first field only, so a value alone may reach the
        # limit; one byte more is refused whatever the name
        await send(writer, req("/healthz", "X-Big: " + "v" * (MAX_FIELD_BYTES + 1)))
        r = await read_response(reader)
        assert_closing_error(r, 431, "headers_too_large")
        assert await read_to_eof(reader) == b""


async def test_too_many_header_fields_is_431(srv: Served) -> None:
    pads = [f"X-Pad-{i:02d}: v" for i in range(MAX_HEADERS)]  # with Host: one too many
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz", *pads))
        r = await read_response(reader)
        assert_closing_error(r, 431, "headers_too_large")
        assert await read_to_eof(reader) == b""


async def test_header_section_at_the_limits_is_served(srv: Served) -> None:
    # MAX_HEADERS fields in all, each at the field limit (name + value, as aiohttp counts them)
    pads = [f"X-Pad-{i:02d}: {'v' * (MAX_FIELD_BYTES - 8)}" for i in range(MAX_HEADERS - 1)]
    r = await request_once(srv, req("/healthz", *pads))
    assert r.status == 200


async def test_request_target_too_long_is_414(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz?x=" + "a" * MAX_TARGET_BYTES))
        r = await read_response(reader)
        assert_closing_error(r, 414, "uri_too_long")
        assert await read_to_eof(reader) == b""


async def test_endless_header_value_refused_with_flat_memory_and_live_loop(srv: Served) -> None:
    """A header value that never ends is refused at the parser's field limit: the server buffers
    nothing more, its memory stays flat and the event loop keeps running meanwhile."""
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = loop.time()
            gaps.append(now - last)
            last = now

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    chunk = b"a" * 65536
    budget = 32 * 1024 * 1024  # what the old server buffered without complaint
    rss_before = rss_bytes()
    tick = loop.create_task(ticker())
    reader, writer = await connect(srv.port)
    answer = loop.create_task(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Endless: ")
        for _ in range(budget // len(chunk)):
            if answer.done():  # the server has answered or closed
                break
            try:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), WAIT)
            except ConnectionError:
                break
            sent += len(chunk)
        await asyncio.wait([answer], timeout=WAIT)
    finally:
        stop.set()
        await tick
        await close(writer)
    rss_growth = rss_bytes() - rss_before
    assert sent < 4 * 1024 * 1024, f"the server read {sent} bytes of one header without refusing"
    assert answer.done() and not answer.cancelled() and answer.exception() is None, answer
    assert answer.result().startswith(b"HTTP/1.1 431 "), answer.result()[:80]
    assert rss_growth < 8 * 1024 * 1024, rss_growth
    # a 5 ms tick never waited half a second (generous: the machine is shared)
    assert gaps and max(gaps) < 0.5, max(gaps, default=None)


# --- 8. HEAD -----------------------------------------------------------------------------------------


async def test_head_has_no_body_and_pipelined_get_follows(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz", method="HEAD") + req("/healthz"))
        head = await read_response(reader, head=True)
        assert head.status == 405
        assert head.headers["allow"] == "GET"
        assert int(head.headers["content-length"]) > 0  # the length a GET-like answer would have
        assert head.headers["server"] == "quorumd"
        # the next bytes on the wire are the next response, not a body
        after = await read_response(reader)
        assert after.status == 200 and after.json == {"result": {"status": "ok"}}


# --- 9. 404 / 405 --------------------------------------------------------------------------------------


async def test_method_not_allowed_and_not_found(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz", method="POST"))
        r = await read_response(reader)
        assert r.status == 405 and r.code == "method_not_allowed"
        assert r.headers["allow"] == "GET"

        await send(writer, req("/api/v1/pools", bearer(srv.admin), method="DELETE"))
        r = await read_response(reader)
        assert r.status == 405 and r.headers["allow"] == "GET, POST"

        await send(writer, req("/api/v1/nope"))
        r = await read_response(reader)
        assert r.status == 404 and r.code == "not_found"
        assert "allow" not in r.headers

        await send(writer, req("/api/v1/tokens/", bearer(srv.admin)))
        r = await read_response(reader)
        assert r.status == 404 and r.code == "not_found"

        # errors do not close a keep-alive connection
        await send(writer, req("/healthz"))
        assert (await read_response(reader)).status == 200


# --- 10. path and query decoding --------------------------------------------------------------------


async def test_percent_encoded_path_and_query(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        body = json.dumps({"name": "pool-a", "cidr": "10.0.0.0/24"}).encode()
        await send(writer, req("/api/v1/pools", bearer(srv.admin), method="POST", body=body))
        r = await read_response(reader)
        assert r.status == 201, r.body

        await send(writer, req("/api/v1/pools/%70ool-a", bearer(srv.admin)))
        r = await read_response(reader)
        assert r.status == 200, r.body
        assert r.json["result"]["name"] == "pool-a"
        assert r.json["result"]["cidr"] == "10.0.0.0/24"

        await send(writer, req("/api/v1/leases?limit=abc", bearer(srv.admin)))
        r = await read_response(reader)
        assert r.status == 400 and r.code == "invalid_limit"

        await send(writer, req("/api/v1/leases?limit=5&pool=pool%2Da", bearer(srv.admin)))
        r = await read_response(reader)
        assert r.status == 200 and r.json == {"result": []}

        await send(writer, req("/api/v1/leases?pool=Bad%20Name", bearer(srv.admin)))
        r = await read_response(reader)
        assert r.status == 400 and r.code == "invalid_pool_name"


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("POST", "/api/v1/pools", {"name": "pool-a\n", "cidr": "10.0.0.0/24"}, "invalid_pool_name"),
        ("GET", "/api/v1/pools/pool-a%0A", None, "invalid_pool_name"),
        ("GET", "/api/v1/leases?pool=pool-a%0A", None, "invalid_pool_name"),
        ("GET", "/api/v1/tokens/0123456789ab%0A", None, "invalid_token_id"),
        ("POST", "/api/v1/tokens", {"name": "ops\n", "role": "readonly"}, "invalid_field"),
    ],
    ids=["pool-body", "pool-path", "pool-query", "token-id", "token-name"],
)
async def test_a_trailing_newline_does_not_pass_a_pattern(
    srv: Served, method: str, path: str, body: dict[str, Any] | None, code: str
) -> None:
    """A schema pattern's ``$`` is the end of the value (JSON Schema), not "before a final newline"."""
    data = json.dumps(body).encode() if body is not None else b""
    r = await request_once(srv, req(path, bearer(srv.admin), method=method, body=data))
    assert (r.status, r.code) == (400, code), r.body
    assert srv.cluster.pools == {} and len(srv.cluster.tokens) == 2  # the admin and the reader


# --- 11. timeouts ------------------------------------------------------------------------------------


async def test_idle_keep_alive_connection_closed() -> None:
    s = await _serve(keepalive_timeout=0.2)
    try:
        async with connection(s.port) as (reader, writer):
            await send(writer, req("/healthz"))
            r = await read_response(reader)
            assert r.status == 200 and "connection" not in r.headers
            assert await read_to_eof(reader) == b""
    finally:
        await s.server.close()


async def test_slowloris_head_is_dropped() -> None:
    """A client that keeps trickling one header byte at a time is closed once the head deadline
    (the keep-alive timeout, counted from the connection's start) has passed."""
    s = await _serve(keepalive_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()  # before the connection exists: the server's deadline starts later
        reader, writer = await connect(s.port)
        eof = loop.create_task(read_to_eof(reader))
        try:
            await send(writer, b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            for _ in range(200):  # at most 200 bytes, 20 ms apart (4 s): the pace of the attack
                if eof.done():
                    break
                with contextlib.suppress(ConnectionError):
                    await send(writer, b"a")
                await asyncio.wait([eof], timeout=0.02)
            assert eof.done(), "the server kept a head that never completes"
            assert eof.result() == b""  # closed without an answer
            assert 0.5 <= loop.time() - started < 3.0
        finally:
            eof.cancel()
            await close(writer)
        assert await asyncio.wait_for(s.released.get(), WAIT) == 0
    finally:
        await s.server.close()


async def test_unfinished_body_gets_408() -> None:
    s = await _serve(body_timeout=0.2)
    try:
        async with connection(s.port) as (reader, writer):
            await send(writer, req("/api/v1/pools", bearer(s.admin), method="POST", body=b"{}")[:-1])
            r = await read_response(reader)
            assert_closing_error(r, 408, "request_timeout")
            writer.write_eof()
            assert await read_to_eof(reader) == b""
    finally:
        await s.server.close()


async def _unread_connection(
    port: int, ssl_context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose socket has a small receive buffer, for a client that never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    opened = asyncio.open_connection(
        sock=sock, ssl=ssl_context, server_hostname="127.0.0.1" if ssl_context else None
    )
    return await asyncio.wait_for(opened, WAIT)


async def _wait_until(condition: Any, seconds: float = WAIT) -> None:
    """Wait for ``condition()`` to hold, checking on every loop step; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_client_that_never_reads_its_answers_is_dropped(tmp_path: Path, tls: bool) -> None:
    """Pipelined requests whose answers the client never reads: once the server's writes have
    waited ``send_timeout`` for the client, the connection is closed and its slot freed."""
    server_ctx, client_ctx = _tls_contexts(tmp_path) if tls else (None, None)
    s = await _serve(server_ctx, send_timeout=0.3, max_connections=1)
    try:
        _, writer = await _unread_connection(s.port, client_ctx)
        try:
            writer.write(req("/api/v1/openapi.json") * 400)  # never drained: the client reads nothing
            # the server's writes stall behind the unread answers ...
            await _wait_until(lambda: any(c.writing_paused for c in s.server.connections))
            # ... and it gives up on the client rather than holding the connection for ever
            assert await asyncio.wait_for(s.released.get(), WAIT) == 0
        finally:
            writer.transport.abort()
        async with connection(s.port, client_ctx) as (reader, writer):  # the slot is free again
            await send(writer, req("/healthz"))
            assert (await read_response(reader)).status == 200
    finally:
        await s.server.close()


async def test_client_that_reads_slowly_keeps_its_connection() -> None:
    """Writes that wait and then resume each time the client reads do not count as a stall."""
    s = await _serve(send_timeout=2.0)
    try:
        async with connection(s.port) as (reader, writer):
            count = 60
            await send(writer, req("/api/v1/openapi.json") * count)
            await _wait_until(lambda: any(c.writing_paused for c in s.server.connections))
            answers = [await read_response(reader) for _ in range(count)]
            assert all(r.status == 200 for r in answers)
            await send(writer, req("/healthz"))
            assert (await read_response(reader)).status == 200
    finally:
        await s.server.close()


# --- 12. client disconnect does not cancel the operation ---------------------------------------------


async def test_disconnect_does_not_cancel_operation(srv: Served) -> None:
    srv.cluster.set_drain(3, DrainState.DRAINED)
    srv.node.gate = asyncio.Event()

    _, writer = await connect(srv.port)
    await send(writer, req(f"{M}/3/resume", bearer(srv.admin), method="POST"))
    await asyncio.wait_for(srv.node.resume_entered.wait(), WAIT)
    await close(writer)
    assert await asyncio.wait_for(srv.released.get(), WAIT) == 0  # the server saw the disconnect
    assert not srv.node.resume_done.is_set()
    assert drain_state(srv, 3) is DrainState.DRAINED

    srv.node.gate.set()
    await asyncio.wait_for(srv.node.resume_done.wait(), WAIT)
    assert drain_state(srv, 3) is DrainState.ACTIVE

    route = 'route="/api/v1/cluster/members/{id}/resume"'
    assert f'quorumd_api_requests_total{{method="POST",{route},status="200"}} 1.0' in await metrics_text(srv)


# --- 13. metrics ---------------------------------------------------------------------------------------


async def test_metrics_count_requests_and_refusals(srv: Served) -> None:
    assert (await request_once(srv, req("/healthz"))).status == 200
    assert (await request_once(srv, b"BLAH\r\n\r\n")).status == 400
    r = await request_once(srv, req("/metrics"))
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert 'quorumd_api_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'quorumd_api_requests_total{method="OTHER",route="unmatched",status="400"} 1.0' in text


# --- 14. close() ---------------------------------------------------------------------------------------


async def test_close_drops_keep_alive_connections_promptly(srv: Served) -> None:
    readers = []
    writers = []
    try:
        for _ in range(3):
            reader, writer = await connect(srv.port)
            await send(writer, req("/healthz"))
            assert (await read_response(reader)).status == 200
            readers.append(reader)
            writers.append(writer)
        assert srv.server.open_connections == 3 and len(srv.server.connections) == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(srv.server.close(), WAIT)
        assert loop.time() - started < 1.0
        for reader in readers:
            assert await read_to_eof(reader) == b""
        assert srv.server.open_connections == 0 and not srv.server.connections
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", srv.port)
    finally:
        for writer in writers:
            await close(writer)


async def test_close_lets_an_answer_in_flight_finish(srv: Served) -> None:
    """Graceful close: the listener and idle connections go at once, a write in flight still gets
    its answer (with Connection: close), and the request queued behind it is not started."""
    srv.cluster.set_drain(3, DrainState.DRAINED)
    srv.cluster.set_drain(2, DrainState.DRAINED)
    srv.node.gate = asyncio.Event()
    idle_reader, idle_writer = await connect(srv.port)
    busy_reader, busy_writer = await connect(srv.port)
    closing: asyncio.Task[None] | None = None
    try:
        await send(idle_writer, req("/healthz"))
        assert (await read_response(idle_reader)).status == 200
        await send(
            busy_writer,
            req(f"{M}/3/resume", bearer(srv.admin), method="POST")
            + req(f"{M}/2/resume", bearer(srv.admin), method="POST"),
        )
        await asyncio.wait_for(srv.node.resume_entered.wait(), WAIT)

        closing = asyncio.get_running_loop().create_task(srv.server.close())
        assert await read_to_eof(idle_reader) == b""  # the idle connection is closed at once
        with pytest.raises(OSError):  # and nothing new is accepted
            await asyncio.open_connection("127.0.0.1", srv.port)
        assert not closing.done()

        srv.node.gate.set()
        r = await read_response(busy_reader)
        assert r.status == 200 and r.json == {"result": {"message": "Cluster member resumed"}}
        assert r.headers["connection"].lower() == "close"
        assert await read_to_eof(busy_reader) == b""
        await asyncio.wait_for(closing, WAIT)
        assert drain_state(srv, 3) is DrainState.ACTIVE
        assert drain_state(srv, 2) is DrainState.DRAINED  # queued behind: never started
        assert srv.server.open_connections == 0
    finally:
        if closing is not None:
            closing.cancel()
        await close(idle_writer)
        await close(busy_writer)


async def test_close_is_bounded_when_an_answer_never_comes() -> None:
    s = await _serve(shutdown_grace=0.2)
    s.cluster.set_drain(3, DrainState.DRAINED)
    s.node.gate = asyncio.Event()
    async with connection(s.port) as (reader, writer):
        await send(writer, req(f"{M}/3/resume", bearer(s.admin), method="POST"))
        await asyncio.wait_for(s.node.resume_entered.wait(), WAIT)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(s.server.close(), WAIT)
        assert loop.time() - started < 2 * 0.2 + 1.0
        assert await read_to_eof(reader) == b""
        assert s.server.open_connections == 0


# --- 15. the connection cap ----------------------------------------------------------------------------


async def test_connection_cap_refuses_then_admits_again() -> None:
    refusals: list[str] = []
    s = await _serve(max_connections=2, on_refused=refusals.append)
    writers: list[asyncio.StreamWriter] = []
    try:
        kept = []
        for _ in range(2):
            reader, writer = await connect(s.port)
            writers.append(writer)
            await send(writer, req("/healthz"))
            assert (await read_response(reader)).status == 200
            kept.append((reader, writer))
        assert s.server.open_connections == 2

        # the third is closed at once, without an answer
        reader, writer = await connect(s.port)
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            writer.write(req("/healthz"))
        assert await read_to_eof(reader) == b""
        assert s.server.refused_connections == 1 and refusals == ["max_connections"]

        # the kept connections still work; the refusal is exported
        await send(kept[0][1], req("/metrics"))
        text = (await read_response(kept[0][0])).body.decode()
        assert 'quorumd_api_refused_connections_total{reason="max_connections"} 1.0' in text

        # one closes: the next connection is admitted
        await close(kept[1][1])
        assert await asyncio.wait_for(s.released.get(), WAIT) == 1
        r = await request_once(s, req("/healthz"))
        assert r.status == 200
        assert s.server.refused_connections == 1
    finally:
        for writer in writers:
            await close(writer)
        await s.server.close()


# --- TLS -------------------------------------------------------------------------------------------------


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = load_or_create_api_cert(tmp_path, ["127.0.0.1"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    return server_ctx, client_ctx


async def test_tls_request(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    s = await _serve(server_ctx)
    try:
        async with connection(s.port, client_ctx) as (reader, writer):
            for _ in range(2):
                await send(writer, req("/healthz"))
                r = await read_response(reader)
                assert r.status == 200 and r.json == {"result": {"status": "ok"}}
                assert_standard_headers(r)
        assert await asyncio.wait_for(s.released.get(), WAIT) == 0
    finally:
        await s.server.close()


async def test_tls_handshake_timeout_frees_the_connection(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    s = await _serve(server_ctx, handshake_timeout=0.3, max_connections=1)
    try:
        reader, writer = await connect(s.port)  # plain TCP: never starts TLS
        try:
            assert await read_to_eof(reader) == b""  # closed by the handshake timeout
            assert await asyncio.wait_for(s.released.get(), WAIT) == 0
            # the slot is free again for a real client
            async with connection(s.port, client_ctx) as (tls_reader, tls_writer):
                await send(tls_writer, req("/healthz"))
                assert (await read_response(tls_reader)).status == 200
        finally:
            await close(writer)
    finally:
        await s.server.close()


# --- the descriptor reserve ----------------------------------------------------------------------------


class _Child:
    """tests/api_server_fd_child.py: an API server under a low RLIMIT_NOFILE, with a stats channel."""

    def __init__(self, soft: int, reserve: int, cert_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.api_server_fd_child",
                str(soft),
                str(reserve),
                str(cert_dir),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.port = int(json.loads(self._line())["port"])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the child exited"
        return line

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._line()))

    def wait_stats(self, what: str, ok: Any, seconds: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        for _ in range(1000):
            stats = self.stats()
            if ok(stats):
                return stats
            assert time.monotonic() < deadline, f"{what}: {stats}"
            time.sleep(0.02)  # poll interval of an observed condition
        raise AssertionError(f"{what}: {stats}")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _tls_get(
    port: int, client_ctx: ssl.SSLContext, sock: ssl.SSLSocket | None = None
) -> tuple[int, ssl.SSLSocket]:
    if sock is None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sock = client_ctx.wrap_socket(raw)
    sock.sendall(req("/healthz"))
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        assert more, "closed"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
    )
    while len(rest) < length:
        rest += sock.recv(4096)
    return int(head.split(b" ", 2)[1]), sock


async def test_fd_reserve_keeps_descriptors_for_the_rest_of_the_process(
    tmp_path: Path, event_loop_policy: asyncio.AbstractEventLoopPolicy
) -> None:
    """The 20,000-connection incident scaled down: a server limited to 400 descriptors with a
    reserve of 120 gets 450 TCP connections that never start TLS. It refuses what would eat into
    the reserve at once, keeps serving a TLS client connected before, keeps the reserve free for
    files, and admits new TLS clients again once the junk is gone."""
    if not isinstance(event_loop_policy, uvloop.EventLoopPolicy):
        pytest.skip("the child serves on uvloop whatever the test's loop: once is enough")
    await asyncio.to_thread(_fd_reserve_scenario, tmp_path)


def _fd_reserve_scenario(tmp_path: Path) -> None:
    soft, reserve, junk_count = 400, 120, 450
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > junk_count + 100
    _, client_ctx = _tls_contexts(tmp_path)
    child = _Child(soft, reserve, tmp_path)
    junk: list[socket.socket] = []
    client: ssl.SSLSocket | None = None
    try:
        status, client = _tls_get(child.port, client_ctx)
        assert status == 200
        base = child.stats()
        assert base["open"] == 1 and base["refused"] == 0

        for _ in range(junk_count):
            junk.append(socket.create_connection(("127.0.0.1", child.port), timeout=WAIT))
        flooded = child.wait_stats(
            "every junk connection admitted or refused",
            lambda st: st["open"] - 1 + st["refused"] >= junk_count,
        )
        assert flooded["refused"] > 0
        assert flooded["fds"] <= soft - reserve, flooded
        assert flooded["can_open_half_reserve"], flooded

        # the client connected before the flood is still served
        status, client = _tls_get(child.port, client_ctx, client)
        assert status == 200
        # a new TLS client is refused at once, not left hanging in the backlog
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls_get(child.port, client_ctx)
        assert time.monotonic() - started < 2.0

        for sock in junk:
            sock.close()
        junk.clear()
        child.wait_stats("the junk connections released", lambda st: st["open"] == 1)
        status, fresh = _tls_get(child.port, client_ctx)
        assert status == 200
        fresh.close()
    finally:
        for sock in junk:
            sock.close()
        if client is not None:
            client.close()
        child.stop()


# --- regressions: bugs found in review of the first version ----------------------------------------


async def test_upgrade_request_gets_exactly_one_answer(srv: Served) -> None:
    async with connection(srv.port) as (reader, writer):
        await send(
            writer,
            req(
                "/healthz", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk"
            ),
        )
        first = await read_response(reader)
        if first.status == 400:  # refusing the upgrade is fine: then nothing else may follow
            assert await read_to_eof(reader) == b""
            return
        assert first.status == 200
        # ignoring the upgrade is fine too: then the next request gets its own answer
        await send(writer, req("/healthz"))
        second = await read_response(reader)
        assert second.status == 200, second


async def test_100_continue_waits_for_earlier_pipelined_answers(srv: Served) -> None:
    body = json.dumps({"name": "pool-b", "cidr": "10.1.0.0/24"}).encode()
    async with connection(srv.port) as (reader, writer):
        await send(writer, req("/healthz") + _pool_post(srv.admin, body))
        first = await read_response(reader)
        assert first.status == 200 and first.json == {"result": {"status": "ok"}}
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        await send(writer, body)
        created = await read_response(reader)
        assert created.status == 201, created


# --- answers written whole (quorumd.api.answers) --------------------------------------------------
# Which answers the server writes itself and which go through aiohttp's web.Response, and that a
# client cannot tell them apart.


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
        pool = b'{"name": "p", "cidr": "10.0.0.0/24"}'
        await send(writer, req("/api/v1/pools", auth, method="POST", body=pool))
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
