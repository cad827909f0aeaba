"""Node certificates, the self-signed API certificate, and private files on disk.

Owns how a node's identity is minted: one self-signed ECDSA P-256 certificate per node, valid for
ten years, whose identity (node id, cluster id) is written three times and checked for agreement:
subject ``CN=quorumd-node-<id>``, ``O=<cluster id>``, and the SAN URI
``quorumd://<cluster id>/node/<id>``. Trust never comes from a CA: a certificate is trusted because
its fingerprint (``sha256:<hex of DER>``) is pinned in the replicated state. The identity encoding
itself is part of the cluster wire contract and lives next to the code that authenticates peers,
in ``quorumd.raft.aio.transport.identity`` (``raft.aio`` must not import ``node``); this module re-exports it
with ``PkiError``.

Also owns ``write_private_file`` (0600, atomic: temp file, fsync, rename, fsync of the directory)
and the API server certificate generated once in the data directory when the operator gives none.
Private keys are never logged.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quorumd.raft.aio.transport.identity import (
    CertIdentityError,
    cert_fingerprint,
    cert_identity,
    identity_uri,
    validate_identity,
)

log = logging.getLogger(__name__)

NODE_CERT_VALIDITY_DAYS = 365  # cluster.certificate-lifetime's default
API_CERT_VALIDITY_DAYS = 3650
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(days=1)
API_CERT_FILE = "api.crt"
API_KEY_FILE = "api.key"


class PkiError(Exception):
    """Root of this module's errors: a certificate or key that is not what we expect."""


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    fingerprint: str


def fingerprint(cert_der: bytes) -> str:
    """``sha256:<lowercase hex of sha256(DER)>``."""
    return cert_fingerprint(cert_der)


def pem_to_der(cert_pem: bytes) -> bytes:
    """The DER bytes of the first certificate in ``cert_pem`` (PkiError when there is none)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc
    return cert.public_bytes(serialization.Encoding.DER)


def identity_of(cert_der: bytes) -> tuple[int, str]:
    """(node id, cluster id) embedded in a node certificate; PkiError on anything unexpected."""
    try:
        return cert_identity(cert_der)
    except CertIdentityError as exc:
        raise PkiError(str(exc)) from exc


def _name(node_id: int, cluster_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"quorumd-node-{node_id}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
        ]
    )


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    validity_days: float,
    now: datetime.datetime | None,
) -> x509.Certificate:
    now = now or datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - min(CLOCK_SKEW_ALLOWANCE, datetime.timedelta(days=validity_days)))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_node_identity(
    node_id: int,
    cluster_id: str,
    *,
    now: datetime.datetime | None = None,
    lifetime_seconds: float = NODE_CERT_VALIDITY_DAYS * 86400.0,
) -> NodeIdentity:
    """A fresh self-signed ECDSA P-256 node certificate and key (PEM) with its fingerprint,
    valid for ``lifetime_seconds`` (``cluster.certificate-lifetime``)."""
    try:
        validate_identity(node_id, cluster_id)
    except CertIdentityError as exc:
        raise PkiError(str(exc)) from exc
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(node_id, cluster_id))]
    cert = _self_signed(key, _name(node_id, cluster_id), sans, lifetime_seconds / 86400.0, now)
    der = cert.public_bytes(serialization.Encoding.DER)
    log.info("node_certificate_generated node=%d fingerprint=%s", node_id, fingerprint(der))
    return NodeIdentity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
        fingerprint=fingerprint(der),
    )


def write_private_file(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (parents created 0700 when missing).

    Temp file in the same directory, fsync, rename over the target, fsync of the directory: a
    crash leaves either the old content or the new one, never a torn or world-readable file.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _api_sans(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        host = host.strip().strip("[]")
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def load_or_create_api_cert(data_dir: Path | str, hosts: list[str] | tuple[str, ...]) -> tuple[Path, Path]:
    """(cert path, key path) of the API server certificate in ``data_dir``, generated once.

    The certificate is self-signed ECDSA P-256 with SANs for ``hosts`` (names or IP addresses)
    plus localhost, 127.0.0.1 and ::1; both files are 0600. An existing pair is reused as is.
    """
    data_dir = Path(data_dir)
    cert_path, key_path = data_dir / API_CERT_FILE, data_dir / API_KEY_FILE
    if cert_path.exists() and key_path.exists():
        try:
            x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise PkiError(f"{cert_path}: not a PEM certificate: {exc}") from exc
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quorumd-api")])
    cert = _self_signed(key, subject, _api_sans(hosts), API_CERT_VALIDITY_DAYS, None)
    write_private_file(key_path, _key_pem(key))
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info(
        "api_certificate_generated path=%s fingerprint=%s",
        cert_path,
        fingerprint(cert.public_bytes(serialization.Encoding.DER)),
    )
    return cert_path, key_path


# --- the node's identity files ---------------------------------------------------------------
class IdentityFiles:
    """The node certificate and key in ``<data dir>/tls``, and a rotation's files beside them.

    ``node.crt`` / ``node.key``: the identity in use. A rotation first writes the next identity
    to ``node.next.pem`` (certificate and key, before it is pinned), then switches with one
    rename to ``node.switch.pem`` (the identity in use from then on, whatever ``node.crt`` and
    ``node.key`` hold), rewrites ``node.crt`` and ``node.key`` from it and removes it. A crash at
    any point leaves one identity in use that is pinned: ``load`` finishes an interrupted switch.
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.dir = Path(data_dir) / "tls"
        self.cert, self.key = self.dir / "node.crt", self.dir / "node.key"
        self.next, self.switching = self.dir / "node.next.pem", self.dir / "node.switch.pem"

    def load(self) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) in use, after finishing a switch a crash interrupted."""
        if self.switching.exists():
            self._install(*split_identity_pem(self.switching.read_bytes()))
        return self.cert.read_bytes(), self.key.read_bytes()

    def write(self, cert_pem: bytes, key_pem: bytes) -> None:
        write_private_file(self.cert, cert_pem)
        write_private_file(self.key, key_pem)

    def write_next(self, ident: NodeIdentity) -> None:
        write_private_file(self.next, ident.cert_pem + ident.key_pem)

    def read_next(self) -> tuple[bytes, bytes] | None:
        """The next identity a rotation wrote (None: none, or unreadable: then removed)."""
        try:
            return split_identity_pem(self.next.read_bytes())
        except FileNotFoundError:
            return None
        except PkiError as exc:
            log.warning("next_identity_discarded path=%s error=%s", self.next, exc)
            self.discard_next()
            return None

    def discard_next(self) -> None:
        self.next.unlink(missing_ok=True)

    def switch_to_next(self) -> tuple[bytes, bytes]:
        """Make the next identity the one in use (durable once this returns)."""
        cert_pem, key_pem = split_identity_pem(self.next.read_bytes())
        os.replace(self.next, self.switching)
        _fsync_dir(self.dir)
        self._install(cert_pem, key_pem)
        return cert_pem, key_pem

    def _install(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.write(cert_pem, key_pem)
        self.switching.unlink()
        _fsync_dir(self.dir)


def split_identity_pem(data: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a file holding both; PkiError when it does not."""
    begin_key = data.find(b"-----BEGIN PRIVATE KEY-----")
    if not data.startswith(b"-----BEGIN CERTIFICATE-----") or begin_key < 0:
        raise PkiError("not a certificate followed by a private key")
    cert_pem, key_pem = data[:begin_key], data[begin_key:]
    pem_to_der(cert_pem)
    return cert_pem, key_pem


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
