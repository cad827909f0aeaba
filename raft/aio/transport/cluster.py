"""``ClusterTransport``: the cluster port of one node, composed of its parts.

The composition root of the transport: it checks the node's own certificate and key, builds the
shared ``Peers``, the three channels (``RaftChannel``, ``RpcChannel``, ``JoinServer``) and the
``Listener`` that hands them their connections, and owns the lifecycle (``start``, ``close``)
and pin changes (``update_pins``), which touch every part. The public methods are the
transport's whole API; each forwards to the part that owns it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .connection import _Conn
from .framing import split_host_port
from .identity import _load_own_identity
from .join import JoinHandler, JoinServer
from .listener import Listener
from .peers import Peers, Pins, Resolver
from .raft_channel import RaftChannel
from .rpc import RpcChannel, RpcHandler
from .stats import TransportStats
from .tls import ALPN_RAFT, _server_context

log = logging.getLogger(__name__)


class ClusterTransport:
    """The cluster port of one node: Raft frames, member RPCs and the join bootstrap."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        cert_pem: bytes,
        key_pem: bytes,
        pins: Pins,
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
        resolver: Resolver | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        cert_der, key = _load_own_identity(node_id, cluster_id, cert_pem, key_pem)
        peers = Peers(
            node_id,
            cluster_id,
            cert_der,
            key,
            TransportStats(),
            connect_timeout_seconds=connect_timeout_seconds,
        )
        self.fingerprint = peers.fingerprint
        server_ctx = _server_context(cert_pem, key_pem)
        peers.set_maps(pins, addresses)
        peers.resolver = resolver  # None: look names up at every dial (see Peers.resolve)
        self._peers = peers
        self._raft = RaftChannel(
            peers,
            on_raft_frame,
            write_timeout_seconds=write_timeout_seconds,
            queue_frames=raft_queue_frames,
            queue_bytes=raft_queue_bytes,
            backoff_min_seconds=backoff_min_seconds,
            backoff_max_seconds=backoff_max_seconds,
        )
        peers.on_admitted = self._raft.member_admitted
        self._rpc = RpcChannel(
            peers,
            handler_timeout_seconds=rpc_handler_timeout_seconds,
            write_timeout_seconds=write_timeout_seconds,
        )
        self._join = JoinServer(
            peers.stats,
            request_timeout_seconds=connect_timeout_seconds,
            handler_timeout_seconds=join_handler_timeout_seconds,
            write_timeout_seconds=write_timeout_seconds,
        )
        self._listener = Listener(
            peers,
            server_ctx,
            self._raft.on_inbound,
            self._rpc.on_request,
            self._join,
            connect_timeout_seconds=connect_timeout_seconds,
        )

    @property
    def stats(self) -> TransportStats:
        """Plain counters (see ``TransportStats``)."""
        return self._peers.stats

    @property
    def on_raft_peer_lost(self) -> Callable[[int], None] | None:
        """Called with a member's node id when its authenticated Raft connection closes: a hint
        for failure detection (the peer process exited), never a decision."""
        return self._peers.on_raft_peer_lost

    @on_raft_peer_lost.setter
    def on_raft_peer_lost(self, callback: Callable[[int], None] | None) -> None:
        self._peers.on_raft_peer_lost = callback

    # --- configuration ---------------------------------------------------------------------
    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        """Serve ``method``: ``handler(from_node_id, payload) -> response payload``."""
        self._rpc.register(method, handler)

    def register_join_handler(self, handler: JoinHandler) -> None:
        """Serve the join channel: ``handler(request payload, client certificate DER) -> reply``."""
        self._join.handler = handler

    def update_pins(self, pins: Pins, addresses: Mapping[int, str]) -> None:
        """Replace the member pins (one fingerprint per member, or several) and addresses.

        A member that is no longer pinned at all has every live connection (both directions)
        closed and its queued frames dropped; a connection authenticated by a fingerprint that
        is no longer pinned (a member rotated its certificate away from it) is retired: no new
        use, closed once what is in flight is answered (``Peers.retire``), redialed as needed. A
        member whose address changed has its outgoing connections closed so they are redialed
        at the new address.
        """
        peers = self._peers
        old_pins, old_addresses = peers.pins, peers.addresses
        peers.set_maps(pins, addresses)
        unpinned = sorted(nid for nid in old_pins if nid not in peers.pins)
        rotated = sorted(
            nid for nid, fps in old_pins.items() if nid in peers.pins and not set(fps) <= set(peers.pins[nid])
        )
        moved = sorted(
            nid
            for nid, addr in old_addresses.items()
            if peers.addresses.get(nid) != addr and nid not in unpinned
        )
        for nid in unpinned:
            log.info("peer_unpinned node=%d", nid)
            for conn in list(peers.member_conns.pop(nid, ())):
                peers.retire(conn)
            self._raft.stop(nid)
            self._rpc.forget(nid)
        for nid in rotated:
            gone = set(old_pins[nid]) - set(peers.pins[nid])
            log.info("peer_certificate_unpinned node=%d fingerprints=%s", nid, ",".join(sorted(gone)))
            for conn in list(peers.member_conns.get(nid, ())):
                if conn.fingerprint in gone:
                    self._retire(conn)
        for nid in moved:
            log.info("peer_address_changed node=%d address=%s", nid, peers.addresses.get(nid))
            self._raft.abort_connection(nid)
            self._rpc.abort_connection(nid)
        # A new member gets its Raft channel now, not when there is first something to send: a
        # follower sends nothing to another follower until one of them campaigns, and a dial
        # (TLS handshake and proof, several ms of CPU) then sat inside the election (measured:
        # a drain's vote request reached the third member 12 ms late).
        self.connect_members()

    def set_identity(self, cert_pem: bytes, key_pem: bytes) -> str:
        """Switch this node to another certificate and key (a rotation); returns its fingerprint.

        From now on the listener presents the new certificate and every dial proves it. This
        node's own outgoing connections made with the old certificate are retired (no new use,
        closed once their calls are answered; the Raft channel and the RPC pool redial with the
        new one). Connections members dialed to this node stay until those members unpin the
        old certificate (they retire them then). Raises TransportError for a certificate that
        does not carry this node's identity or a key that is not its key."""
        cert_der, key = _load_own_identity(self.node_id, self.cluster_id, cert_pem, key_pem)
        peers = self._peers
        old = peers.fingerprint
        self._listener.set_context(_server_context(cert_pem, key_pem))
        peers.set_identity(cert_der, key)
        self.fingerprint = peers.fingerprint
        for conn in list(peers.conns):
            # A dial still proving itself (no fingerprint yet) finishes with the old certificate:
            # its channel replaces it once it is up (RaftChannel._writer, RpcChannel._connection).
            if conn.outbound and conn.local_fingerprint == old and conn.fingerprint and not conn.retiring:
                self._retire(conn)
        log.info("cluster_identity_switched old=%s new=%s", old, self.fingerprint)
        return self.fingerprint

    def _retire(self, conn: _Conn) -> None:
        """Stop using ``conn`` gently: an outgoing Raft connection is replaced (the new one first),
        any other is retired (closed once its calls and requests are answered)."""
        if conn.outbound and conn.channel == ALPN_RAFT and self._raft.outgoing.get(conn.node_id) is not None:
            self._raft.replace_connection(conn.node_id)
        else:
            self._peers.retire(conn)

    def connections_closed(self, fingerprint: str) -> list[asyncio.Future[None]]:
        """The ``closed`` futures of the live connections this node dialed with its certificate
        ``fingerprint`` (after ``set_identity``: the retired ones still finishing their calls)."""
        return [
            c.closed
            for c in self._peers.conns
            if c.outbound and c.local_fingerprint == fingerprint and not c.closed.done()
        ]

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, bind_address: str) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the bound port."""
        host, port = split_host_port(bind_address)
        self._peers.loop = asyncio.get_running_loop()
        bound = await self._listener.listen(host, port)
        log.info("cluster_transport_listening host=%s port=%d fingerprint=%s", host, bound, self.fingerprint)
        self.connect_members()
        return bound

    def connect_members(self) -> None:
        """Open the Raft channel to every pinned member now, before there is anything to send.
        A restarted node thereby tells its peers it is back (their redial backoff toward it is cut
        short when it authenticates): the leader's next heartbeat arrives at once instead of after
        the backoff or this node's first election timeout."""
        self._raft.connect_members()

    async def close(self, timeout_seconds: float = 3.0) -> None:
        """Stop listening, cancel every task, close every connection; bounded by the timeout."""
        peers = self._peers
        if peers.closing:
            return
        peers.closing = True
        for task in list(peers.tasks):
            task.cancel()
        conns = list(peers.conns)
        for conn in conns:
            conn.close()
        waits: list[asyncio.Future[Any]] = [*peers.tasks, *(c.closed for c in conns)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_seconds)
            if pending:
                log.warning("cluster_transport_close_timeout pending=%d", len(pending))
        for conn in conns:
            conn.abort()
        self._listener.close()  # after the accept task is gone: no fd closed under the selector
        self._raft.outgoing.clear()
        self._rpc.close()
        log.info("cluster_transport_closed")

    # --- channels --------------------------------------------------------------------------
    def send(self, node_id: int, frame: bytes) -> bool:
        """Queue one Raft frame for ``node_id``; False (and counted) when it is dropped."""
        return self._raft.send(node_id, frame)

    async def rpc(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        """Call ``method`` on member ``node_id``: RpcUnreachable, RpcTimeout or RpcRemoteError."""
        return await self._rpc.call(node_id, method, payload, timeout)

    async def rpc_at(self, address: str, method: str, payload: bytes, timeout: float) -> tuple[int, bytes]:
        """Call ``method`` on whichever pinned member answers at ``address``: (its node id,
        answer). For a member whose address this node does not know yet."""
        return await self._rpc.call_at(address, method, payload, timeout)
