"""Peer identity: what a node certificate says, and how a peer proves it holds its key.

The certificate identity encoding (SAN URI ``quorumd://<cluster>/node/<id>`` agreeing with
``CN=quorumd-node-<id>`` and ``O=<cluster>``) is defined here because it is what the cluster
protocol authenticates; ``quorumd.node.pki`` mints certificates with it. A certificate is named by
its fingerprint, ``sha256:<lowercase hex of sha256(DER)>``; pins are fingerprints.

The in-band proof (see ``tls``): a client signs, with ECDSA-SHA256 and its certificate's key,
``"quorumd-auth/1" | ALPN | nonce | server fingerprint``. The server's fresh ``NONCE_BYTES``-byte
nonce rules out replay, and the server fingerprint rules out relaying a proof through another
server (a client only signs for servers it pinned).

Also owns reading a node's own PEM key and certificate. Pure functions: no I/O, no event loop.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import CertIdentityError, TransportError, _Malformed

__all__ = [
    "MAX_NODE_ID",
    "NONCE_BYTES",
    "CertIdentityError",
    "cert_fingerprint",
    "cert_identity",
    "identity_uri",
    "validate_identity",
]

MAX_NODE_ID = 2**31 - 1
NONCE_BYTES = 32

_PROOF_CONTEXT = b"quorumd-auth/1\x00"
_CLUSTER_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_CLUSTER_ID_RE = re.compile(_CLUSTER_ID)
_URI_RE = re.compile(rf"quorumd://({_CLUSTER_ID})/node/([1-9][0-9]{{0,9}})")
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")


def validate_identity(node_id: int, cluster_id: str) -> None:
    """CertIdentityError unless (node_id, cluster_id) can be embedded in a node certificate."""
    if type(node_id) is not int or not 1 <= node_id <= MAX_NODE_ID:
        raise CertIdentityError(f"node id out of range: {node_id!r}")
    if type(cluster_id) is not str or not _CLUSTER_ID_RE.fullmatch(cluster_id):
        raise CertIdentityError("cluster id must be 1..64 characters of [A-Za-z0-9._-]")


def identity_uri(node_id: int, cluster_id: str) -> str:
    """The SAN URI naming a node: ``quorumd://<cluster id>/node/<node id>``."""
    validate_identity(node_id, cluster_id)
    return f"quorumd://{cluster_id}/node/{node_id}"


def cert_fingerprint(cert_der: bytes) -> str:
    """``sha256:<lowercase hex of sha256(DER)>``."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def _only(values: Sequence[Any], what: str) -> Any:
    if len(values) != 1:
        raise CertIdentityError(f"expected exactly one {what}, found {len(values)}")
    return values[0]


def cert_identity(cert_der: bytes) -> tuple[int, str]:
    """(node id, cluster id) of a node certificate; CertIdentityError on anything unexpected."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise CertIdentityError(f"not a DER certificate: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("quorumd:")
        ]
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        org = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        public_key = cert.public_key()
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CertIdentityError(f"certificate without a readable identity: {exc}") from exc
    m = _URI_RE.fullmatch(_only(uris, "quorumd SAN URI"))
    if m is None:
        raise CertIdentityError("malformed quorumd SAN URI")
    cluster_id, node_id = m.group(1), int(m.group(2))
    if not 1 <= node_id <= MAX_NODE_ID:
        raise CertIdentityError("node id out of range")
    if _only(cn, "common name") != f"quorumd-node-{node_id}" or _only(org, "organization") != cluster_id:
        raise CertIdentityError("subject does not agree with the SAN URI")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CertIdentityError("node certificates use ECDSA P-256 keys")
    return node_id, cluster_id


def _proof_message(alpn: str, nonce: bytes, server_fingerprint: str) -> bytes:
    return _PROOF_CONTEXT + alpn.encode() + b"\x00" + nonce + server_fingerprint.encode()


def _verify_proof(cert_der: bytes, signature: bytes, message: bytes) -> None:
    """Raise _Malformed unless ``signature`` is the certificate key's ECDSA-SHA256 over ``message``."""
    try:
        key = x509.load_der_x509_certificate(cert_der).public_key()
    except ValueError as exc:
        raise _Malformed("unreadable certificate") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _Malformed("certificate key is not ECDSA")
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _Malformed("bad signature") from exc


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TransportError("unreadable private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TransportError("node keys must be ECDSA")
    return key


def _load_cert_der(cert_pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise TransportError("unreadable certificate") from exc


def _load_own_identity(
    node_id: int, cluster_id: str, cert_pem: bytes, key_pem: bytes
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """(certificate DER, key) of this node; TransportError unless the certificate carries
    (node_id, cluster_id) and the key is its key."""
    cert_der = _load_cert_der(cert_pem)
    key = _load_key(key_pem)
    if cert_identity(cert_der) != (node_id, cluster_id):
        raise TransportError("own certificate does not carry this node's identity")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != x509.load_der_x509_certificate(
        cert_der
    ).public_key().public_bytes(*spki):
        raise TransportError("private key does not match the certificate")
    return cert_der, key
