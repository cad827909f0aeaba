"""HTTP/1.1 server for the API: an asyncio protocol around the httptools (llhttp) parser.

Each connection parses with httptools and hands complete requests to ``Api.handle`` one at a time
(HTTP/1.1 pipelining answers in order); the reply goes out as one ``transport.write`` of the status
line, headers and body, so over TLS a typical answer is a single record. The API's work per write
is small, and ``aiohttp.web``'s request and response objects, router and middleware chain had
become half of the leader's CPU (see BENCHMARKS.md); the API needs none of them.

What the server does itself:
- keep-alive (HTTP/1.1 default, ``Connection: close`` and HTTP/1.0 honoured), pipelining with a
  bound on queued requests (reading pauses beyond it), ``Expect: 100-continue``;
- limits: request target 8 KiB, header section 64 KiB / 100 fields, body ``MAX_BODY_BYTES``
  (413 before the body is read when Content-Length already says so); a malformed request gets 400
  and the connection closes; all as JSON error envelopes;
- timeouts: a request whose head and body have not arrived within ``request_timeout`` seconds
  gets 408 and is closed, an idle keep-alive connection is closed after ``keepalive_timeout``;
- HEAD is answered without a body (no route serves HEAD: 405 with ``Allow``);
- a client that half-closes or disconnects does not cancel its request: a write it sent still completes
  (as with aiohttp's default), the answer is dropped;
- write back-pressure: while the transport's buffer is over its high-water mark, the next answer
  waits.
Every answer carries ``Content-Length``, ``Date``, ``Server: quorumd`` and
``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from .app import MAX_BODY_BYTES, TOO_LARGE_MESSAGE, Api
from .errors import ApiError, BadRequest, PayloadTooLarge
from .pipeline import Reply

log = logging.getLogger(__name__)

MAX_TARGET_BYTES = 8192
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 100
MAX_PIPELINED = 16
READ_BUFFER_BYTES = 16 * 1024  # per connection; one TLS record's worth
KEEPALIVE_TIMEOUT = 75.0
REQUEST_TIMEOUT = 30.0
SWEEP_INTERVAL = 1.0

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Date:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


_DATE = _Date()


def _head(status: int, content_type: str, length: int, headers: dict[str, str], close: bool) -> bytes:
    parts = [
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
        b"Date: %s\r\nServer: quorumd\r\n"
        % (status, _REASONS.get(status, "").encode(), content_type.encode(), length, _DATE.now())
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue  # never split the header section (values come from our own code)
        parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request (the parser wraps it)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class _Request:
    __slots__ = ("authorization", "body", "head_only", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, body: bytes, authorization: str | None, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.authorization = authorization
        self.keep_alive = keep_alive
        self.head_only = method == "HEAD"


class HttpConnection(asyncio.BufferedProtocol):
    """One client connection (see the module docstring).

    A buffered protocol: the loop reads (and decrypts) into this connection's buffer and the
    parser reads it in place; the parser copies out what it keeps, so the buffer is reused at
    once. (As a plain ``Protocol`` uvloop's TLS layer allocated 256 KiB per read.)
    """

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._api = server.api
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._read_buffer = bytearray(READ_BUFFER_BYTES)
        self._client = "unknown"
        self._pending: deque[_Request] = deque()
        self._busy = False
        self._closing = False
        self._reading_paused = False
        self._write_ready: asyncio.Future[None] | None = None
        self._final: Reply | None = None  # a refusal waiting for the request in flight
        # the request being parsed
        self._in_message = False
        self._message_started = 0.0
        self._url = b""
        self._header_bytes = 0
        self._header_fields = 0
        self._authorization: bytes | None = None
        self._expect_continue = False
        self._continue_owed = False
        self._body: list[bytes] = []
        self._body_bytes = 0
        self.last_activity = self._loop.time()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport implements asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client = str(peer[0])
        elif peer:
            self._client = str(peer)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._pending.clear()
        self._server.connections.discard(self)
        waiter = self._write_ready
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter = self._write_ready
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._read_buffer)

    def buffer_updated(self, nbytes: int) -> None:
        with memoryview(self._read_buffer) as view:
            self.data_received(view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        self.last_activity = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # a callback's _Reject, wrapped by the parser
            self._refuse(cause.error if isinstance(cause, _Reject) else BadRequest("malformed HTTP request"))

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._message_started = self._loop.time()
        self._url = b""
        self._header_bytes = 0
        self._header_fields = 0
        self._authorization = None
        self._expect_continue = False
        self._continue_owed = False
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET_BYTES:
            raise _Reject(ApiError(414, "uri_too_long", f"request target exceeds {MAX_TARGET_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_fields > MAX_HEADER_FIELDS or self._header_bytes > MAX_HEADER_BYTES:
            raise _Reject(
                ApiError(431, "headers_too_large", f"header section exceeds {MAX_HEADER_BYTES} bytes")
            )
        lname = name.lower()
        if lname == b"authorization":
            self._authorization = value
        elif lname == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        elif lname == b"content-length" and value.strip().isdigit() and int(value) > MAX_BODY_BYTES:
            raise _Reject(PayloadTooLarge(TOO_LARGE_MESSAGE))

    def on_headers_complete(self) -> None:
        if self._expect_continue:
            if self._busy:
                self._continue_owed = True  # sent once the answers owed before it are out
            elif self._transport is not None:
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _Reject(PayloadTooLarge(TOO_LARGE_MESSAGE))
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        parser = self._parser
        if parser.should_upgrade():
            # llhttp stops at an upgrade; nothing after it could be parsed as HTTP/1.1
            raise _Reject(BadRequest("protocol upgrades are not supported"))
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(BadRequest("malformed request target")) from None
        path = url.path.decode("latin-1") if url.path else "/"
        query = url.query.decode("latin-1") if url.query else ""
        auth = self._authorization.decode("latin-1") if self._authorization is not None else None
        body = b"".join(self._body) if self._body else b""
        request = _Request(
            parser.get_method().decode("ascii", "replace"),
            path,
            query,
            body,
            auth,
            parser.should_keep_alive(),
        )
        if self._busy:
            self._pending.append(request)
            if len(self._pending) >= MAX_PIPELINED and not self._reading_paused and self._transport:
                self._reading_paused = True
                self._transport.pause_reading()
            return
        self._busy = True
        self._loop.create_task(self._serve(request))

    # --- serving ------------------------------------------------------------------------------

    async def _serve(self, request: _Request) -> None:
        api = self._api
        client = self._client
        try:
            while True:
                reply = await api.handle(
                    request.method, request.path, request.query, request.body, request.authorization, client
                )
                if self._write_ready is not None and not self._write_ready.done():
                    await self._write_ready
                close = not request.keep_alive or (
                    self._closing and not self._pending and self._final is None
                )
                self._send(reply, head_only=request.head_only, close=close)
                if close or not self._pending:
                    break
                request = self._pending.popleft()
                if self._reading_paused and len(self._pending) < MAX_PIPELINED // 2 and self._transport:
                    self._reading_paused = False
                    self._transport.resume_reading()
        except Exception:  # Api.handle does not raise; a bug here must not leave the client hanging
            log.exception("api_connection_error")
            self._abort()
        finally:
            self._busy = False
            self.last_activity = self._loop.time()
            final, self._final = self._final, None
            if final is not None:
                self._send(final, head_only=False, close=True)
            elif self._continue_owed and self._in_message and self._transport is not None:
                self._continue_owed = False
                self._transport.write(_CONTINUE)

    def _send(self, reply: Reply, *, head_only: bool, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = reply.encoded()
        head = _head(reply.status, reply.content_type, len(body), reply.headers, close)
        transport.write(head if head_only else head + body)
        if close:
            self._closing = True
            transport.close()

    def _refuse(self, error: ApiError) -> None:
        """Answer a request the parser refused, after any answers still owed, and close."""
        reply = self._api.rejected("OTHER", error)
        self._closing = True
        if not self._reading_paused and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        if self._busy:
            self._final = reply  # sent by _serve after the answer to the request in flight
        else:
            self._send(reply, head_only=False, close=True)

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    # --- timeouts (driven by ApiServer's sweep) -----------------------------------------------

    def sweep(self, now: float) -> None:
        if self._closing or self._transport is None:
            return
        if self._in_message:
            if now - self._message_started > REQUEST_TIMEOUT and not self._busy:
                self._refuse(ApiError(408, "request_timeout", "the request did not arrive in time"))
        elif not self._busy and not self._pending and now - self.last_activity > KEEPALIVE_TIMEOUT:
            self._transport.close()


class ApiServer:
    """Listening socket(s) for ``api``; ``start`` binds, ``close`` stops and drops connections."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), host, port, ssl=ssl_context, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.create_task(self._sweep_loop(), name="api-sweep")
        port_bound: int = self._server.sockets[0].getsockname()[1]
        return port_bound

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.sweep(now)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn._abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
