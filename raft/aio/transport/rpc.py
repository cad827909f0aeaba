"""The RPC channel (``quorumd-rpc/1``): request/response calls between members.

Concurrent calls to one member are multiplexed over one connection per peer by request id
(``[kind, request id, method, payload]``); server handlers run as tasks owned by their
connection, at most ``MAX_RPC_INFLIGHT_PER_CONNECTION`` at a time. A caller sees
``RpcUnreachable``, ``RpcTimeout`` or ``RpcRemoteError``. A connection whose writes stay backed up
for the write timeout (the peer reads neither requests nor answers) is aborted, either direction
(``_Conn.stall_seconds``): the calls on it fail and the next call dials again.

Deadlines, both sides, are checked by one sweep every ``RPC_SWEEP_SECONDS`` while any is pending:
the calls' futures and the handlers' tasks. A timer per call (or an ``asyncio.timeout`` context)
costs several microseconds on the path every forwarded API call takes, twice; a dict entry costs
next to nothing. Deadlines fire up to one sweep late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ...codec import packb
from .connection import _Conn
from .errors import RpcError, RpcRemoteError, RpcTimeout, RpcUnreachable, _DialError, _Malformed
from .framing import MAX_FRAME_BYTES, FrameKind, _unpack
from .peers import Peers
from .tls import ALPN_RPC

log = logging.getLogger(__name__)

MAX_RPC_INFLIGHT_PER_CONNECTION = 256
RPC_SWEEP_SECONDS = 0.05  # how often pending RPC deadlines are checked (both sides)

RpcHandler = Callable[[int, bytes], Awaitable[bytes]]


class _RpcPeer:
    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.lock = asyncio.Lock()


class RpcChannel:
    """Calls to members and the handlers that serve theirs."""

    def __init__(self, peers: Peers, *, handler_timeout_seconds: float, write_timeout_seconds: float) -> None:
        self._peers = peers
        self._handler_timeout = handler_timeout_seconds
        self._write_timeout = write_timeout_seconds
        self._handlers: dict[str, RpcHandler] = {}
        self.outgoing: dict[int, _RpcPeer] = {}
        self._next_request_id = 0
        self._calls_due: dict[asyncio.Future[bytes], float] = {}
        self._handlers_due: dict[asyncio.Task[None], float] = {}
        self._overdue: set[asyncio.Task[None]] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None

    def register(self, method: str, handler: RpcHandler) -> None:
        self._handlers[method] = handler

    def forget(self, node_id: int) -> None:
        """An unpinned member: its next call dials again (and is refused)."""
        self.outgoing.pop(node_id, None)

    def abort_connection(self, node_id: int) -> None:
        """Drop the connection to ``node_id`` (its address changed): the next call dials again."""
        peer = self.outgoing.get(node_id)
        if peer is not None and peer.conn is not None:
            peer.conn.abort()  # lost only on a later turn of the loop: no call may pick it meanwhile
            peer.conn = None

    def close(self) -> None:
        self.outgoing.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    # --- calling ---------------------------------------------------------------------------
    async def call(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        """Call ``method`` on member ``node_id``: RpcUnreachable, RpcTimeout or RpcRemoteError."""
        peers = self._peers
        loop = peers.loop
        if loop is None:
            raise RpcUnreachable("cluster transport not started")
        peers.stats.rpc_calls += 1
        deadline = loop.time() + timeout
        try:
            peer = self.outgoing.get(node_id)
            conn = peer.conn if peer is not None else None
            if conn is None or conn.lost or conn.retiring or peers.closing or node_id not in peers.pins:
                conn = await self._connection(node_id, deadline)  # checks, dials when needed
            self._next_request_id += 1
            request_id = self._next_request_id
            frame = packb([FrameKind.RPC_REQUEST, request_id, method, payload])
            if len(frame) > MAX_FRAME_BYTES:
                raise RpcRemoteError("request over the frame limit")
            fut: asyncio.Future[bytes] = loop.create_future()
            conn.rpc_pending[request_id] = fut
            self._calls_due[fut] = deadline  # the sweep fails the future with TimeoutError
            if self._sweep_handle is None:
                self._arm_sweep()
            try:
                if not conn.write_frames([frame]):
                    raise RpcUnreachable(f"connection to node {node_id} lost")
                if conn.paused:
                    async with asyncio.timeout_at(deadline):
                        await conn.drain()
                return await fut
            except TimeoutError:
                raise RpcTimeout(f"node {node_id} did not answer {method} within {timeout:g}s") from None
            except ConnectionResetError:
                raise RpcUnreachable(f"connection to node {node_id} lost") from None
            finally:
                del self._calls_due[fut]
                conn.rpc_pending.pop(request_id, None)
        except RpcError:
            peers.stats.rpc_failures += 1
            raise

    async def call_at(self, address: str, method: str, payload: bytes, timeout: float) -> tuple[int, bytes]:
        """Call ``method`` on whichever pinned member answers at ``address`` (its certificate
        names it) over a connection of its own, closed after the answer: (node id, answer).
        For finding members whose address this node does not know. RpcUnreachable,
        RpcTimeout or RpcRemoteError."""
        peers = self._peers
        if peers.loop is None:
            raise RpcUnreachable("cluster transport not started")
        peers.stats.rpc_calls += 1
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(timeout):
                try:
                    conn = await peers.dial_address(address, ALPN_RPC, None)
                except _DialError as exc:
                    raise RpcUnreachable(f"{address}: {exc}") from None
                conn.stall_seconds = self._write_timeout
                conn.use_handler(self._on_response)
                self._next_request_id += 1
                request_id = self._next_request_id
                fut: asyncio.Future[bytes] = peers.loop.create_future()
                conn.rpc_pending[request_id] = fut
                if not conn.write_frames([packb([FrameKind.RPC_REQUEST, request_id, method, payload])]):
                    raise RpcUnreachable(f"connection to {address} lost")
                return conn.node_id, await fut
        except TimeoutError:
            peers.stats.rpc_failures += 1
            raise RpcTimeout(f"{address} did not answer {method} within {timeout:g}s") from None
        except RpcError:
            peers.stats.rpc_failures += 1
            raise
        finally:
            if conn is not None:
                conn.close()

    def _arm_sweep(self) -> None:
        assert self._peers.loop is not None
        self._sweep_handle = self._peers.loop.call_later(RPC_SWEEP_SECONDS, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep_handle = None
        assert self._peers.loop is not None
        now = self._peers.loop.time()
        for fut, deadline in list(self._calls_due.items()):
            if deadline <= now and not fut.done():
                fut.set_exception(TimeoutError())
        for task, deadline in list(self._handlers_due.items()):
            if deadline <= now:
                del self._handlers_due[task]
                self._overdue.add(task)
                task.cancel()
        if (self._calls_due or self._handlers_due) and not self._peers.closing:
            self._arm_sweep()

    async def _connection(self, node_id: int, deadline: float) -> _Conn:
        peers = self._peers
        if peers.closing or node_id not in peers.pins or node_id not in peers.addresses:
            raise RpcUnreachable(f"node {node_id} is not a reachable member")
        peer = self.outgoing.get(node_id)
        if peer is None:
            peer = self.outgoing[node_id] = _RpcPeer()
        conn = peer.conn
        if conn is not None and not conn.lost and not conn.retiring:
            return conn
        try:
            async with asyncio.timeout_at(deadline), peer.lock:
                conn = peer.conn
                if conn is not None and not conn.lost and not conn.retiring:
                    return conn
                conn = await peers.dial(node_id, ALPN_RPC)
                if conn.local_fingerprint != peers.fingerprint:  # switched certificates meanwhile
                    conn.close()
                    conn = await peers.dial(node_id, ALPN_RPC)
        except TimeoutError:
            raise RpcUnreachable(f"could not connect to node {node_id} in time") from None
        except _DialError as exc:
            raise RpcUnreachable(f"node {node_id}: {exc}") from None
        conn.stall_seconds = self._write_timeout
        conn.use_handler(self._on_response)
        if self.outgoing.get(node_id) is peer:
            peer.conn = conn
        return conn

    def _on_response(self, conn: _Conn, frame: bytes) -> None:
        try:
            kind, request_id, _method, body = _unpack(frame, (FrameKind.RPC_RESPONSE, FrameKind.RPC_ERROR), 4)
            if type(request_id) is not int or type(body) is not bytes:
                raise _Malformed("bad response fields")
        except _Malformed as exc:
            conn.malformed(str(exc))
            return
        fut = conn.rpc_pending.pop(request_id, None)
        if fut is None or fut.done():
            return  # the caller gave up already
        if kind == FrameKind.RPC_RESPONSE:
            fut.set_result(body)
        else:
            fut.set_exception(RpcRemoteError(body.decode("utf-8", "replace")))

    # --- serving ---------------------------------------------------------------------------
    def on_request(self, conn: _Conn, frame: bytes) -> None:
        if self._peers.closing or not self._peers.still_pinned(conn):
            conn.abort()
            return
        try:
            _, request_id, method, body = _unpack(frame, (FrameKind.RPC_REQUEST,), 4)
            if type(request_id) is not int or type(method) is not str or type(body) is not bytes:
                raise _Malformed("bad request fields")
        except _Malformed as exc:
            conn.malformed(str(exc))
            return
        conn.stall_seconds = self._write_timeout  # a caller that stops reading answers is dropped
        handler = self._handlers.get(method)
        if handler is None:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, f"unknown method {method!r}".encode())
        elif len(conn.tasks) >= MAX_RPC_INFLIGHT_PER_CONNECTION:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, b"server busy")
        else:
            self._peers.spawn(self._serve(conn, request_id, method, handler, body), conn)

    async def _serve(
        self, conn: _Conn, request_id: int, method: str, handler: RpcHandler, body: bytes
    ) -> None:
        task = asyncio.current_task()
        loop = self._peers.loop
        assert task is not None and loop is not None
        self._handlers_due[task] = loop.time() + self._handler_timeout  # see the module docstring
        if self._sweep_handle is None:
            self._arm_sweep()
        try:
            result = await handler(conn.node_id, body)
            if not isinstance(result, bytes):
                raise TypeError("rpc handler returned non-bytes")
            kind, out = FrameKind.RPC_RESPONSE, result
        except asyncio.CancelledError:
            if task not in self._overdue or conn.lost:
                raise
            task.uncancel()
            kind, out = FrameKind.RPC_ERROR, b"handler timed out"
        except Exception as exc:  # the error travels back to the caller as RpcRemoteError
            log.warning(
                "rpc_handler_failed method=%s node=%d error=%s", method, conn.node_id, type(exc).__name__
            )
            kind, out = FrameKind.RPC_ERROR, (str(exc) or type(exc).__name__).encode()
        finally:
            self._handlers_due.pop(task, None)
            self._overdue.discard(task)
        self._reply(conn, request_id, method, kind, out)
        if not conn.paused:
            return  # the usual case: nothing to wait for (no timeout context per call)
        try:
            async with asyncio.timeout(self._write_timeout):
                await conn.drain()
        except TimeoutError:
            log.warning("rpc_peer_stalled node=%d", conn.node_id)
            conn.abort()
        except ConnectionResetError:
            pass

    def _reply(self, conn: _Conn, request_id: int, method: str, kind: FrameKind, body: bytes) -> None:
        frame = packb([kind, request_id, method, body])
        if len(frame) > MAX_FRAME_BYTES:
            frame = packb([FrameKind.RPC_ERROR, request_id, method, b"response over the frame limit"])
        conn.write_frames([frame])
