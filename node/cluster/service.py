"""ClusterService: the replica of a running node: its state machine, Raft driver and API reads.

One part of ``quorumd.node.cluster.operations.ClusterNode`` (which composes it with the other
parts and implements ``quorumd.api.ports.NodeApi``). It owns the ``StateMachine``, the driver's
``Application`` (applying committed entries, snapshots), proposals and membership changes, the
reads of the replica, forwarding to the leader, token authentication and the cluster RPC it was
given; the other parts subscribe to applied entries (``add_apply_listener``) and call it, never
the other way round. The internal RPCs members send each other, and who may call them, are in
``quorumd.node.cluster.rpcs``; members' protocol versions and the gate every proposal passes in
``quorumd.node.cluster.versions`` (``self.versions``). Audit records are written with their
changes through ``self.trail`` (``quorumd.node.cluster.audit``); ``self.backups`` serves archives
(``quorumd.node.cluster.backup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from quorumd.api.errors import ApiError
from quorumd.api.ports import (
    DrainState,
    ForwardedRequest,
    ForwardedResponse,
    Principal,
)
from quorumd.node.cluster.audit import AuditAction, AuditWriter
from quorumd.node.cluster.backup import NodeBackups
from quorumd.node.cluster.versions import ProtocolVersions
from quorumd.node.daemon.gcpolicy import gc_paused
from quorumd.node.effects.token import FencingToken
from quorumd.node.registry import apitoken, jointoken
from quorumd.node.registry.commands import (
    AllocateLease,
    Command,
    CreatePool,
    DeletePool,
    MarkNodeLeft,
    MemberContext,
    RegisterNodeInfo,
    ReleaseLease,
    SetDrain,
    encode_and_decode,
    encode_command,
    encode_member_context,
)
from quorumd.node.registry.leases import Lease
from quorumd.node.registry.records import ApplyResult, member_rows
from quorumd.node.registry.state import StateMachine
from quorumd.raft.aio.driver import ProposalLostError, RaftDriver
from quorumd.raft.aio.transport import RpcRemoteError, RpcTimeout, RpcUnreachable
from quorumd.raft.codec import decode_conf_change, packb
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import ConfChangeError, NotLeaderError, ProposalDroppedError
from quorumd.raft.core.types import ConfChange, ConfChangeType, Entry, EntryType, Role, SnapshotMeta

log = logging.getLogger(__name__)

# Bound on ClusterService._decoded (proposals waiting to apply here; far above the number that can
# be in flight at once).
_MAX_DECODED = 65536

# ApplyCode -> (HTTP status, API code)
_ERRORS: dict[str, tuple[int, str]] = {
    "bad_command": (400, "bad_request"),
    "invalid_argument": (400, "bad_request"),
    "unknown_node": (404, "member_not_found"),
    "node_draining": (409, "node_draining"),
    "unknown_pool": (404, "pool_not_found"),
    "pool_exists": (409, "pool_exists"),
    "invalid_cidr": (400, "invalid_cidr"),
    "pool_overlap": (409, "pool_overlap"),
    "pool_in_use": (409, "pool_in_use"),
    "pool_exhausted": (409, "pool_exhausted"),
    "unknown_lease": (404, "lease_not_found"),
    "unknown_token": (404, "token_not_found"),
    "token_exists": (409, "token_exists"),
    "join_token_reused": (409, "join_token_reused"),
}


# Parsed bearer tokens kept by ``ClusterService.authenticate`` (only tokens that authenticated).
TOKEN_CACHE_SIZE = 1024


pack = packb  # the shared encoder (one reused Packer per thread)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def rejection_error(res: ApplyResult) -> ApiError:
    """The API error of a command the state machine rejected (its ``ApplyCode``)."""
    status, code = _ERRORS.get(res.error or "", (409, res.error or "conflict"))
    return ApiError(status, code, res.message or code)


def commit_timeout(message: str = "the change was not committed in time") -> ApiError:
    return ApiError(503, "commit_timeout", message, headers={"Retry-After": "1"})


def no_leader() -> ApiError:
    return ApiError(503, "no_leader", "no leader is known; retry shortly", headers={"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: int
    cluster_id: str
    version: str
    raft_address: str
    api_address: str
    fingerprint: str
    cert_pem: str


class ClusterService:
    """See the module docstring. Built by the daemon; ``driver`` is attached after recovery."""

    def __init__(
        self,
        identity: Identity,
        sm: StateMachine,
        *,
        cluster_enabled: bool,
        propose_timeout_seconds: float,
        tick_seconds: float,
        max_trailing_logs: int,
        rpc: Callable[[int, str, bytes, float], Any] | None = None,
    ) -> None:
        self.identity = identity
        self.sm = sm
        self._cluster_enabled = cluster_enabled
        self.propose_timeout = propose_timeout_seconds
        self.tick_seconds = tick_seconds
        self.max_trailing_logs = max_trailing_logs
        self.trail = AuditWriter(self)
        self.backups = NodeBackups(self)  # GET /backup and backup.read (see cluster/backup.py)
        self._caught_up = False  # see is_ready
        self.driver: RaftDriver | None = None
        self._rpc = rpc  # (node_id, method, payload, timeout) -> awaitable bytes
        self._apply_listeners: list[Callable[[Sequence[ApplyResult]], None]] = []
        self.versions = ProtocolVersions(identity.node_id, sm)
        self._apply_listeners.append(self.versions.after_apply)
        self._state_waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        # encoded command -> its decoding, for this node's own proposals until they apply
        self._decoded: dict[bytes, Command] = {}
        self.on_join_result: Callable[[str], None] | None = None
        # bearer text -> (token id, secret hash): see authenticate
        self._parsed_tokens: dict[str, tuple[str, bytes]] = {}
        # Fencing tokens: the entries behind the results the apply listeners are given
        # (empty for a restored snapshot), and the (term, index) of the last applied entry.
        self.applying: Sequence[Entry] = ()
        self.applied_token = FencingToken(0, 0)
        # node id -> count: members whose pin the daemon keeps although the replica dropped
        # them, while an answer to them is being written (see pin_kept)
        self.pins_kept: dict[int, int] = {}
        self.on_pins_changed: Callable[[], None] | None = None

    # --- wiring ---------------------------------------------------------------------------
    @property
    def running_driver(self) -> RaftDriver:
        """The Raft driver, once the daemon has attached it (every caller runs after that)."""
        assert self.driver is not None, "raft driver not attached"
        return self.driver

    def add_apply_listener(self, fn: Callable[[Sequence[ApplyResult]], None]) -> None:
        self._apply_listeners.append(fn)

    def set_rpc(self, rpc: Callable[[int, str, bytes, float], Any]) -> None:
        self._rpc = rpc

    @property
    def rpc(self) -> Callable[[int, str, bytes, float], Any] | None:
        """The cluster RPC, ``(node_id, method, payload, timeout) -> awaitable bytes`` (None: none yet)."""
        return self._rpc

    @contextlib.contextmanager
    def pin_kept(self, node_id: int) -> Iterator[None]:
        """Keep ``node_id``'s certificate pin (and so its connections) while the block runs and
        until the current task step ends, even when the replica removes it meanwhile: an RPC
        handler that removes its caller writes its answer right after the block, before the pin
        goes and the connection closes (else the caller sees a lost answer for a done removal)."""
        self.pins_kept[node_id] = self.pins_kept.get(node_id, 0) + 1
        try:
            yield
        finally:
            asyncio.get_running_loop().call_soon(self._release_pin, node_id)

    def _release_pin(self, node_id: int) -> None:
        left = self.pins_kept.get(node_id, 0) - 1
        if left > 0:
            self.pins_kept[node_id] = left
            return
        self.pins_kept.pop(node_id, None)
        if self.on_pins_changed is not None:
            self.on_pins_changed()

    # --- Application (driver) ---------------------------------------------------------------
    def apply_entries(self, entries: Sequence[Entry]) -> list[Any]:
        results: list[ApplyResult] = []
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                results.append(self.sm.apply_conf_change(e.index, decode_conf_change(e.data)))
            else:
                cmd = self._decoded.pop(e.data, None) if self._decoded else None
                results.append(self.sm.apply(e.index, e.data, cmd))
        if entries:
            last = entries[-1]
            self.applied_token = FencingToken(last.term, last.index)
        self.applying = entries
        for fn in self._apply_listeners:
            fn(results)
        self.applying = ()
        self._wake_state_waiters()
        return list(results)

    def snapshot(self) -> bytes:
        with gc_paused():
            return self.sm.snapshot()

    def restore(self, data: bytes, meta: SnapshotMeta) -> None:
        with gc_paused():
            self.sm.restore(data)
        self.applied_token = FencingToken(meta.term, meta.index)
        for fn in self._apply_listeners:
            fn([])
        self._wake_state_waiters()

    def _wake_state_waiters(self) -> None:
        if not self._state_waiters:
            return
        keep = []
        for pred, fut in self._state_waiters:
            if fut.done():
                continue
            if pred():
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self._state_waiters = keep

    async def wait_state(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``pred()`` holds after some apply; False on timeout."""
        if pred():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state_waiters.append((pred, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False

    # --- proposing --------------------------------------------------------------------------
    async def propose(self, cmd: Command, *, then: Callable[[RaftCore], Any] | None = None) -> ApplyResult:
        # The driver enforces the bound (a deadline checked per tick): no timer handle or task
        # cancellation per write. The command was decoded once to validate its encoding; the
        # leader's apply reuses that decoding (decode_command is a pure function of the bytes).
        self.versions.check(cmd)  # 409 feature_unavailable: a member could not read it
        data, decoded = encode_and_decode(cmd)
        pending = self._decoded
        if len(pending) >= _MAX_DECODED:
            pending.clear()  # entries that never applied here (leadership lost): drop, decode later
        pending[data] = decoded
        try:
            res = await self.running_driver.propose(data, self.propose_timeout, then=then)
        except NotLeaderError as exc:
            pending.pop(data, None)
            raise no_leader() from exc
        except ProposalDroppedError as exc:
            pending.pop(data, None)
            raise commit_timeout(f"cannot accept writes now: {exc}") from exc
        except ProposalLostError as exc:
            raise commit_timeout("leadership changed before the change committed") from exc
        except TimeoutError as exc:
            raise commit_timeout() from exc
        assert isinstance(res, ApplyResult)
        if not res.ok:
            raise rejection_error(res)
        return res

    async def change_membership(self, cc: ConfChange) -> ApplyResult:
        """One membership change, retried while an earlier change is still committing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.propose_timeout
        while True:
            try:
                fut = self.running_driver.propose_conf_change(cc)
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    res = await fut
                break
            except ConfChangeError as exc:
                msg = str(exc)
                if ("uncommitted" in msg or "not committed" in msg) and loop.time() < deadline:
                    await self.running_driver.wait_applied(self.running_driver.core.commit_index)
                    await asyncio.sleep(self.tick_seconds)  # let the pending change commit
                    continue
                raise ApiError(409, "membership_conflict", msg) from exc
            except NotLeaderError as exc:
                raise no_leader() from exc
            except (ProposalDroppedError, ProposalLostError) as exc:
                raise commit_timeout(str(exc)) from exc
            except TimeoutError as exc:
                raise commit_timeout() from exc
        assert isinstance(res, ApplyResult)
        return res

    # --- identity and routing (ClusterNode serves them as NodeApi) --------------------------
    @property
    def cluster_enabled(self) -> bool:
        return self._cluster_enabled

    def is_leader(self) -> bool:
        return self.driver is not None and self.running_driver.core.role == Role.LEADER

    def leader_id(self) -> int:
        return self.running_driver.core.leader_id if self.driver is not None else 0

    def applied_index(self) -> int:
        # The state machine's: it applies (and resolves proposals) before the core's applied index
        # advances at the end of the batch, so a forwarded write's answer must carry this one, or
        # the follower that forwarded it may serve a read of its replica before the write is there.
        return self.sm.applied_index if self.driver is not None else 0

    def authenticate(self, token: str) -> Principal | None:
        """The token's principal per the local replica.

        Parsing and hashing a token is a pure function of its text, so it is remembered for
        tokens that authenticated (at most ``TOKEN_CACHE_SIZE``, oldest dropped first). The
        replicated record is still looked up, compared in constant time and checked for expiry
        on every call: revocation and expiry take effect at once.
        """
        parsed = self._parsed_tokens.get(token)
        cached = parsed is not None
        if parsed is None:
            parsed = apitoken.parse_api_token(token)
            if parsed is None:
                return None
        token_id, secret_hash = parsed
        role = self.sm.authenticate(token_id, secret_hash, time.time())
        if role is None:
            if cached:
                del self._parsed_tokens[token]
            return None
        if not cached:
            if len(self._parsed_tokens) >= TOKEN_CACHE_SIZE:
                del self._parsed_tokens[next(iter(self._parsed_tokens))]
            self._parsed_tokens[token] = parsed
        return Principal(token_id, role)

    async def forward(
        self, request: ForwardedRequest, timeout_seconds: float, *, to: int | None = None
    ) -> ForwardedResponse:
        leader = self.leader_id() if to is None else to
        if leader == 0 or self._rpc is None:
            raise no_leader()
        if leader == self.identity.node_id:
            raise no_leader()
        # the audit trail's origin: sent once every member reads it (the first release takes 6 fields)
        origin = [request.source_address, request.via_node_id] if self.trail.enabled() else []
        payload = pack(
            [
                request.method,
                request.path,
                [list(q) for q in request.query] if request.query else [],
                request.body,
                request.token,
                request.hops,
                *origin,
            ]
        )
        data = await self.call_member(leader, "api.forward", payload, timeout_seconds)
        status, body, headers, applied = unpack(data)
        return ForwardedResponse(
            int(status),
            bytes(body),
            tuple((str(k), str(v)) for k, v in headers) if headers else (),
            int(applied),
        )

    async def call_member(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        """An internal RPC mapped onto API errors: 502 unreachable, 504 slow."""
        assert self._rpc is not None
        try:
            result = await self._rpc(node_id, method, payload, timeout)
        except RpcTimeout as exc:
            raise ApiError(504, "leader_timeout", f"node {node_id} did not answer in time") from exc
        except RpcUnreachable as exc:
            raise ApiError(502, "leader_unreachable", f"node {node_id} is unreachable") from exc
        except RpcRemoteError as exc:
            raise ApiError(502, "leader_error", f"node {node_id} failed: {exc}") from exc
        assert isinstance(result, bytes)
        return result

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        if self.running_driver.core.applied_index >= index:
            return  # the usual case after a forwarded read: no timer to arm and cancel
        try:
            async with asyncio.timeout(timeout_seconds):  # not wait_for: see propose
                await self.running_driver.wait_applied(index)
        except TimeoutError as exc:
            raise ApiError(504, "apply_timeout", "this node did not catch up in time") from exc

    async def linearizable_barrier(self) -> None:
        try:
            async with asyncio.timeout(self.propose_timeout):  # not wait_for: see propose
                await self.running_driver.read_index()
        except NotLeaderError as exc:
            raise no_leader() from exc
        except TimeoutError as exc:
            raise commit_timeout("leadership could not be confirmed in time") from exc

    def is_ready(self) -> bool:
        """Joined, leader known, and applied caught up with the commit index.

        "Caught up" has hysteresis: the node first becomes ready when it has applied everything
        it knows to be committed, and then stays ready while it trails by at most
        ``max_trailing_logs`` entries (at least 1). Under a steady write load a follower always
        has a few committed entries in flight to its state machine; without the slack /readyz
        would flap to 503 on every write. Losing the leader or falling further behind resets it.
        """
        if self.driver is None:
            return False
        core = self.running_driver.core
        if self.identity.node_id not in core.config.members() or core.leader_id == 0:
            self._caught_up = False
            return False
        lag = core.commit_index - core.applied_index
        if lag <= 0:
            self._caught_up = True
        elif lag > max(1, self.max_trailing_logs):
            self._caught_up = False
        return self._caught_up

    # --- reads of the replica (ClusterNode serves them as NodeApi) ---------------------------
    def drain_state_of(self, node_id: int) -> str:
        m = self.sm.member(node_id)
        return str(m.drain_state) if m is not None else str(DrainState.ACTIVE)

    def status(self) -> dict[str, Any]:
        core = self.running_driver.core if self.driver is not None else None
        leader = core.leader_id if core is not None else 0
        lm = self.sm.member(leader) if leader else None
        role = "follower"
        if core is not None and core.role == Role.LEADER:
            role = "leader"
        elif core is not None and core.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            role = "candidate"
        return {
            "version": self.identity.version,
            "nodeId": self.identity.node_id,
            "clusterId": self.identity.cluster_id,
            "role": role,
            "term": core.term if core else 0,
            "leaderNodeId": leader,
            "leaderApiAddress": lm.api_address if lm is not None else None,
            "commitIndex": core.commit_index if core else 0,
            "appliedIndex": core.applied_index if core else 0,
            "ready": self.is_ready(),
            "drainState": self.drain_state_of(self.identity.node_id),
            "clusterProtocolVersion": self.versions.cluster_version(),
        }  # ClusterNode.status adds the node's side effects (speaker, RAN, isolation)

    def members(self) -> list[dict[str, Any]]:
        core = self.running_driver.core
        return member_rows(self.sm, core.config.voters, core.leader_id, self.versions.member_version)

    def has_member(self, node_id: int) -> bool:
        return self.sm.has_member(node_id)

    def tokens(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.sm.api_tokens()]

    def pools(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.sm.pools()]

    def pool(self, name: str) -> dict[str, Any]:
        p = self.sm.pool(name)
        if p is None:
            raise ApiError(404, "pool_not_found", f"pool {name!r} does not exist")
        return p.as_dict()

    def leases(
        self, *, node_id: int | None, pool: str | None, limit: int, after: int | None
    ) -> list[dict[str, Any]]:
        return [x.as_dict() for x in self.sm.leases(node_id=node_id, pool=pool, limit=limit, after=after)]

    def audit(self, *, after: int | None, limit: int, action: str | None, actor: str | None) -> list[Any]:
        return [
            r.as_dict() for r in self.sm.audit_records(after=after, limit=limit, action=action, actor=actor)
        ]

    # --- leader operations (membership ones live in operations.py) ------------------------
    async def create_pool(self, name: str, cidr: str) -> dict[str, Any]:
        cmd = CreatePool(time.time(), name, cidr)
        res = await self.trail.propose_request(cmd, AuditAction.POOL_CREATE, f"pool:{name}", {"cidr": cidr})
        return self.pool(name) if res.value is None else res.value.as_dict()  # type: ignore[union-attr]

    async def delete_pool(self, name: str) -> None:
        await self.trail.propose_request(
            DeletePool(time.time(), name), AuditAction.POOL_DELETE, f"pool:{name}"
        )

    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        """The lease, and whether a new address was allocated (False: existing lease re-owned)."""
        owner = node_id or self.identity.node_id
        if not self.sm.has_member(owner) and self._cluster_enabled:
            raise ApiError(404, "member_not_found", f"node {owner} is not a member")
        cmd = AllocateLease(time.time(), pool, holder, owner)
        res = await self.propose(cmd)
        lease = res.value
        assert isinstance(lease, Lease)
        return lease.as_dict(), lease.created_at == cmd.ts

    async def release_lease(self, lease_id: int) -> None:
        await self.propose(ReleaseLease(time.time(), lease_id))

    async def mint_join_token(self, node_id: int, ttl_seconds: int | None) -> dict[str, Any]:
        if self.sm.has_member(node_id):
            raise ApiError(409, "already_member", f"node {node_id} is already a member")
        key = self.sm.join_key
        cluster_id = self.sm.cluster_id
        if key is None or cluster_id is None:
            raise ApiError(
                503, "not_initialized", "cluster secrets are not committed yet", headers={"Retry-After": "1"}
            )
        try:
            ttl = jointoken.validate_ttl(ttl_seconds)
        except jointoken.JoinTokenError as exc:
            raise ApiError(400, "invalid_ttl", str(exc)) from exc
        expires = int(time.time()) + ttl
        claims = jointoken.JoinClaims(
            node_id=node_id,
            cluster_id=cluster_id,
            expires_at=expires,
            token_id=secrets.token_bytes(16),
            leader_fingerprint=self.identity.fingerprint,
            leader_addresses=(self.identity.raft_address,),
        )
        token = jointoken.mint_join_token(key, claims)
        await self.trail.record_mint(claims.token_id, node_id, expires)
        if self.on_join_result:
            self.on_join_result("minted")
        log.info("join_token_minted node_id=%d expires_at=%d", node_id, expires)
        return {"token": token, "expiresAt": expires}

    # --- registry announcements (any node; forwarded to the leader) -----------------------
    async def announce(self, cmd: RegisterNodeInfo | MarkNodeLeft | SetDrain) -> None:
        """Propose a command about this node through the leader (internal RPC when follower)."""
        if self.is_leader():
            await self.propose(cmd)
            return
        leader = self.leader_id()
        if leader == 0:
            raise no_leader()
        await self.call_member(leader, "node.propose", encode_command(cmd), self.propose_timeout)

    def member_context(self, join_token_id: bytes | None) -> bytes:
        i = self.identity
        return encode_member_context(
            MemberContext(
                raft_address=i.raft_address,
                api_address=i.api_address,
                binary_version=i.version,
                cert_fingerprint=i.fingerprint,
                cert_pem=i.cert_pem,
                join_token_id=join_token_id,
                ts=time.time(),
            )
        )

    def add_nonvoter_change(self, node_id: int, context: bytes) -> ConfChange:
        return ConfChange(ConfChangeType.ADD_NONVOTER, node_id, context)
