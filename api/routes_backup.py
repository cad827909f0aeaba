"""GET /api/v1/backup: one archive of the replicated state. Admin only.

Served by the leader (``Placement.LEADER``), which makes the archive at a ReadIndex-confirmed
index. The body is streamed (``Reply.stream``). A follower forwards the request like any
leader-bound one, but the leader answers a forwarded call with a handle instead of the body
(``BodyStream.handoff``) and the follower's ``relay`` pulls the archive from the leader in chunks
while it streams it to its client (see ``quorumd.node.cluster.backup``). A follower whose leader
runs an older build makes the archive from its own replica after a ReadIndex round. If the body
cannot be completed (the leader changed, went away or dropped the archive), the connection is
aborted before the announced ``Content-Length``. The body is binary
(``application/octet-stream``); errors are the usual JSON envelopes.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import LeaderUnreachable
from .pipeline import Access, Call, Context, ErrorDoc, Placement, Reply, Route, forward
from .ports_backup import BackupStream
from .validation import Args

P = "/api/v1/backup"
CONTENT_TYPE = "application/octet-stream"
INDEX_HEADER = "X-Quorumd-Backup-Index"
SHA256_HEADER = "X-Quorumd-Backup-Sha256"


def _reply(archive: BackupStream) -> Reply:
    filename = f"quorumd-{archive.cluster_id}-{archive.index}.backup"
    return Reply(
        stream=archive,
        content_type=CONTENT_TYPE,
        headers={
            INDEX_HEADER: str(archive.index),
            SHA256_HEADER: archive.sha256,
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
        applied_index=archive.index,
    )


async def backup(ctx: Context, args: Args) -> Reply:
    return _reply(await ctx.node.backups.archive())


async def relay(ctx: Context, route: Route, call: Call, args: Args) -> Reply:
    """On a follower: the leader's archive, pulled in chunks (see the module docstring)."""
    node = ctx.node
    if not node.backups.relayed():
        return await backup(ctx, args)
    reply = await forward(ctx, route, call, args)
    if reply.status != 200:
        return reply  # the leader's refusal (401, 403, 503, ...) as it gave it
    try:
        handle: Any = orjson.loads(reply.encoded())["result"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise LeaderUnreachable("the leader sent an invalid answer", code="leader_error") from None
    if not isinstance(handle, dict):
        raise LeaderUnreachable("the leader sent an invalid answer", code="leader_error")
    return _reply(await node.backups.relay(handle, call.token or "", ctx.forward_timeout_seconds))


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            P,
            backup,
            "Download a backup archive of the replicated state",
            "backup",
            Access.ADMIN,
            Placement.LEADER,
            raw_content_type=CONTENT_TYPE,
            errors=(ErrorDoc(503, ("backup_busy",)),),
            success_headers=(
                (INDEX_HEADER, "The Raft index of the state in the archive."),
                (SHA256_HEADER, "Lowercase hex SHA-256 of the whole body."),
                ("Content-Disposition", 'attachment; filename="quorumd-<clusterId>-<index>.backup"'),
            ),
            description=(
                "Any node serves it: the leader makes the archive at a ReadIndex-confirmed index "
                "and a follower relays it (streamed; a transfer that cannot complete, e.g. when "
                "leadership changes, is aborted before Content-Length bytes). At most two "
                "archives are being sent at once (503 backup_busy beyond). The archive holds "
                "secrets (the join key, token hashes): store it like a private key. "
                "Format: magic, format version, header (cluster id, index, term, creation time, "
                "the node that made it), the state, and a trailing SHA-256 of everything before it."
            ),
            long_running=True,
            relay=relay,
        ),
    ]
