"""Join token format: a leader-signed, single-use invitation for one node id of one cluster.

Text form: unpadded URL-safe base64 of ``version (1 byte) || msgpack(claims) || MAC (32 bytes)``
where MAC = HMAC-SHA256(join_key, version || msgpack(claims)) and claims is the list
``[node_id, cluster_id, expires_at, token_id, leader_fingerprint, leader_addresses]``.

- The joiner does not hold the key: ``parse_join_token`` reads the claims unverified, to learn
  which addresses to dial and which leader certificate fingerprint to pin.
- The leader holds the key (replicated state): ``verify_join_token`` checks the MAC first, in
  constant time, then expiry, cluster and node id. Single use is enforced by the replicated
  consumption record (``StateMachine.is_join_token_consumed``), not here.

Pure: ``token_id`` (16 random bytes) and ``now`` come from the caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from quorumd.node.registry.commands import CommandError, check_int, check_list, check_str, pack, unpack

logger = logging.getLogger(__name__)

JOIN_TOKEN_VERSION = 1
TOKEN_ID_BYTES = 16
MAC_BYTES = 32
DEFAULT_TTL_SECONDS = 1800
MIN_TTL_SECONDS = 300
MAX_TTL_SECONDS = 86400
MAX_TOKEN_CHARS = 8192
MAX_ADDRESSES = 16
MIN_NODE_ID = 1
MAX_NODE_ID = 63

_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOSTPORT_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class JoinTokenError(ValueError):
    """Rejected join token. ``reason``: malformed, tampered, expired, wrong_cluster, wrong_node."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JoinClaims:
    node_id: int
    cluster_id: str
    expires_at: int  # unix seconds
    token_id: bytes  # 16 random bytes; the single-use record's key
    leader_fingerprint: str  # sha256:<hex of DER> of the minting leader's node certificate
    leader_addresses: tuple[str, ...]  # host:port cluster addresses the joiner can dial


def validate_ttl(ttl_seconds: int | None) -> int:
    """The TTL to use: the default for None, else an int within 300..86400 (ValueError)."""
    if ttl_seconds is None:
        return DEFAULT_TTL_SECONDS
    if type(ttl_seconds) is not int or not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"ttlSeconds must be an integer in {MIN_TTL_SECONDS}..{MAX_TTL_SECONDS}")
    return ttl_seconds


def is_host_port(text: str) -> bool:
    match = _HOSTPORT_RE.fullmatch(text)
    return match is not None and 1 <= int(match.group(2)) <= 65535


def _check_claims(c: JoinClaims) -> None:
    """Raise CommandError when a claim is out of shape."""
    if type(c.node_id) is not int or not MIN_NODE_ID <= c.node_id <= MAX_NODE_ID:
        raise CommandError("node_id out of range")
    if type(c.cluster_id) is not str or not c.cluster_id:
        raise CommandError("empty cluster_id")
    if type(c.expires_at) is not int or c.expires_at < 0:
        raise CommandError("bad expires_at")
    if type(c.token_id) is not bytes or len(c.token_id) != TOKEN_ID_BYTES:
        raise CommandError("token_id must be 16 bytes")
    if type(c.leader_fingerprint) is not str or not _FINGERPRINT_RE.fullmatch(c.leader_fingerprint):
        raise CommandError("bad leader fingerprint")
    if not 1 <= len(c.leader_addresses) <= MAX_ADDRESSES:
        raise CommandError("leader_addresses must hold 1..16 addresses")
    for addr in c.leader_addresses:
        if type(addr) is not str or not is_host_port(addr):
            raise CommandError("bad leader address")


def _encode_claims(c: JoinClaims) -> bytes:
    return pack(
        [c.node_id, c.cluster_id, c.expires_at, c.token_id, c.leader_fingerprint, list(c.leader_addresses)]
    )


def _decode_claims(data: bytes) -> JoinClaims:
    f = check_list(unpack(data, "claims"), "claims", 6)
    addresses = check_list(f[5], "leader_addresses")
    token_id = f[3]
    if type(token_id) is not bytes:
        raise CommandError("token_id: expected bytes")
    claims = JoinClaims(
        node_id=check_int(f[0], "node_id"),
        cluster_id=check_str(f[1], "cluster_id"),
        expires_at=check_int(f[2], "expires_at"),
        token_id=token_id,
        leader_fingerprint=check_str(f[4], "leader_fingerprint"),
        leader_addresses=tuple(check_str(a, "leader address") for a in addresses),
    )
    _check_claims(claims)
    return claims


def _mac(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def mint_join_token(key: bytes, claims: JoinClaims) -> str:
    """The token text for ``claims`` signed with the cluster's join key (ValueError if invalid)."""
    if not key:
        raise ValueError("empty join key")
    try:
        _check_claims(claims)
    except CommandError as exc:
        raise ValueError(f"invalid join claims: {exc}") from None
    signed = bytes([JOIN_TOKEN_VERSION]) + _encode_claims(claims)
    return base64.urlsafe_b64encode(signed + _mac(key, signed)).rstrip(b"=").decode("ascii")


def _split(token: str) -> tuple[bytes, bytes]:
    """(signed part, mac) of a token's text; JoinTokenError('malformed') otherwise."""
    if not isinstance(token, str):
        raise JoinTokenError("malformed", "join token is not text")
    text = token.strip()
    if not text or len(text) > MAX_TOKEN_CHARS or not _B64URL_RE.fullmatch(text):
        raise JoinTokenError("malformed", "join token is not URL-safe base64")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JoinTokenError("malformed", "join token is not URL-safe base64") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise JoinTokenError("malformed", "join token has a non-canonical encoding")
    if len(raw) < 1 + 1 + MAC_BYTES:
        raise JoinTokenError("malformed", "join token too short")
    if raw[0] != JOIN_TOKEN_VERSION:
        raise JoinTokenError("malformed", f"unsupported join token version {raw[0]}")
    return raw[:-MAC_BYTES], raw[-MAC_BYTES:]


def parse_join_token(token: str) -> JoinClaims:
    """The claims, unverified (for the joiner). Raises ``JoinTokenError('malformed')``."""
    signed, _ = _split(token)
    try:
        return _decode_claims(signed[1:])
    except CommandError as exc:
        raise JoinTokenError("malformed", f"join token claims: {exc}") from None


def verify_join_token(key: bytes, token: str, *, now: float, cluster_id: str, node_id: int) -> JoinClaims:
    """Verified claims. Checks, in order: shape (malformed), MAC in constant time (tampered),
    expiry (expired: ``now >= expires_at``), cluster id (wrong_cluster), node id (wrong_node)."""
    signed, mac = _split(token)
    if not hmac.compare_digest(_mac(key, signed), mac):
        raise JoinTokenError("tampered", "join token signature does not match")
    try:
        claims = _decode_claims(signed[1:])
    except CommandError as exc:
        raise JoinTokenError("malformed", f"join token claims: {exc}") from None
    if now >= claims.expires_at:
        raise JoinTokenError("expired", "join token has expired")
    if not hmac.compare_digest(claims.cluster_id.encode(), cluster_id.encode()):
        raise JoinTokenError("wrong_cluster", "join token is for another cluster")
    if claims.node_id != node_id:
        raise JoinTokenError("wrong_node", f"join token is for node {claims.node_id}")
    return claims
