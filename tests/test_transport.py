"""ClusterTransport on loopback: Raft frames and RPCs between members, pin and identity checks in
both directions, TLS 1.3 only, pin removal, malformed frames, RPC failures and the join channel.

The raw client below re-implements the client side of the in-band proof from the module
docstring, so the wire protocol is checked independently of the transport's own client."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgpack
import pytest
import pytest_asyncio
import uvloop
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quorumd.node.cluster.pki import NodeIdentity, generate_node_identity, pem_to_der
from quorumd.raft.aio.transport import (
    ALPN_JOIN,
    ALPN_RAFT,
    ALPN_RPC,
    ClusterTransport,
    JoinPinMismatch,
    JoinRemoteError,
    RpcRemoteError,
    RpcTimeout,
    RpcUnreachable,
    join_call,
)

CLUSTER = "test-cluster"
WAIT_SECONDS = 5.0


@dataclass
class Node:
    ident: NodeIdentity
    transport: ClusterTransport
    port: int
    frames: asyncio.Queue[tuple[int, bytes]]

    @property
    def node_id(self) -> int:
        return self.transport.node_id

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> str:
        return self.ident.fingerprint

    async def next_frame(self) -> tuple[int, bytes]:
        return await asyncio.wait_for(self.frames.get(), WAIT_SECONDS)

    def refused(self, reason: str) -> int:
        return self.transport.stats.refused_connections.get(reason, 0)


class Net:
    """Starts transports on 127.0.0.1:0 and closes them all at teardown."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    async def start(
        self,
        node_id: int,
        ident: NodeIdentity | None = None,
        cluster: str = CLUSTER,
        rpc_handler_timeout_seconds: float = 120.0,
    ) -> Node:
        ident = ident or generate_node_identity(node_id, cluster)
        frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        t = ClusterTransport(
            node_id,
            cluster,
            ident.cert_pem,
            ident.key_pem,
            {},
            {},
            lambda frm, frame: frames.put_nowait((frm, frame)),
            connect_timeout_seconds=2.0,
            backoff_min_seconds=0.01,
            backoff_max_seconds=0.05,
            rpc_handler_timeout_seconds=rpc_handler_timeout_seconds,
        )
        node = Node(ident, t, await t.start("127.0.0.1:0"), frames)
        self.nodes.append(node)
        return node

    async def mesh(self, count: int) -> list[Node]:
        nodes = [await self.start(i) for i in range(1, count + 1)]
        for n in nodes:
            others = [m for m in nodes if m is not n]
            n.transport.update_pins(
                {m.node_id: m.fingerprint for m in others}, {m.node_id: m.address for m in others}
            )
        return nodes

    async def close(self) -> None:
        for n in self.nodes:
            await n.transport.close()


@pytest_asyncio.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        await n.close()


async def eventually(pred: Callable[[], bool]) -> None:
    """Wait for a condition the transport reaches asynchronously (fails after WAIT_SECONDS)."""
    async with asyncio.timeout(WAIT_SECONDS):
        while not pred():
            await asyncio.sleep(0.005)


# --- an independent raw client ---------------------------------------------------------------
def frame_bytes(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT_SECONDS):
        (size,) = struct.unpack(">I", await reader.readexactly(4))
        return await reader.readexactly(size)


async def raw_tls(
    port: int, alpn: str, max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    ctx.set_alpn_protocols([alpn])
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), WAIT_SECONDS)


async def raw_member(
    port: int, alpn: str, ident: NodeIdentity, server_fp: str, *, corrupt_signature: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection that answers the server's challenge with a proof for ``ident``."""
    reader, writer = await raw_tls(port, alpn)
    kind, nonce = msgpack.unpackb(await read_frame(reader))
    assert kind == 1 and len(nonce) == 32
    key = serialization.load_pem_private_key(ident.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if corrupt_signature:
        nonce = bytes(32)
    message = b"quorumd-auth/1\x00" + alpn.encode() + b"\x00" + nonce + server_fp.encode()
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    writer.write(frame_bytes(msgpack.packb([2, pem_to_der(ident.cert_pem), signature])))
    return reader, writer


async def expect_accept(reader: asyncio.StreamReader) -> None:
    assert msgpack.unpackb(await read_frame(reader)) == [3]


async def expect_closed(reader: asyncio.StreamReader) -> None:
    """The server closed the connection (EOF or reset) without sending another frame."""
    async with asyncio.timeout(WAIT_SECONDS):
        try:
            data = await reader.read()
        except (ConnectionError, ssl.SSLError):
            data = b""
    assert data == b""


def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


# --- members talking ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_three_members_exchange_frames_in_order(net: Net) -> None:
    nodes = await net.mesh(3)
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                for k in range(200):
                    assert src.transport.send(dst.node_id, b"%d->%d:%d" % (src.node_id, dst.node_id, k))
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB, many TLS records
    assert nodes[0].transport.send(2, big)
    for dst in nodes:
        expected = 400 + (1 if dst.node_id == 2 else 0)
        got: dict[int, list[bytes]] = {}
        for _ in range(expected):
            frm, frame = await dst.next_frame()
            got.setdefault(frm, []).append(frame)
        for src in nodes:
            if src is dst:
                continue
            want = [b"%d->%d:%d" % (src.node_id, dst.node_id, k) for k in range(200)]
            if src.node_id == 1 and dst.node_id == 2:
                want.append(big)
            assert got[src.node_id] == want
        assert dst.frames.empty()
        assert dst.transport.stats.frames_received == expected
    assert nodes[0].transport.stats.frames_sent == 401
    assert all(n.transport.stats.refused_connections == {} for n in nodes)
    assert all(n.transport.stats.malformed_frames == 0 for n in nodes)


@pytest.mark.asyncio
async def test_rpcs_are_multiplexed_and_report_remote_errors(net: Net) -> None:
    nodes = await net.mesh(3)
    seen_from: list[int] = []

    async def echo(frm: int, payload: bytes) -> bytes:
        seen_from.append(frm)
        await asyncio.sleep(0)
        return b"%d:" % frm + payload

    async def boom(frm: int, payload: bytes) -> bytes:
        raise ValueError("bad thing happened")

    for n in nodes:
        n.transport.register_rpc("echo", echo)
        n.transport.register_rpc("boom", boom)
    assert await nodes[0].transport.rpc(2, "echo", b"x", 2.0) == b"1:x"
    assert await nodes[1].transport.rpc(3, "echo", b"", 2.0) == b"2:"

    three = nodes[2].transport
    dials_before = three.stats.connections_dialed
    payloads = [b"p%d" % i for i in range(50)]
    results = await asyncio.gather(*(three.rpc(1, "echo", p, 5.0) for p in payloads))
    assert results == [b"3:" + p for p in payloads]
    assert three.stats.connections_dialed == dials_before + 1  # one connection for all 50 calls
    assert seen_from.count(3) == 50

    with pytest.raises(RpcRemoteError, match="bad thing happened"):
        await nodes[0].transport.rpc(2, "boom", b"", 2.0)
    with pytest.raises(RpcRemoteError, match="unknown method"):
        await nodes[0].transport.rpc(2, "nope", b"", 2.0)
    assert await nodes[0].transport.rpc(2, "echo", b"after", 2.0) == b"1:after"  # connection survived


@pytest.mark.asyncio
async def test_a_handler_over_its_time_limit_is_cancelled_and_answers_an_error(net: Net) -> None:
    one = await net.start(1)
    two = await net.start(2, rpc_handler_timeout_seconds=0.1)
    for a, b in ((one, two), (two, one)):
        a.transport.update_pins({b.node_id: b.fingerprint}, {b.node_id: b.address})
    cancelled = asyncio.Event()

    async def stuck(frm: int, payload: bytes) -> bytes:
        try:
            await asyncio.Event().wait()  # never set: only the time limit ends this
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    async def echo(frm: int, payload: bytes) -> bytes:
        return payload

    two.transport.register_rpc("stuck", stuck)
    two.transport.register_rpc("echo", echo)
    with pytest.raises(RpcRemoteError, match="handler timed out"):
        await one.transport.rpc(2, "stuck", b"", 5.0)  # the caller's own limit is far away
    assert cancelled.is_set()
    assert await one.transport.rpc(2, "echo", b"still here", 2.0) == b"still here"
    assert two.transport.stats.malformed_frames == 0


@pytest.mark.asyncio
async def test_rpc_timeout_and_unreachable(net: Net) -> None:
    one, two = await net.mesh(2)
    release, entered = asyncio.Event(), asyncio.Event()

    async def slow(frm: int, payload: bytes) -> bytes:
        entered.set()
        await release.wait()
        return b"late"

    async def echo(frm: int, payload: bytes) -> bytes:
        return payload

    two.transport.register_rpc("slow", slow)
    two.transport.register_rpc("echo", echo)
    with pytest.raises(RpcTimeout):
        await one.transport.rpc(2, "slow", b"", 0.2)
    release.set()
    assert await one.transport.rpc(2, "echo", b"ok", 2.0) == b"ok"  # the late answer is ignored

    with pytest.raises(RpcUnreachable):
        await one.transport.rpc(7, "echo", b"", 1.0)  # not a member

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    three = generate_node_identity(3, CLUSTER)
    one.transport.update_pins(
        {2: two.fingerprint, 3: three.fingerprint}, {2: two.address, 3: f"127.0.0.1:{dead_port}"}
    )
    with pytest.raises(RpcUnreachable):
        await one.transport.rpc(3, "echo", b"", 2.0)

    release.clear()
    entered.clear()
    call = asyncio.create_task(one.transport.rpc(2, "slow", b"", 10.0))
    await asyncio.wait_for(entered.wait(), WAIT_SECONDS)  # the request is being served ...
    await two.transport.close()  # ... when the server goes away
    with pytest.raises(RpcUnreachable):
        await asyncio.wait_for(call, WAIT_SECONDS)


@pytest.mark.asyncio
async def test_send_queue_is_bounded_and_counts_drops() -> None:
    ident = generate_node_identity(1, CLUSTER)
    small = ClusterTransport(
        1,
        CLUSTER,
        ident.cert_pem,
        ident.key_pem,
        {2: generate_node_identity(2, CLUSTER).fingerprint},
        {2: "127.0.0.1:9"},
        lambda f, b: None,
        raft_queue_frames=10,
    )
    await small.start("127.0.0.1:0")
    try:
        results = [small.send(2, b"f%d" % i) for i in range(12)]  # no await: the writer cannot run
        assert results == [True] * 10 + [False, False]
        assert small.stats.frames_dropped == 2
        assert small.send(3, b"unknown peer") is False
        assert small.stats.frames_dropped == 3
    finally:
        await small.close()
    assert small.send(2, b"after close") is False


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_unpinned_client_is_refused(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    one = await net.start(1)
    rogue = await net.start(9)
    rogue.transport.update_pins({1: one.fingerprint}, {1: one.address})  # 1 does not pin 9
    assert rogue.transport.send(1, b"let me in")
    with pytest.raises(RpcUnreachable):
        await rogue.transport.rpc(1, "echo", b"", 2.0)
    await eventually(lambda: one.refused("not_pinned") >= 2)
    assert one.frames.empty() and one.transport.stats.frames_received == 0
    assert any(
        "peer_refused reason=not_pinned" in r.getMessage() and rogue.fingerprint in r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING"
    )

    # a proof signed over the wrong nonce is refused before the pin is even looked at
    reader, writer = await raw_member(
        one.port, ALPN_RAFT, rogue.ident, one.fingerprint, corrupt_signature=True
    )
    await expect_closed(reader)
    close_writer(writer)
    assert one.refused("bad_proof") == 1


@pytest.mark.asyncio
async def test_unpinned_server_is_refused(net: Net) -> None:
    one = await net.start(1)
    real_two = generate_node_identity(2, CLUSTER)  # what node 1 pins for node 2
    impostor = await net.start(2)  # a node 2 identity with another key, at node 2's address
    impostor.transport.update_pins({1: one.fingerprint}, {1: one.address})  # it would accept node 1
    called: list[int] = []

    async def echo(frm: int, payload: bytes) -> bytes:
        called.append(frm)
        return payload

    impostor.transport.register_rpc("echo", echo)
    one.transport.update_pins({2: real_two.fingerprint}, {2: impostor.address})
    with pytest.raises(RpcUnreachable):
        await one.transport.rpc(2, "echo", b"secret", 2.0)
    assert one.transport.send(2, b"raft frame")
    await eventually(lambda: one.refused("not_pinned") >= 2)
    assert called == [] and impostor.frames.empty()
    assert impostor.transport.stats.frames_received == 0


@pytest.mark.asyncio
async def test_identity_not_matching_the_pin_is_refused(net: Net) -> None:
    one = await net.start(1)
    five = await net.start(5)  # certificate says node 5 ...
    one.transport.update_pins({2: five.fingerprint}, {2: five.address})  # ... pinned as node 2
    five.transport.update_pins({1: one.fingerprint}, {1: one.address})
    # Both dial their new member's Raft channel at once: node 1's dial of "node 2" is refused
    # on its side, and five's dial is refused by node 1 (one attempt each, no retry loop).
    await eventually(lambda: one.refused("identity_mismatch") == 2)
    with pytest.raises(RpcUnreachable):  # outbound: node 1 dials "node 2"
        await one.transport.rpc(2, "echo", b"", 2.0)
    assert one.refused("identity_mismatch") == 3
    with pytest.raises(RpcUnreachable):  # inbound: the holder of that certificate dials node 1
        await five.transport.rpc(1, "echo", b"", 2.0)
    await eventually(lambda: one.refused("identity_mismatch") == 4)

    other = await net.start(2, cluster="other-cluster")  # right node id, wrong cluster
    one.transport.update_pins({2: other.fingerprint}, {2: other.address})
    await eventually(lambda: one.refused("identity_mismatch") == 5)  # the Raft channel's dial
    with pytest.raises(RpcUnreachable):
        await one.transport.rpc(2, "echo", b"", 2.0)
    assert one.refused("identity_mismatch") == 6
    assert one.frames.empty() and five.frames.empty() and other.frames.empty()


@pytest.mark.asyncio
async def test_only_tls13_with_a_cluster_alpn_is_accepted(net: Net) -> None:
    one = await net.start(1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await raw_tls(one.port, ALPN_RAFT, max_version=ssl.TLSVersion.TLSv1_2)
    await eventually(lambda: one.refused("handshake") == 1)

    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", one.port), WAIT_SECONDS)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS at all
    await expect_closed(reader)
    close_writer(writer)
    await eventually(lambda: one.refused("handshake") == 2)

    try:
        reader, writer = await raw_tls(one.port, "h2")
    except (ssl.SSLError, ConnectionError):
        pass  # refused during the handshake: also fine
    else:
        await expect_closed(reader)
        close_writer(writer)
    await eventually(lambda: one.refused("alpn") + one.refused("handshake") == 3)

    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", one.port), WAIT_SECONDS)
    close_writer(writer)  # a TCP probe: counted apart from real handshake failures
    await eventually(lambda: one.refused("handshake_aborted") == 1)
    assert one.refused("alpn") + one.refused("handshake") == 3
    assert one.transport.stats.frames_received == 0


# --- membership changes and bad frames ---------------------------------------------------------
@pytest.mark.asyncio
async def test_removing_a_pin_closes_its_connections_and_refuses_it(net: Net) -> None:
    one, two, three = await net.mesh(3)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def block(frm: int, payload: bytes) -> bytes:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    one.transport.register_rpc("block", block)
    assert two.transport.send(1, b"hello from 2")
    assert await one.next_frame() == (2, b"hello from 2")
    assert one.transport.send(2, b"hello from 1")
    assert await two.next_frame() == (1, b"hello from 1")
    call = asyncio.create_task(two.transport.rpc(1, "block", b"", 30.0))
    await asyncio.wait_for(started.wait(), WAIT_SECONDS)

    one.transport.update_pins({3: three.fingerprint}, {3: three.address})
    with pytest.raises(RpcUnreachable):  # closed at once, long before its 30 s timeout
        await asyncio.wait_for(call, WAIT_SECONDS)
    await asyncio.wait_for(cancelled.wait(), WAIT_SECONDS)
    assert one.transport.send(2, b"to a removed member") is False

    received = one.transport.stats.frames_received
    assert two.transport.send(1, b"after removal")  # node 2 still pins node 1: it redials
    await eventually(lambda: one.refused("not_pinned") >= 1)
    assert three.transport.send(1, b"from 3")
    assert await one.next_frame() == (3, b"from 3")  # the remaining member is unaffected
    assert one.frames.empty()
    assert one.transport.stats.frames_received == received + 1


@pytest.mark.asyncio
async def test_raft_channels_are_dialed_at_once_and_redialed_when_dropped(net: Net) -> None:
    """A member learned from update_pins gets its Raft channel before there is anything to send
    (followers say nothing to each other until an election, which must not wait for a dial), and
    a dropped channel is dialed again without waiting for traffic."""
    one, two = await net.mesh(2)
    stats1, stats2 = one.transport.stats, two.transport.stats
    peer1, peer2 = one.transport._raft.outgoing[2], two.transport._raft.outgoing[1]  # outgoing channels
    await eventually(lambda: peer1.conn is not None and peer2.conn is not None)
    assert stats1.connections_accepted == 1 and stats2.connections_accepted == 1
    assert stats1.frames_sent == 0 and stats2.frames_sent == 0
    dropped = peer2.conn
    assert dropped is not None
    dropped.abort()
    await eventually(lambda: peer2.conn is not None and peer2.conn is not dropped)  # redialed
    assert stats1.connections_accepted == 2 and stats2.frames_sent == 0
    assert two.transport.send(1, b"after the drop")
    assert await one.next_frame() == (2, b"after the drop")
    assert stats1.connections_accepted == 2  # the frame took the warm channel


@pytest.mark.asyncio
async def test_malformed_frame_closes_only_that_connection(net: Net) -> None:
    one, two = await net.mesh(2)
    nine = generate_node_identity(9, CLUSTER)
    one.transport.update_pins({2: two.fingerprint, 9: nine.fingerprint}, {2: two.address})
    assert two.transport.send(1, b"before")
    assert await one.next_frame() == (2, b"before")
    dials = two.transport.stats.connections_dialed

    reader, writer = await raw_member(one.port, ALPN_RAFT, nine, one.fingerprint)
    await expect_accept(reader)
    writer.write(frame_bytes(b"valid frame from 9"))
    assert await one.next_frame() == (9, b"valid frame from 9")
    writer.write(b"\xff\xff\xff\xffjunk")  # length over 32 MiB
    await expect_closed(reader)
    close_writer(writer)
    assert one.transport.stats.malformed_frames == 1

    reader, writer = await raw_member(one.port, ALPN_RPC, nine, one.fingerprint)
    await expect_accept(reader)
    writer.write(frame_bytes(b"\xc1 not msgpack"))
    await expect_closed(reader)
    close_writer(writer)
    assert one.transport.stats.malformed_frames == 2

    assert two.transport.send(1, b"after")
    assert await one.next_frame() == (2, b"after")
    assert two.transport.stats.connections_dialed == dials  # node 2's connection was never touched
    assert one.frames.empty()


# --- join channel --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_join_with_pinned_server(net: Net) -> None:
    one = await net.start(1)
    calls: list[tuple[bytes, bytes]] = []

    async def on_join(payload: bytes, cert_der: bytes) -> bytes:
        calls.append((payload, cert_der))
        if payload == b"fail":
            raise RuntimeError("join refused: bad token")
        return b"welcome:" + payload

    one.transport.register_join_handler(on_join)
    joiner = generate_node_identity(4, CLUSTER)  # not pinned anywhere
    reply = await join_call(one.address, one.fingerprint, b"please", joiner.cert_pem, joiner.key_pem, 5.0)
    assert reply == b"welcome:please"
    assert calls == [(b"please", pem_to_der(joiner.cert_pem))]

    other = generate_node_identity(1, CLUSTER)
    with pytest.raises(JoinPinMismatch):
        await join_call(one.address, other.fingerprint, b"x", joiner.cert_pem, joiner.key_pem, 5.0)
    assert len(calls) == 1 and one.transport.stats.join_requests == 1  # nothing was sent

    with pytest.raises(JoinRemoteError, match="bad token"):
        await join_call(one.address, one.fingerprint, b"fail", joiner.cert_pem, joiner.key_pem, 5.0)
    assert one.transport.stats.frames_received == 0


@pytest.mark.asyncio
async def test_join_channel_is_no_shortcut_to_raft(net: Net) -> None:
    one, two = await net.mesh(2)
    calls: list[bytes] = []

    async def on_join(payload: bytes, cert_der: bytes) -> bytes:
        calls.append(cert_der)
        return b"ok"

    one.transport.register_join_handler(on_join)
    # a member certificate on the join channel, then a Raft-shaped frame instead of a join request
    reader, writer = await raw_member(one.port, ALPN_JOIN, two.ident, one.fingerprint)
    await expect_accept(reader)
    writer.write(frame_bytes(b"\x00raft message bytes"))
    await expect_closed(reader)
    close_writer(writer)
    assert one.transport.stats.malformed_frames == 1
    assert calls == []

    # the same member certificate through a real join call reaches only the join handler
    assert (
        await join_call(one.address, one.fingerprint, b"j", two.ident.cert_pem, two.ident.key_pem, 5.0)
        == b"ok"
    )
    assert calls == [pem_to_der(two.ident.cert_pem)]
    assert one.frames.empty() and one.transport.stats.frames_received == 0


@pytest.mark.asyncio
async def test_join_without_handler_is_refused(net: Net) -> None:
    one = await net.start(1)
    joiner = generate_node_identity(4, CLUSTER)
    with pytest.raises(Exception) as info:
        await join_call(one.address, one.fingerprint, b"x", joiner.cert_pem, joiner.key_pem, 5.0)
    assert not isinstance(info.value, JoinPinMismatch)
    assert one.refused("join_unavailable") == 1


# --- the production event loop --------------------------------------------------------------------
def test_frames_rpc_and_refusal_under_uvloop() -> None:
    async def scenario() -> None:
        n = Net()
        try:
            one, two = await n.mesh(2)

            async def echo(frm: int, payload: bytes) -> bytes:
                return payload + b"!"

            two.transport.register_rpc("echo", echo)
            for k in range(100):
                assert one.transport.send(2, b"%d" % k)
            assert [(await two.next_frame())[1] for _ in range(100)] == [b"%d" % k for k in range(100)]
            assert await one.transport.rpc(2, "echo", b"hi", 2.0) == b"hi!"
            rogue = await n.start(9)
            rogue.transport.update_pins({1: one.fingerprint}, {1: one.address})
            await eventually(lambda: one.refused("not_pinned") == 1)  # its Raft channel, dialed at once
            with pytest.raises(RpcUnreachable):
                await rogue.transport.rpc(1, "echo", b"", 2.0)
            await eventually(lambda: one.refused("not_pinned") == 2)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await raw_tls(one.port, ALPN_RAFT, max_version=ssl.TLSVersion.TLSv1_2)
            await eventually(lambda: one.refused("handshake") == 1)
        finally:
            await n.close()

    uvloop.run(asyncio.wait_for(scenario(), 30))


# --- the read buffer (no network) ------------------------------------------------------------
class _NullTransport:
    def __init__(self) -> None:
        self.aborted = False

    def get_extra_info(self, name: str) -> None:
        return None

    def abort(self) -> None:
        self.aborted = True


def test_read_buffer_reassembles_frames_of_any_size_from_reads_of_any_size() -> None:
    """The loop writes into ``get_buffer``'s view and reports with ``buffer_updated``; frames
    larger than the buffer make it grow to hold them, and it shrinks back once they are gone."""
    import random

    from quorumd.raft.aio.transport import connection as cmod

    loop = asyncio.new_event_loop()
    try:
        conn = cmod._Conn(loop, None, "test")
        conn.connection_made(_NullTransport())  # type: ignore[arg-type]
        conn.max_frame = 4 * 1024 * 1024
        got: list[bytes] = []
        conn.use_handler(lambda _c, frame: got.append(frame))
        rng = random.Random(7)
        sizes = [0, 1, 5000, 300_000, 12, 70_000, 2_000_000, 3, 64 * 1024 - 4, 64 * 1024]
        frames = [rng.randbytes(n) for n in sizes]
        stream = b"".join(frame_bytes(f) for f in frames)
        pos = 0
        while pos < len(stream):
            view = conn.get_buffer(-1)
            assert len(view) > 0
            n = min(len(view), rng.choice([1, 3, 700, 16 * 1024, 200_000]), len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            del view
            conn.buffer_updated(n)
            pos += n
        assert got == frames
        assert len(conn._buf) == cmod._READ_BUFFER_BYTES  # the 2 MB frame's buffer was given back
        assert conn._len == 0
    finally:
        loop.close()


def test_read_buffer_refuses_an_oversized_frame_and_unauthenticated_excess() -> None:
    from quorumd.raft.aio.transport import connection as cmod

    loop = asyncio.new_event_loop()
    try:
        # a declared length over the limit: refused without buffering the frame
        conn = cmod._Conn(loop, None, "test")
        t = _NullTransport()
        conn.connection_made(t)  # type: ignore[arg-type]
        conn.use_handler(lambda _c, frame: None)
        view = conn.get_buffer(-1)
        header = struct.pack(">I", conn.max_frame + 1)
        view[:4] = header
        del view
        conn.buffer_updated(4)
        assert t.aborted
        assert len(conn.get_buffer(-1)) <= cmod._READ_BUFFER_BYTES + conn.max_frame

        # before authentication (no handler yet): more than one frame's worth is refused
        conn = cmod._Conn(loop, None, "test")
        t = _NullTransport()
        conn.connection_made(t)  # type: ignore[arg-type]
        sent = 0
        while not t.aborted and sent < 4 * conn.max_frame:
            view = conn.get_buffer(-1)
            n = len(view)
            del view
            conn.buffer_updated(n)
            sent += n
        assert t.aborted
        assert sent <= conn.max_frame + cmod._READ_BUFFER_BYTES + 4
    finally:
        loop.close()
