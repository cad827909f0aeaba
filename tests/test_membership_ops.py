"""Membership operations of a running node (``ClusterNode``) against a real Raft driver on disk.

One founder (node 1, the only voter, so it commits alone) with registered nonvoters whose frames go
nowhere: enough for the leader's side of promote, remove and address changes, and for the
interleavings of two operations at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from quorumd.api.errors import ApiError
from quorumd.node.cluster import pki
from quorumd.node.cluster.operations import ClusterNode
from quorumd.node.cluster.service import ClusterService, Identity, unpack
from quorumd.node.effects.bgp import StubBgpSpeaker
from quorumd.node.effects.ran import WebhookRanNotifier
from quorumd.node.registry.autopilot import AutopilotSettings
from quorumd.node.registry.commands import (
    MemberContext,
    SetClusterSecrets,
    SetMemberAddress,
    SetProtocolVersion,
    encode_member_context,
)
from quorumd.node.registry.jointoken import JoinClaims, mint_join_token
from quorumd.node.registry.state import StateMachine
from quorumd.raft.aio.driver import RaftDriver
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.ready import CoreConfig
from quorumd.raft.core.types import ConfChange, ConfChangeType, Role
from tests.test_state import ctx, fp

PROTOCOL = 3
CLUSTER = "0123456789abcdef0123456789abcdef"


class Founder:
    """Node 1 leading a one-voter cluster; ``add`` registers nonvoters that never answer."""

    def __init__(self, root: Path, *, service_tick: float = 0.01) -> None:
        storage, rec = LogStorage.open(root)
        hs, entries = RaftCore.bootstrap_entries(1, ctx(1))
        storage.append(entries)
        storage.set_hard_state(hs)
        storage.sync()
        storage.close()
        self.storage, rec = LogStorage.open(root)
        ident = Identity(1, CLUSTER, "0.1.0", "10.0.0.1:7000", "https://10.0.0.1:5002", fp(1), "pem")
        self.service = ClusterService(
            ident,
            StateMachine(),
            cluster_enabled=True,
            propose_timeout_seconds=3.0,
            tick_seconds=service_tick,
            max_trailing_logs=500,
        )
        self.node = ClusterNode(
            self.service,
            autopilot=AutopilotSettings(),
            reconcile_interval_seconds=1.0,
            bgp=StubBgpSpeaker(),
            bgp_enabled=True,
            ran=WebhookRanNotifier(None),
            election_timeout_seconds=0.1,
        )
        core = RaftCore(
            CoreConfig(node_id=1, election_ticks=10, heartbeat_ticks=2, trailing_logs=5),
            random.Random(1),
            hard_state=rec.hard_state,
            snapshot=rec.snapshot,
            entries=rec.entries,
        )
        self.driver = RaftDriver(
            core,
            self.storage,
            self.service,
            lambda _to, _frame: True,
            tick_seconds=0.01,
            snapshot_threshold=10_000,
        )
        self.service.driver = self.driver

    @property
    def core(self) -> RaftCore:
        return self.driver.core

    async def start(self, *nonvoters: int) -> None:
        self.driver.start()
        async with asyncio.timeout(5):
            while self.core.role != Role.LEADER:
                await self.driver.wait_leader_change()
        svc = self.service
        for nid in nonvoters:
            res = await svc.change_membership(ConfChange(ConfChangeType.ADD_NONVOTER, nid, ctx(nid)))
            assert res.ok, res.message
        versions = tuple((m.node_id, PROTOCOL) for m in svc.sm.members())
        await svc.propose(SetProtocolVersion(time.time(), PROTOCOL, versions))

    async def close(self) -> None:
        await self.driver.close()
        self.storage.close()

    def propose_when_applied(self, node_id: int, cc: ConfChange) -> None:
        """Append ``cc`` in the very apply that registers ``node_id``, before any waiting task runs
        again: another admin's change that lands while an operation is held back."""
        done = False

        def listener(_results: object) -> None:
            nonlocal done
            if not done and self.service.sm.has_member(node_id):
                done = True
                self.driver.step_now(lambda c: c.propose_conf_change(cc))

        self.service.add_apply_listener(listener)


@pytest_asyncio.fixture
async def founder(tmp_path: Path) -> AsyncIterator[Founder]:
    f = Founder(tmp_path / "n1")
    await f.start(2, 3, 4)
    try:
        yield f
    finally:
        await f.close()


# --- addresses ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_patches_cannot_give_two_members_one_cluster_address(founder: Founder) -> None:
    book = founder.node.addresses
    results = await asyncio.gather(
        book.set_member_address(2, raft_address="10.0.0.9:7000", api_address=None),
        book.set_member_address(3, raft_address="10.0.0.9:7000", api_address=None),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(refused) == 1 and refused[0].code == "address_in_use", results
    holders = [m.node_id for m in founder.service.sm.members() if m.raft_address == "10.0.0.9:7000"]
    assert len(holders) == 1, holders


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("recorded", "asked"),
    [
        ("[fd00::2]:7000", "[fd00:0:0::2]:7000"),  # one IPv6 address, two spellings
        ("[fd00::2]:7000", "[FD00::2]:7000"),
        ("node-2.example.internal:7000", "Node-2.Example.Internal:7000"),  # DNS names ignore case
    ],
)
async def test_address_in_use_whatever_the_spelling(founder: Founder, recorded: str, asked: str) -> None:
    svc = founder.service
    await svc.propose(SetMemberAddress(time.time(), 2, recorded, "https://10.0.0.2:5002"))
    with pytest.raises(ApiError) as exc:
        await founder.node.addresses.set_member_address(3, raft_address=asked, api_address=None)
    assert exc.value.status == 409 and exc.value.code == "address_in_use"
    m3 = svc.sm.member(3)
    assert m3 is not None and m3.raft_address == "10.0.0.3:7000"  # nothing changed


# --- promote and remove while another membership change is in flight ----------------------------


@pytest.mark.asyncio
async def test_a_promotion_never_brings_back_a_member_removed_meanwhile(tmp_path: Path) -> None:
    """The promotion waits behind an uncommitted change (a join); the member is removed before it
    may propose. It must find the member gone, not add it back as a voter nobody can reach."""
    f = Founder(tmp_path / "n1", service_tick=0.5)  # the retry pause of a waiting membership change
    await f.start(2, 3, 4)
    try:
        core = f.core
        f.propose_when_applied(5, ConfChange(ConfChangeType.REMOVE, 4))
        # A join is in flight (appended; the driver takes it up at its next tick, after the
        # promotion has looked and found it in the way).
        core.propose_conf_change(ConfChange(ConfChangeType.ADD_NONVOTER, 5, ctx(5)))
        promote = asyncio.ensure_future(f.node.promote_member(4))
        with pytest.raises(ApiError) as exc:
            await asyncio.wait_for(promote, 10.0)
        assert exc.value.code == "member_not_found", exc.value
        assert core.config.voters == frozenset({1}) and 4 not in core.config.members()
    finally:
        await f.close()


@pytest.mark.asyncio
async def test_a_spent_join_token_admits_nobody_after_a_removal(tmp_path: Path) -> None:
    """Two joiners present one token at once; the first is admitted and then removed while the
    second waits behind the removal. The second must be refused as a replay, not admitted with
    its own certificate on a consumed token."""
    f = Founder(tmp_path / "n1", service_tick=0.5)  # the retry pause of a waiting membership change
    await f.start(2, 3)
    try:
        svc, core = f.service, f.core
        key = b"k" * 32
        await svc.propose(SetClusterSecrets(time.time(), CLUSTER, key))
        claims = JoinClaims(5, CLUSTER, int(time.time()) + 600, b"t" * 16, fp(1), ("10.0.0.1:7000",))
        token = mint_join_token(key, claims)

        def join() -> asyncio.Future[bytes]:
            ident = pki.generate_node_identity(5, CLUSTER)
            context = MemberContext(
                "10.0.0.5:7000",
                "https://10.0.0.5:5002",
                "0.1.0",
                ident.fingerprint,
                ident.cert_pem.decode(),
                claims.token_id,
                time.time(),
            )
            der = pki.pem_to_der(ident.cert_pem)
            coro = f.node.joins.forwarded(2, token, 5, encode_member_context(context), der, PROTOCOL)
            return asyncio.ensure_future(coro)

        f.propose_when_applied(5, ConfChange(ConfChangeType.REMOVE, 5))
        first, second = join(), join()
        a, b = unpack(await asyncio.wait_for(first, 10.0)), unpack(await asyncio.wait_for(second, 10.0))
        assert a["ok"] is True
        assert b["ok"] is False and b["reason"] == "replayed", b
        assert 5 not in core.config.members() and not svc.sm.has_member(5)
    finally:
        await f.close()
