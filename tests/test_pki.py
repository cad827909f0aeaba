"""Node certificates (identity, fingerprint, refusal of anything unexpected), private files and the
self-signed API certificate."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from quorumd.node.cluster import pki

CLUSTER = "0123456789abcdef0123456789abcdef"


def der_of(pem: bytes) -> bytes:
    return pki.pem_to_der(pem)


def test_node_identity_round_trip() -> None:
    ident = pki.generate_node_identity(7, CLUSTER)
    der = der_of(ident.cert_pem)
    assert ident.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert pki.fingerprint(der) == ident.fingerprint
    assert pki.identity_of(der) == (7, CLUSTER)

    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "quorumd-node-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == CLUSTER
    assert cert.issuer == cert.subject  # self-signed
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"quorumd://{CLUSTER}/node/7"]
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # cluster.certificate-lifetime's default (365d) from now, valid from a day ago (clock skew)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=366)
    private = serialization.load_pem_private_key(ident.key_pem, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == key.public_numbers()
    assert "PRIVATE" not in repr(ident)  # the key never shows up in a repr (or a log line)


def test_every_identity_is_distinct() -> None:
    a, b = pki.generate_node_identity(1, CLUSTER), pki.generate_node_identity(1, CLUSTER)
    assert a.fingerprint != b.fingerprint
    assert pki.identity_of(der_of(a.cert_pem)) == pki.identity_of(der_of(b.cert_pem))


@pytest.mark.parametrize(
    ("node_id", "cluster_id"), [(0, CLUSTER), (-1, CLUSTER), (1, ""), (1, "a/b"), (1, "x" * 65)]
)
def test_generate_rejects_bad_identities(node_id: int, cluster_id: str) -> None:
    with pytest.raises(pki.PkiError):
        pki.generate_node_identity(node_id, cluster_id)


def _forge(
    cn: str,
    org: str,
    uris: list[str],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_identity_of_accepts_a_well_formed_forgery_shape() -> None:
    # the shape alone makes an identity; trust comes from the pinned fingerprint, not from here
    assert pki.identity_of(_forge("quorumd-node-3", CLUSTER, [f"quorumd://{CLUSTER}/node/3"])) == (3, CLUSTER)


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x30\x03junk", id="junk"),
        pytest.param(_forge("quorumd-node-3", CLUSTER, []), id="no-san"),
        pytest.param(_forge("quorumd-node-3", CLUSTER, ["https://example.com/"]), id="no-quorumd-uri"),
        pytest.param(
            _forge("quorumd-node-3", CLUSTER, [f"quorumd://{CLUSTER}/node/3", f"quorumd://{CLUSTER}/node/4"]),
            id="two-uris",
        ),
        pytest.param(_forge("quorumd-node-4", CLUSTER, [f"quorumd://{CLUSTER}/node/3"]), id="cn-disagrees"),
        pytest.param(_forge("quorumd-node-3", "other", [f"quorumd://{CLUSTER}/node/3"]), id="org-disagrees"),
        pytest.param(_forge("quorumd-node-0", CLUSTER, [f"quorumd://{CLUSTER}/node/0"]), id="node-zero"),
        pytest.param(_forge("quorumd-node-3", CLUSTER, [f"quorumd://{CLUSTER}/node/3x"]), id="bad-uri"),
        pytest.param(
            _forge(
                "quorumd-node-3",
                CLUSTER,
                [f"quorumd://{CLUSTER}/node/3"],
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            id="rsa-key",
        ),
    ],
)
def test_identity_of_rejects_anything_unexpected(der: bytes) -> None:
    with pytest.raises(pki.PkiError):
        pki.identity_of(der)


def test_pem_to_der_rejects_garbage() -> None:
    with pytest.raises(pki.PkiError):
        pki.pem_to_der(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_write_private_file_is_0600_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "secret.key"
    pki.write_private_file(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    target.chmod(0o644)  # an existing file with a wider mode is replaced, not rewritten in place
    pki.write_private_file(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret.key"]  # no temp file left


def test_api_cert_is_generated_once_with_the_requested_names(tmp_path: Path) -> None:
    cert_path, key_path = pki.load_or_create_api_cert(tmp_path / "tls", ["api.example.net", "10.0.0.7"])
    for p in (cert_path, key_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"api.example.net", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    before = cert_path.read_bytes(), key_path.read_bytes()
    again = pki.load_or_create_api_cert(tmp_path / "tls", ["another.example.net"])
    assert again == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_api_cert_verifies_as_its_own_trust_anchor(tmp_path: Path) -> None:
    """What ``quorumctl --cacert <api.crt>`` does: a default client context trusting the file."""
    cert_path, key_path = pki.load_or_create_api_cert(tmp_path, [])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert_path), str(key_path))
    client_ctx = ssl.create_default_context(cafile=str(cert_path))

    async def scenario() -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            for host in ("localhost", "127.0.0.1"):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=client_ctx), 5.0
                )
                assert await asyncio.wait_for(reader.read(), 5.0) == b"hello"
                writer.close()
            return "ok"
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == "ok"
