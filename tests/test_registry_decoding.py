"""Decoding the replicated state's bytes from hostile input: replicated commands, state snapshots
and backup archives. Malformed bytes give the decoder's own error type (``CommandError``,
``SnapshotError``, ``ArchiveError``) and change nothing; whatever is accepted is usable."""

from __future__ import annotations

import copy
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorumd.api.ports import TokenRole
from quorumd.node.registry.archive import (
    ARCHIVE_MAGIC,
    ArchiveError,
    ArchiveHeader,
    decode_archive,
    encode_archive,
)
from quorumd.node.registry.audit import Actor, AuditAction, SystemComponent, note_of
from quorumd.node.registry.commands import (
    AllocateLease,
    Audited,
    Command,
    CommandError,
    CreateApiToken,
    CreatePool,
    EntryNeedsNewerProtocol,
    MintJoinToken,
    Noop,
    OpCode,
    PinCertificate,
    RecordAudit,
    SetClusterSecrets,
    SetMemberAddress,
    SetProtocolVersion,
    UnpinCertificate,
    decode_command,
    encode_command,
)
from quorumd.node.registry.leases import SnapshotError
from quorumd.node.registry.records import ApplyCode
from quorumd.node.registry.state import StateMachine
from quorumd.node.tools.backup import load_archive_bytes, summary
from tests.test_backup import CLUSTER, sample_state
from tests.test_state import ALL_COMMANDS, cluster, ok

NOTE = note_of(AuditAction.BACKUP_EXPORT, "cluster", Actor.system(SystemComponent.JOIN))


def _state() -> StateMachine:
    h = cluster(1, 2)
    ok(h.run(SetClusterSecrets(1.0, "cid", b"k" * 32)))
    ok(h.run(CreatePool(1.0, "p", "10.7.0.0/28")))
    ok(h.run(AllocateLease(2.0, "p", "a", 2)))
    ok(h.run(MintJoinToken(2.0, b"j" * 16, 3, 100)))
    ok(h.run(CreateApiToken(5.0, "0123456789ab", "ci", TokenRole.READONLY, b"h" * 32, None)))
    ok(h.run(SetProtocolVersion(3.0, 3, ((1, 3), (2, 3)))))
    ok(h.run(RecordAudit(4.0, NOTE)))
    return h.sm


_SNAPSHOT = _state().snapshot()


# --- commands ------------------------------------------------------------------------------------


def _nested_audited(depth: int) -> bytes:
    items: list[Any] = [1, int(OpCode.NOOP), 1.0]
    for _ in range(depth):
        items = [2, 2, int(OpCode.AUDITED), 1.0, NOTE.wire(), items]
    return msgpack.packb(items, use_bin_type=True)


@pytest.mark.parametrize("depth", [2, 3, 900])
def test_nested_audited_commands_are_bad_commands(depth: int) -> None:
    """An audited change that wraps another audited change, however deep (msgpack itself reads
    up to 1024 levels), is refused with ``CommandError``, never a RecursionError."""
    data = _nested_audited(depth)
    with pytest.raises(CommandError, match="cannot be audited again"):
        decode_command(data)
    sm = StateMachine()
    sm.restore(_SNAPSHOT)
    result = sm.apply(sm.applied_index + 1, data)
    assert result.error == ApplyCode.BAD_COMMAND
    assert msgpack.unpackb(sm.snapshot())[2:] == msgpack.unpackb(_SNAPSHOT)[2:]


def test_audited_change_still_decodes() -> None:
    cmd = Audited(4.0, NOTE, CreatePool(1.0, "q", "10.9.0.0/24"))
    assert decode_command(encode_command(cmd)) == cmd
    assert decode_command(_nested_audited(1)) == Audited(1.0, NOTE, Noop(1.0))


_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=6),
)
_ANY = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


def _paths(obj: object, path: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    yield path
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _paths(item, (*path, i))


def _mutated(data: st.DataObject, obj: object) -> object:
    """``obj`` with one item anywhere in it replaced, removed, or another inserted before it."""
    obj = copy.deepcopy(obj)
    path = data.draw(st.sampled_from(list(_paths(obj))))
    if not path:
        return data.draw(_ANY)
    parent: Any = obj
    for i in path[:-1]:
        parent = parent[i]
    kind = data.draw(st.sampled_from(["set", "del", "insert"]))
    if kind == "set":
        parent[path[-1]] = data.draw(_ANY)
    elif kind == "del":
        del parent[path[-1]]
    else:
        parent.insert(path[-1], data.draw(_ANY))
    return obj


_COMMANDS: list[Command] = [
    *ALL_COMMANDS,
    SetProtocolVersion(3.0, 3, ((1, 3), (2, 3))),
    RecordAudit(4.0, NOTE),
    Audited(4.0, NOTE, CreatePool(1.0, "q", "10.9.0.0/24")),
    PinCertificate(4.0, 1, "pem"),
    UnpinCertificate(4.0, 1, "sha256:00"),
    SetMemberAddress(1.0, 1, "10.0.0.1:7000", "https://10.0.0.1:5002"),
]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_commands(data: st.DataObject) -> None:
    """A valid command with up to three items changed: a result (bad_command changes nothing
    but the applied index) or a stop for a newer protocol that changes nothing at all."""
    obj: object = msgpack.unpackb(encode_command(data.draw(st.sampled_from(_COMMANDS))), raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        obj = _mutated(data, obj)
    raw = msgpack.packb(obj, use_bin_type=True)
    sm = StateMachine()
    sm.restore(_SNAPSHOT)
    try:
        result = sm.apply(sm.applied_index + 1, raw)
    except EntryNeedsNewerProtocol:
        assert sm.snapshot() == _SNAPSHOT
        return
    if result.error == ApplyCode.BAD_COMMAND:
        assert msgpack.unpackb(sm.snapshot())[2:] == msgpack.unpackb(_SNAPSHOT)[2:]
    StateMachine().restore(sm.snapshot())


# --- snapshots -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_mutated_snapshots(data: st.DataObject) -> None:
    """A valid snapshot with up to three items changed: ``SnapshotError`` with the state
    untouched, or a state that snapshots and restores again and renders."""
    obj: object = msgpack.unpackb(_SNAPSHOT, raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        obj = _mutated(data, obj)
    sm = _state()
    try:
        sm.restore(msgpack.packb(obj, use_bin_type=True))
    except SnapshotError:
        assert sm.snapshot() == _SNAPSHOT
        return
    StateMachine().restore(sm.snapshot())
    for m in sm.members():
        m.as_dict()
    for p in sm.pools():
        p.as_dict()
    for lease in sm.leases():
        lease.as_dict()


# --- backup archives -----------------------------------------------------------------------------


def _archive_with_header(fields: list[tuple[str, object]], state: bytes) -> bytes:
    head = bytes([0x80 | len(fields)]) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in fields
    )
    body = ARCHIVE_MAGIC + struct.pack(">HI", 1, len(head)) + head + struct.pack(">Q", len(state)) + state
    return body + hashlib.sha256(body).digest()


def test_archive_header_with_a_key_twice_is_refused() -> None:
    sm = sample_state(2)
    fields: list[tuple[str, object]] = [
        ("clusterId", CLUSTER),
        ("index", sm.applied_index),
        ("term", 3),
        ("createdAt", 1.0),
        ("nodeId", 1),
        ("version", "0.1.0"),
        ("stateFormat", 1),
    ]
    assert decode_archive(_archive_with_header(fields, sm.snapshot())).header.index == sm.applied_index
    with pytest.raises(ArchiveError, match="malformed header: index appears twice"):
        decode_archive(_archive_with_header([*fields, ("index", 999)], sm.snapshot()))


_SMALL_STATE = sample_state(2)


@settings(max_examples=200, deadline=None)
@given(
    created_at=st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, -1.0, 253402300799.0, 253402300800.0, 1e18, -1e18]),
    )
)
def test_archive_created_at_is_refused_or_shown(created_at: float) -> None:
    """``quorumd backup verify`` shows the creation time: a header time it cannot show is
    refused by the decoder (``ArchiveError``), never an OverflowError or OSError later."""
    sm = _SMALL_STATE
    header = ArchiveHeader(CLUSTER, sm.applied_index, 3, created_at, 1, "0.1.0", 1)
    data, _ = encode_archive(header, sm.snapshot())
    try:
        loaded = load_archive_bytes(data)
    except ArchiveError as exc:
        assert "createdAt" in str(exc)
        assert not 0 <= created_at <= 253402300799
        return
    assert "created:" in summary(loaded)
