"""Addresses change: a member that comes back elsewhere, and the operator's PATCH.

``AddressBook`` is the part of ``ClusterNode`` that owns all of it, over the node's
``ClusterService``: the local dial hints (``dial_addresses``, read by the daemon's pin book), this
node's own address (``keep_own_address``), the ``member.address`` RPC and ``set_member_address``.

A node restarted with a different ``cluster.advertise-address`` (same data dir, node id and
certificate) is unreachable for the others: they dial the old address from the registry. So the
moved node acts first. ``keep_own_address`` (every node, from startup) sees that its own registry
entry names an address it no longer listens on and sends ``member.address`` to every other member
over its OWN outgoing RPC connections: the others accept them, because the connection is
authenticated by the certificate pinned for this node id, whatever address it comes from.
A follower answers with the leader's id; the leader checks that the node id in the request is
the one the connection proved (a member may only move itself), validates the addresses like the
config keys and proposes ``SetMemberAddress``. Once it applies, every node's transport takes the
new address from the registry (``Daemon._update_pins``: the outgoing channels to the moved node
are redialed at once), the leader's Raft traffic reaches the moved node, and it catches up. The
moved node never dials itself: the transport's address map leaves out the node's own id, so the
stale entry for itself is only ever compared with where it really listens.

Before the change commits, and when it cannot commit without the moved node (the quorum needs
it: another member is down or moved too), reachability comes from local dial hints: every node
that receives an announcement dials the announcer at its new address (``dial_addresses``: never
replicated, still pin-checked, dropped when the registry entry changes); a follower's "not the
leader" answer says where it dials the leader, which a moved node that cannot reach the leader at
its recorded address follows; and a moved node that reaches nobody at the recorded addresses
asks the configured ``cluster.peers`` it has not tried (``ClusterTransport.rpc_at``: whichever
member answers there is named by its certificate, and dialed there from then on). So one member
moved, two moved while the third was down, or the whole cluster renumbered at once all heal
without the operator.

The op needs cluster protocol 2 (``OP_PROTOCOL``). While a member of the baseline build is
present the gate refuses it; the moved node keeps asking (backoff up to ``RETRY_MAX_SECONDS``),
and its request tells the leader its protocol version, which the leader could not ask for over
the old address, so the ratchet can open the gate as soon as the baseline member is upgraded.

Only the cluster address matters to reachability; a change of the API address alone is recorded
by the restart announcement (``RegisterNodeInfo``, protocol 1), and ``SetMemberAddress`` carries
both whenever the cluster address moves.

``PATCH /api/v1/cluster/members/{id}`` (``set_member_address``) records new addresses by hand for
a member that is down and will come back elsewhere (the etcd ``member update`` way). A running
member corrects its own entry to where it really listens.

Audit: every change goes through ``_propose_address_change``, which records
``member_address_changed`` in the same log entry as the change (system actor ``join`` for a
member's own announcement, the API token for a PATCH).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quorumd.api.errors import ApiError, BadRequest, Conflict, NotFound
from quorumd.node.cluster.service import ClusterService, pack, unpack
from quorumd.node.config.values import Address, ValueProblem, quote, valid_host
from quorumd.node.registry.audit import AuditAction, SystemComponent
from quorumd.node.registry.commands import SetMemberAddress
from quorumd.node.version import PROTOCOL_VERSION
from quorumd.raft.aio.transport import RpcError

log = logging.getLogger(__name__)

ADDRESS_RPC = "member.address"
RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
UNHEARD_CHECK_SECONDS = 1.0  # how often a member checks whether it knows a leader (see unheard)
ACTOR_JOIN = "system:join"  # {"type": "system", "component": "join"}
ACTOR_API = "api"  # the PATCH's token (the pipeline knows it; see the audit hook above)

_RAFT_ADDRESS = Address(reachable=True)  # the kind of cluster.advertise-address
RpcAt = Callable[[str, str, bytes, float], Awaitable[tuple[int, bytes]]]  # ClusterTransport.rpc_at


def parse_raft_address(text: str) -> str:
    """A reachable ``host:port`` as ``cluster.advertise-address`` takes it, canonical form."""
    return str(_RAFT_ADDRESS.parse(text, Path(".")))


def same_raft_address(a: str, b: str) -> bool:
    """Whether two ``host:port`` texts name one address: an IP literal however it is spelled
    (``[fd00:0::2]`` is ``[FD00::2]``), a DNS name in any case."""
    return _address_key(a) == _address_key(b)


def _address_key(text: str) -> str:
    host, _, port = text.rpartition(":")
    host = host.strip("[]").lower()
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.rstrip(".")
    return f"{host}:{port}"


def parse_api_address(text: str) -> str:
    """``https://host:port`` (the form members announce); returns it canonical."""
    url = text.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueProblem(f"expected https://host:port, got {quote(url)}") from None
    host = parts.hostname or ""
    if parts.scheme != "https" or not host or port is None:
        raise ValueProblem(f"expected https://host:port, got {quote(url)}")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueProblem(f"expected https://host:port and nothing else, got {quote(url)}")
    if not valid_host(host):
        raise ValueProblem(f"{quote(host)} is neither an IP address nor a DNS name")
    if host in ("0.0.0.0", "::"):
        raise ValueProblem(f"must be an address clients can reach, not {host}")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def validate_addresses(raft_address: str | None, api_address: str | None) -> tuple[str | None, str | None]:
    """Both optional; 400 naming the field (``invalid_raft_address`` / ``invalid_api_address``)."""
    raft = api = None
    if raft_address is not None:
        try:
            raft = parse_raft_address(raft_address)
        except ValueProblem as exc:
            raise BadRequest(f"field 'raftAddress' {exc.message}", code="invalid_raft_address") from None
    if api_address is not None:
        try:
            api = parse_api_address(api_address)
        except ValueProblem as exc:
            raise BadRequest(f"field 'apiAddress' {exc.message}", code="invalid_api_address") from None
    return raft, api


class AddressBook:
    """The address operations of a running node (see the module docstring), over its service."""

    def __init__(self, service: ClusterService) -> None:
        self.service = service
        # node id -> (announced raft address, the registry's address then): see dial_addresses
        self._address_hints: dict[int, tuple[str, str]] = {}
        self.on_dial_addresses_changed: Callable[[], None] | None = None  # the daemon re-reads them
        # PATCHes one at a time: each checks address_in_use against the ones before it committed
        self._patch_lock = asyncio.Lock()

    # --- where to dial ---------------------------------------------------------------------------
    def dial_addresses(self, registry: dict[int, str]) -> dict[int, str]:
        """The addresses to dial: the registry's, except for a member that announced (over a
        connection its certificate proved) that it moved and whose entry still names the address
        it left. Such a hint is local, never replicated, only says where to dial (every dial is
        still pin-checked), and is dropped once the registry's entry changes. It lets every node
        that heard the announcement reach the moved node before the change commits, and, when
        the moved node is needed for a quorum (another member down or moved too), at all."""
        hints = self._address_hints
        out = dict(registry)
        for nid, (hint, base) in list(hints.items()):
            if out.get(nid) == base:
                out[nid] = hint
            else:
                del hints[nid]
        return out

    def _hint_address(self, node_id: int, raft_address: str, registry_address: str) -> None:
        """Dial ``node_id`` at ``raft_address`` while the registry says ``registry_address``; the
        same address as the registry's drops the hint (a member back where it was)."""
        hints = self._address_hints
        if raft_address == registry_address:
            if hints.pop(node_id, None) is None:
                return
            log.info("peer_address_hint_dropped node=%d address=%s", node_id, raft_address)
        elif hints.get(node_id) == (raft_address, registry_address):
            return
        else:
            hints[node_id] = (raft_address, registry_address)
            log.info(
                "peer_address_hint node=%d address=%s registry=%s", node_id, raft_address, registry_address
            )
        if self.on_dial_addresses_changed is not None:
            self.on_dial_addresses_changed()

    # --- the moved node ------------------------------------------------------------------------
    def own_entry_moved(self) -> bool:
        """This node's registry entry names a cluster address it does not listen on."""
        m = self.service.sm.member(self.service.identity.node_id)
        return m is not None and m.raft_address != self.service.identity.raft_address

    def unheard(self) -> bool:
        """A member that knows no leader: it may be that nobody can reach it (its entry was set to
        an address it does not listen on, e.g. a PATCH while it ran): it announces where it is."""
        svc = self.service
        me = svc.identity.node_id
        if svc.driver is None or svc.leader_id() != 0 or svc.sm.member(me) is None:
            return False
        members = svc.driver.core.config.members()
        return me in members and len(members) > 1

    async def keep_own_address(self, seeds: Sequence[str] = (), rpc_at: RpcAt | None = None) -> None:
        """Run for the node's life: whenever its own entry names another cluster address, tell
        the leader where it is, until its replica shows the new address (bounded tries, backoff).
        ``seeds`` (config ``cluster.peers``) are asked too, through ``rpc_at``, when no member
        answers at the address this replica has for it (they all moved). A member that knows no
        leader announces itself too (``unheard``): every node that hears it dials it where it is,
        and a leader whose registry says otherwise records where it really is."""
        svc = self.service
        backoff = RETRY_MIN_SECONDS
        while True:
            moved = self.own_entry_moved()
            if not moved and not self.unheard():
                backoff = RETRY_MIN_SECONDS
                await svc.wait_state(lambda: self.own_entry_moved() or self.unheard(), UNHEARD_CHECK_SECONDS)
                continue
            recorded = await self.announce_own_address(seeds, rpc_at, quiet=not moved)
            if moved and recorded:
                if await svc.wait_state(lambda: not self.own_entry_moved(), svc.propose_timeout):
                    log.info("own_address_recorded address=%s", svc.identity.raft_address)
                    backoff = RETRY_MIN_SECONDS
                    continue
            await asyncio.sleep(backoff)  # retry pacing (the gate, no leader yet): not a sync wait
            backoff = min(RETRY_MAX_SECONDS, backoff * 2)

    async def announce_own_address(
        self, seeds: Sequence[str] = (), rpc_at: RpcAt | None = None, *, quiet: bool = False
    ) -> bool:
        """One round: ask every other member at once; True when the leader recorded it."""
        me = self.service.identity.node_id
        if self.service.is_leader():  # e.g. a one-node cluster moved: nobody else to ask
            ident = self.service.identity
            try:
                await self._propose_address_change(
                    SetMemberAddress(time.time(), me, ident.raft_address, ident.api_address), ACTOR_JOIN
                )
            except ApiError as exc:
                log.info("own_address_announce_retry address=%s reasons=%s", ident.raft_address, exc.code)
                return False
            return True
        others = [m.node_id for m in self.service.sm.members() if m.node_id != me]
        if self.service.rpc is None or not others:
            return False
        payload = pack(
            {
                "node_id": me,
                "raft_address": self.service.identity.raft_address,
                "api_address": self.service.identity.api_address,
                "protocol_version": PROTOCOL_VERSION,
            }
        )
        timeout = self.service.propose_timeout + 1.0
        answers = await asyncio.gather(*(self._ask(nid, payload, timeout) for nid in others))
        if any(a.get("ok") for a in answers):
            return True
        by_node = dict(zip(others, answers, strict=True))
        if rpc_at is not None and any(a.get("reason") == "RpcUnreachable" for a in answers):
            if await self._ask_seeds(seeds, rpc_at, payload, timeout, by_node):
                return True
        self._follow_leader_hints(by_node)
        reasons = sorted({str(a.get("reason")) for a in answers})
        level = logging.DEBUG if quiet else logging.INFO
        here = self.service.identity.raft_address
        log.log(level, "own_address_announce_retry address=%s reasons=%s", here, reasons)
        return False

    async def _ask_seeds(
        self,
        seeds: Sequence[str],
        rpc_at: RpcAt,
        payload: bytes,
        timeout: float,
        by_node: dict[int, dict[str, Any]],
    ) -> bool:
        """Ask whoever answers at a configured peer address this node has not tried. A member that
        answers there (its certificate says which) is dialed there from now on (a local hint)."""
        me = self.service.identity.node_id
        registry = {m.node_id: m.raft_address for m in self.service.sm.members() if m.node_id != me}
        tried = {*self.dial_addresses(registry).values(), self.service.identity.raft_address}
        probe = [a for a in dict.fromkeys(seeds) if a not in tried]
        if not probe:
            return False

        async def one(address: str) -> tuple[int, dict[str, Any]]:
            try:
                nid, raw = await rpc_at(address, ADDRESS_RPC, payload, timeout)
                answer = unpack(raw)
            except (RpcError, ValueError):
                return 0, {}
            return nid, answer if isinstance(answer, dict) else {}

        found = await asyncio.gather(*(one(a) for a in probe))
        for address, (nid, answer) in zip(probe, found, strict=True):
            if nid in registry and answer:
                if registry[nid] != address:
                    self._hint_address(nid, address, registry[nid])
                by_node[nid] = answer
        return any(a.get("ok") for _, a in found)

    def _follow_leader_hints(self, answers: dict[int, dict[str, Any]]) -> None:
        """The leader was unreachable at the address this replica has for it (it moved too, and
        this node has not seen that yet) but a member that reaches it said where it dials it:
        dial the leader there (pin-checked, local, dropped once the registry changes)."""
        for a in answers.values():
            leader, where = a.get("leader"), a.get("leader_address")
            if a.get("reason") != "not_leader" or type(leader) is not int or type(where) is not str:
                continue
            m = self.service.sm.member(leader)
            if m is None or leader == self.service.identity.node_id or where == m.raft_address:
                continue
            if answers.get(leader, {}).get("reason") != "RpcUnreachable":
                continue
            try:
                self._hint_address(leader, parse_raft_address(where), m.raft_address)
            except ValueProblem:
                continue

    async def _ask(self, node_id: int, payload: bytes, timeout: float) -> dict[str, Any]:
        rpc = self.service.rpc
        assert rpc is not None
        try:
            raw = await rpc(node_id, ADDRESS_RPC, payload, timeout)
            answer = unpack(raw)
        except RpcError as exc:
            return {"ok": False, "reason": type(exc).__name__}
        except ValueError:
            return {"ok": False, "reason": "malformed"}
        return answer if isinstance(answer, dict) else {"ok": False, "reason": "malformed"}

    # --- the leader ----------------------------------------------------------------------------
    async def rpc_member_address(self, from_id: int, payload: bytes) -> bytes:
        """``member.address`` from ``from_id`` (the node id its certificate proved)."""
        try:
            req = unpack(payload)
            node_id, pv = int(req["node_id"]), int(req["protocol_version"])
            raft_text, api_text = str(req["raft_address"]), str(req["api_address"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return _refused("malformed", "bad member.address request")
        if node_id != from_id:
            log.warning("member_address_refused from=%d target=%d reason=not_own_entry", from_id, node_id)
            return _refused("forbidden", "a member may only change its own addresses")
        # It said what it speaks: the leader cannot ask it over the old address (see the docstring).
        self.service.versions.live[from_id] = (pv, time.monotonic())
        m = self.service.sm.member(from_id)
        if m is None:
            return _refused("forbidden", f"node {from_id} is not a member")
        try:
            raft, api = validate_addresses(raft_text, api_text)
        except BadRequest as exc:
            return _refused(exc.code, exc.message)
        assert raft is not None and api is not None
        self._hint_address(from_id, raft, m.raft_address)  # dial it where it is, now (any node)
        svc = self.service
        if not svc.is_leader():
            leader = svc.leader_id()
            where = self.dial_addresses({m.node_id: m.raft_address for m in svc.sm.members()}).get(leader)
            return pack({"ok": False, "reason": "not_leader", "leader": leader, "leader_address": where})
        if (m.raft_address, m.api_address) != (raft, api):
            cmd = SetMemberAddress(time.time(), from_id, raft, api)
            try:
                await self._propose_address_change(cmd, ACTOR_JOIN)
            except ApiError as exc:
                log.info("member_address_deferred node_id=%d reason=%s", from_id, exc.code)
                return _refused(exc.code, exc.message)
            self.service.running_driver.flush_commit_broadcast()
        return pack({"ok": True})

    async def set_member_address(
        self, node_id: int, *, raft_address: str | None, api_address: str | None
    ) -> dict[str, Any]:
        """PATCH /cluster/members/{id} (leader): the member's item with its new addresses."""
        if raft_address is None and api_address is None:
            raise BadRequest("give raftAddress, apiAddress or both", code="missing_field")
        raft, api = validate_addresses(raft_address, api_address)
        async with self._patch_lock:
            m = self.service.sm.member(node_id)
            if m is None:
                raise NotFound(f"node {node_id} is not a cluster member", code="member_not_found")
            if raft is not None:
                others = self.service.sm.members()
                taken = [
                    o.node_id
                    for o in others
                    if o.node_id != node_id and same_raft_address(o.raft_address, raft)
                ]
                if taken:
                    raise Conflict(f"raftAddress {raft} is node {taken[0]}'s", code="address_in_use")
            cmd = SetMemberAddress(time.time(), node_id, raft or m.raft_address, api or m.api_address)
            if (cmd.raft_address, cmd.api_address) != (m.raft_address, m.api_address):
                await self._propose_address_change(cmd, ACTOR_API)
        return next(item for item in self.service.members() if item["nodeId"] == node_id)

    async def _propose_address_change(self, cmd: SetMemberAddress, actor: str) -> None:
        """The one place an address change is proposed, with its ``member_address_changed`` record
        in the same entry (target ``node:N``, detail the new and previous addresses; the system
        actor ``join`` for a member's own announcement, the caller's token for a PATCH)."""
        old = self.service.sm.member(cmd.node_id)
        detail = {
            "raftAddress": cmd.raft_address,
            "apiAddress": cmd.api_address,
            "previousRaftAddress": old.raft_address if old else "",
            "previousApiAddress": old.api_address if old else "",
        }
        target = f"node:{cmd.node_id}"
        action = AuditAction.MEMBER_ADDRESS_CHANGED
        if actor == ACTOR_JOIN:
            note = self.service.trail.system_note(SystemComponent.JOIN, action, target, detail)
        else:  # the PATCH being served: its token, receiving node and client address
            note = self.service.trail.request_note(action, target, detail)
        await self.service.trail.propose(cmd, note)
        log.info(
            "member_address_change node_id=%d raft_address=%s api_address=%s was=%s actor=%s",
            cmd.node_id, cmd.raft_address, cmd.api_address, old.raft_address if old else "", actor,
        )  # fmt: skip


def _refused(reason: str, message: str) -> bytes:
    return pack({"ok": False, "reason": reason, "message": message})
