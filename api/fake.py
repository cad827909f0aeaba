"""An in-memory ``NodeApi`` for tests: ``FakeCluster`` (the replicated state) and ``FakeNode``.

Several ``FakeNode``s share one ``FakeCluster``, which stands for the replicated state every
replica has applied: members with suffrage, drain states and catch-up flags, API tokens (hashed,
with expiry on an injectable clock), pools and leases with real lowest-free-address allocation.
``cluster.leader_id`` switches who leads (0: nobody). ``FakeNode.forward`` calls the leader's ``Api``
through ``dispatch_forwarded``, as the cluster channel would, with the node layer's error mapping
(503 no leader, 502 unreachable, 504 slow). Hooks for tests: ``forward_failure``, ``gate`` (an
``asyncio.Event`` leader operations wait on: a slow leader), ``raise_next`` (an exception the next
operation raises), ``apply_stuck`` (``wait_applied`` times out), ``ready``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Api

from .errors import (
    Conflict,
    LeaderTimeout,
    LeaderUnavailable,
    LeaderUnreachable,
    NotFound,
)
from .ports import DrainState, ForwardedRequest, ForwardedResponse, Principal, TokenRole

_TOKEN_RE = re.compile(r"qd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
FAKE_VERSION = "0.0.0-fake"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hash(secret: str) -> bytes:
    return hashlib.sha256(b"fake-token\x00" + secret.encode()).digest()


@dataclass(slots=True)
class FakeMember:
    node_id: int
    voter: bool = True
    caught_up: bool = True
    drain_state: DrainState = DrainState.ACTIVE
    moved_to: tuple[str, str] | None = None  # (raft, api) set by set_member_address

    @property
    def raft_address(self) -> str:
        return self.moved_to[0] if self.moved_to else f"127.0.0.{self.node_id}:7000"

    @property
    def api_address(self) -> str:
        return self.moved_to[1] if self.moved_to else f"https://127.0.0.{self.node_id}:5002"


@dataclass(slots=True)
class FakeToken:
    token_id: str
    name: str
    role: TokenRole
    secret_hash: bytes
    created_at: float
    expires_at: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "name": self.name,
            "role": str(self.role),
            "createdAt": _rfc3339(self.created_at),
            "expiresAt": self.expires_at,
        }


@dataclass(slots=True)
class FakePool:
    name: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    created_at: float

    def capacity(self) -> int:
        n = self.network.num_addresses
        return n - 2 if self.network.version == 4 and self.network.prefixlen < 31 else n


class FakeCluster:
    """The state all fake replicas share (see the module docstring)."""

    def __init__(self, *, now: Callable[[], float] = lambda: 1_750_000_000.0) -> None:
        self.now = now
        self.members: dict[int, FakeMember] = {}
        self.tokens: dict[str, FakeToken] = {}
        self.pools: dict[str, FakePool] = {}
        self.leases: dict[int, dict[str, Any]] = {}
        self.next_lease_id = 1
        self.applied = 0
        self.term = 1
        self.leader_id = 0
        self.apps: dict[int, Api] = {}
        self._token_seq = 0

    def commit(self) -> int:
        self.applied += 1
        return self.applied

    def add_member(
        self,
        node_id: int,
        *,
        voter: bool = True,
        caught_up: bool = True,
        drain: DrainState = DrainState.ACTIVE,
    ) -> FakeMember:
        m = self.members[node_id] = FakeMember(node_id, voter, caught_up, drain)
        return m

    def add_token(
        self, role: TokenRole, *, name: str = "test", expires_at: int | None = None
    ) -> tuple[str, str]:
        """A new token: ``(token_id, bearer text)``."""
        self._token_seq += 1
        token_id = f"{self._token_seq:012x}"
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        self.tokens[token_id] = FakeToken(token_id, name, role, _hash(secret), self.now(), expires_at)
        return token_id, f"qd_{token_id}_{secret}"

    def active_leases(self, node_id: int) -> int:
        return sum(1 for x in self.leases.values() if x["nodeId"] == node_id)


class FakeNode:
    """One replica's ``NodeApi`` view of a ``FakeCluster``."""

    def __init__(self, cluster: FakeCluster, node_id: int, *, cluster_enabled: bool = True) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self._cluster_enabled = cluster_enabled
        self.ready = True
        self.forward_failure: str | None = None  # "unreachable" | None
        self.apply_stuck = False
        self.gate: asyncio.Event | None = None
        self.raise_next: BaseException | None = None
        self.forwarded: list[ForwardedRequest] = []
        self.waited: list[int] = []
        self.barriers = 0
        self.allocations: list[tuple[str, str, int | None]] = []

    # --- identity and routing -------------------------------------------------------------
    @property
    def cluster_enabled(self) -> bool:
        return self._cluster_enabled

    def is_leader(self) -> bool:
        return self.cluster.leader_id == self.node_id

    def leader_id(self) -> int:
        return self.cluster.leader_id

    def applied_index(self) -> int:
        return self.cluster.applied

    def authenticate(self, token: str) -> Principal | None:
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            return None
        tok = self.cluster.tokens.get(m.group(1))
        if tok is None or not hmac.compare_digest(tok.secret_hash, _hash(m.group(2))):
            return None
        if tok.expires_at is not None and tok.expires_at <= self.cluster.now():
            return None
        return Principal(tok.token_id, tok.role)

    async def forward(self, request: ForwardedRequest, timeout_seconds: float) -> ForwardedResponse:
        self.forwarded.append(request)
        if self.forward_failure == "unreachable":
            raise LeaderUnreachable(f"node {self.cluster.leader_id} is unreachable")
        leader = self.cluster.leader_id
        app = self.cluster.apps.get(leader)
        if leader == 0 or leader == self.node_id or app is None:
            raise LeaderUnavailable()
        try:
            return await asyncio.wait_for(app.dispatch_forwarded(request), timeout_seconds)
        except TimeoutError:
            raise LeaderTimeout(f"node {leader} did not answer in time") from None

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        self.waited.append(index)
        if self.apply_stuck:
            raise LeaderTimeout("this node did not catch up in time", code="apply_timeout")

    async def linearizable_barrier(self) -> None:
        self.barriers += 1
        self._require_leader()

    def is_ready(self) -> bool:
        return self.ready

    # --- reads ----------------------------------------------------------------------------
    def _member(self, node_id: int) -> FakeMember:
        m = self.cluster.members.get(node_id)
        if m is None:
            raise NotFound(f"node {node_id} is not a member", code="member_not_found")
        return m

    def status(self) -> dict[str, Any]:
        c = self.cluster
        me = c.members.get(self.node_id)
        leader = c.members.get(c.leader_id)
        return {
            "version": FAKE_VERSION,
            "nodeId": self.node_id,
            "clusterId": "fake-cluster",
            "role": "leader" if self.is_leader() else "follower",
            "term": c.term,
            "leaderNodeId": c.leader_id,
            "leaderApiAddress": leader.api_address if leader else None,
            "commitIndex": c.applied,
            "appliedIndex": c.applied,
            "ready": self.ready,
            "drainState": str(me.drain_state if me else DrainState.ACTIVE),
            "clusterProtocolVersion": 2,
        }

    def members(self) -> list[dict[str, Any]]:
        c = self.cluster
        return [
            {
                "nodeId": m.node_id,
                "raftAddress": m.raft_address,
                "apiAddress": m.api_address,
                "binaryVersion": FAKE_VERSION,
                "suffrage": "voter" if m.voter else "nonvoter",
                "isLeader": m.node_id == c.leader_id,
                "drainState": str(m.drain_state),
                "activeLeases": c.active_leases(m.node_id),
                "protocolVersion": 2,
            }
            for m in sorted(c.members.values(), key=lambda m: m.node_id)
        ]

    def has_member(self, node_id: int) -> bool:
        return node_id in self.cluster.members

    def tokens(self) -> list[dict[str, Any]]:
        return [t.as_dict() for _, t in sorted(self.cluster.tokens.items())]

    def _pool_dict(self, p: FakePool) -> dict[str, Any]:
        used = sum(1 for x in self.cluster.leases.values() if x["pool"] == p.name)
        return {
            "name": p.name,
            "cidr": str(p.network),
            "size": p.capacity(),
            "allocated": used,
            "createdAt": _rfc3339(p.created_at),
        }

    def pools(self) -> list[dict[str, Any]]:
        return [self._pool_dict(p) for _, p in sorted(self.cluster.pools.items())]

    def pool(self, name: str) -> dict[str, Any]:
        p = self.cluster.pools.get(name)
        if p is None:
            raise NotFound(f"pool {name!r} does not exist", code="pool_not_found")
        return self._pool_dict(p)

    def leases(
        self, *, node_id: int | None, pool: str | None, limit: int, after: int | None
    ) -> list[dict[str, Any]]:
        out = []
        for lease_id in sorted(self.cluster.leases):
            x = self.cluster.leases[lease_id]
            if after is not None and lease_id <= after:
                continue
            if (node_id is not None and x["nodeId"] != node_id) or (pool is not None and x["pool"] != pool):
                continue
            out.append(dict(x))
            if len(out) >= limit:
                break
        return out

    # --- leader-only operations -----------------------------------------------------------
    def _require_leader(self) -> None:
        if not self.is_leader():
            raise LeaderUnavailable("not the leader")

    async def _enter(self) -> None:
        """Every leader operation starts here: test hooks, then the leader check."""
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        if self.gate is not None:
            await self.gate.wait()
        self._require_leader()

    async def autopilot(self) -> dict[str, Any]:
        await self._enter()
        c = self.cluster
        voters = sorted(m.node_id for m in c.members.values() if m.voter)
        servers = [
            {
                "nodeId": m.node_id,
                "raftAddress": m.raft_address,
                "nodeStatus": "alive",
                "healthy": m.caught_up,
                "isLeader": m.node_id == c.leader_id,
                "hasVotingRights": m.voter,
                "stableSince": _rfc3339(c.now()),
                "lastContactMs": 0.0 if m.node_id == c.leader_id else 12.5,
                "lastTerm": c.term,
                "lastIndex": c.applied,
            }
            for m in sorted(c.members.values(), key=lambda m: m.node_id)
        ]
        healthy_voters = sum(1 for m in c.members.values() if m.voter and m.caught_up)
        return {
            "healthy": all(s["healthy"] for s in servers),
            "failureTolerance": max(0, healthy_voters - (len(voters) // 2 + 1)),
            "leaderNodeId": c.leader_id,
            "voters": voters,
            "servers": servers,
        }

    async def remove_member(self, node_id: int, *, force: bool) -> None:
        await self._enter()
        c = self.cluster
        m = self._member(node_id)
        if m.drain_state != DrainState.DRAINED and not force:
            raise Conflict(f"node {node_id} must be drained first (or use force=true)", code="not_drained")
        others = sorted(v.node_id for v in c.members.values() if v.voter and v.node_id != node_id)
        if m.voter and not others:
            raise Conflict("cannot remove the last voter", code="last_voter")
        if node_id == c.leader_id:
            c.leader_id = others[0]
            c.term += 1
        del c.members[node_id]
        for lease_id in [i for i, x in c.leases.items() if x["nodeId"] == node_id]:
            del c.leases[lease_id]
        c.commit()

    async def promote_member(self, node_id: int) -> None:
        await self._enter()
        m = self._member(node_id)
        if m.voter:
            raise Conflict(f"node {node_id} is already a voter", code="already_voter")
        if not m.caught_up:
            raise Conflict(f"node {node_id} is not caught up with the leader", code="not_caught_up")
        m.voter = True
        self.cluster.commit()

    async def drain_member(self, node_id: int, *, deadline_seconds: int) -> DrainState:
        await self._enter()
        m = self._member(node_id)
        if m.drain_state != DrainState.DRAINED:
            m.drain_state = DrainState.DRAINED if deadline_seconds == 0 else DrainState.DRAINING
        self.cluster.commit()
        return m.drain_state

    async def resume_member(self, node_id: int) -> None:
        await self._enter()
        self._member(node_id).drain_state = DrainState.ACTIVE
        self.cluster.commit()

    async def set_member_address(
        self, node_id: int, *, raft_address: str | None, api_address: str | None
    ) -> dict[str, Any]:
        await self._enter()  # no format checks here: the real node validates like the config
        m = self._member(node_id)
        m.moved_to = (raft_address or m.raft_address, api_address or m.api_address)
        self.cluster.commit()
        return next(x for x in self.members() if x["nodeId"] == node_id)

    async def mint_join_token(self, node_id: int, ttl_seconds: int | None) -> dict[str, Any]:
        await self._enter()
        if node_id in self.cluster.members:
            raise Conflict(f"node {node_id} is already a member", code="already_member")
        ttl = 1800 if ttl_seconds is None else ttl_seconds
        return {"token": "fake-join-" + secrets.token_hex(8), "expiresAt": int(self.cluster.now()) + ttl}

    async def create_token(self, name: str, role: TokenRole, ttl_seconds: int | None) -> dict[str, Any]:
        await self._enter()
        c = self.cluster
        expires = int(c.now()) + ttl_seconds if ttl_seconds else None
        token_id, text = c.add_token(role, name=name, expires_at=expires)
        c.commit()
        return {"id": token_id, "name": name, "role": str(role), "token": text, "expiresAt": expires}

    async def revoke_token(self, token_id: str) -> None:
        await self._enter()
        if self.cluster.tokens.pop(token_id, None) is None:
            raise NotFound(f"token {token_id} does not exist", code="token_not_found")
        self.cluster.commit()

    async def create_pool(self, name: str, cidr: str) -> dict[str, Any]:
        await self._enter()
        c = self.cluster
        if name in c.pools:
            raise Conflict(f"pool {name!r} already exists", code="pool_exists")
        net = ipaddress.ip_network(cidr, strict=True)
        for other in c.pools.values():
            if other.network.version == net.version and other.network.overlaps(net):
                raise Conflict(f"{net} overlaps pool {other.name!r}", code="pool_overlap")
        pool = c.pools[name] = FakePool(name, net, c.now())
        c.commit()
        return self._pool_dict(pool)

    async def delete_pool(self, name: str) -> None:
        await self._enter()
        c = self.cluster
        if name not in c.pools:
            raise NotFound(f"pool {name!r} does not exist", code="pool_not_found")
        if any(x["pool"] == name for x in c.leases.values()):
            raise Conflict(f"pool {name!r} has active leases", code="pool_in_use")
        del c.pools[name]
        c.commit()

    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        await self._enter()
        self.allocations.append((pool, holder, node_id))
        c = self.cluster
        owner = node_id if node_id is not None else self.node_id
        p = c.pools.get(pool)
        if p is None:
            raise NotFound(f"pool {pool!r} does not exist", code="pool_not_found")
        if self._cluster_enabled:
            m = self._member(owner)
            if m.drain_state != DrainState.ACTIVE:
                raise Conflict(f"node {owner} is {m.drain_state}", code="node_draining")
        for x in c.leases.values():
            if x["pool"] == pool and x["holder"] == holder:
                x["nodeId"] = owner
                c.commit()
                return dict(x), False
        used = {x["address"] for x in c.leases.values() if x["pool"] == pool}
        hosts = p.network.hosts()
        address = next((str(a) for a in hosts if str(a) not in used), None)
        if address is None:
            raise Conflict(f"pool {pool!r} has no free address", code="pool_exhausted")
        lease_id = c.next_lease_id
        c.next_lease_id += 1
        lease = {
            "id": lease_id,
            "pool": pool,
            "address": address,
            "holder": holder,
            "nodeId": owner,
            "createdAt": _rfc3339(c.now()),
        }
        c.leases[lease_id] = lease
        c.commit()
        return dict(lease), True

    async def allocate_lease(self, pool: str, holder: str, node_id: int | None) -> dict[str, Any]:
        lease, _created = await self.allocate_lease_reporting(pool, holder, node_id)
        return lease

    async def release_lease(self, lease_id: int) -> None:
        await self._enter()
        if self.cluster.leases.pop(lease_id, None) is None:
            raise NotFound(f"lease {lease_id} does not exist", code="lease_not_found")
        self.cluster.commit()
