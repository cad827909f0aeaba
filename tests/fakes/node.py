"""An in-memory ``NodeApi`` for API tests: ``FakeCluster`` (the replicated state) and ``FakeNode``.

The state is the product's own pure ``StateMachine``: every change a test or a ``FakeNode`` makes
is encoded as the same command the node would propose and applied at the next index, so members,
drain states, API tokens, pools and leases (with the real allocator) behave as on a replica. What
the fake stands in for is the node layer around it: there is no Raft, ``leader_id`` says who leads
(0: nobody), suffrage and catch-up are plain sets the test sets, and the membership checks the
node makes before it proposes (drained before removal, last voter, already a voter, caught up)
are restated here in a few lines.

Several ``FakeNode``s share one ``FakeCluster``, which stands for the state every replica has
applied. ``FakeNode.forward`` calls the leader's ``Api`` through ``dispatch_forwarded``, as the
cluster channel would, with the node layer's error mapping (503 no leader, 502 unreachable, 504
slow). Hooks for tests: ``forward_failure``, ``gate`` (an ``asyncio.Event`` leader operations wait
on: a slow leader), ``raise_next`` (an exception the next operation raises), ``apply_stuck``
(``wait_applied`` times out), ``ready``.

Pool create/delete and token revoke write their audit record as the node does (the request's
origin, in the same entry), so API tests can read the trail through ``GET /audit``.

Backups (``FakeNode.backups``): the leader makes a stand-in body sent in small pieces; a
forwarded request's handle names it in ``FakeCluster.held_backups``, where the follower's relay
takes it from.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quorumd.api.errors import (
    ApiError,
    Conflict,
    LeaderTimeout,
    LeaderUnavailable,
    LeaderUnreachable,
    NotFound,
)
from quorumd.api.origin import current_origin
from quorumd.api.ports import DrainState, ForwardedRequest, ForwardedResponse, Principal, TokenRole
from quorumd.node.cluster.addresses import validate_addresses
from quorumd.node.cluster.service import rejection_error
from quorumd.node.registry import apitoken, jointoken
from quorumd.node.registry.audit import Actor, AuditAction, note_of
from quorumd.node.registry.autopilot import (
    Autopilot,
    AutopilotSettings,
    AutopilotView,
    Scenario,
    ServerInput,
    what_if,
)
from quorumd.node.registry.commands import (
    AllocateLease,
    Audited,
    Command,
    CreateApiToken,
    CreatePool,
    DeletePool,
    ReleaseLease,
    RevokeApiToken,
    SetClusterSecrets,
    SetDrain,
    SetMemberAddress,
    encode_command,
)
from quorumd.node.registry.context import MemberContext, encode_member_context
from quorumd.node.registry.leases import Lease
from quorumd.node.registry.records import ApplyResult, member_rows
from quorumd.node.registry.state import StateMachine
from quorumd.raft.core.types import ConfChange, ConfChangeType

if TYPE_CHECKING:
    from quorumd.api.app import Api

FAKE_VERSION = "0.0.0-fake"
AUTOPILOT = AutopilotSettings(server_stabilization_seconds=0.0)
FAKE_CLUSTER_ID = "fake-cluster"


@dataclass(frozen=True, slots=True)
class MemberView:
    """What a test reads of a member: the registry's drain state and the fake's suffrage."""

    node_id: int
    voter: bool
    caught_up: bool
    drain_state: DrainState


class FakeCluster:
    """The state all fake replicas share (see the module docstring)."""

    def __init__(self, *, now: Callable[[], float] = lambda: 1_750_000_000.0) -> None:
        self.now = now
        self.sm = StateMachine()
        self.index = 0
        self.term = 1
        self.leader_id = 0
        self.voters: set[int] = set()
        self.lagging: set[int] = set()
        self.apps: dict[int, Api] = {}
        self.autopilot = Autopilot(AUTOPILOT)
        self.last_token_id = ""
        self._last_ts = 0.0
        self.held_backups: dict[str, tuple[FakeArchive, str]] = {}  # transfer -> (archive, holder)
        self.run(SetClusterSecrets(self.stamp(), FAKE_CLUSTER_ID, secrets.token_bytes(32)))

    # --- applying --------------------------------------------------------------------------
    @property
    def applied(self) -> int:
        return self.index

    def stamp(self) -> float:
        """A command's timestamp: the clock, made strictly increasing as a leader's would be."""
        self._last_ts = max(self.now(), self._last_ts + 0.001)
        return self._last_ts

    def run(self, cmd: Command) -> ApplyResult:
        """Apply ``cmd`` at the next index; a rejection raises the API error the node would."""
        self.index += 1
        res = self.sm.apply(self.index, encode_command(cmd))
        if not res.ok:
            raise rejection_error(res)
        return res

    def conf(self, kind: ConfChangeType, node_id: int, context: bytes = b"") -> ApplyResult:
        self.index += 1
        return self.sm.apply_conf_change(self.index, ConfChange(kind, node_id, context))

    # --- test set-up -----------------------------------------------------------------------
    def add_member(
        self,
        node_id: int,
        *,
        voter: bool = True,
        caught_up: bool = True,
        drain: DrainState = DrainState.ACTIVE,
    ) -> MemberView:
        ctx = MemberContext(
            raft_address=f"127.0.0.{node_id}:7000",
            api_address=f"https://127.0.0.{node_id}:5002",
            binary_version=FAKE_VERSION,
            cert_fingerprint="sha256:" + f"{node_id:02x}" * 32,
            cert_pem="",
            join_token_id=None,
            ts=self.stamp(),
        )
        self.conf(ConfChangeType.ADD_NONVOTER, node_id, encode_member_context(ctx))
        if voter:
            self.voters.add(node_id)
        if not caught_up:
            self.lagging.add(node_id)
        if drain != DrainState.ACTIVE:
            self.set_drain(node_id, drain)
        return self.members[node_id]

    def set_drain(self, node_id: int, state: DrainState) -> None:
        """Move a member's drain state as the node does (a drain passes through ``draining``)."""
        m = self.sm.member(node_id)
        if state == DrainState.DRAINED and m is not None and m.drain_state == DrainState.ACTIVE:
            self.run(SetDrain(self.stamp(), node_id, DrainState.DRAINING, None))
        self.run(SetDrain(self.stamp(), node_id, state, None))

    def add_token(
        self, role: TokenRole, *, name: str = "test", expires_at: int | None = None
    ) -> tuple[str, str]:
        """A new token: ``(token_id, bearer text)``."""
        token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
        secret = secrets.token_bytes(32)
        self.run(CreateApiToken(self.stamp(), token_id, name, role, apitoken.hash_secret(secret), expires_at))
        self.last_token_id = token_id
        return token_id, apitoken.format_api_token(token_id, secret)

    # --- reads for tests -------------------------------------------------------------------
    @property
    def members(self) -> dict[int, MemberView]:
        return {
            m.node_id: MemberView(
                m.node_id, m.node_id in self.voters, m.node_id not in self.lagging, m.drain_state
            )
            for m in self.sm.members()
        }

    @property
    def pools(self) -> dict[str, Any]:
        return {p.name: p for p in self.sm.pools()}

    @property
    def tokens(self) -> dict[str, Any]:
        return {t.token_id: t for t in self.sm.api_tokens()}

    def active_leases(self, node_id: int) -> int:
        return self.sm.active_lease_count(node_id)


class FakeNode:
    """One replica's ``NodeApi`` view of a ``FakeCluster``."""

    def __init__(self, cluster: FakeCluster, node_id: int, *, cluster_enabled: bool = True) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self._cluster_enabled = cluster_enabled
        self.ready = True
        self.isolated = False
        self.forward_failure: str | None = None  # "unreachable" | None
        self.apply_stuck = False
        self.gate: asyncio.Event | None = None
        self.raise_next: BaseException | None = None
        self.forwarded: list[ForwardedRequest] = []
        self.waited: list[int] = []
        self.barriers = 0
        self.rotations = 0
        self.allocations: list[tuple[str, str, int | None]] = []
        self.backups = FakeBackups(self)

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
        parsed = apitoken.parse_api_token(token)
        if parsed is None:
            return None
        token_id, secret_hash = parsed
        role = self.cluster.sm.authenticate(token_id, secret_hash, self.cluster.now())
        return None if role is None else Principal(token_id, role)

    async def forward(
        self, request: ForwardedRequest, timeout_seconds: float, *, to: int | None = None
    ) -> ForwardedResponse:
        self.forwarded.append(request)
        leader = self.cluster.leader_id if to is None else to
        if self.forward_failure == "unreachable":
            raise LeaderUnreachable(f"node {leader} is unreachable")
        app = self.cluster.apps.get(leader)
        if to is not None and app is None:  # a member with no API here: it is down
            raise LeaderUnreachable(f"node {to} is unreachable")
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

    def is_isolated(self) -> bool:
        return self.isolated

    # --- reads ----------------------------------------------------------------------------
    def _member(self, node_id: int) -> MemberView:
        m = self.cluster.members.get(node_id)
        if m is None:
            raise NotFound(f"node {node_id} is not a member", code="member_not_found")
        return m

    def status(self) -> dict[str, Any]:
        c = self.cluster
        me = c.sm.member(self.node_id)
        leader = c.sm.member(c.leader_id)
        return {
            "version": FAKE_VERSION,
            "nodeId": self.node_id,
            "clusterId": FAKE_CLUSTER_ID,
            "role": "leader" if self.is_leader() else "follower",
            "term": c.term,
            "leaderNodeId": c.leader_id,
            "leaderApiAddress": leader.api_address if leader else None,
            "commitIndex": c.applied,
            "appliedIndex": c.applied,
            "ready": self.ready,
            "drainState": str(me.drain_state if me else DrainState.ACTIVE),
            "clusterProtocolVersion": c.sm.cluster_protocol_version,
        }

    def members(self) -> list[dict[str, Any]]:
        c = self.cluster
        return member_rows(c.sm, c.voters, c.leader_id, lambda _node_id: 1)

    def has_member(self, node_id: int) -> bool:
        return self.cluster.sm.has_member(node_id)

    def tokens(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.cluster.sm.api_tokens()]

    def pools(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.cluster.sm.pools()]

    def pool(self, name: str) -> dict[str, Any]:
        p = self.cluster.sm.pool(name)
        if p is None:
            raise NotFound(f"pool {name!r} does not exist", code="pool_not_found")
        return p.as_dict()

    def leases(
        self, *, node_id: int | None, pool: str | None, limit: int, after: int | None
    ) -> list[dict[str, Any]]:
        found = self.cluster.sm.leases(node_id=node_id, pool=pool, limit=limit, after=after)
        return [x.as_dict() for x in found]

    def audit(
        self, *, after: int | None, limit: int, action: str | None, actor: str | None
    ) -> list[dict[str, Any]]:
        found = self.cluster.sm.audit_records(after=after, limit=limit, action=action, actor=actor)
        return [r.as_dict() for r in found]

    def _audited(self, cmd: Command, action: AuditAction, target: str, detail: dict[str, Any]) -> Command:
        """``cmd`` with the record of the request being served (as the node writes it)."""
        origin = current_origin.get()
        if origin is None:
            return cmd
        tok = self.cluster.sm.api_token(origin.token_id)
        actor = Actor.token(origin.token_id, tok.name if tok is not None else "unknown")
        note = note_of(
            action,
            target,
            actor,
            detail,
            via_node_id=origin.via_node_id,
            source_address=origin.source_address,
        )
        return Audited(cmd.ts, note, cmd)

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

    def _autopilot_view(self) -> AutopilotView:
        """The product's autopilot run on the fake's members: a lagging member is far behind."""
        c = self.cluster
        leader_last = c.applied + AUTOPILOT.max_trailing_logs + 1
        servers = [
            ServerInput(
                node_id=m.node_id,
                raft_address=m.raft_address,
                voter=m.node_id in c.voters,
                is_leader=m.node_id == c.leader_id,
                last_contact_seconds=0.0 if m.node_id == c.leader_id else 0.0125,
                match_index=leader_last if m.node_id not in c.lagging else c.applied,
                last_term=c.term,
                drain_state=m.drain_state,
                incarnation=m.cert_fingerprint,
            )
            for m in c.sm.members()
        ]
        return c.autopilot.evaluate(
            now=c.now(),
            leader_id=c.leader_id,
            leader_term=c.term,
            leader_last_index=leader_last,
            servers=servers,
        )

    async def autopilot(self) -> dict[str, Any]:
        await self._enter()
        return self._autopilot_view().as_dict()

    async def what_if(
        self, *, remove: Sequence[int], fail: Sequence[int], drain: Sequence[int], promote: Sequence[int]
    ) -> dict[str, Any]:
        await self._enter()
        for nid in sorted({*remove, *fail, *drain, *promote}):
            self._member(nid)
        scenario = Scenario(frozenset(remove), frozenset(fail), frozenset(drain), frozenset(promote))
        return what_if(self._autopilot_view(), scenario, transfer_contact_seconds=1.0).as_dict()

    async def remove_member(self, node_id: int, *, force: bool) -> None:
        await self._enter()
        c = self.cluster
        m = self._member(node_id)
        if m.drain_state != DrainState.DRAINED and not force:
            raise Conflict(f"node {node_id} must be drained first (or use force=true)", code="not_drained")
        others = sorted(c.voters - {node_id})
        if m.voter and not others:
            raise Conflict("cannot remove the last voter", code="last_voter")
        if node_id == c.leader_id:
            c.leader_id = others[0]
            c.term += 1
        c.conf(ConfChangeType.REMOVE, node_id)
        c.voters.discard(node_id)

    async def promote_member(self, node_id: int) -> None:
        await self._enter()
        m = self._member(node_id)
        if m.voter:
            raise Conflict(f"node {node_id} is already a voter", code="already_voter")
        if not m.caught_up:
            raise Conflict(f"node {node_id} is not caught up with the leader", code="not_caught_up")
        self.cluster.conf(ConfChangeType.PROMOTE, node_id)
        self.cluster.voters.add(node_id)

    async def drain_member(self, node_id: int, *, deadline_seconds: int) -> DrainState:
        await self._enter()
        m = self._member(node_id)
        state = m.drain_state
        if state != DrainState.DRAINED:
            state = DrainState.DRAINED if deadline_seconds == 0 else DrainState.DRAINING
            self.cluster.set_drain(node_id, state)
        return state

    async def resume_member(self, node_id: int) -> None:
        await self._enter()
        self._member(node_id)
        self.cluster.set_drain(node_id, DrainState.ACTIVE)

    async def set_member_address(
        self, node_id: int, *, raft_address: str | None, api_address: str | None
    ) -> dict[str, Any]:
        await self._enter()
        self._member(node_id)
        raft, api = validate_addresses(raft_address, api_address)  # as the node does
        c = self.cluster
        cur = c.sm.member(node_id)
        assert cur is not None
        c.run(SetMemberAddress(c.stamp(), node_id, raft or cur.raft_address, api or cur.api_address))
        return next(x for x in self.members() if x["nodeId"] == node_id)

    async def mint_join_token(self, node_id: int, ttl_seconds: int | None) -> dict[str, Any]:
        await self._enter()
        c = self.cluster
        if c.sm.has_member(node_id):
            raise Conflict(f"node {node_id} is already a member", code="already_member")
        key = c.sm.join_key
        assert key is not None
        expires = int(c.now()) + jointoken.validate_ttl(ttl_seconds)
        claims = jointoken.JoinClaims(
            node_id=node_id,
            cluster_id=FAKE_CLUSTER_ID,
            expires_at=expires,
            token_id=secrets.token_bytes(16),
            leader_fingerprint="sha256:" + "00" * 32,
            leader_addresses=(f"127.0.0.{self.node_id}:7000",),
        )
        return {"token": jointoken.mint_join_token(key, claims), "expiresAt": expires}

    async def create_token(self, name: str, role: TokenRole, ttl_seconds: int | None) -> dict[str, Any]:
        await self._enter()
        c = self.cluster
        expires = int(c.now()) + ttl_seconds if ttl_seconds else None
        token_id, text = c.add_token(role, name=name, expires_at=expires)
        return {"id": token_id, "name": name, "role": str(role), "token": text, "expiresAt": expires}

    async def revoke_token(self, token_id: str) -> None:
        await self._enter()
        cmd = RevokeApiToken(self.cluster.stamp(), token_id)
        self.cluster.run(self._audited(cmd, AuditAction.TOKEN_REVOKE, f"token:{token_id}", {}))

    async def create_pool(self, name: str, cidr: str) -> dict[str, Any]:
        await self._enter()
        cmd = CreatePool(self.cluster.stamp(), name, cidr)
        self.cluster.run(self._audited(cmd, AuditAction.POOL_CREATE, f"pool:{name}", {"cidr": cidr}))
        return self.pool(name)

    async def delete_pool(self, name: str) -> None:
        await self._enter()
        cmd = DeletePool(self.cluster.stamp(), name)
        self.cluster.run(self._audited(cmd, AuditAction.POOL_DELETE, f"pool:{name}", {}))

    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        await self._enter()
        self.allocations.append((pool, holder, node_id))
        owner = node_id if node_id is not None else self.node_id
        if self._cluster_enabled:
            self._member(owner)
        cmd = AllocateLease(self.cluster.stamp(), pool, holder, owner)
        lease = self.cluster.run(cmd).value
        assert isinstance(lease, Lease)
        return lease.as_dict(), lease.created_at == cmd.ts

    async def rotate_certificate(self) -> dict[str, Any]:
        """The fake has no transport: it records the call and answers its (unchanged) pin."""
        self.rotations += 1
        member = self.cluster.sm.member(self.node_id)
        if member is None:  # as the real node: not (or no longer) a member
            raise ApiError(409, "not_a_member", "this node is not a member of the cluster yet")
        return {"certificateFingerprint": member.cert_fingerprint, "certificateExpiresAt": None}

    async def release_lease(self, lease_id: int) -> None:
        await self._enter()
        self.cluster.run(ReleaseLease(self.cluster.stamp(), lease_id))


class FakeArchive:
    """A stand-in archive body (the format is the node layer's), sent 8 bytes at a time."""

    def __init__(self, cluster: FakeCluster, maker: int) -> None:
        self.cluster = cluster
        self.body = b"quorumd fake backup %d by %d\n" % (cluster.applied, maker)
        self.index = cluster.applied
        self.sha256 = hashlib.sha256(self.body).hexdigest()
        self.cluster_id = FAKE_CLUSTER_ID
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.body)

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for i in range(0, len(self.body), 8):
            yield self.body[i : i + 8]

    def close(self) -> None:
        self.closed = True

    def handoff(self, holder: str) -> dict[str, Any]:
        transfer = secrets.token_hex(8)
        self.cluster.held_backups[transfer] = (self, holder)
        return {"transfer": transfer, "index": self.index}


class FakeBackups:
    """``FakeNode.backups`` (see the module docstring)."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node

    async def archive(self) -> FakeArchive:
        """Counted as a barrier, like the node's ReadIndex round."""
        self.node.barriers += 1
        if self.node.cluster.leader_id == 0:
            raise LeaderUnavailable()
        return FakeArchive(self.node.cluster, self.node.node_id)

    def relayed(self) -> bool:
        return self.node.cluster_enabled and not self.node.is_leader()

    async def relay(self, handle: Mapping[str, Any], token: str, timeout: float) -> FakeArchive:
        archive, _holder = self.node.cluster.held_backups.pop(str(handle["transfer"]))
        return archive
