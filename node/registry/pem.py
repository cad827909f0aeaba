"""Facts about a PEM certificate the replicated state holds: its fingerprint and expiry.

Pure and deterministic (``cryptography``), cached per certificate text: the members list reads
them on every call.
"""

from __future__ import annotations

import datetime
import functools

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from quorumd.raft.aio.transport.identity import cert_fingerprint


@functools.lru_cache(maxsize=256)
def parse_pem(cert_pem: str) -> tuple[bytes, float] | None:
    """(DER, notAfter as unix seconds) of a PEM certificate; None when unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        return None
    return cert.public_bytes(serialization.Encoding.DER), cert.not_valid_after_utc.timestamp()


def expires_at(cert_pem: str) -> float | None:
    """The certificate's notAfter (unix seconds); None when it cannot be read."""
    parsed = parse_pem(cert_pem)
    return None if parsed is None else parsed[1]


def fingerprint_of(cert_pem: str) -> str | None:
    """``sha256:<hex>`` of the certificate; None when it cannot be read."""
    parsed = parse_pem(cert_pem)
    return None if parsed is None else cert_fingerprint(parsed[0])


def expires_at_rfc3339(cert_pem: str) -> str | None:
    ts = expires_at(cert_pem)
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
