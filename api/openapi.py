"""The OpenAPI 3.1 document of the API, built from the route table.

Every path, method, parameter, body field and result schema comes from the same ``Route`` and
``Field`` objects that the server routes and validates with, so the document cannot drift from
what is served (a test also compares the document with the served route table in both directions).
Error responses use the ``Error`` envelope; each lists its stable codes in the description and in
the ``x-error-codes`` extension. ``x-quorumd-role`` and ``x-quorumd-placement`` say who may call
an operation and where it runs.
"""

from __future__ import annotations

import json
from typing import Any

from .pipeline import Access, Placement, Route
from .schemas import COMPONENTS, Schema, envelope, ref
from .validation import Field

API_VERSION = "1.0.0"

_BODY_400 = ("invalid_json", "invalid_body", "unknown_field", "missing_field")
_QUERY_400 = ("unknown_parameter", "invalid_parameter")
_LEADER = {
    502: ("leader_unreachable", "leader_error"),
    503: ("no_leader", "commit_timeout"),
    504: ("leader_timeout", "apply_timeout"),
}
_REASONS = {
    400: "Bad input",
    401: "Missing, invalid, expired or revoked token",
    403: "The token's role is too weak",
    404: "Not found",
    409: "Conflicting state",
    413: "Body over 1 MiB",
    429: "Too many failed authentication attempts from this client",
    500: "Internal error (never caused by bad input)",
    502: "The leader is unreachable",
    503: "No leader, or the change was not committed in time",
    504: "The leader (or this node catching up) was too slow",
}


def _error_codes(route: Route) -> dict[int, list[str]]:
    codes: dict[int, list[str]] = {}

    def add(status: int, *names: str) -> None:
        bucket = codes.setdefault(status, [])
        bucket.extend(n for n in names if n not in bucket)

    fields: list[Field] = [*route.path_params, *route.query, *(route.body or ())]
    if fields:
        add(400, *(f.code for f in fields))
    if not route.ignore_query:  # unknown query parameters are rejected everywhere but the probes
        add(400, *_QUERY_400)
    if route.body is not None:
        add(400, *_BODY_400)
        add(413, "payload_too_large")
    if route.access is not Access.PUBLIC:
        add(401, "unauthorized")
        add(429, "rate_limited")
    if route.access is Access.ADMIN:
        add(403, "forbidden")
    if route.cluster:
        add(404, "clustering_disabled")
    if route.placement is not Placement.LOCAL:
        for status, names in _LEADER.items():
            add(status, *names)
    for doc in route.errors:
        add(doc.status, *doc.codes)
    add(500, "internal")
    return codes


def _error_response(status: int, names: list[str]) -> dict[str, Any]:
    resp: dict[str, Any] = {
        "description": f"{_REASONS.get(status, 'Error')}. Codes: " + ", ".join(f"`{n}`" for n in names) + ".",
        "content": {"application/json": {"schema": ref("Error")}},
        "x-error-codes": names,
    }
    if status in (429, 503):
        resp["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    if status == 401:
        resp["headers"] = {
            "WWW-Authenticate": {"description": "Bearer challenge.", "schema": {"type": "string"}}
        }
    if status == 405:
        resp["headers"] = {"Allow": {"schema": {"type": "string"}}}
    return resp


def _success_content(route: Route) -> dict[str, Any]:
    if route.result_schema is not None:
        return {"application/json": {"schema": envelope(route.result_schema)}}
    if route.raw_content_type.startswith("application/json"):
        return {"application/json": {"schema": {"type": "object"}}}
    if route.raw_content_type == "application/octet-stream":
        return {
            "application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
            }
        }
    return {"text/plain": {"schema": {"type": "string"}}}


def _parameter(f: Field, where: str) -> dict[str, Any]:
    return {
        "name": f.name,
        "in": where,
        "required": where == "path" or f.required,
        "description": f.description,
        "schema": dict(f.schema),
    }


def _body_schema(fields: tuple[Field, ...]) -> Schema:
    props: dict[str, Any] = {}
    for f in fields:
        props[f.name] = {**f.schema, **({"description": f.description} if f.description else {})}
    schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "security": [] if route.access is Access.PUBLIC else [{"bearerAuth": []}],
        "x-quorumd-role": str(route.access),
        "x-quorumd-placement": str(route.placement),
    }
    if route.description:
        op["description"] = route.description
    params = [_parameter(f, "path") for f in route.path_params] + [
        _parameter(f, "query") for f in route.query
    ]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": any(f.required for f in route.body),
            "content": {"application/json": {"schema": _body_schema(route.body)}},
        }
    responses: dict[str, Any] = {
        str(route.success_status): {"description": "Success.", "content": _success_content(route)}
    }
    if route.success_headers:
        responses[str(route.success_status)]["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in route.success_headers
        }
    for status, text in route.other_statuses:
        responses[str(status)] = {"description": text, "content": _success_content(route)}
    for status, names in sorted(_error_codes(route).items()):
        responses[str(status)] = _error_response(status, names)
    op["responses"] = responses
    return op


def build_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    tags: list[str] = []
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = operation(r)
        if r.tag not in tags:
            tags.append(r.tag)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "quorumd API",
            "version": API_VERSION,
            "description": (
                "Membership and registry API of a quorumd node. Success bodies are "
                '`{"result": ...}`; failures are `{"error": "<message>", "code": "<snake_case>"}`. '
                "Any node accepts any request: leader-only operations are forwarded to the leader."
            ),
        },
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API token (qd_...)."}
            },
        },
    }


def render(routes: list[Route]) -> bytes:
    """The document as served: canonical JSON (sorted keys) so it is byte-stable."""
    text = json.dumps(build_document(routes), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")
