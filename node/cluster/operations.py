"""ClusterNode: membership operations, drain side effects, autopilot and the leader's reconcile loop.

Builds on ``ClusterService`` (state, proposing, reads) with what changes the cluster:
remove/promote/drain/resume (SPEC 5, 7), the join handler (SPEC 4), autopilot (SPEC 6), and the
node-local drain side effects (RAN notification, BGP speaker stop, leadership hand-off), which
every node runs for itself from the replicated registry, so they also run when a node comes
back after being drained while down.

Audit (SPEC 11, written through ``quorumd.node.cluster.audit``): removals and promotions carry
their record in the ConfChange context (API calls as the token, autopilot's as the system), drains,
resumes and the deadline watch's completions an ``Audited`` entry, a join its ConfChange context
(system actor ``join``); a leadership transfer caused by a drain, a removal or a stop is recorded
through the new leader once it is known (``AuditWriter.record_transfer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from quorumd.api.errors import ApiError
from quorumd.api.ports import DrainState
from quorumd.node.cluster import pki
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.node.effects.ran import RanNotifier
from quorumd.node.registry import jointoken
from quorumd.node.registry.audit import AuditAction, AuditNote, SystemComponent
from quorumd.node.registry.autopilot import Autopilot, AutopilotSettings, AutopilotView, ServerInput
from quorumd.node.registry.commands import AllocateLease, ReleaseLease, SetDrain, decode_member_context
from quorumd.node.registry.leases import Lease
from quorumd.node.registry.state import ApplyResult, Member
from quorumd.raft.core.node import RaftCore
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)


class ClusterNode(ClusterService):
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
        super().__init__(*args, **kwargs)
        self.autopilot_settings = autopilot
        self.reconcile_interval = reconcile_interval_seconds
        self.bgp = bgp
        self.bgp_enabled = bgp_enabled
        self.ran = ran
        self.election_timeout = election_timeout_seconds
        self._autopilot: Autopilot | None = None
        self._last_view: AutopilotView | None = None
        self._drain_effects_done = False  # RAN signalled and speaker stopped for the current drain
        self._side_effects: asyncio.Task[None] | None = None
        self._side_effects_again = False
        self._prefixes_dirty = True
        self._drain_call_hands_off = False  # a drain call of this leader is handing off (it records)
        self.add_apply_listener(self._after_apply)

    def extra_status(self) -> dict[str, Any]:
        return {"bgp": self.bgp.snapshot(), "ranNotifications": self.ran.recorded}

    # --- apply hook ------------------------------------------------------------------------
    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        me = self.identity.node_id
        add: list[str] = []
        withdraw: list[str] = []
        for r in results:
            cmd = r.command
            if isinstance(cmd, AllocateLease | ReleaseLease):
                # The speaker follows lease changes by delta: one lease costs O(1) however many
                # this node holds (a full recompute per apply was O(leases) and dominated the
                # write path's CPU at a few thousand leases).
                lease = r.value
                if r.error is None and isinstance(lease, Lease):
                    if isinstance(cmd, AllocateLease) and lease.node_id == me:
                        add.append(lease.prefix)
                    else:  # released, or re-owned by another node
                        withdraw.append(lease.prefix)
            elif isinstance(cmd, ConfChange):
                self._prefixes_dirty = True  # a removal purges leases: recompute once
        if not results:  # snapshot restored
            self._prefixes_dirty = True
        self._sync_campaign_suppression()
        if self._side_effects_pending():
            self.kick_drain_side_effects()
        if self._prefixes_dirty and self.bgp.running:
            self._prefixes_dirty = False
            self.bgp.set_prefixes(self.sm.announced_prefixes(me), canonical=True)
        elif add or withdraw:
            self.bgp.update(add, withdraw)

    def _sync_campaign_suppression(self) -> None:
        """A draining or drained node does not seek leadership (cheap, so on every apply)."""
        m = self.sm.member(self.identity.node_id) if self.driver is not None else None
        if m is not None:
            self.d.core.set_campaign_suppressed(m.drain_state != DrainState.ACTIVE)

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
            return (self.bgp_enabled and not self.bgp.running) or self._drain_effects_done
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
            if self.bgp_enabled and not self.bgp.running:
                # The desired set follows every apply by delta, stopped or not (_after_apply);
                # rebuild it from the lease table only when that chain is broken (first start, a
                # restored snapshot, a removal's purge). Rebuilding is O(leases): 300,000 prefix
                # strings stalled a resumed member's loop for ~0.4 s.
                if self._prefixes_dirty:
                    self.bgp.set_prefixes(self.sm.announced_prefixes(me), canonical=True)
                    self._prefixes_dirty = False
                self.bgp.start()
            return
        # Once per drain (draining -> drained is the same drain: one RAN event, not two).
        if not self._drain_effects_done:
            log.info("drain_side_effects node=%d state=%s", me, m.drain_state)
            self._drain_effects_done = True
            await self.ran.notify_guami_unavailable(me, "drain")
        if self.bgp.running:
            self.bgp.stop()
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
    def best_transfer_target(self, exclude: int) -> int:
        """The most up-to-date healthy voter that is not draining (0 when none)."""
        st = self.d.core.status()
        best, best_match = 0, -1
        threshold_ticks = max(1, int(self.election_timeout / self.tick_seconds))
        for p in st.peers:
            if p.node_id == exclude or not p.voter or p.node_id == self.identity.node_id:
                continue
            mem = self.sm.member(p.node_id)
            if mem is None or mem.drain_state != DrainState.ACTIVE:
                continue
            if p.last_contact_ticks > threshold_ticks:
                continue
            if p.match_index > best_match:
                best, best_match = p.node_id, p.match_index
        return best

    async def hand_off_leadership(self) -> int:
        """Transfer leadership away from this node; returns the new leader (0 if none)."""
        me = self.identity.node_id
        target = self.best_transfer_target(exclude=me)
        if target == 0:
            log.warning("leader_transfer_skipped reason=no_eligible_voter")
            return 0
        log.info("leader_transfer_start from=%d to=%d", me, target)
        self.d.step_now(lambda c: c.transfer_leadership(target))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.election_timeout * 2
        # Stepping down is not enough: wait until the new leader is known (the target's election
        # after TimeoutNow), else callers that need the new leader (remove of the leader) see 0.
        while (self.is_leader() or self.leader_id() in (0, me)) and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.d.wait_leader_change(), deadline - loop.time())
        new = self.leader_id()
        log.info("leader_transfer_done new_leader=%d", new)
        return new if new != me else 0

    # --- NodeApi: membership operations ---------------------------------------------------
    def _need_member(self, node_id: int) -> Any:
        m = self.sm.member(node_id)
        if m is None:
            raise ApiError(404, "member_not_found", f"node {node_id} is not a member")
        return m

    async def autopilot(self) -> dict[str, Any]:
        return self.evaluate_autopilot().as_dict()

    async def remove_member(self, node_id: int, *, force: bool) -> None:
        m = self._need_member(node_id)
        if m.drain_state != DrainState.DRAINED and not force:
            raise ApiError(409, "not_drained", f"node {node_id} must be drained first (or use force=true)")
        config = self.d.core.config
        if config.voters == frozenset({node_id}):
            raise ApiError(409, "last_voter", "cannot remove the last voter")
        note = self.trail.request_note(AuditAction.MEMBER_REMOVE, f"node:{node_id}", {"force": force})
        if node_id == self.identity.node_id:
            new_leader = await self.hand_off_leadership()
            if new_leader == 0:
                raise ApiError(409, "last_voter", "no other healthy voter can take over leadership")
            await self.trail.record_transfer(node_id, new_leader, "remove", note)
            payload = pack([node_id] if note is None else [node_id, self.trail.context(b"", note)])
            await self.call_member(new_leader, "member.remove", payload, self.propose_timeout)
            return
        context = self.trail.context(b"", note)
        res = await self.change_membership(ConfChange(ConfChangeType.REMOVE, node_id, context))
        if not res.ok:
            raise ApiError(409, res.error or "conflict", res.message)
        log.info("member_removed node_id=%d force=%s", node_id, force)

    async def rpc_member_remove(self, from_id: int, payload: bytes) -> bytes:
        node_id, *rest = unpack(payload)  # [id] or [id, audited context] (SPEC 11)
        if not self.is_leader():
            raise ApiError(503, "no_leader", "not the leader")
        context = bytes(rest[0]) if rest and from_id == int(node_id) else b""
        res = await self.change_membership(ConfChange(ConfChangeType.REMOVE, int(node_id), context))
        if not res.ok:
            raise ApiError(409, res.error or "conflict", res.message)
        log.info("member_removed node_id=%d by_request_of=%d", node_id, from_id)
        return pack(True)

    async def promote_member(self, node_id: int) -> None:
        self._need_member(node_id)
        core = self.d.core
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
                await asyncio.wait_for(self.d.wait_leader_change(), deadline - loop.time())

    async def resume_member(self, node_id: int) -> None:
        m = self._need_member(node_id)
        if m.drain_state != DrainState.ACTIVE:
            note = self.trail.request_note(AuditAction.MEMBER_RESUME, f"node:{node_id}")
            await self.trail.propose(SetDrain(time.time(), node_id, DrainState.ACTIVE, None), note)
            log.info("member_resumed node_id=%d", node_id)

    # --- autopilot ---------------------------------------------------------------------------
    def evaluate_autopilot(self) -> AutopilotView:
        if not self.is_leader():
            raise ApiError(503, "no_leader", "autopilot runs on the leader", headers={"Retry-After": "1"})
        if self._autopilot is None:
            self._autopilot = Autopilot(self.autopilot_settings)
        core = self.d.core
        st = core.status()
        servers = []
        for p in st.peers:
            mem = self.sm.member(p.node_id)
            last_term = core.log.term(p.match_index) or 0 if p.node_id != core.node_id else core.term
            servers.append(
                ServerInput(
                    node_id=p.node_id,
                    raft_address=mem.raft_address if mem else "",
                    voter=p.voter,
                    is_leader=p.node_id == core.node_id,
                    last_contact_seconds=p.last_contact_ticks * self.tick_seconds,
                    match_index=p.match_index,
                    last_term=core.term if p.recent_active or p.node_id == core.node_id else last_term,
                    left=bool(mem and mem.left),
                )
            )
        view = self._autopilot.evaluate(
            now=time.time(),
            leader_id=core.node_id,
            leader_term=core.term,
            leader_last_index=core.last_index,
            servers=servers,
        )
        self._last_view = view
        return view

    def on_leadership_change(self, is_leader: bool) -> None:
        # A new leader resumes autopilot with fresh stabilization clocks (SPEC 6).
        self._autopilot = Autopilot(self.autopilot_settings) if is_leader else None

    async def reconcile_loop(self) -> None:
        """Leader-only duties, every reconcile interval: drain deadlines, promotion, cleanup.
        On every node: catch up this node's own drain side effects (see _side_effects_pending)."""
        last_autopilot = 0.0
        while True:
            await asyncio.sleep(min(self.reconcile_interval, 0.25))
            if self._side_effects_pending():
                self.kick_drain_side_effects()
            if not self.is_leader():
                continue
            try:
                await self._reconcile_drains()
                loop_now = asyncio.get_running_loop().time()
                if loop_now - last_autopilot >= self.reconcile_interval:
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
        peers = self.d.core.status().peers
        in_contact = [p.node_id for p in peers if p.last_contact_ticks <= threshold_ticks]
        await self.versions.learn(self._rpc, in_contact, recorded_too=True)
        await self.versions.reconcile(None, [p.node_id for p in peers], self.propose)

    async def _reconcile_autopilot(self) -> None:
        view = self.evaluate_autopilot()
        draining = frozenset(m.node_id for m in self.sm.members() if m.drain_state != DrainState.ACTIVE)
        decisions = self._autopilot.decide(view, time.time(), draining=draining) if self._autopilot else None
        if decisions is None:
            return
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

    # --- join (SPEC 4) -----------------------------------------------------------------------
    async def handle_join(self, payload: bytes, client_cert_der: bytes) -> bytes:
        """The join bootstrap handler (any node; a follower forwards to the leader)."""
        try:
            req = unpack(payload)
            token, node_id = str(req["token"]), int(req["node_id"])
            ctx_bytes = bytes(req["context"])
            protocol = int(req.get("protocol_version", 1))  # absent: the baseline build (1)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._join_refused("malformed", f"bad join request: {exc}")
        if not self.is_leader():
            leader = self.leader_id()
            if leader == 0:
                return pack({"ok": False, "reason": "no_leader", "message": "no leader; retry"})
            try:
                return await self.call_member(
                    leader, "join.forward", pack([payload, client_cert_der]), self.propose_timeout * 2
                )
            except ApiError as exc:
                return pack({"ok": False, "reason": "no_leader", "message": exc.message})
        return await self._join_as_leader(token, node_id, ctx_bytes, client_cert_der, protocol)

    async def rpc_join_forward(self, from_id: int, payload: bytes) -> bytes:
        inner, der = unpack(payload)
        if not self.is_leader():
            return pack({"ok": False, "reason": "no_leader", "message": "not the leader"})
        req = unpack(bytes(inner))
        return await self._join_as_leader(
            str(req["token"]),
            int(req["node_id"]),
            bytes(req["context"]),
            bytes(der),
            int(req.get("protocol_version", 1)),
        )

    def _join_refused(self, reason: str, message: str) -> bytes:
        log.warning("join_refused reason=%s detail=%s", reason, message)
        if self.on_join_result:
            self.on_join_result("rejected")
        return pack({"ok": False, "reason": reason, "message": message})

    async def _join_as_leader(
        self, token: str, node_id: int, ctx_bytes: bytes, der: bytes, protocol: int = 1
    ) -> bytes:
        key, cluster_id = self.sm.join_key, self.sm.cluster_id
        if key is None or cluster_id is None:
            return pack({"ok": False, "reason": "no_leader", "message": "cluster not initialized"})
        try:
            claims = jointoken.verify_join_token(
                key, token, now=time.time(), cluster_id=cluster_id, node_id=node_id
            )
        except jointoken.JoinTokenError as exc:
            return self._join_refused(exc.reason, str(exc))
        member = self.sm.member(node_id)
        if member is not None and self.sm.is_join_token_consumed(claims.token_id):
            # The same joiner again (it died after the join committed, before it stored the
            # answer): its TLS-proven certificate is the one pinned for this node, so the join
            # is idempotent for it. Anyone else presenting the spent token is a replay.
            try:
                same = pki.fingerprint(der) == member.cert_fingerprint
            except Exception:  # a malformed certificate is never the member's
                same = False
            if same:
                log.info("join_repeated node_id=%d", node_id)
                members = [[m.node_id, m.raft_address, m.cert_fingerprint] for m in self.sm.members()]
                return pack({"ok": True, "cluster_id": cluster_id, "members": members})
        if self.sm.is_join_token_consumed(claims.token_id):
            return self._join_refused("replayed", "join token was already used")
        if self.sm.has_member(node_id):
            return self._join_refused("already_member", f"node {node_id} is already a member")
        try:
            ctx = decode_member_context(ctx_bytes)
            fp = pki.fingerprint(der)
            ident = pki.identity_of(der)
        except Exception as exc:  # any malformed context or certificate is a refusal
            return self._join_refused("bad_certificate", str(exc))
        if (
            fp != ctx.cert_fingerprint
            or ident != (node_id, cluster_id)
            or ctx.join_token_id != claims.token_id
        ):
            return self._join_refused("bad_certificate", "certificate does not match the joining node")
        async with self.versions.lock:  # no ratchet between this check and the join's commit
            too_old = self.versions.join_refusal(protocol)
            if too_old is not None:
                return self._join_refused("protocol_too_old", too_old)
            ctx_bytes = self.versions.joiner_context(ctx, ctx_bytes, protocol)
            note = self.trail.system_note(
                SystemComponent.JOIN,
                AuditAction.MEMBER_JOIN,
                f"node:{node_id}",
                {"raftAddress": ctx.raft_address, "protocolVersion": protocol},
            )
            ctx_bytes = self.trail.context(ctx_bytes, note)
            try:
                res = await self.change_membership(
                    ConfChange(ConfChangeType.ADD_NONVOTER, node_id, ctx_bytes)
                )
            except ApiError as exc:
                return pack({"ok": False, "reason": "retry", "message": exc.message})
        if not res.ok:
            return self._join_refused(res.error or "rejected", res.message)
        if self.on_join_result:
            self.on_join_result("consumed")
        log.info("join_accepted node_id=%d", node_id)
        members = [[m.node_id, m.raft_address, m.cert_fingerprint] for m in self.sm.members()]
        return pack({"ok": True, "cluster_id": cluster_id, "members": members})
