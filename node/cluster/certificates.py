"""Rotating this node's certificate through the log, and renewing it before it expires.

A node is trusted by the fingerprints the replicated state pins for it
(``quorumd.node.registry.certificates``). A rotation, run by the node itself (asked by an admin
through ``POST /cluster/members/{id}/rotate-certificate``, which the receiving node forwards to
it, or by its renewal loop), goes:

1. make a new key and certificate (``cluster.certificate-lifetime``) and write them beside the
   ones in use (``pki.IdentityFiles.write_next``), before anyone trusts them;
2. pin the new certificate beside the old one through the log (``PinCertificate``, proposed
   through the leader like every announcement of a node about itself);
3. wait until every member has applied that pin (``node.wait_applied``); a member that cannot
   confirm stops the rotation here (409 ``member_unreachable``, both pins stay valid): one that
   missed the pin could not reconnect to this node once it presents only the new certificate;
4. switch: the new pair becomes the one in use on disk (one rename), the listener presents it
   and every dial proves it; this node's own connections made with the old one are retired (no
   new use, closed once their calls are answered) and redialed;
5. unpin the old certificate through the log (``UnpinCertificate``, with the audit record
   ``certificate_rotate``). Each member then retires the connections it still has that were
   authenticated by the old certificate, again only once their calls are answered: no request
   fails on the way, and from then on the old key opens no cluster connection anywhere. The
   rotation answers once every member that answers has applied the unpin.

Every step is idempotent and the order keeps one invariant: the certificate this node uses is
pinned at every moment (it switches only to a pin it saw applied on every member, and unpins the
old one only after switching). A leader change or a crash anywhere leaves both pins valid; the
next rotation call, or this node's renewal loop (``run``), finishes what was started: it
unpins the old certificate when the switch happened, switches to a pinned next certificate it
has the key of, and otherwise pins a fresh one in place of a next certificate it cannot use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from quorumd.api.errors import ApiError
from quorumd.node.cluster import pki
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.registry import certificates
from quorumd.node.registry.audit import AuditAction, AuditNote, SystemComponent
from quorumd.node.registry.commands import (
    Audited,
    Command,
    PinCertificate,
    UnpinCertificate,
    encode_command,
)
from quorumd.node.registry.records import Member

log = logging.getLogger(__name__)

RENEW_CHECK_MAX_SECONDS = 60.0  # how often the renewal loop looks (less for a short renew-before)
SWITCH_DRAIN_SECONDS = 5.0  # bound on retiring this node's connections made with the old certificate
ANNOUNCE_ATTEMPTS = 5


class IdentitySwitch(Protocol):
    """What the rotation needs of the cluster transport (``ClusterTransport``)."""

    def set_identity(self, cert_pem: bytes, key_pem: bytes) -> str: ...

    def connections_closed(self, fingerprint: str) -> list[asyncio.Future[None]]: ...


def member_unreachable(nodes: list[int]) -> ApiError:
    ids = ", ".join(str(n) for n in nodes)
    return ApiError(
        409,
        "member_unreachable",
        f"node(s) {ids} did not confirm the new certificate pin; both certificates stay valid "
        "(bring the node(s) back or remove them, then rotate again to finish)",
    )


class CertificateRotation:
    """See the module docstring. One per node; ``transport`` is attached by the daemon."""

    def __init__(
        self, node: ClusterService, data_dir: Path, lifetime_seconds: float, renew_before_seconds: float
    ) -> None:
        self.node = node
        self.files = pki.IdentityFiles(data_dir)
        self.lifetime = lifetime_seconds
        self.renew_before = renew_before_seconds
        self.transport: IdentitySwitch | None = None
        self.on_identity: Callable[[str], None] | None = None  # the new certificate's PEM (metrics)
        self._lock = asyncio.Lock()

    # --- facts --------------------------------------------------------------------------------
    def expires_at(self) -> float | None:
        """notAfter (unix seconds) of the certificate this node uses."""
        return certificates.expires_at(self.node.identity.cert_pem)

    def describe(self) -> dict[str, Any]:
        ident = self.node.identity
        return {
            "certificateFingerprint": ident.fingerprint,
            "certificateExpiresAt": certificates.expires_at_rfc3339(ident.cert_pem),
        }

    # --- the rotation ---------------------------------------------------------------------------
    async def rotate(self) -> dict[str, Any]:
        """Rotate now (an admin's request: its audit record names the request's token)."""
        async with self._lock:
            await self._rotate(by_request=True)
        return self.describe()

    async def _rotate(self, *, by_request: bool) -> None:
        node = self.node
        me = node.identity.node_id
        node.versions.check(PinCertificate(0.0, me, ""))  # 409 feature_unavailable below protocol 3
        active = node.identity.fingerprint
        # This node only uses a certificate its replica saw pinned. A replica that does not pin it
        # is behind (after a restart, until the commit index is relearned): deciding on it could
        # pin a fresh certificate in place of the one in use. Wait until it has caught up.
        in_use = "the pin of the certificate it uses"
        await self._await_own(lambda m: active in certificates.fingerprints(m), in_use)
        member = self._member()
        if member.next_cert_fingerprint == active:  # switched already: only the unpin is left
            old, new = member.cert_fingerprint, active
        else:
            old = active
            pending = self.files.read_next()
            if pending is None or pki.fingerprint(pki.pem_to_der(pending[0])) != member.next_cert_fingerprint:
                ident = pki.generate_node_identity(me, self._cluster_id(), lifetime_seconds=self.lifetime)
                self.files.write_next(ident)  # durable before anyone trusts it
                pending = (ident.cert_pem, ident.key_pem)
                log.info("certificate_rotation_started node=%d old=%s new=%s", me, old, ident.fingerprint)
                await self._announce(PinCertificate(time.time(), me, ident.cert_pem.decode()))
            new = pki.fingerprint(pki.pem_to_der(pending[0]))
            await self._await_own(lambda m: new in certificates.fingerprints(m), "the new pin")
            await self._confirmed_everywhere()
            await self._switch(pending, old)
        unpin = UnpinCertificate(time.time(), me, old)
        await self._announce(unpin, self._note(old, new, by_request))
        await self._await_own(lambda m: certificates.fingerprints(m) == (new,), "the unpin")
        # answer once every live member shows the new pin alone (as a token change does)
        await self._confirmed_everywhere(required=False)
        log.info("certificate_rotated node=%d old=%s new=%s", me, old, new)

    async def _switch(self, pending: tuple[bytes, bytes], old: str) -> None:
        """Make ``pending`` the identity in use: on disk first (durable), then the transport."""
        cert_pem, key_pem = self.files.switch_to_next()
        assert cert_pem == pending[0]
        node = self.node
        fp = pki.fingerprint(pki.pem_to_der(cert_pem))
        node.identity = replace(node.identity, fingerprint=fp, cert_pem=cert_pem.decode())
        if self.transport is not None:
            self.transport.set_identity(cert_pem, key_pem)
            closing = self.transport.connections_closed(old)
            if closing:
                _done, pending_closes = await asyncio.wait(closing, timeout=SWITCH_DRAIN_SECONDS)
                if pending_closes:
                    log.warning("certificate_switch_slow_connections count=%d", len(pending_closes))
        if self.on_identity is not None:
            self.on_identity(node.identity.cert_pem)
        log.info("certificate_switched node=%d fingerprint=%s", node.identity.node_id, fp)

    # --- renewal and resumption -------------------------------------------------------------
    async def run(self) -> None:
        """Forever: finish a rotation left unfinished and renew the certificate before it expires
        (``cluster.certificate-renew-before``). Failures are logged and retried."""
        interval = min(RENEW_CHECK_MAX_SECONDS, max(0.5, self.renew_before / 4))
        while True:
            await asyncio.sleep(interval)  # a periodic check, not a synchronization
            try:
                await self.check()
            except ApiError as exc:
                log.warning("certificate_renewal_retry error=%s message=%s", exc.code, exc.message)
            except Exception:
                log.exception("certificate_renewal_failed")

    async def check(self) -> bool:
        """One look: True when it rotated (or finished a rotation)."""
        node = self.node
        if node.sm.cluster_protocol_version < 3 or not node.is_ready() or self._lock.locked():
            return False
        async with self._lock:
            member = node.sm.member(node.identity.node_id)
            if member is None:
                return False
            active = node.identity.fingerprint
            if member.next_cert_fingerprint is not None:
                log.info("certificate_rotation_resumed node=%d", member.node_id)
                await self._rotate(by_request=False)
                return True
            if member.cert_fingerprint != active:
                log.error("own_certificate_not_pinned node=%d fingerprint=%s", member.node_id, active)
                return False
            self.files.discard_next()  # written, never pinned (a rotation cut short)
            expires = self.expires_at()
            if expires is None or expires - time.time() > self.renew_before:
                return False
            log.info("certificate_renewal node=%d expires_at=%.0f", member.node_id, expires)
            await self._rotate(by_request=False)
            return True

    # --- helpers ------------------------------------------------------------------------------
    def _member(self) -> Member:
        m = self.node.sm.member(self.node.identity.node_id)
        if m is None:
            raise ApiError(409, "not_a_member", "this node is not a member of the cluster yet")
        return m

    def _cluster_id(self) -> str:
        return self.node.sm.cluster_id or self.node.identity.cluster_id

    def _note(self, old: str, new: str, by_request: bool) -> AuditNote | None:
        trail = self.node.trail
        target = f"node:{self.node.identity.node_id}"
        detail = {"from": old, "to": new}
        if by_request:
            return trail.request_note(AuditAction.CERTIFICATE_ROTATE, target, detail)
        return trail.system_note(SystemComponent.CERTIFICATES, AuditAction.CERTIFICATE_ROTATE, target, detail)

    async def _announce(self, cmd: Command, note: AuditNote | None = None) -> None:
        """Propose a command about this node through the leader, retried while there is none
        (the commands are idempotent, so a retry after a lost answer is harmless)."""
        node = self.node
        wrapped = cmd if note is None else Audited(cmd.ts, note, cmd)
        for attempt in range(ANNOUNCE_ATTEMPTS):
            try:
                if node.is_leader():
                    res = await node.propose(wrapped)
                    if not res.ok:
                        raise ApiError(409, res.error or "conflict", res.message)
                    return
                leader = node.leader_id()
                if leader == 0:
                    raise ApiError(503, "no_leader", "no leader is known")
                await node.call_member(leader, "node.propose", encode_command(wrapped), node.propose_timeout)
                return
            except ApiError as exc:
                if exc.status < 500 or attempt == ANNOUNCE_ATTEMPTS - 1:
                    raise
                log.info("certificate_announce_retry error=%s", exc.code)
                await asyncio.sleep(node.propose_timeout / 4)  # retry pacing (no leader yet): not a sync wait

    async def _await_own(self, pred: Callable[[Member], bool], what: str) -> None:
        node = self.node

        def holds() -> bool:
            m = node.sm.member(node.identity.node_id)
            return m is not None and pred(m)

        if not await node.wait_state(holds, node.propose_timeout * 2):
            raise ApiError(504, "commit_timeout", f"this node did not apply {what} in time")

    async def _confirmed_everywhere(self, *, required: bool = True) -> None:
        """Every other member has applied what this node has (the new pin among it). Not
        ``required`` (after the unpin): a member that does not confirm is only logged."""
        node = self.node
        me = node.identity.node_id
        index = node.applied_index()
        others = [m.node_id for m in node.sm.members() if m.node_id != me]
        timeout = node.propose_timeout

        async def confirmed(nid: int) -> bool:
            try:
                raw = await node.call_member(nid, "node.wait_applied", pack([index, timeout]), timeout + 1.0)
            except ApiError:
                return False
            return int(unpack(raw)) >= index

        answers: list[bool] = await asyncio.gather(*(confirmed(n) for n in others))
        missing = [n for n, ok in zip(others, answers, strict=True) if not ok]
        if missing and required:
            log.warning("certificate_pin_unconfirmed nodes=%s", missing)
            raise member_unreachable(missing)
        if missing:
            log.info("certificate_unpin_unconfirmed nodes=%s", missing)


__all__ = ["CertificateRotation", "IdentitySwitch", "member_unreachable"]
