"""The replicated state's value types: members, API tokens, join-token records, the result of
applying an entry and its error codes, and the members list the API shows."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.registry.commands import (
    Command,
)
from quorumd.node.registry.leases import Lease, PoolInfo, SnapshotError, rfc3339
from quorumd.node.registry.pem import expires_at_rfc3339
from quorumd.raft.core.types import ConfChange, immutable

if TYPE_CHECKING:
    from quorumd.node.registry.state import StateMachine

SNAPSHOT_VERSION = 4  # the newest state-snapshot format this build reads and writes
SNAPSHOT_VERSION_V3 = 3
SNAPSHOT_VERSION_V2 = 2
SNAPSHOT_VERSION_V1 = 1
MIN_JOIN_KEY_BYTES = 16


class StateError(Exception):
    """The caller broke the apply contract (an index applied twice or out of order)."""


class SnapshotFormatError(SnapshotError):
    """A snapshot in a newer format than this build reads."""

    def __init__(self, found: int) -> None:
        super().__init__(
            f"snapshot format version {found} is newer than this build reads ({SNAPSHOT_VERSION})"
        )
        self.found = found
        self.known = SNAPSHOT_VERSION


class ApplyCode(StrEnum):
    """Stable error codes of rejected commands (the API layer maps them to HTTP statuses)."""

    BAD_COMMAND = "bad_command"
    INVALID_ARGUMENT = "invalid_argument"
    UNKNOWN_NODE = "unknown_node"
    NODE_DRAINING = "node_draining"
    UNKNOWN_POOL = "unknown_pool"
    POOL_EXISTS = "pool_exists"
    INVALID_CIDR = "invalid_cidr"
    POOL_OVERLAP = "pool_overlap"
    POOL_IN_USE = "pool_in_use"
    POOL_EXHAUSTED = "pool_exhausted"
    UNKNOWN_LEASE = "unknown_lease"
    UNKNOWN_TOKEN = "unknown_token"
    TOKEN_EXISTS = "token_exists"
    SECRETS_ALREADY_SET = "secrets_already_set"
    JOIN_TOKEN_REUSED = "join_token_reused"
    STALE_PROTOCOL_VIEW = "stale_protocol_view"


@dataclass(frozen=True, slots=True)
class Member:
    node_id: int
    raft_address: str  # host:port of the cluster channel
    api_address: str  # as announced by the node: https://host:port
    binary_version: str
    cert_fingerprint: str  # sha256:<hex of DER>
    cert_pem: str
    drain_state: DrainState
    drain_changed_at: float
    drain_deadline: float | None  # only while draining with a deadline
    left: bool  # announced a graceful stop
    protocol_version: int | None = None  # recorded from cluster protocol 2 on
    next_cert_pem: str | None = None  # pinned beside cert_pem while the member rotates (protocol 3)
    next_cert_fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The registry part of a /cluster/members item (the node adds suffrage, isLeader,
        activeLeases from the live Raft state and ``active_lease_count``)."""
        return {
            "nodeId": self.node_id,
            "raftAddress": self.raft_address,
            "apiAddress": self.api_address,
            "binaryVersion": self.binary_version,
            "drainState": str(self.drain_state),
            "certificateFingerprint": self.cert_fingerprint,
            "certificateExpiresAt": expires_at_rfc3339(self.cert_pem),
        }


@dataclass(frozen=True, slots=True)
class ApiToken:
    token_id: str
    name: str
    role: TokenRole
    secret_hash: bytes
    created_at: float
    expires_at: int | None

    def as_dict(self) -> dict[str, Any]:
        """The GET /tokens item (never the hash)."""
        return {
            "id": self.token_id,
            "name": self.name,
            "role": str(self.role),
            "createdAt": rfc3339(self.created_at),
            "expiresAt": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class JoinTokenRecord:
    node_id: int
    expires_at: int
    consumed_at: float | None  # None: minted, not used yet


ApplyValue = Member | ApiToken | PoolInfo | Lease | int | None


@immutable  # one per applied entry on every replica
class ApplyResult:
    """Outcome of one applied entry. ``error`` is None on success.

    ``value`` is what the operation produced (the lease, the pool, the member record, the
    number of leases purged by a REMOVE); ``command`` is the decoded command (None for a no-op
    or undecodable data; the ConfChange for membership entries) so the node can run side
    effects without decoding twice.
    """

    index: int
    error: str | None = None
    message: str = ""
    value: ApplyValue = None
    command: Command | ConfChange | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


MEMBER_FIELDS = (
    "nodeId",
    "raftAddress",
    "apiAddress",
    "binaryVersion",
    "suffrage",
    "isLeader",
    "drainState",
    "activeLeases",
    "protocolVersion",
    "certificateFingerprint",
    "certificateExpiresAt",
)


def member_rows(
    sm: StateMachine, voters: AbstractSet[int], leader_id: int, protocol_version: Callable[[int], int]
) -> list[dict[str, Any]]:
    """The ``GET /cluster/members`` items: the registry's members (sorted by id) with their live
    suffrage (``voters``: the Raft configuration's voters), leadership, active leases and
    protocol version."""
    out = []
    for m in sm.members():
        item = m.as_dict()
        item["suffrage"] = "voter" if m.node_id in voters else "nonvoter"
        item["isLeader"] = leader_id == m.node_id
        item["activeLeases"] = sm.active_lease_count(m.node_id)
        item["protocolVersion"] = protocol_version(m.node_id)
        out.append({k: item[k] for k in MEMBER_FIELDS})
    return out
