"""ClusterTransport on loopback while a member rotates its certificate: a member pinned by two
fingerprints, ``set_identity`` (new connections prove the new certificate, the old key opens
nothing once unpinned), connections retired gently when their fingerprint is unpinned (calls in
flight are answered), and a Raft connection replaced new-first so that the peer never takes the
switch for a failure (``on_raft_peer_lost``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from quorumd.node.cluster.pki import generate_node_identity
from quorumd.raft.aio.transport import ALPN_RAFT, ALPN_RPC, RpcUnreachable, peers
from quorumd.raft.aio.transport.connection import _Conn
from tests.test_transport import CLUSTER, WAIT_SECONDS, Net, Node, eventually
from tests.test_transport import net as net  # the fixture


async def echo(frm: int, payload: bytes) -> bytes:
    return b"%d:" % frm + payload


def inbound(node: Node, peer: int, channel: str) -> list[_Conn]:
    """``node``'s live connections that member ``peer`` dialed on ``channel``."""
    conns = node.transport._peers.member_conns.get(peer, set())
    return [c for c in conns if not c.outbound and c.channel == channel and not c.lost]


def outbound(node: Node, peer: int, channel: str) -> list[_Conn]:
    conns = node.transport._peers.member_conns.get(peer, set())
    return [c for c in conns if c.outbound and c.channel == channel and not c.lost]


class Gate:
    """An RPC handler that waits for ``release`` (a call held in flight)."""

    def __init__(self) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def __call__(self, frm: int, payload: bytes) -> bytes:
        self.entered.set()
        await self.release.wait()
        return b"answered " + payload

    async def held(self, call: Callable[[], Awaitable[bytes]]) -> asyncio.Future[bytes]:
        task = asyncio.ensure_future(call())
        await asyncio.wait_for(self.entered.wait(), WAIT_SECONDS)
        return task


@pytest.mark.asyncio
async def test_a_member_pinned_by_two_fingerprints_is_accepted_with_either(net: Net) -> None:
    first, second = generate_node_identity(1, CLUSTER), generate_node_identity(1, CLUSTER)
    b = await net.start(2)
    old_one = await net.start(1, ident=first)  # node 1 with its current certificate ...
    new_one = await net.start(1, ident=second)  # ... and with the next one
    b.transport.register_rpc("echo", echo)
    for a in (old_one, new_one):
        a.transport.register_rpc("echo", echo)
        a.transport.update_pins({2: b.fingerprint}, {2: b.address})
    b.transport.update_pins({1: (first.fingerprint, second.fingerprint)}, {1: old_one.address})
    assert await old_one.transport.rpc(2, "echo", b"old", 2.0) == b"1:old"
    assert await new_one.transport.rpc(2, "echo", b"new", 2.0) == b"1:new"
    assert {c.fingerprint for c in inbound(b, 1, ALPN_RPC)} == {first.fingerprint, second.fingerprint}
    assert new_one.transport.send(2, b"raft")
    assert await b.next_frame() == (1, b"raft")
    # and as a server: node 2 dials node 1 at either address, either certificate passes
    assert await b.transport.rpc(1, "echo", b"x", 2.0) == b"2:x"
    b.transport.update_pins({1: (first.fingerprint, second.fingerprint)}, {1: new_one.address})
    assert await b.transport.rpc(1, "echo", b"y", 2.0) == b"2:y"
    assert {c.fingerprint for c in outbound(b, 1, ALPN_RPC)} == {second.fingerprint}
    assert b.refused("not_pinned") == 0


@pytest.mark.asyncio
async def test_set_identity_switches_new_connections_and_the_old_key_is_refused_once_unpinned(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quorumd.raft.aio.transport")
    a, b = await net.mesh(2)
    old, new = a.ident, generate_node_identity(1, CLUSTER)
    for n in (a, b):
        n.transport.register_rpc("echo", echo)
    b.transport.update_pins({1: (old.fingerprint, new.fingerprint)}, {1: a.address})
    assert await a.transport.rpc(2, "echo", b"before", 2.0) == b"1:before"
    assert {c.fingerprint for c in inbound(b, 1, ALPN_RPC)} == {old.fingerprint}

    assert a.transport.set_identity(new.cert_pem, new.key_pem) == new.fingerprint
    assert a.transport.fingerprint == new.fingerprint
    assert any("cluster_identity_switched" in r.getMessage() for r in caplog.records)
    assert await a.transport.rpc(2, "echo", b"after", 2.0) == b"1:after"  # B pins both
    await eventually(lambda: {c.fingerprint for c in inbound(b, 1, ALPN_RPC)} == {new.fingerprint})
    await eventually(lambda: {c.fingerprint for c in inbound(b, 1, ALPN_RAFT)} == {new.fingerprint})
    await eventually(lambda: a.transport.connections_closed(old.fingerprint) == [])  # old dials closed
    assert a.transport.send(2, b"raft after")
    assert await b.next_frame() == (1, b"raft after")

    b.transport.update_pins({1: new.fingerprint}, {1: a.address})  # the rotation unpins the old one
    assert await a.transport.rpc(2, "echo", b"new only", 2.0) == b"1:new only"
    # node 2's connections to node 1 were authenticated by node 1's old server certificate:
    # retired, and the next call dials anew and meets the new one
    assert await b.transport.rpc(1, "echo", b"to 1", 2.0) == b"2:to 1"
    assert {c.fingerprint for c in outbound(b, 1, ALPN_RPC)} == {new.fingerprint}

    ghost = await net.start(1, ident=old)  # whoever still holds the old certificate and key
    ghost.transport.update_pins({2: b.fingerprint}, {2: b.address})
    refused = b.refused("not_pinned")
    with pytest.raises(RpcUnreachable):
        await ghost.transport.rpc(2, "echo", b"", 2.0)
    await eventually(lambda: b.refused("not_pinned") > refused)
    assert any(
        "peer_refused reason=not_pinned" in r.getMessage() and old.fingerprint in r.getMessage()
        for r in caplog.records
    )
    assert await a.transport.rpc(2, "echo", b"still", 2.0) == b"1:still"


@pytest.mark.asyncio
async def test_a_call_in_flight_is_answered_when_its_fingerprint_is_unpinned(net: Net) -> None:
    """Both directions: node 1 calls node 2 (node 2 retires the connection it accepted) and node
    2 calls node 1 (node 2 retires the connection it dialed)."""
    a, b = await net.mesh(2)
    old, new = a.ident, generate_node_identity(1, CLUSTER)
    to_b, to_a = Gate(), Gate()
    b.transport.register_rpc("wait", to_b)
    a.transport.register_rpc("wait", to_a)
    for n in (a, b):
        n.transport.register_rpc("echo", echo)
    b.transport.update_pins({1: (old.fingerprint, new.fingerprint)}, {1: a.address})
    from_a = await to_b.held(lambda: a.transport.rpc(2, "wait", b"from 1", 10.0))
    from_b = await to_a.held(lambda: b.transport.rpc(1, "wait", b"from 2", 10.0))
    [a_dialed] = [c for c in inbound(b, 1, ALPN_RPC) if c.fingerprint == old.fingerprint]
    [b_dialed] = [c for c in outbound(b, 1, ALPN_RPC) if c.fingerprint == old.fingerprint]
    [a_side] = outbound(a, 2, ALPN_RPC)  # a_dialed, as node 1 holds it

    a.transport.set_identity(new.cert_pem, new.key_pem)
    b.transport.update_pins({1: new.fingerprint}, {1: a.address})
    assert a_dialed.retiring and b_dialed.retiring
    assert not a_dialed.closed.done() and not b_dialed.closed.done()  # calls still in flight
    to_b.release.set()
    to_a.release.set()
    assert await asyncio.wait_for(from_a, WAIT_SECONDS) == b"answered from 1"
    assert await asyncio.wait_for(from_b, WAIT_SECONDS) == b"answered from 2"
    await asyncio.wait_for(asyncio.gather(a_dialed.closed, b_dialed.closed), WAIT_SECONDS)

    assert await a.transport.rpc(2, "echo", b"next", 2.0) == b"1:next"  # over a new connection
    assert await b.transport.rpc(1, "echo", b"next", 2.0) == b"2:next"
    now_a, now_b = a.transport._rpc.outgoing[2].conn, b.transport._rpc.outgoing[1].conn
    assert now_a is not None and now_a is not a_side and now_a.local_fingerprint == new.fingerprint
    assert now_b is not None and now_b is not b_dialed and now_b.fingerprint == new.fingerprint
    assert {c.fingerprint for c in inbound(b, 1, ALPN_RPC)} == {new.fingerprint}
    assert {c.fingerprint for c in outbound(b, 1, ALPN_RPC)} == {new.fingerprint}


@pytest.mark.asyncio
async def test_a_call_in_flight_when_the_whole_member_is_unpinned(net: Net) -> None:
    """As before rotation: what is in flight may still be answered within the grace, then the
    member's connections are closed and it is refused; a call that is not answered in time fails
    (``test_removing_a_pin_closes_its_connections_and_refuses_it``)."""
    a, b = await net.mesh(2)
    gate = Gate()
    b.transport.register_rpc("wait", gate)
    b.transport.register_rpc("echo", echo)
    call = await gate.held(lambda: a.transport.rpc(2, "wait", b"last", 10.0))
    [conn] = inbound(b, 1, ALPN_RPC)
    b.transport.update_pins({}, {})
    assert conn.retiring and not conn.closed.done()
    gate.release.set()
    assert await asyncio.wait_for(call, WAIT_SECONDS) == b"answered last"
    await asyncio.wait_for(conn.closed, WAIT_SECONDS)
    refused = b.refused("not_pinned")
    with pytest.raises(RpcUnreachable):
        await a.transport.rpc(2, "echo", b"", 2.0)
    await eventually(lambda: b.refused("not_pinned") > refused)


@pytest.mark.asyncio
@pytest.mark.parametrize("b_dials_a", [False, True], ids=["only_a_dials", "both_dial"])
async def test_a_replaced_raft_connection_is_no_failure_hint_but_a_closed_transport_is(
    net: Net, b_dials_a: bool
) -> None:
    """Node 2 hears of node 1's failure when node 1's last Raft connection with it closes. A
    rotation replaces node 1's Raft connection new-first, so node 2 always has one. (Only node 1
    dials unless ``b_dials_a``: node 2's own Raft connection to node 1 would hide the gap.)"""
    a = await net.start(1)
    b = await net.start(2)
    new = generate_node_identity(1, CLUSTER)
    lost: list[int] = []
    b.transport.on_raft_peer_lost = lost.append
    a.transport.update_pins({2: b.fingerprint}, {2: b.address})
    b.transport.update_pins({1: (a.fingerprint, new.fingerprint)}, {1: a.address} if b_dials_a else {})
    await eventually(lambda: len(inbound(b, 1, ALPN_RAFT)) == 1)
    [first] = inbound(b, 1, ALPN_RAFT)

    a.transport.set_identity(new.cert_pem, new.key_pem)
    await eventually(lambda: first.closed.done())
    assert [c.fingerprint for c in inbound(b, 1, ALPN_RAFT)] == [new.fingerprint]
    assert a.transport.send(2, b"over the new connection")
    assert await b.next_frame() == (1, b"over the new connection")
    b.transport.update_pins({1: new.fingerprint}, {1: a.address} if b_dials_a else {})  # the unpin
    if b_dials_a:  # node 2's own connection, made to node 1's old certificate, is replaced too
        await eventually(lambda: [c.fingerprint for c in outbound(b, 1, ALPN_RAFT)] == [new.fingerprint])
    assert a.transport.send(2, b"after the unpin")
    assert await b.next_frame() == (1, b"after the unpin")
    assert lost == []

    await a.transport.close()  # the process is gone
    await eventually(lambda: lost == [1])


@pytest.mark.asyncio
async def test_a_call_right_after_an_address_change_goes_to_the_new_address(net: Net) -> None:
    """The connection to the old address is aborted, which completes on a later turn of the
    event loop: a call made before that must not pick it (and fail) but dial the new address."""
    a, b = await net.mesh(2)
    moved = await net.start(1, ident=a.ident)  # node 1, same certificate, elsewhere
    moved.transport.update_pins({2: b.fingerprint}, {2: b.address})
    for n in (a, moved):
        n.transport.register_rpc("where", lambda frm, payload, n=n: _answer(n.address))
    assert await b.transport.rpc(1, "where", b"", 2.0) == a.address.encode()
    b.transport.update_pins({1: a.fingerprint}, {1: moved.address})
    assert await b.transport.rpc(1, "where", b"", 2.0) == moved.address.encode()


async def _answer(text: str) -> bytes:
    return text.encode()


class HeldDials:
    """Holds this process's dials on ``alpn`` after the TLS handshake, before the in-band proof
    (a dial in flight), until ``release`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, alpn: str) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        prove = peers._client_prove

        async def held(conn: _Conn, channel: str, *args: object) -> None:
            if channel == alpn:
                self.entered.set()
                await self.release.wait()
            await prove(conn, channel, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(peers, "_client_prove", held)


@pytest.mark.asyncio
async def test_an_rpc_dial_in_flight_when_the_identity_switches_still_carries_its_call(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await net.mesh(2)
    old, new = a.ident, generate_node_identity(1, CLUSTER)
    b.transport.register_rpc("echo", echo)
    b.transport.update_pins({1: (old.fingerprint, new.fingerprint)}, {1: a.address})
    dials = HeldDials(monkeypatch, ALPN_RPC)
    call = asyncio.ensure_future(a.transport.rpc(2, "echo", b"during", 5.0))
    await asyncio.wait_for(dials.entered.wait(), WAIT_SECONDS)
    a.transport.set_identity(new.cert_pem, new.key_pem)
    dials.release.set()
    assert await asyncio.wait_for(call, WAIT_SECONDS) == b"1:during"
    used = a.transport._rpc.outgoing[2].conn
    assert used is not None and used.local_fingerprint == new.fingerprint
    await eventually(lambda: a.transport.connections_closed(old.fingerprint) == [])


@pytest.mark.asyncio
async def test_a_raft_dial_in_flight_when_the_identity_switches_is_replaced_too(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await net.start(1)
    b = await net.start(2)
    old, new = a.ident, generate_node_identity(1, CLUSTER)
    lost: list[int] = []
    b.transport.on_raft_peer_lost = lost.append
    b.transport.update_pins({1: (old.fingerprint, new.fingerprint)}, {})
    dials = HeldDials(monkeypatch, ALPN_RAFT)
    a.transport.update_pins({2: b.fingerprint}, {2: b.address})  # node 1 dials its Raft channel
    await asyncio.wait_for(dials.entered.wait(), WAIT_SECONDS)
    a.transport.set_identity(new.cert_pem, new.key_pem)
    dials.release.set()
    await eventually(lambda: [c.fingerprint for c in inbound(b, 1, ALPN_RAFT)] == [new.fingerprint])
    await eventually(lambda: a.transport.connections_closed(old.fingerprint) == [])
    assert a.transport.send(2, b"frame")
    assert await b.next_frame() == (1, b"frame")
    assert lost == []
