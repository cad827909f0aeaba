"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of the API's result objects.

Routes reference these by ``ref("Name")``; ``quorumd.api.openapi`` puts ``COMPONENTS`` into the
document. Result objects list the fields clients may rely on and allow additional ones, so the
node may add information without breaking clients; the envelopes themselves are closed.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
TIMESTAMP: Schema = {"type": "string", "description": "RFC 3339 UTC timestamp"}
NODE_ID: Schema = {"type": "integer", "minimum": 0, "maximum": 63}
DRAIN_STATE: Schema = {"type": "string", "enum": ["active", "draining", "drained"]}
ROLE: Schema = {"type": "string", "enum": ["admin", "readonly"]}
AUTOPILOT_REASONS = (
    "no_contact",
    "left",
    "term_behind",
    "log_behind",
    "stabilizing",
    "draining",
    "drained",
    "not_caught_up",
)
WHAT_IF_WARNINGS = (
    "quorum_lost",
    "failure_tolerance_zero",
    "leader_moves",
    "last_voter",
    "below_min_quorum",
    "not_caught_up",
)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    props = dict(required)
    props.update(optional or {})
    return {"type": "object", "required": sorted(required), "properties": props, **extra}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


COMPONENTS: dict[str, Schema] = {
    "Message": obj({"message": STR}),
    "Member": obj(
        {
            "nodeId": NODE_ID,
            "raftAddress": STR,
            "apiAddress": STR,
            "binaryVersion": STR,
            "suffrage": {"type": "string", "enum": ["voter", "nonvoter"]},
            "isLeader": BOOL,
            "drainState": DRAIN_STATE,
            "activeLeases": {"type": "integer", "minimum": 0},
        },
        {
            "protocolVersion": {
                "type": "integer",
                "minimum": 1,
                "description": "the protocol version the member speaks (recorded in the replicated "
                "state, else learned from the member, else 1); absent from protocol-1 builds",
            },
            "certificateFingerprint": {
                "type": "string",
                "pattern": "^sha256:[0-9a-f]{64}$",
                "description": "the member's pinned certificate (absent from builds before rotation)",
            },
            "certificateExpiresAt": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "notAfter of that certificate (RFC 3339)",
            },
        },
    ),
    "CertificateRotation": obj(
        {
            "certificateFingerprint": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
            "certificateExpiresAt": {"type": ["string", "null"], "format": "date-time"},
        }
    ),
    "AutopilotServer": obj(
        {
            "nodeId": NODE_ID,
            "raftAddress": STR,
            "nodeStatus": {"type": "string", "enum": ["alive", "left", "failed"]},
            "healthy": BOOL,
            "isLeader": BOOL,
            "hasVotingRights": BOOL,
            "stableSince": TIMESTAMP,
            "lastContactMs": {"type": ["number", "null"]},
            "lastTerm": INT,
            "lastIndex": INT,
            "trailingLogs": {"type": "integer", "minimum": 0, "description": "entries behind the leader"},
            "reasons": array(
                {
                    "type": "string",
                    "enum": list(AUTOPILOT_REASONS),
                    "description": "why the server is not healthy and settled; empty when it is",
                }
            ),
            "promotionAt": {
                "type": ["string", "null"],
                "description": "RFC 3339 UTC: predicted promotion time; null unless stabilizing",
            },
        }
    ),
    "WhatIf": obj(
        {
            "voters": array(NODE_ID),
            "quorum": {"type": "integer", "minimum": 1},
            "healthyVoters": {"type": "integer", "minimum": 0},
            "failureTolerance": {"type": "integer", "minimum": 0},
            "leaderNodeId": {**NODE_ID, "description": "predicted leader; 0 when none could lead"},
            "safe": {"type": "boolean", "description": "false iff quorum_lost or last_voter"},
            "warnings": array({"type": "string", "enum": list(WHAT_IF_WARNINGS)}),
        }
    ),
    "Autopilot": obj(
        {
            "healthy": BOOL,
            "failureTolerance": {"type": "integer", "minimum": 0},
            "leaderNodeId": NODE_ID,
            "voters": array(NODE_ID),
            "servers": array(ref("AutopilotServer")),
        }
    ),
    "DrainResult": obj({"drainState": {"type": "string", "enum": ["draining", "drained"]}}),
    "JoinToken": obj({"token": STR, "expiresAt": {"type": "integer", "description": "unix seconds"}}),
    "Status": obj(
        {
            "version": STR,
            "nodeId": NODE_ID,
            "clusterId": {"type": ["string", "null"]},
            "role": {"type": "string", "enum": ["leader", "follower", "candidate"]},
            "term": INT,
            "leaderNodeId": NODE_ID,
            "leaderApiAddress": {"type": ["string", "null"]},
            "commitIndex": INT,
            "appliedIndex": INT,
            "ready": BOOL,
            "drainState": DRAIN_STATE,
        },
        {
            "clusterProtocolVersion": {
                "type": "integer",
                "minimum": 1,
                "description": "the lowest protocolVersion of the members; absent from protocol-1 builds",
            },
            "isolated": {"type": "boolean", "description": "fenced: no quorum heard lately"},
            "bgp": {
                "type": "object",
                "properties": {
                    "running": BOOL,
                    "announcedPrefixes": INT,
                    "fencingToken": {
                        "type": ["object", "null"],
                        "properties": {"term": INT, "index": INT},
                        "description": "(term, index) of the log entry behind the last change",
                    },
                },
            },
        },
    ),
    "Health": obj({"status": {"type": "string", "enum": ["ok"]}}),
    "Readiness": obj({"ready": BOOL}),
    "AuditRecord": obj(
        {
            "id": {"type": "integer", "minimum": 1, "description": "increasing; never reused"},
            "time": TIMESTAMP,
            "actor": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string", "enum": ["token", "system"]},
                    "tokenId": STR,
                    "name": {"type": "string", "description": "the token's name (bootstrap: admin)"},
                    "component": {
                        "type": "string",
                        "enum": ["autopilot", "drain", "join", "shutdown", "certificates"],
                    },
                },
            },
            "action": STR,
            "target": {"type": "string", "description": "node:N, token:ID, pool:NAME or cluster"},
            "detail": {"type": "object"},
            "viaNodeId": {"type": ["integer", "null"], "description": "null for system actions"},
            "sourceAddress": {
                "type": ["string", "null"],
                "description": "the original client's IP address; null for system actions",
            },
        }
    ),
    "Token": obj(
        {
            "id": STR,
            "name": STR,
            "role": ROLE,
            "createdAt": TIMESTAMP,
            "expiresAt": {"type": ["integer", "null"], "description": "unix seconds; null: never"},
        }
    ),
    "CreatedToken": obj(
        {
            "id": STR,
            "name": STR,
            "role": ROLE,
            "token": {"type": "string", "description": "the bearer secret; shown only once"},
            "expiresAt": {"type": ["integer", "null"], "description": "unix seconds; null: never"},
        }
    ),
    "Pool": obj(
        {"name": STR, "cidr": STR},
        {"size": INT, "allocated": INT, "createdAt": TIMESTAMP},
    ),
    "Lease": obj(
        {
            "id": INT,
            "pool": STR,
            "address": STR,
            "holder": STR,
            "nodeId": NODE_ID,
            "createdAt": TIMESTAMP,
        }
    ),
    "Error": {
        "type": "object",
        "required": ["error", "code"],
        "properties": {
            "error": {"type": "string", "description": "human-readable message"},
            "code": {
                "type": "string",
                "pattern": "^[a-z][a-z0-9_]*$",
                "description": "stable snake_case code",
            },
        },
        "additionalProperties": False,
    },
}


def envelope(result: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["result"],
        "properties": {"result": result},
        "additionalProperties": False,
    }
