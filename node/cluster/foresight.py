"""Foresight: autopilot's live view, what-if and the leadership choice, one part of ``ClusterNode``.

The leader's ``Autopilot`` (``quorumd.node.registry.autopilot``) is fed from the Raft core's
progress view and the member registry of the ``ClusterService`` here; ``what_if`` and the removal
guard run the same pure model on the same view, and ``best_transfer_target`` (the drain's and a
stop's hand-off) uses the same rule as what-if's predicted leader. The part follows applied
entries itself: a certificate rotation keeps its member's incarnation (autopilot's clocks), a
removal drops the member's clocks. The reconcile loop that acts on the view (``decide``) is in
``operations.py``; the daemon tells the part when this node gains or loses leadership.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from quorumd.api.errors import ApiError
from quorumd.api.ports import DrainState
from quorumd.node.cluster.service import ClusterService
from quorumd.node.registry.autopilot import (
    Autopilot,
    AutopilotSettings,
    AutopilotView,
    Decisions,
    Scenario,
    ServerInput,
    TransferCandidate,
    transfer_target,
    what_if,
)
from quorumd.node.registry.commands import PinCertificate
from quorumd.node.registry.records import ApplyResult
from quorumd.raft.core.types import ConfChange, ConfChangeType

MAX_INCARNATION_ALIASES = 256  # past this, aliases of certificates no longer pinned are dropped


class Foresight:
    """See the module docstring. Reads the ``ClusterService`` (replica, Raft progress view)."""

    def __init__(
        self, service: ClusterService, settings: AutopilotSettings, *, election_timeout_seconds: float
    ) -> None:
        self.service = service
        self.autopilot_settings = settings
        self.election_timeout = election_timeout_seconds
        self._autopilot: Autopilot | None = None  # the leader's (clocks); None on a follower
        self._last_view: AutopilotView | None = None
        # A rotated certificate keeps its member's incarnation (autopilot's clocks): the next
        # certificate's fingerprint -> the incarnation of the one it replaces.
        self._incarnations: dict[str, str] = {}
        service.add_apply_listener(self._after_apply)

    def _after_apply(self, results: Sequence[ApplyResult]) -> None:
        sm = self.service.sm
        for r in results:
            cmd = r.command
            if r.ok and isinstance(cmd, PinCertificate):
                m = sm.member(cmd.node_id)
                if m is not None and m.next_cert_fingerprint is not None:
                    now = self._incarnations.get(m.cert_fingerprint, m.cert_fingerprint)
                    self._incarnations[m.next_cert_fingerprint] = now
            elif isinstance(cmd, ConfChange) and cmd.type == ConfChangeType.REMOVE:
                if self._autopilot is not None:  # see autopilot.py: clocks die with the member
                    self._autopilot.forget(cmd.node_id)
        if len(self._incarnations) > MAX_INCARNATION_ALIASES:  # forget rotations long done
            pinned = {fp for m in sm.members() for fp in (m.cert_fingerprint, m.next_cert_fingerprint)}
            self._incarnations = {k: v for k, v in self._incarnations.items() if k in pinned}

    def incarnation(self, cert_fingerprint: str) -> str:
        """A member's incarnation: the fingerprint it had before its rotations (this node saw)."""
        return self._incarnations.get(cert_fingerprint, cert_fingerprint)

    # --- leadership ----------------------------------------------------------------------------
    @property
    def transfer_contact_seconds(self) -> float:
        """How recently a voter must have been heard from to take leadership over."""
        tick = self.service.tick_seconds
        return max(1, int(self.election_timeout / tick)) * tick

    def best_transfer_target(self, exclude: int) -> int:
        """The most up-to-date healthy voter that is not draining (0 when none): the rule in
        ``autopilot.transfer_target``, which what-if's predicted leader uses too."""
        svc = self.service
        candidates = []
        for p in svc.running_driver.core.status().peers:
            mem = svc.sm.member(p.node_id)
            candidates.append(
                TransferCandidate(
                    node_id=p.node_id,
                    voter=p.voter,
                    drain_state=mem.drain_state if mem is not None else DrainState.DRAINED,
                    last_contact_seconds=p.last_contact_ticks * svc.tick_seconds,
                    match_index=p.match_index,
                )
            )
        return transfer_target(
            candidates,
            exclude=(exclude, svc.identity.node_id),
            contact_threshold_seconds=self.transfer_contact_seconds,
        )

    def on_leadership_change(self, is_leader: bool) -> None:
        # A new leader resumes autopilot with fresh stabilization clocks.
        self._autopilot = Autopilot(self.autopilot_settings) if is_leader else None

    # --- the API's views -----------------------------------------------------------------------
    async def autopilot(self) -> dict[str, Any]:
        return self.evaluate_autopilot().as_dict()

    async def what_if(
        self, *, remove: Sequence[int], fail: Sequence[int], drain: Sequence[int], promote: Sequence[int]
    ) -> dict[str, Any]:
        """GET /cluster/autopilot/what-if: the autopilot view run through
        ``autopilot.what_if``, the model the removal guard and the cleanup use. Changes nothing."""
        view = self.evaluate_autopilot()
        scenario = Scenario(frozenset(remove), frozenset(fail), frozenset(drain), frozenset(promote))
        for nid in sorted(scenario.node_ids()):
            if view.server(nid) is None or not self.service.sm.has_member(nid):
                raise ApiError(404, "member_not_found", f"node {nid} is not a member")
        return what_if(view, scenario, transfer_contact_seconds=self.transfer_contact_seconds).as_dict()

    # --- autopilot ---------------------------------------------------------------------------
    def evaluate_autopilot(self) -> AutopilotView:
        svc = self.service
        if not svc.is_leader():
            raise ApiError(503, "no_leader", "autopilot runs on the leader", headers={"Retry-After": "1"})
        if self._autopilot is None:
            self._autopilot = Autopilot(self.autopilot_settings)
        core = svc.running_driver.core
        st = core.status()
        servers = []
        for p in st.peers:
            mem = svc.sm.member(p.node_id)
            last_term = core.log.term(p.match_index) or 0 if p.node_id != core.node_id else core.term
            servers.append(
                ServerInput(
                    node_id=p.node_id,
                    raft_address=mem.raft_address if mem else "",
                    voter=p.voter,
                    is_leader=p.node_id == core.node_id,
                    last_contact_seconds=p.last_contact_ticks * svc.tick_seconds,
                    match_index=p.match_index,
                    last_term=core.term if p.recent_active or p.node_id == core.node_id else last_term,
                    left=bool(mem and mem.left),
                    drain_state=mem.drain_state if mem is not None else DrainState.ACTIVE,
                    incarnation=self.incarnation(mem.cert_fingerprint) if mem is not None else "",
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

    def decide(self, view: AutopilotView) -> Decisions | None:
        """What the leader's reconcile tick does about ``view`` (None: autopilot not running)."""
        if self._autopilot is None:
            return None
        contact = self.transfer_contact_seconds
        return self._autopilot.decide(view, time.time(), transfer_contact_seconds=contact)

    def next_promotion_at(self) -> float | None:
        """The earliest promotion the last view predicted (None: none, or no view yet)."""
        return self._last_view.next_promotion_at() if self._last_view is not None else None
