"""The API's view of the node: the one protocol the HTTP layer calls, implemented by ``quorumd.node``.

The HTTP layer validates input, authenticates, decides where a request runs, and shapes output;
everything else (Raft, the replicated state, drain, autopilot) sits behind ``NodeApi``. Operations
raise ``quorumd.api.errors.ApiError`` subclasses for every failure a client should see.

Routing rule: requests that change state, leader-only reads (autopilot, join-token minting) and
``?consistent=true`` reads run on the leader. On a follower the HTTP layer forwards the whole
request with ``NodeApi.forward`` (one hop at most: a forwarded request that lands on a non-leader
answers 503 ``no_leader``); the leader's answer carries ``applied_index`` and the follower waits
until it has applied that index before answering (read-your-writes on the follower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from .ports_backup import Backups


class TokenRole(StrEnum):
    ADMIN = "admin"
    READONLY = "readonly"


class DrainState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class ForwardedRequest(NamedTuple):  # a NamedTuple: built on every forwarded call, ~4x cheaper
    method: str
    path: str  # raw path including /api/v1 prefix
    query: tuple[tuple[str, str], ...]
    body: bytes
    token: str  # the caller's bearer token, re-checked on the leader
    hops: int = 1
    # The original client's address (no port) and the node that received the HTTP request, for
    # the audit trail; None from a member that does not send them.
    source_address: str | None = None
    via_node_id: int | None = None


class ForwardedResponse(NamedTuple):
    status: int
    body: bytes  # the JSON envelope, as the leader produced it
    headers: tuple[tuple[str, str], ...] = ()
    applied_index: int = 0  # the leader's applied index after the operation


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    role: TokenRole


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: int
    cluster_id: str
    version: str
    cluster_enabled: bool
    extra_status: dict[str, Any] = field(default_factory=dict)


class NodeApi(Protocol):
    @property
    def backups(self) -> Backups:
        """GET /backup: archives made here, or relayed from the leader."""
        ...

    # --- identity and routing -------------------------------------------------------------
    @property
    def cluster_enabled(self) -> bool: ...

    def is_leader(self) -> bool: ...

    def leader_id(self) -> int:
        """0 when no leader is known."""
        ...

    def applied_index(self) -> int: ...

    def authenticate(self, token: str) -> Principal | None:
        """Check a bearer token against the local replica (constant-time compare, expiry)."""
        ...

    async def forward(
        self, request: ForwardedRequest, timeout_seconds: float, *, to: int | None = None
    ) -> ForwardedResponse:
        """Send the request to the leader (or to member ``to``) over the cluster channel. Raises
        ``LeaderUnavailable`` (503, no leader known), ``LeaderUnreachable`` (502) or
        ``LeaderTimeout`` (504)."""
        ...

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        """Return once the local replica has applied ``index`` (raises ``LeaderTimeout``)."""
        ...

    async def linearizable_barrier(self) -> None:
        """Leader only: ReadIndex round; returns once the local replica is linearizable."""
        ...

    def is_ready(self) -> bool:
        """Joined, leader known, applied caught up with the commit index."""
        ...

    def is_isolated(self) -> bool:
        """Fenced: the node has not heard from a quorum for isolation-fence-after."""
        ...

    # --- reads (local replica) -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The /status body."""
        ...

    def members(self) -> list[dict[str, Any]]:
        """The /cluster/members body, sorted by nodeId."""
        ...

    def has_member(self, node_id: int) -> bool: ...

    def tokens(self) -> list[dict[str, Any]]: ...

    def pools(self) -> list[dict[str, Any]]: ...

    def pool(self, name: str) -> dict[str, Any]: ...

    def leases(
        self, *, node_id: int | None, pool: str | None, limit: int, after: int | None
    ) -> list[dict[str, Any]]: ...

    def audit(
        self, *, after: int | None, limit: int, action: str | None, actor: str | None
    ) -> list[dict[str, Any]]:
        """Audit records from the local replica, sorted by id."""
        ...

    # --- leader-only operations (the HTTP layer has already forwarded when not leader) -------
    async def autopilot(self) -> dict[str, Any]: ...

    async def what_if(
        self, *, remove: Sequence[int], fail: Sequence[int], drain: Sequence[int], promote: Sequence[int]
    ) -> dict[str, Any]:
        """``{voters, quorum, healthyVoters, failureTolerance, leaderNodeId, safe, warnings}`` for
        the cluster as it would be; changes nothing. 404 for an id that is not a member."""
        ...

    async def remove_member(self, node_id: int, *, force: bool) -> None: ...

    async def promote_member(self, node_id: int) -> None: ...

    async def drain_member(self, node_id: int, *, deadline_seconds: int) -> DrainState: ...

    async def resume_member(self, node_id: int) -> None: ...

    async def set_member_address(
        self, node_id: int, *, raft_address: str | None, api_address: str | None
    ) -> dict[str, Any]:
        """Record a member's new addresses (None: unchanged); returns its members item.
        Validates them like the config keys (400 ``invalid_raft_address``/``invalid_api_address``)."""
        ...

    async def mint_join_token(self, node_id: int, ttl_seconds: int | None) -> dict[str, Any]:
        """``{"token": str, "expiresAt": int}``"""
        ...

    async def create_token(self, name: str, role: TokenRole, ttl_seconds: int | None) -> dict[str, Any]: ...

    async def revoke_token(self, token_id: str) -> None: ...

    async def create_pool(self, name: str, cidr: str) -> dict[str, Any]: ...

    async def delete_pool(self, name: str) -> None: ...

    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        """Returns the lease and whether a new address was allocated (False: the same (pool,
        holder) already held one, re-owned to ``node_id``). ``node_id`` None means the node that
        received the HTTP request (the HTTP layer passes the original receiver's id when it
        forwards)."""
        ...

    async def release_lease(self, lease_id: int) -> None: ...

    async def rotate_certificate(self) -> dict[str, Any]:
        """Rotate this node's certificate through the log (it is the member the request names):
        ``{certificateFingerprint, certificateExpiresAt}`` once the old certificate is unpinned."""
        ...
