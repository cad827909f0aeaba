"""The follower side of chunked InstallSnapshot (paper 7): reassembling one incoming snapshot.

A transfer is identified by (leader term, snapshot index, snapshot term) and must start at offset
0; chunks are appended only in order, and every chunk is answered with the number of bytes held,
from which the leader continues (or resends). A chunk of a different transfer at a nonzero offset
is answered with 0 and leaves the current transfer alone; one at offset 0 replaces it. This module
only buffers; ``RaftCore`` decides when a snapshot is needed at all, answers the leader and
restores the finished snapshot. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import Snapshot, SnapshotMeta


@dataclass(frozen=True, slots=True)
class ChunkReceipt:
    """What one chunk produced: the whole snapshot once its last chunk arrived in order, else
    ``held_bytes`` to acknowledge."""

    snapshot: Snapshot | None
    held_bytes: int = 0


@dataclass(slots=True)
class _Transfer:
    key: tuple[int, int, int]  # (leader term, meta index, meta term)
    buffer: bytearray


class SnapshotAssembly:
    """The buffer of the one snapshot transfer a follower is receiving, if any."""

    __slots__ = ("_transfer",)

    def __init__(self) -> None:
        self._transfer: _Transfer | None = None

    def discard(self) -> None:
        """Drop a transfer in progress (the follower no longer needs the snapshot)."""
        self._transfer = None

    def receive(
        self, leader_term: int, meta: SnapshotMeta, offset: int, chunk: bytes, done: bool
    ) -> ChunkReceipt:
        """Take one chunk (``offset``, ``chunk``, ``done`` as in the SNAPSHOT message)."""
        key = (leader_term, meta.index, meta.term)
        transfer = self._transfer
        if transfer is None or transfer.key != key:
            if offset != 0:
                return ChunkReceipt(None, 0)
            transfer = self._transfer = _Transfer(key, bytearray())
        in_order = offset == len(transfer.buffer)
        if in_order:
            transfer.buffer += chunk
        if not (in_order and done):
            return ChunkReceipt(None, len(transfer.buffer))
        self._transfer = None
        return ChunkReceipt(Snapshot(meta, bytes(transfer.buffer)))
