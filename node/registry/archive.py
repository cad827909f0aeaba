"""The backup archive: one file that holds the replicated state and proves its own integrity.

Layout (all integers big-endian)::

    offset      size  field
    0           8     magic  b"QRMDBAK\\n"
    8           2     format version (uint16), currently 1
    10          4     header length H (uint32)
    14          H     header: a msgpack map with string keys
                        clusterId  str    the cluster the state belongs to
                        index      int    the Raft index the state holds (its applied index)
                        term       int    the term of the entry at that index
                        createdAt  float  unix seconds when the archive was written
                        nodeId     int    the node that wrote it
                        version    str    the quorumd version that wrote it
                        stateFormat int   the format version of the state below
    14+H        8     state length S (uint64)
    22+H        S     the replicated state: exactly ``StateMachine.snapshot()`` at ``index``
    22+H+S      32    SHA-256 of every byte before it

Decoding checks, in this order, and names the first problem: empty, too short to hold the fixed
fields (truncated), bad magic (not a quorumd backup), a format version newer than this build reads,
lengths that run past the end (truncated) or stop before it (trailing data), the digest, and then
the header's fields (a key given twice is malformed; ``createdAt`` is a time in years 1970..9999).
``decode_archive`` raises only ``ArchiveError``; whether the state itself is valid is for
``StateMachine.restore`` to say (the offline tools do both).

A later format version may add header keys (readers ignore keys they do not know) or change the
layout (then the version goes up; every build reads the versions before it).

Pure: the caller passes the clock (``created_at``) and does any file or network I/O.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "ARCHIVE_FORMAT_VERSION",
    "ARCHIVE_MAGIC",
    "Archive",
    "ArchiveError",
    "ArchiveHeader",
    "archive_parts",
    "decode_archive",
    "encode_archive",
    "sealed_parts",
]

ARCHIVE_MAGIC = b"QRMDBAK\n"
ARCHIVE_FORMAT_VERSION = 1
DIGEST_BYTES = 32
MAX_HEADER_BYTES = 1 << 16
MAX_CREATED_AT = 253402300799.0  # 9999-12-31T23:59:59Z: the last time the tools can show
_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
_STATE_LEN = struct.Struct(">Q")
FIXED_BYTES = _PREFIX.size + _STATE_LEN.size + DIGEST_BYTES


class ArchiveError(ValueError):
    """The bytes are not a valid backup archive; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class ArchiveHeader:
    cluster_id: str
    index: int
    term: int
    created_at: float
    node_id: int
    version: str
    state_format: int

    def encode(self) -> bytes:
        doc = {
            "clusterId": self.cluster_id,
            "index": self.index,
            "term": self.term,
            "createdAt": self.created_at,
            "nodeId": self.node_id,
            "version": self.version,
            "stateFormat": self.state_format,
        }
        out: bytes = msgpack.packb(doc, use_bin_type=True)
        return out


@dataclass(frozen=True, slots=True)
class Archive:
    header: ArchiveHeader
    state: bytes
    sha256: str  # hex digest of the whole archive (what X-Quorumd-Backup-Sha256 carries)
    size: int


def archive_parts(header: ArchiveHeader, state: bytes | Sequence[bytes]) -> list[bytes]:
    """Everything before the digest, as pieces; ``state`` may itself be pieces
    (``StateMachine.snapshot_parts``)."""
    pieces = [state] if isinstance(state, bytes) else list(state)
    head = header.encode()
    return [
        _PREFIX.pack(ARCHIVE_MAGIC, ARCHIVE_FORMAT_VERSION, len(head)),
        head,
        _STATE_LEN.pack(sum(len(p) for p in pieces)),
        *pieces,
    ]


def sealed_parts(header: ArchiveHeader, state: bytes | Sequence[bytes]) -> tuple[list[bytes], str]:
    """The whole archive as pieces (the trailing digest the last one; the state's pieces are
    not copied) and the SHA-256 (hex) of their concatenation.

    Hashing releases the GIL piece by piece: the serving node runs this in a worker thread
    and sends the pieces as they are (see cluster/backup.py)."""
    parts = archive_parts(header, state)
    content = hashlib.sha256()
    for p in parts:
        content.update(p)
    digest = content.digest()
    whole = content.copy()
    whole.update(digest)
    parts.append(digest)
    return parts, whole.hexdigest()


def encode_archive(header: ArchiveHeader, state: bytes | Sequence[bytes]) -> tuple[bytes, str]:
    """The archive bytes and their SHA-256 (hex): ``sealed_parts`` joined (one copy)."""
    parts, sha256 = sealed_parts(header, state)
    return b"".join(parts), sha256


PROBE_BYTES = _PREFIX.size + MAX_HEADER_BYTES + _STATE_LEN.size  # enough to read the lengths


def declared_length(head: bytes) -> int | None:
    """The whole length of the archive whose first bytes are ``head`` (``PROBE_BYTES`` is always
    enough), from its own length fields; None when ``head`` does not say (too short, or not an
    archive of a format this build reads: ``decode_archive`` names the problem)."""
    if len(head) < _PREFIX.size:
        return None
    magic, version, head_len = _PREFIX.unpack_from(head, 0)
    if magic != ARCHIVE_MAGIC or not 1 <= version <= ARCHIVE_FORMAT_VERSION or head_len > MAX_HEADER_BYTES:
        return None
    state_at = _PREFIX.size + head_len + _STATE_LEN.size
    if len(head) < state_at:
        return None
    (state_len,) = _STATE_LEN.unpack_from(head, _PREFIX.size + head_len)
    return int(state_at + state_len + DIGEST_BYTES)


def decode_archive(data: bytes) -> Archive:
    """Check and split an archive; raises ``ArchiveError`` naming the first problem."""
    n = len(data)
    if n == 0:
        raise ArchiveError("empty file: not a quorumd backup archive")
    if n >= len(ARCHIVE_MAGIC) and data[: len(ARCHIVE_MAGIC)] != ARCHIVE_MAGIC:
        raise ArchiveError("bad magic: not a quorumd backup archive")
    if n < len(ARCHIVE_MAGIC) and not ARCHIVE_MAGIC.startswith(bytes(data)):
        raise ArchiveError("bad magic: not a quorumd backup archive")
    if n < _PREFIX.size:
        raise ArchiveError(f"truncated: {n} bytes, shorter than the fixed header")
    _magic, version, head_len = _PREFIX.unpack_from(data, 0)
    if version == 0 or version > ARCHIVE_FORMAT_VERSION:
        raise ArchiveError(
            f"unknown format version {version} (this build reads versions 1..{ARCHIVE_FORMAT_VERSION})"
        )
    if head_len > MAX_HEADER_BYTES:
        raise ArchiveError(f"malformed: header length {head_len} exceeds {MAX_HEADER_BYTES}")
    state_at = _PREFIX.size + head_len + _STATE_LEN.size
    if n < state_at:
        raise ArchiveError(f"truncated: {n} bytes, the header alone needs {state_at}")
    (state_len,) = _STATE_LEN.unpack_from(data, _PREFIX.size + head_len)
    expected = state_at + state_len + DIGEST_BYTES
    if n < expected:
        raise ArchiveError(f"truncated: {n} bytes of {expected}")
    if n > expected:
        raise ArchiveError(f"trailing data: {n} bytes, the archive ends at {expected}")
    body = memoryview(data)[: n - DIGEST_BYTES]
    if hashlib.sha256(body).digest() != data[n - DIGEST_BYTES :]:
        raise ArchiveError("digest mismatch: the archive is corrupt (SHA-256 over its content differs)")
    header = _decode_header(bytes(data[_PREFIX.size : _PREFIX.size + head_len]))
    state = bytes(data[state_at : state_at + state_len])
    return Archive(header, state, hashlib.sha256(data).hexdigest(), n)


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    doc: dict[Any, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ArchiveError(f"malformed header: {key} appears twice")
        doc[key] = value
    return doc


def _decode_header(raw: bytes) -> ArchiveHeader:
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, object_pairs_hook=_unique_keys)
    except ArchiveError:
        raise
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ArchiveError(f"malformed header: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise ArchiveError("malformed header: not a map")
    cluster_id = _str(doc, "clusterId")
    if not cluster_id:
        raise ArchiveError("malformed header: clusterId is empty")
    return ArchiveHeader(
        cluster_id=cluster_id,
        index=_int(doc, "index"),
        term=_int(doc, "term"),
        created_at=_time(doc, "createdAt"),
        node_id=_int(doc, "nodeId"),
        version=_str(doc, "version"),
        state_format=_int(doc, "stateFormat"),
    )


def _get(doc: dict[Any, Any], key: str) -> object:
    if key not in doc:
        raise ArchiveError(f"malformed header: {key} is missing")
    return doc[key]


def _int(doc: dict[Any, Any], key: str) -> int:
    value = _get(doc, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArchiveError(f"malformed header: {key} has the wrong type")
    if value < 0:
        raise ArchiveError(f"malformed header: {key} is negative")
    return value


def _float(doc: dict[Any, Any], key: str) -> float:
    value = _get(doc, key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ArchiveError(f"malformed header: {key} has the wrong type")
    if not math.isfinite(value):
        raise ArchiveError(f"malformed header: {key} is not finite")
    return float(value)


def _time(doc: dict[Any, Any], key: str) -> float:
    value = _float(doc, key)
    if not 0 <= value <= MAX_CREATED_AT:
        raise ArchiveError(f"malformed header: {key} is not a time between 1970 and 9999")
    return value


def _str(doc: dict[Any, Any], key: str) -> str:
    value = _get(doc, key)
    if not isinstance(value, str):
        raise ArchiveError(f"malformed header: {key} has the wrong type")
    return value
