"""The Raft channel (``quorumd-raft/1``): Raft frames, one direction per connection.

Outgoing: one persistent connection per peer, opened as soon as the peer is pinned (see
``connect_members``), dialed again at once when it drops and otherwise redialed with capped,
jittered exponential backoff, cut short when the peer connects to us. ``send`` never blocks: it
writes at once when the connection is idle, else appends to a bounded per-peer queue (dropping
and counting when full; Raft tolerates loss) and the peer's writer task writes everything queued
in one ``write`` then drains once. Incoming frames go to ``on_raft_frame(from_node_id, frame)``
from ``buffer_updated``: no task per frame, and each is checked against the current pin first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable

from .connection import _Conn, _on_unexpected_frame
from .errors import _DialError
from .framing import MAX_FRAME_BYTES
from .peers import Peers
from .tls import ALPN_RAFT

log = logging.getLogger(__name__)


class _RaftPeer:
    """Outgoing state for one peer: its queue, its connection and its writer task."""

    __slots__ = ("conn", "failing", "frames", "node_id", "queued_bytes", "redial", "task", "wakeup")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.frames: list[bytes] = []
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.redial = asyncio.Event()  # the peer reached us: stop backing off, dial it now
        self.conn: _Conn | None = None
        self.task: asyncio.Task[None] | None = None
        self.failing = False

    def on_conn_closed(self, _closed: asyncio.Future[None]) -> None:
        self.wakeup.set()


class RaftChannel:
    """Raft frames to and from the members."""

    def __init__(
        self,
        peers: Peers,
        on_raft_frame: Callable[[int, bytes], None],
        *,
        write_timeout_seconds: float,
        queue_frames: int,
        queue_bytes: int,
        backoff_min_seconds: float,
        backoff_max_seconds: float,
    ) -> None:
        self._peers = peers
        self._on_raft_frame = on_raft_frame
        self._write_timeout = write_timeout_seconds
        self._queue_frames = queue_frames
        self._queue_bytes = queue_bytes
        self._backoff_min = backoff_min_seconds
        self._backoff_max = backoff_max_seconds
        self.outgoing: dict[int, _RaftPeer] = {}
        self._random = random.Random(secrets.randbits(64))  # backoff jitter only

    # --- peers -----------------------------------------------------------------------------
    def connect_members(self) -> None:
        """Open the Raft channel to every pinned member that has none yet."""
        peers = self._peers
        if peers.loop is None or peers.closing:
            return
        for nid in peers.pins:
            if nid == peers.node_id or nid in self.outgoing or nid not in peers.addresses:
                continue
            peer = self.outgoing[nid] = _RaftPeer(nid)
            peer.task = peers.spawn(self._writer(peer))
            peer.wakeup.set()

    def member_admitted(self, node_id: int) -> None:
        """A member's connection was authenticated (either direction)."""
        peer = self.outgoing.get(node_id)
        if peer is not None and peer.failing:
            peer.redial.set()  # a restarted member is back: the leader's heartbeat follows at once

    def stop(self, node_id: int) -> None:
        """Forget an unpinned member: its queued frames are dropped, its connection aborted."""
        peer = self.outgoing.pop(node_id, None)
        if peer is None:
            return
        self._peers.stats.frames_dropped += len(peer.frames)
        peer.frames = []
        if peer.task is not None:
            peer.task.cancel()
        if peer.conn is not None:
            peer.conn.abort()

    def abort_connection(self, node_id: int) -> None:
        """Drop the outgoing connection to ``node_id`` (its address changed): dialed again at
        once, also when the writer is backing off after failed dials to the old address."""
        peer = self.outgoing.get(node_id)
        if peer is None:
            return
        if peer.conn is not None:
            peer.conn.abort()
        peer.redial.set()
        peer.wakeup.set()

    def replace_connection(self, node_id: int) -> None:
        """Dial ``node_id`` again and close the current connection once the new one is up (a
        certificate rotation: the peer always has a live Raft connection with this node, so it
        never takes the switch for this node's failure)."""
        peer = self.outgoing.get(node_id)
        if peer is None or peer.conn is None or peer.conn.lost:
            return
        peer.conn.retiring = True
        peer.redial.set()
        peer.wakeup.set()

    # --- inbound ---------------------------------------------------------------------------
    def on_inbound(self, conn: _Conn, frame: bytes) -> None:
        if not self._peers.still_pinned(conn):
            conn.abort()
            return
        self._peers.stats.frames_received += 1
        try:
            self._on_raft_frame(conn.node_id, frame)
        except Exception:  # a bug upstream must not take the connection or the node down
            log.exception("raft_frame_callback_failed node=%d", conn.node_id)

    # --- outbound --------------------------------------------------------------------------
    def send(self, node_id: int, frame: bytes) -> bool:
        """Queue one Raft frame for ``node_id``; False (and counted) when it is dropped."""
        peer = self.outgoing.get(node_id)
        if peer is None:
            peers = self._peers
            if (
                peers.loop is None
                or peers.closing
                or node_id not in peers.pins
                or node_id not in peers.addresses
            ):
                peers.stats.frames_dropped += 1
                return False
            peer = self.outgoing[node_id] = _RaftPeer(node_id)
            peer.task = peers.spawn(self._writer(peer))
        size = len(frame)
        if (
            len(peer.frames) >= self._queue_frames
            or peer.queued_bytes + size > self._queue_bytes
            or size > MAX_FRAME_BYTES
        ):
            self._peers.stats.frames_dropped += 1
            return False
        conn = peer.conn
        if (
            conn is not None
            and not peer.frames
            and not conn.paused
            and not conn.retiring
            and conn.write_frames((frame,))
        ):
            # Fast path: connected, nothing queued, socket not backed up. Writing here saves the
            # writer task's wakeup (one loop iteration) on every message of the commit path.
            self._peers.stats.frames_sent += 1
            if conn.paused and not peer.wakeup.is_set():
                peer.wakeup.set()  # the writer watches the drain with its stall timeout
            return True
        peer.frames.append(frame)
        peer.queued_bytes += size
        if not peer.wakeup.is_set():
            peer.wakeup.set()
        return True

    async def _writer(self, peer: _RaftPeer) -> None:
        stats = self._peers.stats
        backoff = self._backoff_min
        while True:
            await peer.wakeup.wait()
            conn = peer.conn
            if conn is None or conn.lost or conn.retiring:
                replaced = conn if conn is not None and not conn.lost else None
                peer.conn = None
                try:
                    conn = await self._peers.dial(peer.node_id, ALPN_RAFT)
                except Exception as exc:  # _DialError, or a bug: either way back off and retry
                    if replaced is not None:
                        replaced.close()
                    if not isinstance(exc, _DialError):
                        log.exception("raft_dial_error node=%d", peer.node_id)
                    stats.frames_dropped += len(peer.frames)
                    peer.frames, peer.queued_bytes = [], 0
                    peer.wakeup.clear()
                    level = logging.DEBUG if peer.failing else logging.INFO
                    log.log(
                        level, "raft_dial_failed node=%d error=%s backoff=%.2f", peer.node_id, exc, backoff
                    )
                    peer.failing = True
                    peer.redial.clear()
                    try:  # capped, jittered backoff, cut short when the peer connects to us
                        async with asyncio.timeout(backoff * (0.5 + self._random.random() / 2)):
                            await peer.redial.wait()
                        backoff = self._backoff_min
                    except TimeoutError:
                        backoff = min(backoff * 2, self._backoff_max)
                    continue
                if replaced is not None:
                    replaced.close()  # after the new one is up: flushes what it has, then FIN
                if peer.failing:
                    log.info("raft_peer_reconnected node=%d", peer.node_id)
                peer.failing = False
                backoff = self._backoff_min
                peer.conn = conn
                conn.use_handler(_on_unexpected_frame)
                # Keep the channel warm: when it drops, dial again at once (one attempt, then the
                # backoff above) rather than at the next send, which may be a vote request.
                conn.closed.add_done_callback(peer.on_conn_closed)
            frames = peer.frames
            peer.frames, peer.queued_bytes = [], 0
            peer.wakeup.clear()
            if conn.local_fingerprint != self._peers.fingerprint and not conn.retiring:
                conn.retiring = True  # dialed while this node switched certificates: replace it
                peer.wakeup.set()
            if frames:
                if not conn.write_frames(frames):
                    stats.frames_dropped += len(frames)
                    continue
                stats.frames_sent += len(frames)
            if not conn.paused:
                continue
            try:
                async with asyncio.timeout(self._write_timeout):
                    await conn.drain()
            except TimeoutError:
                log.warning("raft_peer_stalled node=%d", peer.node_id)
                conn.abort()
            except ConnectionResetError:
                pass  # redialed on the next frame
