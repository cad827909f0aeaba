"""The backup part of ``quorumd.api.ports.NodeApi``: ``NodeApi.backups`` (``Backups``) and what it
hands the HTTP layer (``BackupStream``; ``BackupArchive`` for scheduled backups).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class BackupArchive:
    """A whole archive in memory (scheduled backups write it to a file)."""

    body: bytes  # the whole archive (format: quorumd.node.registry.archive)
    index: int  # the Raft index of the state it holds
    sha256: str  # hex SHA-256 of ``body``
    cluster_id: str


class BackupStream(Protocol):
    """An archive being sent in pieces (``quorumd.api.pipeline.BodyStream``): what its headers
    say is known before the first byte of the body."""

    @property
    def index(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def cluster_id(self) -> str: ...
    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes | memoryview]:
        """The body in order; raises when it cannot be completed (the answer must then fail)."""
        ...

    def close(self) -> None:
        """Release what the archive holds (idempotent; also after a complete body)."""
        ...

    def handoff(self, holder: str) -> dict[str, Any]:
        """A forwarded request's answer instead of the body: the handle with which the member
        ``holder`` (``member:N``) pulls it (``Backups.relay``)."""
        ...


class Backups(Protocol):
    async def archive(self) -> BackupStream:
        """An archive of the replicated state at a ReadIndex-confirmed index, made here (the
        leader, a standalone node, or a follower whose leader cannot hand archives over); raises
        the leader errors of a consistent read (503 ``no_leader``/``commit_timeout``)."""
        ...

    def relayed(self) -> bool:
        """Whether this node relays its leader's archive rather than making one itself."""
        ...

    async def relay(self, handle: Mapping[str, Any], token: str, timeout: float) -> BackupStream:
        """The leader's archive named by ``handle`` (its answer to the forwarded request), pulled
        from it in chunks with the client's ``token`` (each pull bounded by ``timeout``)."""
        ...
