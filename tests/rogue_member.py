"""A rogue cluster member for tests: a node that joined as a nonvoter with a join token, built from
the real join call and the real ``ClusterTransport``, that calls every internal RPC with hostile
arguments. Shared by the live test (tests/integration/test_rogue_member_live.py) and the chaos nemesis.

``hostile_calls(victims, admin_token_id)`` lists (method, payload) pairs, none of which may change
membership or state when sent by a member that holds no API token: removing other members, drain
and registry changes for other nodes, commands only the API may propose (tokens, pools, leases),
forwarded admin requests without a valid token, a replayed join through ``join.forward``, and
malformed payloads of every RPC.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.cluster import pki
from quorumd.node.cluster.service import pack, unpack
from quorumd.node.registry import jointoken
from quorumd.node.registry.audit import Actor, AuditAction, SystemComponent, note_of
from quorumd.node.registry.commands import (
    AllocateLease,
    Audited,
    CreateApiToken,
    CreatePool,
    MarkNodeLeft,
    MemberContext,
    PinCertificate,
    RegisterNodeInfo,
    RevokeApiToken,
    SetDrain,
    UnpinCertificate,
    encode_command,
    encode_member_context,
)
from quorumd.node.version import PROTOCOL_VERSION
from quorumd.raft.aio.transport import ClusterTransport, RpcError, join_call

INTERNAL_RPCS = (
    "api.forward",
    "node.propose",
    "member.remove",
    "node.wait_applied",
    "join.forward",
    "node.info",
    "member.address",
    "backup.read",
)


def _forward(method: str, path: str, token: str, hops: int = 1, body: bytes = b"") -> bytes:
    return pack([method, path, [], body, token, hops])


def pem_of(cert_der: bytes) -> str:
    if not cert_der:
        return "-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n"
    return x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM).decode()


def hostile_calls(
    node_id: int, victims: list[int], admin_token_id: str, join_token: str, cert_der: bytes
) -> list[tuple[str, bytes]]:
    now = time.time()
    bad_token = "qd_" + "0" * 12 + "_" + "A" * 43
    calls: list[tuple[str, bytes]] = []
    own_pem = pem_of(cert_der)
    forged = "sha256:" + "ab" * 32
    for v in victims:
        rotation = note_of(
            AuditAction.CERTIFICATE_ROTATE, f"node:{v}", Actor.system(SystemComponent.CERTIFICATES)
        )
        calls += [
            # another member's certificate pins: pin its own certificate as theirs, unpin theirs
            ("node.propose", encode_command(PinCertificate(now, v, own_pem))),
            ("node.propose", encode_command(UnpinCertificate(now, v, forged))),
            ("node.propose", encode_command(Audited(now, rotation, UnpinCertificate(now, v, forged)))),
            (
                "api.forward",
                _forward("POST", f"/api/v1/cluster/members/{v}/rotate-certificate", bad_token, 1, b"{}"),
            ),
            ("member.remove", pack([v])),
            # moving another member
            (
                "member.address",
                pack(
                    {
                        "node_id": v,
                        "raft_address": "203.0.113.9:7000",
                        "api_address": "https://203.0.113.9:5002",
                        "protocol_version": PROTOCOL_VERSION,
                    }
                ),
            ),
            ("node.propose", encode_command(SetDrain(now, v, DrainState.DRAINING, None))),
            ("node.propose", encode_command(SetDrain(now, v, DrainState.DRAINED, None))),
            ("node.propose", encode_command(SetDrain(now, v, DrainState.DRAINED, now + 3600))),
            ("node.propose", encode_command(RegisterNodeInfo(now, v, "https://203.0.113.9:1", "evil"))),
            ("node.propose", encode_command(MarkNodeLeft(now, v, True))),
            ("node.propose", encode_command(AllocateLease(now, "rogue", "h", v))),
            ("api.forward", _forward("DELETE", f"/api/v1/cluster/members/{v}", "", 1)),
            ("api.forward", _forward("DELETE", f"/api/v1/cluster/members/{v}?force=true", bad_token, 0)),
            ("api.forward", _forward("POST", f"/api/v1/cluster/members/{v}/drain", bad_token, 1, b"{}")),
        ]
    calls += [
        # API-only commands proposed directly
        (
            "node.propose",
            encode_command(CreateApiToken(now, "00000000beef", "r", TokenRole.ADMIN, b"x" * 32, None)),
        ),
        ("node.propose", encode_command(RevokeApiToken(now, admin_token_id))),
        ("node.propose", encode_command(CreatePool(now, "rogue", "10.99.0.0/24"))),
        # its own drain state: only the confirmation of a drain an admin started
        ("node.propose", encode_command(SetDrain(now, node_id, DrainState.DRAINED, None))),
        ("node.propose", encode_command(SetDrain(now, node_id, DrainState.DRAINING, None))),
        ("node.propose", b"\xc1garbage"),
        ("node.propose", b""),
        ("member.remove", pack([0])),
        ("member.remove", pack(["2"])),
        ("member.remove", pack([])),
        ("member.remove", b"\xff\xff"),
        ("api.forward", _forward("POST", "/api/v1/tokens", "", 1, b'{"name":"r","role":"admin"}')),
        ("api.forward", _forward("POST", "/api/v1/cluster/pki/join-tokens", bad_token, 1, b'{"nodeID":33}')),
        ("api.forward", _forward("DELETE", f"/api/v1/tokens/{admin_token_id}", bad_token, 1)),
        ("api.forward", pack(["GET"])),
        ("api.forward", b"\x00"),
        # the join token it consumed, replayed for another node id and for itself with a new key
        (
            "join.forward",
            pack([pack({"token": join_token, "node_id": victims[0], "context": b""}), cert_der]),
        ),
        ("join.forward", pack([pack({"token": join_token, "node_id": node_id, "context": b"x"}), b"der"])),
        ("join.forward", pack([b"\x01", b""])),
        ("join.forward", b""),
        ("node.wait_applied", pack([2**62, 0.05])),
        ("node.wait_applied", pack([1, math.nan])),
        ("node.wait_applied", pack([1, -1])),
        ("node.wait_applied", b"zz"),
        ("backup.read", pack(["no-such-transfer", 0, 1 << 20, bad_token])),
        ("backup.read", b"\x00"),
        ("node.info", b""),
        ("no.such.method", b""),
    ]
    return calls


@dataclass
class RogueMember:
    """A joined nonvoter (see the module docstring). ``start`` joins and opens the transport."""

    node_id: int
    cluster_id: str
    join_token: str
    listen_port: int
    host: str = "127.0.0.1"  # the address it listens on and advertises
    ident: pki.NodeIdentity = field(init=False)
    transport: ClusterTransport | None = None
    members: dict[int, str] = field(default_factory=dict)  # node id -> raft address

    async def start(self, seed_addresses: list[str]) -> None:
        claims = jointoken.parse_join_token(self.join_token)
        self.ident = pki.generate_node_identity(self.node_id, self.cluster_id)
        address = f"{self.host}:{self.listen_port}"
        ctx = MemberContext(
            raft_address=address,
            api_address=f"https://{self.host}:{self.listen_port}",
            binary_version="rogue",
            cert_fingerprint=self.ident.fingerprint,
            cert_pem=self.ident.cert_pem.decode(),
            join_token_id=claims.token_id,
            ts=time.time(),
        )
        payload = pack(
            {
                "token": self.join_token,
                "node_id": self.node_id,
                "context": encode_member_context(ctx),
                "protocol_version": PROTOCOL_VERSION,  # an older joiner is refused once the log is newer
            }
        )
        last: object = None
        for _ in range(20):
            for addr in [*claims.leader_addresses, *seed_addresses]:
                try:
                    resp = unpack(
                        await join_call(
                            addr,
                            claims.leader_fingerprint,
                            payload,
                            self.ident.cert_pem,
                            self.ident.key_pem,
                            10.0,
                        )
                    )
                except Exception as exc:  # try the next seed
                    last = exc
                    continue
                if resp.get("ok"):
                    pins = {int(n): str(fp) for n, _a, fp in resp["members"] if int(n) != self.node_id}
                    self.members = {int(n): str(a) for n, a, _fp in resp["members"] if int(n) != self.node_id}
                    t = ClusterTransport(
                        node_id=self.node_id,
                        cluster_id=self.cluster_id,
                        cert_pem=self.ident.cert_pem,
                        key_pem=self.ident.key_pem,
                        pins=pins,
                        addresses=self.members,
                        on_raft_frame=lambda _frm, _frame: None,  # it never acks: a silent member
                    )
                    await t.start(address)
                    self.transport = t
                    return
                last = resp
            await asyncio.sleep(0.2)
        raise RuntimeError(f"rogue member could not join: {last}")

    @property
    def cert_der(self) -> bytes:
        return pki.pem_to_der(self.ident.cert_pem)

    async def call(
        self, target: int, method: str, payload: bytes, timeout: float = 10.0
    ) -> tuple[str, bytes]:
        """("ok", answer) or ("error", message) -- never raises for a refusal."""
        assert self.transport is not None
        try:
            return "ok", await self.transport.rpc(target, method, payload, timeout)
        except RpcError as exc:
            return "error", str(exc).encode()

    async def attack(
        self, targets: list[int], victims: list[int], admin_token_id: str
    ) -> list[tuple[int, str, str]]:
        """Every hostile call on every target; returns (target, method, outcome) for those answered
        with success bytes (for the caller to judge)."""
        answered = []
        for target in targets:
            for method, payload in hostile_calls(
                self.node_id, victims, admin_token_id, self.join_token, self.cert_der
            ):
                kind, body = await self.call(target, method, payload)
                if kind == "ok":
                    answered.append((target, method, repr(body[:80])))
        return answered

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
            self.transport = None


def random_rogue_id(taken: set[int]) -> int:
    free = sorted(set(range(40, 64)) - taken)
    return secrets.choice(free)
