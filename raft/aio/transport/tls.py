"""TLS for the cluster port, and the client's side of the in-band proof.

One port, TLS 1.3 only, multiplexed by ALPN into three channels (``CHANNELS``): ``quorumd-raft/1``,
``quorumd-rpc/1`` and ``quorumd-join/1``.

Authentication, and why it is not plain mutual TLS. Python's ``ssl`` has no verify callback, so
an OpenSSL-verified client certificate must chain to a trust anchor loaded into the context. That
does not fit here: the pins are fingerprints (a joiner knows only the fingerprints the leader sent
it, not the certificates), and the join channel shares the port and the server context yet must
accept any self-signed client certificate. So TLS 1.3 authenticates the server and encrypts; the
client authenticates inside the channel:

1. TLS 1.3 handshake (min = max = 1.3, tickets off, no hostname check: identity is the pin). The
   client verifies nothing through OpenSSL (CERT_NONE) but the handshake still checks the server's
   CertificateVerify, so the certificate the client reads afterwards is proven; the client then
   requires its fingerprint to be the pin of the node it dialed (or the join token's pin) and its
   embedded identity to match, and refuses otherwise before sending anything.
2. The server sends a fresh 32-byte nonce (``CHALLENGE``). The client answers ``PROOF``: its
   certificate DER and an ECDSA-SHA256 signature over ``"quorumd-auth/1" | ALPN | nonce | server
   fingerprint`` (``identity``). On raft/rpc the server then requires the certificate's
   fingerprint to be pinned and its embedded identity (node id, cluster id) to match that pin,
   and answers ``ACCEPT``; otherwise it closes the connection, logs ``peer_refused`` at WARNING
   and counts the reason (``listener``).

Contexts never hold pins, so a pin change rebuilds nothing (``peers``). The server's private key
reaches OpenSSL through pipes, never a file on disk where ``/dev/fd`` exists.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ...codec import packb
from .connection import _Conn
from .errors import _Malformed
from .framing import FrameKind, _unpack
from .identity import NONCE_BYTES, _proof_message

ALPN_RAFT = "quorumd-raft/1"
ALPN_RPC = "quorumd-rpc/1"
ALPN_JOIN = "quorumd-join/1"
CHANNELS = (ALPN_RAFT, ALPN_RPC, ALPN_JOIN)


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` reads only files: feed it through pipes so the key never touches disk
    (a private temporary directory where /dev/fd does not exist)."""
    if os.path.isdir("/dev/fd") and max(len(cert_pem), len(key_pem)) < 60_000:
        fds: list[int] = []
        try:
            paths = []
            for data in (cert_pem, key_pem):
                r, w = os.pipe()
                fds += [r, w]
                os.write(w, data)  # fits in the pipe buffer: never blocks
                os.close(w)
                fds.remove(w)
                paths.append(f"/dev/fd/{r}")
            ctx.load_cert_chain(paths[0], paths[1])
            return
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="quorumd-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(cert_path), str(key_path))


def _server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE  # clients prove their certificate in-band (see the module docstring)
    ctx.num_tickets = 0  # no resumption: every connection runs the full handshake and proof
    ctx.set_alpn_protocols(list(CHANNELS))
    _load_cert_chain(ctx, cert_pem, key_pem)
    return ctx


def _client_context(alpn: str) -> ssl.SSLContext:
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is checked on the proven certificate after the handshake
    ctx.set_alpn_protocols([alpn])
    return ctx


def _tls_facts(conn: _Conn) -> tuple[str | None, bytes | None]:
    """(selected ALPN, peer certificate DER) of an established TLS connection."""
    assert conn.transport is not None
    obj = conn.transport.get_extra_info("ssl_object")
    if obj is None or obj.version() != "TLSv1.3":
        return None, None
    return obj.selected_alpn_protocol(), obj.getpeercert(binary_form=True)


async def _client_prove(
    conn: _Conn, alpn: str, server_fp: str, cert_der: bytes, key: ec.EllipticCurvePrivateKey
) -> None:
    """Client side of the in-band proof; ConnectionResetError when the server refuses us."""
    conn.use_inbox()
    try:
        _, nonce = _unpack(await conn.read_frame(), (FrameKind.CHALLENGE,), 2)
        if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
            raise _Malformed("bad challenge")
        signature = key.sign(_proof_message(alpn, nonce, server_fp), ec.ECDSA(hashes.SHA256()))
        conn.write_frames([packb([FrameKind.PROOF, cert_der, signature])])
        _unpack(await conn.read_frame(), (FrameKind.ACCEPT,), 1)
    except _Malformed as exc:
        conn.malformed(str(exc))
        raise ConnectionResetError("malformed authentication frame") from exc
