"""The internal RPCs served on the cluster port, and who may call them (one place for the rule).

Only members reach these handlers: the transport admits a connection only when its certificate is
pinned in the replicated state, and passes each handler the node id that certificate proves
(``from_id``). Membership alone confers no authority over the cluster: a node that joined as a
nonvoter with nothing but a join token must not be able to remove, drain or promote anyone, mint
tokens or change pools. So every RPC is one of two kinds:

* it carries the authority of an API request: the client's bearer token travels with the request
  and the receiving leader checks it against its own replica, exactly as for a direct call; or
* it lets the caller act on itself only (its own departure, drain confirmation, registry record),
  or changes nothing.

Per RPC (``from_id``: the caller's certificate-proven node id):

``api.forward`` -- any member. Runs one API request a follower received, with that client's
    token, through the same pipeline as a direct request (authentication, role, validation). No
    token or a bad token: 401, nothing runs. Forwarded once at most (``hops``): a non-leader
    answers 503. Failed tokens it relays are counted by the failed-authentication limiter under
    ``member:<from_id>``, like a client address.
``node.propose`` -- any member, about itself only: ``RegisterNodeInfo`` (its own API address and
    binary version), ``MarkNodeLeft`` (its own graceful-stop flag), ``SetDrain`` from
    ``draining`` to ``drained`` with no deadline, only while the registry has it draining without
    a deadline (the confirmation of a synchronous drain an admin started), and ``RecordAudit`` of
    its own events only (a backup it served, a leadership transfer away from itself), and its own
    certificate rotation: ``PinCertificate`` (its next certificate; the state machine checks that
    the certificate names it) and ``UnpinCertificate`` (one of its own pins, never its only one),
    the unpin with the audit record ``certificate_rotate`` of that very rotation. Any other
    command, or one naming another node: refused (403), nothing proposed.
``member.remove`` -- any member, to remove itself only (the payload's node id must be
    ``from_id``). Used by a leader that was asked, through the API, to remove itself: it hands
    leadership over and asks the new leader to remove it; the admin's request was authorized on
    the old leader, whose record of it (the audit note of this removal, and nothing else) may ride
    along. Asking to remove any other node: refused (403). While it answers, the new
    leader keeps the caller's pin, so the answer is delivered before the connection closes.
``node.wait_applied`` -- any member. Waits (at most ``WAIT_APPLIED_MAX_SECONDS``) until this node
    has applied a given index and answers its applied index. Changes nothing. A leader uses it
    to make a token revocation (or creation) visible on every live member before it answers.
``join.forward`` -- any member. Relays a join request (and the joiner's certificate, whose key
    the relaying member's transport saw proven) to the leader, which verifies the join token
    itself: HMAC with the cluster's join key, this cluster, the node id, expiry, single use, and
    that the certificate carries the node id and matches the token's request. Without a valid
    unused join token minted by an admin, nothing changes. The joiner's protocol version travels
    with it (a joiner older than the log's recorded protocol is refused).
``node.info`` -- any member. Answers this node's protocol and binary versions; changes nothing.
    (A build that does not serve it is protocol 1.)
``member.address`` -- any member, about itself only: announces the cluster and API addresses it
    now listens on after a restart elsewhere; the payload's node id must be ``from_id``
    (refused otherwise, nothing changes). The leader validates the addresses as the config keys
    are validated and records them through the log; other members answer with the leader's id
    and address, and dial the caller at the announced address (a local hint, still pin-checked).
``backup.read`` -- any member, with the authority of the API request that made the archive. A
    leader answers a forwarded ``GET /api/v1/backup`` (authorized as above: an admin token) with a
    handle instead of the body and keeps the archive for the forwarding member only; that member
    pulls it in chunks, each read carrying the client's token, which the leader checks against
    its replica every time (an admin token with the token id of the request). Another member, an
    unknown or dropped archive, a token that is not that admin token: refused (the archive is
    dropped on a wrong token). Changes nothing but the leader's held archives (node/cluster/backup.py).

The join channel (a different ALPN on the same port) is the only one open to non-members: the
joiner proves possession of its key and presents a join token, checked as for ``join.forward``.
Raft messages travel on their own channel, also only from pinned members.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from quorumd.api.errors import ApiError
from quorumd.api.ports import DrainState, ForwardedRequest, ForwardedResponse
from quorumd.node.cluster.addresses import ADDRESS_RPC
from quorumd.node.cluster.audit import own_event
from quorumd.node.cluster.backup import READ_RPC
from quorumd.node.cluster.operations import ClusterNode
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.registry.audit import AuditAction
from quorumd.node.registry.commands import (
    Audited,
    MarkNodeLeft,
    PinCertificate,
    RecordAudit,
    RegisterNodeInfo,
    SetDrain,
    UnpinCertificate,
    decode_command,
)
from quorumd.node.registry.context import split_audited_context
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)

WAIT_APPLIED_MAX_SECONDS = 5.0
RpcHandler = Callable[[int, bytes], Awaitable[bytes]]


class RpcRegistrar(Protocol):
    def register_rpc(self, method: str, handler: RpcHandler) -> None: ...
    def register_join_handler(self, handler: Callable[[bytes, bytes], Awaitable[bytes]]) -> None: ...


ForwardDispatch = Callable[[ForwardedRequest, str], Awaitable[ForwardedResponse]]


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


_OWN_FACTS = (RegisterNodeInfo, MarkNodeLeft, SetDrain, PinCertificate, UnpinCertificate)


def _own_rotation(cmd: object, from_id: int) -> object:
    """An unpin with the record of the member's own rotation: the unpin alone (checked like any
    own fact); anything else audited: unchanged (refused below)."""
    if (
        isinstance(cmd, Audited)
        and isinstance(cmd.command, UnpinCertificate)
        and cmd.note.action == AuditAction.CERTIFICATE_ROTATE
        and cmd.note.target == f"node:{from_id}"
    ):
        return cmd.command
    return cmd


async def node_propose(node: ClusterService, from_id: int, payload: bytes) -> bytes:
    """``node.propose``: a member announces a fact about itself (see the module docstring)."""
    try:
        cmd = decode_command(payload)
    except Exception as exc:  # any undecodable payload is a refusal, never a crash
        raise ApiError(400, "bad_request", "undecodable command") from exc
    fact = _own_rotation(cmd, from_id)
    own = isinstance(fact, _OWN_FACTS) and fact.node_id == from_id
    if not own and not (isinstance(cmd, RecordAudit) and own_event(cmd.note, from_id)):
        name = type(cmd).__name__
        log.warning("internal_rpc_refused method=node.propose node=%d command=%s", from_id, name)
        raise forbidden("members may only announce their own state")
    if isinstance(cmd, SetDrain):
        if cmd.state != DrainState.DRAINED or cmd.deadline_ts is not None:
            log.warning("internal_rpc_refused method=node.propose node=%d command=SetDrain", from_id)
            raise forbidden("a member may only confirm its own synchronous drain")
        m = node.sm.member(from_id)
        if (m is None or m.drain_state != DrainState.DRAINING) and node.is_leader():
            # A leader that just took over (a drained leader's hand-off) may not have applied
            # the member's "draining" yet: it was committed in the previous term and is only
            # known committed here once this term's first entry commits. Judge on the full
            # state, else the confirmation is refused and the drain waits out a timeout.
            await node.linearizable_barrier()
            m = node.sm.member(from_id)
        # drain confirmation: only draining (no deadline) -> drained
        if m is None or m.drain_state != DrainState.DRAINING or m.drain_deadline is not None:
            return pack(False)
    if not node.is_leader():
        raise ApiError(503, "no_leader", "not the leader")
    await node.propose(cmd)
    # The caller waits until its own replica applies this: send the commit index now rather
    # than after the lazy-broadcast delay (as the api.forward handler does).
    node.running_driver.flush_commit_broadcast()
    return pack(True)


async def member_remove(node: ClusterService, from_id: int, payload: bytes) -> bytes:
    """``member.remove``: the caller asks the leader to remove the caller itself."""
    try:
        node_id, *rest = unpack(payload)  # [id], or [id, the audited context of the removal]
        node_id = int(node_id)
        context = bytes(rest[0]) if rest else b""
        if len(rest) > 1:
            raise ValueError("too many fields")
    except Exception as exc:
        raise ApiError(400, "bad_request", "member.remove takes [node_id] or [node_id, context]") from exc
    if node_id != from_id:
        log.warning("internal_rpc_refused method=member.remove node=%d target=%s", from_id, node_id)
        raise forbidden("a member may only ask to remove itself")
    if context:  # only the record of this very removal: nothing else rides along
        try:
            inner, _ts, note = split_audited_context(context)
        except Exception as exc:
            raise ApiError(400, "bad_request", "member.remove: malformed audited context") from exc
        this_removal = note is not None and note.action == AuditAction.MEMBER_REMOVE
        if inner or not this_removal or note is None or note.target != f"node:{from_id}":
            log.warning("internal_rpc_refused method=member.remove node=%d reason=audit_note", from_id)
            raise forbidden("the record of a removal must be this member's removal")
    if not node.is_leader():
        raise ApiError(503, "no_leader", "not the leader")
    with node.pin_kept(from_id):  # the answer goes out before the caller's connections close
        res = await node.change_membership(ConfChange(ConfChangeType.REMOVE, node_id, context))
    if not res.ok:
        raise ApiError(409, res.error or "conflict", res.message)
    log.info("member_removed node_id=%d by_request_of=%d", node_id, from_id)
    return pack(True)


async def wait_applied(node: ClusterService, from_id: int, payload: bytes) -> bytes:
    """``node.wait_applied``: answer once this node has applied ``index`` (bounded)."""
    try:
        index, timeout = unpack(payload)
        index, timeout = int(index), float(timeout)
    except Exception as exc:
        raise ApiError(400, "bad_request", "node.wait_applied takes [index, timeout]") from exc
    if not timeout >= 0:  # also NaN
        raise ApiError(400, "bad_request", "bad timeout")
    timeout = min(timeout, WAIT_APPLIED_MAX_SECONDS)
    await node.wait_state(lambda: node.sm.applied_index >= index, timeout)
    return pack(node.sm.applied_index)


def _api_errors_as_remote(fn: RpcHandler) -> RpcHandler:
    async def handler(from_id: int, payload: bytes) -> bytes:
        try:
            return await fn(from_id, payload)
        except ApiError as exc:
            raise RuntimeError(f"{exc.code}: {exc.message}") from exc

    return handler


def register_internal_rpcs(
    transport: RpcRegistrar,
    node: ClusterNode,
    dispatch_forwarded: ForwardDispatch,
    after_forward: Callable[[], Any] = lambda: None,
) -> None:
    """Serve every internal RPC of the module docstring on ``transport``.

    ``dispatch_forwarded(request, source)`` runs a forwarded API request (the API's pipeline);
    ``after_forward`` runs after each (the daemon flushes the commit index to the followers).
    Each RPC is served by the part of ``node`` that owns it (most by its ``service``)."""
    service = node.service

    async def api_forward(from_id: int, payload: bytes) -> bytes:
        try:
            # 6 fields, or 8 with the client's address and the receiving node (the audit trail's)
            method, path, query, body, token, hops, *origin = unpack(payload)
            if len(origin) not in (0, 2):
                raise ValueError("6 or 8 fields")
            source, via = origin if origin else (None, None)
            req = ForwardedRequest(
                str(method),
                str(path),
                tuple((str(k), str(v)) for k, v in query) if query else (),
                bytes(body),
                str(token),
                int(hops),
                None if source is None else str(source),
                None if via is None else int(via),
            )
        except Exception as exc:
            raise RuntimeError("bad_request: malformed forwarded request") from exc
        resp = await dispatch_forwarded(req, f"member:{from_id}")
        # The caller waits until its replica has applied resp.applied_index: tell it the commit
        # index now instead of after the lazy-broadcast delay.
        after_forward()
        headers = [list(h) for h in resp.headers] if resp.headers else []
        return pack([resp.status, resp.body, headers, resp.applied_index])

    async def join_forward(from_id: int, payload: bytes) -> bytes:
        try:
            inner, der = unpack(payload)
            req = unpack(bytes(inner))
            token, node_id, ctx = str(req["token"]), int(req["node_id"]), bytes(req["context"])
            protocol = int(req.get("protocol_version", 1))  # absent: the baseline build (1)
            der = bytes(der)
        except Exception as exc:
            raise RuntimeError("bad_request: malformed join.forward") from exc
        return await node.joins.forwarded(from_id, token, node_id, ctx, der, protocol)

    transport.register_rpc("api.forward", api_forward)
    transport.register_rpc("node.propose", _api_errors_as_remote(lambda f, p: node_propose(service, f, p)))
    transport.register_rpc("member.remove", _api_errors_as_remote(lambda f, p: member_remove(service, f, p)))
    transport.register_rpc(
        "node.wait_applied", _api_errors_as_remote(lambda f, p: wait_applied(service, f, p))
    )
    transport.register_rpc("join.forward", join_forward)
    transport.register_rpc("node.info", service.versions.rpc_node_info)
    transport.register_rpc(ADDRESS_RPC, node.addresses.rpc_member_address)  # moves the caller only
    transport.register_rpc(READ_RPC, _api_errors_as_remote(service.backups.rpc_read))
    transport.register_join_handler(node.joins.handle)


__all__ = ["WAIT_APPLIED_MAX_SECONDS", "register_internal_rpcs"]
