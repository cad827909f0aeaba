"""Joining: the join bootstrap handler of every node and the leader's admission of a joiner.

A joiner connects on the join channel (any node; a follower relays to the leader over
``join.forward``). The leader verifies the join token itself (HMAC with the cluster's join key,
this cluster, the node id, expiry, single use), checks that the TLS-proven certificate is the
joiner's and matches its request, refuses a joiner whose protocol is older than the log's
recorded one, and adds it as a nonvoter. A joiner that died after its join committed may ask
again with the same token and certificate: the join is idempotent for it, a replay for anyone else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from quorumd.api.errors import ApiError
from quorumd.node.cluster import pki
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.registry import jointoken
from quorumd.node.registry.audit import AuditAction, SystemComponent
from quorumd.node.registry.commands import decode_member_context
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)


class JoinHandler:
    """``ClusterNode.joins``: the join channel's handler and ``join.forward``, over the service."""

    def __init__(self, service: ClusterService, settle: Callable[[], Awaitable[None]] | None = None) -> None:
        self.service = service
        # Waits until no membership change is in flight (``ClusterNode._settle_membership``): the
        # token and the id are judged again then, right before the join is proposed.
        self._settle = settle

    async def handle(self, payload: bytes, client_cert_der: bytes) -> bytes:
        """The join bootstrap handler (any node; a follower forwards to the leader)."""
        n = self.service
        try:
            req = unpack(payload)
            token, node_id = str(req["token"]), int(req["node_id"])
            ctx_bytes = bytes(req["context"])
            protocol = int(req.get("protocol_version", 1))  # absent: the baseline build (1)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._refused("malformed", f"bad join request: {exc}")
        if not n.is_leader():
            leader = n.leader_id()
            if leader == 0:
                return pack({"ok": False, "reason": "no_leader", "message": "no leader; retry"})
            try:
                return await n.call_member(
                    leader, "join.forward", pack([payload, client_cert_der]), n.propose_timeout * 2
                )
            except ApiError as exc:
                return pack({"ok": False, "reason": "no_leader", "message": exc.message})
        return await self._as_leader(token, node_id, ctx_bytes, client_cert_der, protocol)

    async def forwarded(
        self, from_id: int, token: str, node_id: int, ctx: bytes, der: bytes, protocol: int = 1
    ) -> bytes:
        """A join request relayed by member ``from_id`` (``join.forward``, node/cluster/rpcs.py)."""
        n = self.service
        if not n.is_leader():
            return pack({"ok": False, "reason": "no_leader", "message": "not the leader"})
        log.info("join_relayed node_id=%d via=%d", node_id, from_id)
        return await self._as_leader(token, node_id, ctx, der, protocol)

    def _refused(self, reason: str, message: str) -> bytes:
        n = self.service
        log.warning("join_refused reason=%s detail=%s", reason, message)
        if n.on_join_result:
            n.on_join_result("rejected")
        return pack({"ok": False, "reason": reason, "message": message})

    def _spent(self, token_id: bytes, node_id: int, der: bytes, cluster_id: str) -> bytes | None:
        """The answer when the token is spent or the id taken (None: neither)."""
        n = self.service
        member = n.sm.member(node_id)
        if member is not None and n.sm.is_join_token_consumed(token_id):
            # The same joiner again (it died after the join committed, before it stored the
            # answer): its TLS-proven certificate is the one pinned for this node, so the join
            # is idempotent for it. Anyone else presenting the spent token is a replay.
            try:
                same = pki.fingerprint(der) == member.cert_fingerprint
            except Exception:  # a malformed certificate is never the member's
                same = False
            if same:
                log.info("join_repeated node_id=%d", node_id)
                members = [[m.node_id, m.raft_address, m.cert_fingerprint] for m in n.sm.members()]
                return pack({"ok": True, "cluster_id": cluster_id, "members": members})
        if n.sm.is_join_token_consumed(token_id):
            return self._refused("replayed", "join token was already used")
        if n.sm.has_member(node_id):
            return self._refused("already_member", f"node {node_id} is already a member")
        return None

    async def _as_leader(
        self, token: str, node_id: int, ctx_bytes: bytes, der: bytes, protocol: int = 1
    ) -> bytes:
        n = self.service
        key, cluster_id = n.sm.join_key, n.sm.cluster_id
        if key is None or cluster_id is None:
            return pack({"ok": False, "reason": "no_leader", "message": "cluster not initialized"})
        try:
            claims = jointoken.verify_join_token(
                key, token, now=time.time(), cluster_id=cluster_id, node_id=node_id
            )
        except jointoken.JoinTokenError as exc:
            return self._refused(exc.reason, str(exc))
        spent = self._spent(claims.token_id, node_id, der, cluster_id)
        if spent is not None:
            return spent
        try:
            ctx = decode_member_context(ctx_bytes)
            fp = pki.fingerprint(der)
            ident = pki.identity_of(der)
        except Exception as exc:  # any malformed context or certificate is a refusal
            return self._refused("bad_certificate", str(exc))
        if (
            fp != ctx.cert_fingerprint
            or ident != (node_id, cluster_id)
            or ctx.join_token_id != claims.token_id
        ):
            return self._refused("bad_certificate", "certificate does not match the joining node")
        async with n.versions.lock:  # no ratchet between this check and the join's commit
            if self._settle is not None:
                # Judged again with no change in flight, and proposed with no await in between:
                # ``change_membership`` retries behind an uncommitted change without looking again
                # (the token spent and its member removed meanwhile would admit this one).
                await self._settle()
                spent = self._spent(claims.token_id, node_id, der, cluster_id)
                if spent is not None:
                    return spent
            too_old = n.versions.join_refusal(protocol)
            if too_old is not None:
                return self._refused("protocol_too_old", too_old)
            ctx_bytes = n.versions.joiner_context(ctx, ctx_bytes, protocol)
            note = n.trail.system_note(
                SystemComponent.JOIN,
                AuditAction.MEMBER_JOIN,
                f"node:{node_id}",
                {"raftAddress": ctx.raft_address, "protocolVersion": protocol},
            )
            ctx_bytes = n.trail.context(ctx_bytes, note)
            try:
                res = await n.change_membership(ConfChange(ConfChangeType.ADD_NONVOTER, node_id, ctx_bytes))
            except ApiError as exc:
                return pack({"ok": False, "reason": "retry", "message": exc.message})
        if not res.ok:
            return self._refused(res.error or "rejected", res.message)
        if n.on_join_result:
            n.on_join_result("consumed")
        log.info("join_accepted node_id=%d", node_id)
        members = [[m.node_id, m.raft_address, m.cert_fingerprint] for m in n.sm.members()]
        return pack({"ok": True, "cluster_id": cluster_id, "members": members})
