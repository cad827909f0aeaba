"""GET /backup as a stream, in one process: the leader's held archives (``ArchiveStore``), the
``backup.read`` RPC and its refusals, a follower's relay in many chunks, a leader change
part-way, and the HTTP server writing a streamed body (and aborting one that fails).

The node is a stand-in with the real state machine (tests/test_backup.py ``sample_state``) and the
real ``NodeBackups``; ``call_member`` calls the leader's ``backup.read`` handler directly, with
the node layer's error mapping. Live daemons: tests/integration/test_backup_live.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from quorumd.api.app import build_app
from quorumd.api.errors import ApiError
from quorumd.api.origin import RequestOrigin, current_origin
from quorumd.api.ports import Principal, TokenRole
from quorumd.api.server import ApiServer
from quorumd.node.cluster import backup as backup_mod
from quorumd.node.cluster.backup import BackupGone, HeldArchive, NodeBackups
from quorumd.node.registry.archive import ArchiveHeader, decode_archive
from quorumd.raft.codec import packb
from tests.fakes.node import FakeCluster, FakeNode
from tests.test_backup import CLUSTER, sample_state

ADMIN, OTHER_ADMIN, READER = "admin-token", "other-admin-token", "reader-token"
PRINCIPALS = {
    ADMIN: Principal("0123456789ab", TokenRole.ADMIN),
    OTHER_ADMIN: Principal("ba9876543210", TokenRole.ADMIN),
    READER: Principal("aaaaaaaaaaaa", TokenRole.READONLY),
}


class StubNode:
    """What ``NodeBackups`` uses of a ``ClusterService`` (see the module docstring)."""

    def __init__(self, node_id: int, sm: Any, peers: dict[int, StubNode]) -> None:
        self.sm = sm
        self.identity = SimpleNamespace(node_id=node_id, cluster_id=CLUSTER, version="test")
        core = SimpleNamespace(term=3, log=SimpleNamespace(term=lambda index: 3))
        self.driver = self.running_driver = SimpleNamespace(core=core)
        self.cluster_enabled = True
        self.leading = False
        self.leader = 0
        self.peers = peers
        self.barriers = 0
        self.recorded: list[dict[str, Any]] = []
        self.trail = self
        self.versions = SimpleNamespace(member_version=lambda node_id: 2)
        self.backups = NodeBackups(self)  # type: ignore[arg-type]
        self.reads = 0
        peers[node_id] = self

    def is_leader(self) -> bool:
        return self.leading

    def leader_id(self) -> int:
        return self.leader

    async def linearizable_barrier(self) -> None:
        self.barriers += 1

    def authenticate(self, token: str) -> Principal | None:
        return PRINCIPALS.get(token)

    async def record_request(self, action: Any, target: str, detail: dict[str, Any]) -> None:
        self.recorded.append({"action": str(action), "target": target, **detail})

    async def call_member(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        assert method == backup_mod.READ_RPC
        target = self.peers[node_id]
        target.reads += 1
        try:
            return await target.backups.rpc_read(self.identity.node_id, payload)
        except ApiError as exc:  # as ClusterService.call_member maps a remote error
            raise ApiError(502, "leader_error", f"node {node_id} failed: {exc.code}: {exc.message}") from exc


def pair(leases: int = 300) -> tuple[StubNode, StubNode]:
    peers: dict[int, StubNode] = {}
    sm = sample_state(leases)
    leader, follower = StubNode(1, sm, peers), StubNode(2, sm, peers)
    leader.leading = True
    leader.leader = follower.leader = 1
    return leader, follower


async def open_on_leader(leader: StubNode, holder: str = "member:2", token: str = ADMIN) -> dict[str, Any]:
    """What the leader answers a forwarded GET /backup: the handle of a held archive."""
    reset = current_origin.set(RequestOrigin(PRINCIPALS[token].token_id, 2, "192.0.2.7"))
    try:
        stream = await leader.backups.archive()
    finally:
        current_origin.reset(reset)
    return stream.handoff(holder)


async def collect(stream: Any) -> bytes:
    out = bytearray()
    async for piece in stream.chunks():
        out += piece
    return bytes(out)


def read(transfer: str, offset: int, n: int, token: str = ADMIN) -> bytes:
    return packb([transfer, offset, n, token])


# --- held archives --------------------------------------------------------------------------------


def test_read_slices_across_pieces() -> None:
    header = ArchiveHeader(CLUSTER, 1, 1, 1.0, 1, "t", 3)
    pieces = [b"abc", b"", b"defgh", b"i", b"jklmnop"]
    held = HeldArchive("x", pieces, header, "0" * 64, None, None)
    whole = b"".join(pieces)
    assert held.size == len(whole)
    for offset in range(len(whole)):
        for n in (1, 2, 3, 5, 8, 100):
            assert held.read(offset, n) == whole[offset : offset + n], (offset, n)


@pytest.mark.asyncio
async def test_leader_archive_is_streamed_in_pieces_and_names_the_leader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backup_mod, "STREAM_PIECE_BYTES", 1000)
    leader, _ = pair(400)
    stream = await leader.backups.archive()
    pieces = [bytes(p) async for p in stream.chunks()]
    body = b"".join(pieces)
    assert len(pieces) > 5 and max(len(p) for p in pieces) <= 1000
    assert hashlib.sha256(body).hexdigest() == stream.sha256 and len(body) == stream.size
    archive = decode_archive(body)
    assert archive.header.node_id == 1 and archive.header.index == leader.sm.applied_index == stream.index
    assert archive.state == leader.sm.snapshot()
    assert leader.barriers == 1 and leader.recorded == [{"action": "backup_export", "target": "cluster",
                                                          "index": stream.index}]  # fmt: skip
    assert not leader.backups.store.held  # sent: dropped
    stream.close()


@pytest.mark.asyncio
async def test_held_archives_are_bounded_in_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, _ = pair(50)
    first = await leader.backups.archive()
    second = await leader.backups.archive()
    with pytest.raises(ApiError) as busy:
        await leader.backups.archive()
    assert busy.value.status == 503 and busy.value.code == "backup_busy"
    first.close()
    third = await leader.backups.archive()  # a slot is free again
    second.close()
    third.close()
    assert not leader.backups.store.held
    monkeypatch.setattr(backup_mod, "MAX_HELD_BYTES", first.size + first.size // 2)
    alone = await leader.backups.archive()  # one archive alone is always allowed
    with pytest.raises(ApiError) as over:
        await leader.backups.archive()
    assert over.value.code == "backup_busy"
    alone.close()


@pytest.mark.asyncio
async def test_an_idle_held_archive_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "IDLE_SECONDS", 0.2)
    leader, _follower = pair(50)
    handle = await open_on_leader(leader)
    deadline = time.monotonic() + 10
    while leader.backups.store.held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling a condition with a deadline
    assert not leader.backups.store.held
    with pytest.raises(ApiError) as gone:
        await leader.backups.rpc_read(2, read(handle["transfer"], 0, 10))
    assert gone.value.code == "backup_gone"


# --- the relay ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_follower_relays_the_leaders_archive_in_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "RELAY_CHUNK_BYTES", 2048)
    leader, follower = pair(800)
    assert follower.backups.relayed() and not leader.backups.relayed()
    handle = await open_on_leader(leader)
    assert handle["nodeId"] == 1 and handle["index"] == leader.sm.applied_index
    stream = await follower.backups.relay(handle, ADMIN, 5.0)
    body = await collect(stream)
    stream.close()
    assert leader.reads == -(-stream.size // 2048) > 3  # every chunk pulled once, no release needed
    assert hashlib.sha256(body).hexdigest() == handle["sha256"] == stream.sha256
    assert decode_archive(body).header.node_id == 1
    assert not leader.backups.store.held and follower.barriers == 0 and leader.barriers == 1
    assert leader.recorded and not follower.recorded  # the leader records the export


@pytest.mark.asyncio
async def test_a_leader_change_part_way_fails_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "RELAY_CHUNK_BYTES", 1024)
    leader, follower = pair(300)
    handle = await open_on_leader(leader)
    stream = await follower.backups.relay(handle, ADMIN, 5.0)
    got = 0
    with pytest.raises(BackupGone, match="leadership_changed"):
        async for piece in stream.chunks():
            got += len(piece)
            leader.running_driver.core.term = 4  # a new term: the archive's maker no longer leads
    assert 0 < got < stream.size
    assert not leader.backups.store.held


@pytest.mark.asyncio
async def test_a_leader_change_part_way_fails_the_leaders_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "STREAM_PIECE_BYTES", 512)
    leader, _ = pair(300)
    stream = await leader.backups.archive()
    got = 0
    with pytest.raises(BackupGone, match="leadership_changed"):
        async for piece in stream.chunks():
            got += len(piece)
            leader.leading = False  # it stepped down
    assert 0 < got < stream.size and not leader.backups.store.held
    stream.close()


@pytest.mark.asyncio
async def test_backup_read_refusals() -> None:
    leader, _follower = pair(50)
    rpc = leader.backups.rpc_read
    for payload in (b"", b"\xc1", packb(["x", 0]), packb([1, "a", 2, 3])):
        with pytest.raises(ApiError) as bad:
            await rpc(2, payload)
        assert bad.value.status in (400, 404)
    with pytest.raises(ApiError) as unknown:
        await rpc(2, read("00" * 16, 0, 10))
    assert unknown.value.code == "backup_gone"
    # another member than the one it was handed to: refused, the archive stays
    handle = await open_on_leader(leader)
    with pytest.raises(ApiError) as other:
        await rpc(3, read(handle["transfer"], 0, 10))
    assert other.value.code == "forbidden" and handle["transfer"] in leader.backups.store.held
    assert await rpc(2, read(handle["transfer"], 0, 0)) == b""  # its holder releases it
    # a readonly token, another admin's token, no token: refused, and the archive is dropped
    for token in (READER, OTHER_ADMIN, ""):
        handle = await open_on_leader(leader)
        with pytest.raises(ApiError) as refused:
            await rpc(2, read(handle["transfer"], 0, 10, token))
        assert refused.value.code == "forbidden"
        with pytest.raises(ApiError) as dropped:
            await rpc(2, read(handle["transfer"], 0, 10))
        assert dropped.value.code == "backup_gone"
    # offsets outside the archive; then the holder releases it (max_bytes 0)
    handle = await open_on_leader(leader)
    for offset in (-1, handle["size"]):
        with pytest.raises(ApiError) as outside:
            await rpc(2, read(handle["transfer"], offset, 10))
        assert outside.value.status == 400
    assert await rpc(2, read(handle["transfer"], 0, 0)) == b""
    assert not leader.backups.store.held
    # the leader lost leadership: 409 leader_changed, dropped
    handle = await open_on_leader(leader)
    leader.leading = False
    with pytest.raises(ApiError) as changed:
        await rpc(2, read(handle["transfer"], 0, 10))
    assert changed.value.code == "leader_changed" and not leader.backups.store.held


@pytest.mark.asyncio
async def test_an_abandoned_relay_releases_the_leaders_archive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_mod, "RELAY_CHUNK_BYTES", 512)
    leader, follower = pair(100)
    stream = await follower.backups.relay(await open_on_leader(leader), ADMIN, 5.0)
    pieces = stream.chunks()
    assert await anext(pieces)
    await pieces.aclose()  # the client went away
    stream.close()
    deadline = time.monotonic() + 10
    while leader.backups.store.held and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # polling a condition with a deadline (the release is a task)
    assert not leader.backups.store.held


def test_a_follower_of_an_older_leader_makes_the_archive_itself() -> None:
    _leader, follower = pair(10)
    follower.versions = SimpleNamespace(member_version=lambda node_id: 1)
    assert not follower.backups.relayed()
    follower.cluster_enabled = False
    assert not follower.backups.relayed()


# --- the HTTP server ------------------------------------------------------------------------------


class FailingStream:
    """A body that fails after its first pieces (a relay whose leader went away)."""

    def __init__(self, pieces: int, fail_after: int) -> None:
        self.body = bytes(range(256)) * 64 * pieces  # 16 KiB per piece
        self.fail_after = fail_after
        self.index, self.cluster_id = 7, "c"
        self.sha256 = hashlib.sha256(self.body).hexdigest()
        self.closed = 0

    @property
    def size(self) -> int:
        return len(self.body)

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        step = 16 * 1024
        for n, i in enumerate(range(0, len(self.body), step)):
            if n == self.fail_after:
                raise BackupGone("the leader went away")
            yield self.body[i : i + step]

    def close(self) -> None:
        self.closed += 1

    def handoff(self, holder: str) -> dict[str, Any]:
        raise AssertionError("not forwarded in this test")


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_after", [None, 0, 3])
async def test_server_streams_the_body_and_aborts_a_failing_one(fail_after: int | None) -> None:
    cluster = FakeCluster()
    cluster.add_member(1)
    cluster.leader_id = 1
    node = FakeNode(cluster, 1)
    stream = FailingStream(8, fail_after if fail_after is not None else -1)

    async def archive() -> FailingStream:
        return stream

    node.backups.archive = archive  # type: ignore[method-assign]
    _, token = cluster.add_token(TokenRole.ADMIN, name="admin")
    server = ApiServer(build_app(node, node_id=1, registry=CollectorRegistry()))
    port = await server.start("127.0.0.1", 0, ssl_context=None)
    got = bytearray()
    error: BaseException | None = None
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/v1/backup"
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Length"] == str(stream.size)
                assert resp.headers["X-Quorumd-Backup-Sha256"] == stream.sha256
                try:
                    async for piece in resp.content.iter_any():
                        got += piece
                except aiohttp.ClientPayloadError as exc:
                    error = exc
    finally:
        await server.close()
    assert stream.closed == 1
    if fail_after is None:
        assert error is None and bytes(got) == stream.body
    else:
        assert error is not None and len(got) == fail_after * 16 * 1024 < stream.size
