"""The leader's ReadIndex bookkeeping (thesis 6.4): which reads wait, and when each is confirmed.

A read is taken at the leader's commit index once an entry of its term has committed; until then
it is deferred (step 1). It is then confirmed by a quorum of voters answering a heartbeat that
carries its context (steps 2-3). Reads are answered in order: an ack for a later read confirms
the earlier ones too. This module only keeps the queues and counts acks; ``RaftCore`` decides
when to take a read, sends the heartbeats and emits the answers. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .types import NodeId


@dataclass(slots=True)
class ReadRequest:
    index: int  # the commit index the read was taken at (0 while deferred)
    context: bytes
    requester: NodeId
    acks: set[NodeId] = field(default_factory=set)


class ReadIndexQueue:
    """Reads waiting for a heartbeat quorum, in order, and reads deferred until the leader has
    committed an entry of its term. Emptied whenever the node's term or role changes."""

    __slots__ = ("_deferred", "_pending")

    def __init__(self) -> None:
        self._pending: list[ReadRequest] = []
        self._deferred: list[ReadRequest] = []

    def clear(self) -> None:
        self._pending = []
        self._deferred = []

    def defer(self, context: bytes, requester: NodeId) -> None:
        """Hold a read until an entry of the leader's term has committed (``take_deferred``)."""
        self._deferred.append(ReadRequest(0, context, requester))

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def take_deferred(self) -> list[ReadRequest]:
        """The deferred reads, in arrival order; the queue of deferred reads is emptied."""
        deferred, self._deferred = self._deferred, []
        return deferred

    def push(self, req: ReadRequest) -> None:
        """Wait for a heartbeat quorum to confirm ``req`` (``ack``)."""
        self._pending.append(req)

    def ack(self, frm: NodeId, context: bytes, counted: frozenset[NodeId], quorum: int) -> list[ReadRequest]:
        """Count ``frm``'s heartbeat ack for the first read with ``context``. Returns the reads it
        confirms (that one and every earlier read, in order) once ``quorum`` of the nodes in
        ``counted`` have acked it, removed from the queue; else nothing."""
        for i, req in enumerate(self._pending):
            if req.context != context:
                continue
            req.acks.add(frm)
            if len(req.acks & counted) >= quorum:
                done, self._pending = self._pending[: i + 1], self._pending[i + 1 :]
                return done
            return []
        return []
