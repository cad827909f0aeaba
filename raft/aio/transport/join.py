"""The join channel (``quorumd-join/1``): the bootstrap of a node that is not a member yet.

The client (``join_call``) pins the server by the fingerprint carried in its join token, proves
it holds the key of the (any) self-signed certificate it presents, and sends one request; the
server (``JoinServer``) hands (payload, certificate DER) to the join handler and answers once.
Nothing else happens on this channel, whatever certificate the client presents; frames are at
most ``MAX_JOIN_FRAME_BYTES`` and at most ``MAX_JOIN_CONNECTIONS`` are served at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from ...codec import packb
from .connection import _Conn, _on_unexpected_frame
from .errors import JoinPinMismatch, JoinRemoteError, JoinTimeout, JoinUnreachable, _Malformed
from .framing import MAX_JOIN_FRAME_BYTES, FrameKind, _unpack, split_host_port
from .identity import _load_cert_der, _load_key, cert_fingerprint
from .stats import TransportStats
from .tls import ALPN_JOIN, _client_context, _client_prove, _tls_facts

log = logging.getLogger(__name__)

MAX_JOIN_CONNECTIONS = 16

JoinHandler = Callable[[bytes, bytes], Awaitable[bytes]]


class JoinServer:
    """The server side: one request per authenticated join connection, answered by the handler."""

    def __init__(
        self,
        stats: TransportStats,
        *,
        request_timeout_seconds: float,
        handler_timeout_seconds: float,
        write_timeout_seconds: float,
    ) -> None:
        self._stats = stats
        self._request_timeout = request_timeout_seconds
        self._handler_timeout = handler_timeout_seconds
        self._write_timeout = write_timeout_seconds
        self.handler: JoinHandler | None = None
        self._connections = 0

    def available(self) -> bool:
        """Whether a new join connection may be served (a handler is set, and there is room)."""
        return self.handler is not None and self._connections < MAX_JOIN_CONNECTIONS

    async def serve(self, conn: _Conn) -> None:
        """Read the request from an authenticated join connection, answer it, close."""
        handler = self.handler
        assert handler is not None
        cert_der = conn.join_cert_der
        self._connections += 1
        try:
            async with asyncio.timeout(self._request_timeout):
                frame = await conn.read_frame()
            _, payload = _unpack(frame, (FrameKind.JOIN_REQUEST,), 2)
            if type(payload) is not bytes:
                raise _Malformed("join payload must be bytes")
            self._stats.join_requests += 1
            log.info("join_request peer=%s fingerprint=%s", conn.peer, conn.fingerprint)
            try:
                async with asyncio.timeout(self._handler_timeout):
                    reply = await handler(payload, cert_der)
                out = packb([FrameKind.JOIN_RESPONSE, reply])
            except TimeoutError:
                out = packb([FrameKind.JOIN_ERROR, "join handler timed out"])
            except Exception as exc:  # reported to the joiner, never fatal here
                log.warning("join_handler_failed peer=%s error=%s", conn.peer, type(exc).__name__)
                out = packb([FrameKind.JOIN_ERROR, str(exc) or type(exc).__name__])
            conn.write_frames([out])
            async with asyncio.timeout(self._write_timeout):
                await conn.drain()
            conn.use_handler(_on_unexpected_frame)
            conn.close()
        except _Malformed as exc:
            conn.malformed(str(exc))
        except (TimeoutError, ConnectionResetError):
            conn.abort()
        finally:
            self._connections -= 1


async def join_call(
    address: str,
    expected_fingerprint: str,
    payload: bytes,
    client_cert_pem: bytes,
    client_key_pem: bytes,
    timeout: float = 10.0,
) -> bytes:
    """Send one join request to ``address`` and return the server's reply.

    The server's certificate must have ``expected_fingerprint`` (from the join token), checked
    right after the TLS handshake and before anything is sent (JoinPinMismatch). The client
    proves possession of ``client_key_pem`` for ``client_cert_pem``, which the server's join
    handler receives. Errors: JoinUnreachable, JoinTimeout, JoinRemoteError.
    """
    loop = asyncio.get_running_loop()
    cert_der = _load_cert_der(client_cert_pem)
    key = _load_key(client_key_pem)
    host, port = split_host_port(address)
    conn = _Conn(loop, None, ALPN_JOIN)
    conn.peer = address
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.create_connection(
                    lambda: conn, host, port, ssl=_client_context(ALPN_JOIN), ssl_handshake_timeout=timeout
                )
            except OSError as exc:
                raise JoinUnreachable(f"{address}: {type(exc).__name__}: {exc}") from exc
            selected, der = _tls_facts(conn)
            fp = cert_fingerprint(der) if der else "none"
            if not hmac.compare_digest(fp.encode(), expected_fingerprint.encode()):
                # Close cleanly (not abort): the server then sees a client that left without
                # proving anything and logs and counts it (``no_proof``); a reset would look
                # like a TCP probe to it.
                conn.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(conn.closed)
                raise JoinPinMismatch(f"{address} presented {fp}, the join token pins {expected_fingerprint}")
            if selected != ALPN_JOIN:
                raise JoinUnreachable(f"{address} does not serve the join channel")
            await _client_prove(conn, ALPN_JOIN, fp, cert_der, key)
            conn.max_frame = MAX_JOIN_FRAME_BYTES
            conn.write_frames([packb([FrameKind.JOIN_REQUEST, payload])])
            await conn.drain()
            frame = await conn.read_frame()
    except TimeoutError as exc:
        raise JoinTimeout(f"{address}: no join answer within {timeout:g}s") from exc
    except ConnectionResetError as exc:
        raise JoinUnreachable(f"{address}: connection closed: {exc}") from exc
    finally:
        conn.abort()
    try:
        kind, body = _unpack(frame, (FrameKind.JOIN_RESPONSE, FrameKind.JOIN_ERROR), 2)
    except _Malformed as exc:
        raise JoinRemoteError(f"{address}: malformed join reply") from exc
    if kind == FrameKind.JOIN_ERROR:
        raise JoinRemoteError(str(body))
    if type(body) is not bytes:
        raise JoinRemoteError(f"{address}: malformed join reply")
    return body
