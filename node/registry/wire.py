"""Wire codes and strict field checks shared by the replicated commands and the snapshot decoder.

Codes (``DrainCode``, ``RoleCode``) are part of the log and snapshot formats: never renumber,
only add. The checks raise ``CommandError`` for anything that is not exactly the expected type
(``bool`` is never an ``int``, floats must be finite); ``unpack`` turns every msgpack failure
into ``CommandError``.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any

import msgpack

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.registry.protocol import PROTOCOL_VERSION


class CommandError(ValueError):
    """A command or member context could not be encoded or decoded."""


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


class EntryNeedsNewerProtocol(Exception):
    """An entry's envelope says reading it needs a newer protocol than this build speaks.

    Not a ``CommandError``: a malformed entry is a rejected command, but this one is valid for
    a newer build, and skipping it would leave this replica different from theirs. The node
    stops instead (``index`` is filled in by the state machine)."""

    def __init__(self, needs: int, index: int = 0) -> None:
        super().__init__(f"entry needs protocol {needs}, this build speaks {PROTOCOL_VERSION}")
        self.needs = needs
        self.have = PROTOCOL_VERSION
        self.index = index


def check_required_protocol(version: int, items: list[Any], known: int, what: str) -> None:
    """Envelopes after v1 name the protocol needed to read them at position 1: a newer one than
    this build speaks stops the node (``EntryNeedsNewerProtocol``), anything else that this
    build does not know is malformed."""
    if version < known:
        raise CommandError(f"{what}: unsupported version {version}")
    needs = items[1] if len(items) > 1 else None
    if type(needs) is int and needs > PROTOCOL_VERSION:
        raise EntryNeedsNewerProtocol(needs)
    if version != known:
        raise CommandError(f"{what}: unsupported version {version}")
    if type(needs) is not int or needs < 1:
        raise CommandError(f"{what}: bad required protocol version")
