"""The members one transport talks to, and the bookkeeping its channels share.

``Peers`` owns the member pins (node id -> the fingerprints of its certificates: one, or two while
the member rotates its certificate) and addresses, the
authenticated connections of each member (both directions), the pin check of a peer's
certificate, refusals (``peer_refused``, logged and counted), and dialing a member: TLS, the pin
and identity check of the proven server certificate, then the in-band proof (``tls``). It also
holds what every channel needs to end cleanly: the event loop, the closing flag, every task and
every live connection, so that ``ClusterTransport.close`` can stop them all. A member's address
may be a DNS name: it is resolved at every dial, never cached beyond one connection, and each
address it resolves to is tried in turn (``resolve``). ``dial_address`` also dials an
address whose member is not known yet: the proven certificate says which pinned member it is.

Contexts never hold pins, so a pin change rebuilds nothing: ``ClusterTransport.update_pins``
swaps the maps here and closes every live connection (both directions) that was authenticated by
a fingerprint no longer pinned (``retire``: calls and requests in flight on it are answered
first); later connections with it are refused by the pin check, and every frame is also checked
against the current pins before delivery (``still_pinned``).

This node's own certificate can change too (``set_identity``, a rotation): new dials prove the
new certificate; each connection remembers which of this node's certificates it was made with
(``_Conn.local_fingerprint``), so a handshake in flight completes with the one it started with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from .connection import _Conn
from .errors import CertIdentityError, _DialError
from .framing import MAX_FRAME_BYTES, split_host_port
from .identity import _FINGERPRINT_RE, cert_fingerprint, cert_identity
from .stats import TransportStats
from .tls import ALPN_RAFT, ALPN_RPC, _client_context, _client_prove, _tls_facts

log = logging.getLogger(__name__)

UNPIN_GRACE_SECONDS = 2.0  # an unpinned member's in-flight requests may still be answered this long

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]  # (host, port) -> IP addresses to try
Pins = Mapping[int, str | Sequence[str]]  # node id -> its pinned fingerprint(s)


def _factory(conn: _Conn) -> Callable[[], _Conn]:
    return lambda: conn


class Peers:
    """Pins, addresses and connections of the members, plus the tasks and flags channels share."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        cert_der: bytes,
        key: ec.EllipticCurvePrivateKey,
        stats: TransportStats,
        *,
        connect_timeout_seconds: float,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.fingerprint = cert_fingerprint(cert_der)
        self.stats = stats
        self._cert_der = cert_der
        self._key = key
        self._client_ctx = {alpn: _client_context(alpn) for alpn in (ALPN_RAFT, ALPN_RPC)}
        self._connect_timeout = connect_timeout_seconds
        self.pins: dict[int, tuple[str, ...]] = {}
        self.addresses: dict[int, str] = {}
        self._fp_to_node: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # set by ClusterTransport.start
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.conns: set[_Conn] = set()
        self.member_conns: dict[int, set[_Conn]] = {}
        self.on_admitted: Callable[[int], None] | None = None  # a member's connection authenticated
        self.on_raft_peer_lost: Callable[[int], None] | None = None
        self.resolver: Resolver | None = None  # None: the event loop's getaddrinfo (see resolve)

    def set_maps(self, pins: Pins, addresses: Mapping[int, str]) -> None:
        normalized: dict[int, tuple[str, ...]] = {}
        for nid, fps in pins.items():
            fps = (fps,) if isinstance(fps, str) else tuple(fps)
            if not fps or not all(_FINGERPRINT_RE.fullmatch(fp) for fp in fps):
                raise ValueError(f"bad fingerprint for node {nid}")
            normalized[nid] = fps
        self.pins = normalized
        self.addresses = dict(addresses)
        self._fp_to_node = {fp: nid for nid, fps in sorted(normalized.items()) for fp in fps}

    def set_identity(self, cert_der: bytes, key: ec.EllipticCurvePrivateKey) -> None:
        """This node's certificate and key for every later dial (a rotation)."""
        self._cert_der, self._key = cert_der, key
        self.fingerprint = cert_fingerprint(cert_der)

    # --- tasks and connections -------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, None], conn: _Conn | None = None) -> asyncio.Task[None]:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    def track(self, conn: _Conn) -> None:
        self.conns.add(conn)
        conn.on_lost = self._forget

    def _forget(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        members = self.member_conns.get(conn.node_id)
        was_member = members is not None and conn in members
        if members is not None:
            members.discard(conn)
            if not members:
                del self.member_conns[conn.node_id]
        if (
            conn.channel == ALPN_RAFT
            and conn.node_id
            and was_member
            and not conn.retiring  # closed on purpose (a rotation): the peer is alive
            and not self.closing
            and self.on_raft_peer_lost is not None
            and not any(c.channel == ALPN_RAFT and not c.lost for c in members or ())
        ):
            # An authenticated Raft connection closed (the peer process exited or reset it) and
            # no other Raft connection with that peer is left (a peer replacing its connection,
            # e.g. after a certificate rotation, opens the new one first): a hint for failure
            # detection, never a decision (the engine still needs PreVote to win).
            self.on_raft_peer_lost(conn.node_id)

    def retire(self, conn: _Conn) -> None:
        """Close a connection whose pin is gone (an unpinned member, or a certificate rotated
        away from). No new call is made on it and every new frame it brings is refused (the pin
        check), but what is already in flight finishes first: requests it brought get their
        replies (the removal that unpinned a member is typically one of them: a member removing
        itself through the leader, a leader removed after handing over), and calls made on it
        get their answers (a rotation unpins a certificate while requests to or from that
        member are under way). Closed when those finish, aborted after a grace."""
        conn.retiring = True
        pending: list[asyncio.Future[Any]] = [t for t in conn.tasks if not t.done()]
        pending += [f for f in conn.rpc_pending.values() if not f.done()]
        if not pending or self.loop is None:
            conn.close()  # flushes what was written, then FIN
            return
        left = len(pending)

        def one_done(_f: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                conn.close()  # flushes the replies, then FIN

        for f in pending:
            f.add_done_callback(one_done)
        self.loop.call_later(UNPIN_GRACE_SECONDS, conn.abort)

    # --- authentication --------------------------------------------------------------------
    def admit(self, conn: _Conn, node_id: int, fingerprint: str) -> None:
        conn.node_id, conn.fingerprint = node_id, fingerprint
        conn.max_frame = MAX_FRAME_BYTES
        self.member_conns.setdefault(node_id, set()).add(conn)
        if self.on_admitted is not None:
            self.on_admitted(node_id)

    def refuse(
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

    def check_member(self, der: bytes | None, expected_node: int | None) -> tuple[int, str, str | None]:
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

    def still_pinned(self, conn: _Conn) -> bool:
        return conn.fingerprint in self.pins.get(conn.node_id, ())

    # --- outbound --------------------------------------------------------------------------
    async def resolve(self, host: str, port: int) -> list[str]:
        """The IP addresses to try for ``host``, looked up now: a DNS name (an advertise address
        may be one) is resolved at every dial and never cached beyond one connection, so an IP
        change behind the name needs nothing. ``resolver`` replaces the lookup (tests)."""
        if self.resolver is not None:
            return list(await self.resolver(host, port))
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        assert self.loop is not None
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _connect(self, conn: _Conn, host: str, port: int, alpn: str) -> _Conn:
        """TCP and TLS to the first of ``host``'s addresses that accepts (a fresh ``_Conn`` per
        attempt); the caller's timeout bounds the whole."""
        assert self.loop is not None
        addresses = await self.resolve(host, port)
        if not addresses:
            raise OSError(f"{host} resolved to no address")
        for i, ip in enumerate(addresses):
            attempt = conn if i == 0 else _Conn(self.loop, self.stats, alpn)
            attempt.node_id, attempt.peer = conn.node_id, conn.peer
            try:
                await self.loop.create_connection(
                    _factory(attempt),
                    ip,
                    port,
                    ssl=self._client_ctx[alpn],
                    ssl_handshake_timeout=self._connect_timeout,
                )
            except ssl.SSLError:
                raise
            except OSError:
                if i == len(addresses) - 1:
                    raise
                continue
            if ip != host:
                log.debug("peer_resolved node=%d host=%s address=%s", conn.node_id, host, ip)
            return attempt
        raise OSError(f"no address of {host} accepted")  # pragma: no cover - the loop returns or raises

    async def dial(self, node_id: int, alpn: str) -> _Conn:
        """An authenticated connection to a pinned member; _DialError otherwise."""
        address, expected = self.addresses.get(node_id), self.pins.get(node_id)
        if address is None or expected is None or self.closing:
            raise _DialError("not a pinned member")
        return await self.dial_address(address, alpn, node_id)

    async def dial_address(self, address: str, alpn: str, node_id: int | None) -> _Conn:
        """An authenticated connection to the member at ``address``: ``node_id``, or (None) any
        pinned member, which its proven certificate names (``conn.node_id``); _DialError otherwise."""
        assert self.loop is not None
        if self.closing:
            raise _DialError("closing")
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            raise _DialError(str(exc)) from exc
        conn = _Conn(self.loop, self.stats, alpn)
        conn.node_id = node_id or 0
        conn.peer = address
        self.stats.connections_dialed += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    conn = await self._connect(conn, host, port, alpn)
                except ssl.SSLError as exc:
                    self.refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    raise _DialError(f"TLS handshake failed: {exc.reason}") from exc
                self.track(conn)
                selected, der = _tls_facts(conn)
                if selected != alpn:
                    self.refuse("alpn", conn)
                    raise _DialError("peer did not select the channel")
                nid, fp, reason = self.check_member(der, node_id)
                if reason is not None:
                    self.refuse(reason, conn, fp)
                    raise _DialError(f"peer refused: {reason}")
                conn.node_id = nid
                conn.local_fingerprint, conn.outbound = self.fingerprint, True
                await _client_prove(conn, alpn, fp, self._cert_der, self._key)
        except TimeoutError as exc:
            conn.abort()
            raise _DialError("timeout") from exc
        except OSError as exc:
            conn.abort()
            raise _DialError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled (the caller's deadline, a stopped channel): no half-open connection
            conn.abort()
            raise
        if self.closing or fp not in self.pins.get(nid, ()):
            conn.abort()
            raise _DialError("unpinned while dialing")
        self.admit(conn, nid, fp)
        log.debug("peer_connected direction=out channel=%s node=%d", alpn, nid)
        return conn
