"""A model of a node rotating its certificate (``quorumd.node.cluster.certificates``) in a
cluster whose replicated state is the product's own ``StateMachine``.

The node is modeled step by step, each step one point where the real procedure awaits (and can
therefore be interleaved with anything else): deciding on its own replica's view, announcing a
pin or an unpin through the leader, waiting for its replica (and another member's) to apply it,
the switch on disk (``pki.IdentityFiles``: the rename to ``node.switch.pem``, then the rewrite of
``node.crt``/``node.key``), and the renewal loop's look (``CertificateRotation.check``).

Around it, the cluster as Raft makes it: a proposal handed to a leader is appended to its log
(``pending``) and either commits in that order or is lost with a leader change (a leader change
keeps a prefix of the uncommitted tail); a proposal sent to a deposed leader never commits; an
answer can be lost after the proposal was appended (the node then sends it again: a duplicate).
Replicas apply the committed log at their own pace: ``truth`` has applied all of it, ``mine`` is
this node's replica, ``peer`` another member's. A restart loses the rotation in progress, keeps
the disk (``load`` finishes an interrupted switch) and may set this node's replica back to any
earlier committed prefix (the commit index need not be durable, a restart relearns it).

The invariant, after every step: the member always has a pin, and the certificate the node uses,
and the one it would load after a crash now, are pinned in the committed state and on the other
member's replica.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quorumd.node.cluster.pki import NodeIdentity
from quorumd.node.registry import certificates
from quorumd.node.registry.audit import Actor, AuditAction, SystemComponent, note_of
from quorumd.node.registry.commands import Audited, PinCertificate, UnpinCertificate, encode_command
from quorumd.node.registry.records import Member
from tests.test_state import Harness

ACTIONS = (
    "rotate",  # an admin's request (CertificateRotation.rotate)
    "check",  # the renewal loop's look; arg even: the certificate is due for renewal
    "send",  # the announcement reaches the leader and the node gets its answer
    "send_lost",  # appended, but the answer is lost: the node sends it again
    "send_stale",  # a deposed leader takes it: it never commits
    "fail",  # the rotation gives up (a timeout, a member that cannot confirm, no leader)
    "advance",  # the rotation's wait ends if what it waits for holds
    "commit",  # the leader commits arg + 1 pending entries
    "leader_change",  # a new leader: only the first arg pending entries survive
    "apply_mine",  # this node's replica applies arg + 1 more committed entries
    "apply_peer",  # the other member's replica does
    "restart",  # a crash and a restart of this node
    "settle",  # a calm moment: everything pending commits and both replicas apply all of it
)


@dataclass
class Rotation:
    """A rotation in progress: its phase, the fingerprint it rotates away from, and the number of
    the identity it rotates to (None until it has decided)."""

    phase: str  # await_view, announce_pin, await_pin, switching, announce_unpin, await_unpin
    old: str = ""
    new: int | None = None


class RotatingNode:
    def __init__(
        self, cluster: Callable[[int], Harness], identity: Callable[[int], NodeIdentity], node_id: int
    ) -> None:
        self._cluster, self._identity, self.node_id = cluster, identity, node_id
        self.truth, self.mine, self.peer = cluster(3), cluster(3), cluster(3)
        self.base = self.truth.index
        self.committed: list[bytes] = []
        self.pending: list[bytes] = []  # the leader's uncommitted tail
        # the disk (pki.IdentityFiles), as identity numbers
        self.crt = 0  # node.crt / node.key
        self.next_file: int | None = None  # node.next.pem
        self.switch_file: int | None = None  # node.switch.pem
        self.active = 0  # what the transport presents
        self.rotation: Rotation | None = None
        self.made = 0  # identities generated so far
        self.ts = 1000.0

    # --- facts ----------------------------------------------------------------------------------
    def fp(self, n: int) -> str:
        return self._identity(n).fingerprint

    def member(self, h: Harness) -> Member:
        m = h.sm.member(self.node_id)
        assert m is not None
        return m

    def pins(self, h: Harness) -> tuple[str, ...]:
        return certificates.fingerprints(self.member(h))

    def applied(self, h: Harness) -> int:
        return h.index - self.base

    def check_invariant(self) -> None:
        m = self.member(self.truth)
        assert m.cert_fingerprint, "the member has no pin"
        on_disk = self.switch_file if self.switch_file is not None else self.crt
        for h in (self.truth, self.peer):
            assert self.fp(self.active) in self.pins(h), (self.active, self.pins(h))
            assert self.fp(on_disk) in self.pins(h), ("after a crash now", on_disk, self.pins(h))

    # --- the cluster ----------------------------------------------------------------------------
    def _tick(self) -> float:
        self.ts += 1.0
        return self.ts

    def _apply(self, h: Harness, count: int) -> None:
        for data in self.committed[self.applied(h) : self.applied(h) + count]:
            res = h.raw(data)
            assert res.ok, (res.error, res.message)  # never an attempt to unpin the only pin

    def _commit(self, count: int) -> None:
        while count and self.pending:
            self.committed.append(self.pending.pop(0))
            self._apply(self.truth, 1)
            count -= 1

    def _restart(self, arg: int) -> None:
        self.rotation = None
        if self.switch_file is not None:  # IdentityFiles.load finishes the switch
            self.crt, self.switch_file = self.switch_file, None
        self.active = self.crt
        keep = self.applied(self.mine) * arg // 3  # the replica relearns the commit index
        self.mine = self._cluster(3)
        self._apply(self.mine, keep)

    # --- the node -------------------------------------------------------------------------------
    def _begin(self) -> None:
        """``CertificateRotation._rotate`` up to its first wait."""
        self.rotation = Rotation("await_view")
        self._decide()

    def _decide(self) -> None:
        assert self.rotation is not None
        m, active = self.member(self.mine), self.fp(self.active)
        if active not in certificates.fingerprints(m):
            return  # the replica is behind what this node applied: wait for it
        if m.next_cert_fingerprint == active:  # switched already: only the unpin is left
            self.rotation = Rotation("announce_unpin", m.cert_fingerprint, self.active)
            return
        pending = self.next_file
        if pending is None or self.fp(pending) != m.next_cert_fingerprint:
            self.made += 1
            self.next_file = pending = self.made  # durable before anyone trusts it
            self.rotation = Rotation("announce_pin", active, pending)
        else:
            self.rotation = Rotation("await_pin", active, pending)

    def _check(self, renew: bool) -> None:
        """``CertificateRotation.check`` (its lock: nothing while a rotation runs)."""
        m = self.member(self.mine)
        if m.next_cert_fingerprint is not None:
            self._begin()
        elif m.cert_fingerprint == self.fp(self.active):
            self.next_file = None  # written, never pinned
            if renew:
                self._begin()

    def _announcement(self, rot: Rotation) -> bytes:
        assert rot.new is not None
        if rot.phase == "announce_pin":
            cert_pem = self._identity(rot.new).cert_pem.decode()
            return encode_command(PinCertificate(self._tick(), self.node_id, cert_pem))
        ts = self._tick()
        detail = {"from": rot.old, "to": self.fp(rot.new)}
        note = note_of(
            AuditAction.CERTIFICATE_ROTATE,
            f"node:{self.node_id}",
            Actor.system(SystemComponent.CERTIFICATES),
            detail,
        )
        return encode_command(Audited(ts, note, UnpinCertificate(ts, self.node_id, rot.old)))

    def _advance(self, rot: Rotation) -> None:
        if rot.phase == "await_view":
            self._decide()
        elif rot.phase == "await_pin":
            assert rot.new is not None
            seen = self.fp(rot.new) in self.pins(self.mine)
            confirmed = self.applied(self.peer) >= self.applied(self.mine)  # node.wait_applied
            if seen and confirmed:
                assert self.next_file == rot.new, "switching to another identity than the pinned one"
                self.switch_file, self.next_file = self.next_file, None  # the rename
                rot.phase = "switching"
        elif rot.phase == "switching":  # node.crt and node.key rewritten, the transport switched
            assert rot.new is not None
            self.crt, self.switch_file, self.active = rot.new, None, rot.new
            rot.phase = "announce_unpin"
        elif rot.phase == "await_unpin":
            assert rot.new is not None
            if self.pins(self.mine) == (self.fp(rot.new),):
                self.rotation = None

    def enabled(self) -> list[str]:
        """The actions that can change something now (a step picks among them)."""
        rot = self.rotation
        announcing = rot is not None and rot.phase in ("announce_pin", "announce_unpin")
        mine_behind = self.applied(self.mine) < len(self.committed)
        peer_behind = self.applied(self.peer) < len(self.committed)
        can = {
            "rotate": rot is None,
            "check": rot is None,
            "send": announcing,
            "send_lost": announcing,
            "send_stale": announcing,
            "fail": rot is not None and rot.phase != "switching",
            "advance": rot is not None,
            "commit": bool(self.pending),
            "leader_change": bool(self.pending),
            "apply_mine": mine_behind,
            "apply_peer": peer_behind,
            "restart": True,
            "settle": bool(self.pending) or mine_behind or peer_behind,
        }
        return [a for a in ACTIONS if can[a]]

    def step(self, action: str, arg: int) -> None:
        rot = self.rotation
        announcing = rot is not None and rot.phase in ("announce_pin", "announce_unpin")
        if action == "rotate" and rot is None:
            self._begin()
        elif action == "check" and rot is None:
            self._check(renew=arg % 2 == 0)
        elif action in ("send", "send_lost") and rot is not None and announcing:
            self.pending.append(self._announcement(rot))
            if action == "send":
                rot.phase = "await_pin" if rot.phase == "announce_pin" else "await_unpin"
        elif action == "send_stale":
            pass  # nothing reaches the log; the node sends it again or gives up
        elif action == "fail" and rot is not None and rot.phase != "switching":
            self.rotation = None  # the switch itself awaits nothing: it cannot give up halfway
        elif action == "advance" and rot is not None:
            self._advance(rot)
        elif action == "commit":
            self._commit(arg + 1)
        elif action == "leader_change":
            del self.pending[arg:]
        elif action == "apply_mine":
            self._apply(self.mine, arg + 1)
        elif action == "apply_peer":
            self._apply(self.peer, arg + 1)
        elif action == "restart":
            self._restart(arg)
        elif action == "settle":
            self._commit(len(self.pending))
            self._apply(self.mine, len(self.committed))
            self._apply(self.peer, len(self.committed))
