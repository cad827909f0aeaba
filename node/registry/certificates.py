"""Certificate pins in the replicated state: pinning a member's next certificate and unpinning
one, and the facts a members list shows about a certificate.

A member is trusted by the fingerprints pinned for it: its current certificate
(``Member.cert_fingerprint``) and, while it rotates, its next one (``Member.next_cert_fingerprint``).
The rotation (``quorumd.node.cluster.certificates``) pins the next certificate, switches to it,
then unpins the old one, which makes the next one current. The rules here keep one invariant on
every replica: a member always has at least one pin, and the certificate a member uses is never
unpinned before it has switched to the other (it proposes the unpin itself).

Pure: certificates are parsed with ``cryptography`` (deterministic on every replica).
"""

from __future__ import annotations

from dataclasses import replace

from quorumd.node.registry.command_types import PinCertificate, UnpinCertificate
from quorumd.node.registry.leases import Rejection
from quorumd.node.registry.pem import cert_fingerprint, names_node, parse_pem
from quorumd.node.registry.pem import expires_at as expires_at
from quorumd.node.registry.pem import expires_at_rfc3339 as expires_at_rfc3339
from quorumd.node.registry.pem import fingerprint_of as fingerprint_of
from quorumd.node.registry.records import ApplyCode, Member

MAX_CERT_PEM_BYTES = 16 * 1024


def pin(member: Member, cluster_id: str | None, cmd: PinCertificate) -> Member:
    """``member`` with ``cmd``'s certificate pinned as its next one (``Rejection`` when refused)."""
    if len(cmd.cert_pem) > MAX_CERT_PEM_BYTES:
        raise Rejection(ApplyCode.INVALID_ARGUMENT, "certificate too large")
    parsed = parse_pem(cmd.cert_pem)
    if parsed is None:
        raise Rejection(ApplyCode.INVALID_ARGUMENT, "not a PEM certificate")
    if not names_node(cmd.cert_pem, member.node_id, cluster_id):
        raise Rejection(ApplyCode.INVALID_ARGUMENT, "the certificate does not name this node of this cluster")
    fp = cert_fingerprint(parsed[0])
    if fp == member.cert_fingerprint:
        return member  # already current: nothing to pin
    return replace(member, next_cert_pem=cmd.cert_pem, next_cert_fingerprint=fp)


def unpin(member: Member, cmd: UnpinCertificate) -> Member:
    """``member`` without the pin ``cmd`` names: the current one (the next one becomes current)
    or the next one. Unpinning a fingerprint that is not pinned changes nothing (a retry)."""
    if cmd.fingerprint == member.next_cert_fingerprint:
        return replace(member, next_cert_pem=None, next_cert_fingerprint=None)
    if cmd.fingerprint != member.cert_fingerprint:
        return member
    if member.next_cert_pem is None or member.next_cert_fingerprint is None:
        raise Rejection(ApplyCode.INVALID_ARGUMENT, "a member's only certificate cannot be unpinned")
    return replace(
        member,
        cert_fingerprint=member.next_cert_fingerprint,
        cert_pem=member.next_cert_pem,
        next_cert_pem=None,
        next_cert_fingerprint=None,
    )


def fingerprints(member: Member) -> tuple[str, ...]:
    """Every fingerprint pinned for ``member``: its current one first."""
    if member.next_cert_fingerprint is None:
        return (member.cert_fingerprint,)
    return (member.cert_fingerprint, member.next_cert_fingerprint)
