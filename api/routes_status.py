"""Public routes: /api/v1/status, /healthz, /readyz, /metrics, /api/v1/metrics, /api/v1/openapi.json.

None needs a token. /healthz answers 200 while the process serves HTTP; /readyz answers 503
``not_ready`` (with Retry-After) until the node has joined, knows a leader and has applied up to
the commit index, and 503 ``isolated`` while the node is fenced.
The metrics text comes from the registry the node layer handed to ``build_app``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .errors import ApiError
from .pipeline import Access, Context, ErrorDoc, Reply, Route
from .schemas import ref
from .validation import Args

REGISTRY_KEY = "registry"


async def get_status(ctx: Context, args: Args) -> Reply:
    return Reply(result=ctx.node.status())


async def healthz(ctx: Context, args: Args) -> Reply:
    return Reply(result={"status": "ok"})


async def readyz(ctx: Context, args: Args) -> Reply:
    if ctx.node.is_isolated():
        raise ApiError(
            503, "isolated", "the node has not heard from a quorum (fenced)", headers={"Retry-After": "1"}
        )
    if not ctx.node.is_ready():
        raise ApiError(503, "not_ready", "the node is not ready", headers={"Retry-After": "1"})
    return Reply(result={"ready": True})


async def metrics(ctx: Context, args: Args) -> Reply:
    registry = ctx.extras[REGISTRY_KEY]
    assert isinstance(registry, CollectorRegistry)
    return Reply(body=generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


async def api_metrics(ctx: Context, args: Args) -> Reply:
    return await metrics(ctx, args)


async def openapi_document(ctx: Context, args: Args) -> Reply:
    return Reply(body=ctx.openapi_json)


def routes() -> list[Route]:
    tag = "status"
    return [
        Route(
            "GET",
            "/api/v1/status",
            get_status,
            "Node status",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            result_schema=ref("Status"),
        ),
        Route(
            "GET",
            "/healthz",
            healthz,
            "Liveness",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            result_schema=ref("Health"),
        ),
        Route(
            "GET",
            "/readyz",
            readyz,
            "Readiness",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            result_schema=ref("Readiness"),
            errors=(ErrorDoc(503, ("not_ready", "isolated")),),
            description="Ready: joined, leader known, applied caught up with the commit index, and "
            "not fenced (503 isolated: no quorum heard for cluster.isolation-fence-after).",
        ),
        Route(
            "GET",
            "/metrics",
            metrics,
            "Prometheus metrics",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            raw_content_type=CONTENT_TYPE_LATEST,
        ),
        Route(
            "GET",
            "/api/v1/metrics",
            api_metrics,
            "Prometheus metrics",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            raw_content_type=CONTENT_TYPE_LATEST,
        ),
        Route(
            "GET",
            "/api/v1/openapi.json",
            openapi_document,
            "This OpenAPI document",
            tag,
            Access.PUBLIC,
            ignore_query=True,
            raw_content_type="application/json",
        ),
    ]
