"""Address changes in the transport: a DNS name is resolved at every dial (never cached beyond one
connection), every address a name resolves to is tried, and a member whose address changes is
redialed at once at the new one, even while the channel backs off from the old one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import pytest_asyncio

from quorumd.node.cluster.pki import NodeIdentity, generate_node_identity
from quorumd.raft.aio.transport import ClusterTransport, RpcUnreachable
from tests.cluster import free_port

pytestmark = pytest.mark.asyncio
CLUSTER = "test-cluster"
WAIT_SECONDS = 5.0


class Transports:
    def __init__(self) -> None:
        self.started: list[ClusterTransport] = []
        self.a: tuple[NodeIdentity, str] | None = None

    async def start(
        self,
        node_id: int,
        ident: NodeIdentity,
        bind: str,
        *,
        resolver: Callable[[str, int], object] | None = None,
        on_frame: Callable[[int, bytes], None] = lambda _f, _b: None,
        backoff_seconds: float = 0.05,
        knows_a: bool = True,
    ) -> ClusterTransport:
        t = ClusterTransport(
            node_id,
            CLUSTER,
            ident.cert_pem,
            ident.key_pem,
            {},
            {},
            on_frame,
            connect_timeout_seconds=2.0,
            backoff_min_seconds=backoff_seconds,
            backoff_max_seconds=backoff_seconds,
            resolver=resolver,  # type: ignore[arg-type]
        )
        await t.start(bind)
        self.started.append(t)
        if self.a is not None and node_id != 1 and knows_a:  # every other node knows node 1 (the dialer)
            a_ident, a_bind = self.a
            t.update_pins({1: a_ident.fingerprint}, {1: a_bind})
        if node_id == 1:
            self.a = (ident, bind)
        return t

    async def close(self) -> None:
        for t in self.started:
            await t.close()


@pytest_asyncio.fixture
async def ts() -> AsyncIterator[Transports]:
    t = Transports()
    try:
        yield t
    finally:
        await t.close()


async def answer(t: ClusterTransport, node_id: int) -> bytes:
    """An RPC answer from ``node_id``, retrying while a lost connection is noticed (bounded)."""
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            try:
                return await t.rpc(node_id, "where", b"", 1.0)
            except RpcUnreachable:
                await asyncio.sleep(0.01)


async def test_a_name_is_resolved_at_every_dial(ts: Transports) -> None:
    a_id, b_id = generate_node_identity(1, CLUSTER), generate_node_identity(2, CLUSTER)
    port = free_port("127.0.0.31")
    names = {"node-b.test": ["127.0.0.31"]}
    lookups: list[str] = []

    async def resolver(host: str, _port: int) -> Sequence[str]:
        lookups.append(host)
        return names[host]

    a = await ts.start(1, a_id, f"127.0.0.1:{free_port()}", resolver=resolver)
    a.update_pins({2: b_id.fingerprint}, {2: f"node-b.test:{port}"})
    b1 = await ts.start(2, b_id, f"127.0.0.31:{port}")

    async def one(_frm: int, _payload: bytes) -> bytes:
        return b"one"

    b1.register_rpc("where", one)
    assert await answer(a, 2) == b"one"
    assert "node-b.test" in lookups

    # The host changes address behind the name: the same identity now listens elsewhere.
    await b1.close()
    names["node-b.test"] = ["127.0.0.32"]
    b2 = await ts.start(2, b_id, f"127.0.0.32:{port}")

    async def two(_frm: int, _payload: bytes) -> bytes:
        return b"two"

    b2.register_rpc("where", two)
    before = len(lookups)
    assert await answer(a, 2) == b"two"  # no pin or address update: the name was looked up again
    assert len(lookups) > before


async def test_every_address_of_a_name_is_tried(ts: Transports) -> None:
    a_id, b_id = generate_node_identity(1, CLUSTER), generate_node_identity(2, CLUSTER)
    port = free_port("127.0.0.33")

    async def resolver(_host: str, _port: int) -> Sequence[str]:
        return ["127.0.0.34", "127.0.0.33"]  # the first refuses: nothing listens there

    a = await ts.start(1, a_id, f"127.0.0.1:{free_port()}", resolver=resolver)
    a.update_pins({2: b_id.fingerprint}, {2: f"node-b.test:{port}"})
    b = await ts.start(2, b_id, f"127.0.0.33:{port}")

    async def here(_frm: int, _payload: bytes) -> bytes:
        return b"here"

    b.register_rpc("where", here)
    assert await answer(a, 2) == b"here"


async def test_without_a_resolver_names_are_looked_up(ts: Transports) -> None:
    a_id, b_id = generate_node_identity(1, CLUSTER), generate_node_identity(2, CLUSTER)
    port = free_port()
    a = await ts.start(1, a_id, f"127.0.0.1:{free_port()}")
    b = await ts.start(2, b_id, f"127.0.0.1:{port}")
    a.update_pins({2: b_id.fingerprint}, {2: f"localhost:{port}"})  # ::1 first, maybe: then 127.0.0.1

    async def here(_frm: int, _payload: bytes) -> bytes:
        return b"here"

    b.register_rpc("where", here)
    assert await answer(a, 2) == b"here"


async def b_accepts(b: ClusterTransport, node_id: int, fingerprint: str) -> None:
    """Pin ``node_id`` on ``b`` without an address: it accepts the node's connections, never dials."""
    b.update_pins({node_id: fingerprint}, {})


async def test_a_moved_member_is_redialed_at_once(ts: Transports) -> None:
    """The Raft channel backs off from the old address (30 s here); the address change cuts it
    short, so frames flow to the new address at once."""
    a_id, b_id = generate_node_identity(1, CLUSTER), generate_node_identity(2, CLUSTER)
    old_port = free_port("127.0.0.35")
    got: asyncio.Queue[bytes] = asyncio.Queue()
    a = await ts.start(1, a_id, f"127.0.0.1:{free_port()}", backoff_seconds=30.0)
    a.update_pins({2: b_id.fingerprint}, {2: f"127.0.0.35:{old_port}"})  # nothing listens there
    a.send(2, b"lost")
    async with asyncio.timeout(WAIT_SECONDS):  # the dial to the old address failed: backing off
        while a.stats.frames_dropped == 0:
            await asyncio.sleep(0.005)
    new_port = free_port("127.0.0.36")
    # b does not dial a (that alone would cut a's backoff short): only the address change may.
    await ts.start(
        2, b_id, f"127.0.0.36:{new_port}", on_frame=lambda _f, frame: got.put_nowait(frame), knows_a=False
    )
    await b_accepts(ts.started[-1], 1, a_id.fingerprint)
    a.update_pins({2: b_id.fingerprint}, {2: f"127.0.0.36:{new_port}"})
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            a.send(2, b"hello")
            try:
                assert await asyncio.wait_for(got.get(), 0.2) == b"hello"
                break
            except TimeoutError:
                continue


async def test_rpc_at_an_address_names_the_member_that_answers(ts: Transports) -> None:
    a_id, b_id = generate_node_identity(1, CLUSTER), generate_node_identity(2, CLUSTER)
    port = free_port("127.0.0.37")
    a = await ts.start(1, a_id, f"127.0.0.1:{free_port()}")
    a.update_pins({2: b_id.fingerprint}, {2: "127.0.0.1:1"})  # the registry's address is stale
    b = await ts.start(2, b_id, f"127.0.0.37:{port}")

    async def here(_frm: int, _payload: bytes) -> bytes:
        return b"here"

    b.register_rpc("where", here)
    assert await a.rpc_at(f"127.0.0.37:{port}", "where", b"", WAIT_SECONDS) == (2, b"here")
    stranger = generate_node_identity(3, CLUSTER)  # answers, but is not pinned: refused
    other = free_port("127.0.0.38")
    await ts.start(3, stranger, f"127.0.0.38:{other}")
    with pytest.raises(RpcUnreachable):
        await a.rpc_at(f"127.0.0.38:{other}", "where", b"", WAIT_SECONDS)
