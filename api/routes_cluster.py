"""Routes under /api/v1/cluster: members, addresses, promote, drain, resume, removal, certificate
rotation, autopilot, join tokens.

All answer 404 ``clustering_disabled`` on a standalone node (see ``quorumd.api.pipeline``).
Membership checks (404 ``member_not_found``) run where the operation runs, i.e. on the leader,
whose replica is authoritative; a follower only checks the syntax before forwarding.
"""

from __future__ import annotations

from .errors import ApiError, BadRequest, NotFound
from .pipeline import Access, Context, ErrorDoc, Placement, Reply, Route, SettleFn
from .schemas import array, ref
from .validation import CONSISTENT_QUERY, NODE_ID_SCHEMA, Args, Field, node_id_path

P = "/api/v1/cluster"

DEADLINE_SCHEMA = {"type": "integer", "minimum": 0, "maximum": 3600, "default": 0}
DEADLINE_DOC = (
    "Seconds to wait for the node's active-lease count to reach zero; 0 (default) drains "
    "synchronously. Integer only (null, strings and floats are rejected)."
)
DEADLINE_BODY = Field("deadlineSeconds", DEADLINE_SCHEMA, DEADLINE_DOC, code="invalid_deadline")
DEADLINE_QUERY = Field("deadlineSeconds", DEADLINE_SCHEMA, DEADLINE_DOC, code="invalid_deadline")
FORCE_QUERY = Field(
    "force",
    {"type": "boolean", "default": False},
    "Bypass the drained precondition.",
    code="invalid_parameter",
)
JOIN_NODE_ID = Field(
    "nodeID", NODE_ID_SCHEMA, "Node id of the joining host.", required=True, code="invalid_node_id"
)
JOIN_TTL = Field(
    "ttlSeconds",
    {"type": "integer", "minimum": 300, "maximum": 86400, "default": 1800},
    "Token lifetime in seconds (default 1800).",
    code="invalid_ttl",
)
MEMBER_404 = ErrorDoc(404, ("member_not_found",))
_ADDRESS = {"type": "string", "minLength": 1, "maxLength": 300, "pattern": "^[^\\s]+$"}
RAFT_ADDRESS_BODY = Field(
    "raftAddress",
    _ADDRESS,
    "The member's cluster address, host:port or [v6]:port (as cluster.advertise-address).",
    code="invalid_raft_address",
)
API_ADDRESS_BODY = Field(
    "apiAddress", _ADDRESS, "The member's API address, https://host:port.", code="invalid_api_address"
)
_ID = "([1-9]|[1-5][0-9]|6[0-3])"
NODE_ID_LIST_SCHEMA = {"type": "string", "pattern": f"^{_ID}(,{_ID})*$", "maxLength": 256}


def _id_list(name: str, what: str) -> Field:
    return Field(name, NODE_ID_LIST_SCHEMA, f"Comma-separated node ids {what}.", code="invalid_node_id")


WHAT_IF_QUERY = (
    _id_list("remove", "to remove"),
    _id_list("fail", "to consider failed"),
    _id_list("drain", "to drain"),
    _id_list("promote", "to promote to voter"),
)


def require_member(ctx: Context, node_id: int) -> None:
    if not ctx.node.has_member(node_id):
        raise NotFound(f"node {node_id} is not a cluster member", code="member_not_found")


async def list_members(ctx: Context, args: Args) -> Reply:
    return Reply(result=ctx.node.members())


async def remove_member(ctx: Context, args: Args) -> Reply:
    node_id = int(args.path["id"])
    require_member(ctx, node_id)
    await ctx.node.remove_member(node_id, force=bool(args.query.get("force", False)))
    return Reply(result={"message": "Cluster member removed"})


def removed_leader_outcome(ctx: Context, args: Args) -> SettleFn | None:
    """A follower forwarded "remove node X" to the leader X and lost the answer (502/504).

    Removing the leader hands leadership over and then removes X; a follower that applies the
    removal drops its connections to X at once (X's pin is gone), which can cut off X's answer.
    When the local replica showed X as a member before the forward and no longer does after it,
    the removal happened: say so. A node the replica did not know is never reported removed.
    """
    node_id = int(args.path["id"])
    if not ctx.node.has_member(node_id):
        return None

    async def settle(exc: ApiError) -> Reply | None:
        if ctx.node.has_member(node_id):
            return None
        return Reply(result={"message": "Cluster member removed"})

    return settle


async def promote_member(ctx: Context, args: Args) -> Reply:
    node_id = int(args.path["id"])
    require_member(ctx, node_id)
    await ctx.node.promote_member(node_id)
    return Reply(result={"message": "Cluster member promoted to voter"})


async def get_autopilot(ctx: Context, args: Args) -> Reply:
    return Reply(result=await ctx.node.autopilot())


def _ids(args: Args, name: str) -> list[int]:
    text = str(args.query.get(name, ""))
    return [int(x) for x in text.split(",")] if text else []


async def get_what_if(ctx: Context, args: Args) -> Reply:
    answer = await ctx.node.what_if(
        remove=_ids(args, "remove"),
        fail=_ids(args, "fail"),
        drain=_ids(args, "drain"),
        promote=_ids(args, "promote"),
    )
    return Reply(result=answer)


def _one_deadline(args: Args) -> None:
    if "deadlineSeconds" in args.body and "deadlineSeconds" in args.query:
        raise BadRequest(
            "give deadlineSeconds in the body or in the query, not both", code="invalid_deadline"
        )


async def drain_member(ctx: Context, args: Args) -> Reply:
    node_id = int(args.path["id"])
    deadline = int(args.body.get("deadlineSeconds", args.query.get("deadlineSeconds", 0)))
    require_member(ctx, node_id)
    state = await ctx.node.drain_member(node_id, deadline_seconds=deadline)
    return Reply(result={"drainState": str(state)})


async def resume_member(ctx: Context, args: Args) -> Reply:
    node_id = int(args.path["id"])
    require_member(ctx, node_id)
    await ctx.node.resume_member(node_id)
    return Reply(result={"message": "Cluster member resumed"})


def _some_address(args: Args) -> None:
    if not args.body:
        raise BadRequest("give raftAddress, apiAddress or both", code="missing_field")


async def set_member_address(ctx: Context, args: Args) -> Reply:
    node_id = int(args.path["id"])
    require_member(ctx, node_id)
    result = await ctx.node.set_member_address(
        node_id, raft_address=args.body.get("raftAddress"), api_address=args.body.get("apiAddress")
    )
    return Reply(result=result)


async def rotate_certificate(ctx: Context, args: Args) -> Reply:
    return Reply(result=await ctx.node.rotate_certificate())


async def mint_join_token(ctx: Context, args: Args) -> Reply:
    ttl = args.body.get("ttlSeconds")
    result = await ctx.node.mint_join_token(int(args.body["nodeID"]), None if ttl is None else int(ttl))
    return Reply(status=201, result=result)


def routes() -> list[Route]:
    tag = "cluster"
    return [
        Route(
            "GET",
            f"{P}/members",
            list_members,
            "List cluster members",
            tag,
            Access.READONLY,
            Placement.READ,
            query=(CONSISTENT_QUERY,),
            result_schema=array(ref("Member")),
            description="Sorted by nodeId. Served from the local replica unless consistent=true.",
        ),
        Route(
            "DELETE",
            f"{P}/members/{{id}}",
            remove_member,
            "Remove a cluster member",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(node_id_path(),),
            query=(FORCE_QUERY,),
            result_schema=ref("Message"),
            errors=(
                MEMBER_404,
                ErrorDoc(409, ("not_drained", "last_voter", "would_lose_quorum", "membership_conflict")),
            ),
            recover=removed_leader_outcome,
            long_running=True,
            description="The member must be drained unless force=true. Refused (409 would_lose_quorum) "
            "when the healthy voters left would be fewer than the new quorum, unless force=true. "
            "Removing the leader first hands leadership to another voter. Purges the node's leases "
            "and certificate pin.",
        ),
        Route(
            "PATCH",
            f"{P}/members/{{id}}",
            set_member_address,
            "Set a member's addresses",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(node_id_path(),),
            body=(RAFT_ADDRESS_BODY, API_ADDRESS_BODY),
            check=_some_address,
            result_schema=ref("Member"),
            errors=(
                MEMBER_404,
                ErrorDoc(400, ("invalid_raft_address", "invalid_api_address", "missing_field")),
                ErrorDoc(409, ("address_in_use", "feature_unavailable")),
            ),
            description="For a member that is down and will come back at another address (a member "
            "that restarts elsewhere records its new addresses itself). Validated like the config "
            "keys; every node dials the new raftAddress once the change commits. Needs cluster "
            "protocol version 2.",
        ),
        Route(
            "POST",
            f"{P}/members/{{id}}/promote",
            promote_member,
            "Promote a nonvoter to voter",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(node_id_path(),),
            body=(),
            result_schema=ref("Message"),
            errors=(MEMBER_404, ErrorDoc(409, ("already_voter", "not_caught_up", "membership_conflict"))),
            long_running=True,
        ),
        Route(
            "POST",
            f"{P}/members/{{id}}/rotate-certificate",
            rotate_certificate,
            "Rotate a member's certificate",
            tag,
            Access.ADMIN,
            Placement.TARGET,
            path_params=(node_id_path(),),
            body=(),
            result_schema=ref("CertificateRotation"),
            errors=(
                MEMBER_404,
                ErrorDoc(409, ("node_unreachable", "member_unreachable", "feature_unavailable")),
                ErrorDoc(504, ("commit_timeout",)),
            ),
            long_running=True,
            description="Runs on node {id} (forwarded there): a new key and certificate, pinned beside "
            "the old one through the log, then used for every cluster connection, then the old one "
            "unpinned. Answers once the old certificate is unpinned. 409 node_unreachable when node "
            "{id} is down (nothing changed); 409 member_unreachable when a member could not confirm "
            "the new pin (both stay valid; retry to finish). Needs cluster protocol version 3.",
        ),
        Route(
            "GET",
            f"{P}/autopilot",
            get_autopilot,
            "Autopilot state (leader only)",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            result_schema=ref("Autopilot"),
        ),
        Route(
            "GET",
            f"{P}/autopilot/what-if",
            get_what_if,
            "What if members were removed, failed, drained or promoted (leader only)",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            query=WHAT_IF_QUERY,
            result_schema=ref("WhatIf"),
            errors=(MEMBER_404,),
            description="Changes nothing. Answers for the cluster as it would be, with the model autopilot, "
            "member removal and drain use. safe is false iff a warning is quorum_lost or last_voter.",
        ),
        Route(
            "POST",
            f"{P}/members/{{id}}/drain",
            drain_member,
            "Drain a cluster member",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(node_id_path(),),
            query=(DEADLINE_QUERY,),
            body=(DEADLINE_BODY,),
            result_schema=ref("DrainResult"),
            check=_one_deadline,
            errors=(MEMBER_404, ErrorDoc(504, ("drain_timeout",))),
            long_running=True,
            description="deadlineSeconds in the body or the query (not both). 0: returns drained once the "
            "side effects are done; >0: returns draining at once.",
        ),
        Route(
            "POST",
            f"{P}/members/{{id}}/resume",
            resume_member,
            "Resume a drained member",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(node_id_path(),),
            body=(),
            result_schema=ref("Message"),
            errors=(MEMBER_404,),
        ),
        Route(
            "POST",
            f"{P}/pki/join-tokens",
            mint_join_token,
            "Mint a join token",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            body=(JOIN_NODE_ID, JOIN_TTL),
            success_status=201,
            result_schema=ref("JoinToken"),
            errors=(ErrorDoc(409, ("already_member",)), ErrorDoc(503, ("not_initialized",))),
        ),
    ]
