"""GET /api/v1/backup: one archive of the replicated state. Admin only.

Served by the node that receives it (``Placement.LOCAL``): the node runs a ReadIndex round
through the leader and answers from its own replica once that has applied the confirmed index,
so the archive never travels over the cluster channel (see ``quorumd.node.cluster.backup``).
The body is binary (``application/octet-stream``); errors are the usual JSON envelopes.
"""

from __future__ import annotations

from .errors import ApiError
from .extensions import serves_backups
from .pipeline import Access, Context, ErrorDoc, Placement, Reply, Route
from .validation import Args

P = "/api/v1/backup"
CONTENT_TYPE = "application/octet-stream"
INDEX_HEADER = "X-Quorumd-Backup-Index"
SHA256_HEADER = "X-Quorumd-Backup-Sha256"


async def backup(ctx: Context, args: Args) -> Reply:
    node = ctx.node
    if not serves_backups(node):
        raise ApiError(404, "backup_unavailable", "this node does not serve backups")
    archive = await node.backup_archive()
    filename = f"quorumd-{archive.cluster_id}-{archive.index}.backup"
    return Reply(
        body=archive.body,
        content_type=CONTENT_TYPE,
        headers={
            INDEX_HEADER: str(archive.index),
            SHA256_HEADER: archive.sha256,
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
        applied_index=archive.index,
    )


def routes() -> list[Route]:
    return [
        Route(
            "GET",
            P,
            backup,
            "Download a backup archive of the replicated state",
            "backup",
            Access.ADMIN,
            Placement.LOCAL,
            raw_content_type=CONTENT_TYPE,
            errors=(
                ErrorDoc(404, ("backup_unavailable",)),
                ErrorDoc(503, ("no_leader", "commit_timeout")),
            ),
            success_headers=(
                (INDEX_HEADER, "The Raft index of the state in the archive."),
                (SHA256_HEADER, "Lowercase hex SHA-256 of the whole body."),
                ("Content-Disposition", 'attachment; filename="quorumd-<clusterId>-<index>.backup"'),
            ),
            description=(
                "Any node serves it: the node confirms the leader's commit index (ReadIndex) and "
                "answers from its replica once it has applied that index. The archive holds "
                "secrets (the join key, token hashes): store it like a private key. "
                "Format: magic, format version, header (cluster id, index, term, creation time), "
                "the state, and a trailing SHA-256 of everything before it."
            ),
        ),
    ]
