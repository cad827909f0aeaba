"""ClusterTransport: the one cluster port (TLS 1.3 only), multiplexed by ALPN into three channels.

- ``quorumd-raft/1``: Raft frames, one direction per connection. Outgoing: one persistent
  connection per peer, dialed lazily on the first ``send`` and redialed with capped exponential
  backoff. ``send`` never blocks: it appends to a bounded per-peer queue (dropping and counting
  when full; Raft tolerates loss) and the peer's writer task writes everything queued in one
  ``write`` then drains once. Incoming frames go to ``on_raft_frame(from_node_id, frame)`` from
  ``buffer_updated``: no task per frame.
- ``quorumd-rpc/1``: request/response between members, concurrent calls multiplexed over one
  connection per peer by request id; server handlers run as tasks owned by their connection.
- ``quorumd-join/1``: the join bootstrap. The client is not a member yet: it pins the server by
  the fingerprint carried in its join token, proves it holds the key of the (any) self-signed
  certificate it presents, and the server hands (payload, certificate DER) to the join handler.
  Nothing else happens on this channel, whatever certificate the client presents.

Authentication (``tls``): TLS 1.3 authenticates the server and encrypts; the client proves its
certificate in-band, and the certificate identity it carries is defined in ``identity``. Contexts
never hold pins, so ``update_pins`` rebuilds nothing: it swaps the maps and closes every live
connection (both directions) of a member whose pin was removed or changed; later connections from
it are refused by the pin check, and every frame is also checked against the current pin before
delivery. Framing and the frame limits: ``framing``; one framed connection: ``connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from ...codec import packb
from .connection import FrameHandler, _Conn, _on_unexpected_frame
from .errors import (
    CertIdentityError,
    JoinError,
    JoinPinMismatch,
    JoinRemoteError,
    JoinTimeout,
    JoinUnreachable,
    RpcError,
    RpcRemoteError,
    RpcTimeout,
    RpcUnreachable,
    TransportError,
    _DialError,
    _Malformed,
)
from .framing import (
    MAX_AUTH_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MAX_JOIN_FRAME_BYTES,
    FrameKind,
    _unpack,
    split_host_port,
)
from .identity import (
    _FINGERPRINT_RE,
    MAX_NODE_ID,
    NONCE_BYTES,
    _load_cert_der,
    _load_key,
    _load_own_identity,
    _proof_message,
    _verify_proof,
    cert_fingerprint,
    cert_identity,
    identity_uri,
    validate_identity,
)
from .stats import TransportStats
from .tls import (
    ALPN_JOIN,
    ALPN_RAFT,
    ALPN_RPC,
    CHANNELS,
    _client_context,
    _client_prove,
    _server_context,
    _tls_facts,
)

log = logging.getLogger(__name__)

UNPIN_GRACE_SECONDS = 2.0  # an unpinned member's in-flight requests may still be answered this long
MAX_PENDING_HANDSHAKES = 256
MAX_JOIN_CONNECTIONS = 16
MAX_RPC_INFLIGHT_PER_CONNECTION = 256
RPC_SWEEP_SECONDS = 0.05  # how often pending RPC deadlines are checked (both sides)

__all__ = [
    "ALPN_JOIN",
    "ALPN_RAFT",
    "ALPN_RPC",
    "CHANNELS",
    "MAX_AUTH_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_JOIN_CONNECTIONS",
    "MAX_JOIN_FRAME_BYTES",
    "MAX_NODE_ID",
    "MAX_PENDING_HANDSHAKES",
    "MAX_RPC_INFLIGHT_PER_CONNECTION",
    "NONCE_BYTES",
    "RPC_SWEEP_SECONDS",
    "UNPIN_GRACE_SECONDS",
    "CertIdentityError",
    "ClusterTransport",
    "FrameHandler",
    "FrameKind",
    "JoinError",
    "JoinHandler",
    "JoinPinMismatch",
    "JoinRemoteError",
    "JoinTimeout",
    "JoinUnreachable",
    "RpcError",
    "RpcHandler",
    "RpcRemoteError",
    "RpcTimeout",
    "RpcUnreachable",
    "TransportError",
    "TransportStats",
    "cert_fingerprint",
    "cert_identity",
    "identity_uri",
    "join_call",
    "split_host_port",
    "validate_identity",
]


# --- per-peer outgoing state -----------------------------------------------------------------
class _RaftPeer:
    __slots__ = ("conn", "failing", "frames", "node_id", "queued_bytes", "redial", "task", "wakeup")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.frames: list[bytes] = []
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.redial = asyncio.Event()  # the peer reached us: stop backing off, dial it now
        self.conn: _Conn | None = None
        self.task: asyncio.Task[None] | None = None
        self.failing = False

    def on_conn_closed(self, _closed: asyncio.Future[None]) -> None:
        self.wakeup.set()


class _RpcPeer:
    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.lock = asyncio.Lock()


RpcHandler = Callable[[int, bytes], Awaitable[bytes]]
JoinHandler = Callable[[bytes, bytes], Awaitable[bytes]]


class ClusterTransport:
    """The cluster port of one node: Raft frames, member RPCs and the join bootstrap."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        cert_pem: bytes,
        key_pem: bytes,
        pins: Mapping[int, str],
        addresses: Mapping[int, str],
        on_raft_frame: Callable[[int, bytes], None],
        *,
        connect_timeout_seconds: float = 5.0,
        write_timeout_seconds: float = 10.0,
        rpc_handler_timeout_seconds: float = 120.0,
        join_handler_timeout_seconds: float = 60.0,
        raft_queue_frames: int = 4096,
        raft_queue_bytes: int = 64 * 1024 * 1024,
        backoff_min_seconds: float = 0.05,
        backoff_max_seconds: float = 2.0,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._cert_der, self._key = _load_own_identity(node_id, cluster_id, cert_pem, key_pem)
        self.fingerprint = cert_fingerprint(self._cert_der)
        self._server_ctx = _server_context(cert_pem, key_pem)
        self._client_ctx = {alpn: _client_context(alpn) for alpn in (ALPN_RAFT, ALPN_RPC)}
        self._on_raft_frame = on_raft_frame
        self._connect_timeout = connect_timeout_seconds
        self._write_timeout = write_timeout_seconds
        self._rpc_handler_timeout = rpc_handler_timeout_seconds
        self._join_handler_timeout = join_handler_timeout_seconds
        self._queue_frames = raft_queue_frames
        self._queue_bytes = raft_queue_bytes
        self._backoff_min = backoff_min_seconds
        self._backoff_max = backoff_max_seconds
        self.stats = TransportStats()
        self._pins: dict[int, str] = {}
        self._addresses: dict[int, str] = {}
        self._fp_to_node: dict[str, int] = {}
        self._set_maps(pins, addresses)
        self._rpc_handlers: dict[str, RpcHandler] = {}
        self._join_handler: JoinHandler | None = None
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._member_conns: dict[int, set[_Conn]] = {}
        self._raft_peers: dict[int, _RaftPeer] = {}
        self._rpc_peers: dict[int, _RpcPeer] = {}
        self._next_request_id = 0
        # RPC deadlines, both sides, checked by one sweep every RPC_SWEEP_SECONDS while any is
        # pending: the calls' futures and the handlers' tasks. A timer per call (or an
        # asyncio.timeout context) costs several microseconds on the path every forwarded API
        # call takes, twice; a dict entry costs next to nothing. Deadlines fire up to one sweep late.
        self._calls_due: dict[asyncio.Future[bytes], float] = {}
        self._handlers_due: dict[asyncio.Task[None], float] = {}
        self._overdue: set[asyncio.Task[None]] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._pending_handshakes = 0
        self._join_connections = 0
        self._closing = False
        self.on_raft_peer_lost: Callable[[int], None] | None = None
        self._random = random.Random(secrets.randbits(64))  # backoff jitter only

    # --- configuration ---------------------------------------------------------------------
    def _set_maps(self, pins: Mapping[int, str], addresses: Mapping[int, str]) -> None:
        for nid, fp in pins.items():
            if not _FINGERPRINT_RE.fullmatch(fp):
                raise ValueError(f"bad fingerprint for node {nid}")
        self._pins = dict(pins)
        self._addresses = dict(addresses)
        self._fp_to_node = {fp: nid for nid, fp in sorted(self._pins.items())}

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        """Serve ``method``: ``handler(from_node_id, payload) -> response payload``."""
        self._rpc_handlers[method] = handler

    def register_join_handler(self, handler: JoinHandler) -> None:
        """Serve the join channel: ``handler(request payload, client certificate DER) -> reply``."""
        self._join_handler = handler

    def update_pins(self, pins: Mapping[int, str], addresses: Mapping[int, str]) -> None:
        """Replace the member pins and addresses.

        A member whose pin is removed or changed has every live connection (both directions)
        closed at once and its queued frames dropped; a member whose address changed has its
        outgoing connections closed so they are redialed at the new address.
        """
        old_pins, old_addresses = self._pins, self._addresses
        self._set_maps(pins, addresses)
        unpinned = sorted(nid for nid, fp in old_pins.items() if self._pins.get(nid) != fp)
        moved = sorted(
            nid
            for nid, addr in old_addresses.items()
            if self._addresses.get(nid) != addr and nid not in unpinned
        )
        for nid in unpinned:
            log.info("peer_unpinned node=%d", nid)
            for conn in list(self._member_conns.pop(nid, ())):
                self._retire(conn)
            self._stop_raft_peer(nid)
            self._rpc_peers.pop(nid, None)
        for nid in moved:
            log.info("peer_address_changed node=%d address=%s", nid, self._addresses.get(nid))
            raft_peer = self._raft_peers.get(nid)
            if raft_peer is not None and raft_peer.conn is not None:
                raft_peer.conn.abort()
            rpc_peer = self._rpc_peers.get(nid)
            if rpc_peer is not None and rpc_peer.conn is not None:
                rpc_peer.conn.abort()
        # A new member gets its Raft channel now, not when there is first something to send: a
        # follower sends nothing to another follower until one of them campaigns, and a dial
        # (TLS handshake and proof, several ms of CPU) then sat inside the election (measured:
        # a drain's vote request reached the third member 12 ms late).
        self.connect_members()

    def _retire(self, conn: _Conn) -> None:
        """Close an unpinned member's connection. It is refused every new frame at once (the pin
        check), but requests it already has in flight get their replies first: the removal that
        unpinned it is typically one of them (a member removing itself through the leader, a
        leader removed after handing over). Closed when those finish, aborted after a grace."""
        pending = [t for t in conn.tasks if not t.done()]
        if not pending or self._loop is None:
            conn.abort()
            return
        left = len(pending)

        def one_done(_t: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                conn.close()  # flushes the replies, then FIN

        for t in pending:
            t.add_done_callback(one_done)
        self._loop.call_later(UNPIN_GRACE_SECONDS, conn.abort)

    def _stop_raft_peer(self, nid: int) -> None:
        peer = self._raft_peers.pop(nid, None)
        if peer is None:
            return
        self.stats.frames_dropped += len(peer.frames)
        peer.frames = []
        if peer.task is not None:
            peer.task.cancel()
        if peer.conn is not None:
            peer.conn.abort()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, bind_address: str) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the bound port."""
        host, port = split_host_port(bind_address)
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve bind address {bind_address!r}")
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._spawn(self._accept_loop(sock))
        bound = int(sock.getsockname()[1])
        log.info("cluster_transport_listening host=%s port=%d fingerprint=%s", host, bound, self.fingerprint)
        self.connect_members()
        return bound

    def connect_members(self) -> None:
        """Open the Raft channel to every pinned member now, before there is anything to send.
        A restarted node thereby tells its peers it is back (their redial backoff toward it is cut
        short, see ``_admit``): the leader's next heartbeat arrives at once instead of after the
        backoff or this node's first election timeout."""
        if self._loop is None or self._closing:
            return
        for nid in self._pins:
            if nid == self.node_id or nid in self._raft_peers or nid not in self._addresses:
                continue
            peer = self._raft_peers[nid] = _RaftPeer(nid)
            peer.task = self._spawn(self._raft_writer(peer))
            peer.wakeup.set()

    async def close(self, timeout_seconds: float = 3.0) -> None:
        """Stop listening, cancel every task, close every connection; bounded by the timeout."""
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        waits: list[asyncio.Future[Any]] = [*self._tasks, *(c.closed for c in conns)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_seconds)
            if pending:
                log.warning("cluster_transport_close_timeout pending=%d", len(pending))
        for conn in conns:
            conn.abort()
        if self._listener is not None:
            self._listener.close()  # after the accept task is gone: no fd closed under the selector
        self._raft_peers.clear()
        self._rpc_peers.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        log.info("cluster_transport_closed")

    def _spawn(self, coro: Coroutine[Any, Any, None], conn: _Conn | None = None) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    def _track(self, conn: _Conn) -> None:
        self._conns.add(conn)
        conn.on_lost = self._forget

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if (
            conn.channel == ALPN_RAFT
            and conn.node_id
            and conn.node_id in self._member_conns
            and not self._closing
            and self.on_raft_peer_lost is not None
        ):
            # An authenticated Raft connection closed (the peer process exited or reset it): a
            # hint for failure detection, never a decision (the engine still needs PreVote to win).
            self.on_raft_peer_lost(conn.node_id)
        members = self._member_conns.get(conn.node_id)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._member_conns[conn.node_id]

    def _admit(self, conn: _Conn, node_id: int, fingerprint: str) -> None:
        conn.node_id, conn.fingerprint = node_id, fingerprint
        conn.max_frame = MAX_FRAME_BYTES
        self._member_conns.setdefault(node_id, set()).add(conn)
        peer = self._raft_peers.get(node_id)
        if peer is not None and peer.failing:
            peer.redial.set()  # a restarted member is back: the leader's heartbeat follows at once

    def _refuse(
        self,
        reason: str,
        conn: _Conn,
        fingerprint: str = "none",
        *,
        detail: str = "",
        level: int = logging.WARNING,
    ) -> None:
        self.stats.count_refused(reason)
        log.log(
            level,
            "peer_refused reason=%s fingerprint=%s channel=%s peer=%s node=%d%s",
            reason,
            fingerprint,
            conn.channel,
            conn.peer,
            conn.node_id,
            f" error={detail}" if detail else "",
        )
        conn.abort()

    def _check_member(self, der: bytes | None, expected_node: int | None) -> tuple[int, str, str | None]:
        """(node id, fingerprint, refusal reason or None) for a peer's certificate."""
        if not der:
            return 0, "none", "no_certificate"
        fp = cert_fingerprint(der)
        nid = self._fp_to_node.get(fp)
        if nid is None:
            return 0, fp, "not_pinned"
        if expected_node is not None and nid != expected_node:
            return nid, fp, "wrong_peer"
        try:
            identity = cert_identity(der)
        except CertIdentityError:
            return nid, fp, "bad_identity"
        if identity != (nid, self.cluster_id):
            return nid, fp, "identity_mismatch"
        return nid, fp, None

    def _still_pinned(self, conn: _Conn) -> bool:
        return self._pins.get(conn.node_id) == conn.fingerprint

    # --- inbound ---------------------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept TCP connections, one handshake task each. ``connect_accepted_socket`` reports a
        failed TLS handshake to us (counted as a refusal); ``create_server(ssl=...)`` would drop it
        silently, and ``start_tls`` after a plain accept races the ClientHello on uvloop."""
        assert self._loop is not None
        while True:
            try:
                sock, addr = await self._loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("cluster_accept_failed error=%s", exc)
                await asyncio.sleep(0.1)
                continue
            self.stats.connections_accepted += 1
            conn = _Conn(self._loop, self.stats, "handshake")
            if isinstance(addr, tuple) and len(addr) >= 2:
                conn.peer = f"{addr[0]}:{addr[1]}"
            if self._pending_handshakes >= MAX_PENDING_HANDSHAKES:
                sock.close()
                self._refuse("overload", conn)
                continue
            self._pending_handshakes += 1
            self._spawn(self._serve_inbound(conn, sock))

    async def _serve_inbound(self, conn: _Conn, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await self._loop.connect_accepted_socket(
                        lambda: conn, sock, ssl=self._server_ctx, ssl_handshake_timeout=self._connect_timeout
                    )
                except ssl.SSLError as exc:  # TLS < 1.3, not TLS at all, ...
                    self._refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    return
                except Exception as exc:  # gone before a TLS hello (a TCP probe): counted, not shouted
                    self._refuse("handshake_aborted", conn, detail=type(exc).__name__, level=logging.DEBUG)
                    return
                self._track(conn)
                ok = await self._authenticate_inbound(conn)
        except TimeoutError:
            self._refuse("timeout", conn)
            return
        finally:
            self._pending_handshakes -= 1
            if conn.transport is None:
                sock.close()
        if ok and conn.channel == ALPN_JOIN:
            await self._serve_join(conn)

    async def _authenticate_inbound(self, conn: _Conn) -> bool:
        alpn, _ = _tls_facts(conn)
        if alpn not in CHANNELS:
            self._refuse("alpn", conn)
            return False
        assert alpn is not None
        conn.channel = alpn
        if alpn == ALPN_JOIN and (
            self._join_handler is None or self._join_connections >= MAX_JOIN_CONNECTIONS
        ):
            self._refuse("join_unavailable", conn)
            return False
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.use_inbox()
        conn.write_frames([packb([FrameKind.CHALLENGE, nonce])])
        try:
            frame = await conn.read_frame()
        except ConnectionResetError:
            if not self._closing:  # e.g. a joiner whose token pins another certificate than ours
                detail = "closed before proving its identity"
                self._refuse("no_proof", conn, detail=detail, level=logging.INFO)
            return False
        try:
            _, cert_der, signature = _unpack(frame, (FrameKind.PROOF,), 3)
            if type(cert_der) is not bytes or type(signature) is not bytes:
                raise _Malformed("proof fields must be bytes")
            _verify_proof(cert_der, signature, _proof_message(alpn, nonce, self.fingerprint))
        except _Malformed as exc:
            self._refuse("bad_proof", conn)
            log.debug("bad_proof peer=%s error=%s", conn.peer, exc)
            return False
        if alpn == ALPN_JOIN:
            conn.fingerprint = cert_fingerprint(cert_der)
            conn.join_cert_der = cert_der
            conn.max_frame = MAX_JOIN_FRAME_BYTES
            conn.write_frames([packb([FrameKind.ACCEPT])])
            return True
        nid, fp, reason = self._check_member(cert_der, None)
        if reason is not None:
            self._refuse(reason, conn, fp)
            return False
        self._admit(conn, nid, fp)
        conn.write_frames([packb([FrameKind.ACCEPT])])
        log.debug("peer_connected direction=in channel=%s node=%d peer=%s", alpn, nid, conn.peer)
        conn.use_handler(self._on_raft_inbound if alpn == ALPN_RAFT else self._on_rpc_request)
        return True

    def _on_raft_inbound(self, conn: _Conn, frame: bytes) -> None:
        if not self._still_pinned(conn):
            conn.abort()
            return
        self.stats.frames_received += 1
        try:
            self._on_raft_frame(conn.node_id, frame)
        except Exception:  # a bug upstream must not take the connection or the node down
            log.exception("raft_frame_callback_failed node=%d", conn.node_id)

    # --- raft outbound ---------------------------------------------------------------------
    def send(self, node_id: int, frame: bytes) -> bool:
        """Queue one Raft frame for ``node_id``; False (and counted) when it is dropped."""
        peer = self._raft_peers.get(node_id)
        if peer is None:
            if (
                self._loop is None
                or self._closing
                or node_id not in self._pins
                or node_id not in self._addresses
            ):
                self.stats.frames_dropped += 1
                return False
            peer = self._raft_peers[node_id] = _RaftPeer(node_id)
            peer.task = self._spawn(self._raft_writer(peer))
        size = len(frame)
        if (
            len(peer.frames) >= self._queue_frames
            or peer.queued_bytes + size > self._queue_bytes
            or size > MAX_FRAME_BYTES
        ):
            self.stats.frames_dropped += 1
            return False
        conn = peer.conn
        if conn is not None and not peer.frames and not conn.paused and conn.write_frames((frame,)):
            # Fast path: connected, nothing queued, socket not backed up. Writing here saves the
            # writer task's wakeup (one loop iteration) on every message of the commit path.
            self.stats.frames_sent += 1
            if conn.paused and not peer.wakeup.is_set():
                peer.wakeup.set()  # the writer watches the drain with its stall timeout
            return True
        peer.frames.append(frame)
        peer.queued_bytes += size
        if not peer.wakeup.is_set():
            peer.wakeup.set()
        return True

    async def _raft_writer(self, peer: _RaftPeer) -> None:
        backoff = self._backoff_min
        while True:
            await peer.wakeup.wait()
            conn = peer.conn
            if conn is None or conn.lost:
                peer.conn = None
                try:
                    conn = await self._dial(peer.node_id, ALPN_RAFT)
                except Exception as exc:  # _DialError, or a bug: either way back off and retry
                    if not isinstance(exc, _DialError):
                        log.exception("raft_dial_error node=%d", peer.node_id)
                    self.stats.frames_dropped += len(peer.frames)
                    peer.frames, peer.queued_bytes = [], 0
                    peer.wakeup.clear()
                    level = logging.DEBUG if peer.failing else logging.INFO
                    log.log(
                        level, "raft_dial_failed node=%d error=%s backoff=%.2f", peer.node_id, exc, backoff
                    )
                    peer.failing = True
                    peer.redial.clear()
                    try:  # capped, jittered backoff, cut short when the peer connects to us
                        async with asyncio.timeout(backoff * (0.5 + self._random.random() / 2)):
                            await peer.redial.wait()
                        backoff = self._backoff_min
                    except TimeoutError:
                        backoff = min(backoff * 2, self._backoff_max)
                    continue
                if peer.failing:
                    log.info("raft_peer_reconnected node=%d", peer.node_id)
                peer.failing = False
                backoff = self._backoff_min
                peer.conn = conn
                conn.use_handler(_on_unexpected_frame)
                # Keep the channel warm: when it drops, dial again at once (one attempt, then the
                # backoff above) rather than at the next send, which may be a vote request.
                conn.closed.add_done_callback(peer.on_conn_closed)
            frames = peer.frames
            peer.frames, peer.queued_bytes = [], 0
            peer.wakeup.clear()
            if frames:
                if not conn.write_frames(frames):
                    self.stats.frames_dropped += len(frames)
                    continue
                self.stats.frames_sent += len(frames)
            if not conn.paused:
                continue
            try:
                async with asyncio.timeout(self._write_timeout):
                    await conn.drain()
            except TimeoutError:
                log.warning("raft_peer_stalled node=%d", peer.node_id)
                conn.abort()
            except ConnectionResetError:
                pass  # redialed on the next frame

    async def _dial(self, node_id: int, alpn: str) -> _Conn:
        """An authenticated connection to a pinned member; _DialError otherwise."""
        assert self._loop is not None
        address, expected = self._addresses.get(node_id), self._pins.get(node_id)
        if address is None or expected is None or self._closing:
            raise _DialError("not a pinned member")
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            raise _DialError(str(exc)) from exc
        conn = _Conn(self._loop, self.stats, alpn)
        conn.node_id = node_id
        conn.peer = address
        self.stats.connections_dialed += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await self._loop.create_connection(
                        lambda: conn,
                        host,
                        port,
                        ssl=self._client_ctx[alpn],
                        ssl_handshake_timeout=self._connect_timeout,
                    )
                except ssl.SSLError as exc:
                    self._refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    raise _DialError(f"TLS handshake failed: {exc.reason}") from exc
                self._track(conn)
                selected, der = _tls_facts(conn)
                if selected != alpn:
                    self._refuse("alpn", conn)
                    raise _DialError("peer did not select the channel")
                _, fp, reason = self._check_member(der, node_id)
                if reason is not None:
                    self._refuse(reason, conn, fp)
                    raise _DialError(f"peer refused: {reason}")
                await _client_prove(conn, alpn, fp, self._cert_der, self._key)
        except TimeoutError as exc:
            conn.abort()
            raise _DialError("timeout") from exc
        except OSError as exc:
            conn.abort()
            raise _DialError(f"{type(exc).__name__}: {exc}") from exc
        if self._closing or self._pins.get(node_id) != expected:
            conn.abort()
            raise _DialError("unpinned while dialing")
        self._admit(conn, node_id, fp)
        log.debug("peer_connected direction=out channel=%s node=%d", alpn, node_id)
        return conn

    # --- rpc -------------------------------------------------------------------------------
    async def rpc(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        """Call ``method`` on member ``node_id``: RpcUnreachable, RpcTimeout or RpcRemoteError."""
        if self._loop is None:
            raise RpcUnreachable("cluster transport not started")
        self.stats.rpc_calls += 1
        deadline = self._loop.time() + timeout
        try:
            peer = self._rpc_peers.get(node_id)
            conn = peer.conn if peer is not None else None
            if conn is None or conn.lost or self._closing or node_id not in self._pins:
                conn = await self._rpc_connection(node_id, deadline)  # checks, dials when needed
            self._next_request_id += 1
            request_id = self._next_request_id
            frame = packb([FrameKind.RPC_REQUEST, request_id, method, payload])
            if len(frame) > MAX_FRAME_BYTES:
                raise RpcRemoteError("request over the frame limit")
            fut: asyncio.Future[bytes] = self._loop.create_future()
            conn.rpc_pending[request_id] = fut
            self._calls_due[fut] = deadline  # the sweep fails the future with TimeoutError
            if self._sweep_handle is None:
                self._arm_rpc_sweep()
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
            self.stats.rpc_failures += 1
            raise

    def _arm_rpc_sweep(self) -> None:
        assert self._loop is not None
        self._sweep_handle = self._loop.call_later(RPC_SWEEP_SECONDS, self._sweep_rpc_deadlines)

    def _sweep_rpc_deadlines(self) -> None:
        self._sweep_handle = None
        assert self._loop is not None
        now = self._loop.time()
        for fut, deadline in list(self._calls_due.items()):
            if deadline <= now and not fut.done():
                fut.set_exception(TimeoutError())
        for task, deadline in list(self._handlers_due.items()):
            if deadline <= now:
                del self._handlers_due[task]
                self._overdue.add(task)
                task.cancel()
        if (self._calls_due or self._handlers_due) and not self._closing:
            self._arm_rpc_sweep()

    async def _rpc_connection(self, node_id: int, deadline: float) -> _Conn:
        if self._closing or node_id not in self._pins or node_id not in self._addresses:
            raise RpcUnreachable(f"node {node_id} is not a reachable member")
        peer = self._rpc_peers.get(node_id)
        if peer is None:
            peer = self._rpc_peers[node_id] = _RpcPeer()
        conn = peer.conn
        if conn is not None and not conn.lost:
            return conn
        try:
            async with asyncio.timeout_at(deadline), peer.lock:
                conn = peer.conn
                if conn is not None and not conn.lost:
                    return conn
                conn = await self._dial(node_id, ALPN_RPC)
        except TimeoutError:
            raise RpcUnreachable(f"could not connect to node {node_id} in time") from None
        except _DialError as exc:
            raise RpcUnreachable(f"node {node_id}: {exc}") from None
        conn.use_handler(self._on_rpc_response)
        if self._rpc_peers.get(node_id) is peer:
            peer.conn = conn
        return conn

    def _on_rpc_response(self, conn: _Conn, frame: bytes) -> None:
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

    def _on_rpc_request(self, conn: _Conn, frame: bytes) -> None:
        if self._closing or not self._still_pinned(conn):
            conn.abort()
            return
        try:
            _, request_id, method, body = _unpack(frame, (FrameKind.RPC_REQUEST,), 4)
            if type(request_id) is not int or type(method) is not str or type(body) is not bytes:
                raise _Malformed("bad request fields")
        except _Malformed as exc:
            conn.malformed(str(exc))
            return
        handler = self._rpc_handlers.get(method)
        if handler is None:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, f"unknown method {method!r}".encode())
        elif len(conn.tasks) >= MAX_RPC_INFLIGHT_PER_CONNECTION:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, b"server busy")
        else:
            self._spawn(self._serve_rpc(conn, request_id, method, handler, body), conn)

    async def _serve_rpc(
        self, conn: _Conn, request_id: int, method: str, handler: RpcHandler, body: bytes
    ) -> None:
        task = asyncio.current_task()
        assert task is not None and self._loop is not None
        self._handlers_due[task] = self._loop.time() + self._rpc_handler_timeout  # see __init__
        if self._sweep_handle is None:
            self._arm_rpc_sweep()
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

    # --- join (server side) ----------------------------------------------------------------
    async def _serve_join(self, conn: _Conn) -> None:
        handler = self._join_handler
        assert handler is not None
        cert_der = conn.join_cert_der
        self._join_connections += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                frame = await conn.read_frame()
            _, payload = _unpack(frame, (FrameKind.JOIN_REQUEST,), 2)
            if type(payload) is not bytes:
                raise _Malformed("join payload must be bytes")
            self.stats.join_requests += 1
            log.info("join_request peer=%s fingerprint=%s", conn.peer, conn.fingerprint)
            try:
                async with asyncio.timeout(self._join_handler_timeout):
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
            self._join_connections -= 1


# --- join (client side) ----------------------------------------------------------------------
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
