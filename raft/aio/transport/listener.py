"""The cluster port's listening side: accepting connections and authenticating them.

Each accepted TCP connection gets one task: the TLS 1.3 handshake, then the server side of the
in-band proof (``tls``): a fresh nonce (``CHALLENGE``), the client's ``PROOF``, and on raft/rpc
the pin and identity check of the proven certificate (``Peers.check_member``) before ``ACCEPT``.
An authenticated connection is handed to its channel: Raft and RPC connections get the channel's
frame handler, a join connection is admitted to a slot (``JoinServer.admit``: idle strangers give
way to newer connections) and served in the same task. Every refusal is logged and counted
(``Peers.refuse``); at most ``MAX_PENDING_HANDSHAKES`` run at a time, at most
``MAX_PENDING_HANDSHAKES_PER_SOURCE`` of them from one source (``join.source_key``), so that one
host holding connections open without a TLS hello cannot shut the port for everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl

from ...codec import packb
from .connection import FrameHandler, _Conn
from .errors import _Malformed
from .framing import MAX_JOIN_FRAME_BYTES, FrameKind, _unpack
from .identity import NONCE_BYTES, _proof_message, _verify_proof, cert_fingerprint
from .join import JoinServer, source_key
from .peers import Peers
from .tls import ALPN_JOIN, ALPN_RAFT, CHANNELS, _tls_facts

log = logging.getLogger(__name__)

MAX_PENDING_HANDSHAKES = 256
MAX_PENDING_HANDSHAKES_PER_SOURCE = 32  # one host cannot fill the whole pending cap


class Listener:
    """The listening socket and the handshake and proof of every inbound connection."""

    def __init__(
        self,
        peers: Peers,
        server_ctx: ssl.SSLContext,
        on_raft_frame: FrameHandler,
        on_rpc_request: FrameHandler,
        join: JoinServer,
        *,
        connect_timeout_seconds: float,
    ) -> None:
        self._peers = peers
        self._server_ctx = server_ctx
        self._on_raft_frame = on_raft_frame
        self._on_rpc_request = on_rpc_request
        self._join = join
        join.refuse = peers.refuse
        self._connect_timeout = connect_timeout_seconds
        self._socket: socket.socket | None = None
        self._pending_handshakes = 0
        self._pending_by_source: dict[str, int] = {}

    async def listen(self, host: str, port: int) -> int:
        """Bind ``host:port`` (port 0 picks one) and start accepting; returns the bound port."""
        loop = self._peers.loop
        assert loop is not None
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve bind address {host!r} port {port}")
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
        self._socket = sock
        self._peers.spawn(self._accept_loop(sock))
        return int(sock.getsockname()[1])

    def set_context(self, server_ctx: ssl.SSLContext) -> None:
        """Present another certificate from the next handshake on (a rotation)."""
        self._server_ctx = server_ctx

    def close(self) -> None:
        """Close the listening socket; only once the accept task is gone (no fd closed under the
        selector)."""
        if self._socket is not None:
            self._socket.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept TCP connections, one handshake task each. ``connect_accepted_socket`` reports a
        failed TLS handshake to us (counted as a refusal); ``create_server(ssl=...)`` would drop it
        silently, and ``start_tls`` after a plain accept races the ClientHello on uvloop."""
        peers = self._peers
        loop = peers.loop
        assert loop is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("cluster_accept_failed error=%s", exc)
                await asyncio.sleep(0.1)
                continue
            peers.stats.connections_accepted += 1
            conn = _Conn(loop, peers.stats, "handshake")
            source = "?"
            if isinstance(addr, tuple) and len(addr) >= 2:
                conn.peer = f"{addr[0]}:{addr[1]}"
                source = source_key(str(addr[0]))
            if self._pending_handshakes >= MAX_PENDING_HANDSHAKES:
                sock.close()
                peers.refuse("overload", conn)
                continue
            if self._pending_by_source.get(source, 0) >= MAX_PENDING_HANDSHAKES_PER_SOURCE:
                sock.close()
                peers.refuse("overload_source", conn)
                continue
            self._pending_handshakes += 1
            self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
            peers.spawn(self._serve_inbound(conn, sock, source))

    async def _serve_inbound(self, conn: _Conn, sock: socket.socket, source: str) -> None:
        peers = self._peers
        loop = peers.loop
        assert loop is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                # The certificate this handshake presents, and the one the client's proof must
                # name: read together, so a rotation meanwhile (set_context) changes neither.
                ctx, conn.local_fingerprint = self._server_ctx, peers.fingerprint
                try:
                    await loop.connect_accepted_socket(
                        lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self._connect_timeout
                    )
                except ssl.SSLError as exc:  # TLS < 1.3, not TLS at all, ...
                    peers.refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    return
                except Exception as exc:  # gone before a TLS hello (a TCP probe): counted, not shouted
                    peers.refuse("handshake_aborted", conn, detail=type(exc).__name__, level=logging.DEBUG)
                    return
                peers.track(conn)
                ok = await self._authenticate(conn)
        except TimeoutError:
            peers.refuse("timeout", conn)
            return
        finally:
            self._pending_handshakes -= 1
            left = self._pending_by_source.pop(source) - 1
            if left:
                self._pending_by_source[source] = left
            if conn.transport is None:
                sock.close()
        if ok and conn.channel == ALPN_JOIN:
            await self._join.serve(conn)

    async def _authenticate(self, conn: _Conn) -> bool:
        peers = self._peers
        alpn, _ = _tls_facts(conn)
        if alpn not in CHANNELS:
            peers.refuse("alpn", conn)
            return False
        assert alpn is not None
        conn.channel = alpn
        if alpn == ALPN_JOIN and not self._join.available():
            peers.refuse("join_unavailable", conn)
            return False
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.use_inbox()
        conn.write_frames([packb([FrameKind.CHALLENGE, nonce])])
        try:
            frame = await conn.read_frame()
        except ConnectionResetError:
            if not peers.closing:  # e.g. a joiner whose token pins another certificate than ours
                detail = "closed before proving its identity"
                peers.refuse("no_proof", conn, detail=detail, level=logging.INFO)
            return False
        try:
            _, cert_der, signature = _unpack(frame, (FrameKind.PROOF,), 3)
            if type(cert_der) is not bytes or type(signature) is not bytes:
                raise _Malformed("proof fields must be bytes")
            _verify_proof(cert_der, signature, _proof_message(alpn, nonce, conn.local_fingerprint))
        except _Malformed as exc:
            peers.refuse("bad_proof", conn)
            log.debug("bad_proof peer=%s error=%s", conn.peer, exc)
            return False
        if alpn == ALPN_JOIN:
            conn.fingerprint = cert_fingerprint(cert_der)
            conn.join_cert_der = cert_der
            conn.max_frame = MAX_JOIN_FRAME_BYTES
            refusal = self._join.admit(conn)  # after the proof: only a proven stranger competes
            if refusal is not None:
                peers.refuse(refusal, conn, conn.fingerprint)
                return False
            conn.write_frames([packb([FrameKind.ACCEPT])])
            return True
        nid, fp, reason = peers.check_member(cert_der, None)
        if reason is not None:
            peers.refuse(reason, conn, fp)
            return False
        peers.admit(conn, nid, fp)
        conn.write_frames([packb([FrameKind.ACCEPT])])
        log.debug("peer_connected direction=in channel=%s node=%d peer=%s", alpn, nid, conn.peer)
        conn.use_handler(self._on_raft_frame if alpn == ALPN_RAFT else self._on_rpc_request)
        return True
