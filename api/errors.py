"""Typed API errors and the JSON envelopes every response uses.

Handlers and the node layer raise ``ApiError`` (or a subclass); one middleware in
``quorumd.api.app`` turns it into ``{"error": "<human message>", "code": "<snake_case>"}`` with the
error's status and headers. Success bodies are ``{"result": ...}``. Nothing here logs: messages are
chosen by the raiser and must never contain tokens or request bodies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
WWW_AUTHENTICATE = 'Bearer realm="quorumd"'


class ApiError(Exception):
    """An error a client should see: HTTP status, stable snake_case code, human message."""

    status: int = 500
    default_code: str = "internal"

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class _Typed(ApiError):
    """Base of the fixed-status errors: ``Cls(message, code=..., headers=...)``."""

    def __init__(
        self, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(type(self).status, code or type(self).default_code, message, headers)


class BadRequest(_Typed):
    status = 400
    default_code = "bad_request"


class Unauthorized(_Typed):
    status = 401
    default_code = "unauthorized"

    def __init__(
        self, message: str = "a valid bearer token is required", *, invalid_token: bool = False
    ) -> None:
        challenge = WWW_AUTHENTICATE + (', error="invalid_token"' if invalid_token else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(_Typed):
    status = 403
    default_code = "forbidden"


class NotFound(_Typed):
    status = 404
    default_code = "not_found"


class MethodNotAllowed(_Typed):
    status = 405
    default_code = "method_not_allowed"

    def __init__(self, message: str = "method not allowed", *, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message, headers={"Allow": ", ".join(sorted(allowed))} if allowed else None)


class Conflict(_Typed):
    """409; codes: not_drained, already_voter, not_caught_up, last_voter, node_draining,
    pool_exhausted, already_member, pool_exists, pool_overlap, pool_in_use, ..."""

    status = 409
    default_code = "conflict"


class PayloadTooLarge(_Typed):
    status = 413
    default_code = "payload_too_large"


class TooManyRequests(_Typed):
    status = 429
    default_code = "rate_limited"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_seconds))})


class InternalError(_Typed):
    status = 500
    default_code = "internal"

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)


class LeaderUnreachable(_Typed):
    status = 502
    default_code = "leader_unreachable"


class LeaderUnavailable(_Typed):
    """503 ``no_leader``: no leader is known (or a forwarded request reached a non-leader)."""

    status = 503
    default_code = "no_leader"

    def __init__(
        self, message: str = "no leader is known; retry shortly", *, retry_after_seconds: int = 1
    ) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})


class CommitTimeout(_Typed):
    status = 503
    default_code = "commit_timeout"

    def __init__(
        self, message: str = "the change was not committed in time", *, retry_after_seconds: int = 1
    ) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})


class LeaderTimeout(_Typed):
    status = 504
    default_code = "leader_timeout"


# Built once: ``json.dumps`` with non-default options constructs a new encoder on every call.
_STDLIB_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Without these, orjson would serialize dataclasses and datetimes the standard encoder refuses.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson is an order of magnitude faster than the standard library on
    every response body; whatever it refuses (integers beyond 64 bits such as an IPv6 pool's
    size, non-string keys, unknown types) goes through the standard encoder, which produces the
    same JSON as before or raises as before."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _STDLIB_ENCODER.encode(obj).encode("utf-8")


def error_body(code: str, message: str) -> bytes:
    return encode_json({"error": message, "code": code})


def result_body(result: Any) -> bytes:
    return encode_json({"result": result})
