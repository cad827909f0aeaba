"""GET /api/v1/audit: the audit trail. Admin only.

Served from the receiving node's replica (``?consistent=true``: through the leader), so every
node gives the same answer once it has applied the same index. Records are sorted by id,
oldest first; ``after`` pages forward (the last id seen), ``limit`` is 1..1000 (default 100),
``action`` keeps one action and ``actor`` one token id. What is audited, and what is not, is
documented in docs/operations.md ("Audit trail").
"""

from __future__ import annotations

from .pipeline import Access, Context, Placement, Reply, Route
from .schemas import array, ref
from .validation import CONSISTENT_QUERY, TOKEN_ID_SCHEMA, Args, Field

P = "/api/v1/audit"
# The actions a record can have (the node's ``quorumd.node.registry.audit.AuditAction``; a test
# keeps the two equal).
AUDIT_ACTIONS = (
    "member_remove",
    "member_promote",
    "member_drain",
    "member_drained",
    "member_resume",
    "member_join",
    "member_address_changed",
    "join_token_mint",
    "token_create",
    "token_revoke",
    "pool_create",
    "pool_delete",
    "leadership_transfer",
    "autopilot_promote",
    "autopilot_remove",
    "certificate_rotate",
    "backup_export",
)
MAX_LIMIT = 1000
Q_AFTER = Field(
    "after",
    {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "Return records with id greater than this (the last id seen).",
    code="invalid_parameter",
)
Q_LIMIT = Field(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
    f"Page size (default 100, at most {MAX_LIMIT}).",
    code="invalid_limit",
    default=100,
)
Q_ACTION = Field(
    "action",
    {"type": "string", "enum": list(AUDIT_ACTIONS)},
    "Only records of this action.",
    code="invalid_action",
)
Q_ACTOR = Field("actor", TOKEN_ID_SCHEMA, "Only records made by this token id.", code="invalid_token_id")


async def list_audit(ctx: Context, args: Args) -> Reply:
    q = args.query
    result = ctx.node.audit(
        after=q.get("after"), limit=int(q["limit"]), action=q.get("action"), actor=q.get("actor")
    )
    return Reply(result=result)


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            P,
            list_audit,
            "List audit records",
            "audit",
            Access.ADMIN,
            Placement.READ,
            query=(Q_AFTER, Q_LIMIT, Q_ACTION, Q_ACTOR, CONSISTENT_QUERY),
            result_schema=array(ref("AuditRecord")),
            description=(
                "Every successful state-changing call (except lease allocate and release), every "
                "autopilot action, drain completed by a deadline, join, leadership transfer caused "
                "by a drain, removal or stop, and backup export, written in the same log entry as "
                "the change. Refused requests (401, 403, 429) are counted in "
                "`quorumd_api_auth_failures_total`, never recorded. Sorted by id, oldest first."
            ),
        ),
    ]
