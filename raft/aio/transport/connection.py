"""One framed connection: ``_Conn``, a length-prefixed frame stream over one (TLS) transport.

Every channel's connections, in both directions, are ``_Conn`` objects; what a frame means is up
to the handler its channel installs. Losing the connection fails its pending RPC calls
(``RpcUnreachable``) and cancels the handler tasks it owns. With ``stall_seconds`` set, a connection
whose writes stay paused (the peer stopped reading) that long is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from .errors import RpcUnreachable
from .framing import _HEADER, MAX_AUTH_FRAME_BYTES
from .stats import TransportStats

log = logging.getLogger(__name__)

_READ_BUFFER_BYTES = 64 * 1024  # a connection's read buffer (grown for a larger frame)
_MIN_READ_BYTES = 16 * 1024  # grow the buffer when less than this is free for the next read

FrameHandler = Callable[["_Conn", bytes], None]


class _Conn(asyncio.BufferedProtocol):
    """A length-prefixed frame stream over one (TLS) transport.

    Frames are dispatched from ``buffer_updated`` to a handler, or queued for ``read_frame``
    (the inbox, used during authentication and on the join channel).

    A buffered protocol: the event loop decrypts straight into this connection's read buffer.
    With a plain ``Protocol`` uvloop's TLS layer allocates a 256 KiB object per read: an mmap,
    mremap and munmap each time until the allocator raises its mmap threshold (a two-process
    TLS ping-pong on this machine: 104 us round trip as a ``Protocol``, 44 us buffered).
    The buffer grows to hold a whole frame when one is larger than a read (bounded by
    ``max_frame``) and shrinks back once it is consumed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: TransportStats | None, channel: str) -> None:
        self.loop = loop
        self.stats = stats
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.node_id = 0
        self.fingerprint = ""  # the peer's (proven) certificate
        self.local_fingerprint = ""  # this node's certificate on this connection
        self.outbound = False  # dialed by this node
        self.retiring = False  # its pin is gone: no new call on it, closed once idle (Peers.retire)
        self.join_cert_der = b""
        self.max_frame = MAX_AUTH_FRAME_BYTES
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_lost: Callable[[_Conn], None] | None = None
        self.rpc_pending: dict[int, asyncio.Future[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._buf = bytearray(_READ_BUFFER_BYTES)
        self._len = 0  # bytes received and not yet parsed, at the start of _buf
        self._handler: FrameHandler | None = None
        self._inbox: deque[bytes] | None = None
        self._inbox_waiter: asyncio.Future[None] | None = None
        self.paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.stall_seconds: float | None = None  # writes backed up this long: the connection is aborted
        self._stall_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"

    def get_buffer(self, sizehint: int) -> memoryview:
        buf, used = self._buf, self._len
        missing = 0  # of the frame at the head of the buffer, when its header is in
        if used >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, 0)
            if size <= self.max_frame:
                missing = _HEADER.size + size - used
        if len(buf) - used < max(missing, _MIN_READ_BYTES):
            # A new buffer rather than a resize: the loop may still hold a view of the old one.
            grown = bytearray(used + max(missing, _READ_BUFFER_BYTES))
            grown[:used] = memoryview(buf)[:used]
            self._buf = buf = grown
        return memoryview(buf)[used:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.lost:
            return
        self._len += nbytes
        if self._handler is not None or self._inbox is not None:
            self._parse()
        elif self._len > self.max_frame + _HEADER.size:
            self.malformed("unauthenticated data over limit")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._buf, self._len = bytearray(), 0
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if not self.closed.done():
            self.closed.set_result(None)
        for waiter in (self._inbox_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        pending, self.rpc_pending = self.rpc_pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RpcUnreachable("connection lost"))
        for task in self.tasks:
            task.cancel()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.paused = True
        if self.stall_seconds is not None and self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.stall_seconds, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # reading
    def _parse(self) -> None:
        buf = self._buf
        end = self._len
        if end > _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, 0)
            if end == _HEADER.size + size and size <= self.max_frame:
                # exactly one whole frame, the usual case for a request or an answer
                frame = bytes(memoryview(buf)[_HEADER.size : end])
                self._len = 0
                if len(buf) > _READ_BUFFER_BYTES:
                    self._buf = bytearray(_READ_BUFFER_BYTES)
                self._deliver(frame)
                return
        off = 0
        frames: list[bytes] = []
        with memoryview(buf) as view:
            while end - off >= _HEADER.size:
                (size,) = _HEADER.unpack_from(view, off)
                if size > self.max_frame:
                    frames.clear()
                    off = -1
                    break
                stop = off + _HEADER.size + size
                if stop > end:
                    break
                frames.append(bytes(view[off + _HEADER.size : stop]))
                off = stop
        if off < 0:
            self.malformed("frame length over limit")
            return
        if off:
            rest = end - off
            if len(buf) > _READ_BUFFER_BYTES and rest <= _READ_BUFFER_BYTES // 2:
                self._buf = bytearray(_READ_BUFFER_BYTES)  # a large frame has gone: give it back
            if rest:
                self._buf[:rest] = buf[off:end]  # same length: no resize under the loop's view
            self._len = rest
        for frame in frames:
            if self.lost:
                return
            self._deliver(frame)

    def _deliver(self, frame: bytes) -> None:
        if self._handler is not None:
            self._handler(self, frame)
        elif self._inbox is not None:
            self._inbox.append(frame)
            if self._inbox_waiter is not None and not self._inbox_waiter.done():
                self._inbox_waiter.set_result(None)

    def use_inbox(self) -> None:
        self._inbox = deque()
        self._parse()

    def use_handler(self, handler: FrameHandler) -> None:
        """Dispatch frames to ``handler`` from now on, starting with any already queued."""
        queued, self._inbox = self._inbox, None
        self._handler = handler
        while queued and not self.lost:
            handler(self, queued.popleft())
        if not self.lost:
            self._parse()

    async def read_frame(self) -> bytes:
        """The next inbox frame; ConnectionResetError once the connection is gone."""
        assert self._inbox is not None
        while not self._inbox:
            if self.lost:
                raise ConnectionResetError("connection closed by peer")
            self._inbox_waiter = self.loop.create_future()
            await self._inbox_waiter
        return self._inbox.popleft()

    # writing
    def write_frames(self, frames: Sequence[bytes]) -> bool:
        t = self.transport
        if self.lost or t is None or t.is_closing():
            return False
        if len(frames) == 1:
            frame = frames[0]
            t.write(_HEADER.pack(len(frame)) + frame)
            return True
        parts: list[bytes] = []
        for frame in frames:
            parts.append(_HEADER.pack(len(frame)))
            parts.append(frame)
        t.write(b"".join(parts))
        return True

    async def drain(self) -> None:
        while self.paused and not self.lost:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
        if self.lost:
            raise ConnectionResetError("connection lost")

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.paused and not self.lost:
            log.warning("peer_stalled channel=%s peer=%s node=%d", self.channel, self.peer, self.node_id)
            self.abort()

    def malformed(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.malformed_frames += 1
        log.warning(
            "malformed_frame channel=%s peer=%s node=%d reason=%s",
            self.channel,
            self.peer,
            self.node_id,
            reason,
        )
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()


def _on_unexpected_frame(conn: _Conn, frame: bytes) -> None:
    """The handler of a connection that only sends (an outgoing Raft channel, a finished join)."""
    conn.malformed("frame on a send-only connection")
