"""Input validation for the HTTP API: path, query and JSON body fields.

A ``Field`` carries the JSON Schema of one input (the same dict goes into the OpenAPI document, so
the documentation and the checks cannot drift), the error code a bad value gets, and an optional
semantic check (a CIDR must parse). Only the subset of JSON Schema the API uses is interpreted:
``type`` integer/string/boolean, ``minimum``/``maximum``, ``minLength``/``maxLength``, ``pattern``
and ``enum``. Integers are strict: ``true`` is not an integer, and neither are ``1.0``, ``"1"`` or
``null``. Every failure raises ``BadRequest``; nothing here ever lets bad input reach the node.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest

NODE_ID_MIN = 1
NODE_ID_MAX = 63
_QUERY_INT_RE = re.compile(r"0|-?[1-9][0-9]{0,18}")  # canonical decimal: no "+", no leading zeros, no "-0"
_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False
    code: str = "invalid_field"
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    default: Any = None


def _end_anchored(text: str) -> str:
    """``text`` with each ``$`` outside a character class made ``\\Z``: in JSON Schema (ECMA-262)
    ``$`` is the end of the value, in Python also the place before a final newline, which would
    let ``"pool-a\\n"`` through ``^[a-z0-9]+$``."""
    out: list[str] = []
    escaped = in_class = False
    class_start = 0  # where a class's members begin: a "]" there is one of them (Python's rule)
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            if ch == "^" and i == class_start:
                class_start += 1
            elif ch == "]" and i > class_start:
                in_class = False
        elif ch == "[":
            in_class, class_start = True, i + 1
        elif ch == "$":
            out.append("\\Z")
            continue
        out.append(ch)
    return "".join(out)


def _pattern(text: str) -> re.Pattern[str]:
    pat = _PATTERN_CACHE.get(text)
    if pat is None:
        pat = _PATTERN_CACHE[text] = re.compile(_end_anchored(text))
    return pat


def _schema_error(schema: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` does not satisfy ``schema`` (the subset above), or None."""
    kind = schema.get("type")
    if kind == "integer":
        if type(value) is not int:
            return "must be an integer"
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and value < lo:
            return f"must be >= {lo}" if hi is None else f"must be within {lo}..{hi}"
        if hi is not None and value > hi:
            return f"must be <= {hi}" if lo is None else f"must be within {lo}..{hi}"
    elif kind == "boolean":
        if type(value) is not bool:
            return "must be a boolean"
    elif kind == "string":
        if not isinstance(value, str):
            return "must be a string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text"
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if lo is not None and len(value) < lo:
            return f"must have at least {lo} characters"
        if hi is not None and len(value) > hi:
            return f"must have at most {hi} characters"
        pattern = schema.get("pattern")
        if pattern is not None and not _pattern(pattern).search(value):
            return "has an invalid format"
    enum = schema.get("enum")
    if enum is not None and value not in enum:
        return "must be one of " + ", ".join(str(x) for x in enum)
    return None


def check_value(f: Field, value: Any, where: str) -> Any:
    problem = _schema_error(f.schema, value)
    if problem is None and f.check is not None:
        problem = f.check(value)
    if problem is not None:
        raise BadRequest(f"{where} {f.name!r} {problem}", code=f.code)
    return value


def _convert_text(f: Field, text: str, where: str) -> Any:
    kind = f.schema.get("type")
    if kind == "integer":
        if not _QUERY_INT_RE.fullmatch(text):
            raise BadRequest(f"{where} {f.name!r} must be an integer", code=f.code)
        return int(text)
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise BadRequest(f"{where} {f.name!r} must be true or false", code=f.code)
    return text


def parse_text(f: Field, text: str, where: str) -> Any:
    """A path or query value: converted by the schema's type, then checked."""
    return check_value(f, _convert_text(f, text, where), where)


def _defaults(fields: Iterable[Field]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        if f.required:
            raise BadRequest(f"query parameter {f.name!r} is required", code="missing_parameter")
        if f.default is not None:
            out[f.name] = f.default
    return out


def parse_query(fields: Iterable[Field], pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query parameters by name; unknown or repeated names are 400 errors. Defaults fill gaps."""
    if isinstance(pairs, tuple | list) and not pairs:  # most calls: the defaults alone
        return _defaults(fields)
    by_name = {f.name: f for f in fields}
    pairs = list(pairs)
    seen: set[str] = set()
    for name, _text in pairs:  # names first: a repeated one is that, whatever its values
        if name not in by_name:
            raise BadRequest(f"unknown query parameter {name[:64]!r}", code="unknown_parameter")
        if name in seen:
            raise BadRequest(f"query parameter {name!r} is repeated", code="invalid_parameter")
        seen.add(name)
    out: dict[str, Any] = {name: parse_text(by_name[name], text, "query parameter") for name, text in pairs}
    for f in by_name.values():
        if f.name not in out:
            if f.required:
                raise BadRequest(f"query parameter {f.name!r} is required", code="missing_parameter")
            if f.default is not None:
                out[f.name] = f.default
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: ``json.loads`` with hooks constructs a new decoder (and scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys; 400 ``invalid_json`` otherwise."""
    try:
        text = body.decode("utf-8")
        return _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = (
            "body is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "body is not valid JSON"
        )
        raise BadRequest(detail, code="invalid_json") from None


def parse_body(fields: Iterable[Field], body: bytes) -> dict[str, Any]:
    """A JSON object body checked field by field. An empty body counts as ``{}``."""
    by_name = {f.name: f for f in fields}
    if not body or body.isspace():  # same whitespace as bytes.strip(), without copying the body
        obj: Any = {}
    else:
        obj = decode_json(body)
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    for key in obj:
        if key not in by_name:
            raise BadRequest(f"unknown field {key[:64]!r}", code="unknown_field")
    out: dict[str, Any] = {}
    for f in by_name.values():
        if f.name in obj:
            out[f.name] = check_value(f, obj[f.name], "field")
        elif f.required:
            raise BadRequest(f"field {f.name!r} is required", code="missing_field")
    return out


# --- shared field definitions ------------------------------------------------------------------


def _cidr_problem(value: Any) -> str | None:
    if "/" not in value:
        return "must be a network in CIDR notation (address/prefix)"
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return "is not a valid IPv4 or IPv6 network (host bits must be zero)"
    return None


NODE_ID_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": NODE_ID_MIN, "maximum": NODE_ID_MAX}
# The intersection of the API contract ([a-z0-9._-]{1,64}) and the registry's own rule (first
# character alphanumeric, at most 63), so the API never accepts a name the registry refuses.
POOL_NAME_SCHEMA: dict[str, Any] = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}
TOKEN_ID_SCHEMA: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{12}$"}
LEASE_ID_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
PRINTABLE = "^[^\\u0000-\\u001f\\u007f]*$"


def node_id_path() -> Field:
    return Field("id", NODE_ID_SCHEMA, "Node id (1..63).", required=True, code="invalid_node_id")


POOL_NAME_PATH = Field("name", POOL_NAME_SCHEMA, "Pool name.", required=True, code="invalid_pool_name")
TOKEN_ID_PATH = Field(
    "id", TOKEN_ID_SCHEMA, "Token id (12 hex characters).", required=True, code="invalid_token_id"
)
LEASE_ID_PATH = Field("id", LEASE_ID_SCHEMA, "Lease id.", required=True, code="invalid_lease_id")
CONSISTENT_QUERY = Field(
    "consistent",
    {"type": "boolean", "default": False},
    "Linearizable read through the leader instead of the local replica.",
    code="invalid_parameter",
)


def cidr_check(value: Any) -> str | None:
    return _cidr_problem(value)


@dataclass(slots=True)  # one per request: a frozen dataclass's __init__ costs ~4x
class Args:
    """Validated inputs of one request."""

    path: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
