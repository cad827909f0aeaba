"""Routes for API tokens: create (the secret is shown once), list, show, revoke. Admin only."""

from __future__ import annotations

from .errors import NotFound
from .pipeline import Access, Context, ErrorDoc, Placement, Reply, Route
from .ports import TokenRole
from .schemas import array, ref
from .validation import CONSISTENT_QUERY, PRINTABLE, TOKEN_ID_PATH, Args, Field

P = "/api/v1/tokens"
NAME = Field(
    "name",
    {"type": "string", "minLength": 1, "maxLength": 64, "pattern": PRINTABLE},
    "Token name (1..64 printable characters).",
    required=True,
)
ROLE = Field(
    "role",
    {"type": "string", "enum": ["admin", "readonly"]},
    "Token role.",
    required=True,
    code="invalid_role",
)
TTL = Field(
    "ttlSeconds",
    {"type": "integer", "minimum": 60, "maximum": 315_360_000},
    "Lifetime in seconds; omitted: the token never expires.",
    code="invalid_ttl",
)
TOKEN_404 = ErrorDoc(404, ("token_not_found",))


async def create_token(ctx: Context, args: Args) -> Reply:
    ttl = args.body.get("ttlSeconds")
    result = await ctx.node.create_token(
        str(args.body["name"]), TokenRole(args.body["role"]), None if ttl is None else int(ttl)
    )
    return Reply(status=201, result=result)


async def list_tokens(ctx: Context, args: Args) -> Reply:
    return Reply(result=ctx.node.tokens())


async def get_token(ctx: Context, args: Args) -> Reply:
    token_id = args.path["id"]
    for item in ctx.node.tokens():
        if item.get("id") == token_id:
            return Reply(result=item)
    raise NotFound(f"token {token_id} does not exist", code="token_not_found")


async def revoke_token(ctx: Context, args: Args) -> Reply:
    await ctx.node.revoke_token(str(args.path["id"]))
    return Reply(result={"message": "Token revoked"})


def routes() -> list[Route]:
    tag = "tokens"
    return [
        Route(
            "POST",
            P,
            create_token,
            "Create an API token",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            body=(NAME, ROLE, TTL),
            success_status=201,
            result_schema=ref("CreatedToken"),
            errors=(ErrorDoc(409, ("token_exists",)),),
            description="The bearer secret (`token`) is returned once and never again.",
        ),
        Route(
            "GET",
            P,
            list_tokens,
            "List API tokens",
            tag,
            Access.ADMIN,
            Placement.READ,
            query=(CONSISTENT_QUERY,),
            result_schema=array(ref("Token")),
        ),
        Route(
            "GET",
            P + "/{id}",
            get_token,
            "Show an API token",
            tag,
            Access.ADMIN,
            Placement.READ,
            path_params=(TOKEN_ID_PATH,),
            query=(CONSISTENT_QUERY,),
            result_schema=ref("Token"),
            errors=(TOKEN_404,),
        ),
        Route(
            "DELETE",
            P + "/{id}",
            revoke_token,
            "Revoke an API token",
            tag,
            Access.ADMIN,
            Placement.LEADER,
            path_params=(TOKEN_ID_PATH,),
            result_schema=ref("Message"),
            errors=(TOKEN_404,),
            description="Revocation is immediate on every node.",
        ),
    ]
