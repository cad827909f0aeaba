"""The join channel (``quorumd-join/1``): the bootstrap of a node that is not a member yet.

The client (``join_call``) pins the server by the fingerprint carried in its join token, proves
it holds the key of the (any) self-signed certificate it presents, and sends one request; the
server (``JoinServer``) hands (payload, certificate DER) to the join handler and answers once.
Nothing else happens on this channel, whatever certificate the client presents; frames are at
most ``MAX_JOIN_FRAME_BYTES``.

Anyone can open this channel, so its slots are guarded against strangers who hold them idle. At
most ``MAX_JOIN_CONNECTIONS`` connections hold a slot at a time, at most
``MAX_JOIN_CONNECTIONS_PER_SOURCE`` of them from one source (an IPv4 address, an IPv6 /64). A
joiner sends its request right after the server's ``ACCEPT``, so a slot is *waiting* for about
one round trip, and a connection that sends nothing within ``JOIN_REQUEST_SECONDS`` is closed
(``join_timeout``). When a cap is full, the newest authenticated connection takes the slot of
the oldest one still waiting in that cap's scope (that one is closed: ``join_evicted``); only when
every slot in scope is busy with a request is the newcomer refused (``join_source_limit``,
``join_unavailable``). So idle or trickling strangers cannot keep a real joiner out: to displace
it they would have to complete that many handshakes and proofs within its one round trip, and
from one source they never hold more than the per-source cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
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
MAX_JOIN_CONNECTIONS_PER_SOURCE = 4
JOIN_REQUEST_SECONDS = 2.0  # from ACCEPT to the whole request (capped by the request timeout)

JoinHandler = Callable[[bytes, bytes], Awaitable[bytes]]
Refuse = Callable[..., None]  # ``Peers.refuse``: log and count a refusal, abort the connection


def source_key(host: str) -> str:
    """The source a connection counts against: its IPv4 address (also when IPv4-mapped), its
    IPv6 /64 (one host usually holds a whole /64), else the host string as given."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def source_of(conn: _Conn) -> str:
    """``source_key`` of a connection's peer."""
    host = conn.peer.rpartition(":")[0].strip("[]")
    if conn.transport is not None:
        peername = conn.transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            host = str(peername[0])
    return source_key(host)


class _Slot:
    __slots__ = ("source", "waiting")

    def __init__(self, source: str) -> None:
        self.source = source
        self.waiting = True  # no request received yet: may be displaced by a newer connection


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
        self._request_timeout = min(request_timeout_seconds, JOIN_REQUEST_SECONDS)
        self._handler_timeout = handler_timeout_seconds
        self._write_timeout = write_timeout_seconds
        self.handler: JoinHandler | None = None
        self.refuse: Refuse | None = None  # set by the listener
        self._slots: dict[_Conn, _Slot] = {}  # in the order they were admitted

    def available(self) -> bool:
        """Whether join connections are served at all (a handler is set)."""
        return self.handler is not None

    @property
    def connections(self) -> int:
        """Join connections holding a slot now."""
        return len(self._slots)

    def admit(self, conn: _Conn) -> str | None:
        """Give an authenticated join connection a slot, displacing the oldest waiting one in the
        scope of a full cap (closed as ``join_evicted``); the refusal reason when none can go."""
        source = source_of(conn)
        same = [c for c, s in self._slots.items() if s.source == source]
        scope: list[_Conn] = []
        reason = ""
        if len(same) >= MAX_JOIN_CONNECTIONS_PER_SOURCE:
            scope, reason = same, "join_source_limit"
        elif len(self._slots) >= MAX_JOIN_CONNECTIONS:
            scope, reason = list(self._slots), "join_unavailable"
        if scope:
            victim = next((c for c in scope if self._slots[c].waiting), None)
            if victim is None:
                return reason
            del self._slots[victim]
            if self.refuse is not None:
                self.refuse("join_evicted", victim, victim.fingerprint, detail=f"displaced_by={conn.peer}")
            else:
                victim.abort()
        self._slots[conn] = _Slot(source)
        return None

    async def serve(self, conn: _Conn) -> None:
        """Read the request from an admitted join connection, answer it, close."""
        handler = self.handler
        assert handler is not None
        cert_der = conn.join_cert_der
        try:
            slot = self._slots.get(conn)
            if slot is None or conn.lost:
                conn.abort()
                return
            try:
                async with asyncio.timeout(self._request_timeout):
                    frame = await conn.read_frame()
            except TimeoutError:
                if self.refuse is not None:
                    self.refuse("join_timeout", conn, conn.fingerprint, detail="no join request in time")
                conn.abort()
                return
            if conn.lost or self._slots.get(conn) is not slot:  # displaced meanwhile
                conn.abort()
                return
            slot.waiting = False
            _, payload = _unpack(frame, (FrameKind.JOIN_REQUEST,), 2)
            if type(payload) is not bytes:
                raise _Malformed("join payload must be bytes")
            conn.use_handler(_on_unexpected_frame)  # one request: a later frame closes the connection
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
            conn.close()
        except _Malformed as exc:
            conn.malformed(str(exc))
        except (TimeoutError, ConnectionResetError):
            conn.abort()
        finally:
            self._slots.pop(conn, None)


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
