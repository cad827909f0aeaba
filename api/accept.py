"""What happens to an API socket before aiohttp's protocol sees it.

``_Gate`` is the protocol of a just-accepted socket: the server admits it (connection cap and
descriptor reserve, checked before any TLS work) or closes it at once, then hands it to a
``_Connection`` or starts TLS for one. ``_Reader`` is the buffered front every connection reads
through, and ``_feed`` hands bytes read early to the TLS protocol.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .server import ApiServer, _Connection

MAX_EARLY_BYTES = 64 * 1024  # bytes a TLS client may send before its handshake starts


class _Reader(asyncio.BufferedProtocol):
    """What the transport talks to for a ``_Connection``: a buffered protocol, so that the loop
    reads (and uvloop's TLS layer decrypts) into the server's one read buffer, whose bytes
    ``buffer_updated`` copies out at once. uvloop only reads into a protocol's buffer when the
    protocol is not an ``asyncio.Protocol``, which aiohttp's is; given one, its TLS layer allocates
    256 KiB per read instead (measured: two page faults and ~50 us of CPU per request)."""

    __slots__ = ("_buffer", "_conn")

    def __init__(self, conn: _Connection, buffer: memoryview) -> None:
        self._conn = conn
        self._buffer = buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._conn.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        self._conn.eof_received()  # aiohttp's: nothing to do, the transport closes
        return None


class _Gate(asyncio.Protocol):
    """The protocol of a just-accepted socket: admits it or closes it at once, then hands it to
    a ``_Connection`` (plain) or starts TLS for one.

    uvloop starts reading right after ``connection_made`` (a pause requested there is lost), so
    the first bytes of a TLS client can reach the gate before the handshake task runs: the gate
    keeps them (at most ``MAX_EARLY_BYTES``, then reading pauses) for the TLS protocol."""

    __slots__ = ("_early", "_handshake", "_owner", "_transport")

    def __init__(self, owner: ApiServer) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self._owner
        tcp = cast(asyncio.Transport, transport)
        if not owner._admit(tcp):
            tcp.abort()
            return
        conn = owner._new_connection()
        if owner.ssl_context is None:
            tcp.set_protocol(_Reader(conn, owner.read_buffer))
            conn.connection_made(tcp)
            return
        self._transport = tcp
        tcp.pause_reading()  # effective on asyncio's loop; see the class docstring for uvloop
        self._handshake = owner._start_tls(tcp, conn, self)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._early.append(data)
        self._transport.pause_reading()
        if sum(map(len, self._early)) > MAX_EARLY_BYTES:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost cancels the handshake

    def take_early(self) -> bytes:
        early, self._early = b"".join(self._early), []
        return early

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached while the gate still owns the transport: the handshake task never ran.
        if self._handshake is not None:
            self._handshake.cancel()


def _feed(transport: asyncio.Transport, data: bytes) -> None:
    """Hand ``data`` to the transport's (TLS) protocol as if it had just been read."""
    if transport.is_closing():
        return
    protocol = transport.get_protocol()
    view = memoryview(data)
    while view:
        if isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(view))
            return
        buffered = cast(asyncio.BufferedProtocol, protocol)
        buffer = memoryview(buffered.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        buffered.buffer_updated(n)
        view = view[n:]
