"""``quorumctl backup save FILE``: download GET /api/v1/backup into a file, atomically.

The body is streamed into a temporary file next to FILE (created 0600, exclusive), checked
twice -- the SHA-256 of the whole body against the server's ``X-Quorumd-Backup-Sha256``
(the transfer), and the archive's trailing SHA-256 against its content (the archive itself) --
fsynced, renamed over FILE, and the directory fsynced. Any failure removes the temporary file
and leaves FILE as it was. ``quorumd backup verify FILE`` checks a saved archive offline.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from quorumd.node.ctl.client import CtlClient, EndpointError, LocalError

DIGEST_BYTES = 32


class _Sink:
    """Writes chunks to ``fd`` and hashes the whole body and the body minus its last 32 bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.whole = hashlib.sha256()
        self.content = hashlib.sha256()
        self.tail = b""
        self.size = 0

    def __call__(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self.whole.update(chunk)
        self.size += len(chunk)
        buf = self.tail + chunk
        self.content.update(buf[:-DIGEST_BYTES])
        self.tail = buf[-DIGEST_BYTES:]


async def save(client: CtlClient, file: str) -> dict[str, Any]:
    path = Path(file)
    if path.is_dir():
        raise LocalError(f"{path} is a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LocalError(f"cannot create {tmp}: {exc.strerror or exc}") from None
    try:
        try:
            sink = _Sink(fd)
            headers = await client.download("/backup", sink)
            os.fsync(fd)
        finally:
            os.close(fd)
        sha256 = sink.whole.hexdigest()
        sent = headers.get("X-Quorumd-Backup-Sha256", "")
        if sent.lower() != sha256:
            raise EndpointError(f"digest mismatch: received {sha256}, the server sent {sent or 'none'}")
        if sink.size < DIGEST_BYTES or sink.content.digest() != sink.tail:
            raise EndpointError("digest mismatch: the archive's own SHA-256 does not match its content")
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    index = headers.get("X-Quorumd-Backup-Index", "")
    return {"file": str(path), "index": int(index) if index.isdigit() else None, "size": sink.size,
            "sha256": sha256}  # fmt: skip


def render(result: Any) -> str:
    return "\n".join(
        [
            f"saved {result['file']}",
            f"index:  {result['index']}",
            f"size:   {result['size']} bytes",
            f"sha256: {result['sha256']}",
        ]
    )
