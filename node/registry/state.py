"""The replicated state machine: member registry, cluster secrets, tokens, pools and leases.

``StateMachine`` is applied by the node in log order: ``apply`` for NORMAL entries (a command
from ``quorumd.node.registry.commands``; empty data is the leader's no-op) and ``apply_conf_change`` for
CONF_CHANGE entries (the engine has already changed the Raft configuration; the registry
follows it). It is pure and deterministic: its only clock is the ``ts`` the leader stamped into
each command, and nothing depends on set iteration order, so every replica that applies the
same log holds the same state and produces byte-identical snapshots.

Rejections are results, not exceptions: a command refused for a deterministic reason (unknown
pool, pool exhausted, node draining, ...) and even undecodable data yield an ``ApplyResult``
whose ``error`` is a stable snake_case code (``ApplyCode``), because the log must always be
appliable. The only exceptions are ``StateError`` (the caller applied out of order: a broken
invariant) and ``SnapshotError`` from ``restore``.

What is stored:
- members: the registry (addresses, binary version, certificate pin, drain state, left flag,
  protocol version once recorded);
- the cluster's protocol version: a ratchet, 1 until a ``SetProtocolVersion``;
- cluster id and join HMAC key (set once by the founder);
- join tokens: minted and consumed ids with their expiry; entries are pruned once the
  command clock passes expiry plus a grace period, so the set stays bounded; a consumed id is
  kept while the token could still verify, which is what makes a replay fail everywhere;
- API tokens: only the SHA-256 of the secret (see ``quorumd.node.registry.apitoken``), never the secret;
- pools and leases: ``quorumd.node.registry.leases.LeaseTable``;
- the audit trail: ``quorumd.node.registry.audit.AuditTrail``, appended by ``Audited``
  and ``RecordAudit`` commands and by audited ConfChange contexts, in the same entry as the
  change; retention is the bound carried in each entry.

Snapshots (``snapshot``/``restore``): the format, its versions and its checks are
``quorumd.node.registry.snapshot_codec``; ``restore`` replaces the state only when all of the
snapshot is valid. A lease owner need not be a member (see ``refound``: a restored state keeps
the leases of ids that are not members yet). The value types are in
``quorumd.node.registry.records``.

A NORMAL entry or member context written for a newer protocol raises
``EntryNeedsNewerProtocol`` with nothing changed (not even the applied index): the node must
stop, never skip it.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import replace
from heapq import heappop, heappush

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.registry import certificates
from quorumd.node.registry.apitoken import TOKEN_ID_RE
from quorumd.node.registry.audit import AuditNote, AuditRecord, AuditTrail
from quorumd.node.registry.commands import (
    AllocateLease,
    Audited,
    Command,
    CommandError,
    CreateApiToken,
    CreatePool,
    DeletePool,
    EntryNeedsNewerProtocol,
    MarkNodeLeft,
    MemberContext,
    MintJoinToken,
    Noop,
    PinCertificate,
    RecordAudit,
    RegisterNodeInfo,
    ReleaseLease,
    RevokeApiToken,
    SetClusterSecrets,
    SetDrain,
    SetMemberAddress,
    SetProtocolVersion,
    UnpinCertificate,
    decode_command,
    decode_member_context,
    split_audited_context,
)
from quorumd.node.registry.leases import Lease, LeaseTable, PoolInfo, Rejection, SnapshotError
from quorumd.node.registry.records import (
    MIN_JOIN_KEY_BYTES,
    ApiToken,
    ApplyCode,
    ApplyResult,
    ApplyValue,
    JoinTokenRecord,
    Member,
    StateError,
)
from quorumd.node.registry.snapshot_codec import encode_parts, load_snapshot, refound
from quorumd.raft.core.types import ConfChange, ConfChangeType

__all__ = ["StateMachine"]

logger = logging.getLogger(__name__)

JOIN_TOKEN_MAX_TTL_SECONDS = 86400  # bounds the expiry of a consumed id that was never recorded as minted
JOIN_TOKEN_PRUNE_GRACE_SECONDS = 3600  # tolerance for clock differences between successive leaders
MAX_TOKEN_NAME_CHARS = 128
MAX_ADDRESS_CHARS = 512  # a member's raft or API address
SECRET_HASH_BYTES = 32
_DUMMY_HASH = bytes(SECRET_HASH_BYTES)


class StateMachine:
    """See the module docstring."""

    __slots__ = (
        "_api_tokens",
        "_applied_index",
        "_audit",
        "_cluster_id",
        "_cluster_protocol",
        "_join_expiry",
        "_join_key",
        "_join_tokens",
        "_leases",
        "_members",
    )

    def __init__(self) -> None:
        self._applied_index = 0
        self._cluster_id: str | None = None
        self._cluster_protocol = 1
        self._join_key: bytes | None = None
        self._members: dict[int, Member] = {}
        self._join_tokens: dict[bytes, JoinTokenRecord] = {}
        self._join_expiry: list[tuple[int, bytes]] = []  # min-heap (expires_at, token id)
        self._api_tokens: dict[str, ApiToken] = {}
        self._leases = LeaseTable()
        self._audit = AuditTrail()

    # --- identity ----------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def cluster_id(self) -> str | None:
        return self._cluster_id

    @property
    def join_key(self) -> bytes | None:
        return self._join_key

    @property
    def cluster_protocol_version(self) -> int:
        """The recorded protocol version of the cluster (a ratchet; 1 until recorded)."""
        return self._cluster_protocol

    # --- registry queries --------------------------------------------------------------------

    def members(self) -> list[Member]:
        return [self._members[i] for i in sorted(self._members)]

    def member(self, node_id: int) -> Member | None:
        return self._members.get(node_id)

    def has_member(self, node_id: int) -> bool:
        return node_id in self._members

    def pins(self) -> dict[int, tuple[str, ...]]:
        """node id -> pinned certificate fingerprints (the current one first), in id order."""
        return {i: certificates.fingerprints(self._members[i]) for i in sorted(self._members)}

    def cert_pem(self, node_id: int) -> str | None:
        m = self._members.get(node_id)
        return None if m is None else m.cert_pem

    def active_lease_count(self, node_id: int) -> int:
        return self._leases.active_count(node_id)

    # --- join tokens -------------------------------------------------------------------------

    def is_join_token_consumed(self, token_id: bytes) -> bool:
        rec = self._join_tokens.get(token_id)
        return rec is not None and rec.consumed_at is not None

    def join_token(self, token_id: bytes) -> JoinTokenRecord | None:
        return self._join_tokens.get(token_id)

    def join_token_count(self) -> int:
        return len(self._join_tokens)

    # --- API tokens --------------------------------------------------------------------------

    def api_tokens(self) -> list[ApiToken]:
        return [self._api_tokens[i] for i in sorted(self._api_tokens)]

    def api_token(self, token_id: str) -> ApiToken | None:
        return self._api_tokens.get(token_id)

    def authenticate(self, token_id: str, secret_hash: bytes, now: float) -> TokenRole | None:
        """The role of a valid, unexpired token whose secret hashes to ``secret_hash``."""
        tok = self._api_tokens.get(token_id)
        if tok is None:
            hmac.compare_digest(_DUMMY_HASH, secret_hash)  # same work for unknown ids
            return None
        if not hmac.compare_digest(tok.secret_hash, secret_hash):
            return None
        if tok.expires_at is not None and now >= tok.expires_at:
            return None
        return tok.role

    # --- audit trail -------------------------------------------------------------------------

    def audit_records(
        self,
        *,
        after: int | None = None,
        limit: int = 100,
        action: str | None = None,
        actor: str | None = None,
    ) -> list[AuditRecord]:
        """Oldest first; ``after`` is the last id of the previous page; ``actor`` a token id."""
        return self._audit.query(after=after, limit=limit, action=action, actor=actor)

    def audit_count(self) -> int:
        return len(self._audit)

    # --- pools and leases --------------------------------------------------------------------

    def pools(self) -> list[PoolInfo]:
        return self._leases.pools()

    def pool(self, name: str) -> PoolInfo | None:
        return self._leases.pool(name)

    def lease(self, lease_id: int) -> Lease | None:
        return self._leases.lease(lease_id)

    def leases(
        self,
        node_id: int | None = None,
        pool: str | None = None,
        limit: int = 1000,
        after: int | None = None,
    ) -> list[Lease]:
        """Sorted by id; ``after`` is the last id of the previous page."""
        return self._leases.leases(node_id=node_id, pool=pool, limit=limit, after=after)

    def lease_count(self) -> int:
        return self._leases.lease_count()

    def announced_prefixes(self, node_id: int) -> list[str]:
        return self._leases.announced_prefixes(node_id)

    def next_lease_id(self) -> int:
        return self._leases.next_lease_id()

    # --- apply -------------------------------------------------------------------------------

    def apply(self, index: int, data: bytes, decoded: Command | None = None) -> ApplyResult:
        """Apply a NORMAL entry. Never raises for bad data (see the module docstring).

        ``decoded``: ``decode_command(data)`` when the caller already has it (the proposer
        decoded its own encoding to validate it); the result is the same either way.
        An entry written for a newer protocol raises ``EntryNeedsNewerProtocol`` (``index``
        set) and changes nothing."""
        if index <= self._applied_index:
            raise StateError(f"apply index {index} <= applied index {self._applied_index}")
        if not data:
            self._applied_index = index
            return ApplyResult(index)
        if decoded is not None:
            cmd = decoded
        else:
            try:
                cmd = decode_command(data)
            except CommandError as exc:
                self._applied_index = index
                logger.warning("command_rejected index=%d code=bad_command", index)
                return ApplyResult(index, ApplyCode.BAD_COMMAND, str(exc))
            except EntryNeedsNewerProtocol as exc:
                exc.index = index
                raise
        self._applied_index = index
        self._prune_join_tokens(cmd.ts)
        note: AuditNote | None = None
        if type(cmd) is Audited:  # the change and its record: the record only if the change is made
            note, cmd = cmd.note, cmd.command
            if self._is_ignored_completion(cmd):
                note = None
        try:
            value = self._dispatch(cmd)
        except Rejection as rej:
            logger.debug("command_rejected index=%d code=%s", index, rej.code)
            return ApplyResult(index, rej.code, rej.message, command=cmd)
        if note is not None:
            self._audit.append(cmd.ts, note)
        return ApplyResult(index, value=value, command=cmd)

    def _is_ignored_completion(self, cmd: Command) -> bool:
        """A "drained" that completes no drain (the member was resumed meanwhile): no record."""
        if type(cmd) is not SetDrain or cmd.state != DrainState.DRAINED:
            return False
        m = self._members.get(cmd.node_id)
        return m is not None and m.drain_state == DrainState.ACTIVE

    def apply_conf_change(self, index: int, cc: ConfChange) -> ApplyResult:
        """Mirror a membership change in the registry. The registry always follows the Raft
        configuration; an error code here is advisory (the change itself has happened)."""
        context, note_ts, note = cc.context, 0.0, None
        try:  # a context for a newer protocol stops the node before anything changes
            context, note_ts, note = split_audited_context(cc.context)
            if context and (cc.type == ConfChangeType.ADD_NONVOTER or cc.type == ConfChangeType.PROMOTE):
                decode_member_context(context)
        except CommandError:
            pass
        except EntryNeedsNewerProtocol as exc:
            exc.index = index
            raise
        self._advance(index)
        node_id = cc.node_id
        if cc.type == ConfChangeType.REMOVE:
            member = self._members.pop(node_id, None)
            purged = self._leases.purge_node(node_id)
            if member is not None:
                logger.info("member_removed node_id=%d leases_purged=%d", node_id, purged)
            self._audit_conf_change(note, note_ts)
            return ApplyResult(index, value=purged, command=cc)
        if cc.type == ConfChangeType.DEMOTE or (
            cc.type == ConfChangeType.PROMOTE and node_id in self._members
        ):
            self._audit_conf_change(note, note_ts)
            return ApplyResult(index, value=self._members.get(node_id), command=cc)
        # ADD_NONVOTER, or PROMOTE of an unknown id (the founder's bootstrap entry)
        try:
            ctx = decode_member_context(context)
        except CommandError as exc:
            logger.warning("member_context_rejected index=%d node_id=%d", index, node_id)
            return ApplyResult(index, ApplyCode.BAD_COMMAND, f"member context: {exc}", command=cc)
        self._prune_join_tokens(ctx.ts)
        member = self._register(node_id, ctx)
        consumed = ctx.join_token_id is None or self._consume_join_token(ctx, node_id)
        if consumed and note is not None:
            self._audit.append(note_ts, note)
        if not consumed:
            logger.warning("join_token_reused node_id=%d", node_id)
            return ApplyResult(
                index,
                ApplyCode.JOIN_TOKEN_REUSED,
                "member registered, but its join token had already been consumed",
                value=member,
                command=cc,
            )
        return ApplyResult(index, value=member, command=cc)

    def _audit_conf_change(self, note: AuditNote | None, ts: float) -> None:
        """Append the record of a removal, promotion or demotion (``ts``: the audited context's)."""
        if note is not None:
            self._audit.append(ts, note)

    # --- snapshot ----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return b"".join(self.snapshot_parts())

    def snapshot_parts(self) -> list[bytes]:
        """``snapshot()`` as the pieces it is the concatenation of, the cached lease chunks among
        them uncopied: a caller that must not hold the event loop while megabytes are copied
        joins them elsewhere (see quorumd.node.cluster.backup). The v1 format while the cluster
        is at protocol 1, else the newest (``quorumd.node.registry.snapshot_codec``)."""
        return encode_parts(self)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot; raises ``SnapshotError`` (state untouched)."""
        try:
            new = load_snapshot(data)
        except CommandError as exc:
            raise SnapshotError(str(exc)) from None
        for name in StateMachine.__slots__:
            setattr(self, name, getattr(new, name))
        logger.info(
            "state_restored applied_index=%d members=%d leases=%d",
            self._applied_index,
            len(self._members),
            self._leases.lease_count(),
        )

    def prepare_snapshot(self, max_chunks: int) -> int:
        """Do part of the next ``snapshot()``'s encoding now; returns the work left (0: done).
        For callers that yield to the event loop between steps (see LeaseTable)."""
        return self._leases.encode_dirty_chunks(max_chunks)

    def refound(self, index: int, member: Member, join_key: bytes, admin: ApiToken) -> None:
        """``quorumd restore``: this replica's node becomes the founder of the same cluster
        (``snapshot_codec.refound`` says what is kept and what is replaced)."""
        refound(self, index, member, join_key, admin)

    # --- internals ---------------------------------------------------------------------------

    def _advance(self, index: int) -> None:
        if index <= self._applied_index:
            raise StateError(f"apply index {index} <= applied index {self._applied_index}")
        self._applied_index = index

    def _dispatch(self, cmd: Command) -> ApplyValue:
        match cmd:
            case Noop():
                return None
            case SetClusterSecrets():
                self._set_secrets(cmd)
                return None
            case RegisterNodeInfo():
                m = self._need_member(cmd.node_id)
                m = replace(m, api_address=cmd.api_address, binary_version=cmd.binary_version, left=False)
                self._members[m.node_id] = m
                return m
            case SetDrain():
                return self._set_drain(cmd)
            case MarkNodeLeft():
                m = replace(self._need_member(cmd.node_id), left=cmd.left)
                self._members[m.node_id] = m
                logger.info("member_left node_id=%d left=%s", m.node_id, m.left)
                return m
            case CreateApiToken():
                return self._create_api_token(cmd)
            case RevokeApiToken():
                tok = self._api_tokens.pop(cmd.token_id, None)
                if tok is None:
                    raise Rejection(ApplyCode.UNKNOWN_TOKEN, f"unknown token {cmd.token_id!r}")
                logger.info("api_token_revoked token_id=%s", cmd.token_id)
                return tok
            case CreatePool():
                return self._leases.create_pool(cmd.name, cmd.cidr, cmd.ts)
            case DeletePool():
                return self._leases.delete_pool(cmd.name)
            case AllocateLease():
                m = self._need_member(cmd.node_id)
                if m.drain_state != DrainState.ACTIVE:
                    raise Rejection(ApplyCode.NODE_DRAINING, f"node {cmd.node_id} is {m.drain_state}")
                return self._leases.allocate(cmd.pool, cmd.holder, cmd.node_id, cmd.ts)
            case ReleaseLease():
                return self._leases.release(cmd.lease_id)
            case MintJoinToken():
                if cmd.token_id not in self._join_tokens:
                    self._add_join_token(cmd.token_id, JoinTokenRecord(cmd.node_id, cmd.expires_at, None))
                return None
            case SetProtocolVersion():
                return self._set_protocol_version(cmd)
            case SetMemberAddress():
                return self._set_member_address(cmd)
            case RecordAudit():
                return self._audit.append(cmd.ts, cmd.note).record_id
            case PinCertificate() | UnpinCertificate():
                m = self._need_member(cmd.node_id)
                if isinstance(cmd, PinCertificate):
                    m = certificates.pin(m, self._cluster_id, cmd)
                else:
                    m = certificates.unpin(m, cmd)
                self._members[m.node_id] = m
                return m
            case Audited():  # unwrapped by apply; a nested one is refused by the decoder
                raise Rejection(ApplyCode.BAD_COMMAND, "an audited change cannot be audited again")
        raise Rejection(ApplyCode.BAD_COMMAND, "unhandled command")  # pragma: no cover

    def _set_protocol_version(self, cmd: SetProtocolVersion) -> int:
        """Record members' protocol versions and raise the cluster's (never lower it). A raise
        needs every registered member listed at or above the new version: a member that joined
        after the leader looked makes the command a rejected no-op (the leader looks again)."""
        listed = dict(cmd.members)
        new = max(self._cluster_protocol, cmd.cluster_version)
        if new > self._cluster_protocol and any(listed.get(i, 0) < new for i in self._members):
            raise Rejection(ApplyCode.STALE_PROTOCOL_VIEW, "a member is not listed at the new version")
        for node_id, version in cmd.members:
            m = self._members.get(node_id)
            if m is not None and m.protocol_version != version:
                self._members[node_id] = replace(m, protocol_version=version)
        if new != self._cluster_protocol:
            logger.info("cluster_protocol_version_set from=%d to=%d", self._cluster_protocol, new)
            self._cluster_protocol = new
            self._leases.set_protocol(new)  # the allocation rule follows the log (see leases.py)
        return new

    def _set_member_address(self, cmd: SetMemberAddress) -> Member:
        """A member's addresses. The proposer validated them like the config keys;
        here only what keeps the registry sane: non-empty, bounded, printable.
        (Audit action ``member_address_changed`` is recorded by whoever proposes this command,
        in the same entry, once the audit trail exists: see node/cluster/addresses.py.)"""
        m = self._need_member(cmd.node_id)
        for name, value in (("raft_address", cmd.raft_address), ("api_address", cmd.api_address)):
            if not value or len(value) > MAX_ADDRESS_CHARS or not value.isprintable() or " " in value:
                limit = MAX_ADDRESS_CHARS
                raise Rejection(ApplyCode.INVALID_ARGUMENT, f"{name} must be 1-{limit} printable characters")
        if m.raft_address == cmd.raft_address and m.api_address == cmd.api_address:
            return m
        new = replace(m, raft_address=cmd.raft_address, api_address=cmd.api_address)
        self._members[m.node_id] = new
        logger.info(
            "member_address_changed node_id=%d raft_address=%s api_address=%s",
            m.node_id, new.raft_address, new.api_address,
        )  # fmt: skip
        return new

    def _need_member(self, node_id: int) -> Member:
        m = self._members.get(node_id)
        if m is None:
            raise Rejection(ApplyCode.UNKNOWN_NODE, f"node {node_id} is not a member")
        return m

    def _set_secrets(self, cmd: SetClusterSecrets) -> None:
        if self._cluster_id is not None:
            if self._cluster_id == cmd.cluster_id and self._join_key == cmd.join_key:
                return
            raise Rejection(ApplyCode.SECRETS_ALREADY_SET, "cluster secrets are already set")
        if not cmd.cluster_id or len(cmd.join_key) < MIN_JOIN_KEY_BYTES:
            raise Rejection(ApplyCode.INVALID_ARGUMENT, "empty cluster id or short join key")
        self._cluster_id = cmd.cluster_id
        self._join_key = cmd.join_key
        logger.info("cluster_secrets_set cluster_id=%s", cmd.cluster_id)

    def _set_drain(self, cmd: SetDrain) -> Member:
        m = self._need_member(cmd.node_id)
        if cmd.state == DrainState.DRAINED and m.drain_state == DrainState.ACTIVE:
            # "drained" completes a drain; proposed after reading "draining" (deadline watch,
            # confirmation), it must not undo a resume committed in between: a no-op then.
            logger.info("drain_completion_ignored node_id=%d reason=resumed", m.node_id)
            return m
        deadline = cmd.deadline_ts if cmd.state == DrainState.DRAINING else None
        changed_at = cmd.ts if cmd.state != m.drain_state else m.drain_changed_at
        new = replace(m, drain_state=cmd.state, drain_changed_at=changed_at, drain_deadline=deadline)
        self._members[m.node_id] = new
        if cmd.state != m.drain_state:
            logger.info("drain_state_changed node_id=%d from=%s to=%s", m.node_id, m.drain_state, cmd.state)
        return new

    def _create_api_token(self, cmd: CreateApiToken) -> ApiToken:
        if not TOKEN_ID_RE.fullmatch(cmd.token_id):
            raise Rejection(ApplyCode.INVALID_ARGUMENT, "token id must be 12 lowercase hex characters")
        if not cmd.name or len(cmd.name) > MAX_TOKEN_NAME_CHARS:
            raise Rejection(ApplyCode.INVALID_ARGUMENT, f"name must be 1-{MAX_TOKEN_NAME_CHARS} characters")
        if len(cmd.secret_hash) != SECRET_HASH_BYTES:
            raise Rejection(ApplyCode.INVALID_ARGUMENT, "secret hash must be 32 bytes")
        if cmd.token_id in self._api_tokens:
            raise Rejection(ApplyCode.TOKEN_EXISTS, f"token {cmd.token_id!r} already exists")
        tok = ApiToken(cmd.token_id, cmd.name, cmd.role, cmd.secret_hash, cmd.ts, cmd.expires_at)
        self._api_tokens[tok.token_id] = tok
        logger.info("api_token_created token_id=%s role=%s", tok.token_id, tok.role)
        return tok

    def _register(self, node_id: int, ctx: MemberContext) -> Member:
        old = self._members.get(node_id)
        if old is None:
            m = Member(
                node_id,
                ctx.raft_address,
                ctx.api_address,
                ctx.binary_version,
                ctx.cert_fingerprint,
                ctx.cert_pem,
                DrainState.ACTIVE,
                ctx.ts,
                None,
                False,
                ctx.protocol_version,
            )
            logger.info("member_registered node_id=%d raft_address=%s", node_id, ctx.raft_address)
        else:
            m = replace(
                old,
                raft_address=ctx.raft_address,
                api_address=ctx.api_address,
                binary_version=ctx.binary_version,
                cert_fingerprint=ctx.cert_fingerprint,
                cert_pem=ctx.cert_pem,
                left=False,
                protocol_version=ctx.protocol_version or old.protocol_version,
            )
            logger.info("member_updated node_id=%d raft_address=%s", node_id, ctx.raft_address)
        self._members[node_id] = m
        return m

    def _consume_join_token(self, ctx: MemberContext, node_id: int) -> bool:
        """Record consumption; False when the id had already been consumed."""
        assert ctx.join_token_id is not None
        token_id = ctx.join_token_id
        rec = self._join_tokens.get(token_id)
        if rec is None:
            self._add_join_token(
                token_id, JoinTokenRecord(node_id, int(ctx.ts) + JOIN_TOKEN_MAX_TTL_SECONDS, ctx.ts)
            )
            return True
        if rec.consumed_at is not None:
            return False
        self._join_tokens[token_id] = replace(rec, consumed_at=ctx.ts)
        return True

    def _add_join_token(self, token_id: bytes, rec: JoinTokenRecord) -> None:
        self._join_tokens[token_id] = rec
        heappush(self._join_expiry, (rec.expires_at, token_id))

    def _prune_join_tokens(self, ts: float) -> None:
        heap, tokens = self._join_expiry, self._join_tokens
        while heap and heap[0][0] + JOIN_TOKEN_PRUNE_GRACE_SECONDS <= ts:
            expires_at, token_id = heappop(heap)
            rec = tokens.get(token_id)
            if rec is not None and rec.expires_at == expires_at:
                del tokens[token_id]
