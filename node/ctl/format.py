"""Human output of ``quorumctl``: aligned tables and key/value blocks for the API's result shapes.

Renderers take the ``result`` JSON and return text (no trailing newline). Unknown or missing fields
print as ``-``; booleans as ``yes``/``no``; unix-second expiries as RFC 3339 UTC. Every value that
came from the server is stripped of control characters first, so a lease holder or token name
cannot move the cursor or rewrite the terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

Column = tuple[str, Callable[[Mapping[str, Any]], Any]]


def cell(value: Any) -> str:
    """One value as table text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | dict):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    return _CONTROL.sub("?", text)


def unix_time(value: Any) -> str:
    """Unix seconds as RFC 3339 UTC; ``never`` for null."""
    if value is None:
        return "never"
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):
            pass
    return cell(value)


def field(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: row.get(name)


def table(rows: Sequence[Any], columns: Sequence[Column]) -> str:
    """Aligned columns separated by two spaces; the last column is not padded."""
    grid = [[h for h, _ in columns]]
    for row in rows:
        r = row if isinstance(row, Mapping) else {}
        grid.append([cell(get(r)) for _, get in columns])
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    out = []
    for line in grid:
        padded = [v.ljust(w) for v, w in zip(line[:-1], widths[:-1], strict=True)] + [line[-1]]
        out.append("  ".join(padded).rstrip())
    return "\n".join(out)


def key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    """``Label:  value`` lines with the values aligned."""
    if not pairs:
        return ""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {cell(v)}" for k, v in pairs)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def generic(result: Any) -> str:
    """Fallback: a message, a key/value block, or a table of the keys of the first row."""
    if result is None:
        return "ok"
    if isinstance(result, Mapping):
        if set(result) == {"message"}:
            return cell(result["message"])
        pairs: list[tuple[str, Any]] = []
        _flatten("", result, pairs)
        return key_values(pairs)
    if isinstance(result, list):
        if not result:
            return "(none)"
        first = result[0]
        if isinstance(first, Mapping):
            return table(result, [(str(k), field(str(k))) for k in first])
        return "\n".join(cell(v) for v in result)
    return cell(result)


# --- resources ---------------------------------------------------------------------------------

MEMBER_COLUMNS: list[Column] = [
    ("ID", field("nodeId")),
    ("RAFT-ADDRESS", field("raftAddress")),
    ("API-ADDRESS", field("apiAddress")),
    ("VERSION", field("binaryVersion")),
    ("SUFFRAGE", field("suffrage")),
    ("LEADER", field("isLeader")),
    ("DRAIN", field("drainState")),
    ("LEASES", field("activeLeases")),
    ("PROTOCOL", field("protocolVersion")),  # "-": served by a protocol-1 build
]

AUTOPILOT_COLUMNS: list[Column] = [
    ("ID", field("nodeId")),
    ("RAFT-ADDRESS", field("raftAddress")),
    ("STATUS", field("nodeStatus")),
    ("HEALTHY", field("healthy")),
    ("LEADER", field("isLeader")),
    ("VOTER", field("hasVotingRights")),
    ("STABLE-SINCE", field("stableSince")),
    ("LAST-CONTACT-MS", field("lastContactMs")),
    ("TERM", field("lastTerm")),
    ("INDEX", field("lastIndex")),
    ("TRAILING", field("trailingLogs")),
    ("REASONS", lambda r: _codes(r.get("reasons"))),
    ("PROMOTION-AT", field("promotionAt")),
]


def _codes(value: Any) -> Any:
    """A list of codes as ``a,b``; an empty list as ``-`` (healthy and settled)."""
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or None
    return value


TOKEN_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("NAME", field("name")),
    ("ROLE", field("role")),
    ("CREATED", field("createdAt")),
    ("EXPIRES", lambda r: unix_time(r.get("expiresAt"))),
]

POOL_COLUMNS: list[Column] = [
    ("NAME", field("name")),
    ("CIDR", field("cidr")),
    ("SIZE", field("size")),
    ("ALLOCATED", field("allocated")),
    ("CREATED", field("createdAt")),
]

LEASE_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("POOL", field("pool")),
    ("ADDRESS", field("address")),
    ("HOLDER", field("holder")),
    ("NODE", field("nodeId")),
    ("CREATED", field("createdAt")),
]


def _actor(record: Mapping[str, Any]) -> str:
    actor = record.get("actor")
    if not isinstance(actor, Mapping):
        return cell(actor)
    if actor.get("type") == "system":
        return f"system:{cell(actor.get('component'))}"
    return f"{cell(actor.get('name'))} ({cell(actor.get('tokenId'))})"


def _detail(record: Mapping[str, Any]) -> str:
    detail = record.get("detail")
    if not isinstance(detail, Mapping) or not detail:
        return "-"
    return ",".join(f"{k}={cell(v)}" for k, v in detail.items())


AUDIT_COLUMNS: list[Column] = [
    ("ID", field("id")),
    ("TIME", field("time")),
    ("ACTOR", _actor),
    ("ACTION", field("action")),
    ("TARGET", field("target")),
    ("DETAIL", _detail),
    ("VIA", field("viaNodeId")),
    ("SOURCE", field("sourceAddress")),
]

STATUS_LABELS = {
    "version": "Version",
    "nodeId": "Node ID",
    "clusterId": "Cluster ID",
    "role": "Role",
    "term": "Term",
    "leaderNodeId": "Leader",
    "leaderApiAddress": "Leader API",
    "commitIndex": "Commit index",
    "appliedIndex": "Applied index",
    "ready": "Ready",
    "drainState": "Drain state",
    "clusterProtocolVersion": "Cluster protocol",
}


def _rows(result: Any) -> list[Any]:
    return list(result) if isinstance(result, list) else []


def members(result: Any) -> str:
    return table(_rows(result), MEMBER_COLUMNS)


def member(result: Any) -> str:
    return table([result], MEMBER_COLUMNS)


def tokens(result: Any) -> str:
    return table(_rows(result), TOKEN_COLUMNS)


def audit(result: Any) -> str:
    return table(_rows(result), AUDIT_COLUMNS)


def pools(result: Any) -> str:
    return table(_rows(result), POOL_COLUMNS)


def pool(result: Any) -> str:
    return table([result], POOL_COLUMNS)


def leases(result: Any) -> str:
    return table(_rows(result), LEASE_COLUMNS)


def lease(result: Any) -> str:
    return table([result], LEASE_COLUMNS)


def autopilot(result: Any) -> str:
    r = result if isinstance(result, Mapping) else {}
    voters = r.get("voters")
    voter_text = ",".join(cell(v) for v in voters) if isinstance(voters, list) else cell(voters)
    header = (
        f"Healthy: {cell(r.get('healthy'))}   Failure tolerance: {cell(r.get('failureTolerance'))}   "
        f"Leader: {cell(r.get('leaderNodeId'))}   Voters: {voter_text}"
    )
    servers = r.get("servers")
    return header + "\n\n" + table(servers if isinstance(servers, list) else [], AUTOPILOT_COLUMNS)


def what_if(result: Any) -> str:
    r = result if isinstance(result, Mapping) else {}
    voters = r.get("voters")
    return key_values(
        [
            ("Safe", r.get("safe")),
            ("Voters", ",".join(cell(v) for v in voters) if isinstance(voters, list) else voters),
            ("Quorum", r.get("quorum")),
            ("Healthy voters", r.get("healthyVoters")),
            ("Failure tolerance", r.get("failureTolerance")),
            ("Leader", r.get("leaderNodeId")),
            ("Warnings", _codes(r.get("warnings")) or "none"),
        ]
    )


def status(result: Any) -> str:
    if not isinstance(result, Mapping):
        return generic(result)
    pairs: list[tuple[str, Any]] = [(STATUS_LABELS[k], result.get(k)) for k in STATUS_LABELS if k in result]
    rest: list[tuple[str, Any]] = []
    for k, v in result.items():
        if k not in STATUS_LABELS:
            _flatten(str(k), v, rest)
    return key_values(pairs + rest)


def created_token(result: Any) -> str:
    r = result if isinstance(result, Mapping) else {}
    return key_values(
        [
            ("ID", r.get("id")),
            ("Name", r.get("name")),
            ("Role", r.get("role")),
            ("Expires", unix_time(r.get("expiresAt"))),
            ("Token", r.get("token")),
        ]
    )


def join_token(result: Any) -> str:
    r = result if isinstance(result, Mapping) else {}
    return key_values([("Token", r.get("token")), ("Expires", unix_time(r.get("expiresAt")))])
