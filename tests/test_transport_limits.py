"""ClusterTransport against peers that misbehave at the edges of the protocol: frames after the one
join request, dials abandoned half way through the proof, and peers that stop reading what this
node writes on the RPC channel (as caller and as server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import msgpack
import pytest
import pytest_asyncio

from quorumd.node.cluster.pki import NodeIdentity, generate_node_identity
from quorumd.raft.aio.transport import (
    ALPN_JOIN,
    ALPN_RAFT,
    ALPN_RPC,
    ClusterTransport,
    RpcTimeout,
    RpcUnreachable,
)
from quorumd.raft.aio.transport.connection import _Conn
from tests.test_transport import (
    CLUSTER,
    WAIT_SECONDS,
    eventually,
    expect_accept,
    expect_closed,
    frame_bytes,
    raw_member,
    read_frame,
)

Served = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Nodes:
    """Transports on 127.0.0.1:0, closed at teardown."""

    def __init__(self) -> None:
        self.transports: list[ClusterTransport] = []

    async def start(self, node_id: int, **options: float) -> tuple[ClusterTransport, int]:
        ident = generate_node_identity(node_id, CLUSTER)
        t = ClusterTransport(
            node_id, CLUSTER, ident.cert_pem, ident.key_pem, {}, {}, lambda frm, frame: None,
            backoff_min_seconds=0.01, backoff_max_seconds=0.05, **options,
        )  # fmt: skip
        self.transports.append(t)
        return t, await t.start("127.0.0.1:0")


@pytest_asyncio.fixture
async def nodes() -> AsyncIterator[Nodes]:
    n = Nodes()
    try:
        yield n
    finally:
        for t in n.transports:
            await t.close()


class FakeMember:
    """A TLS 1.3 server presenting a member's certificate; ``serve`` decides what it says."""

    def __init__(self, ident: NodeIdentity, tmp: Path, serve: Served) -> None:
        self.ident = ident
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.set_alpn_protocols([ALPN_RAFT, ALPN_RPC])
        (tmp / "c.pem").write_bytes(ident.cert_pem)
        (tmp / "k.pem").write_bytes(ident.key_pem)
        os.chmod(tmp / "k.pem", 0o600)
        self.ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
        self.serve = serve
        self.accepted: asyncio.Queue[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0, ssl=self.ctx)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        self.accepted.put_nowait((alpn, reader, writer))
        await self.serve(reader, writer)

    async def next_connection(self, alpn: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                got, reader, writer = await self.accepted.get()
                if got == alpn:
                    return reader, writer

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Completes TLS, then never sends the challenge."""


async def accept_then_stop_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Challenges, takes whatever proof comes, accepts, then reads nothing more."""
    writer.write(frame_bytes(msgpack.packb([1, secrets.token_bytes(32)])))
    await read_frame(reader)
    writer.write(frame_bytes(msgpack.packb([3])))
    cast(asyncio.Transport, writer.transport).pause_reading()


@pytest_asyncio.fixture
async def fake_members(tmp_path: Path) -> AsyncIterator[Callable[[NodeIdentity, Served], FakeMember]]:
    made: list[FakeMember] = []

    def make(ident: NodeIdentity, serve: Served) -> FakeMember:
        member = FakeMember(ident, tmp_path, serve)
        made.append(member)
        return member

    try:
        yield make
    finally:
        for m in made:
            m.close()


@pytest.mark.asyncio
async def test_frames_after_the_join_request_close_the_connection(nodes: Nodes) -> None:
    """The join channel carries one request: whatever a stranger sends after it, while its request
    is being handled, is not kept (it closes the connection) however much it sends."""
    server, port = await nodes.start(1)
    entered, release = asyncio.Event(), asyncio.Event()

    async def on_join(payload: bytes, cert_der: bytes) -> bytes:
        entered.set()
        await release.wait()
        return b"welcome"

    server.register_join_handler(on_join)
    stranger = generate_node_identity(7, "some-other-cluster")
    reader, writer = await raw_member(port, ALPN_JOIN, stranger, server.fingerprint)
    try:
        await expect_accept(reader)
        writer.write(frame_bytes(msgpack.packb([20, b"join me"])))
        await asyncio.wait_for(entered.wait(), WAIT_SECONDS)
        junk = frame_bytes(msgpack.packb([20, bytes(64 * 1024)]))
        with contextlib.suppress(ConnectionError):
            for _ in range(128):  # 8 MiB, eight times the join frame limit
                writer.write(junk)
            await writer.drain()
        await expect_closed(reader)  # closed while the handler still runs
        assert not release.is_set()
        assert server.stats.malformed_frames == 1
    finally:
        release.set()
        writer.transport.abort()


@pytest.mark.asyncio
async def test_a_dial_abandoned_by_its_caller_closes_its_connection(
    nodes: Nodes, fake_members: Callable[[NodeIdentity, Served], FakeMember]
) -> None:
    """An RPC whose deadline expires while its connection is still being authenticated leaves no
    connection behind: the half-proven one is closed, not kept until the connect timeout."""
    two = fake_members(generate_node_identity(2, CLUSTER), silent)
    address = await two.start()
    one, _ = await nodes.start(1, connect_timeout_seconds=60.0)
    one.update_pins({2: two.ident.fingerprint}, {2: address})
    with pytest.raises(RpcUnreachable):
        await one.rpc(2, "echo", b"", 0.3)
    reader, _ = await two.next_connection(ALPN_RPC)
    await expect_closed(reader)
    await eventually(lambda: not [c for c in one._peers.conns if c.channel == ALPN_RPC])


@pytest.mark.asyncio
async def test_a_member_that_stops_reading_calls_has_its_connection_dropped(
    nodes: Nodes, fake_members: Callable[[NodeIdentity, Served], FakeMember]
) -> None:
    """Calls to a member that accepted the connection and then reads nothing time out, and the
    connection whose writes stay backed up is dropped after the write timeout, as on the Raft
    channel, rather than holding every later request in its buffer."""
    two = fake_members(generate_node_identity(2, CLUSTER), accept_then_stop_reading)
    address = await two.start()
    one, _ = await nodes.start(1, write_timeout_seconds=0.5)
    one.update_pins({2: two.ident.fingerprint}, {2: address})
    payload = bytes(1024 * 1024)
    conn: _Conn | None = None
    for _ in range(200):
        with pytest.raises(RpcTimeout):
            await one.rpc(2, "put", payload, 0.05)
        peer = one._rpc.outgoing[2]
        conn = peer.conn
        if conn is not None and conn.paused:
            break
    assert conn is not None and conn.paused
    await asyncio.wait_for(asyncio.shield(conn.closed), WAIT_SECONDS)
    assert conn.lost


@pytest.mark.asyncio
async def test_a_caller_that_stops_reading_answers_has_its_connection_dropped(nodes: Nodes) -> None:
    """A member that keeps sending requests and never reads the answers (here: errors for an unknown
    method, which run no handler) has its connection dropped after the write timeout."""
    server, port = await nodes.start(1, write_timeout_seconds=0.5)
    nine = generate_node_identity(9, CLUSTER)
    server.update_pins({9: nine.fingerprint}, {})
    reader, writer = await raw_member(port, ALPN_RPC, nine, server.fingerprint)
    try:
        await expect_accept(reader)
        method = "m" * 100_000
        conns = server._peers.member_conns[9]
        (conn,) = conns
        with contextlib.suppress(ConnectionError):
            for request_id in range(1, 1001):  # at most 200 MB of answers
                writer.write(frame_bytes(msgpack.packb([10, request_id, method, b""])))
                await writer.drain()
                if conn.paused:
                    break
        assert conn.paused or conn.lost
        await asyncio.wait_for(asyncio.shield(conn.closed), WAIT_SECONDS)
        assert conn.lost
    finally:
        writer.transport.abort()
