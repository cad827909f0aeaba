"""Protocol versions: the op table and the gate, the envelopes that stop a node on an
entry written for a newer protocol, the ratchet in the state machine, v1/v2 state snapshots
(the v1 one read by the baseline build itself), the live map and what it shows, joins of old
builds (the daemons themselves: tests/integration/test_versions_live.py).
"""

from __future__ import annotations

import subprocess

import msgpack
import pytest

from quorumd.api.errors import ApiError
from quorumd.node.cluster.versions import ProtocolVersions
from quorumd.node.registry.commands import (
    COMMAND_ENVELOPE_V2,
    OP_PROTOCOL,
    CreatePool,
    EntryNeedsNewerProtocol,
    FeatureUnavailable,
    MarkNodeLeft,
    MemberContext,
    OpCode,
    SetProtocolVersion,
    decode_command,
    decode_member_context,
    encode_command,
    encode_member_context,
    gate,
    protocol_needed,
)
from quorumd.node.registry.protocol import PROTOCOL_VERSION
from quorumd.node.registry.records import ApplyCode, SnapshotFormatError
from quorumd.node.registry.snapshot_codec import check_snapshot_format
from quorumd.node.registry.state import StateMachine
from quorumd.raft.core.types import ConfChangeType
from tests.baseline_support import baseline_python
from tests.test_state import cluster, ctx, ok

# --- the table and the gate ------------------------------------------------------------------


def test_every_op_has_a_row_and_protocol_1_ops_keep_the_v1_envelope() -> None:
    assert set(OP_PROTOCOL) == set(OpCode)
    assert max(OP_PROTOCOL.values()) <= PROTOCOL_VERSION
    data = encode_command(CreatePool(1.5, "p", "10.0.0.0/24"))
    assert data == msgpack.packb([1, int(OpCode.CREATE_POOL), 1.5, "p", "10.0.0.0/24"])
    spv = encode_command(SetProtocolVersion(2.5, 2, ((1, 2), (3, 2))))
    assert msgpack.unpackb(spv) == [
        COMMAND_ENVELOPE_V2,
        2,
        int(OpCode.SET_PROTOCOL_VERSION),
        2.5,
        2,
        [[1, 2], [3, 2]],
    ]
    assert protocol_needed(SetProtocolVersion(2.5, 2, ())) == 2


def test_gate_refuses_below_and_accepts_at_and_after_the_ratchet() -> None:
    refresh = SetProtocolVersion(1.0, 1, ((1, 2),))  # records versions: needs the cluster at 2
    with pytest.raises(FeatureUnavailable) as err:
        gate(refresh, 1)
    assert "needs cluster protocol version 2" in str(err.value) and "at protocol version 1" in str(err.value)
    gate(refresh, 2)
    gate(refresh, 3)
    gate(SetProtocolVersion(1.0, 2, ((1, 2),)), 1)  # the ratchet itself establishes 2
    gate(CreatePool(1.0, "p", "10.0.0.0/24"), 1)  # protocol 1 ops always pass


def test_a_future_op_is_gated_then_written_in_an_envelope_that_stops_older_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a later feature does: a row saying the next protocol. Below it the gate refuses (the
    API's 409 feature_unavailable naming both versions); a node of this build reading it stops."""
    future = PROTOCOL_VERSION + 1
    monkeypatch.setitem(OP_PROTOCOL, OpCode.CREATE_POOL, future)
    cmd = CreatePool(1.0, "p", "10.0.0.0/24")
    sm = StateMachine()
    versions = ProtocolVersions(1, sm)
    with pytest.raises(ApiError) as err:
        versions.check(cmd)
    assert err.value.status == 409 and err.value.code == "feature_unavailable"
    assert f"protocol version {future}" in err.value.message and "protocol version 1" in err.value.message
    data = msgpack.packb([COMMAND_ENVELOPE_V2, future, int(OpCode.CREATE_POOL), 1.0, "p", "10.0.0.0/24"])
    with pytest.raises(EntryNeedsNewerProtocol) as stop:
        decode_command(data)
    assert (stop.value.needs, stop.value.have) == (future, PROTOCOL_VERSION)


@pytest.mark.parametrize(
    "items",
    [
        [2, 1, int(OpCode.SET_PROTOCOL_VERSION), 1.0, 2, []],  # v2 envelope, well formed (needs 1)
        [1, int(OpCode.SET_PROTOCOL_VERSION), 1.0, 2, []],  # a protocol-2 op in the v1 envelope
        [2, "x", int(OpCode.NOOP), 1.0],  # required protocol not an int
        [3, 2, int(OpCode.NOOP), 1.0],  # an unknown envelope that needs nothing newer
        [2, 2, 99, 1.0],  # an unknown op that claims this build can read it
    ],
)
def test_malformed_envelopes_are_bad_commands_not_stops(items: list[object]) -> None:
    data = msgpack.packb(items)
    if items[0] == 2 and items[1] == 1:
        decode_command(data)  # accepted: an envelope may ask for less than it could
        return
    h = cluster(1)
    result = h.raw(data)
    assert result.error == ApplyCode.BAD_COMMAND and h.sm.applied_index == h.index


@pytest.mark.parametrize("envelope", [2, 3, 7])
def test_an_entry_for_a_newer_protocol_changes_nothing(envelope: int) -> None:
    h = cluster(1, 2)
    before = h.sm.snapshot()
    data = msgpack.packb([envelope, PROTOCOL_VERSION + 1, 12345, 1.0, "anything"])
    with pytest.raises(EntryNeedsNewerProtocol) as stop:
        h.raw(data)
    assert (stop.value.index, stop.value.needs) == (h.index, PROTOCOL_VERSION + 1)
    assert h.sm.applied_index == h.index - 1 and h.sm.snapshot() == before
    h.index -= 1  # the same index again once upgraded: still nothing skipped
    ok(h.run(MarkNodeLeft(2.0, 2, True)))


def test_member_contexts_v1_v2_and_newer() -> None:
    base = decode_member_context(ctx(3))
    assert base.protocol_version is None and msgpack.unpackb(ctx(3))[0] == 1
    v2 = MemberContext(**{**{f: getattr(base, f) for f in base.__slots__}, "protocol_version": 2})
    data = encode_member_context(v2)
    assert msgpack.unpackb(data)[:2] == [2, 2] and decode_member_context(data) == v2
    newer = msgpack.packb([5, PROTOCOL_VERSION + 1, *msgpack.unpackb(data)[2:]])
    with pytest.raises(EntryNeedsNewerProtocol):
        decode_member_context(newer)
    h = cluster(1)
    before = h.sm.snapshot()
    with pytest.raises(EntryNeedsNewerProtocol) as stop:
        h.conf(ConfChangeType.ADD_NONVOTER, 3, newer)
    assert stop.value.index == h.index and h.sm.snapshot() == before and not h.sm.has_member(3)


# --- the ratchet in the state machine -----------------------------------------------------------


def test_ratchet_needs_every_member_listed_and_never_goes_down() -> None:
    h = cluster(1, 2)
    stale = h.run(SetProtocolVersion(1.0, 2, ((1, 2),)))  # node 2 joined after the leader looked
    assert stale.error == ApplyCode.STALE_PROTOCOL_VIEW and h.sm.cluster_protocol_version == 1
    assert h.sm.member(1).protocol_version is None  # type: ignore[union-attr]
    ok(h.run(SetProtocolVersion(2.0, 2, ((1, 2), (2, 3)))))
    assert h.sm.cluster_protocol_version == 2
    assert [m.protocol_version for m in h.sm.members()] == [2, 3]
    ok(h.run(SetProtocolVersion(3.0, 1, ((1, 2), (2, 2)))))  # a refresh cannot lower the ratchet
    assert h.sm.cluster_protocol_version == 2 and h.sm.member(2).protocol_version == 2  # type: ignore[union-attr]


def test_joiner_recorded_through_the_v2_context() -> None:
    h = cluster(1)
    ok(h.run(SetProtocolVersion(1.0, 2, ((1, 2),))))
    base = decode_member_context(ctx(4))
    versions = ProtocolVersions(1, h.sm)
    data = versions.joiner_context(base, ctx(4), 2)
    ok(h.conf(ConfChangeType.ADD_NONVOTER, 4, data))
    assert h.sm.member(4).protocol_version == 2  # type: ignore[union-attr]


# --- snapshots ------------------------------------------------------------------------------------


def test_snapshot_v1_while_at_protocol_1_and_v2_after() -> None:
    h = cluster(1, 2)
    v1 = h.sm.snapshot()
    items = msgpack.unpackb(v1)
    assert v1[:1] == b"\x98" and items[0] == 1 and all(len(m) == 10 for m in items[4])
    again = StateMachine()
    again.restore(v1)
    assert again.snapshot() == v1 and again.cluster_protocol_version == 1
    ok(h.run(SetProtocolVersion(1.0, 2, ((1, 2), (2, 2)))))
    v3 = h.sm.snapshot()  # from protocol 2 on: v3 (v2 plus the audit trail)
    items = msgpack.unpackb(v3)
    assert v3[:1] == b"\x9a" and items[0] == 3 and items[8] == 2 and [m[10] for m in items[4]] == [2, 2]
    assert items[9] == [1, []]
    again = StateMachine()
    again.restore(v3)
    assert again.snapshot() == v3 and again.cluster_protocol_version == 2
    assert [m.protocol_version for m in again.members()] == [2, 2]
    # a v2 snapshot (written by builds before the audit trail) restores with an empty trail
    v2 = msgpack.packb([2, *items[1:9]])
    again = StateMachine()
    again.restore(v2)
    assert again.snapshot() == v3 and again.audit_count() == 0


def test_newer_snapshot_format_is_named() -> None:
    data = msgpack.packb([5, 1, None, None, [], [], [], [], 3, [1, []], "more"])
    with pytest.raises(SnapshotFormatError) as err:
        check_snapshot_format(data)
    assert (err.value.found, err.value.known) == (5, 4)
    with pytest.raises(SnapshotFormatError):
        StateMachine().restore(data)
    check_snapshot_format(b"\x00garbage")  # not a format question: restore says what is wrong


_BASELINE_RESTORE = """
import sys
from quorumd.node.state import StateMachine  # the baseline's layout
data = sys.stdin.buffer.read()
sm = StateMachine()
sm.restore(data)
sys.stdout.buffer.write(sm.snapshot())
"""


def test_the_baseline_build_installs_a_v1_snapshot_of_this_build() -> None:
    """What a baseline follower does with a snapshot from an upgraded leader at protocol 1."""
    h = cluster(1, 2, 3)
    ok(h.run(CreatePool(1.0, "p", "10.0.0.0/24")))
    data = h.sm.snapshot()
    proc = subprocess.run(
        [str(baseline_python()), "-c", _BASELINE_RESTORE],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == data


# --- the live map and what the API shows ---------------------------------------------------------


def test_members_show_recorded_else_live_else_1_and_status_the_lowest() -> None:
    h = cluster(1, 2, 3)
    v = ProtocolVersions(1, h.sm)
    assert [v.member_version(i) for i in (1, 2, 3)] == [PROTOCOL_VERSION, 1, 1]
    assert v.cluster_version() == 1
    v.live[2] = (2, 0.0)
    v.live[3] = (1, 0.0)
    assert v.ratchet_command([1, 2, 3], 5.0) is None  # node 3 speaks 1: no ratchet
    assert v.join_refusal(1) is None  # an old joiner at recorded 1 is admitted...
    v.live[3] = (2, 0.0)
    cmd = v.ratchet_command([1, 2, 3, 4], 5.0)
    assert cmd is None  # ...and while it (node 4, not answered yet) is a member, no ratchet
    cmd = v.ratchet_command([1, 2, 3], 5.0)
    me = PROTOCOL_VERSION  # node 1 is this build
    assert cmd == SetProtocolVersion(5.0, 2, ((1, me), (2, 2), (3, 2)))
    ok(h.run(cmd))
    assert v.cluster_version() == 2 and v.ratchet_command([1, 2, 3], 6.0) is None
    v.live[3] = (3, 0.0)  # upgraded further: recorded again, the cluster stays at the lowest
    assert v.ratchet_command([1, 2, 3], 7.0) == SetProtocolVersion(7.0, 2, ((1, me), (2, 2), (3, 3)))
    assert "protocol 1" in (v.join_refusal(1) or "") and "uses protocol 2" in (v.join_refusal(1) or "")
    v.live[2] = (PROTOCOL_VERSION, 0.0)  # node 2 runs this build now
    # a restart announcement makes the node ask again
    v.after_apply([h.run(MarkNodeLeft(8.0, 3, True))])
    assert 3 not in v.live and v.needs_asking([1, 2, 3], recorded_too=True) == [3]
    v.live[2] = (1, 0.0)  # an old answer below this build's protocol is asked again once stale
    assert v.needs_asking([1, 2, 3], recorded_too=True) == [2, 3]
