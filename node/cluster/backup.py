"""Backups taken by the running node: ``GET /api/v1/backup`` and the scheduled archives.

Who makes the archive. The leader: it runs a ReadIndex round (``linearizable_barrier``: the
heartbeat quorum check), waits until it has applied the confirmed index and cuts its state there
(header ``nodeId``: the leader; ``index``: its applied index, at least the confirmed one). A
standalone node is its own leader. A follower that receives the request forwards it
(``api.forward``, the client's token re-checked by the leader); the leader makes the archive, keeps
it (``ArchiveStore``) and answers with a handle instead of the body (``LocalStream.handoff``),
which the follower turns into its answer by pulling the archive in chunks with ``backup.read``
(``RelayStream``), each carrying the client's token. A follower whose leader runs an older build
(protocol below ``RELAY_PROTOCOL``: no ``backup.read``) makes the archive from its own replica
after a ReadIndex round through the leader, which holds the same state at that index.

Held archives (``ArchiveStore``, one per node). At most ``MAX_HELD`` at once; a new one is refused
(503 ``backup_busy``) when the held ones and the new one together exceed ``MAX_HELD_BYTES`` (one
archive alone is always allowed). One is dropped once its last byte is read, when its reader
releases it, after ``IDLE_SECONDS`` without a read, and once its maker no longer leads in the term
it was made in (seen at the next read, or by the store before it admits another): a relay then
fails and the client's connection is aborted short of the announced length (never a
complete-looking body). Held pieces are the state's cached chunk encodings
themselves: an archive costs memory only as those chunks change under it.

``backup.read`` (see also node/cluster/rpcs.py): ``[transfer, offset, max_bytes, token]`` from
the member the handle was given to (``member:N``), with an admin token of the same token id as
the request that made the archive, checked against the leader's replica at every read (a revoked
token stops the transfer; a wrong one drops the archive). ``max_bytes`` 0: the reader is done.

Keeping the event loop responsive. The work on the loop is bounded per step:
1. the lease table's snapshot encoding is a cache of 4096-lease chunks; chunks changed since the
   last snapshot (all of them after a restart) are re-encoded a few at a time with a yield
   between steps (``StateMachine.prepare_snapshot``);
2. ``StateMachine.snapshot_parts()`` then returns the cached chunk encodings themselves (no copy:
   a list of references, one per 4096 leases). This one synchronous call is what makes the
   archive a consistent cut (the cached chunks are immutable bytes);
3. the SHA-256 (one pass; hashlib releases the GIL) runs in a worker thread; the archive is
   never joined into one buffer: its pieces are sent as they are, at most
   ``STREAM_PIECE_BYTES`` per loop step (the HTTP server waits for the client between writes),
   and a relay holds one chunk of at most ``RELAY_CHUNK_BYTES`` at a time.
Scheduled backups (``take_archive``) join the pieces once, in the worker thread, to write a file.

Test-only: ``QUORUMD_TEST_BACKUP_CHUNK_BYTES`` sets the relay's chunk size (logged when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from quorumd.api.errors import ApiError
from quorumd.api.origin import current_origin
from quorumd.api.ports import TokenRole
from quorumd.api.ports_backup import BackupArchive
from quorumd.node.daemon.gcpolicy import gc_paused
from quorumd.node.registry.archive import ArchiveHeader, encode_archive, sealed_parts
from quorumd.node.registry.audit import AuditAction
from quorumd.node.registry.records import SNAPSHOT_VERSION
from quorumd.raft.codec import packb

if TYPE_CHECKING:
    from quorumd.node.cluster.service import ClusterService

log = logging.getLogger(__name__)

READ_RPC = "backup.read"
RELAY_PROTOCOL = 2  # members of this protocol version serve backup.read
RELAY_CHUNK_BYTES = 1 << 20  # what a relaying follower asks for per backup.read
MAX_READ_BYTES = 8 << 20  # the most one backup.read answers (RPC frames stop at 32 MiB)
STREAM_PIECE_BYTES = 256 << 10  # the most the serving node hands its HTTP client per step
MAX_HELD = 2
MAX_HELD_BYTES = 256 << 20
IDLE_SECONDS = 60.0
CHUNK_ENV = "QUORUMD_TEST_BACKUP_CHUNK_BYTES"
# Chunks of 4096 leases encoded per event-loop step (~4 ms each on a slow host).
WARM_CHUNKS_PER_STEP = 2


def relay_chunk_bytes() -> int:
    raw = os.environ.get(CHUNK_ENV)
    if not raw:
        return RELAY_CHUNK_BYTES
    size = max(1, min(int(raw), MAX_READ_BYTES))
    log.warning("backup_relay_chunk_bytes=%d (test-only %s)", size, CHUNK_ENV)
    return size


class BackupGone(Exception):
    """The archive being sent is no longer available; the message says why."""


@dataclass(frozen=True, slots=True)
class _Cut:
    parts: list[bytes]
    header: ArchiveHeader
    loop_ms: float


async def _cut(node: ClusterService) -> _Cut:
    """The state's pieces, index, term and cluster id, taken in one synchronous step."""
    sm = node.sm
    # Bounded: under a write load new changes keep arriving; whatever is left after this many
    # steps (a chunk or two) is encoded by snapshot_parts() itself.
    steps = sm.prepare_snapshot(0) // WARM_CHUNKS_PER_STEP + 8
    while sm.prepare_snapshot(WARM_CHUNKS_PER_STEP) > 0 and steps > 0:
        steps -= 1
        await asyncio.sleep(0)
    # No await from here until the header is made: index, term and state are one cut.
    t0 = time.perf_counter()
    with gc_paused():
        parts = sm.snapshot_parts()
    index = sm.applied_index
    core = node.driver.core if node.driver is not None else None
    term = (core.log.term(index) or core.term) if core is not None else 0
    header = ArchiveHeader(
        cluster_id=sm.cluster_id or node.identity.cluster_id,
        index=index,
        term=term,
        created_at=time.time(),
        node_id=node.identity.node_id,
        version=node.identity.version,
        state_format=SNAPSHOT_VERSION,
    )
    return _Cut(parts, header, (time.perf_counter() - t0) * 1000)


async def take_archive(node: ClusterService, *, linearizable: bool) -> BackupArchive:
    """A whole archive of ``node``'s replica in memory (scheduled backups): after a ReadIndex
    barrier when ``linearizable``, else of the applied state as it is."""
    async with node.backups.lock:
        if linearizable:
            await node.linearizable_barrier()
        cut = await _cut(node)
    loop = asyncio.get_running_loop()
    body, sha256 = await loop.run_in_executor(None, encode_archive, cut.header, cut.parts)
    log.info("backup_taken index=%d bytes=%d loop_ms=%.1f scheduled=true", cut.header.index, len(body),
             cut.loop_ms)  # fmt: skip
    return BackupArchive(body=body, index=cut.header.index, sha256=sha256, cluster_id=cut.header.cluster_id)


@dataclass(eq=False)
class HeldArchive:
    """An archive this node made and keeps until it has been sent (``ArchiveStore``)."""

    id: str
    pieces: list[bytes]
    header: ArchiveHeader
    sha256: str
    term: int | None  # the term this node led in when it made it (None: not tied to leadership)
    token_id: str | None  # the token of the request that made it
    holder: str | None = None  # the member pulling it (``member:N``); None: sent by this node
    last_used: float = 0.0
    dropped: str | None = None  # why it was dropped
    ends: list[int] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        total = 0
        for p in self.pieces:
            total += len(p)
            self.ends.append(total)

    @property
    def size(self) -> int:
        return self.ends[-1] if self.ends else 0

    def read(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` (clipped to the end): one copy of at most ``n``."""
        out: list[memoryview] = []
        i = bisect_right(self.ends, offset)
        while n > 0 and i < len(self.pieces):
            start = offset - (self.ends[i] - len(self.pieces[i]))
            view = memoryview(self.pieces[i])[start : start + n]
            out.append(view)
            offset += len(view)
            n -= len(view)
            i += 1
        return b"".join(out)


class ArchiveStore:
    """The archives a node holds (see the module docstring)."""

    def __init__(self, node: ClusterService) -> None:
        self.node = node
        self.held: dict[str, HeldArchive] = {}

    def held_bytes(self) -> int:
        return sum(h.size for h in self.held.values())

    def admit(self, size: int) -> None:
        """Raise 503 ``backup_busy`` when an archive of ``size`` bytes may not be held now."""
        for h in list(self.held.values()):
            self.check(h, drop_only=True)
        if self.held and (len(self.held) >= MAX_HELD or self.held_bytes() + size > MAX_HELD_BYTES):
            raise ApiError(
                503,
                "backup_busy",
                f"{len(self.held)} backup(s) of {self.held_bytes()} bytes are being sent; retry shortly",
                headers={"Retry-After": "5"},
            )

    def add(self, held: HeldArchive) -> None:
        held.last_used = time.monotonic()
        self.held[held.id] = held
        self._arm(held)

    def get(self, transfer: str) -> HeldArchive | None:
        return self.held.get(transfer)

    def touch(self, held: HeldArchive) -> None:
        held.last_used = time.monotonic()

    def drop(self, held: HeldArchive, reason: str) -> None:
        if held.dropped is None:
            held.dropped = reason
        if self.held.pop(held.id, None) is not None and reason != "complete":
            log.info("backup_dropped index=%d holder=%s reason=%s", held.header.index, held.holder, reason)
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None

    def check(self, held: HeldArchive, *, drop_only: bool = False) -> None:
        """Raise ``BackupGone`` when ``held`` was dropped or its maker stopped leading in its
        term (then it is dropped)."""
        if held.dropped is None and held.term is not None and not self._leads_in(held.term):
            self.drop(held, "leadership_changed")
        if held.dropped is not None and not drop_only:
            raise BackupGone(f"the backup is no longer available ({held.dropped})")

    def _leads_in(self, term: int) -> bool:
        node = self.node
        return node.is_leader() and node.running_driver.core.term == term

    def _arm(self, held: HeldArchive) -> None:
        loop = asyncio.get_running_loop()
        held.timer = loop.call_at(loop.time() + max(0.0, held.last_used + IDLE_SECONDS - time.monotonic()),
                                  self._expire, held)  # fmt: skip

    def _expire(self, held: HeldArchive) -> None:
        held.timer = None
        if held.dropped is not None:
            return
        if time.monotonic() - held.last_used >= IDLE_SECONDS:
            self.drop(held, "idle")
        else:
            self._arm(held)


class LocalStream:
    """A held archive sent by this node (``api.pipeline.BodyStream``, ``ports_backup.BackupStream``)."""

    def __init__(self, store: ArchiveStore, held: HeldArchive) -> None:
        self._store = store
        self._held = held
        self._handed_off = False

    @property
    def index(self) -> int:
        return self._held.header.index

    @property
    def sha256(self) -> str:
        return self._held.sha256

    @property
    def cluster_id(self) -> str:
        return self._held.header.cluster_id

    @property
    def size(self) -> int:
        return self._held.size

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        held, store = self._held, self._store
        for piece in held.pieces:
            view = memoryview(piece)
            for start in range(0, len(view), STREAM_PIECE_BYTES):
                store.check(held)
                store.touch(held)
                yield view[start : start + STREAM_PIECE_BYTES]
        store.drop(held, "complete")

    def close(self) -> None:
        if not self._handed_off:
            self._store.drop(self._held, "closed")

    def handoff(self, holder: str) -> dict[str, Any]:
        held = self._held
        self._store.check(held)
        held.holder = holder
        self._handed_off = True
        h = held.header
        return {"transfer": held.id, "nodeId": h.node_id, "index": h.index, "term": h.term,
                "sha256": held.sha256, "size": held.size, "clusterId": h.cluster_id}  # fmt: skip


class RelayStream:
    """The leader's held archive pulled with ``backup.read`` and passed on (see the module
    docstring): one chunk at a time, checked against the announced size and digest before its
    last byte goes out."""

    def __init__(
        self, node: ClusterService, leader: int, handle: _Handle, token: str, timeout: float
    ) -> None:
        self._node = node
        self._leader = leader
        self._handle = handle
        self._token = token
        self._timeout = timeout
        self._finished = False
        self._closed = False

    @property
    def index(self) -> int:
        return self._handle.index

    @property
    def sha256(self) -> str:
        return self._handle.sha256

    @property
    def cluster_id(self) -> str:
        return self._handle.cluster_id

    @property
    def size(self) -> int:
        return self._handle.size

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        h = self._handle
        chunk = relay_chunk_bytes()
        digest = hashlib.sha256()
        offset = 0
        try:
            while offset < h.size:
                payload = packb([h.transfer, offset, min(chunk, h.size - offset), self._token])
                data = await self._node.call_member(self._leader, READ_RPC, payload, self._timeout)
                if not data or len(data) > h.size - offset:
                    raise BackupGone(f"the leader sent {len(data)} bytes at offset {offset}")
                digest.update(data)
                offset += len(data)
                if offset == h.size and digest.hexdigest() != h.sha256:
                    raise BackupGone("the relayed archive does not match its digest")
                yield data
        except (ApiError, BackupGone) as exc:
            reason = exc.message if isinstance(exc, ApiError) else str(exc)
            log.warning("backup_relay_failed leader=%d index=%d sent=%d size=%d reason=%s",
                        self._leader, h.index, offset, h.size, reason)  # fmt: skip
            raise BackupGone(reason) from None
        self._finished = True
        log.info("backup_relayed leader=%d index=%d bytes=%d chunk_bytes=%d",
                 self._leader, h.index, h.size, chunk)  # fmt: skip

    def close(self) -> None:
        if self._closed or self._finished:
            return
        self._closed = True
        release = packb([self._handle.transfer, 0, 0, self._token])  # the leader drops it now

        async def tell() -> None:
            with contextlib.suppress(ApiError):  # else the leader drops it once idle
                await self._node.call_member(self._leader, READ_RPC, release, self._timeout)

        task = asyncio.get_running_loop().create_task(tell())
        _RELEASES.add(task)
        task.add_done_callback(_RELEASES.discard)

    def handoff(self, holder: str) -> dict[str, Any]:
        raise ApiError(503, "no_leader", "this node is not the leader", headers={"Retry-After": "1"})


_RELEASES: set[asyncio.Task[None]] = set()


@dataclass(frozen=True, slots=True)
class _Handle:
    transfer: str
    node_id: int
    index: int
    sha256: str
    size: int
    cluster_id: str

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> _Handle:
        try:
            h = cls(str(doc["transfer"]), int(doc["nodeId"]), int(doc["index"]), str(doc["sha256"]),
                    int(doc["size"]), str(doc["clusterId"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise ApiError(502, "leader_error", "the leader sent an invalid backup handle") from None
        if h.size <= 0 or len(h.sha256) != 64:
            raise ApiError(502, "leader_error", "the leader sent an invalid backup handle")
        return h


class NodeBackups:
    """``ClusterService.backups``: ``quorumd.api.ports_backup.Backups`` and ``backup.read``."""

    def __init__(self, node: ClusterService) -> None:
        self.node = node
        self.store = ArchiveStore(node)
        # One archive made at a time (scheduled ones too): each cut pins the state's pieces.
        self.lock = asyncio.Lock()

    async def archive(self) -> LocalStream:
        node = self.node
        origin = current_origin.get()
        async with self.lock:
            await node.linearizable_barrier()
            term = node.running_driver.core.term if node.is_leader() else None
            cut = await _cut(node)
            if term is not None and not self.store._leads_in(term):
                raise ApiError(503, "no_leader", "leadership changed; retry", headers={"Retry-After": "1"})
            self.store.admit(sum(len(p) for p in cut.parts))
            t0 = time.perf_counter()
            pieces, sha256 = await asyncio.get_running_loop().run_in_executor(
                None, sealed_parts, cut.header, cut.parts
            )
            held = HeldArchive(secrets.token_hex(16), pieces, cut.header, sha256, term,
                               origin.token_id if origin is not None else None)  # fmt: skip
            self.store.add(held)
        try:
            detail = {"index": held.header.index}
            await node.trail.record_request(AuditAction.BACKUP_EXPORT, "cluster", detail)
        except BaseException:
            self.store.drop(held, "unrecorded")
            raise
        log.info("backup_taken index=%d bytes=%d loop_ms=%.1f hash_s=%.2f leader=%s",
                 held.header.index, held.size, cut.loop_ms, time.perf_counter() - t0,
                 term is not None)  # fmt: skip
        return LocalStream(self.store, held)

    def relayed(self) -> bool:
        node = self.node
        if not node.cluster_enabled or node.is_leader():
            return False
        leader = node.leader_id()
        return leader == 0 or node.versions.member_version(leader) >= RELAY_PROTOCOL

    async def relay(self, handle: Mapping[str, Any], token: str, timeout: float) -> RelayStream:
        h = _Handle.parse(handle)
        return RelayStream(self.node, h.node_id, h, token, timeout)

    async def rpc_read(self, from_id: int, payload: bytes) -> bytes:
        """``backup.read`` (see the module docstring)."""
        try:
            transfer, offset, n, token = msgpack.unpackb(payload, raw=False)
            transfer, offset, n, token = str(transfer), int(offset), int(n), str(token)
        except Exception as exc:  # any undecodable payload is a refusal, never a crash
            message = "backup.read takes [transfer, offset, max_bytes, token]"
            raise ApiError(400, "bad_request", message) from exc
        held = self.store.get(transfer)
        if held is None:
            raise ApiError(404, "backup_gone", "no such backup (sent, released, expired or dropped)")
        if held.holder != f"member:{from_id}":
            log.warning("internal_rpc_refused method=%s node=%d reason=holder", READ_RPC, from_id)
            raise ApiError(403, "forbidden", "this backup was handed to another member")
        principal = self.node.authenticate(token)
        if principal is None or principal.role != TokenRole.ADMIN or principal.token_id != held.token_id:
            log.warning("internal_rpc_refused method=%s node=%d reason=token", READ_RPC, from_id)
            self.store.drop(held, "refused_token")
            raise ApiError(403, "forbidden", "reading a backup needs the admin token that requested it")
        try:
            self.store.check(held)
        except BackupGone as exc:
            raise ApiError(409, "leader_changed", str(exc)) from None
        if n == 0:
            self.store.drop(held, "released")
            return b""
        if not 0 <= offset < held.size or n < 0:
            raise ApiError(400, "bad_request", f"offset {offset} outside the backup's {held.size} bytes")
        data = held.read(offset, min(n, MAX_READ_BYTES))
        self.store.touch(held)
        if offset + len(data) == held.size:
            self.store.drop(held, "complete")
        return data


__all__ = ["NodeBackups", "take_archive"]
