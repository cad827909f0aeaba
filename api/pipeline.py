"""The request pipeline shared by HTTP requests and requests forwarded from other members.

One ``Route`` describes an operation completely: where it is served, who may call it, its
inputs (as ``Field``s, so validation and the OpenAPI document come from the same data), its
result schema and the error codes it documents. ``run_call`` executes a ``Call`` against a route:

1. cluster routes on a standalone node: 404 ``clustering_disabled`` (before authentication: it is
   a fact about the node's configuration, not about the caller);
2. authentication and role (401/403; 429 after too many failures from one client);
3. validation of path, query and body (400) -- also on a follower, before any forwarding;
4. placement: local replica reads run here; leader-only operations (and ``?consistent=true``
   reads) run here when this node leads, are forwarded to the leader otherwise, and answer 503
   ``no_leader`` when the call itself was forwarded (one hop at most, so no loops).

After a successful forwarded call the follower waits until it has applied the leader's index
(read-your-writes) before answering with the leader's status and body.

A reply may carry its body as a ``BodyStream`` (``Reply.stream``; the HTTP server writes it in
pieces). Such a body does not travel in one forwarded answer: on the leader, a forwarded call
gets the stream's ``handoff`` instead (a handle), and on the follower the route's ``relay``
takes the place of the plain forward and turns that handle back into a stream (GET /backup).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from .auth import FailedAuthLimiter, authorize
from .errors import (
    JSON_CONTENT_TYPE,
    ApiError,
    CommitTimeout,
    Forbidden,
    LeaderUnavailable,
    LeaderUnreachable,
    MethodNotAllowed,
    NotFound,
    TooManyRequests,
    Unauthorized,
    error_body,
    result_body,
)
from .origin import RequestOrigin, current_origin
from .ports import ForwardedRequest, NodeApi, TokenRole
from .validation import Args, Field, parse_body, parse_query, parse_text

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
CLUSTER_PREFIX = API_PREFIX + "/cluster/"
# Headers of a leader's answer that a follower passes on to its client.
_PASSED_HEADERS = ("Retry-After", "WWW-Authenticate", "Allow")
_PASSED_LOWER = frozenset(h.lower() for h in _PASSED_HEADERS)


class Access(StrEnum):
    PUBLIC = "public"
    READONLY = "readonly"
    ADMIN = "admin"


class Placement(StrEnum):
    LOCAL = "local"  # always served by the receiving node
    READ = "read"  # local replica, or the leader with ?consistent=true
    LEADER = "leader"  # always on the leader
    TARGET = "target"  # on the member the path's {id} names (it acts on itself)


@dataclass(frozen=True, slots=True)
class ErrorDoc:
    status: int
    codes: tuple[str, ...]


class BodyStream(Protocol):
    """A body sent in pieces; its length is known before the first one (``Content-Length``)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes | memoryview]:
        """The body in order. Raising part-way fails the answer visibly: the connection is
        aborted short of ``size`` bytes."""
        ...

    def close(self) -> None:
        """Release the body's resources (idempotent; called after the last piece too)."""
        ...

    def handoff(self, holder: str) -> Any:
        """The result a forwarded call answers instead of the body (``holder``: the forwarding
        member's limiter key, ``member:N``); the stream is then the holder's to pull."""
        ...


@dataclass(slots=True)
class Reply:
    status: int = 200
    result: Any = None
    body: bytes | None = None  # pre-encoded (forwarded answers, metrics text, the OpenAPI document)
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    applied_index: int = 0
    stream: BodyStream | None = None  # the body, in pieces (then ``body`` is unused)

    def encoded(self) -> bytes:
        if self.stream is not None:
            return b""
        return self.body if self.body is not None else result_body(self.result)


@dataclass(slots=True)
class Context:
    node: NodeApi
    node_id: int
    forward_timeout_seconds: float
    propose_timeout_seconds: float
    limiter: FailedAuthLimiter
    routes: list[Route] = field(default_factory=list)
    openapi_json: bytes = b""
    extras: dict[str, Any] = field(default_factory=dict)
    # Called with (reason, source address) for every refused request (401, 403, 429): counted
    # and logged, never replicated.
    on_auth_refused: Callable[[str, str | None], None] | None = None

    @property
    def operation_timeout_seconds(self) -> float:
        """Backstop on leader operations; the node bounds its own waits more tightly."""
        return self.propose_timeout_seconds * 3


RunFn = Callable[[Context, Args], Awaitable[Reply]]
# Called on a follower whose forward failed with 502/504: may settle the outcome from the local
# replica (None: keep the error).
SettleFn = Callable[[ApiError], Awaitable[Reply | None]]
# Called on a follower just before it forwards, while its replica still shows the state the
# request met: the ``SettleFn`` for a forward that then fails, or None when a lost answer could
# not be settled (see ``routes_cluster.removed_leader_outcome``).
RecoverFn = Callable[[Context, Args], SettleFn | None]
# Runs on a follower instead of ``forward`` (it may call ``forward`` itself): see ``BodyStream``.
RelayFn = Callable[[Context, "Route", "Call", Args], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # template, e.g. /api/v1/cluster/members/{id}
    run: RunFn
    summary: str
    tag: str
    access: Access
    placement: Placement = Placement.LOCAL
    path_params: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    body: tuple[Field, ...] | None = None  # None: the route takes no body (not read)
    success_status: int = 200
    result_schema: dict[str, Any] | None = None  # None: not a JSON envelope (metrics text)
    raw_content_type: str = JSON_CONTENT_TYPE
    errors: tuple[ErrorDoc, ...] = ()
    check: Callable[[Args], None] | None = None  # cross-field validation
    forward_body: Callable[[Context, Args, bytes], bytes] | None = None
    description: str = ""
    other_statuses: tuple[tuple[int, str], ...] = ()  # documented non-error alternatives
    ignore_query: bool = False  # public probes: unknown query parameters are ignored, not 400
    recover: RecoverFn | None = None  # see RecoverFn
    # The leader may legitimately take longer than one commit to answer (a synchronous drain,
    # a promotion waiting for catch-up, a removal handing leadership over): a follower then waits
    # for the leader's own operation bound instead of the plain forward timeout, so it relays the
    # leader's verdict (success, drain_timeout, commit_timeout) rather than a 504 of its own.
    long_running: bool = False
    # The operation's only wait is one proposal, which the node bounds itself (the Raft driver
    # expires it after the propose timeout): the leader skips the per-request backstop timer,
    # which cost ~4% of the leader's CPU on the write path.
    self_bounded: bool = False
    success_headers: tuple[tuple[str, str], ...] = ()  # documented headers of a success: (name, text)
    relay: RelayFn | None = None  # see RelayFn

    @property
    def cluster(self) -> bool:
        return self.path.startswith(CLUSTER_PREFIX)

    @property
    def operation_id(self) -> str:
        return self.run.__name__.lstrip("_")

    def may_use_leader(self) -> bool:
        return self.placement is not Placement.LOCAL


@dataclass(slots=True)  # one per request: a frozen dataclass's __init__ costs ~4x
class Call:
    method: str
    raw_path: str
    query: tuple[tuple[str, str], ...]
    path_values: dict[str, str]
    body: bytes
    token: str | None
    client: str | None  # None: forwarded from another member
    hops: int = 0
    source_address: str | None = None  # forwarded: the original client's address (audit trail)
    via_node_id: int | None = None  # forwarded: the node that received the HTTP request


def _template_regex(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^{{}}/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


class RouteTable:
    """Route lookup by method and raw path: templates without parameters by one dict lookup, the
    others by regex (``{name}`` matches one non-empty path segment, percent-decoded)."""

    def __init__(self, routes: list[Route]) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        self._templated: dict[str, tuple[re.Pattern[str], dict[str, Route]]] = {}
        for r in routes:
            if "{" in r.path:
                _regex, methods = self._templated.setdefault(r.path, (_template_regex(r.path), {}))
            else:
                methods = self._static.setdefault(r.path, {})
            methods[r.method] = r

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        methods = self._static.get(raw_path)
        values: dict[str, str] = {}
        if methods is None:
            for regex, candidate in self._templated.values():
                m = regex.fullmatch(raw_path)
                if m is not None:
                    methods = candidate
                    values = {k: unquote(v) for k, v in m.groupdict().items()}
                    break
            else:
                raise NotFound("no such API path")
        route = methods.get(method.upper())
        if route is None:
            raise MethodNotAllowed(allowed=tuple(methods))
        return route, values


def parse_args(route: Route, call: Call) -> Args:
    path = {
        f.name: parse_text(f, call.path_values.get(f.name, ""), "path parameter") for f in route.path_params
    }
    query = {} if route.ignore_query else parse_query(route.query, call.query)
    body = parse_body(route.body, call.body) if route.body is not None else {}
    args = Args(path=path, query=query, body=body)
    if route.check is not None:
        route.check(args)
    return args


def _auth_refused(ctx: Context, route: Route, token: str | None, source: str | None, exc: ApiError) -> None:
    """Count and log a refused request (refusals are never replicated)."""
    if isinstance(exc, TooManyRequests):
        reason = "rate_limited"
    elif isinstance(exc, Forbidden):
        reason = "forbidden"
    else:
        reason = "missing_token" if token is None else "invalid_token"
    log.warning("api_auth_refused reason=%s source=%s route=%s", reason, source, route.path)
    if ctx.on_auth_refused is not None:
        ctx.on_auth_refused(reason, source)


def admit(
    ctx: Context,
    route: Route,
    token: str | None,
    client: str | None,
    *,
    forwarded: bool = False,
    source_address: str | None = None,
    via_node_id: int | None = None,
) -> RequestOrigin | None:
    """Steps 1 and 2 of ``run_call`` (clustering, then authentication and role): what can be
    decided before the body is read. Answers who made the request (``None``: a public route):
    the token, the node that received it and the client's address (``client`` on the receiving
    node; for a ``forwarded`` request ``source_address``/``via_node_id`` as the forwarding node
    sent them, ``client`` then naming that member for the limiter)."""
    node = ctx.node
    if route.cluster and not node.cluster_enabled:
        raise NotFound("clustering is disabled on this node", code="clustering_disabled")
    if route.access is Access.PUBLIC:
        return None
    need = TokenRole.ADMIN if route.access is Access.ADMIN else TokenRole.READONLY
    try:
        principal = authorize(node, token, need, client=client, limiter=ctx.limiter)
    except (Unauthorized, Forbidden, TooManyRequests) as exc:
        _auth_refused(ctx, route, token, source_address if forwarded else client, exc)
        raise
    if forwarded:  # ``client`` names the forwarding member (the limiter's key), not the client
        return RequestOrigin(principal.token_id, via_node_id, source_address)
    return RequestOrigin(principal.token_id, ctx.node_id, client)


async def run_call(ctx: Context, route: Route, call: Call) -> Reply:
    origin = admit(
        ctx,
        route,
        call.token,
        call.client,
        forwarded=call.hops > 0,
        source_address=call.source_address,
        via_node_id=call.via_node_id,
    )
    args = parse_args(route, call)
    reset = current_origin.set(origin)
    try:
        return await _run_placed(ctx, route, call, args)
    finally:
        current_origin.reset(reset)


async def _run_placed(ctx: Context, route: Route, call: Call, args: Args) -> Reply:
    node = ctx.node
    consistent = bool(args.query.get("consistent", False))
    if route.placement is Placement.LOCAL or (route.placement is Placement.READ and not consistent):
        return await route.run(ctx, args)
    if route.placement is Placement.TARGET:
        return await _run_on_target(ctx, route, call, args)
    if node.is_leader():
        if route.self_bounded:
            reply = await route.run(ctx, args)
        else:
            try:
                async with asyncio.timeout(ctx.operation_timeout_seconds):
                    if route.placement is Placement.READ:
                        await node.linearizable_barrier()
                    reply = await route.run(ctx, args)
            except TimeoutError:
                raise CommitTimeout("the operation did not complete in time") from None
        reply.applied_index = node.applied_index()
        if reply.stream is not None and call.hops > 0:  # the forwarding member pulls the body
            handle = reply.stream.handoff(call.client or "")
            return Reply(result=handle, applied_index=reply.applied_index)
        return reply
    if call.hops > 0:
        raise LeaderUnavailable("this node is not the leader (forwarded at most once); retry shortly")
    if route.relay is not None:
        return await route.relay(ctx, route, call, args)
    return await forward(ctx, route, call, args)


async def _run_on_target(ctx: Context, route: Route, call: Call, args: Args) -> Reply:
    """Run on the member the path names: here, or forwarded to it (once). 409 ``node_unreachable``
    when that member cannot be reached: it never received the request, nothing changed."""
    target = int(args.path["id"])
    if target == ctx.node_id:
        return await route.run(ctx, args)
    if call.hops > 0:
        raise LeaderUnavailable(f"this is not node {target} (forwarded at most once); retry shortly")
    if not ctx.node.has_member(target):
        raise NotFound(f"node {target} is not a cluster member", code="member_not_found")
    try:
        return await forward(ctx, route, call, args, to=target)
    except ApiError as exc:
        if exc.status == 502 and exc.code == "leader_unreachable":
            message = f"node {target} is unreachable; nothing changed"
            raise ApiError(409, "node_unreachable", message) from None
        raise


def _check_envelope(body: bytes) -> None:
    """The leader's answer is a JSON envelope (a structural check: orjson, ~10x the standard
    parser on an autopilot document, and duplicate keys do not matter here)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not ("result" in doc or ("error" in doc and "code" in doc)):
        raise LeaderUnreachable("the leader sent an invalid answer", code="leader_error")


async def forward(ctx: Context, route: Route, call: Call, args: Args, *, to: int | None = None) -> Reply:
    node = ctx.node
    body = route.forward_body(ctx, args, call.body) if route.forward_body is not None else call.body
    request = ForwardedRequest(
        method=call.method,
        path=call.raw_path,
        query=call.query,
        body=body,
        token=call.token or "",
        hops=call.hops + 1,
        source_address=call.client if call.client is not None else call.source_address,
        via_node_id=ctx.node_id,
    )
    timeout = ctx.forward_timeout_seconds
    if route.long_running:
        timeout = max(timeout, ctx.operation_timeout_seconds + 1.0)
    settle = route.recover(ctx, args) if route.recover is not None else None
    try:
        resp = await node.forward(request, timeout, to=to)  # bounded by the port: 504 LeaderTimeout
    except ApiError as exc:
        if settle is not None and exc.status in (502, 504):
            settled = await settle(exc)
            if settled is not None:
                return settled
        raise
    _check_envelope(resp.body)
    if 200 <= resp.status < 300:
        # bounded by the port (504 apply_timeout); free when this replica is already there
        await node.wait_applied(resp.applied_index, ctx.propose_timeout_seconds)
    headers = {k: v for k, v in resp.headers if k.lower() in _PASSED_LOWER}
    log.debug("api_forwarded method=%s route=%s status=%d", call.method, route.path, resp.status)
    return Reply(status=resp.status, body=resp.body, headers=headers, applied_index=resp.applied_index)


def error_reply(exc: ApiError) -> Reply:
    headers = dict(exc.headers)
    if exc.status == 503 and not any(k.lower() == "retry-after" for k in headers):
        headers["Retry-After"] = "1"
    return Reply(status=exc.status, body=error_body(exc.code, exc.message), headers=headers)
