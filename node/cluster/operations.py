"""ClusterNode: membership operations, drain side effects, autopilot and the leader's reconcile loop.

Builds on ``ClusterService`` (state, proposing, reads) with what changes the cluster:
remove/promote/drain/resume, the join handler, autopilot, and the
node-local drain side effects (RAN notification, BGP speaker stop, leadership hand-off), which
every node runs for itself from the replicated registry, so they also run when a node comes
back after being drained while down.

Foresight: autopilot's reasons and promotion predictions, what-if, and the quorum guard
of member removal all come from ``quorumd.node.registry.autopilot``. Isolation fencing:
``fence_loop`` and ``_fence_check`` (see ``quorumd.node.cluster.fencing``) stop the speaker of a
node that has not heard from a quorum for ``isolation-fence-after``; every speaker change and RAN
event carries the fencing token of the log entry behind it.
Audit (written through ``quorumd.node.cluster.audit``): removals and promotions carry
their record in the ConfChange context (API calls as the token, autopilot's as the system), drains,
resumes and the deadline watch's completions an ``Audited`` entry, a join its ConfChange context
(system actor ``join``); a leadership transfer caused by a drain, a removal or a stop is recorded
through the new leader once it is known (``AuditWriter.record_transfer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from quorumd.api.errors import ApiError
from quorumd.api.ports import DrainState, TokenRole
from quorumd.node.cluster.addresses import AddressChanges
from quorumd.node.cluster.certificates import CertificateRotation
from quorumd.node.cluster.foresight import ForesightService
from quorumd.node.cluster.join import JoinHandler
from quorumd.node.cluster.service import pack, unpack
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.node.effects.ran import RanNotifier
from quorumd.node.effects.token import FencingToken, token_of
from quorumd.node.registry import apitoken
from quorumd.node.registry.audit import AuditAction, AuditNote, SystemComponent
from quorumd.node.registry.autopilot import AutopilotSettings, removal_refusal
from quorumd.node.registry.commands import (
    AllocateLease,
    CreateApiToken,
    ReleaseLease,
    RevokeApiToken,
    SetDrain,
)
from quorumd.node.registry.leases import Lease
from quorumd.node.registry.records import ApplyResult, Member
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)


class ClusterNode(AddressChanges, ForesightService):  # both ClusterServices
    def __init__(
        self,
        *args: Any,
        autopilot: AutopilotSettings,
        reconcile_interval_seconds: float,
        bgp: BgpSpeaker,
        bgp_enabled: bool,
        ran: RanNotifier,
        election_timeout_seconds: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, autopilot=autopilot, bgp=bgp, election_timeout_seconds=election_timeout_seconds, **kwargs
        )
        self.reconcile_interval = reconcile_interval_seconds
        self.bgp_enabled = bgp_enabled
        self.ran = ran
        self.election_timeout = election_timeout_seconds
        self.live_contact_seconds = election_timeout_seconds
        self._drain_effects_done = False  # RAN signalled and speaker stopped for the current drain
        self._side_effects: asyncio.Task[None] | None = None
        self._side_effects_again = False
        self._prefixes_dirty = True
        self._drain_token: FencingToken | None = None  # the entry that set this node's drain state
        self._drain_call_hands_off = False  # a drain call of this leader is handing off (it records)
        self.add_apply_listener(self._after_apply)
        self.joins = JoinHandler(self)
        self.certificates: CertificateRotation | None = None  # attached by the daemon

    async def rotate_certificate(self) -> dict[str, Any]:
        if self.certificates is None:
            raise ApiError(409, "feature_unavailable", "certificate rotation is not set up on this node")
        return await self.certificates.rotate()

    def _rejoined(self) -> None:
        self.kick_drain_side_effects()  # restarts the speaker if this node is active

    def extra_status(self) -> dict[str, Any]:
        return {
            "bgp": self.bgp.snapshot(),
            "ranNotifications": self.ran.recorded,
            "isolated": self.is_isolated(),
        }

    # --- apply hook ------------------------------------------------------------------------
    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        self._fence_guard()
        me = self.identity.node_id
        net: dict[str, bool] = {}  # prefix -> announced after this batch (True) or withdrawn
        entries = self.applying
        token: FencingToken | None = None  # of the last entry that changed this node's prefixes
        for i, r in enumerate(results):
            cmd = r.command
            if isinstance(cmd, AllocateLease | ReleaseLease):
                # The speaker follows lease changes by delta: one lease costs O(1) however many
                # this node holds (a full recompute per apply was O(leases) and dominated the
                # write path's CPU at a few thousand leases).
                # In log order, the last change of a prefix wins: a batch (a catch-up after a
                # partition) may allocate and release, or allocate and re-own, the same address.
                lease = r.value
                if r.error is None and isinstance(lease, Lease):
                    net[lease.prefix] = isinstance(cmd, AllocateLease) and lease.node_id == me
                    token = token_of(entries, i, token)
            elif isinstance(cmd, ConfChange):
                self._prefixes_dirty = True  # a removal purges leases: recompute once
                token = token_of(entries, i, token)
                if cmd.type == ConfChangeType.REMOVE and self._autopilot is not None:
                    self._autopilot.forget(cmd.node_id)  # see autopilot.py: clocks die with the member
            elif isinstance(cmd, SetDrain) and cmd.node_id == me and r.error is None:
                self._drain_token = token_of(entries, i, self._drain_token)
        if not results:  # snapshot restored
            self._prefixes_dirty = True
            token = self._drain_token = self.applied_token
        self._sync_campaign_suppression()
        if self._side_effects_pending():
            self.kick_drain_side_effects()
        if self._prefixes_dirty and self.bgp.running:
            self._prefixes_dirty = False
            self.bgp.set_prefixes(self.sm.announced_prefixes(me), canonical=True, token=token)
        elif net:
            self.bgp.update(
                [p for p, on in net.items() if on], [p for p, on in net.items() if not on], token=token
            )

    def _sync_campaign_suppression(self) -> None:
        """A draining or drained node does not seek leadership (cheap, so on every apply)."""
        m = self.sm.member(self.identity.node_id) if self.driver is not None else None
        if m is not None:
            self.running_driver.core.set_campaign_suppressed(m.drain_state != DrainState.ACTIVE)

    def _side_effects_pending(self) -> bool:
        """Whether this node's local side effects (speaker, RAN signal, drain confirmation) lag
        behind its drain state in the registry. Checked after every apply and on every reconcile
        tick, so the speaker also starts when the node's own record first appears (founder
        bootstrap, join, restart) and a node that returns drained acts once it has caught up.
        False while the replica is not ready: halfway through a log replay it may hold an old
        drain state (acting on it would signal the RANs for a drain that was since resumed)."""
        if self.driver is None or not self.is_ready():
            return False
        m = self.sm.member(self.identity.node_id)
        if m is None:
            return False
        if m.drain_state == DrainState.ACTIVE:
            fenced = self._fence.fenced
            return (self.bgp_enabled and not self.bgp.running and not fenced) or self._drain_effects_done
        return (
            not self._drain_effects_done
            or self.bgp.running
            or (m.drain_state == DrainState.DRAINING and m.drain_deadline is None)
        )

    def kick_drain_side_effects(self) -> None:
        """Bring this node's side effects in line with its registry record (idempotent).

        One task at a time; a kick while it runs makes it run once more, so a change that lands
        while a step is awaiting (RAN notification, leadership hand-off, drain confirmation) is
        never lost (e.g. a resume during the hand-off still restarts the speaker)."""
        if self.driver is None:
            return
        self._side_effects_again = True
        if self._side_effects is None or self._side_effects.done():
            self._side_effects = asyncio.get_running_loop().create_task(
                self._side_effects_loop(), name="drain-side-effects"
            )

    async def _side_effects_loop(self) -> None:
        attempts = 0
        while self._side_effects_again and attempts < 1000:
            self._side_effects_again = False
            attempts += 1
            try:
                await self._run_drain_side_effects()
            except asyncio.CancelledError:
                raise
            except Exception:  # never die silently: the next apply kicks again
                log.exception("drain_side_effects_failed node=%d", self.identity.node_id)
                return

    async def _run_drain_side_effects(self) -> None:
        me = self.identity.node_id
        m = self.sm.member(me)
        if m is None:
            return
        self._sync_campaign_suppression()
        if not self.is_ready():
            return  # see _side_effects_pending: the reconcile tick kicks again once caught up
        if m.drain_state == DrainState.ACTIVE:
            self._drain_effects_done = False
            self._fence_guard()
            if self.bgp_enabled and not self.bgp.running and not self._fence.fenced:
                # The desired set follows every apply by delta, stopped or not (_after_apply);
                # rebuild it from the lease table only when that chain is broken (first start, a
                # restored snapshot, a removal's purge). Rebuilding is O(leases): 300,000 prefix
                # strings stalled a resumed member's loop for ~0.4 s.
                if self._prefixes_dirty:
                    self.bgp.set_prefixes(self.sm.announced_prefixes(me), canonical=True)
                    self._prefixes_dirty = False
                self.bgp.start(token=self.applied_token)
            return
        # Once per drain (draining -> drained is the same drain: one RAN event, not two).
        if not self._drain_effects_done:
            log.info("drain_side_effects node=%d state=%s", me, m.drain_state)
            self._drain_effects_done = True
            # The RAN event carries the entry that set this drain.
            await self.ran.notify_guami_unavailable(
                me, "drain", token=self._drain_token or self.applied_token
            )
        if self.bgp.running:
            self.bgp.stop(token=self.applied_token)
        if self.is_leader():
            # Leadership moves first; "drained" is confirmed below through the new leader, like
            # any member's. Confirming it locally first cost the hand-off a round: the target
            # must hold every entry before TimeoutNow (measured: ~3 ms more until the new
            # leader served writes, for ~3 ms less on the drain call itself).
            new = await self.hand_off_leadership()
            if not self._drain_call_hands_off:  # else the drain call records it, as its caller
                await self.trail.record_transfer(me, new, "drain", None)
        # Synchronous drain: confirm to the leader until it records "drained".
        attempt = 0
        while True:
            m = self.sm.member(me)
            if m is None or m.drain_state != DrainState.DRAINING or m.drain_deadline is not None:
                return
            try:
                await self.announce(SetDrain(time.time(), me, DrainState.DRAINED, None))
                await self.wait_state(lambda: self._drain_state(me) != "draining", self.propose_timeout)
            except ApiError as exc:
                log.info("drain_confirm_retry node=%d error=%s", me, exc.code)
                attempt += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))

    # --- leadership ----------------------------------------------------------------------------
    async def hand_off_leadership(self) -> int:
        """Transfer leadership away from this node; returns the new leader (0 if none)."""
        me = self.identity.node_id
        target = self.best_transfer_target(exclude=me)
        if target == 0:
            log.warning("leader_transfer_skipped reason=no_eligible_voter")
            return 0
        log.info("leader_transfer_start from=%d to=%d", me, target)
        self.running_driver.step_now(lambda c: c.transfer_leadership(target))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.election_timeout * 2
        # Stepping down is not enough: wait until the new leader is known (the target's election
        # after TimeoutNow), else callers that need the new leader (remove of the leader) see 0.
        while (self.is_leader() or self.leader_id() in (0, me)) and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.running_driver.wait_leader_change(), deadline - loop.time())
        new = self.leader_id()
        log.info("leader_transfer_done new_leader=%d", new)
        return new if new != me else 0

    # --- NodeApi: membership operations ---------------------------------------------------
    def _need_member(self, node_id: int) -> Any:
        m = self.sm.member(node_id)
        if m is None:
            raise ApiError(404, "member_not_found", f"node {node_id} is not a member")
        return m

    async def remove_member(self, node_id: int, *, force: bool) -> None:
        m = self._need_member(node_id)
        if m.drain_state != DrainState.DRAINED and not force:
            raise ApiError(409, "not_drained", f"node {node_id} must be drained first (or use force=true)")
        config = self.running_driver.core.config
        if config.voters == frozenset({node_id}):
            raise ApiError(409, "last_voter", "cannot remove the last voter")
        refusal = removal_refusal(
            self.evaluate_autopilot(), node_id, transfer_contact_seconds=self.transfer_contact_seconds
        )
        if refusal is not None and not force:
            raise ApiError(
                409,
                "would_lose_quorum",
                f"removing node {node_id} would leave {refusal.healthy_voters} healthy voter(s) "
                f"for a quorum of {refusal.quorum} (use force=true to override)",
            )
        if force:
            log.warning(
                "audit member_remove_forced node_id=%d drain_state=%s would_lose_quorum=%s",
                node_id, m.drain_state, refusal is not None,
            )  # fmt: skip
        note = self.trail.request_note(AuditAction.MEMBER_REMOVE, f"node:{node_id}", {"force": force})
        if node_id == self.identity.node_id:
            new_leader = await self.hand_off_leadership()
            if new_leader == 0:
                raise ApiError(409, "last_voter", "no other healthy voter can take over leadership")
            await self.trail.record_transfer(node_id, new_leader, "remove", note)
            payload = pack([node_id] if note is None else [node_id, self.trail.context(b"", note)])
            try:
                await self.call_member(new_leader, "member.remove", payload, self.propose_timeout)
            except ApiError as exc:
                # The answer can be lost although the removal happened (the new leader applied it
                # and this node's connections closed): settle the outcome from the replicated log.
                if exc.status not in (502, 504) or not await self._removal_applied(node_id):
                    raise
            return
        context = self.trail.context(b"", note)
        res = await self.change_membership(ConfChange(ConfChangeType.REMOVE, node_id, context))
        if not res.ok:
            raise ApiError(409, res.error or "conflict", res.message)
        log.info("member_removed node_id=%d force=%s", node_id, force)

    async def _removal_applied(self, node_id: int) -> bool:
        """Whether the removal of ``node_id`` (this node, after handing leadership over) is known
        committed here: when the new leader's commit index reached this replica before it dropped
        this node. The new leader keeps this node's pin until its answer is written
        (``ClusterService.pin_kept``), so this is the fallback, not the rule; False: the error
        stands."""
        ok = await self.wait_state(
            lambda: not self.sm.has_member(node_id), max(self.election_timeout * 2, 1.0)
        )
        log.info("member_remove_answer_lost node_id=%d removed=%s", node_id, ok)
        return ok

    async def promote_member(self, node_id: int) -> None:
        self._need_member(node_id)
        core = self.running_driver.core
        if node_id in core.config.voters:
            raise ApiError(409, "already_voter", f"node {node_id} is already a voter")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(3.0, self.propose_timeout)
        while True:
            peer = next((p for p in core.status().peers if p.node_id == node_id), None)
            lag = core.last_index - (peer.match_index if peer else 0)
            if peer is not None and lag <= self.max_trailing_logs:
                break
            if loop.time() >= deadline:
                raise ApiError(409, "not_caught_up", f"node {node_id} is {lag} entries behind the leader")
            await asyncio.sleep(self.tick_seconds)  # polling the leader's progress view
        note = self.trail.request_note(AuditAction.MEMBER_PROMOTE, f"node:{node_id}")
        context = self.trail.context(b"", note)
        res = await self.change_membership(ConfChange(ConfChangeType.PROMOTE, node_id, context))
        if not res.ok:
            raise ApiError(409, res.error or "conflict", res.message)
        log.info("member_promoted node_id=%d", node_id)

    async def drain_member(self, node_id: int, *, deadline_seconds: int) -> DrainState:
        m = self._need_member(node_id)
        if m.drain_state == DrainState.DRAINED:
            return DrainState.DRAINED
        note = self.trail.request_note(
            AuditAction.MEMBER_DRAIN, f"node:{node_id}", {"deadlineSeconds": deadline_seconds}
        )
        try:
            return await self._drain(m, node_id, deadline_seconds, note)
        finally:
            self._drain_call_hands_off = False

    async def _drain(
        self, m: Member, node_id: int, deadline_seconds: int, note: AuditNote | None
    ) -> DrainState:
        handing_off = False
        if m.drain_state == DrainState.ACTIVE or deadline_seconds > 0 or m.drain_deadline is not None:
            deadline_ts = time.time() + deadline_seconds if deadline_seconds > 0 else None
            cmd = SetDrain(time.time(), node_id, DrainState.DRAINING, deadline_ts)
            then = self._transfer_after(node_id)
            handing_off = self._drain_call_hands_off = then is not None
            await self.trail.propose(cmd, note, then=then)
            log.info("member_draining node_id=%d deadline_seconds=%d", node_id, deadline_seconds)
        if deadline_seconds > 0:
            if handing_off:
                await self._wait_leadership_moved()
                await self.trail.record_transfer(node_id, self.leader_id(), "drain", note)
            return DrainState.DRAINING
        # Synchronous: the target runs its side effects and confirms through the leader.
        if node_id == self.identity.node_id:
            self.kick_drain_side_effects()
        ok = await self.wait_state(lambda: self._drain_state(node_id) == "drained", self.propose_timeout * 2)
        if not ok:
            raise ApiError(
                504,
                "drain_timeout",
                f"node {node_id} did not confirm its drain in time; state stays draining",
            )
        if node_id == self.identity.node_id:
            await self._wait_leadership_moved()
            await self.trail.record_transfer(
                node_id, self.leader_id(), "drain", note if handing_off else None
            )
        return DrainState.DRAINED

    def _transfer_after(self, node_id: int) -> Callable[[RaftCore], None] | None:
        """For a leader draining itself: start the hand-off right behind the "draining" entry.

        The target must hold that entry before TimeoutNow, which it does as soon as it acks it:
        that is the moment the entry commits, so the hand-off no longer waits for the commit to
        reach this node's apply, the side-effects task and a transfer call (measured ~1-1.5 ms).
        The new leader commits "draining" with its first entry; this node applies it then and
        runs its side effects as a follower. A transfer that fails (target gone) is aborted by
        the core after an election timeout, and the side effects hand off again."""
        if node_id != self.identity.node_id or not self.is_leader():
            return None
        target = self.best_transfer_target(exclude=node_id)
        if target == 0:
            return None
        log.info("leader_transfer_start from=%d to=%d with=draining", node_id, target)
        return lambda core: core.transfer_leadership(target)

    async def _wait_leadership_moved(self) -> None:
        """A drained leader answers its drain call once a new leader is known (bounded: when no
        voter can take over, it stays leader and says so in the registry and the logs)."""
        me = self.identity.node_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.election_timeout * 2
        while (self.is_leader() or self.leader_id() in (0, me)) and loop.time() < deadline:
            if self.is_leader() and self.best_transfer_target(exclude=me) == 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.running_driver.wait_leader_change(), deadline - loop.time())

    async def resume_member(self, node_id: int) -> None:
        m = self._need_member(node_id)
        if m.drain_state != DrainState.ACTIVE:
            note = self.trail.request_note(AuditAction.MEMBER_RESUME, f"node:{node_id}")
            await self.trail.propose(SetDrain(time.time(), node_id, DrainState.ACTIVE, None), note)
            log.info("member_resumed node_id=%d", node_id)

    # --- API tokens: visible on every live member once the call answers ----------------
    async def create_token(self, name: str, role: TokenRole, ttl_seconds: int | None) -> dict[str, Any]:
        token_id = apitoken.token_id_from_bytes(secrets.token_bytes(6))
        secret = secrets.token_bytes(32)
        now = time.time()
        expires = int(now + ttl_seconds) if ttl_seconds else None
        cmd = CreateApiToken(now, token_id, name, role, apitoken.hash_secret(secret), expires)
        detail = {"name": name, "role": str(role), "expiresAt": expires}
        res = await self.trail.propose_request(cmd, AuditAction.TOKEN_CREATE, f"token:{token_id}", detail)
        await self.applied_on_every_live_member(res.index, "token_create")
        tok = self.sm.api_token(token_id)
        return {
            "id": token_id,
            "name": tok.name if tok is not None else name,
            "role": str(role),
            "token": apitoken.format_api_token(token_id, secret),
            "expiresAt": expires,
        }

    async def revoke_token(self, token_id: str) -> None:
        cmd = RevokeApiToken(time.time(), token_id)
        res = await self.trail.propose_request(cmd, AuditAction.TOKEN_REVOKE, f"token:{token_id}")
        await self.applied_on_every_live_member(res.index, "token_revoke")

    async def applied_on_every_live_member(self, index: int, what: str) -> list[int]:
        """Wait until every live member has applied ``index`` (this leader has): a token change
        then holds on every node that serves the API once the call answers (revocation is
        immediate cluster-wide; a new token works everywhere at once).

        Live: every other member the leader heard from within ``live_contact_seconds`` (an
        election timeout). Each is asked over ``node.wait_applied``; one that does not confirm
        within the propose timeout is treated as down (logged at WARNING, returned): a member that
        is down cannot serve the token, and it applies the change before it serves again (a
        restarted node replays its log before its API listens). Returns the unconfirmed ids."""
        if self.driver is None or self._rpc is None or not self._cluster_enabled or not self.is_leader():
            return []
        me = self.identity.node_id
        limit_ticks = self.live_contact_seconds / self.tick_seconds
        live = [
            p.node_id
            for p in self.running_driver.core.status().peers
            if p.node_id != me and p.last_contact_ticks <= limit_ticks
        ]
        if not live:
            return []
        self.running_driver.flush_commit_broadcast()  # they learn the commit index now, not after the delay
        timeout = self.propose_timeout
        rpc = self._rpc
        answers = await asyncio.gather(
            *(rpc(nid, "node.wait_applied", pack([index, timeout]), timeout + 0.5) for nid in live),
            return_exceptions=True,
        )
        missing = []
        for nid, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
                missing.append(nid)
            elif not isinstance(answer, bytes) or int(unpack(answer)) < index:
                missing.append(nid)
        for nid in missing:
            log.warning("change_unconfirmed what=%s node=%d index=%d (treated as down)", what, nid, index)
        return missing

    # --- autopilot ---------------------------------------------------------------------------
    async def reconcile_loop(self) -> None:
        """Leader-only duties, every reconcile interval: drain deadlines, promotion, cleanup.
        On every node: catch up this node's own drain side effects (see _side_effects_pending)."""
        last_autopilot = 0.0
        loop = asyncio.get_running_loop()
        while True:
            # Wake at a predicted promotion (promotionAt) too, so it is kept to within the time
            # a promotion takes to commit, well inside the promised one reconcile interval.
            delay = min(self.reconcile_interval, 0.25)
            due = (
                self._last_view.next_promotion_at()
                if self._last_view is not None and self.is_leader()
                else None
            )
            if due is not None:
                delay = max(0.005, min(delay, due - time.time() + 0.002))
            await asyncio.sleep(delay)
            if self._side_effects_pending():
                self.kick_drain_side_effects()
            if not self.is_leader():
                continue
            try:
                await self._reconcile_drains()
                loop_now = loop.time()
                promotion_due = due is not None and time.time() >= due
                if promotion_due or loop_now - last_autopilot >= self.reconcile_interval:
                    last_autopilot = loop_now
                    await self._reconcile_autopilot()
                    await self._reconcile_protocol()
            except ApiError as exc:
                log.info("reconcile_deferred reason=%s", exc.code)

    async def _reconcile_drains(self) -> None:
        now = time.time()
        for m in self.sm.members():
            if m.drain_state != DrainState.DRAINING or m.drain_deadline is None:
                continue
            leases = self.sm.active_lease_count(m.node_id)
            if leases == 0 or now >= m.drain_deadline:
                reason = "leases_released" if leases == 0 else "deadline"
                note = self.trail.system_note(
                    SystemComponent.DRAIN, AuditAction.MEMBER_DRAINED, f"node:{m.node_id}", {"reason": reason}
                )
                await self.trail.propose(SetDrain(now, m.node_id, DrainState.DRAINED, None), note)
                log.info("member_drained node_id=%d reason=%s", m.node_id, reason)

    async def _reconcile_protocol(self) -> None:
        """Ask the members in contact what they speak; ratchet or record (see versions.py)."""
        threshold_ticks = max(1, int(self.election_timeout / self.tick_seconds))
        peers = self.running_driver.core.status().peers
        in_contact = [p.node_id for p in peers if p.last_contact_ticks <= threshold_ticks]
        await self.versions.learn(self._rpc, in_contact, recorded_too=True)
        await self.versions.reconcile(None, [p.node_id for p in peers], self.propose)

    async def _reconcile_autopilot(self) -> None:
        view = self.evaluate_autopilot()
        if self._autopilot is None:
            return
        decisions = self._autopilot.decide(
            view, time.time(), transfer_contact_seconds=self.transfer_contact_seconds
        )
        for nid in decisions.refused:
            log.warning("autopilot_cleanup_refused node_id=%d reason=would_lose_quorum", nid)
        for nid in decisions.promote:
            note = self.trail.system_note(
                SystemComponent.AUTOPILOT, AuditAction.AUTOPILOT_PROMOTE, f"node:{nid}"
            )
            context = self.trail.context(b"", note)
            res = await self.change_membership(ConfChange(ConfChangeType.PROMOTE, nid, context))
            log.info("autopilot_promoted node_id=%d ok=%s", nid, res.ok)
        for nid in decisions.remove:
            note = self.trail.system_note(
                SystemComponent.AUTOPILOT, AuditAction.AUTOPILOT_REMOVE, f"node:{nid}", {"reason": "failed"}
            )
            context = self.trail.context(b"", note)
            res = await self.change_membership(ConfChange(ConfChangeType.REMOVE, nid, context))
            log.warning("autopilot_removed_dead_server node_id=%d ok=%s", nid, res.ok)

    # --- join: node/cluster/join.py ------------------------------------------------------------
    async def handle_join(self, payload: bytes, client_cert_der: bytes) -> bytes:
        return await self.joins.handle(payload, client_cert_der)

    async def join_forwarded(
        self, from_id: int, token: str, node_id: int, ctx: bytes, der: bytes, protocol: int = 1
    ) -> bytes:
        return await self.joins.forwarded(from_id, token, node_id, ctx, der, protocol)
