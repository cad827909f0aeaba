"""The audit trail without sockets: record encoding, the state machine's trail (same
entry as the change, retention, snapshots), the protocol gate, and GET /audit on the API fake."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import msgpack
import pytest

from quorumd.api.ports import DrainState
from quorumd.api.routes_audit import AUDIT_ACTIONS
from quorumd.node.cluster.audit import AuditWriter
from quorumd.node.registry.archive import ArchiveHeader, encode_archive
from quorumd.node.registry.audit import (
    Actor,
    AuditAction,
    AuditNote,
    AuditTrail,
    SystemComponent,
    decode_note,
    note_of,
)
from quorumd.node.registry.commands import (
    Audited,
    CommandError,
    CreatePool,
    EntryNeedsNewerProtocol,
    FeatureUnavailable,
    RecordAudit,
    SetClusterSecrets,
    SetDrain,
    SetProtocolVersion,
    decode_command,
    encode_audited_context,
    encode_command,
    gate,
    split_audited_context,
)
from quorumd.node.registry.protocol import PROTOCOL_VERSION
from quorumd.node.registry.state import StateMachine
from quorumd.node.tools.backup import load_archive_bytes
from quorumd.raft.codec import packb
from quorumd.raft.core.types import ConfChangeType
from tests.api_support import Env, request
from tests.test_state import cluster as make_cluster
from tests.test_state import ctx, ok

ADMIN = Actor.token("0123456789ab", "admin")


def note(
    action: AuditAction = AuditAction.POOL_CREATE,
    target: str = "pool:a",
    *,
    retention: int = 10_000,
    actor: Actor = ADMIN,
    **detail: str | int | bool | None,
) -> AuditNote:
    return note_of(
        action, target, actor, dict(detail), via_node_id=2, source_address="192.0.2.7", retention=retention
    )


# --- encoding ---------------------------------------------------------------------------------------


def test_api_action_list_matches_the_registry() -> None:
    assert tuple(AUDIT_ACTIONS) == tuple(str(a) for a in AuditAction)


def test_audited_and_record_round_trip() -> None:
    n = note(cidr="10.0.0.0/24")
    for cmd in (
        Audited(5.0, n, CreatePool(5.0, "a", "10.0.0.0/24")),
        RecordAudit(6.0, note(AuditAction.BACKUP_EXPORT, "cluster", index=9)),
        RecordAudit(
            7.0,
            note(AuditAction.LEADERSHIP_TRANSFER, "cluster", actor=Actor.system(SystemComponent.SHUTDOWN)),
        ),
    ):
        data = encode_command(cmd)
        assert decode_command(data) == cmd
        assert msgpack.unpackb(data)[:3] == [2, 2, 21 if isinstance(cmd, Audited) else 22]


@pytest.mark.parametrize(
    "wire",
    [
        ["no_such_action", "cluster", [1, "join"], {}, None, None, 10],
        ["pool_create", "pool:", [0, "0123456789ab", "admin"], {}, None, None, 10],
        ["pool_create", "host:1", [0, "0123456789ab", "admin"], {}, None, None, 10],
        ["pool_create", "cluster", [2, "x"], {}, None, None, 10],
        ["pool_create", "cluster", [1, "nobody"], {}, None, None, 10],
        ["pool_create", "cluster", [1, "join"], {"k": [1]}, None, None, 10],
        ["pool_create", "cluster", [1, "join"], {"k": float("nan")}, None, None, 10],
        ["pool_create", "cluster", [1, "join"], {"1k": 1}, None, None, 10],
        ["pool_create", "cluster", [1, "join"], {}, "1", None, 10],
        ["pool_create", "cluster", [1, "join"], {}, None, "", 10],
        ["pool_create", "cluster", [1, "join"], {}, None, None, 0],
        ["pool_create", "cluster", [1, "join"], {}, None, None, True],
        ["pool_create", "cluster", [1, "join"], {}, None, None],
    ],
)
def test_malformed_notes_are_refused(wire: list[object]) -> None:
    with pytest.raises(CommandError):
        decode_note(wire)


def test_an_audited_change_is_not_audited_again() -> None:
    inner = Audited(1.0, note(), CreatePool(1.0, "a", "10.0.0.0/24"))
    with pytest.raises(CommandError):
        encode_command(Audited(1.0, note(), inner))  # type: ignore[arg-type]
    nested = packb([2, 2, 21, 1.0, note().wire(), [2, 2, 22, 1.0, note().wire()]])
    with pytest.raises(CommandError):
        decode_command(nested)


def test_audited_context_wraps_and_names_its_protocol() -> None:
    inner = ctx(4)
    data = encode_audited_context(inner, 12.5, note(AuditAction.MEMBER_JOIN, "node:4"))
    got_inner, ts, n = split_audited_context(data)
    assert (got_inner, ts, n is not None and n.action) == (inner, 12.5, "member_join")
    assert split_audited_context(inner) == (inner, 0.0, None)
    assert split_audited_context(b"") == (b"", 0.0, None)
    with pytest.raises(EntryNeedsNewerProtocol):
        split_audited_context(packb([3, PROTOCOL_VERSION + 1, b"", 1.0, note().wire()]))
    with pytest.raises(CommandError):
        split_audited_context(packb([3, 2, "not bytes", 1.0, note().wire()]))


def test_the_gate_keeps_audited_entries_from_a_protocol_1_cluster() -> None:
    cmd = Audited(1.0, note(), CreatePool(1.0, "a", "10.0.0.0/24"))
    with pytest.raises(FeatureUnavailable):
        gate(cmd, 1)
    with pytest.raises(FeatureUnavailable):
        gate(RecordAudit(1.0, note()), 1)
    gate(cmd, 2)


# --- the state machine ------------------------------------------------------------------------------


def test_record_is_in_the_same_entry_as_the_change() -> None:
    h = make_cluster(1, 2)
    res = ok(h.run(Audited(100.0, note(cidr="10.0.0.0/24"), CreatePool(100.0, "a", "10.0.0.0/24"))))
    assert isinstance(res.command, CreatePool)  # listeners see the change itself
    assert h.sm.pool("a") is not None
    (rec,) = h.sm.audit_records()
    assert rec.as_dict() == {
        "id": 1,
        "time": "1970-01-01T00:01:40Z",
        "actor": {"type": "token", "tokenId": "0123456789ab", "name": "admin"},
        "action": "pool_create",
        "target": "pool:a",
        "detail": {"cidr": "10.0.0.0/24"},
        "viaNodeId": 2,
        "sourceAddress": "192.0.2.7",
    }
    # a refused change leaves no record (and no change)
    bad = h.run(Audited(101.0, note(), CreatePool(101.0, "a", "10.0.1.0/24")))
    assert bad.error == "pool_exists" and h.sm.audit_count() == 1
    assert h.sm.applied_index == h.index


def test_drained_after_a_resume_is_no_record() -> None:
    h = make_cluster(1, 2)
    ok(h.run(SetDrain(1.0, 2, DrainState.DRAINING, 50.0)))
    ok(h.run(SetDrain(2.0, 2, DrainState.ACTIVE, None)))
    n = note(AuditAction.MEMBER_DRAINED, "node:2", actor=Actor.system(SystemComponent.DRAIN))
    ok(h.run(Audited(3.0, n, SetDrain(3.0, 2, DrainState.DRAINED, None))))
    assert h.sm.member(2).drain_state == DrainState.ACTIVE and h.sm.audit_count() == 0  # type: ignore[union-attr]


def test_membership_changes_carry_their_record() -> None:
    h = make_cluster(1)
    join = note(AuditAction.MEMBER_JOIN, "node:2", actor=Actor.system(SystemComponent.JOIN))
    ok(h.conf(ConfChangeType.ADD_NONVOTER, 2, encode_audited_context(ctx(2), 10.0, join)))
    assert h.sm.has_member(2)
    promote = note(AuditAction.AUTOPILOT_PROMOTE, "node:2", actor=Actor.system(SystemComponent.AUTOPILOT))
    ok(h.conf(ConfChangeType.PROMOTE, 2, encode_audited_context(b"", 11.0, promote)))
    remove = note(AuditAction.MEMBER_REMOVE, "node:2", force=True)
    ok(h.conf(ConfChangeType.REMOVE, 2, encode_audited_context(b"", 12.0, remove)))
    assert not h.sm.has_member(2)
    got = [
        (r["id"], r["action"], r["time"], r["detail"]) for r in (x.as_dict() for x in h.sm.audit_records())
    ]
    assert got == [
        (1, "member_join", "1970-01-01T00:00:10Z", {}),
        (2, "autopilot_promote", "1970-01-01T00:00:11Z", {}),
        (3, "member_remove", "1970-01-01T00:00:12Z", {"force": True}),
    ]
    # a replayed join token registers nothing new and records nothing
    h2 = make_cluster(1)
    ok(h2.conf(ConfChangeType.ADD_NONVOTER, 2, encode_audited_context(ctx(2, token=b"t" * 16), 1.0, join)))
    again = h2.conf(
        ConfChangeType.ADD_NONVOTER, 3, encode_audited_context(ctx(3, token=b"t" * 16), 2.0, join)
    )
    assert again.error == "join_token_reused" and h2.sm.audit_count() == 1


def test_a_newer_audited_context_stops_before_anything_changes() -> None:
    h = make_cluster(1, 2)
    before = h.sm.snapshot()
    with pytest.raises(EntryNeedsNewerProtocol) as stop:
        h.conf(ConfChangeType.REMOVE, 2, packb([3, PROTOCOL_VERSION + 1, b"", 1.0, note().wire()]))
    assert stop.value.index == h.index and h.sm.snapshot() == before


def test_query_pages_and_filters() -> None:
    h = make_cluster(1)
    other = Actor.token("ba9876543210", "ci")
    for i in range(10):
        actor = ADMIN if i % 2 == 0 else other
        ok(
            h.run(
                RecordAudit(
                    float(i),
                    note(AuditAction.BACKUP_EXPORT if i % 3 else AuditAction.POOL_DELETE, actor=actor),
                )
            )
        )
    ids = [r.record_id for r in h.sm.audit_records(limit=1000)]
    assert ids == list(range(1, 11))
    assert [r.record_id for r in h.sm.audit_records(after=4, limit=3)] == [5, 6, 7]
    assert [r.record_id for r in h.sm.audit_records(action="pool_delete")] == [1, 4, 7, 10]
    assert [r.record_id for r in h.sm.audit_records(actor="ba9876543210", limit=2)] == [2, 4]
    assert [r.record_id for r in h.sm.audit_records(actor="ba9876543210", action="pool_delete")] == [4, 10]
    assert h.sm.audit_records(after=10) == []


def test_retention_drops_the_oldest_with_the_bound_in_the_entry() -> None:
    h = make_cluster(1)
    for i in range(8):
        ok(h.run(RecordAudit(float(i), note(retention=5))))
    assert [r.record_id for r in h.sm.audit_records()] == [4, 5, 6, 7, 8]
    ok(h.run(RecordAudit(9.0, note(retention=2))))  # a leader with a smaller bound
    assert [r.record_id for r in h.sm.audit_records()] == [8, 9]
    ok(h.run(RecordAudit(10.0, note(retention=100))))
    assert [r.record_id for r in h.sm.audit_records()] == [8, 9, 10]  # ids never reused


def test_trail_is_in_the_snapshot_and_ids_continue_after_restore() -> None:
    h = make_cluster(1, 2)
    ok(h.run(SetProtocolVersion(1.0, 2, ((1, 2), (2, 2)))))
    for i in range(6):
        ok(h.run(RecordAudit(float(i), note(retention=3))))
    ok(h.run(Audited(7.0, note(AuditAction.POOL_DELETE, "pool:x"), CreatePool(7.0, "x", "10.9.0.0/24"))))
    snap = h.sm.snapshot()
    assert msgpack.unpackb(snap)[0] == 3
    again = StateMachine()
    again.restore(snap)
    assert again.snapshot() == snap
    assert [r.as_dict() for r in again.audit_records()] == [r.as_dict() for r in h.sm.audit_records()]
    assert [r.record_id for r in again.audit_records()] == [4, 5, 6, 7]
    index = h.index + 1
    again.apply(index, encode_command(RecordAudit(8.0, note())))
    assert again.audit_records(after=7)[0].record_id == 8
    # a protocol 1 state writes the baseline's v1 format: the trail cannot be in it, and it is
    # empty there (nothing audited is written below protocol 2)
    assert msgpack.unpackb(make_cluster(1).sm.snapshot())[0] == 1


def test_corrupt_trail_in_a_snapshot_is_refused() -> None:
    h = make_cluster(1, 2)
    ok(h.run(SetProtocolVersion(1.0, 2, ((1, 2), (2, 2)))))
    ok(h.run(RecordAudit(1.0, note())))
    ok(h.run(RecordAudit(2.0, note())))
    items = msgpack.unpackb(h.sm.snapshot())
    for bad in ([1, items[9][1]], [3, list(reversed(items[9][1]))], [3, [[*items[9][1][0][:2], "x"]]]):
        with pytest.raises(Exception, match="audit"):
            StateMachine().restore(msgpack.packb([*items[:9], bad]))


# --- the API (fake node) ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audit_route_records_the_origin_through_a_follower(env: Env) -> None:
    r = await request(
        env.fc, "POST", "/api/v1/pools", env.admin, json_body={"name": "p1", "cidr": "10.1.0.0/24"}
    )
    assert r.status == 201, r.body
    r = await request(env.lc, "DELETE", "/api/v1/pools/p1", env.admin)
    assert r.status == 200, r.body
    for client in (env.lc, env.fc):
        r = await request(client, "GET", "/api/v1/audit", env.admin)
        assert r.status == 200, r.body
        rows = r.result
        assert [(x["action"], x["target"], x["viaNodeId"], x["sourceAddress"]) for x in rows] == [
            ("pool_create", "pool:p1", 2, "127.0.0.1"),
            ("pool_delete", "pool:p1", 1, "127.0.0.1"),
        ]
        admin_id = next(t.token_id for t in env.cluster.sm.api_tokens() if t.name == "admin")
        assert rows[0]["actor"] == {"type": "token", "tokenId": admin_id, "name": "admin"}
    r = await request(env.lc, "GET", "/api/v1/audit", env.admin, params={"after": 1, "action": "pool_delete"})
    assert [x["id"] for x in r.result] == [2]
    tid = r.result[0]["actor"]["tokenId"]
    r = await request(env.lc, "GET", "/api/v1/audit", env.admin, params={"actor": tid, "limit": 1})
    assert [x["id"] for x in r.result] == [1]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "params",
    [{"limit": "1001"}, {"limit": "0"}, {"action": "nope"}, {"actor": "xyz"}, {"after": "-1"}, {"x": "1"}],
)
async def test_audit_route_validates_its_query(env: Env, params: dict[str, str]) -> None:
    r = await request(env.lc, "GET", "/api/v1/audit", env.admin, params=params)
    assert r.status == 400, r.body


@pytest.mark.asyncio
async def test_audit_route_is_admin_only_and_refusals_are_counted_not_recorded(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="quorumd.api.pipeline")
    r = await request(env.lc, "GET", "/api/v1/audit", env.readonly)
    assert r.status == 403
    r = await request(
        env.fc, "POST", "/api/v1/pools", "qd_bogus", json_body={"name": "p", "cidr": "10.2.0.0/24"}
    )
    assert r.status == 401
    r = await request(env.lc, "DELETE", "/api/v1/pools/p", None)
    assert r.status == 401
    assert env.cluster.sm.audit_count() == 0
    leader = env.registries[1]
    follower = env.registries[2]
    assert leader.get_sample_value("quorumd_api_auth_failures_total", {"reason": "forbidden"}) == 1
    assert leader.get_sample_value("quorumd_api_auth_failures_total", {"reason": "missing_token"}) == 1
    assert follower.get_sample_value("quorumd_api_auth_failures_total", {"reason": "invalid_token"}) == 1
    lines = [rec.getMessage() for rec in caplog.records if "api_auth_refused" in rec.getMessage()]
    assert len(lines) == 3 and all("source=127.0.0.1" in line for line in lines)
    assert not any("qd_bogus" in line for line in lines)


@pytest.mark.asyncio
async def test_leases_are_not_audited(env: Env) -> None:
    r = await request(
        env.lc, "POST", "/api/v1/pools", env.admin, json_body={"name": "lp", "cidr": "10.3.0.0/24"}
    )
    assert r.status == 201
    r = await request(env.fc, "POST", "/api/v1/leases", env.admin, json_body={"pool": "lp", "holder": "h"})
    assert r.status == 201
    r = await request(env.fc, "DELETE", f"/api/v1/leases/{r.result['id']}", env.admin)
    assert r.status == 200
    assert [x.note.action for x in env.cluster.sm.audit_records()] == ["pool_create"]


def test_a_backup_archive_keeps_the_trail() -> None:
    h = make_cluster(1, 2)
    ok(h.run(SetProtocolVersion(1.0, 2, ((1, 2), (2, 2)))))
    ok(h.run(Audited(2.0, note(cidr="10.0.0.0/24"), CreatePool(2.0, "a", "10.0.0.0/24"))))
    ok(h.run(RecordAudit(3.0, note(AuditAction.BACKUP_EXPORT, "cluster", index=h.index))))
    ok(h.run(SetClusterSecrets(4.0, "c-1", b"k" * 32)))
    header = ArchiveHeader("c-1", h.sm.applied_index, 2, 4.0, 1, "0.1.0", 3)
    data, _ = encode_archive(header, h.sm.snapshot())
    loaded = load_archive_bytes(data)
    assert [r.as_dict() for r in loaded.state.audit_records()] == [r.as_dict() for r in h.sm.audit_records()]
    assert loaded.state.audit_count() == 2


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 40])
def test_the_trail_encoding_is_the_join_of_its_records(count: int) -> None:
    trail = AuditTrail()
    for i in range(count):
        trail.append(float(i), note(retention=30))
    assert trail.packed() == packb(trail.dump())
    assert AuditTrail.load(msgpack.unpackb(trail.packed())).packed() == trail.packed()


@pytest.mark.asyncio
async def test_a_transfer_recorded_later_does_not_hold_its_caller() -> None:
    """``record_transfer_later``: the caller goes on at once; the record is written by a task
    the writer keeps until it ends (and a transfer is still recorded once per term and leader)."""
    sm = SimpleNamespace(cluster_protocol_version=PROTOCOL_VERSION)
    service = SimpleNamespace(sm=sm, running_driver=SimpleNamespace(core=SimpleNamespace(term=7)))
    release = asyncio.Event()
    written: list[AuditNote | None] = []

    class Writer(AuditWriter):
        async def record_event(self, note: AuditNote | None) -> None:
            await release.wait()  # the round through the new leader
            written.append(note)

    trail = Writer(cast(Any, service))
    trail.record_transfer_later(1, 2, "drain", None)
    trail.record_transfer_later(1, 2, "drain", None)  # the same transfer: one record
    trail.record_transfer_later(1, 0, "drain", None)  # no transfer happened: no record
    assert written == [] and len(trail._later) == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*trail._later), 5)
    assert not trail._later
    assert len(written) == 1 and written[0] is not None
    assert written[0].action == AuditAction.LEADERSHIP_TRANSFER
    assert dict(written[0].detail) == {"from": 1, "to": 2, "reason": "drain"}
