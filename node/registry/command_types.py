"""The replicated commands' value types: one frozen dataclass per operation.

Their wire codes, envelopes and the protocol each needs are in ``quorumd.node.registry.commands``
(which re-exports every name here); what applying one does is in ``quorumd.node.registry.state``.
"""

from __future__ import annotations

from dataclasses import dataclass

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.registry.audit import AuditNote
from quorumd.raft.core.types import immutable


@dataclass(frozen=True, slots=True)
class Noop:
    ts: float


@dataclass(frozen=True, slots=True)
class SetClusterSecrets:
    """Written once by the founder as its first normal command."""

    ts: float
    cluster_id: str
    join_key: bytes


@dataclass(frozen=True, slots=True)
class RegisterNodeInfo:
    """A node announces its API address and binary version at every start."""

    ts: float
    node_id: int
    api_address: str
    binary_version: str


@dataclass(frozen=True, slots=True)
class SetDrain:
    ts: float
    node_id: int
    state: DrainState
    deadline_ts: float | None


@dataclass(frozen=True, slots=True)
class MarkNodeLeft:
    """A node announced a graceful stop (``left=True``) or withdrew that announcement."""

    ts: float
    node_id: int
    left: bool


@dataclass(frozen=True, slots=True)
class CreateApiToken:
    ts: float
    token_id: str
    name: str
    role: TokenRole
    secret_hash: bytes
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class RevokeApiToken:
    ts: float
    token_id: str


@dataclass(frozen=True, slots=True)
class CreatePool:
    ts: float
    name: str
    cidr: str


@dataclass(frozen=True, slots=True)
class DeletePool:
    ts: float
    name: str


@immutable  # made on every replica for every lease write: no frozen-init cost
class AllocateLease:
    ts: float
    pool: str
    holder: str
    node_id: int


@immutable  # made on every replica for every lease write: no frozen-init cost
class ReleaseLease:
    ts: float
    lease_id: int


@dataclass(frozen=True, slots=True)
class MintJoinToken:
    """Records a minted join token id (its expiry bounds how long its consumption is kept)."""

    ts: float
    token_id: bytes
    node_id: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class SetProtocolVersion:
    """The leader records the cluster's protocol version and each member's (protocol 2).

    Proposed when every member of the Raft configuration reports at least ``cluster_version``
    (a ratchet: the recorded version never goes down), and again to record the versions of
    members that joined or were upgraded since. ``members``: (node id, protocol version) pairs,
    ascending by id. The state machine refuses a raise unless every registered member is listed
    at or above the new version, so a member that joined meanwhile stops it."""

    ts: float
    cluster_version: int
    members: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SetMemberAddress:
    """A member's cluster (Raft) and API addresses change (protocol 2).

    Proposed by the leader for a member that restarted elsewhere and proved its identity by its
    pinned certificate (it may only move itself), or by an admin's PATCH for a member that is
    down. Both addresses are always carried (the unchanged one as recorded)."""

    ts: float
    node_id: int
    raft_address: str
    api_address: str


@dataclass(frozen=True, slots=True)
class Audited:
    """A change and its audit record in one entry (see ``quorumd.node.registry.audit``).

    Wire: ``[2, 2, 21, ts, note, inner]`` where ``inner`` is the inner command's own list (its
    envelope included). The state machine applies ``command`` and appends the record only when
    it succeeded. ``command`` is never itself audited."""

    ts: float
    note: AuditNote
    command: Command


@dataclass(frozen=True, slots=True)
class RecordAudit:
    """An audit record that is its own entry (an event that changes no other state: a backup
    export, a leadership transfer)."""

    ts: float
    note: AuditNote


@dataclass(frozen=True, slots=True)
class PinCertificate:
    """A member's next certificate is pinned beside its current one (protocol 3).

    Proposed by the member itself when it rotates its identity: both certificates are trusted
    until ``UnpinCertificate`` removes one. Pinning another next certificate replaces a next one
    that was never switched to (the member only switches to a pin it saw applied)."""

    ts: float
    node_id: int
    cert_pem: str


@dataclass(frozen=True, slots=True)
class UnpinCertificate:
    """A member's certificate is unpinned (protocol 3): its current one, after the member
    switched to the next one (which becomes current), or a next one it abandons. A member's
    only pin is never removed."""

    ts: float
    node_id: int
    fingerprint: str


Command = (
    Noop
    | SetClusterSecrets
    | RegisterNodeInfo
    | SetDrain
    | MarkNodeLeft
    | CreateApiToken
    | RevokeApiToken
    | CreatePool
    | DeletePool
    | AllocateLease
    | ReleaseLease
    | MintJoinToken
    | SetProtocolVersion
    | SetMemberAddress
    | Audited
    | RecordAudit
    | PinCertificate
    | UnpinCertificate
)
