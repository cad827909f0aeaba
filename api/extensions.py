"""Optional extensions of ``quorumd.api.ports.NodeApi`` that the HTTP layer uses when present.

``ports.py`` is the fixed contract; a node that also implements a protocol here gets the richer
behaviour, one that does not still works.

- ``LeaseAllocationReporting``: lets POST /leases tell a new allocation (201) from an existing
  (pool, holder) lease returned again (200). Without it every allocation answers 201.
- ``BackupSource``: serves GET /backup. Without it the route answers 404 ``backup_unavailable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard


class LeaseAllocationReporting(Protocol):
    async def allocate_lease_reporting(
        self, pool: str, holder: str, node_id: int | None
    ) -> tuple[dict[str, Any], bool]:
        """Like ``NodeApi.allocate_lease``; the flag is True when a new address was allocated."""
        ...


def reports_lease_allocation(node: object) -> TypeGuard[LeaseAllocationReporting]:
    """``isinstance(node, LeaseAllocationReporting)``, for the hot POST /leases path.

    A runtime-checkable isinstance re-collects the protocol's members on every call (several µs
    in Python 3.11); for this one-method protocol it means exactly "the attribute is present and
    not None", which one getattr answers.
    """
    return getattr(node, "allocate_lease_reporting", None) is not None


@dataclass(frozen=True, slots=True)
class BackupArchive:
    body: bytes  # the whole archive (format: quorumd.node.registry.archive)
    index: int  # the Raft index of the state it holds
    sha256: str  # hex SHA-256 of ``body``
    cluster_id: str


class BackupSource(Protocol):
    async def backup_archive(self) -> BackupArchive:
        """An archive of the replicated state at a ReadIndex-confirmed index (raises the
        leader errors of a consistent read: 503 ``no_leader``/``commit_timeout``)."""
        ...


def serves_backups(node: object) -> TypeGuard[BackupSource]:
    return getattr(node, "backup_archive", None) is not None
