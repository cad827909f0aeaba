"""Tests for quorumd.raft.codec: round trips, golden bytes, and fuzzing of every decoder.

Hypothesis drives the randomized tests; on failure it prints the falsifying example and the
``@reproduce_failure`` blob (rerun with ``--hypothesis-seed=N`` to pin the seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorumd.raft import codec
from quorumd.raft.codec import CodecError
from quorumd.raft.core.types import (
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

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=150, deadline=None)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
small = st.integers(min_value=0, max_value=1000)
ints = st.one_of(small, u64)
node_ids = st.integers(min_value=0, max_value=70)
blobs = st.binary(max_size=64)

entries = st.builds(Entry, ints, ints, st.sampled_from(EntryType), blobs)
hard_states = st.builds(HardState, ints, node_ids, ints)
conf_changes = st.builds(ConfChange, st.sampled_from(ConfChangeType), node_ids, blobs)


@st.composite
def configurations(draw: st.DrawFn) -> Configuration:
    members = draw(st.frozensets(node_ids, max_size=9))
    voters = draw(st.frozensets(st.sampled_from(sorted(members)), max_size=9)) if members else frozenset()
    return Configuration(voters, members - voters)


metas = st.builds(SnapshotMeta, ints, ints, configurations())
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=node_ids,
    frm=node_ids,
    term=ints,
    log_term=ints,
    index=ints,
    entries=st.lists(entries, max_size=5).map(tuple),
    commit=ints,
    reject=st.booleans(),
    reject_hint=ints,
    context=blobs,
    snapshot_meta=st.none() | metas,
    snapshot_offset=ints,
    snapshot_chunk=blobs,
    snapshot_done=st.booleans(),
)

Pair = tuple[Callable[[Any], bytes], Callable[[Any], Any], Any]
CODECS: dict[str, Pair] = {
    "entry": (codec.encode_entry, codec.decode_entry, entries),
    "hard_state": (codec.encode_hard_state, codec.decode_hard_state, hard_states),
    "conf_change": (codec.encode_conf_change, codec.decode_conf_change, conf_changes),
    "snapshot_meta": (codec.encode_snapshot_meta, codec.decode_snapshot_meta, metas),
    "message": (codec.encode_message, codec.decode_message, messages),
}
VALUE_TYPES = {
    "entry": Entry,
    "hard_state": HardState,
    "conf_change": ConfChange,
    "snapshot_meta": SnapshotMeta,
    "message": Message,
}


def assert_valid(name: str, value: object) -> None:
    """A decoded value is well typed: exact types everywhere, and it re-encodes to itself."""
    assert type(value) is VALUE_TYPES[name]
    enc, dec, _ = CODECS[name]
    assert dec(enc(value)) == value
    _check_fields(value)


def _check_fields(value: object) -> None:
    if isinstance(value, Entry):
        assert type(value.term) is int and type(value.index) is int
        assert type(value.type) is EntryType and type(value.data) is bytes
    elif isinstance(value, SnapshotMeta):
        assert not (value.config.voters & value.config.nonvoters)
        assert all(type(i) is int and i >= 0 for i in value.config.members())
    elif isinstance(value, Message):
        assert type(value.type) is MessageType
        assert type(value.reject) is bool and type(value.snapshot_done) is bool
        assert type(value.context) is bytes and type(value.snapshot_chunk) is bytes
        for e in value.entries:
            _check_fields(e)
        if value.snapshot_meta is not None:
            _check_fields(value.snapshot_meta)


def _decode_or_codec_error(name: str, data: bytes) -> None:
    _, dec, _ = CODECS[name]
    try:
        value = dec(data)
    except CodecError:
        return
    assert_valid(name, value)


# --- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CODECS))
@ROUND
@given(data=st.data())
def test_round_trip(name: str, data: st.DataObject) -> None:
    enc, dec, strategy = CODECS[name]
    value = data.draw(strategy)
    encoded = enc(value)
    assert encoded[0] == codec.VERSION
    assert dec(encoded) == value
    assert dec(bytearray(encoded)) == value
    assert dec(memoryview(encoded)) == value
    assert enc(dec(encoded)) == encoded  # canonical: one encoding per value


def test_golden_bytes() -> None:
    # The formats are on disk and on the wire: a change here is a format break (bump VERSION).
    assert codec.encode_hard_state(HardState(1, 2, 3)) == b"\x01\x93\x01\x02\x03"
    assert codec.encode_entry(Entry(2, 7, EntryType.CONF_CHANGE, b"ab")) == b"\x01\x94\x02\x07\x01\xc4\x02ab"
    assert codec.encode_conf_change(ConfChange(ConfChangeType.REMOVE, 5)) == b"\x01\x93\x03\x05\xc4\x00"
    meta = SnapshotMeta(9, 3, Configuration(frozenset({3, 1}), frozenset({2})))
    assert codec.encode_snapshot_meta(meta) == b"\x01\x94\x09\x03\x92\x01\x03\x91\x02"
    hb = codec.encode_message(Message(MessageType.HEARTBEAT, 2, 1, term=4, commit=6))
    assert hb == b"\x01\x9f\x08\x02\x01\x04\x00\x00\x90\x06\xc2\x00\xc4\x00\xc0\x00\xc4\x00\xc2"


# --- explicit bad inputs -----------------------------------------------------------------------
def _raw(obj: object, version: int = codec.VERSION) -> bytes:
    return bytes([version]) + msgpack.packb(obj, use_bin_type=True)


GOOD_MSG: list[Any] = [0, 1, 2, 3, 4, 5, [[1, 1, 0, b""]], 6, False, 0, b"", None, 0, b"", False]


def _msg_with(pos: int, value: object) -> bytes:
    fields = list(GOOD_MSG)
    fields[pos] = value
    return _raw(fields)


def test_good_message_fixture_decodes() -> None:
    m = codec.decode_message(_raw(GOOD_MSG))
    assert m.entries == (Entry(1, 1),) and m.commit == 6


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "truncated"),
        (b"\x01", "truncated"),
        (_raw(GOOD_MSG, version=2), "unsupported version 2"),
        (_raw(GOOD_MSG) + b"\x00", "malformed"),
        (_raw(GOOD_MSG)[:-1], "malformed"),
        (_raw(GOOD_MSG[:-1]), "15 fields"),
        (_raw({"type": 0}), "15 fields"),
        (_msg_with(0, 99), "unknown value 99"),  # unknown MessageType
        (_msg_with(0, -1), "unknown value -1"),
        (_msg_with(0, True), "unknown value True"),  # bool is not an int on the wire
        (_msg_with(0, 1.0), "unknown value 1.0"),
        (_msg_with(3, -5), "non-negative"),
        (_msg_with(3, "3"), "non-negative"),
        (_msg_with(1, None), "non-negative"),
        (_msg_with(8, 0), "booleans"),
        (_msg_with(10, "ctx"), "expected bytes"),
        (_msg_with(6, [[1, 1, 7, b""]]), "unknown type 7"),
        (_msg_with(6, [[1, 1, 0]]), "4 fields"),
        (_msg_with(6, [[-1, 1, 0, b""]]), "non-negative"),
        (_msg_with(6, [[1, 1, 0, "s"]]), "data must be bytes"),
        (_msg_with(6, {}), "entries must be a list"),
        (_msg_with(11, [1, 1, [2, 1], []]), "strictly ascending"),
        (_msg_with(11, [1, 1, [1, 1], []]), "strictly ascending"),
        (_msg_with(11, [1, 1, [1], [1]]), "both voter and nonvoter"),
        (_msg_with(11, [1, 1, [1]]), "4 fields"),
        (_raw([[[[[[[[]]]]]]]] * 3), "15 fields"),
        (b"\x01" + b"\x91" * 100_000, "malformed"),  # nesting bomb
        (b"\x01\xdd\xff\xff\xff\xff", "malformed"),  # array claiming 4G elements
        (b"\x01\xd9\x02\xff\xfe", "malformed"),  # invalid UTF-8 str
        (b"\x01\x81\x01\x02", "malformed"),  # int map key
    ],
)
def test_decode_message_rejects(data: bytes, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        codec.decode_message(data)


def test_non_bytes_input_is_codec_error() -> None:
    for name in CODECS:
        with pytest.raises(CodecError, match="expected bytes"):
            CODECS[name][1]("not bytes")


@pytest.mark.parametrize(
    ("name", "obj", "fragment"),
    [
        ("entry", [1, 2, 3, b""], "unknown type 3"),
        ("entry", [1, 2, 0, b"", 5], "4 fields"),
        ("hard_state", [1, 2], "3 fields"),
        ("hard_state", [1, -2, 3], "non-negative"),
        ("conf_change", [4, 1, b""], "unknown value 4"),
        ("conf_change", [0, 1, None], "expected bytes"),
        ("snapshot_meta", [1, 1, "ab", []], "list of node ids"),
        ("snapshot_meta", [1, 1, [1.5], []], "non-negative"),
    ],
)
def test_decode_value_rejects(name: str, obj: object, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        CODECS[name][1](_raw(obj))


def test_encode_out_of_range_is_codec_error() -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode_hard_state(HardState(term=2**64))


def test_negative_value_encodes_but_never_decodes() -> None:
    # Encoders trust typed input; the receiving decoder is what enforces the invariants.
    with pytest.raises(CodecError, match="non-negative"):
        codec.decode_entry(codec.encode_entry(Entry(-1, 1)))


# --- fuzzing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(name: str, data: bytes) -> None:
    _decode_or_codec_error(name, data)


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes_with_version(name: str, data: bytes) -> None:
    _decode_or_codec_error(name, bytes([codec.VERSION]) + data)


@st.composite
def mutations(draw: st.DrawFn, encoded: bytes) -> bytes:
    buf = bytearray(encoded)
    kind = draw(st.sampled_from(["flip", "truncate", "append", "byte", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "append":
        buf += draw(st.binary(min_size=1, max_size=16))
    elif kind == "byte":
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    else:
        pos = draw(st.integers(0, len(buf)))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.data())
def test_fuzz_mutated_encodings(name: str, data: st.DataObject) -> None:
    enc, _, strategy = CODECS[name]
    encoded = enc(data.draw(strategy))
    mutated = data.draw(mutations(encoded))
    _decode_or_codec_error(name, mutated)


def test_mutation_detection_is_not_vacuous() -> None:
    # The fuzz property accepts "decodes fine"; make sure typical corruptions are also caught.
    encoded = codec.encode_message(Message(MessageType.APPEND, 1, 2, entries=(Entry(1, 1),)))
    errors = 0
    for pos in range(len(encoded)):
        for bit in range(8):
            buf = bytearray(encoded)
            buf[pos] ^= 1 << bit
            try:
                codec.decode_message(bytes(buf))
            except CodecError:
                errors += 1
    assert errors > len(encoded) * 8 // 2


# --- batch entry decoding (WAL recovery path) --------------------------------------------------
@ROUND
@given(batch=st.lists(entries, max_size=20))
def test_decode_entries_round_trip(batch: list[Entry]) -> None:
    assert codec.decode_entries([codec.encode_entry(e) for e in batch]) == batch
    assert codec.decode_entries([memoryview(codec.encode_entry(e)) for e in batch]) == batch


@FUZZ
@given(data=st.data())
def test_fuzz_decode_entries(data: st.DataObject) -> None:
    batch = data.draw(st.lists(entries, min_size=1, max_size=6))
    encodings = [codec.encode_entry(e) for e in batch]
    k = data.draw(st.integers(0, len(encodings) - 1))
    encodings[k] = data.draw(mutations(encodings[k]))
    try:
        decoded = codec.decode_entries(encodings)
    except CodecError:
        return
    assert len(decoded) == len(batch)
    for e in decoded:
        assert_valid("entry", e)


@pytest.mark.parametrize(
    ("encodings", "fragment"),
    [
        ([b"\x01\x94\x01\x01\x00\xc4\x00", "text"], "sequence of byte strings"),
        ([b"\x02\x94\x01\x01\x00\xc4\x00"], "unsupported version"),
        ([b"\x01\x94\x01\x01\x05\xc4\x00"], "unknown type 5"),
        ([b"\x01\x94\x01\x01\x00\xc4\x00", b"\x01\x93\x01\x01\x00"], "4 fields"),
        ([b"\x01\x94\x01\x01\x00\xc4\x00\x00"], "wrong number of values|malformed"),
        ([b"\x01\x94\x01\x01\x00"], "malformed"),
    ],
)
def test_decode_entries_rejects(encodings: list[Any], fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        codec.decode_entries(encodings)


def test_decode_entries_empty() -> None:
    assert codec.decode_entries([]) == []
