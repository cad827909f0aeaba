"""HTTP/1.1 server for the API: aiohttp's low-level server (``aiohttp.web.Server``), no router.

``ApiServer(api).start(host, port, ssl_context=...)`` listens; every request goes to one handler
that turns the ``BaseRequest`` into the arguments of ``Api.handle`` and the ``Reply`` into an answer
(``answers.answer``: a keep-alive answer with a plain body is written whole in one call, any other
through ``web.Response``). ``replace_ssl_context`` swaps the TLS context for the handshakes to come
(the daemon's certificate reload). aiohttp's C parser (llhttp) reads the request, its protocol
(``web_protocol.RequestHandler``) runs keep-alive, pipelining (answers in order; at most 32 parsed
requests queued per connection, and a queued request's body buffers at most 128 KiB, then reading
pauses) and the lingering close after an early answer. No router, no middleware chain: those were
half of the leader's CPU when the API was an ``aiohttp.web`` application (BENCHMARKS.md).

A connection goes through three objects: ``_Gate`` (the protocol of the accepted socket: admits or
closes it, starts TLS), ``_Reader`` (a buffered protocol in front of aiohttp's, so that uvloop
decrypts into one shared buffer) and ``_Connection`` (aiohttp's protocol).

Every answer carries ``Content-Length``, ``Date``, ``Server: quorumd`` and ``Cache-Control:
no-store``; every error the server produces itself is a JSON error envelope counted by the API
metrics under ``unmatched``, parse errors included (``_Connection.handle_error``), and is followed
by ``Connection: close``. HEAD gets the headers of the answer without its body.

A reply whose body is a stream (``Reply.stream``: a backup archive) is written piece by piece,
one piece per event-loop step, each write waiting while the client is behind (the loop is never
held for the whole body); a stream that fails part-way aborts the connection, so the client gets
fewer bytes than ``Content-Length`` announced, never a complete-looking body.

Limits (module constants; the timeouts and caps are constructor parameters):
- request line: target up to ``MAX_TARGET_BYTES`` (8192; 414 beyond); version HTTP/1.0 or HTTP/1.1
  only (anything else the parser accepts, e.g. ``HTTP/2.0`` or ``HTTP/0.9``, is 400: RFC 9112 2.3,
  3.2); a method llhttp does not know is 400;
- header section: each field up to ``MAX_FIELD_BYTES`` (8190 for the name, and as much for the
  value), at most ``MAX_HEADERS`` (32) fields (431 beyond): a head is at most ~512 KiB. The
  parser checks the limits as bytes arrive, so a header that never ends is refused after 8 KiB
  and nothing more is buffered;
- ``Host``: an HTTP/1.1 request without one, or any request with two, is 400 (RFC 9112 3.2; the
  parser refuses both too, the handler checks again). HTTP/1.0 requests may omit it, as RFC 9112
  allows: load-balancer health checks (HAProxy's ``option httpchk``) send HTTP/1.0 without Host;
- body: ``MAX_BODY_BYTES`` (1 MiB); a Content-Length above it is 413 before any of the body is read,
  a chunked body is 413 once it crosses it; no content coding is undone (``auto_decompress`` off);
- ``Expect: 100-continue`` is honoured for HTTP/1.1 only (RFC 9110 10.1.1: ignored for HTTP/1.0)
  and only once the head has passed every check that needs no body: the Host and version checks,
  the body limit, the route, clustering, the token and its role (``Api.precheck``). A head that
  fails them gets its final answer and ``Connection: close`` instead of a 100, so an
  unauthenticated client never gets to upload. (Never sending 100 would make curl-like clients
  wait a second per request before sending the body, and RFC 9110 asks for either an immediate
  final status or a 100.)
- time: a request head must be complete within ``keepalive_timeout`` (default 30 s) of the
  connection being established or of the previous answer, otherwise the connection is closed
  (aiohttp's keep-alive timer, which also closes idle connections: slow-loris heads are dropped);
  a body must arrive within ``body_timeout`` (30 s; 408 otherwise); an answer the client does
  not read: once the server's writes have waited ``send_timeout`` (30 s) for the client without
  any progress (the transport paused writing and did not resume), the connection is aborted
  (pipelined requests whose answers are never read would otherwise hold it, and its slot under
  ``max_connections``, for ever); the TLS handshake within
  ``handshake_timeout`` (10 s); a TLS close_notify exchange within ``TLS_SHUTDOWN_SECONDS`` (5 s);
  after an answer that left body bytes unread, ``LINGER_SECONDS`` (3 s) of discarding them before
  the close, so the client reads the answer rather than a reset.
- connections: at most ``max_connections`` (1024) at once, counted from accept (so TLS handshakes
  in progress count), and never so many that the process comes within ``fd_reserve`` (256)
  descriptors of its RLIMIT_NOFILE soft limit: the Raft channel and the storage keep descriptors.
  A connection beyond either cap (or accepted while closing) is closed at accept, before any TLS
  work, counted in ``refused_connections`` and ``quorumd_api_refused_connections_total{reason}``,
  passed to the ``on_refused`` hook, and logged at WARNING at most every ``REFUSAL_LOG_SECONDS``
  (10 s, with the count since the last line). The descriptor
  check uses the new socket's number (Linux hands out the lowest free one, so all below it are in
  use) and a count of ``/proc/self/fd`` taken at most once a second for descriptors held elsewhere.

A client that disconnects does not cancel its request (``handler_cancellation`` off): a write it
sent still completes, the answer is dropped. ``close()`` stops accepting, drops TLS handshakes in
progress and idle keep-alive connections, lets answers in flight finish within ``shutdown_grace``
seconds (they go out with ``Connection: close``; requests queued behind them are not started),
then closes what is left; it returns within ``2 * shutdown_grace + 0.7`` seconds (4.7 s by
default, inside the 5 s the daemon allows it).

A body whose framing the parser refuses (a chunk size that is not hex, ...) is 400 at once:
``_Connection.data_received`` ends the read that aiohttp would leave waiting until the body
timeout. That, the JSON ``handle_error`` and the accounting in ``connection_lost`` are the only
overrides of aiohttp's protocol; the first reads its private queue (hence ``aiohttp<4``).

Known limit of aiohttp's protocol: when a malformed request arrives in the same read as complete
requests before it, those earlier requests are discarded with the parser state and only the 400
is sent (they are never executed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler, RequestPayloadError, _ErrInfo

from .accept import _feed, _Gate, _Reader
from .answers import answer, headers_of, response
from .app import MAX_BODY_BYTES, TOO_LARGE_MESSAGE, Api
from .errors import ApiError, BadRequest, InternalError, PayloadTooLarge
from .pipeline import BodyStream, Reply

log = logging.getLogger(__name__)

MAX_TARGET_BYTES = 8192  # aiohttp's max_line_size: the request target
MAX_FIELD_BYTES = 8190  # aiohttp's max_field_size: one header line, name and value
MAX_HEADERS = 32
# The two must differ: a parser's LineTooLong names the limit it hit, which is how 414 and 431
# are told apart.
KEEPALIVE_TIMEOUT = 30.0
BODY_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0
TLS_SHUTDOWN_SECONDS = 5.0
LINGER_SECONDS = 3.0
SHUTDOWN_GRACE = 2.0
MAX_CONNECTIONS = 1024
FD_RESERVE = 256
FD_SAMPLE_SECONDS = 1.0
REFUSAL_LOG_SECONDS = 10.0
BACKLOG = 1024
READ_BUFFER_BYTES = 64 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _parse_error(status: int, exc: BaseException | None) -> ApiError:
    """The envelope for an error aiohttp's protocol reports (parser errors arrive as 400)."""
    if status >= 500:
        return InternalError()
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_TARGET_BYTES,):
            return ApiError(414, "uri_too_long", f"request target exceeds {MAX_TARGET_BYTES} bytes")
        return ApiError(431, "headers_too_large", f"a header field exceeds {MAX_FIELD_BYTES} bytes")
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return ApiError(431, "headers_too_large", f"more than {MAX_HEADERS} header fields")
    return BadRequest("malformed HTTP request")


class _UnsupportedVersion(web.BaseRequest):
    """A request whose version is neither HTTP/1.0 nor HTTP/1.1, carried as HTTP/1.1 so that its
    400 goes out with an HTTP/1.1 status line."""

    sent_version = ""


class _Connection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol for one connection, with JSON error answers and accounting."""

    __slots__ = ("_owner", "_released", "_send_stalled", "body_refused")

    def __init__(self, owner: ApiServer, **kwargs: Any) -> None:
        super().__init__(owner.web_server, loop=owner.loop, **kwargs)
        self._owner = owner
        self._released = False
        self._send_stalled: asyncio.TimerHandle | None = None  # aborts when writing stays paused
        self.body_refused = False  # the parser refused the framing of the body being read

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_send_timer()
        super().connection_lost(exc)
        self._owner._release(self)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_stalled is None:
            self._send_stalled = self._owner.loop.call_later(self._owner.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def _stop_send_timer(self) -> None:
        if self._send_stalled is not None:
            self._send_stalled.cancel()
            self._send_stalled = None

    def _send_timed_out(self) -> None:
        self._send_stalled = None
        log.debug("api_send_timeout seconds=%s", self._owner.send_timeout)
        transport = self.transport
        if transport is not None:
            transport.abort()  # connection_lost follows: the writes waiting fail, the slot is freed

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # aiohttp queues a parse error as the next message but leaves the body being read
        # waiting for bytes that will never parse: when the parser stopped inside that body
        # (it has not ended), end the read now (the handler answers 400) instead of at the body
        # timeout. (An exception on the payload would also reach aiohttp's lingering read,
        # which logs it as unhandled.)
        request = self._current_request
        if (
            request is not None
            and self._messages
            and isinstance(self._messages[-1][0], _ErrInfo)
            and not request.content.is_eof()
        ):
            self.body_refused = True
            request.content.feed_eof()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Never log the exception's text: it quotes request bytes (header values, tokens).
        log.debug(
            "api_request_refused client=%s status=%d error=%s", request.remote, status, type(exc).__name__
        )
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is already under way; cannot send the error")
        return response(self._owner.api.rejected("OTHER", _parse_error(status, exc)), close=True)


class ApiServer:
    """Listening socket(s) for ``api`` (see the module docstring); ``start`` binds, ``close``
    stops gracefully."""

    def __init__(
        self,
        api: Api,
        *,
        max_connections: int = MAX_CONNECTIONS,
        fd_reserve: int = FD_RESERVE,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        shutdown_grace: float = SHUTDOWN_GRACE,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.loop = asyncio.get_running_loop()
        self.max_connections = max_connections
        self.fd_reserve = fd_reserve
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.shutdown_grace = shutdown_grace
        self.on_refused = on_refused
        self.refused_connections = 0
        # Shared by every connection's _Reader: a transport calls get_buffer and buffer_updated
        # back to back, and buffer_updated copies the bytes out before returning.
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        self.ssl_context: ssl.SSLContext | None = None
        self.web_server = web.Server(
            self._handle, request_factory=self._make_request, handler_cancellation=False, loop=self.loop
        )
        self._listener: asyncio.Server | None = None
        self._open = 0  # admitted connections, TLS handshakes included
        self._conns: set[_Connection] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closing = False
        self._fd_soft: int | None = None
        self._fd_elsewhere = 0
        self._fd_sampled_at = -FD_SAMPLE_SECONDS
        self._refusals_unlogged = 0
        self._next_refusal_log = 0.0

    @property
    def open_connections(self) -> int:
        """Connections admitted and not yet closed (TLS handshakes in progress included)."""
        return self._open

    @property
    def connections(self) -> frozenset[_Connection]:
        """Connections past accept (and TLS handshake) speaking HTTP."""
        return frozenset(self._conns)

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        self.ssl_context = ssl_context
        self._listener = await self.loop.create_server(
            lambda: _Gate(self), host, port, reuse_address=True, backlog=BACKLOG
        )
        port_bound: int = self._listener.sockets[0].getsockname()[1]
        return port_bound

    def replace_ssl_context(self, context: ssl.SSLContext) -> None:
        """TLS handshakes that start from now on use ``context`` (a certificate reload);
        connections already past their handshake, and handshakes under way, keep the session
        they have. Only a server started with TLS can be given a new context."""
        if self.ssl_context is None:
            raise RuntimeError("the API server was started without TLS")
        self.ssl_context = context

    # --- admission ----------------------------------------------------------------------------

    def _sample_fds(self) -> None:
        now = self.loop.time()
        if now - self._fd_sampled_at < FD_SAMPLE_SECONDS:
            return
        self._fd_sampled_at = now
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_soft = None if soft == resource.RLIM_INFINITY else soft
        try:
            in_use = len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own descriptor
        except OSError:
            in_use = 0  # no /proc: the socket-number check alone
        self._fd_elsewhere = max(0, in_use - self._open - 1)  # the new socket is open already

    def _admit(self, transport: asyncio.Transport) -> bool:
        reason = None
        if self._closing:
            reason = "closing"
        elif self._open >= self.max_connections:
            reason = "max_connections"
        else:
            self._sample_fds()
            if self._fd_soft is not None:
                ceiling = self._fd_soft - self.fd_reserve
                sock = transport.get_extra_info("socket")
                fd = sock.fileno() if sock is not None else -1
                if fd + 1 > ceiling or self._fd_elsewhere + self._open + 1 > ceiling:
                    reason = "fd_reserve"
        if reason is None:
            self._open += 1
            return True
        self._refused(reason)
        return False

    def _refused(self, reason: str) -> None:
        self.refused_connections += 1
        self.api.metrics.refused_connections.inc((reason,))
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                log.exception("api_refusal_hook_failed")
        self._refusals_unlogged += 1
        now = self.loop.time()
        if now >= self._next_refusal_log:
            log.warning(
                "api_connections_refused count=%d reason=%s open=%d max_connections=%d "
                "fd_soft_limit=%s fd_reserve=%d",
                self._refusals_unlogged,
                reason,
                self._open,
                self.max_connections,
                self._fd_soft,
                self.fd_reserve,
            )
            self._refusals_unlogged = 0
            self._next_refusal_log = now + REFUSAL_LOG_SECONDS

    def _new_connection(self) -> _Connection:
        conn = _Connection(
            self,
            keepalive_timeout=self.keepalive_timeout,
            access_log=None,
            max_line_size=MAX_TARGET_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            lingering_time=LINGER_SECONDS,
            auto_decompress=False,
        )
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """``conn``'s socket is closed (or being closed): it no longer counts. Idempotent."""
        if not conn._released:
            conn._released = True
            self._conns.discard(conn)
            self._open -= 1

    def _start_tls(self, transport: asyncio.Transport, conn: _Connection, gate: _Gate) -> asyncio.Task[None]:
        task = self.loop.create_task(self._handshake(transport, conn, gate))
        self._handshakes.add(task)
        task.add_done_callback(lambda t: self._handshake_done(t, transport, conn))
        return task

    async def _handshake(self, transport: asyncio.Transport, conn: _Connection, gate: _Gate) -> None:
        assert self.ssl_context is not None
        transport.pause_reading()
        early = gate.take_early()
        if early:
            # Runs before start_tls's own callbacks (it schedules them below): the TLS protocol
            # gets the early bytes before its connection_made starts the handshake, and reading
            # resumes only after both.
            self.loop.call_soon(_feed, transport, early)
        tls = await self.loop.start_tls(
            transport,
            _Reader(conn, self.read_buffer),
            self.ssl_context,
            server_side=True,
            ssl_handshake_timeout=self.handshake_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_SECONDS,
        )
        assert tls is not None
        # in the same step as the handshake's completion: before the first application data
        conn.connection_made(tls)

    def _handshake_done(
        self, task: asyncio.Task[None], transport: asyncio.Transport, conn: _Connection
    ) -> None:
        self._handshakes.discard(task)
        failed = task.cancelled() or task.exception() is not None
        if failed:
            if not task.cancelled():
                log.debug("api_tls_handshake_failed error=%s", type(task.exception()).__name__)
            transport.abort()
            self._release(conn)

    # --- requests -----------------------------------------------------------------------------

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        version = message.version
        if version is HttpVersion11 or (version == HttpVersion10 and message is not ERROR):
            return web.BaseRequest(message, payload, protocol, writer, task, self.loop)
        # Answer anything else (a parse error, HTTP/2.0, HTTP/0.9) with an HTTP/1.1 status line.
        if message is ERROR:
            return web.BaseRequest(
                message._replace(version=HttpVersion11), payload, protocol, writer, task, self.loop
            )
        request = _UnsupportedVersion(
            message._replace(version=HttpVersion11), payload, protocol, writer, task, self.loop
        )
        request.sent_version = f"HTTP/{version.major}.{version.minor}"
        return request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        api = self.api
        try:
            refusal = self._check_head(request)
            if refusal is not None:
                return response(api.rejected(request.method, refusal), close=True)
            rel = request.rel_url
            path = rel.raw_path
            query = rel.raw_query_string
            headers = request.headers
            authorization = headers.get("Authorization")
            client = request.remote or "unknown"
            body = b""
            if request.body_exists:
                length = request.content_length
                if length is not None and length > MAX_BODY_BYTES:
                    return response(
                        api.rejected(request.method, PayloadTooLarge(TOO_LARGE_MESSAGE)), close=True
                    )
                if request.version is HttpVersion11 and headers.get("Expect", "").lower() == "100-continue":
                    early = api.precheck(request.method, path, authorization, client)
                    if early is not None:
                        return response(early, close=True)
                    await request.writer.write(_CONTINUE)
                    request.writer.output_size = 0  # the answer proper has not started
                read = await self._read_body(request)
                if isinstance(read, ApiError):
                    return response(api.rejected(request.method, read), close=True)
                body = read
            reply = await api.handle(request.method, path, query, body, authorization, client)
            if reply.stream is not None:
                return await self._stream(request, reply, reply.stream)
            return answer(request, reply, close=self._closing)
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client is gone: aiohttp drops the connection
        except Exception:  # Api.handle does not raise; a bug here still gets an envelope
            log.exception("api_server_error method=%s", request.method)
            return response(api.rejected(request.method, InternalError()), close=True)

    async def _stream(self, request: web.BaseRequest, reply: Reply, stream: BodyStream) -> web.StreamResponse:
        """Write a streamed body (see the module docstring); ``stream`` is closed in every case."""
        sent = 0
        try:
            streamed = web.StreamResponse(status=reply.status, headers=headers_of(reply))
            streamed.content_length = stream.size
            if self._closing:
                streamed.force_close()
            await streamed.prepare(request)
            if request.method != "HEAD":
                async for piece in stream.chunks():
                    await streamed.write(piece)  # waits only when the transport is over its limit
                    sent += len(piece)
                    await asyncio.sleep(0)  # one piece per loop step, however fast the client
            if sent != stream.size and request.method != "HEAD":
                raise ValueError(f"the stream ended after {sent} of {stream.size} bytes")
            await streamed.write_eof()
            return streamed
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream failed, or the client is gone
            if not isinstance(exc, ConnectionError):
                log.warning(
                    "api_stream_aborted sent=%d size=%d error=%s", sent, stream.size, type(exc).__name__
                )
            transport = request.transport
            if transport is not None:
                transport.abort()  # nothing more is sent: the client sees the body cut short
            raise ConnectionResetError("the streamed body failed") from exc
        finally:
            stream.close()

    def _check_head(self, request: web.BaseRequest) -> ApiError | None:
        if isinstance(request, _UnsupportedVersion):
            return BadRequest(
                f"{request.sent_version} is not supported; use HTTP/1.1", code="unsupported_http_version"
            )
        hosts = request.headers.getall("Host", ())
        if len(hosts) > 1 or (not hosts and request.version is HttpVersion11):
            return BadRequest("exactly one Host header is required", code="bad_host")
        return None

    async def _read_body(self, request: web.BaseRequest) -> bytes | ApiError:
        content = request.content
        if content.is_eof():  # the usual case: the whole body came with the head
            try:
                body = content.read_nowait(-1)
            except RequestPayloadError:
                return BadRequest("malformed request body")
            if cast(_Connection, request.protocol).body_refused:
                return BadRequest("malformed request body")
            return PayloadTooLarge(TOO_LARGE_MESSAGE) if len(body) > MAX_BODY_BYTES else body
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        return PayloadTooLarge(TOO_LARGE_MESSAGE)
                    chunks.append(chunk)
        except TimeoutError:
            return ApiError(408, "request_timeout", "the request body did not arrive in time")
        except RequestPayloadError:  # the body's framing or coding was refused while reading
            return BadRequest("malformed request body")
        if cast(_Connection, request.protocol).body_refused:
            return BadRequest("malformed request body")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # --- shutdown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting, drop handshakes and idle connections, let answers in flight finish
        (bounded by ``shutdown_grace``), then close the rest; returns within
        ``2 * shutdown_grace + 0.7`` seconds (4.7 s by default: inside the daemon's 5 s)."""
        self._closing = True
        deadline = self.loop.time() + 2 * self.shutdown_grace + 0.5
        if self._listener is not None:
            self._listener.close()
        for task in list(self._handshakes):
            task.cancel()
        self.web_server.pre_shutdown()  # idle keep-alive connections close now
        try:
            # aiohttp waits up to the grace for the answer in flight, then as long again for
            # its connection task after cancelling the request
            async with asyncio.timeout_at(deadline):
                await self.web_server.shutdown(self.shutdown_grace)
        except TimeoutError:
            log.warning("api_shutdown_timeout connections=%d", len(self._conns))
        for conn in list(self._conns):
            conn.force_close()
        if self._handshakes:
            await asyncio.wait(list(self._handshakes), timeout=0.1)
        if self._listener is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._listener.wait_closed()
