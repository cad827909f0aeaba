"""The state machine's snapshot format: encoding, decoding and the format check.

``[1, applied_index, cluster_id, join_key, members, join_tokens, api_tokens, lease_table]`` while
the cluster's protocol version is 1 (byte for byte the first release's format, so such a
follower can install it); from protocol 2 on the newest format, ``[3, ..., lease_table,
cluster_protocol_version, audit_trail]``, with each member's protocol version appended to its
row (format 2, without the trail, is read too); from protocol 3 on, format 4: format 3 with each
member's next certificate (PEM or nil, pinned while it rotates) appended to its row. This
module is the state machine's codec: it reads and fills the state machine's fields directly, and
validates types and cross-references before a single field of the live state is replaced
(``StateMachine.restore``).
"""

from __future__ import annotations

import io
import logging
from heapq import heapify
from typing import TYPE_CHECKING

import msgpack

from quorumd.node.registry import certificates
from quorumd.node.registry.audit import AuditTrail
from quorumd.node.registry.commands import (
    check_bool,
    check_bytes,
    check_float,
    check_int,
    check_list,
    check_opt_bytes,
    check_opt_float,
    check_opt_int,
    check_str,
    drain_from_code,
    drain_to_code,
    pack,
    role_from_code,
    role_to_code,
)
from quorumd.node.registry.leases import LeaseTable, SnapshotError
from quorumd.node.registry.records import (
    MIN_JOIN_KEY_BYTES,
    SNAPSHOT_VERSION,
    SNAPSHOT_VERSION_V1,
    SNAPSHOT_VERSION_V2,
    SNAPSHOT_VERSION_V3,
    ApiToken,
    JoinTokenRecord,
    Member,
    SnapshotFormatError,
    StateError,
)

if TYPE_CHECKING:
    from quorumd.node.registry.state import StateMachine

logger = logging.getLogger(__name__)


def encode_parts(sm: StateMachine) -> list[bytes]:
    """``sm``'s snapshot as the pieces it is the concatenation of (``StateMachine.snapshot_parts``)."""
    v2 = sm._cluster_protocol >= 2
    v4 = sm._cluster_protocol >= 3
    members = [
        [
            m.node_id,
            m.raft_address,
            m.api_address,
            m.binary_version,
            m.cert_fingerprint,
            m.cert_pem,
            drain_to_code(m.drain_state),
            m.drain_changed_at,
            m.drain_deadline,
            m.left,
            *((m.protocol_version,) if v2 else ()),
            *((m.next_cert_pem,) if v4 else ()),
        ]
        for m in sm.members()
    ]
    join_tokens = [
        [tid, rec.node_id, rec.expires_at, rec.consumed_at] for tid, rec in sorted(sm._join_tokens.items())
    ]
    api_tokens = [
        [t.token_id, t.name, role_to_code(t.role), t.secret_hash, t.created_at, t.expires_at]
        for t in sm.api_tokens()
    ]
    # ``pack([...7 fields..., sm._leases.dump()])`` byte for byte: an 8-element array whose
    # last element the lease table encodes from its cache (LeaseTable.packed_dump_parts); v3
    # is a 10-element array with the cluster's protocol version and the audit trail last.
    version = SNAPSHOT_VERSION if v4 else SNAPSHOT_VERSION_V3 if v2 else SNAPSHOT_VERSION_V1
    head = (version, sm._applied_index, sm._cluster_id, sm._join_key)
    parts = [b"\x9a" if v2 else b"\x98", *(pack(x) for x in head)]
    parts += [pack(members), pack(join_tokens), pack(api_tokens)]
    parts += sm._leases.packed_dump_parts()
    if v2:
        parts.append(pack(sm._cluster_protocol))
        parts.append(sm._audit.packed())
    return parts


def check_snapshot_format(data: bytes) -> None:
    """Raise ``SnapshotFormatError`` when ``data`` is a snapshot in a newer format than this build
    reads (only its head is decoded: cheap for any size). Anything else is left to ``restore``."""
    try:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data[:16])
        unpacker.read_array_header()
        version = unpacker.unpack()
    except Exception:  # malformed: restore says what is wrong
        return
    if type(version) is int and version > SNAPSHOT_VERSION:
        raise SnapshotFormatError(version)


def load_snapshot(data: bytes) -> StateMachine:
    """A state machine holding the snapshot ``data`` (any format this build reads); raises
    ``SnapshotError`` (or ``SnapshotFormatError``) for anything else.

    Decoded as a stream: the fields before and after the lease table whole, the lease table
    one row at a time (``LeaseTable.load_stream``), so a million leases never exist as decoded
    objects at once (that cost ~2x the table's own memory at peak and left the heap fragmented)."""
    from quorumd.node.registry.state import StateMachine  # the state machine this codec fills

    if type(data) is not bytes:
        raise SnapshotError("snapshot: expected bytes")
    # Read through a BytesIO (which shares ``data``) rather than fed: feeding copies it whole.
    unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False, use_list=True, strict_map_key=True)
    try:
        count = unpacker.read_array_header()
        version = unpacker.unpack() if count else 0
    except Exception as exc:  # msgpack raises a handful of unrelated types on garbage
        raise SnapshotError(f"snapshot: undecodable ({type(exc).__name__})") from None
    version = check_int(version, "snapshot version")
    if version > SNAPSHOT_VERSION:
        raise SnapshotFormatError(version)
    if version not in (SNAPSHOT_VERSION_V1, SNAPSHOT_VERSION_V2, SNAPSHOT_VERSION_V3, SNAPSHOT_VERSION):
        raise SnapshotError("unsupported snapshot version")
    expected = {1: 8, 2: 9, 3: 10, 4: 10}[version]
    if count != expected:
        raise SnapshotError(f"snapshot: expected {expected} items, got {count}")
    v2 = version >= SNAPSHOT_VERSION_V2  # v3: the v2 fields, then the audit trail
    v4 = version >= SNAPSHOT_VERSION  # v4: v3, each member row with its next certificate
    try:
        fields = [unpacker.unpack() for _ in range(6)]
        applied_raw, cluster_raw, key_raw, members_raw, join_raw, api_raw = fields
        leases = LeaseTable.load_stream(unpacker)
        rest = [unpacker.unpack() for _ in range(count - 8)]
        if unpacker.tell() != len(data):
            raise SnapshotError("snapshot: extra data after the snapshot")
    except SnapshotError:
        raise
    except Exception as exc:
        raise SnapshotError(f"snapshot: undecodable ({type(exc).__name__})") from None
    sm = StateMachine()
    if version >= SNAPSHOT_VERSION_V3:
        sm._audit = AuditTrail.load(rest[1])
    if v2:
        sm._cluster_protocol = check_int(rest[0], "cluster_protocol_version")
        if sm._cluster_protocol < (3 if v4 else 2):
            raise SnapshotError(f"a v{version} snapshot records a lower cluster protocol version")
    sm._applied_index = check_int(applied_raw, "applied_index")
    if sm._applied_index < 0:
        raise SnapshotError("negative applied index")
    sm._cluster_id = None if cluster_raw is None else check_str(cluster_raw, "cluster_id")
    sm._join_key = check_opt_bytes(key_raw, "join_key")
    if (sm._cluster_id is None) != (sm._join_key is None):
        raise SnapshotError("cluster id and join key must be set together")

    prev_node = 0
    for item in check_list(members_raw, "members"):
        f = check_list(item, "member", 12 if v4 else 11 if v2 else 10)
        next_pem = None if not v4 or f[11] is None else check_str(f[11], "next_cert_pem")
        next_fp = None if next_pem is None else certificates.fingerprint_of(next_pem)
        if next_pem is not None and next_fp is None:
            raise SnapshotError("a member's next certificate is not a PEM certificate")
        m = Member(
            node_id=check_int(f[0], "node_id"),
            raft_address=check_str(f[1], "raft_address"),
            api_address=check_str(f[2], "api_address"),
            binary_version=check_str(f[3], "binary_version"),
            cert_fingerprint=check_str(f[4], "cert_fingerprint"),
            cert_pem=check_str(f[5], "cert_pem"),
            drain_state=drain_from_code(f[6]),
            drain_changed_at=check_float(f[7], "drain_changed_at"),
            drain_deadline=check_opt_float(f[8], "drain_deadline"),
            left=check_bool(f[9], "left"),
            protocol_version=check_opt_int(f[10], "protocol_version") if v2 else None,
            next_cert_pem=next_pem,
            next_cert_fingerprint=next_fp,
        )
        if m.node_id <= prev_node:
            raise SnapshotError("members not sorted by id (or id < 1)")
        prev_node = m.node_id
        sm._members[m.node_id] = m

    prev_tid: bytes | None = None
    for item in check_list(join_raw, "join tokens"):
        f = check_list(item, "join token", 4)
        tid = check_bytes(f[0], "join token id")
        if prev_tid is not None and tid <= prev_tid:
            raise SnapshotError("join tokens not sorted by id")
        prev_tid = tid
        sm._join_tokens[tid] = JoinTokenRecord(
            check_int(f[1], "node_id"), check_int(f[2], "expires_at"), check_opt_float(f[3], "consumed_at")
        )
    sm._join_expiry = [(rec.expires_at, tid) for tid, rec in sm._join_tokens.items()]
    heapify(sm._join_expiry)

    prev_api: str | None = None
    for item in check_list(api_raw, "api tokens"):
        f = check_list(item, "api token", 6)
        tok = ApiToken(
            token_id=check_str(f[0], "token_id"),
            name=check_str(f[1], "name"),
            role=role_from_code(f[2]),
            secret_hash=check_bytes(f[3], "secret_hash"),
            created_at=check_float(f[4], "created_at"),
            expires_at=check_opt_int(f[5], "expires_at"),
        )
        if prev_api is not None and tok.token_id <= prev_api:
            raise SnapshotError("api tokens not sorted by id")
        prev_api = tok.token_id
        sm._api_tokens[tok.token_id] = tok

    # A lease may name an owner that is not a member: a state restored from a backup keeps the
    # leases of every node id (they count again for a node of that id that joins). Removing a
    # member still purges its leases.
    sm._leases = leases
    sm._leases.set_protocol(sm._cluster_protocol)
    return sm


def refound(sm: StateMachine, index: int, member: Member, join_key: bytes, admin: ApiToken) -> None:
    """``quorumd restore``: this replica's node becomes the founder of the same cluster.

    Every member, and with it every certificate pin, is replaced by ``member``; pools and
    leases are kept (owner ids too); the join key is replaced and the join-token records
    dropped (a token minted under the old key no longer verifies); ``admin`` joins the API
    tokens, which all keep working. ``index`` (above the applied index) becomes the applied
    index: the state differs from the archive's, so it gets an index of its own."""
    if sm._cluster_id is None:
        raise StateError("cannot refound a state without cluster secrets")
    if len(join_key) < MIN_JOIN_KEY_BYTES or admin.token_id in sm._api_tokens:
        raise StateError("short join key or an admin token id that exists")
    sm._advance(index)
    sm._members = {member.node_id: member}
    sm._join_key = join_key
    sm._join_tokens = {}
    sm._join_expiry = []
    sm._api_tokens[admin.token_id] = admin
    sm._api_tokens = dict(sorted(sm._api_tokens.items()))
    logger.info("state_refounded index=%d node_id=%d", index, member.node_id)
