"""Replicated commands: what the node writes into Raft log entries, and how it is encoded.

Owns the payload of ``EntryType.NORMAL`` entries (one frozen dataclass per operation) and the
registry payload carried in ``ConfChange.context`` (``MemberContext``). Both are msgpack lists
that start with a format version, so a later release can add fields or operations without
breaking the replay of an old log:

    command:  [COMMAND_VERSION, OpCode, ts, *fields]
    context:  [CONTEXT_VERSION, raft_address, api_address, binary_version, cert_fingerprint,
               cert_pem, join_token_id | nil, ts]

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
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from quorumd.api.ports import DrainState, TokenRole
from quorumd.raft.codec import packb
from quorumd.raft.core.types import immutable

logger = logging.getLogger(__name__)

COMMAND_VERSION = 1
CONTEXT_VERSION = 1
MAX_COMMAND_BYTES = 1 << 20


class CommandError(ValueError):
    """A command or member context could not be encoded or decoded."""


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


class DrainCode(IntEnum):
    """Wire code of ``DrainState``."""

    ACTIVE = 0
    DRAINING = 1
    DRAINED = 2


class RoleCode(IntEnum):
    """Wire code of ``TokenRole``."""

    ADMIN = 0
    READONLY = 1


_DRAIN_TO_CODE = {
    DrainState.ACTIVE: DrainCode.ACTIVE,
    DrainState.DRAINING: DrainCode.DRAINING,
    DrainState.DRAINED: DrainCode.DRAINED,
}
_CODE_TO_DRAIN = {code: state for state, code in _DRAIN_TO_CODE.items()}
_ROLE_TO_CODE = {TokenRole.ADMIN: RoleCode.ADMIN, TokenRole.READONLY: RoleCode.READONLY}
_CODE_TO_ROLE = {code: role for role, code in _ROLE_TO_CODE.items()}


def drain_to_code(state: DrainState) -> int:
    return int(_DRAIN_TO_CODE[state])


def drain_from_code(code: object) -> DrainState:
    if type(code) is not int or code not in _CODE_TO_DRAIN:
        raise CommandError("bad drain state code")
    return _CODE_TO_DRAIN[DrainCode(code)]


def role_to_code(role: TokenRole) -> int:
    return int(_ROLE_TO_CODE[role])


def role_from_code(code: object) -> TokenRole:
    if type(code) is not int or code not in _CODE_TO_ROLE:
        raise CommandError("bad role code")
    return _CODE_TO_ROLE[RoleCode(code)]


# --- commands ------------------------------------------------------------------------------


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
)


@dataclass(frozen=True, slots=True)
class MemberContext:
    """The registry payload of an ADD_NONVOTER (or bootstrap PROMOTE) ConfChange."""

    raft_address: str
    api_address: str
    binary_version: str
    cert_fingerprint: str
    cert_pem: str
    join_token_id: bytes | None
    ts: float


# --- field checks (shared with the state machine's snapshot decoder) -----------------------


def check_int(value: object, what: str) -> int:
    if type(value) is not int:
        raise CommandError(f"{what}: expected int")
    return value


def check_float(value: object, what: str) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value):
        raise CommandError(f"{what}: expected finite float")
    return value


def check_opt_float(value: object, what: str) -> float | None:
    return None if value is None else check_float(value, what)


def check_opt_int(value: object, what: str) -> int | None:
    return None if value is None else check_int(value, what)


def check_str(value: object, what: str) -> str:
    if type(value) is not str:
        raise CommandError(f"{what}: expected str")
    return value


def check_bytes(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise CommandError(f"{what}: expected bytes")
    return value


def check_opt_bytes(value: object, what: str) -> bytes | None:
    return None if value is None else check_bytes(value, what)


def check_bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise CommandError(f"{what}: expected bool")
    return value


def check_list(value: object, what: str, length: int | None = None) -> list[Any]:
    if type(value) is not list:
        raise CommandError(f"{what}: expected list")
    if length is not None and len(value) != length:
        raise CommandError(f"{what}: expected {length} items, got {len(value)}")
    return value


def unpack(data: bytes, what: str) -> object:
    """msgpack-decode untrusted bytes; every failure becomes ``CommandError``."""
    if type(data) is not bytes:
        raise CommandError(f"{what}: expected bytes")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises a handful of unrelated types on garbage
        raise CommandError(f"{what}: undecodable ({type(exc).__name__})") from None


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
    raise CommandError(f"not a command: {type(cmd).__name__}")


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
    else:
        op, fields = _fields(cmd)
        data = pack([COMMAND_VERSION, int(op), float(cmd.ts), *fields])
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
    raise CommandError(f"unhandled op {op!r}")  # pragma: no cover - every OpCode is matched


def decode_command(data: bytes) -> Command:
    """Decode a NORMAL entry's data; raises ``CommandError`` (only) when malformed."""
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


def decode_items(items: object) -> Command:
    """The general decoder of an unpacked command (see decode_command)."""
    items = check_list(items, "command")
    if len(items) < 3:
        raise CommandError("command: too short")
    version = check_int(items[0], "version")
    if version != COMMAND_VERSION:
        raise CommandError(f"command: unsupported version {version}")
    code = check_int(items[1], "op")
    try:
        op = OpCode(code)
    except ValueError:
        raise CommandError(f"command: unknown op {code}") from None
    ts = check_float(items[2], "ts")
    return _decode_fields(op, ts, items[3:])


_ALLOCATE = int(OpCode.ALLOCATE_LEASE)
_RELEASE = int(OpCode.RELEASE_LEASE)


def encode_member_context(ctx: MemberContext) -> bytes:
    data = pack(
        [
            CONTEXT_VERSION,
            ctx.raft_address,
            ctx.api_address,
            ctx.binary_version,
            ctx.cert_fingerprint,
            ctx.cert_pem,
            ctx.join_token_id,
            float(ctx.ts),
        ]
    )
    decode_member_context(data)
    return data


def decode_member_context(data: bytes) -> MemberContext:
    """Decode a ConfChange context; raises ``CommandError`` (only) when malformed."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError("member context too large")
    items = check_list(unpack(data, "member context"), "member context", 8)
    version = check_int(items[0], "version")
    if version != CONTEXT_VERSION:
        raise CommandError(f"member context: unsupported version {version}")
    return MemberContext(
        raft_address=check_str(items[1], "raft_address"),
        api_address=check_str(items[2], "api_address"),
        binary_version=check_str(items[3], "binary_version"),
        cert_fingerprint=check_str(items[4], "cert_fingerprint"),
        cert_pem=check_str(items[5], "cert_pem"),
        join_token_id=check_opt_bytes(items[6], "join_token_id"),
        ts=check_float(items[7], "ts"),
    )
