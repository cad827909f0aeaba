"""The public API as one object: route lookup, the request pipeline, envelopes, metrics.

``build_app(node, node_id=..., registry=...)`` returns an ``Api``. It knows nothing about sockets:
``quorumd.api.server`` serves HTTP/1.1 and calls ``Api.handle`` once per request (and
``Api.precheck`` for a head that waits with ``Expect: 100-continue`` before sending its body);
``Api.dispatch_forwarded`` is the leader-side entry for requests a follower forwarded over the
cluster channel. Both run the same pipeline (authentication with the carried token, validation,
operation) and neither raises for a bad request: every failure becomes an error envelope --
typed ``ApiError``s, unknown paths (404), methods a path does not serve (405 with ``Allow``),
bodies over ``MAX_BODY_BYTES`` (413), and any other exception as a generic 500 ``internal``
(traceback logged, never sent). Forwarding is recognised only through ``dispatch_forwarded``
(``hops`` in ``ForwardedRequest``); no HTTP header can mark a client request as forwarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from prometheus_client import CollectorRegistry

from . import (
    routes_audit,
    routes_backup,
    routes_cluster,
    routes_leases,
    routes_pools,
    routes_status,
    routes_tokens,
)
from .auth import FailedAuthLimiter, bearer_token
from .errors import ApiError, InternalError, PayloadTooLarge
from .metrics import UNMATCHED, ApiMetrics
from .openapi import render
from .pipeline import Call, Context, Reply, Route, RouteTable, admit, error_reply, run_call
from .ports import ForwardedRequest, ForwardedResponse, NodeApi
from .routes_status import REGISTRY_KEY

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
TOO_LARGE_MESSAGE = f"request body exceeds {MAX_BODY_BYTES} bytes"


def all_routes() -> list[Route]:
    return [
        *routes_status.routes(),
        *routes_cluster.routes(),
        *routes_tokens.routes(),
        *routes_pools.routes(),
        *routes_leases.routes(),
        *routes_backup.routes(),
        *routes_audit.routes(),
    ]


class Api:
    """The API of one node; see the module docstring."""

    def __init__(self, ctx: Context, metrics: ApiMetrics, table: RouteTable) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.table = table

    @property
    def routes(self) -> list[Route]:
        return self.ctx.routes

    async def handle(
        self,
        method: str,
        path: str,
        query_string: str,
        body: bytes,
        authorization: str | None,
        client: str,
    ) -> Reply:
        """One HTTP request: ``path`` is the raw (still percent-encoded) path, ``query_string`` the
        raw query without ``?``."""

        def call(route: Route, values: dict[str, str]) -> Call:
            return Call(
                method=method,
                raw_path=path,
                query=tuple(parse_qsl(query_string, keep_blank_values=True)) if query_string else (),
                path_values=values,
                body=body if route.body is not None else b"",
                token=bearer_token(authorization),
                client=client,
                hops=0,
            )

        return await self._run(method, path, call, "api_unhandled_error")

    def precheck(self, method: str, path: str, authorization: str | None, client: str) -> Reply | None:
        """For a request that waits before sending its body (``Expect: 100-continue``): the final
        answer its head already decides (404/405, ``clustering_disabled``, 401/403/429), counted
        like any answer, or None when the body is worth reading. The full pipeline still runs
        on the complete request."""
        label = UNMATCHED
        try:
            route, _ = self.table.match(method, path)
            label = route.path
            admit(self.ctx, route, bearer_token(authorization), client)
        except ApiError as exc:
            reply = error_reply(exc)
            self.metrics.observe(method, label, reply.status, 0.0)
            return reply
        return None

    def rejected(self, method: str, exc: ApiError) -> Reply:
        """The reply to a request refused before routing (413, malformed), counted under
        ``unmatched``."""
        reply = error_reply(exc)
        self.metrics.observe(method, UNMATCHED, reply.status, 0.0)
        return reply

    async def dispatch_forwarded(
        self, request: ForwardedRequest, *, source: str | None = None
    ) -> ForwardedResponse:
        """Run a request forwarded by another member (see the module docstring). ``source``
        names the forwarding member (``member:N``): failed tokens it relays are counted against
        it by the failed-authentication limiter like a client address's."""
        method = request.method.upper()

        def call(route: Route, values: dict[str, str]) -> Call:
            return Call(
                method=method,
                raw_path=request.path,
                query=tuple(request.query),
                path_values=values,
                body=request.body if route.body is not None else b"",
                token=request.token or None,
                client=source,
                hops=max(1, request.hops),
                source_address=request.source_address,
                via_node_id=request.via_node_id,
            )

        if len(request.body) > MAX_BODY_BYTES:
            reply = self.rejected(method, PayloadTooLarge(TOO_LARGE_MESSAGE))
        else:
            reply = await self._run(method, request.path, call, "api_forwarded_unhandled_error")
        return ForwardedResponse(
            status=reply.status,
            body=reply.encoded(),
            headers=tuple(reply.headers.items()),
            applied_index=self.ctx.node.applied_index(),
        )

    async def _run(
        self, method: str, path: str, make_call: Callable[[Route, dict[str, str]], Call], event: str
    ) -> Reply:
        """Route, run and answer one request; every failure becomes an error envelope, and the
        request is counted under its route template (``unmatched`` when none)."""
        clock = self.metrics.clock
        started = clock()
        label = UNMATCHED
        try:
            route, values = self.table.match(method, path)
            label = route.path
            reply = await run_call(self.ctx, route, make_call(route, values))
            if reply.body is None:
                reply.body = reply.encoded()  # here, so that a result JSON refuses is a 500 too
        except ApiError as exc:
            reply = error_reply(exc)
        except Exception:
            log.exception("%s method=%s route=%s", event, method, label)
            reply = error_reply(InternalError())
        self.metrics.observe(method, label, reply.status, clock() - started)
        return reply


def build_app(
    node: NodeApi,
    *,
    node_id: int,
    registry: CollectorRegistry,
    forward_timeout_seconds: float = 5.0,
    propose_timeout_seconds: float = 5.0,
    auth_failure_limit: int = 20,
    auth_failure_window_seconds: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Api:
    """The API of ``node`` (see the module docstring).

    ``registry`` receives the API request metrics and is what /metrics exposes. ``clock`` drives
    the failed-authentication limiter (``auth_failure_limit`` failures per client address, and per
    presented token id, within ``auth_failure_window_seconds``; see ``quorumd.api.auth``).
    """
    routes = all_routes()
    ctx = Context(
        node=node,
        node_id=node_id,
        forward_timeout_seconds=forward_timeout_seconds,
        propose_timeout_seconds=propose_timeout_seconds,
        limiter=FailedAuthLimiter(
            max_failures=auth_failure_limit, window_seconds=auth_failure_window_seconds, clock=clock
        ),
        routes=routes,
        extras={REGISTRY_KEY: registry},
    )
    ctx.openapi_json = render(routes)
    metrics = ApiMetrics(registry)
    ctx.on_auth_refused = metrics.count_auth_failure
    return Api(ctx, metrics, RouteTable(routes))
