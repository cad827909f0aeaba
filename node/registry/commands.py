"""Replicated commands: what the node writes into Raft log entries, and how it is encoded.

Owns the payload of ``EntryType.NORMAL`` entries (one frozen dataclass per operation) and the
registry payload carried in ``ConfChange.context`` (``MemberContext``). Both are msgpack lists
that start with an envelope version, so a later release can add fields or operations without
breaking the replay of an old log:

    command v1:  [1, OpCode, ts, *fields]                      (ops of protocol 1)
    command v2:  [2, required_protocol, OpCode, ts, *fields]   (ops added since)
    context v1:  [1, raft_address, api_address, binary_version, cert_fingerprint,
                  cert_pem, join_token_id | nil, ts]
    context v2:  [2, required_protocol, <the v1 fields>, protocol_version]
    context v3:  [3, 2, inner_context, ts, audit note]          (audited membership changes)

Audit trail: ``Audited`` (op 21) wraps a change with its audit record in one entry,
``RecordAudit`` (op 22) is a record that is its own entry; see ``quorumd.node.registry.audit``.

Protocol versions and the gate. ``OP_PROTOCOL`` is the one table that says which
protocol version introduced each op. The ops of protocol 1 keep the v1 envelope byte for byte,
so a node of the baseline build (protocol 1) reads every entry it can be shown. Every later op
is written in the v2 envelope, which names the protocol needed to read it; every envelope
after v2 keeps ``required_protocol`` at position 1, so this build can tell "needs a newer
build" (``EntryNeedsNewerProtocol``: the node stops, it never skips the entry) from "malformed"
(``CommandError``: today's ``bad_command`` result). ``ClusterService.propose`` calls ``gate``:
a command whose op needs a protocol above the cluster's recorded protocol version is refused
(``FeatureUnavailable``, HTTP 409 ``feature_unavailable``), so no entry is written that a
member cannot read.

Adding an op (audit, backup, certificates, address changes, ...): give it the next ``OpCode``
number, add its dataclass (in ``command_types``), its row in ``OP_PROTOCOL`` (the protocol
version of the first build that has it; bump ``quorumd.node.registry.protocol.PROTOCOL_VERSION``
when it is new), and its cases in ``_fields``/``_decode_fields``. Nothing else: the envelope,
the decoder's stop and the gate follow from the table.

Every command carries ``ts``: unix seconds stamped by the leader when it proposes. The state
machine uses it as its only clock (creation times, drain timestamps, pruning of spent join
tokens), so applying a log is deterministic on every replica.

Decoding is strict (exact arity, exact types, ``bool`` is never an ``int``, floats must be
finite) and raises ``CommandError`` for anything malformed; it never raises anything else.
Semantic checks (does the pool exist, is the CIDR valid) belong to the state machine.
Wire codes (``OpCode``, drain and role codes) are fixed: never renumber them, only add.
"""

from __future__ import annotations

import logging
import math
from enum import IntEnum
from itertools import pairwise
from typing import Any

from quorumd.node.registry.audit import decode_note
from quorumd.node.registry.command_types import AllocateLease as AllocateLease
from quorumd.node.registry.command_types import Audited as Audited
from quorumd.node.registry.command_types import Command as Command
from quorumd.node.registry.command_types import CreateApiToken as CreateApiToken
from quorumd.node.registry.command_types import CreatePool as CreatePool
from quorumd.node.registry.command_types import DeletePool as DeletePool
from quorumd.node.registry.command_types import MarkNodeLeft as MarkNodeLeft
from quorumd.node.registry.command_types import MintJoinToken as MintJoinToken
from quorumd.node.registry.command_types import Noop as Noop
from quorumd.node.registry.command_types import PinCertificate as PinCertificate
from quorumd.node.registry.command_types import RecordAudit as RecordAudit
from quorumd.node.registry.command_types import RegisterNodeInfo as RegisterNodeInfo
from quorumd.node.registry.command_types import ReleaseLease as ReleaseLease
from quorumd.node.registry.command_types import RevokeApiToken as RevokeApiToken
from quorumd.node.registry.command_types import SetClusterSecrets as SetClusterSecrets
from quorumd.node.registry.command_types import SetDrain as SetDrain
from quorumd.node.registry.command_types import SetMemberAddress as SetMemberAddress
from quorumd.node.registry.command_types import SetProtocolVersion as SetProtocolVersion
from quorumd.node.registry.command_types import UnpinCertificate as UnpinCertificate
from quorumd.node.registry.context import MemberContext as MemberContext
from quorumd.node.registry.context import decode_member_context as decode_member_context
from quorumd.node.registry.context import encode_audited_context as encode_audited_context
from quorumd.node.registry.context import encode_member_context as encode_member_context
from quorumd.node.registry.context import split_audited_context as split_audited_context
from quorumd.node.registry.wire import CommandError as CommandError
from quorumd.node.registry.wire import DrainCode as DrainCode
from quorumd.node.registry.wire import EntryNeedsNewerProtocol as EntryNeedsNewerProtocol
from quorumd.node.registry.wire import RoleCode as RoleCode
from quorumd.node.registry.wire import check_bool as check_bool
from quorumd.node.registry.wire import check_bytes as check_bytes
from quorumd.node.registry.wire import check_float as check_float
from quorumd.node.registry.wire import check_int as check_int
from quorumd.node.registry.wire import check_list as check_list
from quorumd.node.registry.wire import check_opt_bytes as check_opt_bytes
from quorumd.node.registry.wire import check_opt_float as check_opt_float
from quorumd.node.registry.wire import check_opt_int as check_opt_int
from quorumd.node.registry.wire import check_required_protocol
from quorumd.node.registry.wire import check_str as check_str
from quorumd.node.registry.wire import drain_from_code as drain_from_code
from quorumd.node.registry.wire import drain_to_code as drain_to_code
from quorumd.node.registry.wire import role_from_code as role_from_code
from quorumd.node.registry.wire import role_to_code as role_to_code
from quorumd.node.registry.wire import unpack as unpack
from quorumd.raft.codec import packb

logger = logging.getLogger(__name__)

COMMAND_VERSION = 1  # the v1 envelope (ops of protocol 1)
COMMAND_ENVELOPE_V2 = 2  # [2, required_protocol, op, ts, *fields]
MAX_COMMAND_BYTES = 1 << 20


class FeatureUnavailable(Exception):
    """``gate`` refused a command: the cluster has not reached the protocol version it needs."""

    def __init__(self, op: OpCode, needs: int, have: int) -> None:
        super().__init__(
            f"{op.name.lower()} needs cluster protocol version {needs}; the cluster is at protocol "
            f"version {have} (upgrade every member to a build that speaks protocol {needs})"
        )
        self.op = op
        self.needs = needs
        self.have = have


class OpCode(IntEnum):
    NOOP = 0
    SET_CLUSTER_SECRETS = 1
    REGISTER_NODE_INFO = 2
    SET_DRAIN = 3
    MARK_NODE_LEFT = 4
    CREATE_API_TOKEN = 5
    REVOKE_API_TOKEN = 6
    CREATE_POOL = 7
    DELETE_POOL = 8
    ALLOCATE_LEASE = 9
    RELEASE_LEASE = 10
    MINT_JOIN_TOKEN = 11
    SET_PROTOCOL_VERSION = 12
    # 13..19 are taken by other features; never reuse a number.
    SET_MEMBER_ADDRESS = 20
    AUDITED = 21  # 21..29: the audit trail's
    RECORD_AUDIT = 22
    PIN_CERTIFICATE = 30  # 30..39: certificate rotation's
    UNPIN_CERTIFICATE = 31


# The protocol version that introduced each op: the one table the envelope, the decoder's stop
# and the gate read (see the module docstring). Never change a row; add one per new op.
OP_PROTOCOL: dict[OpCode, int] = {
    OpCode.NOOP: 1,
    OpCode.SET_CLUSTER_SECRETS: 1,
    OpCode.REGISTER_NODE_INFO: 1,
    OpCode.SET_DRAIN: 1,
    OpCode.MARK_NODE_LEFT: 1,
    OpCode.CREATE_API_TOKEN: 1,
    OpCode.REVOKE_API_TOKEN: 1,
    OpCode.CREATE_POOL: 1,
    OpCode.DELETE_POOL: 1,
    OpCode.ALLOCATE_LEASE: 1,
    OpCode.RELEASE_LEASE: 1,
    OpCode.MINT_JOIN_TOKEN: 1,
    OpCode.SET_PROTOCOL_VERSION: 2,
    OpCode.SET_MEMBER_ADDRESS: 2,
    OpCode.AUDITED: 2,
    OpCode.RECORD_AUDIT: 2,
    OpCode.PIN_CERTIFICATE: 3,
    OpCode.UNPIN_CERTIFICATE: 3,
}


pack = packb  # the shared encoder (one reused Packer per thread)


# --- encoding -------------------------------------------------------------------------------


def _fields(cmd: Command) -> tuple[OpCode, list[Any]]:
    match cmd:
        case Noop():
            return OpCode.NOOP, []
        case SetClusterSecrets():
            return OpCode.SET_CLUSTER_SECRETS, [cmd.cluster_id, cmd.join_key]
        case RegisterNodeInfo():
            return OpCode.REGISTER_NODE_INFO, [cmd.node_id, cmd.api_address, cmd.binary_version]
        case SetDrain():
            deadline = None if cmd.deadline_ts is None else float(cmd.deadline_ts)
            return OpCode.SET_DRAIN, [cmd.node_id, drain_to_code(cmd.state), deadline]
        case MarkNodeLeft():
            return OpCode.MARK_NODE_LEFT, [cmd.node_id, cmd.left]
        case CreateApiToken():
            return OpCode.CREATE_API_TOKEN, [
                cmd.token_id,
                cmd.name,
                role_to_code(cmd.role),
                cmd.secret_hash,
                cmd.expires_at,
            ]
        case RevokeApiToken():
            return OpCode.REVOKE_API_TOKEN, [cmd.token_id]
        case CreatePool():
            return OpCode.CREATE_POOL, [cmd.name, cmd.cidr]
        case DeletePool():
            return OpCode.DELETE_POOL, [cmd.name]
        case AllocateLease():
            return OpCode.ALLOCATE_LEASE, [cmd.pool, cmd.holder, cmd.node_id]
        case ReleaseLease():
            return OpCode.RELEASE_LEASE, [cmd.lease_id]
        case MintJoinToken():
            return OpCode.MINT_JOIN_TOKEN, [cmd.token_id, cmd.node_id, cmd.expires_at]
        case SetProtocolVersion():
            return OpCode.SET_PROTOCOL_VERSION, [cmd.cluster_version, [list(m) for m in cmd.members]]
        case SetMemberAddress():
            return OpCode.SET_MEMBER_ADDRESS, [cmd.node_id, cmd.raft_address, cmd.api_address]
        case Audited():
            return OpCode.AUDITED, [cmd.note.wire(), _items(cmd.command)]
        case RecordAudit():
            return OpCode.RECORD_AUDIT, [cmd.note.wire()]
        case PinCertificate():
            return OpCode.PIN_CERTIFICATE, [cmd.node_id, cmd.cert_pem]
        case UnpinCertificate():
            return OpCode.UNPIN_CERTIFICATE, [cmd.node_id, cmd.fingerprint]
    raise CommandError(f"not a command: {type(cmd).__name__}")


_OP_OF_TYPE: dict[type, OpCode] = {
    Noop: OpCode.NOOP,
    SetClusterSecrets: OpCode.SET_CLUSTER_SECRETS,
    RegisterNodeInfo: OpCode.REGISTER_NODE_INFO,
    SetDrain: OpCode.SET_DRAIN,
    MarkNodeLeft: OpCode.MARK_NODE_LEFT,
    CreateApiToken: OpCode.CREATE_API_TOKEN,
    RevokeApiToken: OpCode.REVOKE_API_TOKEN,
    CreatePool: OpCode.CREATE_POOL,
    DeletePool: OpCode.DELETE_POOL,
    AllocateLease: OpCode.ALLOCATE_LEASE,
    ReleaseLease: OpCode.RELEASE_LEASE,
    MintJoinToken: OpCode.MINT_JOIN_TOKEN,
    SetProtocolVersion: OpCode.SET_PROTOCOL_VERSION,
    SetMemberAddress: OpCode.SET_MEMBER_ADDRESS,
    Audited: OpCode.AUDITED,
    RecordAudit: OpCode.RECORD_AUDIT,
    PinCertificate: OpCode.PIN_CERTIFICATE,
    UnpinCertificate: OpCode.UNPIN_CERTIFICATE,
}


def protocol_needed(cmd: Command) -> int:
    """The protocol version a member must speak to read ``cmd`` (from ``OP_PROTOCOL``)."""
    return OP_PROTOCOL[_OP_OF_TYPE[type(cmd)]]


def gate(cmd: Command, cluster_version: int) -> None:
    """Raise ``FeatureUnavailable`` unless every member can read ``cmd``.

    ``cluster_version`` is the protocol version recorded in the replicated state. The one
    exception is the ratchet itself: ``SetProtocolVersion`` may establish the version it needs
    (the leader proposes it only once every member reports that version, and the state machine
    checks the list it carries against the registry)."""
    if type(cmd) is Audited:  # readable only where the change it carries is
        gate(cmd.command, cluster_version)
    needs = OP_PROTOCOL[_OP_OF_TYPE[type(cmd)]]
    if needs <= cluster_version:
        return
    if type(cmd) is SetProtocolVersion and cmd.cluster_version >= needs:
        return
    raise FeatureUnavailable(_OP_OF_TYPE[type(cmd)], needs, cluster_version)


_AUDIT_WRAPPERS = (Audited, RecordAudit)  # a tuple: ``A | B`` would build a union per command


def _items(cmd: Command) -> list[Any]:
    """The list ``cmd`` is encoded as (its envelope included)."""
    if isinstance(cmd, _AUDIT_WRAPPERS):
        raise CommandError("an audited change cannot be audited again")
    op, fields = _fields(cmd)
    needs = OP_PROTOCOL[op]
    if needs == 1:
        return [COMMAND_VERSION, int(op), float(cmd.ts), *fields]
    return [COMMAND_ENVELOPE_V2, needs, int(op), float(cmd.ts), *fields]


def encode_command(cmd: Command) -> bytes:
    """Encode ``cmd``; the result round-trips through ``decode_command``.

    The encoding is validated by decoding it again, so a wrongly typed field (a str where an
    int belongs) fails here, on the proposer, instead of landing in the log.
    """
    return encode_and_decode(cmd)[0]


def encode_and_decode(cmd: Command) -> tuple[bytes, Command]:
    """``encode_command`` plus the validating decode's result: exactly what every replica's
    ``decode_command`` will produce from the bytes (the decoder is a pure function of them)."""
    if type(cmd) is AllocateLease:  # the write path: the same list _fields builds, directly
        data = pack([COMMAND_VERSION, _ALLOCATE, float(cmd.ts), cmd.pool, cmd.holder, cmd.node_id])
    elif isinstance(cmd, Audited):
        data = pack(
            [
                COMMAND_ENVELOPE_V2,
                OP_PROTOCOL[OpCode.AUDITED],
                int(OpCode.AUDITED),
                float(cmd.ts),
                cmd.note.wire(),
                _items(cmd.command),
            ]
        )
    else:
        op, fields = _fields(cmd)
        needs = OP_PROTOCOL[op]
        if needs == 1:
            data = pack([COMMAND_VERSION, int(op), float(cmd.ts), *fields])
        else:
            data = pack([COMMAND_ENVELOPE_V2, needs, int(op), float(cmd.ts), *fields])
    return data, decode_command(data)


def _decode_fields(op: OpCode, ts: float, f: list[Any]) -> Command:
    def arity(n: int) -> None:
        if len(f) != n:
            raise CommandError(f"{op.name}: expected {n} fields, got {len(f)}")

    match op:
        case OpCode.NOOP:
            arity(0)
            return Noop(ts)
        case OpCode.SET_CLUSTER_SECRETS:
            arity(2)
            return SetClusterSecrets(ts, check_str(f[0], "cluster_id"), check_bytes(f[1], "join_key"))
        case OpCode.REGISTER_NODE_INFO:
            arity(3)
            return RegisterNodeInfo(
                ts,
                check_int(f[0], "node_id"),
                check_str(f[1], "api_address"),
                check_str(f[2], "binary_version"),
            )
        case OpCode.SET_DRAIN:
            arity(3)
            return SetDrain(
                ts,
                check_int(f[0], "node_id"),
                drain_from_code(f[1]),
                check_opt_float(f[2], "deadline_ts"),
            )
        case OpCode.MARK_NODE_LEFT:
            arity(2)
            return MarkNodeLeft(ts, check_int(f[0], "node_id"), check_bool(f[1], "left"))
        case OpCode.CREATE_API_TOKEN:
            arity(5)
            return CreateApiToken(
                ts,
                check_str(f[0], "token_id"),
                check_str(f[1], "name"),
                role_from_code(f[2]),
                check_bytes(f[3], "secret_hash"),
                check_opt_int(f[4], "expires_at"),
            )
        case OpCode.REVOKE_API_TOKEN:
            arity(1)
            return RevokeApiToken(ts, check_str(f[0], "token_id"))
        case OpCode.CREATE_POOL:
            arity(2)
            return CreatePool(ts, check_str(f[0], "name"), check_str(f[1], "cidr"))
        case OpCode.DELETE_POOL:
            arity(1)
            return DeletePool(ts, check_str(f[0], "name"))
        case OpCode.ALLOCATE_LEASE:
            arity(3)
            return AllocateLease(
                ts, check_str(f[0], "pool"), check_str(f[1], "holder"), check_int(f[2], "node_id")
            )
        case OpCode.RELEASE_LEASE:
            arity(1)
            return ReleaseLease(ts, check_int(f[0], "lease_id"))
        case OpCode.MINT_JOIN_TOKEN:
            arity(3)
            return MintJoinToken(
                ts,
                check_bytes(f[0], "token_id"),
                check_int(f[1], "node_id"),
                check_int(f[2], "expires_at"),
            )
        case OpCode.SET_PROTOCOL_VERSION:
            arity(2)
            version = check_int(f[0], "cluster_version")
            pairs = []
            for item in check_list(f[1], "members"):
                nid, pv = check_list(item, "member version", 2)
                pairs.append((check_int(nid, "node_id"), check_int(pv, "protocol_version")))
            if version < 1 or any(pv < 1 for _, pv in pairs):
                raise CommandError("SET_PROTOCOL_VERSION: protocol versions start at 1")
            if any(a[0] >= b[0] for a, b in pairwise(pairs)):
                raise CommandError("SET_PROTOCOL_VERSION: members not ascending by id")
            return SetProtocolVersion(ts, version, tuple(pairs))
        case OpCode.SET_MEMBER_ADDRESS:
            arity(3)
            return SetMemberAddress(
                ts,
                check_int(f[0], "node_id"),
                check_str(f[1], "raft_address"),
                check_str(f[2], "api_address"),
            )
        case OpCode.AUDITED:
            arity(2)
            note = decode_note(f[0])
            return Audited(ts, note, decode_items(f[1], audited=True))
        case OpCode.RECORD_AUDIT:
            arity(1)
            return RecordAudit(ts, decode_note(f[0]))
        case OpCode.PIN_CERTIFICATE:
            arity(2)
            return PinCertificate(ts, check_int(f[0], "node_id"), check_str(f[1], "cert_pem"))
        case OpCode.UNPIN_CERTIFICATE:
            arity(2)
            return UnpinCertificate(ts, check_int(f[0], "node_id"), check_str(f[1], "fingerprint"))
    raise CommandError(f"unhandled op {op!r}")  # pragma: no cover - every OpCode is matched


def decode_command(data: bytes) -> Command:
    """Decode a NORMAL entry's data; raises ``CommandError`` when malformed and
    ``EntryNeedsNewerProtocol`` when it is written for a newer build (nothing else)."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError("command too large")
    items = unpack(data, "command")
    # The write path's two commands, checked inline (the same checks as the general decoder,
    # which every other shape goes through; tests/test_state.py compares the two on fuzzed
    # input). ~4x cheaper: every write is decoded on every replica.
    if type(items) is list and type(items[0] if items else None) is int and items[0] == COMMAND_VERSION:
        n = len(items)
        op, ts = items[1] if n > 1 else None, items[2] if n > 2 else None
        if type(op) is int and type(ts) is float and math.isfinite(ts):
            if (
                op == _ALLOCATE
                and n == 6
                and type(items[3]) is str
                and type(items[4]) is str
                and type(items[5]) is int
            ):
                return AllocateLease(ts, items[3], items[4], items[5])
            if op == _RELEASE and n == 4 and type(items[3]) is int:
                return ReleaseLease(ts, items[3])
    return decode_items(items)


def decode_items(items: object, *, audited: bool = False) -> Command:
    """The general decoder of an unpacked command (see decode_command). ``audited``: ``items``
    is the change an ``Audited`` carries, refused when it is itself audited before its fields
    are decoded (a chain of them would otherwise recurse as deep as msgpack nests)."""
    items = check_list(items, "command")
    if len(items) < 3:
        raise CommandError("command: too short")
    version = check_int(items[0], "version")
    if version == COMMAND_VERSION:
        head = 1
    else:
        check_required_protocol(version, items, COMMAND_ENVELOPE_V2, "command")
        head = 2
    if len(items) < head + 2:
        raise CommandError("command: too short")
    code = check_int(items[head], "op")
    try:
        op = OpCode(code)
    except ValueError:
        raise CommandError(f"command: unknown op {code}") from None
    if head == 1 and OP_PROTOCOL[op] > 1:
        raise CommandError(f"command: {op.name} outside the envelope that names its protocol")
    if audited and (op == OpCode.AUDITED or op == OpCode.RECORD_AUDIT):
        raise CommandError("AUDITED: an audited change cannot be audited again")
    ts = check_float(items[head + 1], "ts")
    return _decode_fields(op, ts, items[head + 2 :])


_ALLOCATE = int(OpCode.ALLOCATE_LEASE)
_RELEASE = int(OpCode.RELEASE_LEASE)
