"""The HTTP/1.1 server (``quorumd.api.server``) over raw sockets: keep-alive, pipelining, limits,
timeouts, HEAD, disconnects, metrics, shutdown and TLS, against a FakeNode leader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from quorumd.api import server as server_mod
from quorumd.api.app import MAX_BODY_BYTES, Api, build_app
from quorumd.api.ports import DrainState, TokenRole
from quorumd.api.server import MAX_HEADER_BYTES, MAX_TARGET_BYTES, ApiServer, HttpConnection
from quorumd.node.cluster.pki import load_or_create_api_cert
from tests.fakes.node import FakeCluster, FakeNode

pytestmark = pytest.mark.asyncio

# Safety net only: every wait below ends on an observable event long before this.
WAIT = 5.0
M = "/api/v1/cluster/members"


# --- fixtures and helpers -----------------------------------------------------------------------


class GatedNode(FakeNode):
    """A FakeNode that reports when ``resume_member`` starts waiting on its gate and when it ends."""

    def __init__(self, cluster: FakeCluster, node_id: int) -> None:
        super().__init__(cluster, node_id)
        self.resume_entered = asyncio.Event()
        self.resume_done = asyncio.Event()

    async def resume_member(self, node_id: int) -> None:
        self.resume_entered.set()
        try:
            await super().resume_member(node_id)
        finally:
            self.resume_done.set()


@dataclass
class Served:
    cluster: FakeCluster
    node: GatedNode
    api: Api
    server: ApiServer
    port: int
    admin: str
    registry: CollectorRegistry


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        doc = self.json
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc
        return str(doc["code"])


async def _serve(ssl_context: ssl.SSLContext | None = None) -> Served:
    cluster = FakeCluster()
    for node_id in (1, 2, 3):
        cluster.add_member(node_id)
    cluster.leader_id = 1
    node = GatedNode(cluster, 1)
    registry = CollectorRegistry()
    api = build_app(node, node_id=1, registry=registry)
    _, admin = cluster.add_token(TokenRole.ADMIN, name="admin")
    server = ApiServer(api)
    port = await server.start("127.0.0.1", 0, ssl_context=ssl_context)
    return Served(cluster, node, api, server, port, admin, registry)


@pytest_asyncio.fixture
async def srv() -> AsyncIterator[Served]:
    s = await _serve()
    try:
        yield s
    finally:
        await s.server.close()


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Small server timeouts; applied before the server (and its sweeper) starts."""
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL", 0.02)
    monkeypatch.setattr(server_mod, "KEEPALIVE_TIMEOUT", 0.2)
    monkeypatch.setattr(server_mod, "REQUEST_TIMEOUT", 0.2)
    yield


async def connect(
    port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ssl_context), WAIT)


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await asyncio.wait_for(writer.drain(), WAIT)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """Status line and headers up to CRLFCRLF, then exactly Content-Length bytes (none for HEAD)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = raw[:-4].decode("latin-1").split("\r\n")
    version, status, reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), WAIT)
    return Response(int(status), reason, headers, body)


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


def req(path: str, *extra: str, method: str = "GET", body: bytes = b"") -> bytes:
    """One request's bytes; Content-Length is added for a body (or a POST) unless ``extra`` frames
    the body itself."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra]
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


def drain_state(s: Served, node_id: int) -> DrainState:
    return s.cluster.members[node_id].drain_state


async def request_once(s: Served, data: bytes) -> Response:
    reader, writer = await connect(s.port)
    try:
        await send(writer, data)
        return await read_response(reader)
    finally:
        await close(writer)


# --- 1. keep-alive ---------------------------------------------------------------------------------


async def test_keep_alive_two_requests_on_one_connection(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        for _ in range(2):
            await send(writer, req("/healthz"))
            r = await read_response(reader)
            assert r.status == 200 and r.reason == "OK"
            assert_standard_headers(r)
            assert r.headers["content-type"].startswith("application/json")
            assert "connection" not in r.headers
            assert r.json == {"result": {"status": "ok"}}
    finally:
        await close(writer)


# --- 2. pipelining ---------------------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz") + req("/api/v1/nope") + req("/readyz"))
        first, second, third = [await read_response(reader) for _ in range(3)]
        assert (first.status, second.status, third.status) == (200, 404, 200)
        assert first.json == {"result": {"status": "ok"}}
        assert second.code == "not_found"
        assert third.json == {"result": {"ready": True}}
        # the connection is still usable afterwards
        await send(writer, req("/healthz"))
        assert (await read_response(reader)).status == 200
    finally:
        await close(writer)


# --- 3. Connection: close and HTTP/1.0 -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [req("/healthz", "Connection: close"), b"GET /healthz HTTP/1.0\r\n\r\n"],
    ids=["http11-connection-close", "http10"],
)
async def test_connection_close_honoured(srv: Served, raw: bytes) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, raw)
        r = await read_response(reader)
        assert r.status == 200 and r.json == {"result": {"status": "ok"}}
        assert r.headers["connection"].lower() == "close"
        assert_standard_headers(r)
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


# --- 4. Expect: 100-continue ----------------------------------------------------------------------


async def test_expect_100_continue(srv: Served) -> None:
    body = json.dumps({"name": "pool-a", "cidr": "10.0.0.0/24"}).encode()
    head = req(
        "/api/v1/pools",
        bearer(srv.admin),
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Expect: 100-continue",
        method="POST",
    )
    reader, writer = await connect(srv.port)
    try:
        await send(writer, head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await send(writer, body)
        r = await read_response(reader)
        assert r.status == 201, r.body
        assert r.json["result"]["name"] == "pool-a"
        assert "pool-a" in srv.cluster.pools
    finally:
        await close(writer)


# --- 5. body limits --------------------------------------------------------------------------------


async def test_content_length_over_limit_refused_before_body(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        # the body is never sent: the server answers from the header alone
        await send(
            writer,
            req("/api/v1/pools", bearer(srv.admin), f"Content-Length: {MAX_BODY_BYTES + 1}", method="POST"),
        )
        r = await read_response(reader)
        assert r.status == 413 and r.code == "payload_too_large"
        assert r.headers["connection"].lower() == "close"
        assert_standard_headers(r)
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)
    assert srv.cluster.pools == {}


async def test_chunked_body_growing_over_limit_refused(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(
            writer, req("/api/v1/pools", bearer(srv.admin), "Transfer-Encoding: chunked", method="POST")
        )
        # MAX_BODY_BYTES in one chunk, then one byte more: the limit is crossed by the last byte
        # sent, so the server has read everything when it refuses (no unread data, no reset).
        await send(writer, b"%x\r\n" % MAX_BODY_BYTES + b"a" * MAX_BODY_BYTES + b"\r\n1\r\na")
        r = await read_response(reader)
        assert r.status == 413 and r.code == "payload_too_large"
        assert r.headers["connection"].lower() == "close"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)
    assert srv.cluster.pools == {}


async def test_chunked_body_within_limit_accepted(srv: Served) -> None:
    body = json.dumps({"name": "pool-c", "cidr": "10.2.0.0/24"}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    r = await request_once(
        srv, req("/api/v1/pools", bearer(srv.admin), "Transfer-Encoding: chunked", method="POST") + chunked
    )
    assert r.status == 201, r.body
    assert r.json["result"]["name"] == "pool-c"


# --- 6. malformed request --------------------------------------------------------------------------


async def test_malformed_request_is_400_and_closed(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, b"BLAH\r\n\r\n")
        r = await read_response(reader)
        assert r.status == 400 and r.code == "bad_request"
        assert r.headers["connection"].lower() == "close"
        assert_standard_headers(r)
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


async def test_malformed_request_after_good_one_answers_both(srv: Served) -> None:
    """Pipelined good request then garbage: the good one is answered first, then the 400."""
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz") + b"BLAH\r\n\r\n")
        first = await read_response(reader)
        assert first.status == 200 and "connection" not in first.headers
        second = await read_response(reader)
        assert second.status == 400 and second.code == "bad_request"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


# --- 7. header and target limits ------------------------------------------------------------------


async def test_header_section_too_large_is_431(srv: Served) -> None:
    # 1012 bytes counted per pad header: 64 of them stay under the limit, the 65th (the last one
    # sent) crosses it, so the server has read everything when it refuses.
    pads = [f"X-Pad-{i:02d}: {'v' * 1000}" for i in range(MAX_HEADER_BYTES // 1012 + 1)]
    assert len(pads) < server_mod.MAX_HEADER_FIELDS
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz", *pads))
        r = await read_response(reader)
        assert r.status == 431 and r.code == "headers_too_large"
        assert r.headers["connection"].lower() == "close"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


async def test_header_section_just_under_limit_is_served(srv: Served) -> None:
    pads = [f"X-Pad-{i:02d}: {'v' * 1000}" for i in range(MAX_HEADER_BYTES // 1012 - 1)]
    r = await request_once(srv, req("/healthz", *pads))
    assert r.status == 200


async def test_request_target_too_long_is_414(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz?x=" + "a" * MAX_TARGET_BYTES))
        r = await read_response(reader)
        assert r.status == 414 and r.code == "uri_too_long"
        assert r.headers["connection"].lower() == "close"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


# --- 8. HEAD -----------------------------------------------------------------------------------------


async def test_head_has_no_body_and_pipelined_get_follows(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz", method="HEAD") + req("/healthz"))
        head = await read_response(reader, head=True)
        assert head.status == 405
        assert head.headers["allow"] == "GET"
        assert int(head.headers["content-length"]) > 0  # the length a GET-like answer would have
        assert head.headers["server"] == "quorumd"
        # the next bytes on the wire are the next response, not a body
        after = await read_response(reader)
        assert after.status == 200 and after.json == {"result": {"status": "ok"}}
    finally:
        await close(writer)


# --- 9. 404 / 405 --------------------------------------------------------------------------------------


async def test_method_not_allowed_and_not_found(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
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
    finally:
        await close(writer)


# --- 10. path and query decoding --------------------------------------------------------------------


async def test_percent_encoded_path_and_query(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
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
    finally:
        await close(writer)


# --- 11. timeouts ------------------------------------------------------------------------------------


async def test_idle_keep_alive_connection_closed(fast_timeouts: None, srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz"))
        r = await read_response(reader)
        assert r.status == 200 and "connection" not in r.headers
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


async def test_unfinished_request_gets_408(fast_timeouts: None, srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Partial: ")
        r = await read_response(reader)
        assert r.status == 408 and r.code == "request_timeout"
        assert r.headers["connection"].lower() == "close"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


async def test_unfinished_body_gets_408(fast_timeouts: None, srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/api/v1/pools", bearer(srv.admin), method="POST", body=b"{}")[:-1])
        r = await read_response(reader)
        assert r.status == 408 and r.code == "request_timeout"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


# --- 12. client disconnect does not cancel the operation ---------------------------------------------


async def test_disconnect_does_not_cancel_operation(srv: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    lost = asyncio.Event()
    original = HttpConnection.connection_lost

    def connection_lost(self: HttpConnection, exc: Exception | None) -> None:
        original(self, exc)
        lost.set()

    monkeypatch.setattr(HttpConnection, "connection_lost", connection_lost)
    srv.cluster.set_drain(3, DrainState.DRAINED)
    srv.node.gate = asyncio.Event()

    _, writer = await connect(srv.port)
    await send(writer, req(f"{M}/3/resume", bearer(srv.admin), method="POST"))
    await asyncio.wait_for(srv.node.resume_entered.wait(), WAIT)
    await close(writer)
    await asyncio.wait_for(lost.wait(), WAIT)  # the server saw the disconnect while gated
    assert not srv.node.resume_done.is_set()
    assert drain_state(srv, 3) is DrainState.DRAINED

    srv.node.gate.set()
    await asyncio.wait_for(srv.node.resume_done.wait(), WAIT)
    assert drain_state(srv, 3) is DrainState.ACTIVE

    r = await request_once(srv, req("/metrics"))
    route = 'route="/api/v1/cluster/members/{id}/resume"'
    assert f'quorumd_api_requests_total{{method="POST",{route},status="200"}} 1.0' in r.body.decode()


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
        assert len(srv.server.connections) == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(srv.server.close(), WAIT)
        assert loop.time() - started < 1.0
        for reader in readers:
            assert await read_to_eof(reader) == b""
        assert not srv.server.connections
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", srv.port)
    finally:
        for writer in writers:
            await close(writer)


# --- TLS -------------------------------------------------------------------------------------------------


async def test_tls_request(tmp_path: Path) -> None:
    cert, key = load_or_create_api_cert(tmp_path, ["127.0.0.1"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    s = await _serve(server_ctx)
    try:
        reader, writer = await connect(s.port, client_ctx)
        try:
            for _ in range(2):
                await send(writer, req("/healthz"))
                r = await read_response(reader)
                assert r.status == 200 and r.json == {"result": {"status": "ok"}}
                assert_standard_headers(r)
        finally:
            await close(writer)
    finally:
        await s.server.close()


# --- regressions: bugs found in review of the first version ----------------------------------------


async def test_refusal_still_answers_pipelined_requests_owed_an_answer(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
        await send(writer, req("/healthz") + req("/readyz") + b"BLAH\r\n\r\n")
        first = await read_response(reader)
        assert first.json == {"result": {"status": "ok"}}
        second = await read_response(reader)
        assert second.status == 200 and second.json == {"result": {"ready": True}}, second
        third = await read_response(reader)
        assert third.status == 400 and third.code == "bad_request"
        assert await read_to_eof(reader) == b""
    finally:
        await close(writer)


async def test_upgrade_request_gets_exactly_one_answer(srv: Served) -> None:
    reader, writer = await connect(srv.port)
    try:
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
    finally:
        await close(writer)


async def test_100_continue_waits_for_earlier_pipelined_answers(srv: Served) -> None:
    body = json.dumps({"name": "pool-b", "cidr": "10.1.0.0/24"}).encode()
    reader, writer = await connect(srv.port)
    try:
        await send(
            writer,
            req("/healthz")
            + req(
                "/api/v1/pools",
                bearer(srv.admin),
                f"Content-Length: {len(body)}",
                "Expect: 100-continue",
                method="POST",
            ),
        )
        first = await read_response(reader)
        assert first.status == 200 and first.json == {"result": {"status": "ok"}}
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        await send(writer, body)
        created = await read_response(reader)
        assert created.status == 201, created
    finally:
        await close(writer)
