"""The audit trail: what a record is, how it travels in the log, and the trail itself.

A record is written in the same replicated log entry as the change it records, so the trail
and the state can never disagree:

- a NORMAL entry's change is wrapped: ``Audited(ts, AuditNote, inner command)`` (op 21, see
  ``quorumd.node.registry.commands``); the state machine applies the inner command and appends
  the record only when the command succeeded (a rejected command changed nothing and leaves no
  record). Events that change no other state (a backup export, a leadership transfer, a minted
  join token at protocol 1 wrote nothing) are their own entry: ``RecordAudit`` (op 22).
- a membership change (``ConfChange``: remove, promote, join) carries the record in its
  context: the audited context ``[3, 2, inner_context (bytes, may be empty), note]``. The
  registry's own member context (join) is the inner one, unchanged.

Both need protocol 2 (``OP_PROTOCOL``): while a member of protocol 1 (the baseline build) is in
the cluster, nothing audited is written; the change itself still happens, unaudited.

``AuditNote`` is what the leader writes: actor, action, target, detail, receiving node, source
address, and the retention bound the leader is configured with (``audit.retention``). The
record's id and time are not in the log: the state machine numbers records (an increasing
counter kept in the snapshot, never reused after retention drops old records) and stamps them
with the entry's ``ts``. Retention is applied by the state machine with the bound carried in
each entry, so every replica keeps exactly the same records.

Note on the wire::

    [action: str, target: str, actor, detail: {str: scalar}, via_node_id | nil,
     source_address | nil, retention: int]
    actor: [0, token_id, name] (a token) | [1, component] (the system)

Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from quorumd.node.registry.wire import (
    CommandError,
    check_int,
    check_list,
    check_str,
)
from quorumd.raft.codec import packb

DEFAULT_RETENTION = 10_000
MAX_RETENTION = 10_000_000
MAX_DETAIL_KEYS = 32
MAX_TEXT_CHARS = 256
_TARGET_RE = re.compile(r"(node:[1-9][0-9]{0,2}|token:[0-9a-f]{12}|pool:[A-Za-z0-9._-]{1,64}|cluster)")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class AuditAction(StrEnum):
    MEMBER_REMOVE = "member_remove"
    MEMBER_PROMOTE = "member_promote"
    MEMBER_DRAIN = "member_drain"
    MEMBER_DRAINED = "member_drained"
    MEMBER_RESUME = "member_resume"
    MEMBER_JOIN = "member_join"
    MEMBER_ADDRESS_CHANGED = "member_address_changed"
    JOIN_TOKEN_MINT = "join_token_mint"
    TOKEN_CREATE = "token_create"
    TOKEN_REVOKE = "token_revoke"
    POOL_CREATE = "pool_create"
    POOL_DELETE = "pool_delete"
    LEADERSHIP_TRANSFER = "leadership_transfer"
    AUTOPILOT_PROMOTE = "autopilot_promote"
    AUTOPILOT_REMOVE = "autopilot_remove"
    CERTIFICATE_ROTATE = "certificate_rotate"
    BACKUP_EXPORT = "backup_export"


class SystemComponent(StrEnum):
    AUTOPILOT = "autopilot"
    DRAIN = "drain"
    JOIN = "join"
    SHUTDOWN = "shutdown"
    CERTIFICATES = "certificates"


class ActorCode(IntEnum):
    """Wire code of an actor's kind: never renumber."""

    TOKEN = 0
    SYSTEM = 1


@dataclass(frozen=True, slots=True)
class Actor:
    """A token (``token_id`` and its name when the change was proposed) or a system component."""

    token_id: str | None = None
    name: str | None = None
    component: SystemComponent | None = None

    @staticmethod
    def token(token_id: str, name: str) -> Actor:
        return Actor(token_id=token_id, name=name)

    @staticmethod
    def system(component: SystemComponent) -> Actor:
        return Actor(component=component)

    def as_dict(self) -> dict[str, Any]:
        if self.component is not None:
            return {"type": "system", "component": str(self.component)}
        return {"type": "token", "tokenId": self.token_id, "name": self.name}

    def wire(self) -> list[Any]:
        if self.component is not None:
            return [int(ActorCode.SYSTEM), str(self.component)]
        return [int(ActorCode.TOKEN), self.token_id, self.name]


Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class AuditNote:
    """What the leader writes into the log about one change (see the module docstring)."""

    action: AuditAction
    target: str
    actor: Actor
    detail: tuple[tuple[str, Scalar], ...] = ()
    via_node_id: int | None = None
    source_address: str | None = None
    retention: int = DEFAULT_RETENTION

    def wire(self) -> list[Any]:
        return [
            str(self.action),
            self.target,
            self.actor.wire(),
            dict(self.detail),
            self.via_node_id,
            self.source_address,
            self.retention,
        ]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the trail: the note, numbered and timed by the state machine."""

    record_id: int
    ts: float
    note: AuditNote

    def as_dict(self) -> dict[str, Any]:
        n = self.note
        return {
            "id": self.record_id,
            "time": datetime.fromtimestamp(int(self.ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "actor": n.actor.as_dict(),
            "action": str(n.action),
            "target": n.target,
            "detail": dict(n.detail),
            "viaNodeId": n.via_node_id,
            "sourceAddress": n.source_address,
        }

    def wire(self) -> list[Any]:
        return [self.record_id, self.ts, *self.note.wire()]


def note_of(
    action: AuditAction,
    target: str,
    actor: Actor,
    detail: Mapping[str, Scalar] | None = None,
    *,
    via_node_id: int | None = None,
    source_address: str | None = None,
    retention: int = DEFAULT_RETENTION,
) -> AuditNote:
    """An ``AuditNote``, validated like a decoded one (a bad field fails on the proposer)."""
    note = AuditNote(
        action, target, actor, tuple((detail or {}).items()), via_node_id, source_address, retention
    )
    return decode_note(note.wire())


def _check_text(value: object, what: str) -> str:
    text = check_str(value, what)
    if not text or len(text) > MAX_TEXT_CHARS:
        raise CommandError(f"{what}: 1..{MAX_TEXT_CHARS} characters")
    return text


def _check_scalar(value: object, what: str) -> Scalar:
    if value is None or type(value) in (bool, int, str):
        if type(value) is str and len(value) > MAX_TEXT_CHARS:
            raise CommandError(f"{what}: too long")
        return value  # type: ignore[return-value]
    if type(value) is float and math.isfinite(value):
        return value
    raise CommandError(f"{what}: expected a scalar")


def decode_actor(raw: object) -> Actor:
    items = check_list(raw, "audit actor")
    code = check_int(items[0], "actor kind") if items else -1
    if code == ActorCode.TOKEN:
        check_list(items, "audit actor", 3)
        return Actor.token(_check_text(items[1], "actor token id"), _check_text(items[2], "actor name"))
    if code == ActorCode.SYSTEM:
        check_list(items, "audit actor", 2)
        try:
            return Actor.system(SystemComponent(check_str(items[1], "actor component")))
        except ValueError:
            raise CommandError("audit actor: unknown component") from None
    raise CommandError("audit actor: unknown kind")


def decode_note(raw: object) -> AuditNote:
    """Decode (and validate) a note; raises ``CommandError`` and nothing else."""
    f = check_list(raw, "audit note", 7)
    try:
        action = AuditAction(check_str(f[0], "audit action"))
    except ValueError:
        raise CommandError("audit note: unknown action") from None
    target = check_str(f[1], "audit target")
    if not _TARGET_RE.fullmatch(target):
        raise CommandError("audit note: bad target")
    actor = decode_actor(f[2])
    if type(f[3]) is not dict or len(f[3]) > MAX_DETAIL_KEYS:
        raise CommandError("audit note: detail must be a map of at most 32 keys")
    detail = []
    for k, v in f[3].items():
        if type(k) is not str or not _KEY_RE.fullmatch(k):
            raise CommandError("audit note: bad detail key")
        detail.append((k, _check_scalar(v, "audit detail value")))
    via = None if f[4] is None else check_int(f[4], "via_node_id")
    source = None if f[5] is None else _check_text(f[5], "source_address")
    retention = check_int(f[6], "retention")
    if not 1 <= retention <= MAX_RETENTION:
        raise CommandError("audit note: retention out of range")
    return AuditNote(action, target, actor, tuple(detail), via, source, retention)


class AuditTrail:
    """The newest records, oldest first, and the next id (part of the replicated state)."""

    __slots__ = ("_ids", "_next_id", "_packed", "_records")

    def __init__(self) -> None:
        self._records: list[AuditRecord] = []
        self._ids: list[int] = []
        # Each record's encoding, made once when it is appended: a snapshot joins them instead of
        # encoding the whole trail on the event loop (10,000 records: ~40 ms to encode, ~1 ms to
        # join). Only the order of records matters, so the join is ``packb(dump())`` exactly.
        self._packed: list[bytes] = []
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._records)

    @property
    def next_id(self) -> int:
        return self._next_id

    def append(self, ts: float, note: AuditNote) -> AuditRecord:
        rec = AuditRecord(self._next_id, ts, note)
        self._next_id += 1
        self._records.append(rec)
        self._ids.append(rec.record_id)
        self._packed.append(packb(rec.wire()))
        excess = len(self._records) - note.retention
        if excess > 0:  # the bound is in the entry: every replica drops the same records
            del self._records[:excess]
            del self._ids[:excess]
            del self._packed[:excess]
        return rec

    def query(
        self, *, after: int | None, limit: int, action: str | None, actor: str | None
    ) -> list[AuditRecord]:
        """Records with id > ``after`` (all when None), oldest first, at most ``limit``,
        optionally only of one action and one actor token id."""
        start = 0 if after is None else bisect_right(self._ids, after)
        out: list[AuditRecord] = []
        for rec in self._records[start:] if (action or actor) else self._records[start : start + limit]:
            if action is not None and rec.note.action != action:
                continue
            if actor is not None and rec.note.actor.token_id != actor:
                continue
            out.append(rec)
            if len(out) >= limit:
                break
        return out

    def dump(self) -> list[Any]:
        return [self._next_id, [r.wire() for r in self._records]]

    def packed(self) -> bytes:
        """``packb(self.dump())``, from the records' encodings made when they were appended."""
        n = len(self._packed)
        if n < 16:
            head = bytes([0x90 | n])
        elif n < 1 << 16:
            head = b"\xdc" + n.to_bytes(2, "big")
        else:
            head = b"\xdd" + n.to_bytes(4, "big")
        return b"".join([b"\x92", packb(self._next_id), head, *self._packed])

    @staticmethod
    def load(raw: object) -> AuditTrail:
        f = check_list(raw, "audit trail", 2)
        trail = AuditTrail()
        trail._next_id = check_int(f[0], "audit next id")
        prev = 0
        for item in check_list(f[1], "audit records"):
            r = check_list(item, "audit record", 9)
            rid = check_int(r[0], "audit record id")
            ts = r[1]
            if type(ts) is not float or not math.isfinite(ts):
                raise CommandError("audit record: bad time")
            if rid <= prev:
                raise CommandError("audit records not ascending by id")
            prev = rid
            rec = AuditRecord(rid, ts, decode_note(r[2:]))
            trail._records.append(rec)
            trail._ids.append(rid)
            trail._packed.append(packb(rec.wire()))
        if trail._next_id <= prev or trail._next_id < 1:
            raise CommandError("audit next id not above the records' ids")
        return trail
