"""The cluster wire format: frames, their size limits and kinds, and member addresses.

Framing: 4-byte big-endian length + payload, at most 32 MiB (64 KiB until authenticated, 1 MiB on
the join channel). Raft frames are raw; every other frame is a msgpack list ``[kind, ...]`` with
``FrameKind`` values that are never renumbered (RPC: ``[kind, request id, method, payload]``).
A malformed frame closes only its connection and is counted in ``stats``.

Addresses are ``host:port`` or ``[v6]:port`` (``split_host_port``).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import msgpack

from .errors import _Malformed

MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_AUTH_FRAME_BYTES = 64 * 1024
MAX_JOIN_FRAME_BYTES = 1024 * 1024

_HEADER = struct.Struct(">I")


class FrameKind(IntEnum):
    CHALLENGE = 1
    PROOF = 2
    ACCEPT = 3
    RPC_REQUEST = 10
    RPC_RESPONSE = 11
    RPC_ERROR = 12
    JOIN_REQUEST = 20
    JOIN_RESPONSE = 21
    JOIN_ERROR = 22


def _unpack(frame: bytes, kinds: tuple[FrameKind, ...], length: int) -> list[Any]:
    """A msgpack list of ``length`` items whose first is one of ``kinds`` (else _Malformed)."""
    try:
        obj = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as exc:  # peer bytes: any decoder complaint is a malformed frame
        raise _Malformed(f"undecodable frame: {type(exc).__name__}") from exc
    if not isinstance(obj, list) or len(obj) != length or type(obj[0]) is not int or obj[0] not in kinds:
        raise _Malformed("unexpected frame")
    return obj


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {address!r}")
    return host, port
