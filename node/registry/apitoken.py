"""API bearer token format: ``qd_<token_id>_<secret>``.

- ``token_id``: 12 lowercase hex characters (6 random bytes); public, it names the token in
  ``GET /tokens`` and ``DELETE /tokens/{id}``.
- ``secret``: 43 characters of unpadded URL-safe base64 encoding 32 random bytes.

The caller supplies the randomness (``secrets.token_bytes``); this module stays pure.
The replicated state stores only ``hash_secret(secret)``. A fast hash (SHA-256) is the right
choice here, not a password KDF: the secret is 256 bits of uniform randomness, so a brute-force
search of the hash is hopeless however fast the hash is, and authentication stays cheap on
every request. The hash is domain-separated so it cannot be confused with other SHA-256 uses.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "qd_"
TOKEN_ID_BYTES = 6
SECRET_BYTES = 32
_HASH_DOMAIN = b"quorumd-api-token-v1\x00"
_TOKEN_RE = re.compile(r"qd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TOKEN_ID_RE = re.compile(r"[0-9a-f]{12}")


def token_id_from_bytes(random_bytes: bytes) -> str:
    """A token id from 6 caller-supplied random bytes."""
    if len(random_bytes) != TOKEN_ID_BYTES:
        raise ValueError(f"token id needs {TOKEN_ID_BYTES} bytes")
    return random_bytes.hex()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def format_api_token(token_id: str, secret_bytes: bytes) -> str:
    """The bearer token text shown once to the user."""
    if not TOKEN_ID_RE.fullmatch(token_id):
        raise ValueError("token id must be 12 lowercase hex characters")
    if len(secret_bytes) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    return f"{TOKEN_PREFIX}{token_id}_{_b64(secret_bytes)}"


def hash_secret(secret_bytes: bytes) -> bytes:
    """SHA-256 of the raw 32-byte secret (domain-separated); 32 bytes."""
    return hashlib.sha256(_HASH_DOMAIN + secret_bytes).digest()


def parse_api_token(text: str) -> tuple[str, bytes] | None:
    """``(token_id, secret_hash)`` of a well-formed token, else None. Never raises."""
    if not isinstance(text, str) or len(text) != len(TOKEN_PREFIX) + 12 + 1 + 43:
        return None
    match = _TOKEN_RE.fullmatch(text)
    if match is None:
        return None
    token_id, secret_text = match.groups()
    secret = base64.urlsafe_b64decode(secret_text + "=")
    if _b64(secret) != secret_text:  # non-canonical trailing bits: not a token we issued
        return None
    return token_id, hash_secret(secret)
