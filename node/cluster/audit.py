"""AuditWriter: how the running node writes the audit trail.

Every audited operation writes its record in the same log entry as its change:

- a NORMAL command is wrapped (``propose``: an ``Audited`` command; the state machine appends
  the record only when the change succeeds);
- a membership change carries the record in its ConfChange context (``context``);
- an event that changes nothing else (a backup export, a leadership transfer) is its own entry
  (``record_event``), sent through the leader when this node does not lead; the leader accepts
  from a member only a backup that member served or a transfer away from it (``own_event``).

The actor of an API call is the request's origin (``quorumd.api.origin``: the token, the node
that received the HTTP request, the client's address, all carried when a follower forwards);
background work names its system component. Each note carries this node's ``audit.retention``,
which the state machine applies when the entry commits (so every replica drops the same records).

Below cluster protocol 2 (a member of the baseline build is present) no note is made: every
operation proposes its change as it always did, unaudited (``enabled``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from quorumd.api.errors import ApiError
from quorumd.api.origin import current_origin
from quorumd.node.registry.audit import (
    DEFAULT_RETENTION,
    Actor,
    AuditAction,
    AuditNote,
    Scalar,
    SystemComponent,
    note_of,
)
from quorumd.node.registry.commands import (
    OP_PROTOCOL,
    Audited,
    Command,
    MintJoinToken,
    OpCode,
    RecordAudit,
    encode_audited_context,
    encode_command,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from quorumd.node.cluster.service import ClusterService
    from quorumd.node.registry.records import ApplyResult
    from quorumd.raft.core.node import RaftCore

__all__ = ["AuditAction", "AuditWriter", "own_event"]

log = logging.getLogger(__name__)


class AuditWriter:
    """See the module docstring. One per ``ClusterService`` (``service.trail``)."""

    def __init__(self, node: ClusterService, retention: int = DEFAULT_RETENTION) -> None:
        self.node = node
        self.retention = retention
        self._transfers_recorded: set[tuple[int, int]] = set()  # (term, new leader): recorded once
        self._later: set[asyncio.Task[None]] = set()  # record_transfer_later's records in flight

    def enabled(self) -> bool:
        """Whether audited entries may be written (every member reads them: protocol 2)."""
        return self.node.sm.cluster_protocol_version >= OP_PROTOCOL[OpCode.AUDITED]

    def request_note(
        self, action: AuditAction, target: str, detail: Mapping[str, Scalar] | None = None
    ) -> AuditNote | None:
        """The note of the API call being served (None below protocol 2 or outside a request)."""
        origin = current_origin.get()
        if origin is None or not self.enabled():
            return None
        tok = self.node.sm.api_token(origin.token_id)
        actor = Actor.token(origin.token_id, tok.name if tok is not None else "unknown")
        return note_of(
            action,
            target,
            actor,
            detail,
            via_node_id=origin.via_node_id,
            source_address=origin.source_address,
            retention=self.retention,
        )

    def system_note(
        self,
        component: SystemComponent,
        action: AuditAction,
        target: str,
        detail: Mapping[str, Scalar] | None = None,
    ) -> AuditNote | None:
        """The note of a system action (None below protocol 2)."""
        if not self.enabled():
            return None
        return note_of(action, target, Actor.system(component), detail, retention=self.retention)

    async def propose(
        self, cmd: Command, note: AuditNote | None, *, then: Callable[[RaftCore], Any] | None = None
    ) -> ApplyResult:
        """``propose(cmd)`` with its record in the same entry (plain ``cmd`` without a note)."""
        return await self.node.propose(cmd if note is None else Audited(cmd.ts, note, cmd), then=then)

    async def propose_request(
        self, cmd: Command, action: AuditAction, target: str, detail: Mapping[str, Scalar] | None = None
    ) -> ApplyResult:
        """``propose`` with the note of the API call being served."""
        return await self.propose(cmd, self.request_note(action, target, detail))

    async def record_request(self, action: AuditAction, target: str, detail: Mapping[str, Scalar]) -> None:
        """``record_event`` with the note of the API call being served."""
        await self.record_event(self.request_note(action, target, detail))

    async def record_mint(self, token_id: bytes, node_id: int, expires_at: int) -> None:
        """A minted join token and its record (below protocol 2 a mint writes nothing)."""
        note = self.request_note(AuditAction.JOIN_TOKEN_MINT, f"node:{node_id}", {"expiresAt": expires_at})
        if note is not None:
            await self.propose(MintJoinToken(time.time(), token_id, node_id, expires_at), note)

    @staticmethod
    def context(inner: bytes, note: AuditNote | None) -> bytes:
        """A ConfChange context carrying ``note`` (``inner`` unchanged without a note)."""
        return inner if note is None else encode_audited_context(inner, time.time(), note)

    async def record_event(self, note: AuditNote | None) -> None:
        """An audit record that is its own entry, written through the leader."""
        if note is None:
            return
        node = self.node
        cmd = RecordAudit(time.time(), note)
        if node.is_leader():
            await node.propose(cmd)
            return
        leader = node.leader_id()
        if leader == 0:
            raise ApiError(
                503, "no_leader", "no leader is known; retry shortly", headers={"Retry-After": "1"}
            )
        await node.call_member(leader, "node.propose", encode_command(cmd), node.propose_timeout)

    def record_transfer_later(self, old: int, new: int, reason: str, note: AuditNote | None) -> None:
        """``record_transfer`` without waiting for its commit: a call that caused the transfer
        answers once the transfer is done, not one more round through the new leader later (the
        record is best effort either way). The task is kept until it ends."""
        if new == 0 or new == old or not self.enabled():
            return
        task = asyncio.get_running_loop().create_task(
            self.record_transfer(old, new, reason, note), name="audit-transfer"
        )
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def record_transfer(self, old: int, new: int, reason: str, note: AuditNote | None) -> None:
        """Record a completed leadership transfer (``new`` 0: none happened) through the new
        leader. ``note``: the request's note that caused it (its actor, receiving node and source
        are kept); None: the system component of ``reason`` (drain or shutdown). Best effort: a
        transfer has happened whether or not its record commits (logged when it does not)."""
        if new == 0 or new == old or not self.enabled():
            return
        key = (self.node.running_driver.core.term, new)
        if key in self._transfers_recorded:
            return
        self._transfers_recorded = {key}
        detail: dict[str, Scalar] = {"from": old, "to": new, "reason": reason}
        if note is None:
            component = SystemComponent.SHUTDOWN if reason == "stop" else SystemComponent.DRAIN
            rec = self.system_note(component, AuditAction.LEADERSHIP_TRANSFER, "cluster", detail)
        else:
            rec = note_of(
                AuditAction.LEADERSHIP_TRANSFER,
                "cluster",
                note.actor,
                detail,
                via_node_id=note.via_node_id,
                source_address=note.source_address,
                retention=note.retention,
            )
        try:
            await self.record_event(rec)
        except ApiError as exc:
            log.warning("audit_transfer_unrecorded from=%d to=%d error=%s", old, new, exc.code)


def own_event(note: AuditNote, from_id: int) -> bool:
    """A record a member may write through ``node.propose``: a backup it served, or a leadership
    transfer away from itself."""
    if note.action == AuditAction.BACKUP_EXPORT:
        return note.via_node_id == from_id
    if note.action == AuditAction.LEADERSHIP_TRANSFER:
        return dict(note.detail).get("from") == from_id
    return False
