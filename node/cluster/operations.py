"""ClusterNode: the running node, composed of its parts; membership operations and reconcile loop.

``ClusterNode`` has no base class. It builds and holds the parts, wires them together with
constructor arguments and small callbacks, implements ``quorumd.api.ports.NodeApi`` (what the
HTTP layer calls; the reads are one-line delegations to the parts that own them) and is what the
daemon, the internal RPCs and the API are given. Who owns what:

- ``service`` (``ClusterService``, service.py): the replica. State machine, Raft driver, apply,
  proposals, membership changes, reads, forwarding, authentication; with it ``trail`` (the audit
  writer, audit.py), ``versions`` (protocol versions and the proposal gate, versions.py) and
  ``backups`` (GET /backup and ``backup.read``, backup.py), which this node exposes as they are.
- ``isolation`` (``IsolationGuard``, isolation.py): the isolation fence (``fence_loop``); it
  stops the BGP speaker of a node that has not heard from a quorum for ``isolation-fence-after``
  (see ``quorumd.node.cluster.fencing``) and kicks the drain side effects when the node rejoins.
- ``foresight`` (``Foresight``, foresight.py): autopilot's view and decisions, what-if, the quorum
  guard of member removal and the choice of a leadership transfer's target.
- ``drain`` (``DrainEffects``, drain.py): this node's side effects of its drain state, which
  every node runs for itself from the replicated registry (the BGP speaker following applied
  lease changes, the RAN notification, the leadership hand-off, the drain confirmation, campaign
  suppression); every speaker change and RAN event carries the fencing token of the entry behind it.
- ``addresses`` (``AddressBook``, addresses.py): dial hints, this node's own address, the
  ``member.address`` RPC and PATCH of a member's addresses.
- ``joins`` (``JoinHandler``, join.py) and ``certificates`` (``CertificateRotation``,
  certificates.py, attached by the daemon).

This module itself: remove/promote/drain/resume of members, API tokens, the leadership hand-off,
and the reconcile loop (the leader's drain deadlines, autopilot's promotions and cleanup, the
protocol ratchet; on every node, catching up its drain side effects).
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
from quorumd.api.ports import DrainState, ForwardedRequest, ForwardedResponse, Principal, TokenRole
from quorumd.node.cluster.addresses import AddressBook
from quorumd.node.cluster.certificates import CertificateRotation
from quorumd.node.cluster.drain import DrainEffects
from quorumd.node.cluster.foresight import Foresight
from quorumd.node.cluster.isolation import IsolationGuard
from quorumd.node.cluster.join import JoinHandler
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.node.effects.ran import RanNotifier
from quorumd.node.registry import apitoken
from quorumd.node.registry.audit import AuditAction, AuditNote, SystemComponent
from quorumd.node.registry.autopilot import AutopilotSettings, removal_refusal
from quorumd.node.registry.commands import CreateApiToken, RevokeApiToken, SetDrain
from quorumd.node.registry.records import Member
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)


class ClusterNode:
    """See the module docstring. ``service`` is built first (the daemon restores its state)."""

    def __init__(
        self,
        service: ClusterService,
        *,
        autopilot: AutopilotSettings,
        reconcile_interval_seconds: float,
        bgp: BgpSpeaker,
        bgp_enabled: bool,
        ran: RanNotifier,
        election_timeout_seconds: float,
        isolation_fence_after_seconds: float | None = None,
    ) -> None:
        self.service = service
        self.bgp = bgp
        self.ran = ran
        self.reconcile_interval = reconcile_interval_seconds
        self.election_timeout = election_timeout_seconds
        self.live_contact_seconds = election_timeout_seconds  # see applied_on_every_live_member
        self.trail = service.trail
        self.versions = service.versions
        self.backups = service.backups  # NodeApi.backups (quorumd.api.ports_backup)
        # The order of the apply listeners: the service's (versions), foresight's, the drain's.
        self.foresight = Foresight(service, autopilot, election_timeout_seconds=election_timeout_seconds)
        self.isolation = IsolationGuard(
            service,
            bgp,
            rejoined=lambda: self.drain.kick(),  # restarts the speaker if this node is active
            election_timeout_seconds=election_timeout_seconds,
            fence_after_seconds=isolation_fence_after_seconds,
        )
        self.drain = DrainEffects(
            service,
            self.isolation,
            bgp=bgp,
            bgp_enabled=bgp_enabled,
            ran=ran,
            hand_off=self.hand_off_leadership,  # a draining leader's hand-off
        )
        self.addresses = AddressBook(service)
        self.joins = JoinHandler(service, settle=self._settle_membership)
        self.certificates: CertificateRotation | None = None  # attached by the daemon

    # --- NodeApi: identity and routing (the service) -----------------------------------------
    @property
    def cluster_enabled(self) -> bool:
        return self.service.cluster_enabled

    def is_leader(self) -> bool:
        return self.service.is_leader()

    def leader_id(self) -> int:
        return self.service.leader_id()

    def applied_index(self) -> int:
        return self.service.applied_index()

    def authenticate(self, token: str) -> Principal | None:
        return self.service.authenticate(token)

    async def forward(
        self, request: ForwardedRequest, timeout_seconds: float, *, to: int | None = None
    ) -> ForwardedResponse:
        return await self.service.forward(request, timeout_seconds, to=to)

    async def wait_applied(self, index: int, timeout_seconds: float) -> None:
        await self.service.wait_applied(index, timeout_seconds)

    async def linearizable_barrier(self) -> None:
        await self.service.linearizable_barrier()

    def is_ready(self) -> bool:
        return self.service.is_ready()

    def is_isolated(self) -> bool:
        return self.isolation.is_isolated()

    # --- NodeApi: reads (the service's replica; /status adds this node's side effects) --------
    def status(self) -> dict[str, Any]:
        return {
            **self.service.status(),
            "bgp": self.bgp.snapshot(),
            "ranNotifications": self.ran.recorded,
            "isolated": self.isolation.is_isolated(),
        }

    def members(self) -> list[dict[str, Any]]:
        return self.service.members()

    def has_member(self, node_id: int) -> bool:
        return self.service.has_member(node_id)

    def tokens(self) -> list[dict[str, Any]]:
        return self.service.tokens()

    def pools(self) -> list[dict[str, Any]]:
        return self.service.pools()

    def pool(self, name: str) -> dict[str, Any]:
        return self.service.pool(name)

    def leases(
        self, *, node_id: int | None, pool: str | None, limit: int, after: int | None
    ) -> list[dict[str, Any]]:
        return self.service.leases(node_id=node_id, pool=pool, limit=limit, after=after)

    def audit(self, *, after: int | None, limit: int, action: str | None, actor: str | None) -> list[Any]:
        return self.service.audit(after=after, limit=limit, action=action, actor=actor)

    # --- NodeApi: leader operations of the other parts ---------------------------------------
    async def autopilot(self) -> dict[str, Any]:
        return await self.foresight.autopilot()

    async def what_if(
        self, *, remove: Sequence[int], fail: Sequence[int], drain: Sequence[int], promote: Sequence[int]
    ) -> dict[str, Any]:
        return await self.foresight.what_if(remove=remove, fail=fail, drain=drain, promote=promote)

    async def set_member_address(
        self, node_id: int, *, raft_address: str | None, api_address: str | None
    ) -> dict[str, Any]:
        return await self.addresses.set_member_address(
            node_id, raft_address=raft_address, api_address=api_address
        )

    async def mint_join_token(self, node_id: int, ttl_seconds: int | None) -> dict[str, Any]:
        return await self.service.mint_join_token(node_id, ttl_seconds)

    async def create_pool(self, name: str, cidr: str) -> dict[str, Any]:
        return await self.service.create_pool(name, cidr)

    async def delete_pool(self, name: str) -> None:
        await self.service.delete_pool(name)

    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        return await self.service.allocate_lease_reporting(pool, holder, node_id)

    async def release_lease(self, lease_id: int) -> None:
        await self.service.release_lease(lease_id)

    async def rotate_certificate(self) -> dict[str, Any]:
        if self.certificates is None:
            raise ApiError(409, "feature_unavailable", "certificate rotation is not set up on this node")
        return await self.certificates.rotate()

    # --- leadership ----------------------------------------------------------------------------
    async def hand_off_leadership(self) -> int:
        """Transfer leadership away from this node; returns the new leader (0 if none)."""
        svc = self.service
        me = svc.identity.node_id
        target = self.foresight.best_transfer_target(exclude=me)
        if target == 0:
            log.warning("leader_transfer_skipped reason=no_eligible_voter")
            return 0
        log.info("leader_transfer_start from=%d to=%d", me, target)
        svc.running_driver.step_now(lambda c: c.transfer_leadership(target))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.election_timeout * 2
        # Stepping down is not enough: wait until the new leader is known (the target's election
        # after TimeoutNow), else callers that need the new leader (remove of the leader) see 0.
        while (svc.is_leader() or svc.leader_id() in (0, me)) and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await svc.running_driver.wait_leader_change()
        new = svc.leader_id()
        log.info("leader_transfer_done new_leader=%d", new)
        return new if new != me else 0

    # --- NodeApi: membership operations ---------------------------------------------------
    def _need_member(self, node_id: int) -> Any:
        m = self.service.sm.member(node_id)
        if m is None:
            raise ApiError(404, "member_not_found", f"node {node_id} is not a member")
        return m

    async def remove_member(self, node_id: int, *, force: bool) -> None:
        svc = self.service
        m = self._need_member(node_id)
        if m.drain_state != DrainState.DRAINED and not force:
            raise ApiError(409, "not_drained", f"node {node_id} must be drained first (or use force=true)")
        config = svc.running_driver.core.config
        if config.voters == frozenset({node_id}):
            raise ApiError(409, "last_voter", "cannot remove the last voter")
        view = self.foresight.evaluate_autopilot()
        contact = self.foresight.transfer_contact_seconds
        refusal = removal_refusal(view, node_id, transfer_contact_seconds=contact)
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
        if node_id == svc.identity.node_id:
            new_leader = await self.hand_off_leadership()
            if new_leader == 0:
                raise ApiError(409, "last_voter", "no other healthy voter can take over leadership")
            await self.trail.record_transfer(node_id, new_leader, "remove", note)
            payload = pack([node_id] if note is None else [node_id, self.trail.context(b"", note)])
            try:
                await svc.call_member(new_leader, "member.remove", payload, svc.propose_timeout)
            except ApiError as exc:
                # The answer can be lost although the removal happened (the new leader applied it
                # and this node's connections closed): settle the outcome from the replicated log.
                if exc.status not in (502, 504) or not await self._removal_applied(node_id):
                    raise
            return
        context = self.trail.context(b"", note)
        res = await svc.change_membership(ConfChange(ConfChangeType.REMOVE, node_id, context))
        if not res.ok:
            raise ApiError(409, res.error or "conflict", res.message)
        log.info("member_removed node_id=%d force=%s", node_id, force)

    async def _removal_applied(self, node_id: int) -> bool:
        """Whether the removal of ``node_id`` (this node, after handing leadership over) is known
        committed here: when the new leader's commit index reached this replica before it dropped
        this node. The new leader keeps this node's pin until its answer is written
        (``ClusterService.pin_kept``), so this is the fallback, not the rule; False: the error
        stands."""
        svc = self.service
        ok = await svc.wait_state(lambda: not svc.sm.has_member(node_id), max(self.election_timeout * 2, 1.0))
        log.info("member_remove_answer_lost node_id=%d removed=%s", node_id, ok)
        return ok

    def _membership_settled(self) -> bool:
        """No membership change in flight: the last one appended is applied here, and this leader
        has committed an entry of its term (a change proposed now is not held back)."""
        core = self.service.running_driver.core
        return (
            core.pending_conf_index <= self.service.sm.applied_index
            and core.log.term(core.log.commit) == core.term
        )

    async def _settle_membership(self) -> None:
        """Wait (at most the propose timeout) until ``_membership_settled``. A check made then and
        the change proposed right after it, with no await between, judge the configuration the
        change applies to: ``change_membership`` retries a change held back by an uncommitted
        one after that one commits, without looking again (a PROMOTE of a member removed
        meanwhile would add it back as a voter with no registry entry and no pin)."""
        svc = self.service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + svc.propose_timeout
        while svc.is_leader() and not self._membership_settled():
            left = deadline - loop.time()
            if left <= 0 or not await svc.wait_state(self._membership_settled, left):
                return  # change_membership answers (commit_timeout, no_leader)

    async def promote_member(self, node_id: int) -> None:
        svc = self.service
        core = svc.running_driver.core
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(3.0, svc.propose_timeout)
        while True:
            await self._settle_membership()
            self._need_member(node_id)
            if node_id in core.config.voters:
                raise ApiError(409, "already_voter", f"node {node_id} is already a voter")
            peer = next((p for p in core.status().peers if p.node_id == node_id), None)
            lag = core.last_index - (peer.match_index if peer else 0)
            if peer is not None and lag <= svc.max_trailing_logs:
                break
            if loop.time() >= deadline:
                raise ApiError(409, "not_caught_up", f"node {node_id} is {lag} entries behind the leader")
            await asyncio.sleep(svc.tick_seconds)  # polling the leader's progress view
        note = self.trail.request_note(AuditAction.MEMBER_PROMOTE, f"node:{node_id}")
        context = self.trail.context(b"", note)
        res = await svc.change_membership(ConfChange(ConfChangeType.PROMOTE, node_id, context))
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
            self.drain.drain_call_hands_off = False

    async def _drain(
        self, m: Member, node_id: int, deadline_seconds: int, note: AuditNote | None
    ) -> DrainState:
        svc = self.service
        handing_off = False
        if m.drain_state == DrainState.ACTIVE or deadline_seconds > 0 or m.drain_deadline is not None:
            deadline_ts = time.time() + deadline_seconds if deadline_seconds > 0 else None
            cmd = SetDrain(time.time(), node_id, DrainState.DRAINING, deadline_ts)
            then = self._transfer_after(node_id)
            handing_off = self.drain.drain_call_hands_off = then is not None
            await self.trail.propose(cmd, note, then=then)
            log.info("member_draining node_id=%d deadline_seconds=%d", node_id, deadline_seconds)
        if deadline_seconds > 0:
            if handing_off:
                await self._wait_leadership_moved()
                self.trail.record_transfer_later(node_id, svc.leader_id(), "drain", note)
            return DrainState.DRAINING
        # Synchronous: the target runs its side effects and confirms through the leader.
        if node_id == svc.identity.node_id:
            self.drain.kick()
        ok = await svc.wait_state(lambda: svc.drain_state_of(node_id) == "drained", svc.propose_timeout * 2)
        if not ok:
            raise ApiError(
                504,
                "drain_timeout",
                f"node {node_id} did not confirm its drain in time; state stays draining",
            )
        if node_id == svc.identity.node_id:
            await self._wait_leadership_moved()
            self.trail.record_transfer_later(node_id, svc.leader_id(), "drain", note if handing_off else None)
        return DrainState.DRAINED

    def _transfer_after(self, node_id: int) -> Callable[[RaftCore], None] | None:
        """For a leader draining itself: start the hand-off right behind the "draining" entry.

        The target must hold that entry before TimeoutNow, which it does as soon as it acks it:
        that is the moment the entry commits, so the hand-off no longer waits for the commit to
        reach this node's apply, the side-effects task and a transfer call (measured ~1-1.5 ms).
        The new leader commits "draining" with its first entry; this node applies it then and
        runs its side effects as a follower. A transfer that fails (target gone) is aborted by
        the core after an election timeout, and the side effects hand off again."""
        svc = self.service
        if node_id != svc.identity.node_id or not svc.is_leader():
            return None
        target = self.foresight.best_transfer_target(exclude=node_id)
        if target == 0:
            return None
        log.info("leader_transfer_start from=%d to=%d with=draining", node_id, target)
        return lambda core: core.transfer_leadership(target)

    async def _wait_leadership_moved(self) -> None:
        """A drained leader answers its drain call once a new leader is known (bounded: when no
        voter can take over, it stays leader and says so in the registry and the logs)."""
        svc = self.service
        me = svc.identity.node_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.election_timeout * 2
        while (svc.is_leader() or svc.leader_id() in (0, me)) and loop.time() < deadline:
            if svc.is_leader() and self.foresight.best_transfer_target(exclude=me) == 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await svc.running_driver.wait_leader_change()

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
        tok = self.service.sm.api_token(token_id)
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
        svc = self.service
        if svc.driver is None or svc.rpc is None or not svc.cluster_enabled or not svc.is_leader():
            return []
        me = svc.identity.node_id
        limit_ticks = self.live_contact_seconds / svc.tick_seconds
        live = [
            p.node_id
            for p in svc.running_driver.core.status().peers
            if p.node_id != me and p.last_contact_ticks <= limit_ticks
        ]
        if not live:
            return []
        svc.running_driver.flush_commit_broadcast()  # they learn the commit index now, not later
        timeout = svc.propose_timeout
        rpc = svc.rpc
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
        On every node: catch up this node's own drain side effects (see ``DrainEffects.pending``)."""
        svc = self.service
        last_autopilot = 0.0
        loop = asyncio.get_running_loop()
        while True:
            # Wake at a predicted promotion (promotionAt) too, so it is kept to within the time
            # a promotion takes to commit, well inside the promised one reconcile interval.
            delay = min(self.reconcile_interval, 0.25)
            due = self.foresight.next_promotion_at() if svc.is_leader() else None
            if due is not None:
                delay = max(0.005, min(delay, due - time.time() + 0.002))
            await asyncio.sleep(delay)
            if self.drain.pending():
                self.drain.kick()
            if not svc.is_leader():
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
        svc = self.service
        now = time.time()
        for m in svc.sm.members():
            if m.drain_state != DrainState.DRAINING or m.drain_deadline is None:
                continue
            leases = svc.sm.active_lease_count(m.node_id)
            if leases == 0 or now >= m.drain_deadline:
                reason = "leases_released" if leases == 0 else "deadline"
                note = self.trail.system_note(
                    SystemComponent.DRAIN, AuditAction.MEMBER_DRAINED, f"node:{m.node_id}", {"reason": reason}
                )
                await self.trail.propose(SetDrain(now, m.node_id, DrainState.DRAINED, None), note)
                log.info("member_drained node_id=%d reason=%s", m.node_id, reason)

    async def _reconcile_protocol(self) -> None:
        """Ask the members in contact what they speak; ratchet or record (see versions.py)."""
        svc = self.service
        threshold_ticks = max(1, int(self.election_timeout / svc.tick_seconds))
        peers = svc.running_driver.core.status().peers
        in_contact = [p.node_id for p in peers if p.last_contact_ticks <= threshold_ticks]
        await self.versions.learn(svc.rpc, in_contact, recorded_too=True)
        await self.versions.reconcile(None, [p.node_id for p in peers], svc.propose)

    async def _reconcile_autopilot(self) -> None:
        svc = self.service
        decisions = self.foresight.decide(self.foresight.evaluate_autopilot())
        if decisions is None:
            return
        for nid in decisions.refused:
            log.warning("autopilot_cleanup_refused node_id=%d reason=would_lose_quorum", nid)
        for nid in decisions.promote:
            note = self.trail.system_note(
                SystemComponent.AUTOPILOT, AuditAction.AUTOPILOT_PROMOTE, f"node:{nid}"
            )
            context = self.trail.context(b"", note)
            res = await svc.change_membership(ConfChange(ConfChangeType.PROMOTE, nid, context))
            log.info("autopilot_promoted node_id=%d ok=%s", nid, res.ok)
        for nid in decisions.remove:
            note = self.trail.system_note(
                SystemComponent.AUTOPILOT, AuditAction.AUTOPILOT_REMOVE, f"node:{nid}", {"reason": "failed"}
            )
            context = self.trail.context(b"", note)
            res = await svc.change_membership(ConfChange(ConfChangeType.REMOVE, nid, context))
            log.warning("autopilot_removed_dead_server node_id=%d ok=%s", nid, res.ok)
