"""Routes for address leases: allocate, list (paged by id), release.

POST /leases answers 201 when it allocated a new address and 200 when the same (pool, holder)
already held one (re-owned to the requested node).
Without ``nodeId`` the lease belongs to the node that received the HTTP request: a follower
writes its own id into the body before forwarding, so the leader never substitutes itself.
"""

from __future__ import annotations

from .errors import encode_json
from .pipeline import Access, Context, ErrorDoc, Placement, Reply, Route
from .schemas import array, ref
from .validation import (
    CONSISTENT_QUERY,
    LEASE_ID_PATH,
    NODE_ID_SCHEMA,
    POOL_NAME_SCHEMA,
    PRINTABLE,
    Args,
    Field,
    decode_json,
)

P = "/api/v1/leases"
POOL = Field("pool", POOL_NAME_SCHEMA, "Pool to allocate from.", required=True, code="invalid_pool_name")
HOLDER = Field(
    "holder",
    {"type": "string", "minLength": 1, "maxLength": 256, "pattern": PRINTABLE},
    "Who holds the address (1..256 printable characters).",
    required=True,
    code="invalid_holder",
)
OWNER = Field(
    "nodeId", NODE_ID_SCHEMA, "Owner node; default: the node serving the request.", code="invalid_node_id"
)
Q_NODE = Field("nodeId", NODE_ID_SCHEMA, "Only leases owned by this node.", code="invalid_node_id")
Q_POOL = Field("pool", POOL_NAME_SCHEMA, "Only leases of this pool.", code="invalid_pool_name")
Q_LIMIT = Field(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
    "Page size (default 1000).",
    code="invalid_limit",
    default=1000,
)
Q_AFTER = Field(
    "after",
    {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "Return leases with id greater than this (the last id seen).",
    code="invalid_parameter",
)


async def allocate_lease(ctx: Context, args: Args) -> Reply:
    pool, holder = str(args.body["pool"]), str(args.body["holder"])
    owner = int(args.body.get("nodeId", ctx.node_id))
    lease, created = await ctx.node.allocate_lease_reporting(pool, holder, owner)
    return Reply(status=201 if created else 200, result=lease)


def _with_owner(ctx: Context, args: Args, body: bytes) -> bytes:
    if "nodeId" in args.body:
        return body
    obj = decode_json(body) if body.strip() else {}
    obj["nodeId"] = ctx.node_id
    return encode_json(obj)


async def list_leases(ctx: Context, args: Args) -> Reply:
    q = args.query
    result = ctx.node.leases(
        node_id=q.get("nodeId"), pool=q.get("pool"), limit=int(q["limit"]), after=q.get("after")
    )
    return Reply(result=result)


async def release_lease(ctx: Context, args: Args) -> Reply:
    await ctx.node.release_lease(int(args.path["id"]))
    return Reply(result={"message": "Lease released"})


def routes() -> list[Route]:
    tag = "leases"
    return [
        Route(
            "POST",
            P,
            allocate_lease,
            "Allocate a lease",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            body=(POOL, HOLDER, OWNER),
            success_status=201,
            result_schema=ref("Lease"),
            other_statuses=((200, "The (pool, holder) already had a lease; it is returned, re-owned."),),
            errors=(
                ErrorDoc(404, ("pool_not_found", "member_not_found")),
                ErrorDoc(409, ("node_draining", "pool_exhausted")),
            ),
            forward_body=_with_owner,
            self_bounded=True,
        ),
        Route(
            "GET",
            P,
            list_leases,
            "List leases",
            tag,
            Access.READONLY,
            Placement.READ,
            query=(Q_NODE, Q_POOL, Q_LIMIT, Q_AFTER, CONSISTENT_QUERY),
            result_schema=array(ref("Lease")),
            description="Sorted by id; page with after=<last id seen>.",
        ),
        Route(
            "DELETE",
            P + "/{id}",
            release_lease,
            "Release a lease",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(LEASE_ID_PATH,),
            result_schema=ref("Message"),
            errors=(ErrorDoc(404, ("lease_not_found",)),),
            self_bounded=True,
        ),
    ]
