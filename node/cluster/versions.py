"""Protocol versions of the running cluster: what each member speaks, the ratchet, the gate.

Each node keeps a live map of its members' protocol versions, learned over the internal RPC
``node.info`` (answer ``{protocolVersion, binaryVersion}``; a node of the baseline build
answers "unknown method", which means protocol 1). It asks the members it has no fresh answer
for: the leader in its reconcile loop, followers in their announce loop, each call bounded. An
answer is forgotten when the member announces a restart or a stop (``RegisterNodeInfo``,
``MarkNodeLeft``) or is removed, and an answer below this build's protocol is asked again
after ``STALE_AFTER_SECONDS`` (an upgrade the announcements did not show, e.g. after kill -9).

The replicated state records the cluster's protocol version (a ratchet, 1 by default) and,
from protocol 2 on, each member's. The leader proposes one ``SetProtocolVersion`` once every
member of the Raft configuration (voters and nonvoters) reports N or more and N is above the
recorded version; then again whenever a member's recorded version differs from what it
reports (a joiner, an upgrade). Joins hold ``lock`` so a joiner is never admitted between the
leader's look at the members and the ratchet's commit; the state machine checks the member
list the ratchet carries as well.

What a member shows (members list ``protocolVersion``): the recorded value, else the live one,
else 1. ``/status`` ``clusterProtocolVersion``: the lowest of the members'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import msgpack

from quorumd.api.errors import ApiError
from quorumd.node.registry.commands import (
    Command,
    FeatureUnavailable,
    MarkNodeLeft,
    MemberContext,
    RegisterNodeInfo,
    SetProtocolVersion,
    encode_member_context,
    gate,
)
from quorumd.node.registry.records import ApplyResult
from quorumd.node.registry.state import StateMachine
from quorumd.node.version import BASELINE_PROTOCOL_VERSION, PROTOCOL_VERSION, VERSION
from quorumd.raft.aio.transport import RpcError, RpcRemoteError
from quorumd.raft.codec import packb
from quorumd.raft.core.types import ConfChange, ConfChangeType

log = logging.getLogger(__name__)
_RESTARTS = (RegisterNodeInfo, MarkNodeLeft)  # a tuple: ``A | B`` would build a union per entry

NODE_INFO_RPC = "node.info"
POLL_TIMEOUT_SECONDS = 1.0
STALE_AFTER_SECONDS = 5.0

Rpc = Callable[[int, str, bytes, float], Awaitable[Any]]


def feature_unavailable(exc: FeatureUnavailable) -> ApiError:
    return ApiError(409, "feature_unavailable", str(exc))


def old_joiner_message(joiner: int, cluster: int) -> str:
    return (
        f"this build speaks protocol {joiner}; the cluster's log already uses protocol {cluster} "
        f"(join with a build that speaks protocol {cluster} or later)"
    )


class ProtocolVersions:
    """See the module docstring. One per node, owned by ``ClusterService``."""

    def __init__(self, node_id: int, sm: StateMachine) -> None:
        self.node_id = node_id
        self.sm = sm
        self.live: dict[int, tuple[int, float]] = {}  # node id -> (version, monotonic time learned)
        self.lock = asyncio.Lock()  # joins and the ratchet (see the module docstring)
        self._polling: set[int] = set()

    # --- reads ------------------------------------------------------------------------------
    def live_version(self, node_id: int) -> int | None:
        if node_id == self.node_id:
            return PROTOCOL_VERSION
        got = self.live.get(node_id)
        return None if got is None else got[0]

    def member_version(self, node_id: int) -> int:
        """Recorded, else live, else 1 (what the members list shows)."""
        m = self.sm.member(node_id)
        if m is not None and m.protocol_version is not None:
            return m.protocol_version
        live = self.live_version(node_id)
        return BASELINE_PROTOCOL_VERSION if live is None else live

    def cluster_version(self) -> int:
        """The lowest of the members' versions (``/status`` ``clusterProtocolVersion``)."""
        members = self.sm.members()
        if not members:
            return PROTOCOL_VERSION
        return min(self.member_version(m.node_id) for m in members)

    # --- the gate ---------------------------------------------------------------------------
    def check(self, cmd: Command) -> None:
        """``commands.gate`` against the recorded cluster version, as an API error."""
        try:
            gate(cmd, self.sm.cluster_protocol_version)
        except FeatureUnavailable as exc:
            raise feature_unavailable(exc) from None

    # --- joins ------------------------------------------------------------------------------
    def join_refusal(self, joiner_version: int) -> str | None:
        """Why a joiner speaking ``joiner_version`` cannot be admitted (None: it can)."""
        recorded = self.sm.cluster_protocol_version
        if joiner_version < recorded:
            return old_joiner_message(joiner_version, recorded)
        return None

    def joiner_context(self, ctx: MemberContext, ctx_bytes: bytes, joiner_version: int) -> bytes:
        """The context to propose: the joiner's own (v1) bytes while the cluster is at protocol 1,
        else the v2 context that records its protocol version."""
        if self.sm.cluster_protocol_version < 2:
            return ctx_bytes
        return encode_member_context(
            MemberContext(
                ctx.raft_address,
                ctx.api_address,
                ctx.binary_version,
                ctx.cert_fingerprint,
                ctx.cert_pem,
                ctx.join_token_id,
                ctx.ts,
                protocol_version=joiner_version,
            )
        )

    # --- learning ---------------------------------------------------------------------------
    def after_apply(self, results: Sequence[ApplyResult]) -> None:
        """Forget what a member said once it restarts, stops or leaves (see the docstring)."""
        for r in results:
            cmd = r.command
            restarted = isinstance(cmd, _RESTARTS)
            if restarted or (isinstance(cmd, ConfChange) and cmd.type == ConfChangeType.REMOVE):
                self.live.pop(cmd.node_id, None)  # type: ignore[union-attr]

    def needs_asking(self, node_ids: Iterable[int], *, recorded_too: bool) -> list[int]:
        now = time.monotonic()
        out = []
        for nid in sorted(node_ids):
            if nid == self.node_id or nid in self._polling:
                continue
            if not recorded_too:
                m = self.sm.member(nid)
                if m is not None and m.protocol_version is not None:
                    continue
            got = self.live.get(nid)
            if got is None or (got[0] < PROTOCOL_VERSION and now - got[1] > STALE_AFTER_SECONDS):
                out.append(nid)
        return out

    async def learn(self, rpc: Rpc | None, node_ids: Iterable[int], *, recorded_too: bool = False) -> None:
        """Ask each member in ``node_ids`` without a fresh answer (bounded, concurrently)."""
        if rpc is None:
            return
        ask = self.needs_asking(node_ids, recorded_too=recorded_too)
        if ask:
            await asyncio.gather(*(self._ask(rpc, nid) for nid in ask))

    async def _ask(self, rpc: Rpc, node_id: int) -> None:
        self._polling.add(node_id)
        try:
            raw = await rpc(node_id, NODE_INFO_RPC, b"", POLL_TIMEOUT_SECONDS)
            info = msgpack.unpackb(raw, raw=False)
            version = int(info["protocolVersion"])
        except RpcRemoteError as exc:
            if "unknown method" not in str(exc):
                return
            version = BASELINE_PROTOCOL_VERSION  # the baseline build has no node.info
        except (RpcError, TimeoutError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            return  # unreachable or slow: ask again next time
        except Exception as exc:  # never let a poll end the loop that asked (CancelledError passes)
            log.warning("member_protocol_poll_failed node_id=%d error=%s", node_id, type(exc).__name__)
            return
        finally:
            self._polling.discard(node_id)
        old = self.live.get(node_id)
        if old is None or old[0] != version:
            log.info("member_protocol_version node_id=%d protocol_version=%d", node_id, version)
        self.live[node_id] = (version, time.monotonic())

    @staticmethod
    async def rpc_node_info(from_id: int, payload: bytes) -> bytes:
        return packb({"protocolVersion": PROTOCOL_VERSION, "binaryVersion": VERSION})

    # --- the ratchet (leader) ---------------------------------------------------------------
    def ratchet_command(self, config_members: Iterable[int], now: float) -> SetProtocolVersion | None:
        """The ``SetProtocolVersion`` to propose now, if any (every member must have answered)."""
        ids = sorted(config_members)
        versions: dict[int, int] = {}
        for nid in ids:
            v = self.live_version(nid)
            if v is None:
                return None
            versions[nid] = v
        if not versions:
            return None
        recorded = self.sm.cluster_protocol_version
        target = max(recorded, min(versions.values()))
        if target < 2:
            return None  # protocol 1 records nothing
        stale = any(
            (m := self.sm.member(nid)) is not None and m.protocol_version != v for nid, v in versions.items()
        )
        if target == recorded and not stale:
            return None
        return SetProtocolVersion(now, target, tuple(sorted(versions.items())))

    async def reconcile(
        self, rpc: Rpc | None, config_members: Iterable[int], propose: Callable[[Command], Awaitable[Any]]
    ) -> None:
        """Leader: learn what the members speak, then ratchet or record it (one command)."""
        ids = list(config_members)
        await self.learn(rpc, ids, recorded_too=True)
        async with self.lock:
            cmd = self.ratchet_command(ids, time.time())
            if cmd is None:
                return
            before = self.sm.cluster_protocol_version
            try:
                await propose(cmd)
            except ApiError as exc:
                log.info("protocol_version_deferred reason=%s", exc.code)
                return
        if self.sm.cluster_protocol_version != before:
            log.info(
                "cluster_protocol_version_raised from=%d to=%d", before, self.sm.cluster_protocol_version
            )
