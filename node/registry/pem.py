"""Facts about a PEM certificate the replicated state holds: its fingerprint and expiry.

Pure and deterministic (``cryptography``), cached per certificate text: the members list reads
them on every call.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def cert_fingerprint(cert_der: bytes) -> str:
    """``sha256:<lowercase hex of sha256(DER)>``: how the cluster names a certificate (the
    transport computes the same for every peer it authenticates)."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


@functools.lru_cache(maxsize=256)
def parse_pem(cert_pem: str) -> tuple[bytes, float, frozenset[str]] | None:
    """(DER, notAfter as unix seconds, SAN URIs) of a PEM certificate; None when unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = frozenset(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            uris = frozenset()
        return cert.public_bytes(serialization.Encoding.DER), cert.not_valid_after_utc.timestamp(), uris
    except ValueError:
        return None


def names_node(cert_pem: str, node_id: int, cluster_id: str | None) -> bool:
    """The certificate carries the node identity URI ``quorumd://<cluster id>/node/<node id>``
    (the transport checks the whole identity, subject included, at every connection)."""
    parsed = parse_pem(cert_pem)
    return parsed is not None and f"quorumd://{cluster_id}/node/{node_id}" in parsed[2]


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
