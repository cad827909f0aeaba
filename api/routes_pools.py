"""Routes for address pools: create, list, show, delete (GET needs readonly, the rest admin)."""

from __future__ import annotations

from typing import Any

from .pipeline import Access, Context, ErrorDoc, Placement, Reply, Route
from .schemas import array, ref
from .validation import CONSISTENT_QUERY, POOL_NAME_PATH, POOL_NAME_SCHEMA, Args, Field, cidr_check

P = "/api/v1/pools"
NAME = Field(
    "name", POOL_NAME_SCHEMA, "Pool name: [a-z0-9][a-z0-9._-]{0,62}.", required=True, code="invalid_pool_name"
)


def _cidr_problem(value: Any) -> str | None:
    """A network in CIDR notation: an IPv6 zone index (``fe80::%eth0/64``, which ``ipaddress``
    accepts, with any characters after ``%``) names one host's interface, not a network."""
    if "%" in value:
        return "must not carry an IPv6 zone index (%...)"
    return cidr_check(value)


CIDR = Field(
    "cidr",
    {"type": "string", "minLength": 1, "maxLength": 64},
    "IPv4 or IPv6 network in CIDR notation (host bits zero).",
    required=True,
    code="invalid_cidr",
    check=_cidr_problem,
)
POOL_404 = ErrorDoc(404, ("pool_not_found",))


async def create_pool(ctx: Context, args: Args) -> Reply:
    return Reply(
        status=201, result=await ctx.node.create_pool(str(args.body["name"]), str(args.body["cidr"]))
    )


async def list_pools(ctx: Context, args: Args) -> Reply:
    return Reply(result=ctx.node.pools())


async def get_pool(ctx: Context, args: Args) -> Reply:
    return Reply(result=ctx.node.pool(str(args.path["name"])))


async def delete_pool(ctx: Context, args: Args) -> Reply:
    await ctx.node.delete_pool(str(args.path["name"]))
    return Reply(result={"message": "Pool deleted"})


def routes() -> list[Route]:
    tag = "pools"
    return [
        Route(
            "POST",
            P,
            create_pool,
            "Create an address pool",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            body=(NAME, CIDR),
            success_status=201,
            result_schema=ref("Pool"),
            errors=(ErrorDoc(409, ("pool_exists", "pool_overlap")),),
        ),
        Route(
            "GET",
            P,
            list_pools,
            "List address pools",
            tag,
            Access.READONLY,
            Placement.READ,
            query=(CONSISTENT_QUERY,),
            result_schema=array(ref("Pool")),
        ),
        Route(
            "GET",
            P + "/{name}",
            get_pool,
            "Show an address pool",
            tag,
            Access.READONLY,
            Placement.READ,
            path_params=(POOL_NAME_PATH,),
            query=(CONSISTENT_QUERY,),
            result_schema=ref("Pool"),
            errors=(POOL_404,),
        ),
        Route(
            "DELETE",
            P + "/{name}",
            delete_pool,
            "Delete an address pool",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(POOL_NAME_PATH,),
            result_schema=ref("Message"),
            errors=(POOL_404, ErrorDoc(409, ("pool_in_use",))),
        ),
    ]
