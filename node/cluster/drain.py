"""DrainEffects: this node's side effects of its drain state, one part of ``ClusterNode``.

Every node runs them for itself from the replicated registry of its ``ClusterService``, so they
also run when a node comes back after being drained while down:

- the apply hook drives the BGP speaker: it follows every applied batch's lease changes by delta
  (in log order) and rebuilds the announced set only when that chain is broken (first start, a
  restored snapshot, a removal's purge), each change carrying the fencing token of the entry
  behind it;
- a draining or drained node does not campaign for leadership (``campaign suppression``);
- ``kick`` brings the speaker, the RAN notification and the drain confirmation in line with the
  node's record: an active node runs its speaker (unless fenced: ``IsolationGuard``); a draining
  one stops it, signals the RANs once per drain, hands leadership over if it leads (through the
  ``hand_off`` callback, ``ClusterNode.hand_off_leadership``) and confirms "drained" to the leader.

The node's drain call (``ClusterNode.drain_member``) sets ``drain_call_hands_off`` while it hands
leadership off itself: it then records the transfer, not the side effects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from quorumd.api.errors import ApiError
from quorumd.api.ports import DrainState
from quorumd.node.cluster.isolation import IsolationGuard
from quorumd.node.cluster.service import ClusterService
from quorumd.node.effects.bgp import BgpSpeaker
from quorumd.node.effects.ran import RanNotifier
from quorumd.node.effects.token import FencingToken, token_of
from quorumd.node.registry.commands import AllocateLease, ReleaseLease, SetDrain
from quorumd.node.registry.leases import Lease
from quorumd.node.registry.records import ApplyResult
from quorumd.raft.core.types import ConfChange

# The node's logger: these records keep the logger name they have always had (log filters key on it).
log = logging.getLogger("quorumd.node.cluster.operations")
_LEASE_CHANGES = (AllocateLease, ReleaseLease)  # a tuple: ``A | B`` would build a union per entry


class DrainEffects:
    """See the module docstring."""

    def __init__(
        self,
        service: ClusterService,
        isolation: IsolationGuard,
        *,
        bgp: BgpSpeaker,
        bgp_enabled: bool,
        ran: RanNotifier,
        hand_off: Callable[[], Awaitable[int]],
    ) -> None:
        self.service = service
        self.isolation = isolation
        self.bgp = bgp
        self.bgp_enabled = bgp_enabled
        self.ran = ran
        self._hand_off = hand_off
        self._done = False  # RAN signalled and speaker stopped for the current drain
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._prefixes_dirty = True
        self._next_lease_id = 0  # the state's next lease id after the last batch (0: not seen yet)
        self._drain_token: FencingToken | None = None  # the entry that set this node's drain state
        self.drain_call_hands_off = False  # a drain call of this leader is handing off (it records)
        service.add_apply_listener(self._after_apply)

    # --- apply hook ------------------------------------------------------------------------
    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        svc, bgp = self.service, self.bgp
        self.isolation.guard()
        me = svc.identity.node_id
        net: dict[str, bool] = {}  # prefix -> announced after this batch (True) or withdrawn
        entries = svc.applying
        token: FencingToken | None = None  # of the last entry that changed this node's prefixes
        # Leases with ids from ``created`` on were allocated in this batch; ``given`` holds those
        # of them this batch gave to this node (possibly taken away again later in the batch).
        created, given = self._next_lease_id, set[int]()
        for i, r in enumerate(results):
            cmd = r.command
            if isinstance(cmd, _LEASE_CHANGES):
                # The speaker follows lease changes by delta: one lease costs O(1) however many
                # this node holds (a full recompute per apply was O(leases) and dominated the
                # write path's CPU at a few thousand leases).
                # In log order, the last change of a prefix wins: a batch (a catch-up after a
                # partition) may allocate and release, or allocate and re-own, the same address.
                lease = r.value
                if r.error is None and isinstance(lease, Lease):
                    mine = isinstance(cmd, AllocateLease) and lease.node_id == me
                    if mine:
                        given.add(lease.lease_id)
                    elif lease.node_id != me and lease.lease_id >= created and lease.lease_id not in given:
                        # Allocated in this batch to another node and never this node's: nothing
                        # of it was ever announced here. Most leases of a cluster are another
                        # node's: their prefix text and withdrawal were most of this hook's cost.
                        continue
                    net[lease.prefix] = mine
                    token = token_of(entries, i, token)
            elif isinstance(cmd, ConfChange):
                self._prefixes_dirty = True  # a removal purges leases: recompute once
                token = token_of(entries, i, token)
            elif isinstance(cmd, SetDrain) and cmd.node_id == me and r.error is None:
                self._drain_token = token_of(entries, i, self._drain_token)
        self._next_lease_id = svc.sm.next_lease_id()
        if not results:  # snapshot restored
            self._prefixes_dirty = True
            token = self._drain_token = svc.applied_token
        self._sync_campaign_suppression()
        if self.pending():
            self.kick()
        if self._prefixes_dirty and bgp.running:
            self._prefixes_dirty = False
            bgp.set_prefixes(svc.sm.announced_prefixes(me), canonical=True, token=token)
        elif net:
            bgp.update(
                [p for p, on in net.items() if on], [p for p, on in net.items() if not on], token=token
            )

    def _sync_campaign_suppression(self) -> None:
        """A draining or drained node does not seek leadership (cheap, so on every apply)."""
        svc = self.service
        if svc.driver is None:
            return
        m = svc.sm.member(svc.identity.node_id)
        if m is not None:
            svc.driver.core.set_campaign_suppressed(m.drain_state != DrainState.ACTIVE)

    def pending(self) -> bool:
        """Whether this node's local side effects (speaker, RAN signal, drain confirmation) lag
        behind its drain state in the registry. Checked after every apply and on every reconcile
        tick, so the speaker also starts when the node's own record first appears (founder
        bootstrap, join, restart) and a node that returns drained acts once it has caught up.
        False while the replica is not ready: halfway through a log replay it may hold an old
        drain state (acting on it would signal the RANs for a drain that was since resumed)."""
        svc = self.service
        if svc.driver is None or not svc.is_ready():
            return False
        m = svc.sm.member(svc.identity.node_id)
        if m is None:
            return False
        if m.drain_state == DrainState.ACTIVE:
            fenced = self.isolation.is_isolated()
            return (self.bgp_enabled and not self.bgp.running and not fenced) or self._done
        return (
            not self._done
            or self.bgp.running
            or (m.drain_state == DrainState.DRAINING and m.drain_deadline is None)
        )

    def kick(self) -> None:
        """Bring this node's side effects in line with its registry record (idempotent).

        One task at a time; a kick while it runs makes it run once more, so a change that lands
        while a step is awaiting (RAN notification, leadership hand-off, drain confirmation) is
        never lost (e.g. a resume during the hand-off still restarts the speaker)."""
        if self.service.driver is None:
            return
        self._again = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="drain-side-effects")

    async def _loop(self) -> None:
        attempts = 0
        while self._again and attempts < 1000:
            self._again = False
            attempts += 1
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:  # never die silently: the next apply kicks again
                log.exception("drain_side_effects_failed node=%d", self.service.identity.node_id)
                return

    async def _run(self) -> None:
        svc, bgp = self.service, self.bgp
        me = svc.identity.node_id
        m = svc.sm.member(me)
        if m is None:
            return
        self._sync_campaign_suppression()
        if not svc.is_ready():
            return  # see pending: the reconcile tick kicks again once caught up
        if m.drain_state == DrainState.ACTIVE:
            self._done = False
            self.isolation.guard()
            if self.bgp_enabled and not bgp.running and not self.isolation.is_isolated():
                # The desired set follows every apply by delta, stopped or not (_after_apply);
                # rebuild it from the lease table only when that chain is broken (first start, a
                # restored snapshot, a removal's purge). Rebuilding is O(leases): 300,000 prefix
                # strings stalled a resumed member's loop for ~0.4 s.
                if self._prefixes_dirty:
                    bgp.set_prefixes(svc.sm.announced_prefixes(me), canonical=True)
                    self._prefixes_dirty = False
                bgp.start(token=svc.applied_token)
            return
        # Once per drain (draining -> drained is the same drain: one RAN event, not two).
        if not self._done:
            log.info("drain_side_effects node=%d state=%s", me, m.drain_state)
            self._done = True
            # The RAN event carries the entry that set this drain.
            await self.ran.notify_guami_unavailable(me, "drain", token=self._drain_token or svc.applied_token)
        if bgp.running:
            bgp.stop(token=svc.applied_token)
        if svc.is_leader():
            # Leadership moves first; "drained" is confirmed below through the new leader, like
            # any member's. Confirming it locally first cost the hand-off a round: the target
            # must hold every entry before TimeoutNow (measured: ~3 ms more until the new
            # leader served writes, for ~3 ms less on the drain call itself).
            new = await self._hand_off()
            if not self.drain_call_hands_off:  # else the drain call records it, as its caller
                await svc.trail.record_transfer(me, new, "drain", None)
        # Synchronous drain: confirm to the leader until it records "drained".
        attempt = 0
        while True:
            m = svc.sm.member(me)
            if m is None or m.drain_state != DrainState.DRAINING or m.drain_deadline is not None:
                return
            try:
                await svc.announce(SetDrain(time.time(), me, DrainState.DRAINED, None))
                await svc.wait_state(lambda: svc.drain_state_of(me) != "draining", svc.propose_timeout)
            except ApiError as exc:
                log.info("drain_confirm_retry node=%d error=%s", me, exc.code)
                attempt += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
