"""The registry payload of a membership change: ``ConfChange.context`` (``MemberContext``).

    v1:  [1, raft_address, api_address, binary_version, cert_fingerprint, cert_pem,
          join_token_id | nil, ts]
    v2:  [2, required_protocol, <the v1 fields>, protocol_version]

    v3:  [3, 2, inner_context (bytes; may be empty), ts, audit note]   (the audited context)

The audited context carries the audit record of the membership change in the same
entry: a removal or promotion (inner context empty) or a join (inner context: the v1 or v2
member context, unchanged). Only written at cluster protocol 2; ``split_audited_context``
unwraps it.

The v1 context is read by every build; the join handler writes the v2 one (which records the
joiner's protocol version) only once the cluster is at protocol 2 (see
``quorumd.node.registry.commands`` for the envelopes and the gate).
"""

from __future__ import annotations

from dataclasses import dataclass

from quorumd.node.registry.audit import AuditNote, decode_note
from quorumd.node.registry.wire import (
    CommandError,
    check_float,
    check_int,
    check_list,
    check_opt_bytes,
    check_required_protocol,
    check_str,
    unpack,
)
from quorumd.raft.codec import packb as pack

CONTEXT_VERSION = 1
CONTEXT_ENVELOPE_V2 = 2
CONTEXT_AUDITED = 3
AUDITED_CONTEXT_PROTOCOL = 2
MAX_CONTEXT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class MemberContext:
    """The registry payload of an ADD_NONVOTER (or bootstrap PROMOTE) ConfChange."""

    raft_address: str
    api_address: str
    binary_version: str
    cert_fingerprint: str
    cert_pem: str
    join_token_id: bytes | None
    ts: float
    # The member's protocol version, recorded by the leader once the cluster is at protocol 2
    # (None: the v1 context, which every build reads).
    protocol_version: int | None = None


def encode_member_context(ctx: MemberContext) -> bytes:
    """The v1 context (every build reads it) unless ``ctx.protocol_version`` is set: then the v2
    context, which only a cluster at protocol 2 may write (the join handler's choice)."""
    fields = [
        ctx.raft_address,
        ctx.api_address,
        ctx.binary_version,
        ctx.cert_fingerprint,
        ctx.cert_pem,
        ctx.join_token_id,
        float(ctx.ts),
    ]
    if ctx.protocol_version is None:
        data = pack([CONTEXT_VERSION, *fields])
    else:
        data = pack([CONTEXT_ENVELOPE_V2, 2, *fields, ctx.protocol_version])
    decode_member_context(data)
    return data


def decode_member_context(data: bytes) -> MemberContext:
    """Decode a ConfChange context; raises ``CommandError`` when malformed and
    ``EntryNeedsNewerProtocol`` when it is written for a newer build (nothing else)."""
    if len(data) > MAX_CONTEXT_BYTES:
        raise CommandError("member context too large")
    items = check_list(unpack(data, "member context"), "member context")
    version = check_int(items[0], "version") if items else None
    protocol: int | None = None
    if version == CONTEXT_VERSION:
        check_list(items, "member context", 8)
        f = items[1:]
    else:
        check_required_protocol(check_int(version, "version"), items, CONTEXT_ENVELOPE_V2, "member context")
        check_list(items, "member context", 10)
        f = items[2:9]
        protocol = check_int(items[9], "protocol_version")
        if protocol < 1:
            raise CommandError("member context: protocol versions start at 1")
    return MemberContext(
        raft_address=check_str(f[0], "raft_address"),
        api_address=check_str(f[1], "api_address"),
        binary_version=check_str(f[2], "binary_version"),
        cert_fingerprint=check_str(f[3], "cert_fingerprint"),
        cert_pem=check_str(f[4], "cert_pem"),
        join_token_id=check_opt_bytes(f[5], "join_token_id"),
        ts=check_float(f[6], "ts"),
        protocol_version=protocol,
    )


def encode_audited_context(inner: bytes, ts: float, note: AuditNote) -> bytes:
    """The audited context around ``inner`` (a member context, or empty); ``ts``: the leader's
    clock (the record's time). Validated by decoding."""
    data = pack([CONTEXT_AUDITED, AUDITED_CONTEXT_PROTOCOL, inner, float(ts), note.wire()])
    split_audited_context(data)
    return data


def split_audited_context(data: bytes) -> tuple[bytes, float, AuditNote | None]:
    """``(inner context, ts, note)`` of an audited context; ``(data, 0.0, None)`` for any other.
    Raises ``CommandError`` when an audited context is malformed and ``EntryNeedsNewerProtocol``
    when a context names a protocol newer than this build's."""
    if not data or len(data) > MAX_CONTEXT_BYTES:
        return data, 0.0, None  # empty, or too large: the member context decoder says so
    try:
        items = unpack(data, "context")
    except CommandError:
        return data, 0.0, None
    if type(items) is not list or not items or items[0] != CONTEXT_AUDITED:
        return data, 0.0, None
    check_list(items, "audited context", 5)
    check_required_protocol(CONTEXT_AUDITED, items, CONTEXT_AUDITED, "audited context")
    inner = items[2]
    if type(inner) is not bytes:
        raise CommandError("audited context: inner context must be bytes")
    return inner, check_float(items[3], "ts"), decode_note(items[4])
