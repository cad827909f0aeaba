"""Strangers holding the join channel cannot keep a real joiner out.

The join channel is open to anyone with a self-signed certificate (the joiner proves its join
token only in its request). These tests hold join connections that complete TLS and the proof
and then sit idle, or trickle a request that never completes, and check that a real join
through the transport's own client (``join_call``) still gets in at once:

* 16 idle strangers from 16 addresses fill every join slot: the joiner takes the slot of the
  oldest idle one (closed and counted ``join_evicted``); the other 15 stay connected.
* 16 idle strangers from the joiner's own address hold at most the per-source cap; the joiner
  still gets in.
* strangers from another address that reconnect as soon as they are closed and trickle a request
  byte by byte: five joins in a row all succeed, each well within the strangers' idle window.
* a join connection that sends nothing is closed (``join_timeout``) well before the connect
  timeout that used to bound it.
* one host opening as many TCP connections as there may be pending handshakes, and sending
  nothing, holds only its per-source share (the rest: ``overload_source``); a joiner gets in.

The idle window the strangers rely on is the transport's connect timeout (5 s); every join here
must finish within ``JOIN_BOUND`` (well under it): before the fix each was refused outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator

import msgpack
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quorumd.node.cluster.pki import NodeIdentity, generate_node_identity, pem_to_der
from quorumd.raft.aio.transport import (
    ALPN_JOIN,
    MAX_JOIN_CONNECTIONS,
    MAX_PENDING_HANDSHAKES,
    ClusterTransport,
    join_call,
)
from quorumd.raft.aio.transport import join as join_module
from tests.test_transport import CLUSTER, frame_bytes, read_frame

IDLE_WINDOW = 5.0  # the transport's connect timeout: how long an idle stranger used to hold a slot
JOIN_BOUND = 3.0  # every real join must complete within this (well under the idle window)
WAIT = 10.0


class Server:
    def __init__(self, transport: ClusterTransport, port: int, ident: NodeIdentity) -> None:
        self.transport, self.port, self.ident = transport, port, ident
        self.requests: list[bytes] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refused(self, reason: str) -> int:
        return self.transport.stats.refused_connections.get(reason, 0)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    ident = generate_node_identity(1, CLUSTER)
    t = ClusterTransport(
        1, CLUSTER, ident.cert_pem, ident.key_pem, {}, {}, lambda frm, frame: None,
        connect_timeout_seconds=IDLE_WINDOW,
    )  # fmt: skip
    srv = Server(t, await t.start("127.0.0.1:0"), ident)

    async def on_join(payload: bytes, cert_der: bytes) -> bytes:
        srv.requests.append(payload)
        return b"welcome:" + payload

    t.register_join_handler(on_join)
    try:
        yield srv
    finally:
        await t.close()


STRANGERS = [generate_node_identity(7, "some-other-cluster") for _ in range(4)]  # any self-signed


async def stranger(
    srv: Server, source: str = "127.0.0.1", ident: NodeIdentity = STRANGERS[0]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A join connection from ``source`` that completes TLS 1.3 and the proof, then the ACCEPT."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_JOIN])
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx, local_addr=(source, 0))
        try:
            kind, nonce = msgpack.unpackb(await read_frame(reader))
            assert kind == 1
            key = serialization.load_pem_private_key(ident.key_pem, None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            server_fp = srv.ident.fingerprint.encode()
            message = b"quorumd-auth/1\x00" + ALPN_JOIN.encode() + b"\x00" + nonce + server_fp
            signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
            writer.write(frame_bytes(msgpack.packb([2, pem_to_der(ident.cert_pem), signature])))
            assert msgpack.unpackb(await read_frame(reader)) == [3]  # ACCEPT: it holds a join slot
        except BaseException:
            writer.transport.abort()
            raise
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (sending nothing)."""
    try:
        async with asyncio.timeout(within):
            data = await reader.read()
    except TimeoutError:
        return False
    except OSError:
        return True
    assert data == b""
    return True


def still_open(reader: asyncio.StreamReader) -> bool:
    return not reader.at_eof() and reader.exception() is None


async def real_join(srv: Server, tag: str) -> bytes:
    joiner = generate_node_identity(4, CLUSTER)
    return await join_call(
        srv.address, srv.ident.fingerprint, tag.encode(), joiner.cert_pem, joiner.key_pem, timeout=JOIN_BOUND
    )


@pytest.mark.asyncio
async def test_idle_strangers_filling_every_slot_give_way_to_a_joiner(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the displacement is under test here: the strangers may idle as long as they like.
    server.transport._join._request_timeout = 60.0
    held = []
    try:
        for i in range(MAX_JOIN_CONNECTIONS):  # one per address: only the global cap applies
            held.append(await stranger(server, source=f"127.0.0.{i + 2}"))
        assert server.refused("join_evicted") == 0
        with caplog.at_level(logging.INFO, logger="quorumd.raft.aio.transport"):
            assert await real_join(server, "joiner") == b"welcome:joiner"
        assert server.requests == [b"joiner"]
        # The oldest idle stranger made room, and only it: the others keep their slots.
        assert await closed_by_server(held[0][0], WAIT)
        assert all(still_open(r) for r, _ in held[1:])
        assert server.refused("join_evicted") == 1
        assert any("peer_refused reason=join_evicted" in r.getMessage() for r in caplog.records)
    finally:
        for _, w in held:
            w.transport.abort()


@pytest.mark.asyncio
async def test_idle_strangers_from_the_joiners_address_hold_only_the_per_source_cap(
    server: Server,
) -> None:
    server.transport._join._request_timeout = 60.0
    held = []
    try:
        for _ in range(MAX_JOIN_CONNECTIONS):
            held.append(await stranger(server))
        assert await real_join(server, "joiner") == b"welcome:joiner"
        # Each stranger beyond the per-source cap displaced the oldest idle one from the same
        # address, and so did the joiner.
        per_source = join_module.MAX_JOIN_CONNECTIONS_PER_SOURCE
        assert per_source < MAX_JOIN_CONNECTIONS
        evicted = MAX_JOIN_CONNECTIONS - per_source + 1
        assert server.refused("join_evicted") == evicted
        for r, _ in held[:evicted]:  # the oldest ones, in order
            assert await closed_by_server(r, WAIT)
        assert all(still_open(r) for r, _ in held[evicted:])
    finally:
        for _, w in held:
            w.transport.abort()


@pytest.mark.asyncio
async def test_churning_trickling_strangers_do_not_starve_joins(server: Server) -> None:
    stop = asyncio.Event()
    connections = 0
    accepted = 0

    async def attacker(n: int) -> None:
        """Reconnect whenever closed; announce a 1000-byte request and trickle it (bounded)."""
        nonlocal connections, accepted
        while not stop.is_set() and connections < 2000:
            connections += 1
            try:
                reader, writer = await stranger(server, "127.0.0.2", STRANGERS[n % len(STRANGERS)])
            except (OSError, AssertionError, asyncio.IncompleteReadError, TimeoutError):
                continue  # refused or displaced before the ACCEPT: try again
            accepted += 1
            try:
                writer.write(struct.pack(">I", 1000))
                for _ in range(200):  # 200 of the 1000 bytes, then the server has long closed it
                    if stop.is_set() or reader.at_eof():
                        break
                    writer.write(b"\x00")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await reader.read(1)
            except OSError:
                pass
            finally:
                writer.transport.abort()

    tasks = [asyncio.create_task(attacker(n)) for n in range(MAX_JOIN_CONNECTIONS + 4)]
    try:
        async with asyncio.timeout(WAIT):  # the attackers are up and have held slots
            while accepted < MAX_JOIN_CONNECTIONS:
                await asyncio.sleep(0.01)
        for k in range(5):
            assert await real_join(server, f"joiner{k}") == f"welcome:joiner{k}".encode()
        assert server.requests == [f"joiner{k}".encode() for k in range(5)]
        # The attackers competed for their own source's slots, not the joiners'.
        assert server.refused("join_evicted") + server.refused("join_source_limit") > 0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_join_connection_that_sends_nothing_is_closed_early(server: Server) -> None:
    reader, writer = await stranger(server)
    try:
        # Closed well before the idle window the connect timeout used to give it.
        assert await closed_by_server(reader, IDLE_WINDOW * 0.7)
        assert server.refused("join_timeout") == 1
        assert join_module.JOIN_REQUEST_SECONDS < IDLE_WINDOW * 0.7
    finally:
        writer.transport.abort()


@pytest.mark.asyncio
async def test_one_host_cannot_fill_the_pending_handshakes(server: Server) -> None:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(MAX_PENDING_HANDSHAKES):  # TCP only, never a TLS hello
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            s.bind(("127.0.0.2", 0))
            async with asyncio.timeout(WAIT):
                await loop.sock_connect(s, ("127.0.0.1", server.port))
        stats = server.transport.stats
        async with asyncio.timeout(WAIT):  # the server has accepted every one of them
            while stats.connections_accepted < MAX_PENDING_HANDSHAKES:
                await asyncio.sleep(0.01)
        assert await real_join(server, "joiner") == b"welcome:joiner"
        assert server.refused("overload") == 0
        assert 0 < server.refused("overload_source") < MAX_PENDING_HANDSHAKES
    finally:
        for s in socks:
            s.close()
