"""Snapshot files: their format, reading and verifying one, writing one atomically.

``snap-<index:016x>-<term:016x>.snap`` is ``[magic][u16 version][u16 0][u32 meta_len][u64 data_len]
[u32 crc32(meta + data)]`` + encoded SnapshotMeta + data. ``write_snapshot_file`` writes it to
``.tmp``, fsyncs and renames it; the caller (``LogStorage`` in ``storage.py``) then fsyncs the
directory, keeps the ``SNAPSHOTS_KEPT`` newest files and deletes the others.

The header carries ``SNAP_VERSION``: a file in a newer format than this build knows raises
``StorageFormatError`` from ``read_snapshot``; any other defect is a ``ValueError`` with the
reason (recovery skips that file and falls back to an older one).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from ..codec import CodecError, decode_snapshot_meta, encode_snapshot_meta
from ..core.types import Snapshot
from .storage_errors import StorageError, StorageFormatError
from .wal import write_all

SNAP_HEAD = struct.Struct("<4sHHIQI")  # magic, version, reserved, meta_len, data_len, crc32
SNAP_MAGIC = b"QSNP"
SNAP_VERSION = 1
SNAP_NAME = re.compile(r"snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap")
SNAPSHOTS_KEPT = 2


def snap_path(directory: Path, index: int, term: int) -> Path:
    return directory / f"snap-{index:016x}-{term:016x}.snap"


def read_snapshot(path: Path, index: int, term: int) -> Snapshot:
    """Read and verify one snapshot file; ValueError (with the reason) when it is not valid."""
    raw = path.read_bytes()
    if len(raw) < SNAP_HEAD.size:
        raise ValueError(f"short file ({len(raw)} bytes)")
    magic, version, reserved, meta_len, data_len, crc = SNAP_HEAD.unpack_from(raw)
    if magic != SNAP_MAGIC:
        raise ValueError("bad magic")
    if version > SNAP_VERSION:
        raise StorageFormatError(path, version, SNAP_VERSION, "snapshot file")
    if version != SNAP_VERSION:
        raise ValueError(f"unsupported version {version}")
    if reserved != 0:  # written as 0 and not covered by the CRC: anything else is damage
        raise ValueError(f"bad header (reserved field {reserved})")
    if SNAP_HEAD.size + meta_len + data_len != len(raw):
        raise ValueError(f"length mismatch (header says {meta_len}+{data_len}, file has {len(raw)})")
    body = memoryview(raw)[SNAP_HEAD.size :]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    try:
        meta = decode_snapshot_meta(body[:meta_len])
    except CodecError as exc:
        raise ValueError(f"bad metadata: {exc}") from None
    if (meta.index, meta.term) != (index, term):
        raise ValueError(f"metadata {meta.index}/{meta.term} does not match the file name")
    return Snapshot(meta, bytes(body[meta_len:]))


def snapshot_header(snapshot: Snapshot) -> bytes:
    """The header and encoded metadata that precede ``snapshot.data`` in its file."""
    try:
        encoded = encode_snapshot_meta(snapshot.meta)
    except CodecError as exc:
        raise StorageError(f"cannot encode snapshot metadata: {exc}") from None
    crc = zlib.crc32(snapshot.data, zlib.crc32(encoded))
    return SNAP_HEAD.pack(SNAP_MAGIC, SNAP_VERSION, 0, len(encoded), len(snapshot.data), crc) + encoded


def write_snapshot_file(path: Path, header: bytes, data: bytes, open_new: Callable[[Path, int], int]) -> None:
    """Write ``header + data`` to ``path`` through a fsynced temporary file renamed over it;
    ``open_new(path, flags)`` opens the temporary file, which is removed again when writing it
    fails. The directory is not fsynced here."""
    tmp = path.with_name(path.name + ".tmp")
    fd = open_new(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        try:
            write_all(fd, header)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind (a full disk stays full)
        raise
    os.replace(tmp, path)


__all__ = [
    "SNAPSHOTS_KEPT",
    "SNAP_HEAD",
    "SNAP_MAGIC",
    "SNAP_NAME",
    "SNAP_VERSION",
    "read_snapshot",
    "snap_path",
    "snapshot_header",
    "write_snapshot_file",
]
