"""Versioned binary encoding of the engine's value types, for the wire and for the disk.

Every top-level encoding is one version byte (``VERSION``) followed by a msgpack body made of
flat lists (no maps: smaller and faster). Nested values carry no version byte of their own:

- Entry:        ``[term, index, type, data]``
- HardState:    ``[term, vote, commit]``
- ConfChange:   ``[type, node_id, context]``
- SnapshotMeta: ``[index, term, voters, nonvoters]`` (id lists strictly ascending, disjoint)
- Message:      ``[type, to, frm, term, log_term, index, entries, commit, reject, reject_hint,
  context, snapshot_meta | nil, snapshot_offset, snapshot_chunk, snapshot_done]``

Decoders take untrusted bytes (from peers or from disk). They validate everything (field counts,
exact types, enum values, non-negative integers) and raise only ``CodecError``; a successful
decode always yields a well-typed value. Encoders trust their (typed) input; a value msgpack
cannot represent (an integer beyond 64 bits) raises ``CodecError`` too. The module is pure: no I/O.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, TypeVar

import msgpack

from .core.types import (
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    SnapshotMeta,
)

VERSION = 1
_VERSION_PREFIX = bytes([VERSION])

Buffer = bytes | bytearray | memoryview
_E = TypeVar("_E")

_ENTRY_TYPES: dict[int, EntryType] = {t.value: t for t in EntryType}
_CONF_CHANGE_TYPES: dict[int, ConfChangeType] = {t.value: t for t in ConfChangeType}
_MESSAGE_TYPES: dict[int, MessageType] = {t.value: t for t in MessageType}
_MESSAGE_FIELDS = 15


class CodecError(Exception):
    """Bytes that are not a valid encoding (or a value that cannot be encoded)."""


# --- framing -----------------------------------------------------------------------------------
_packers = threading.local()


def packb(obj: object) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)`` with a reused Packer per thread: packb builds a
    Packer and its buffer on every call, which was ~3% of a leader's CPU per write at one
    client (a Packer resets itself when a pack fails, so reuse after an error is safe)."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    data: bytes = packer.pack(obj)
    return data


def _pack(obj: object) -> bytes:
    try:
        return _VERSION_PREFIX + packb(obj)
    except (OverflowError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode: {exc}") from None


def _unpack(b: Buffer, what: str) -> Any:
    if not isinstance(b, bytes | bytearray | memoryview):
        raise CodecError(f"{what}: expected bytes, got {type(b).__name__}")
    if len(b) < 2:
        raise CodecError(f"{what}: truncated ({len(b)} bytes)")
    if b[0] != VERSION:
        raise CodecError(f"{what}: unsupported version {b[0]} (expected {VERSION})")
    try:
        return msgpack.unpackb(memoryview(b)[1:], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # any malformed msgpack (ExtraData, FormatError, StackError, ...)
        raise CodecError(f"{what}: malformed body: {type(exc).__name__}") from None


def _enum(table: dict[int, _E], value: object, what: str) -> _E:
    if type(value) is int:
        member = table.get(value)
        if member is not None:
            return member
    raise CodecError(f"{what}: unknown value {value!r}")


def _fields(obj: object, count: int, what: str) -> list[Any]:
    if type(obj) is not list or len(obj) != count:
        raise CodecError(f"{what}: expected a list of {count} fields")
    return obj


def _check_uints(what: str, *values: object) -> None:
    for v in values:
        if type(v) is not int or v < 0:
            raise CodecError(f"{what}: expected a non-negative integer, got {v!r}")


def _check_bytes(what: str, *values: object) -> None:
    for v in values:
        if type(v) is not bytes:
            raise CodecError(f"{what}: expected bytes, got {type(v).__name__}")


# --- entries -----------------------------------------------------------------------------------
def _entry_body(e: Entry) -> list[object]:
    return [e.term, e.index, int(e.type), e.data]


def _entry_from(obj: object) -> Entry:
    if type(obj) is not list or len(obj) != 4:
        raise CodecError("entry: expected a list of 4 fields")
    term, index, typ, data = obj
    if type(term) is not int or type(index) is not int or term < 0 or index < 0:
        _check_uints("entry", term, index)
    if type(data) is not bytes:
        raise CodecError("entry: data must be bytes")
    etype = _ENTRY_TYPES.get(typ) if type(typ) is int else None
    if etype is None:
        raise CodecError(f"entry: unknown type {typ!r}")
    return Entry(term, index, etype, data)


def encode_entry(e: Entry) -> bytes:
    return _pack(_entry_body(e))


def decode_entry(b: Buffer) -> Entry:
    return _entry_from(_unpack(b, "entry"))


def decode_entries(encodings: Sequence[Buffer]) -> list[Entry]:
    """Decode many ``encode_entry`` outputs with one msgpack call (the WAL recovery hot path).

    Each encoding starts with the version byte, which msgpack reads as the integer ``VERSION``,
    so the concatenation prefixed with an array header is the list ``[VERSION, entry, ...]``.
    The result is always valid entries or a ``CodecError``; inputs that are not each a single
    valid encoding are rejected unless they happen to form a valid whole.
    """
    n = len(encodings)
    if n == 0:
        return []
    try:
        joined = b"".join([_VERSION_PREFIX, b"\xdd", struct.pack(">I", 2 * n), *encodings])
    except (TypeError, struct.error):
        raise CodecError("entries: expected a sequence of byte strings") from None
    obj = _unpack(joined, "entries")
    if type(obj) is not list or len(obj) != 2 * n:
        raise CodecError("entries: wrong number of values")
    versions, rows = obj[0::2], obj[1::2]
    # Validate column-wise with C-level passes (this runs for a million entries at startup).
    if set(map(type, versions)) != {int} or set(versions) != {VERSION}:
        raise CodecError("entries: unsupported version in batch")
    if set(map(type, rows)) == {list} and set(map(len, rows)) == {4}:
        terms, indexes, types, datas = zip(*rows, strict=True)
        if (
            set(map(type, terms)) == {int}
            and set(map(type, indexes)) == {int}
            and min(terms) >= 0
            and min(indexes) >= 0
            and set(map(type, types)) == {int}
            and set(types) <= _ENTRY_TYPES.keys()
            and set(map(type, datas)) == {bytes}
        ):
            return list(map(Entry, terms, indexes, map(_ENTRY_TYPES.__getitem__, types), datas))
    for row in rows:
        _entry_from(row)  # raises the precise error
    raise CodecError("entries: invalid batch")  # not reached


# --- hard state --------------------------------------------------------------------------------
def encode_hard_state(hs: HardState) -> bytes:
    return _pack([hs.term, hs.vote, hs.commit])


def decode_hard_state(b: Buffer) -> HardState:
    term, vote, commit = _fields(_unpack(b, "hard state"), 3, "hard state")
    _check_uints("hard state", term, vote, commit)
    return HardState(term, vote, commit)


# --- conf change -------------------------------------------------------------------------------
def encode_conf_change(cc: ConfChange) -> bytes:
    return _pack([int(cc.type), cc.node_id, cc.context])


def decode_conf_change(b: Buffer) -> ConfChange:
    typ, node_id, context = _fields(_unpack(b, "conf change"), 3, "conf change")
    cctype = _enum(_CONF_CHANGE_TYPES, typ, "conf change type")
    _check_uints("conf change", node_id)
    _check_bytes("conf change", context)
    return ConfChange(cctype, node_id, context)


# --- snapshot meta -----------------------------------------------------------------------------
def _meta_body(m: SnapshotMeta) -> list[object]:
    return [m.index, m.term, sorted(m.config.voters), sorted(m.config.nonvoters)]


def _id_set(obj: object, what: str) -> frozenset[int]:
    if type(obj) is not list:
        raise CodecError(f"{what}: expected a list of node ids")
    _check_uints(what, *obj)
    for a, b in pairwise(obj):
        if a >= b:
            raise CodecError(f"{what}: node ids must be strictly ascending")
    return frozenset(obj)


def _meta_from(obj: object) -> SnapshotMeta:
    index, term, voters, nonvoters = _fields(obj, 4, "snapshot meta")
    _check_uints("snapshot meta", index, term)
    v = _id_set(voters, "snapshot meta voters")
    nv = _id_set(nonvoters, "snapshot meta nonvoters")
    if v & nv:
        raise CodecError("snapshot meta: a node is both voter and nonvoter")
    return SnapshotMeta(index, term, Configuration(v, nv))


def encode_snapshot_meta(m: SnapshotMeta) -> bytes:
    return _pack(_meta_body(m))


def decode_snapshot_meta(b: Buffer) -> SnapshotMeta:
    return _meta_from(_unpack(b, "snapshot meta"))


# --- messages ----------------------------------------------------------------------------------
def encode_message(m: Message) -> bytes:
    meta = m.snapshot_meta
    return _pack(
        [
            int(m.type),
            m.to,
            m.frm,
            m.term,
            m.log_term,
            m.index,
            [[e.term, e.index, int(e.type), e.data] for e in m.entries],
            m.commit,
            m.reject,
            m.reject_hint,
            m.context,
            None if meta is None else _meta_body(meta),
            m.snapshot_offset,
            m.snapshot_chunk,
            m.snapshot_done,
        ]
    )


def decode_message(b: Buffer) -> Message:
    obj = _unpack(b, "message")
    if type(obj) is not list or len(obj) != _MESSAGE_FIELDS:
        raise CodecError(f"message: expected a list of {_MESSAGE_FIELDS} fields")
    (t, to, frm, term, log_term, index, ents, commit, reject, hint, ctx, meta, off, chunk, done) = obj
    mtype = _enum(_MESSAGE_TYPES, t, "message type")
    _check_uints("message", to, frm, term, log_term, index, commit, hint, off)
    _check_bytes("message", ctx, chunk)
    if type(reject) is not bool or type(done) is not bool:
        raise CodecError("message: reject and snapshot_done must be booleans")
    if type(ents) is not list:
        raise CodecError("message: entries must be a list")
    return Message(
        mtype,
        to,
        frm,
        term,
        log_term,
        index,
        tuple([_entry_from(e) for e in ents]),
        commit,
        reject,
        hint,
        ctx,
        None if meta is None else _meta_from(meta),
        off,
        chunk,
        done,
    )


__all__ = [
    "VERSION",
    "CodecError",
    "decode_conf_change",
    "decode_entries",
    "decode_entry",
    "decode_hard_state",
    "decode_message",
    "decode_snapshot_meta",
    "encode_conf_change",
    "encode_entry",
    "encode_hard_state",
    "encode_message",
    "encode_snapshot_meta",
]
