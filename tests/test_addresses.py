"""Address changes, the pure parts: the ``SetMemberAddress`` command and its gate, the state machine, the
validation of addresses like the config keys, and the allocation rule of pools (the IPv6
subnet-router anycast address), gated on the cluster's recorded protocol version and checked
against the baseline build (protocol 1) for a mixed cluster."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess

import msgpack
import pytest

from quorumd.api.errors import BadRequest
from quorumd.node.cluster.addresses import (
    AddressBook,
    parse_api_address,
    parse_raft_address,
    validate_addresses,
)
from quorumd.node.cluster.service import ClusterService, Identity
from quorumd.node.config.values import ValueProblem
from quorumd.node.registry.commands import (
    COMMAND_ENVELOPE_V2,
    OP_PROTOCOL,
    AllocateLease,
    CommandError,
    CreatePool,
    FeatureUnavailable,
    OpCode,
    ReleaseLease,
    SetMemberAddress,
    SetProtocolVersion,
    decode_command,
    encode_command,
    gate,
)
from quorumd.node.registry.leases import LeaseTable
from quorumd.node.registry.state import StateMachine
from quorumd.raft.codec import encode_conf_change
from quorumd.raft.core.types import ConfChange, ConfChangeType
from tests.baseline_support import BaselineUnavailable, baseline_python
from tests.test_state import cluster, ctx, ok

# --- the command ---------------------------------------------------------------------------------


def test_op_code_and_protocol() -> None:
    assert int(OpCode.SET_MEMBER_ADDRESS) == 20
    assert OP_PROTOCOL[OpCode.SET_MEMBER_ADDRESS] == 2


def test_command_round_trip_in_the_v2_envelope() -> None:
    cmd = SetMemberAddress(5.0, 2, "127.0.0.9:7100", "https://127.0.0.9:5102")
    data = encode_command(cmd)
    assert msgpack.unpackb(data) == [
        COMMAND_ENVELOPE_V2,
        2,
        20,
        5.0,
        2,
        "127.0.0.9:7100",
        "https://127.0.0.9:5102",
    ]
    assert decode_command(data) == cmd


@pytest.mark.parametrize(
    "items",
    [
        [2, 2, 20, 5.0, 2, "a:1"],  # a field missing
        [2, 2, 20, 5.0, 2, "a:1", "https://a:1", "x"],  # one too many
        [2, 2, 20, 5.0, "2", "a:1", "https://a:1"],  # node id not an int
        [2, 2, 20, 5.0, True, "a:1", "https://a:1"],  # a bool is not an int
        [2, 2, 20, 5.0, 2, b"a:1", "https://a:1"],  # bytes are not text
        [1, 20, 5.0, 2, "a:1", "https://a:1"],  # a protocol-2 op in the v1 envelope
    ],
)
def test_malformed_commands_are_refused(items: list[object]) -> None:
    with pytest.raises(CommandError):
        decode_command(msgpack.packb(items))


def test_the_gate_refuses_it_at_protocol_1() -> None:
    cmd = SetMemberAddress(5.0, 2, "h:1", "https://h:1")
    with pytest.raises(FeatureUnavailable) as exc:
        gate(cmd, 1)
    assert exc.value.needs == 2 and exc.value.have == 1
    gate(cmd, 2)  # and lets it through at 2


# --- the state machine ---------------------------------------------------------------------------


def test_addresses_change_and_survive_a_snapshot() -> None:
    h = cluster(1, 2, 3)
    before = h.sm.member(3)
    assert before is not None
    m = ok(h.run(SetMemberAddress(9.0, 2, "127.0.0.9:7100", "https://127.0.0.9:5102"))).value
    assert m is not None and m.raft_address == "127.0.0.9:7100"  # type: ignore[union-attr]
    got = h.sm.member(2)
    assert got is not None
    assert (got.raft_address, got.api_address) == ("127.0.0.9:7100", "https://127.0.0.9:5102")
    assert got.cert_fingerprint == ctx_fp(2) and got.drain_state == "active"  # nothing else moves
    assert h.sm.member(3) == before  # nor anyone else
    # the same addresses again: an accepted no-op
    ok(h.run(SetMemberAddress(10.0, 2, "127.0.0.9:7100", "https://127.0.0.9:5102")))
    restored = StateMachine()
    restored.restore(h.sm.snapshot())
    assert restored.member(2) == h.sm.member(2)
    assert restored.snapshot() == h.sm.snapshot()


def ctx_fp(node_id: int) -> str:
    return "sha256:" + f"{node_id:02x}" * 32


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (SetMemberAddress(9.0, 7, "h:1", "https://h:1"), "unknown_node"),
        (SetMemberAddress(9.0, 2, "", "https://h:1"), "invalid_argument"),
        (SetMemberAddress(9.0, 2, "h:1", ""), "invalid_argument"),
        (SetMemberAddress(9.0, 2, "h :1", "https://h:1"), "invalid_argument"),
        (SetMemberAddress(9.0, 2, "h:1\n", "https://h:1"), "invalid_argument"),
        (SetMemberAddress(9.0, 2, "h" * 600 + ":1", "https://h:1"), "invalid_argument"),
    ],
)
def test_refused_changes_change_nothing(cmd: SetMemberAddress, code: str) -> None:
    h = cluster(1, 2)
    snap = h.sm.snapshot()
    res = h.run(cmd)
    assert res.error == code
    after = StateMachine()
    after.restore(snap)
    assert [m for m in h.sm.members()] == after.members()


# --- validation like the config keys -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.5:7000", "127.0.0.5:7000"),
        (" node-2.example.internal:7000 ", "node-2.example.internal:7000"),
        ("[fd00::5]:7000", "[fd00::5]:7000"),
    ],
)
def test_raft_address_accepted(text: str, want: str) -> None:
    assert parse_raft_address(text) == want


@pytest.mark.parametrize(
    "text",
    ["0.0.0.0:7000", "[::]:7000", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "fd00::5:7000", "a b:1", ""],
)
def test_raft_address_refused(text: str) -> None:
    with pytest.raises(ValueProblem):
        parse_raft_address(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("https://127.0.0.5:5002", "https://127.0.0.5:5002"),
        ("https://127.0.0.5:5002/", "https://127.0.0.5:5002"),
        ("https://[fd00::5]:5002", "https://[fd00::5]:5002"),
        ("https://api.example.internal:443", "https://api.example.internal:443"),
    ],
)
def test_api_address_accepted(text: str, want: str) -> None:
    assert parse_api_address(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.5:5002",  # not https
        "https://127.0.0.5",  # no port
        "https://127.0.0.5:99999",
        "https://0.0.0.0:5002",
        "https://u:p@127.0.0.5:5002",
        "https://127.0.0.5:5002/api",
        "https://127.0.0.5:5002?x=1",
        "https://bad_host!:5002",
        "127.0.0.5:5002",
        "https://[fd00::5:5002",
    ],
)
def test_api_address_refused(text: str) -> None:
    with pytest.raises(ValueProblem):
        parse_api_address(text)


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(BadRequest) as exc:
        validate_addresses("0.0.0.0:7000", None)
    assert exc.value.code == "invalid_raft_address" and "'raftAddress'" in exc.value.message
    with pytest.raises(BadRequest) as exc:
        validate_addresses(None, "http://h:1")
    assert exc.value.code == "invalid_api_address" and "'apiAddress'" in exc.value.message
    assert validate_addresses(None, None) == (None, None)


# --- pools: the anycast address, gated on the cluster's protocol version -------------------------


def _allocate_all(table: LeaseTable, pool: str, n: int) -> list[str]:
    return [table.allocate(pool, f"h{i}", 1, 1.0).address for i in range(n)]


def test_protocol_1_rule_is_the_baseline_one() -> None:
    t = LeaseTable()
    t.create_pool("v6", "fd00:99::/126", 0.0)
    assert t.pool("v6").capacity == 4  # type: ignore[union-attr]
    assert _allocate_all(t, "v6", 4) == ["fd00:99::", "fd00:99::1", "fd00:99::2", "fd00:99::3"]


def test_protocol_2_never_hands_out_the_subnet_router_anycast_address() -> None:
    t = LeaseTable()
    t.set_protocol(2)
    t.create_pool("v6", "fd00:99::/126", 0.0)
    t.create_pool("v4", "10.9.0.0/30", 0.0)
    t.create_pool("p2p6", "fd00:98::/127", 0.0)
    t.create_pool("host6", "fd00:97::5/128", 0.0)
    t.create_pool("p2p4", "10.8.0.0/31", 0.0)
    sizes = {p.name: p.capacity for p in t.pools()}
    assert sizes == {"v6": 3, "v4": 2, "p2p6": 2, "host6": 1, "p2p4": 2}
    assert _allocate_all(t, "v6", 3) == ["fd00:99::1", "fd00:99::2", "fd00:99::3"]
    assert _allocate_all(t, "v4", 2) == ["10.9.0.1", "10.9.0.2"]  # no network, no broadcast
    for pool in ("v6", "v4"):
        with pytest.raises(Exception, match="no free address"):
            t.allocate(pool, "one-more", 1, 1.0)
    assert _allocate_all(t, "p2p6", 2) == ["fd00:98::", "fd00:98::1"]  # RFC 6164: /127 uses both
    assert _allocate_all(t, "host6", 1) == ["fd00:97::5"]
    assert _allocate_all(t, "p2p4", 2) == ["10.8.0.0", "10.8.0.1"]


def _sm_at(protocol: int) -> StateMachine:
    sm = StateMachine()
    sm.apply_conf_change(1, ConfChange(ConfChangeType.PROMOTE, 1, ctx(1)))
    if protocol >= 2:
        assert sm.apply(2, encode_command(SetProtocolVersion(1.0, protocol, ((1, protocol),)))).ok
    return sm


def test_the_rule_switches_where_the_log_raises_the_version() -> None:
    h = cluster(1)
    ok(h.run(CreatePool(1.0, "v6", "fd00:99::/126")))
    first = ok(h.run(AllocateLease(2.0, "v6", "a", 1))).value
    assert first.address == "fd00:99::"  # type: ignore[union-attr]  # protocol 1: the baseline rule
    assert h.sm.pool("v6").capacity == 4  # type: ignore[union-attr]
    ok(h.run(SetProtocolVersion(3.0, 2, ((1, 2),))))
    assert h.sm.pool("v6").capacity == 3  # type: ignore[union-attr]
    ok(h.run(ReleaseLease(4.0, first.lease_id)))  # type: ignore[union-attr]
    # A replica that restores a snapshot taken now must allocate exactly as this one does.
    twin = StateMachine()
    twin.restore(h.sm.snapshot())
    got = []
    for i in range(3):
        cmd = encode_command(AllocateLease(5.0 + i, "v6", f"b{i}", 1))
        h.index += 1
        a, b = h.sm.apply(h.index, cmd), twin.apply(h.index, cmd)
        assert a.ok and b.ok and a.value == b.value
        got.append(a.value.address)  # type: ignore[union-attr]
    assert got == ["fd00:99::1", "fd00:99::2", "fd00:99::3"]  # the released anycast never again
    assert h.sm.apply(h.index + 1, encode_command(AllocateLease(9.0, "v6", "c", 1))).error == "pool_exhausted"
    assert twin.apply(h.index + 1, encode_command(AllocateLease(9.0, "v6", "c", 1))).error == "pool_exhausted"
    assert twin.snapshot() == h.sm.snapshot()


def test_a_protocol_2_snapshot_keeps_the_rule() -> None:
    sm = _sm_at(2)
    assert sm.apply(3, encode_command(CreatePool(1.0, "v6", "fd00:99::/126"))).ok
    twin = StateMachine()
    twin.restore(sm.snapshot())
    assert twin.pool("v6").capacity == 3  # type: ignore[union-attr]
    res = twin.apply(4, encode_command(AllocateLease(2.0, "v6", "a", 1)))
    assert res.value.address == "fd00:99::1"  # type: ignore[union-attr]


# --- a mixed cluster: the baseline build and this one apply the same protocol-1 log -------------

_BASELINE_APPLY = r"""
import hashlib, json, sys
import msgpack
from quorumd.node.state import StateMachine
from quorumd.raft.codec import decode_conf_change
sm = StateMachine()
out = []
for kind, index, data in msgpack.unpackb(sys.stdin.buffer.read()):
    if kind == "c":
        res = sm.apply_conf_change(index, decode_conf_change(data))
    else:
        res = sm.apply(index, data)
    out.append([res.error, getattr(res.value, "address", None)])
pools = {p.name: p.capacity for p in sm.pools()}
print(json.dumps({"results": out, "pools": pools, "snapshot": hashlib.sha256(sm.snapshot()).hexdigest()}))
"""


def test_a_mixed_cluster_allocates_alike_at_protocol_1() -> None:
    """Every replica of a cluster at protocol 1 (baseline members present) must hand out the
    same address for the same entry: this build applies the baseline rule until the ratchet."""
    try:
        python = baseline_python()
    except BaselineUnavailable as exc:
        pytest.skip(f"baseline build unavailable: {exc}")
    log: list[tuple[str, int, bytes]] = [
        ("c", 1, encode_conf_change(ConfChange(ConfChangeType.PROMOTE, 1, ctx(1))))
    ]
    cmds = [CreatePool(1.0, "v6", "fd00:99::/126"), CreatePool(1.0, "v4", "10.9.0.0/30")]
    cmds += [AllocateLease(2.0 + i, "v6", f"h{i}", 1) for i in range(5)]
    cmds += [AllocateLease(3.0 + i, "v4", f"h{i}", 1) for i in range(3)]
    cmds += [ReleaseLease(4.0, 1), AllocateLease(5.0, "v6", "again", 1)]
    log += [("n", i + 2, encode_command(c)) for i, c in enumerate(cmds)]
    proc = subprocess.run(
        [str(python), "-c", _BASELINE_APPLY],
        input=msgpack.packb(log),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    baseline = json.loads(proc.stdout)
    sm = StateMachine()
    mine = []
    for kind, index, data in log:
        res = (
            sm.apply_conf_change(index, ConfChange(ConfChangeType.PROMOTE, 1, ctx(1)))
            if kind == "c"
            else sm.apply(index, data)
        )
        mine.append([res.error, getattr(res.value, "address", None)])
    assert mine == baseline["results"]
    assert mine[3][1] == "fd00:99::"  # the baseline hands the anycast out: so must this build at protocol 1
    assert {p.name: p.capacity for p in sm.pools()} == baseline["pools"]
    assert hashlib.sha256(sm.snapshot()).hexdigest() == baseline["snapshot"]


# --- the member.address handler and dial hints (no network: this node follows, leader unknown) --


def _book(sm: StateMachine) -> AddressBook:
    identity = Identity(1, "c", "0", "10.0.0.1:7000", "https://10.0.0.1:5002", "sha256:00", "")
    service = ClusterService(
        identity, sm, cluster_enabled=True, propose_timeout_seconds=1.0, tick_seconds=0.1, max_trailing_logs=1
    )
    return AddressBook(service)


def _ask(book: AddressBook, from_id: int, **fields: object) -> dict[str, object]:
    req = {"node_id": from_id, "raft_address": "127.0.0.9:7100", "api_address": "https://127.0.0.9:5102"}
    req["protocol_version"] = 2
    req.update(fields)
    return dict(msgpack.unpackb(asyncio.run(book.rpc_member_address(from_id, msgpack.packb(req)))))


def test_a_member_may_only_announce_itself() -> None:
    book = _book(cluster(1, 2, 3).sm)
    changed: list[int] = []
    book.on_dial_addresses_changed = lambda: changed.append(1)
    assert _ask(book, 3, node_id=2)["reason"] == "forbidden"  # node 3 asks to move node 2
    assert _ask(book, 7, node_id=7)["reason"] == "forbidden"  # not a member
    assert _ask(book, 3, raft_address="0.0.0.0:1")["reason"] == "invalid_raft_address"
    assert _ask(book, 3, api_address="http://h:1")["reason"] == "invalid_api_address"
    assert _ask(book, 3, node_id="x")["reason"] == "malformed"
    assert changed == [] and book.dial_addresses({2: "10.0.0.2:7000", 3: "10.0.0.3:7000"}) == {
        2: "10.0.0.2:7000",
        3: "10.0.0.3:7000",
    }


def test_an_announcement_is_a_dial_hint_until_the_registry_changes() -> None:
    h = cluster(1, 2, 3)
    book = _book(h.sm)
    changed: list[int] = []
    book.on_dial_addresses_changed = lambda: changed.append(1)
    answer = _ask(book, 2)
    assert answer["reason"] == "not_leader" and answer["leader"] == 0  # a follower: no proposal
    assert changed == [1] and book.service.versions.live_version(2) == 2  # it said what it speaks
    registry = {m.node_id: m.raft_address for m in h.sm.members() if m.node_id != 1}
    assert book.dial_addresses(registry) == {2: "127.0.0.9:7100", 3: "10.0.0.3:7000"}
    _ask(book, 2)
    assert changed == [1]  # the same hint again changes nothing
    ok(
        h.run(SetMemberAddress(9.0, 2, "127.0.0.10:7100", "https://127.0.0.10:5102"))
    )  # then recorded elsewhere
    registry = {m.node_id: m.raft_address for m in h.sm.members() if m.node_id != 1}
    assert book.dial_addresses(registry)[2] == "127.0.0.10:7100"  # the registry wins, the hint is gone
    assert book.dial_addresses({2: "10.0.0.2:7000"}) == {2: "10.0.0.2:7000"}


def test_a_member_back_where_it_was_drops_its_hint() -> None:
    h = cluster(1, 2, 3)
    book = _book(h.sm)
    changed: list[int] = []
    book.on_dial_addresses_changed = lambda: changed.append(1)
    _ask(book, 2)  # moved: dial it at 127.0.0.9:7100
    assert book.dial_addresses({2: "10.0.0.2:7000"}) == {2: "127.0.0.9:7100"}
    _ask(book, 2, raft_address="10.0.0.2:7000", api_address="https://10.0.0.2:5002")  # and back again
    assert book.dial_addresses({2: "10.0.0.2:7000"}) == {2: "10.0.0.2:7000"}
    assert changed == [1, 1]
