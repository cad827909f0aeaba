"""Certificate rotation below the daemon: the pin rules of the replicated state, the v4 snapshot
that carries a member's next certificate, the gate that keeps pins away from older members, the
node's identity files on disk, who may pin and unpin through ``node.propose``, the rotation
procedure against a replica, and a model of a rotating node under leader changes and restarts
(``tests/rotation_model.py``) checked against the state machine.

Certificates are real (``pki.generate_node_identity``); the state machine is driven through its
apply path, as on a replica.
"""

from __future__ import annotations

import functools
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.api.errors import ApiError
from quorumd.node.cluster import pki
from quorumd.node.cluster.audit import AuditWriter
from quorumd.node.cluster.certificates import CertificateRotation
from quorumd.node.cluster.rpcs import node_propose
from quorumd.node.cluster.service import Identity, pack, rejection_error, unpack
from quorumd.node.cluster.versions import ProtocolVersions
from quorumd.node.registry import certificates
from quorumd.node.registry.audit import Actor, AuditAction, AuditNote, SystemComponent, note_of
from quorumd.node.registry.commands import (
    Audited,
    Command,
    FeatureUnavailable,
    MemberContext,
    PinCertificate,
    SetClusterSecrets,
    SetProtocolVersion,
    UnpinCertificate,
    decode_command,
    encode_command,
    encode_member_context,
    gate,
)
from quorumd.node.registry.leases import SnapshotError
from quorumd.node.registry.records import ApplyCode, ApplyResult, Member
from quorumd.node.registry.state import StateMachine
from quorumd.raft.core.types import ConfChangeType
from tests.rotation_model import RotatingNode
from tests.test_state import Harness, ok

CLUSTER = "cert-cluster"
ME, OTHER = 2, 1


@functools.cache
def _made(node_id: int, n: int, cluster: str) -> pki.NodeIdentity:
    return pki.generate_node_identity(node_id, cluster)


def ident(node_id: int, n: int = 0, cluster: str = CLUSTER) -> pki.NodeIdentity:
    """The ``n``-th certificate of node ``node_id`` (0: the one it joined with); made once."""
    return _made(node_id, n, cluster)


def pem(node_id: int, n: int = 0, cluster: str = CLUSTER) -> str:
    return ident(node_id, n, cluster).cert_pem.decode()


def fp(node_id: int, n: int = 0) -> str:
    return ident(node_id, n).fingerprint


def member_ctx(node_id: int) -> bytes:
    cert = ident(node_id)
    return encode_member_context(
        MemberContext(
            raft_address=f"10.0.0.{node_id}:7000",
            api_address=f"https://10.0.0.{node_id}:5002",
            binary_version="0.1.0",
            cert_fingerprint=cert.fingerprint,
            cert_pem=cert.cert_pem.decode(),
            join_token_id=None,
            ts=100.0,
        )
    )


def cluster_at(protocol: int = 3) -> Harness:
    """Members 1 and 2 with their first certificates, the cluster's secrets, and ``protocol``."""
    h = Harness()
    ok(h.conf(ConfChangeType.PROMOTE, OTHER, member_ctx(OTHER)))
    ok(h.run(SetClusterSecrets(101.0, CLUSTER, b"k" * 32)))
    ok(h.conf(ConfChangeType.ADD_NONVOTER, ME, member_ctx(ME)))
    if protocol > 1:
        ok(h.run(SetProtocolVersion(102.0, protocol, ((OTHER, protocol), (ME, protocol)))))
    return h


@functools.cache
def _cluster_snapshot(protocol: int) -> tuple[bytes, int]:
    h = cluster_at(protocol)
    return h.sm.snapshot(), h.index


def copy_of_cluster(protocol: int) -> Harness:
    """``cluster_at(protocol)``, restored from its snapshot (quicker than replaying it)."""
    data, index = _cluster_snapshot(protocol)
    h = Harness()
    h.sm.restore(data)
    h.index = index
    return h


def me(h: Harness) -> Member:
    m = h.sm.member(ME)
    assert m is not None
    return m


def pin(n: int, node_id: int = ME) -> PinCertificate:
    return PinCertificate(200.0, node_id, pem(ME, n))


def unpin(fingerprint: str, node_id: int = ME) -> UnpinCertificate:
    return UnpinCertificate(201.0, node_id, fingerprint)


def rotate_note(target: int = ME, action: AuditAction = AuditAction.CERTIFICATE_ROTATE) -> AuditNote:
    actor = Actor.system(SystemComponent.CERTIFICATES)
    return note_of(action, f"node:{target}", actor, {"from": fp(ME, 0), "to": fp(ME, 1)})


# --- the pin rules --------------------------------------------------------------------------------


def test_pinning_a_next_certificate_pins_both() -> None:
    h = cluster_at(3)
    res = ok(h.run(pin(1)))
    assert res.value == me(h)
    assert certificates.fingerprints(me(h)) == (fp(ME, 0), fp(ME, 1))
    assert h.sm.pins() == {OTHER: (fp(OTHER),), ME: (fp(ME, 0), fp(ME, 1))}
    assert me(h).cert_pem == pem(ME, 0) and me(h).next_cert_pem == pem(ME, 1)
    assert me(h).as_dict()["certificateFingerprint"] == fp(ME, 0)  # the list shows the current one


def _oversize() -> str:
    """A PEM the parser reads (the preamble is ignored), larger than a pin may be."""
    text = "# padding\n" * (certificates.MAX_CERT_PEM_BYTES // 10) + pem(ME, 1)
    assert certificates.fingerprint_of(text) == fp(ME, 1)  # only its size is wrong
    return text


REFUSED_PINS = {
    "another_node": lambda: pem(3),
    "the_other_member": lambda: pem(OTHER),
    "another_cluster": lambda: pem(ME, 0, "other-cluster"),
    "garbage_pem": lambda: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "not_pem": lambda: "hello",
    "empty": lambda: "",
    "oversize": _oversize,
}


@pytest.mark.parametrize("with_next", [False, True], ids=["one_pin", "rotating"])
@pytest.mark.parametrize("name", sorted(REFUSED_PINS))
def test_a_pin_that_does_not_name_this_member_is_refused(name: str, with_next: bool) -> None:
    h = cluster_at(3)
    if with_next:
        ok(h.run(pin(1)))
    before, pins = me(h), h.sm.pins()
    res = h.run(PinCertificate(200.0, ME, REFUSED_PINS[name]()))
    assert res.error == ApplyCode.INVALID_ARGUMENT, res
    assert me(h) == before and h.sm.pins() == pins


def test_pinning_for_an_unknown_node_is_refused() -> None:
    h = cluster_at(3)
    pins = h.sm.pins()
    assert h.run(PinCertificate(200.0, 3, pem(3))).error == ApplyCode.UNKNOWN_NODE
    assert h.run(unpin(fp(3), node_id=3)).error == ApplyCode.UNKNOWN_NODE
    assert h.sm.pins() == pins


def test_pinning_the_current_certificate_changes_nothing() -> None:
    h = cluster_at(3)
    before = me(h)
    ok(h.run(pin(0)))
    assert me(h) == before and me(h).next_cert_pem is None
    ok(h.run(pin(1)))
    rotating = me(h)
    ok(h.run(pin(0)))  # the current one again: the next one stays
    assert me(h) == rotating


def test_pinning_another_next_certificate_replaces_the_next_one() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    ok(h.run(pin(2)))
    assert certificates.fingerprints(me(h)) == (fp(ME, 0), fp(ME, 2))
    assert me(h).next_cert_pem == pem(ME, 2)
    ok(h.run(pin(2)))  # a retry of the same pin
    assert certificates.fingerprints(me(h)) == (fp(ME, 0), fp(ME, 2))


def test_unpinning_the_current_certificate_makes_the_next_one_current() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    ok(h.run(unpin(fp(ME, 0))))
    m = me(h)
    assert certificates.fingerprints(m) == (fp(ME, 1),)
    assert (m.cert_fingerprint, m.cert_pem) == (fp(ME, 1), pem(ME, 1))
    assert m.next_cert_pem is None and m.next_cert_fingerprint is None
    assert m.as_dict()["certificateExpiresAt"] == certificates.expires_at_rfc3339(pem(ME, 1))
    ok(h.run(unpin(fp(ME, 0))))  # a retry after a lost answer: the old one is gone already
    assert me(h) == m


def test_unpinning_the_next_certificate_abandons_it() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    ok(h.run(unpin(fp(ME, 1))))
    assert certificates.fingerprints(me(h)) == (fp(ME, 0),)
    assert me(h).next_cert_pem is None and me(h).cert_pem == pem(ME, 0)


def test_a_members_only_pin_is_never_unpinned() -> None:
    h = cluster_at(3)
    before = me(h)
    res = h.run(unpin(fp(ME, 0)))
    assert res.error == ApplyCode.INVALID_ARGUMENT
    assert me(h) == before
    audited = h.run(Audited(202.0, rotate_note(), unpin(fp(ME, 0))))
    assert audited.error == ApplyCode.INVALID_ARGUMENT
    assert me(h) == before and h.sm.audit_count() == 0  # no record of a change that did not happen


@pytest.mark.parametrize("with_next", [False, True], ids=["one_pin", "rotating"])
def test_unpinning_an_unknown_fingerprint_changes_nothing(with_next: bool) -> None:
    h = cluster_at(3)
    if with_next:
        ok(h.run(pin(1)))
    before = me(h)
    ok(h.run(unpin(fp(ME, 5))))
    ok(h.run(unpin(fp(OTHER))))  # another member's pin is not this member's to name
    assert me(h) == before and h.sm.pins()[OTHER] == (fp(OTHER),)


def test_an_audited_unpin_records_the_rotation_once_it_happened() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    ok(h.run(Audited(202.0, rotate_note(), unpin(fp(ME, 0)))))
    assert certificates.fingerprints(me(h)) == (fp(ME, 1),)
    records = h.sm.audit_records()
    assert [r.note.action for r in records] == [AuditAction.CERTIFICATE_ROTATE]


# --- snapshots and the gate -----------------------------------------------------------------------


def test_snapshot_v4_carries_the_next_certificate_and_round_trips() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    data = h.sm.snapshot()
    items = msgpack.unpackb(data)
    assert items[0] == 4 and items[8] == 3
    rows = {row[0]: row for row in items[4]}
    assert all(len(row) == 12 for row in rows.values())
    assert rows[ME][11] == pem(ME, 1) and rows[ME][4] == fp(ME, 0)
    assert rows[OTHER][11] is None
    again = StateMachine()
    again.restore(data)
    assert again.snapshot() == data  # byte for byte
    assert again.pins() == h.sm.pins() and again.member(ME) == me(h)
    ok(h.run(unpin(fp(ME, 0))))  # after the rotation: no next certificate in the row
    after = msgpack.unpackb(h.sm.snapshot())
    assert {row[0]: row[11] for row in after[4]} == {OTHER: None, ME: None}


def test_snapshot_v3_at_protocol_2_and_pins_gated_at_protocol_3() -> None:
    h = cluster_at(2)
    data = h.sm.snapshot()
    items = msgpack.unpackb(data)
    assert items[0] == 3 and items[8] == 2 and all(len(row) == 11 for row in items[4])
    again = StateMachine()
    again.restore(data)
    assert again.snapshot() == data and again.member(ME) == me(h)
    for cmd in (pin(1), unpin(fp(ME, 0))):
        with pytest.raises(FeatureUnavailable) as refused:
            gate(cmd, 2)
        assert (refused.value.needs, refused.value.have) == (3, 2)
        gate(cmd, 3)
    with pytest.raises(ApiError) as err:  # what ClusterService.propose checks
        ProtocolVersions(1, h.sm).check(pin(1))
    assert (err.value.status, err.value.code) == (409, "feature_unavailable")


def test_an_audited_unpin_is_gated_like_the_unpin_it_carries() -> None:
    """An audited entry is only readable where its change is: a protocol 2 member stops on an
    entry whose inner command needs protocol 3, so the gate must refuse it like the bare one."""
    audited = Audited(202.0, rotate_note(), unpin(fp(ME, 0)))
    with pytest.raises(FeatureUnavailable) as refused:
        gate(audited, 2)
    assert refused.value.needs == 3
    gate(audited, 3)


def test_a_v4_snapshot_whose_next_certificate_is_not_a_pem_is_refused() -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    items = msgpack.unpackb(h.sm.snapshot())
    target = cluster_at(3)
    before = target.sm.snapshot()
    for bad in ("not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        rows = [list(row) for row in items[4]]
        next(row for row in rows if row[0] == ME)[11] = bad
        data = msgpack.packb([*items[:4], rows, *items[5:]], use_bin_type=True)
        with pytest.raises(SnapshotError, match="next certificate"):
            target.sm.restore(data)
        assert target.sm.snapshot() == before  # untouched
    rows = [list(row) for row in items[4]]
    next(row for row in rows if row[0] == ME)[11] = 7  # not even text
    with pytest.raises(SnapshotError):
        target.sm.restore(msgpack.packb([*items[:4], rows, *items[5:]], use_bin_type=True))
    assert target.sm.snapshot() == before


# --- the identity files -----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_next_identity_round_trips_in_a_private_file(tmp_path: Path) -> None:
    files = pki.IdentityFiles(tmp_path)
    assert files.read_next() is None
    files.write(ident(ME, 0).cert_pem, ident(ME, 0).key_pem)
    files.write_next(ident(ME, 1))
    assert files.read_next() == (ident(ME, 1).cert_pem, ident(ME, 1).key_pem)
    assert {p.name: mode(p) for p in files.dir.iterdir()} == {
        "node.crt": 0o600,
        "node.key": 0o600,
        "node.next.pem": 0o600,
    }
    assert files.load() == (ident(ME, 0).cert_pem, ident(ME, 0).key_pem)  # not switched yet
    files.discard_next()
    assert files.read_next() is None and not files.next.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"junk", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "cert_only"],
)
def test_an_unreadable_next_identity_is_discarded(tmp_path: Path, content: bytes | str) -> None:
    files = pki.IdentityFiles(tmp_path)
    data = ident(ME, 1).cert_pem if content == "cert_only" else content
    assert isinstance(data, bytes)
    pki.write_private_file(files.next, data)
    assert files.read_next() is None
    assert not files.next.exists()


def test_switching_makes_the_next_identity_the_one_in_use(tmp_path: Path) -> None:
    files = pki.IdentityFiles(tmp_path)
    files.write(ident(ME, 0).cert_pem, ident(ME, 0).key_pem)
    files.write_next(ident(ME, 1))
    assert files.switch_to_next() == (ident(ME, 1).cert_pem, ident(ME, 1).key_pem)
    assert sorted(p.name for p in files.dir.iterdir()) == ["node.crt", "node.key"]
    assert files.load() == (ident(ME, 1).cert_pem, ident(ME, 1).key_pem)
    assert mode(files.cert) == mode(files.key) == 0o600


@pytest.mark.parametrize("torn", [False, True], ids=["before_rewrite", "between_cert_and_key"])
def test_a_crash_in_the_middle_of_a_switch_is_finished_by_load(tmp_path: Path, torn: bool) -> None:
    """The state a crash leaves after the rename to node.switch.pem: node.crt and node.key still
    hold the old pair (or, torn, the new certificate beside the old key)."""
    files = pki.IdentityFiles(tmp_path)
    old, new = ident(ME, 0), ident(ME, 1)
    files.write(new.cert_pem if torn else old.cert_pem, old.key_pem)
    pki.write_private_file(files.switching, new.cert_pem + new.key_pem)
    assert files.read_next() is None  # a switch under way is not a next identity
    assert files.load() == (new.cert_pem, new.key_pem)
    assert files.cert.read_bytes() == new.cert_pem and files.key.read_bytes() == new.key_pem
    assert not files.switching.exists()
    assert mode(files.cert) == mode(files.key) == 0o600
    assert files.load() == (new.cert_pem, new.key_pem)  # and again after another restart


def test_split_identity_pem_refusals() -> None:
    cert, key = ident(ME, 0).cert_pem, ident(ME, 0).key_pem
    assert pki.split_identity_pem(cert + key) == (cert, key)
    for data in (
        b"",
        cert,  # no key
        key,  # no certificate
        key + cert,  # the key first
        b"\n" + cert + key,  # anything before the certificate
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" + key,  # a broken certificate
    ):
        with pytest.raises(pki.PkiError):
            pki.split_identity_pem(data)


# --- node.propose: a member pins and unpins its own certificates only -------------------------------


class FakeLeader:
    """What ``node_propose`` uses of the leader: its replica, the protocol gate (as
    ``ClusterService.propose`` applies it) and the log it proposes to."""

    def __init__(self, h: Harness) -> None:
        self.h, self.sm = h, h.sm
        self.versions = ProtocolVersions(OTHER, h.sm)
        self.proposed: list[Command] = []
        self.running_driver = SimpleNamespace(flush_commit_broadcast=lambda: None)

    def is_leader(self) -> bool:
        return True

    async def linearizable_barrier(self) -> None:
        return None

    async def propose(self, cmd: Command) -> ApplyResult:
        self.versions.check(cmd)
        self.proposed.append(cmd)
        res = self.h.run(cmd)
        if not res.ok:
            raise rejection_error(res)
        return res


async def propose_as(leader: FakeLeader, from_id: int, cmd: Command) -> Any:
    return unpack(await node_propose(leader, from_id, encode_command(cmd)))  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_member_pins_and_unpins_its_own_certificates() -> None:
    leader = FakeLeader(cluster_at(3))
    assert await propose_as(leader, ME, pin(1)) is True
    assert leader.h.sm.pins()[ME] == (fp(ME, 0), fp(ME, 1))
    assert await propose_as(leader, ME, unpin(fp(ME, 1))) is True  # abandons it
    assert await propose_as(leader, ME, pin(2)) is True
    assert await propose_as(leader, ME, Audited(202.0, rotate_note(), unpin(fp(ME, 0)))) is True
    assert leader.h.sm.pins()[ME] == (fp(ME, 2),)
    names = [type(c).__name__ for c in leader.proposed]
    assert names == ["PinCertificate", "UnpinCertificate", "PinCertificate", "Audited"]
    assert [r.note.target for r in leader.h.sm.audit_records()] == [f"node:{ME}"]


FORBIDDEN = {
    "pin_another_member": PinCertificate(200.0, OTHER, "x"),
    "pin_for_another_member_with_its_cert": PinCertificate(200.0, OTHER, pem(OTHER)),
    "unpin_another_member": UnpinCertificate(201.0, OTHER, fp(OTHER)),
    "audited_unpin_of_another_member": Audited(202.0, rotate_note(ME), unpin(fp(OTHER), node_id=OTHER)),
    "note_targeting_another_member": Audited(202.0, rotate_note(OTHER), unpin(fp(ME, 0))),
    "another_action": Audited(202.0, rotate_note(ME, AuditAction.MEMBER_REMOVE), unpin(fp(ME, 0))),
    "audited_pin": Audited(202.0, rotate_note(ME), pin(1)),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(FORBIDDEN))
async def test_a_member_cannot_pin_or_unpin_for_another(name: str) -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))  # node 2 is rotating: its pins could be unpinned one at a time
    ok(h.run(PinCertificate(203.0, OTHER, pem(OTHER, 1))))
    leader = FakeLeader(h)
    pins, count = h.sm.pins(), h.sm.audit_count()
    with pytest.raises(ApiError) as err:
        await propose_as(leader, ME, FORBIDDEN[name])
    assert (err.value.status, err.value.code) == (403, "forbidden")
    assert leader.proposed == [] and h.sm.pins() == pins and h.sm.audit_count() == count


@pytest.mark.asyncio
async def test_an_audited_own_unpin_waits_for_protocol_3_like_a_bare_one() -> None:
    h = cluster_at(2)
    leader = FakeLeader(h)
    for cmd in (unpin(fp(ME, 0)), Audited(202.0, rotate_note(), unpin(fp(ME, 0)))):
        with pytest.raises(ApiError) as err:
            await propose_as(leader, ME, cmd)
        assert (err.value.status, err.value.code) == (409, "feature_unavailable")
    assert leader.proposed == []


# --- the rotation procedure against a replica --------------------------------------------------------


class RotatingFake:
    """The node a ``CertificateRotation`` runs on, with its replica ``h``: it leads (proposals
    apply at once), every member confirms at once, and a wait on the replica for something it
    does not hold times out at once (nothing else will be applied)."""

    def __init__(self, h: Harness, using: int, leader: Harness | None = None) -> None:
        self.h, self.sm = h, h.sm
        self.leader = leader or h  # where proposals commit (another replica: this one lags)
        cert = ident(ME, using)
        self.identity = Identity(ME, CLUSTER, "0.1.0", "r", "a", cert.fingerprint, cert.cert_pem.decode())
        self.versions = ProtocolVersions(ME, h.sm)
        self.trail = AuditWriter(self)  # type: ignore[arg-type]
        self.propose_timeout = 0.05
        self.proposed: list[Command] = []

    def is_leader(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return True

    def applied_index(self) -> int:
        return self.sm.applied_index

    async def propose(self, cmd: Command) -> ApplyResult:
        self.proposed.append(cmd)
        return self.leader.run(cmd)

    async def wait_state(self, pred: Any, timeout: float) -> bool:
        return bool(pred())

    async def call_member(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        assert method == "node.wait_applied"
        return pack(self.sm.applied_index)


class SwitchRecorder:
    def __init__(self) -> None:
        self.switched: list[bytes] = []

    def set_identity(self, cert_pem: bytes, key_pem: bytes) -> str:
        self.switched.append(cert_pem)
        return pki.fingerprint(pki.pem_to_der(cert_pem))

    def connections_closed(self, fingerprint: str) -> list[Any]:
        return []


def rotation_on(
    tmp_path: Path, h: Harness, using: int, leader: Harness | None = None
) -> tuple[CertificateRotation, RotatingFake]:
    node = RotatingFake(h, using, leader)
    rot = CertificateRotation(node, tmp_path, 86400.0, 3600.0)  # type: ignore[arg-type]
    rot.files.write(ident(ME, using).cert_pem, ident(ME, using).key_pem)
    rot.transport = SwitchRecorder()
    return rot, node


@pytest.mark.asyncio
async def test_a_rotation_pins_switches_then_unpins(tmp_path: Path) -> None:
    h = cluster_at(3)
    rot, node = rotation_on(tmp_path, h, using=0)
    result = await rot.rotate()
    new = certificates.fingerprints(me(h))
    assert len(new) == 1 and new[0] != fp(ME, 0)
    assert result["certificateFingerprint"] == new[0] == node.identity.fingerprint
    # outside an API request the unpin carries no record (the request's token would be its actor)
    assert [type(c).__name__ for c in node.proposed] == ["PinCertificate", "UnpinCertificate"]
    cert_pem, _key = rot.files.load()
    assert pki.fingerprint(pki.pem_to_der(cert_pem)) == new[0] and not rot.files.next.exists()
    assert isinstance(rot.transport, SwitchRecorder) and rot.transport.switched == [cert_pem]


@pytest.mark.asyncio
async def test_a_rotation_switched_before_a_crash_only_unpins(tmp_path: Path) -> None:
    h = cluster_at(3)
    ok(h.run(pin(1)))
    rot, node = rotation_on(tmp_path, h, using=1)  # switched to 1, crashed before the unpin
    assert await rot.check()  # the renewal loop resumes it
    assert h.sm.pins()[ME] == (fp(ME, 1),)
    [audited] = node.proposed
    assert isinstance(audited, Audited) and audited.command == UnpinCertificate(audited.ts, ME, fp(ME, 0))
    assert audited.note.action == AuditAction.CERTIFICATE_ROTATE and audited.note.target == f"node:{ME}"
    assert isinstance(rot.transport, SwitchRecorder) and rot.transport.switched == []


@pytest.mark.asyncio
async def test_a_rotation_never_switches_to_a_pin_its_replica_has_not_applied(tmp_path: Path) -> None:
    leader = cluster_at(3)
    rot, node = rotation_on(tmp_path, cluster_at(3), using=0, leader=leader)
    with pytest.raises(ApiError) as err:
        await rot.rotate()
    assert (err.value.status, err.value.code) == (504, "commit_timeout")
    [pinned] = node.proposed
    assert isinstance(pinned, PinCertificate) and leader.sm.pins()[ME][0] == fp(ME, 0)
    assert node.identity.fingerprint == fp(ME, 0) and rot.files.load()[0] == ident(ME, 0).cert_pem
    kept = rot.files.read_next()  # kept: the next rotation switches to it once it is pinned
    assert kept is not None and kept[0] == pinned.cert_pem.encode()
    assert isinstance(rot.transport, SwitchRecorder) and rot.transport.switched == []


@pytest.mark.asyncio
@pytest.mark.parametrize("stale_next", [None, 3], ids=["no_next", "an_older_next"])
async def test_a_replica_that_does_not_pin_the_certificate_in_use_decides_nothing(
    tmp_path: Path, stale_next: int | None
) -> None:
    """After a crash the replica may be behind what this node applied (the commit index need not
    be durable): it switched to certificate 1, but its replica, restored, shows only the pin of 0
    (or an older next one). A rotation decided on that view pinned a fresh certificate in place
    of the one in use: the cluster then refuses this node. It waits for the replica instead."""
    truth = cluster_at(3)
    if stale_next is not None:
        ok(truth.run(pin(stale_next)))
    replica = cluster_at(3)  # the same log, applied only so far
    if stale_next is not None:
        ok(replica.run(pin(stale_next)))
    ok(truth.run(pin(1)))  # applied before the crash; the node switched to 1
    rot, node = rotation_on(tmp_path, replica, using=1)
    with pytest.raises(ApiError) as err:
        await rot.rotate()
    assert (err.value.status, err.value.code) == (504, "commit_timeout")
    assert node.proposed == [] and not rot.files.next.exists()
    assert rot.files.load()[0] == ident(ME, 1).cert_pem
    node.sm.restore(truth.sm.snapshot())  # caught up: the rotation finishes what it started
    node.h.index = truth.index
    await rot.rotate()
    assert node.sm.pins()[ME] == (fp(ME, 1),)


# --- a rotating node under leader changes, lost answers and restarts -----------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_a_rotating_node_always_uses_a_pinned_certificate(data: st.DataObject) -> None:
    """Each step is one of the actions that can change something now
    (``tests.rotation_model.ACTIONS``) with its argument (0..3)."""
    node = RotatingNode(copy_of_cluster, lambda n: ident(ME, n), ME)
    node.check_invariant()
    for _ in range(data.draw(st.integers(0, 40), label="steps")):
        action, arg = data.draw(st.sampled_from([(a, k) for a in node.enabled() for k in range(4)]))
        node.step(action, arg)
        node.check_invariant()


def test_the_model_rotates_to_the_end_when_nothing_goes_wrong() -> None:
    """The model is not vacuous: a plain run pins, switches and unpins."""
    node = RotatingNode(copy_of_cluster, lambda n: ident(ME, n), ME)
    script = ["rotate", "send", "commit", "apply_mine", "apply_peer", "advance", "advance", "advance"]
    script += ["send", "commit", "apply_mine", "advance"]
    for action in script:
        node.step(action, 0)
        node.check_invariant()
    assert node.rotation is None and node.active == 1 and node.truth.sm.pins()[ME] == (fp(ME, 1),)
    assert [type(decode_command(d)).__name__ for d in node.committed] == ["PinCertificate", "Audited"]
