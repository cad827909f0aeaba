"""The aiohttp application of the public API (SPEC 5): composition, middlewares, forwarding entry.

``build_app(node, node_id=..., registry=...)`` returns the ``web.Application``; the node layer
serves it (over TLS) with its own runner. ``dispatch_forwarded(app, request)`` is the leader-side
entry for requests a follower forwarded over the cluster channel: it runs the same pipeline
(authentication with the carried token, validation, operation) and returns status, body, headers
and the leader's applied index. Forwarding is recognised only through ``dispatch_forwarded``
(``hops`` in ``ForwardedRequest``); no HTTP header can mark a client request as forwarded.

Middlewares, outermost first: request metrics (route template label), then the error middleware
that builds every error envelope -- typed ``ApiError``s, aiohttp's own 404/405/413, and any other
exception as a generic 500 ``internal`` (traceback logged, never sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import CollectorRegistry

from . import routes_cluster, routes_leases, routes_pools, routes_status, routes_tokens
from .auth import FailedAuthLimiter, bearer_token
from .errors import ApiError, InternalError, PayloadTooLarge
from .metrics import UNMATCHED, ApiMetrics
from .openapi import render
from .pipeline import Call, Context, Reply, Route, RouteTable, error_reply, run_call
from .ports import ForwardedRequest, ForwardedResponse, NodeApi
from .routes_status import REGISTRY_KEY

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
CONTEXT_KEY = web.AppKey("quorumd_api_context", Context)
METRICS_KEY = web.AppKey("quorumd_api_metrics", ApiMetrics)
TABLE_KEY = web.AppKey("quorumd_api_routes", RouteTable)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_HTTP_MESSAGES = {
    404: "no such API path",
    405: "method not allowed on this path",
    413: f"request body exceeds {MAX_BODY_BYTES} bytes",
}


def all_routes() -> list[Route]:
    return [
        *routes_status.routes(),
        *routes_cluster.routes(),
        *routes_tokens.routes(),
        *routes_pools.routes(),
        *routes_leases.routes(),
    ]


def _response(reply: Reply) -> web.Response:
    headers = {"Content-Type": reply.content_type, "Cache-Control": "no-store", **reply.headers}
    return web.Response(status=reply.status, body=reply.encoded(), headers=headers)


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource
    if isinstance(info, MatchInfoError) or resource is None:
        return UNMATCHED
    return resource.canonical


def _http_error(exc: web.HTTPException) -> ApiError:
    status = exc.status
    code = _HTTP_CODES.get(status, f"http_{status}")
    message = _HTTP_MESSAGES.get(status, exc.reason or "request failed")
    headers = {"Allow": exc.headers["Allow"]} if status == 405 and "Allow" in exc.headers else None
    return ApiError(status, code, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _response(error_reply(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _response(error_reply(_http_error(exc)))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("api_unhandled_error method=%s route=%s", request.method, _route_label(request))
        return _response(error_reply(InternalError()))


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    started = metrics.clock()
    response = await handler(request)
    metrics.observe(request.method, _route_label(request), response.status, metrics.clock() - started)
    return response


def _http_handler(route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT_KEY]
        body = await request.read() if route.body is not None else b""
        call = Call(
            method=request.method,
            raw_path=request.rel_url.raw_path,
            query=tuple(request.rel_url.query.items()),
            path_values=dict(request.match_info),
            body=body,
            token=bearer_token(request.headers.get("Authorization")),
            client=request.remote or "unknown",
            hops=0,
        )
        return _response(await run_call(ctx, route, call))

    handle.__name__ = f"handle_{route.operation_id}"
    return handle


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
) -> web.Application:
    """The API application for ``node`` (see the module docstring).

    ``registry`` receives the API request metrics and is what /metrics exposes. ``clock`` drives
    the failed-authentication limiter (``auth_failure_limit`` failures per client address within
    ``auth_failure_window_seconds``).
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
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT_KEY] = ctx
    app[METRICS_KEY] = ApiMetrics(registry)
    app[TABLE_KEY] = RouteTable(routes)
    for route in routes:
        app.router.add_route(route.method, route.path, _http_handler(route), name=route.operation_id)
    return app


async def dispatch_forwarded(app: web.Application, request: ForwardedRequest) -> ForwardedResponse:
    """Run a request forwarded by another member (see the module docstring). Never raises for a
    bad request: every failure is an error envelope in the returned response."""
    ctx = app[CONTEXT_KEY]
    metrics = app[METRICS_KEY]
    started = metrics.clock()
    label = UNMATCHED
    try:
        if len(request.body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(_HTTP_MESSAGES[413])
        route, values = app[TABLE_KEY].match(request.method, request.path)
        label = route.path
        call = Call(
            method=request.method.upper(),
            raw_path=request.path,
            query=tuple(request.query),
            path_values=values,
            body=request.body if route.body is not None else b"",
            token=request.token or None,
            client=None,
            hops=max(1, request.hops),
        )
        reply = await run_call(ctx, route, call)
    except ApiError as exc:
        reply = error_reply(exc)
    except Exception:
        log.exception("api_forwarded_unhandled_error method=%s route=%s", request.method, label)
        reply = error_reply(InternalError())
    metrics.observe(request.method.upper(), label, reply.status, metrics.clock() - started)
    return ForwardedResponse(
        status=reply.status,
        body=reply.encoded(),
        headers=tuple(reply.headers.items()),
        applied_index=ctx.node.applied_index(),
    )
