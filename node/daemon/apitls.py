"""The API's TLS pair: loading and checking it, and reloading it on SIGHUP.

``load_api_tls(cert, key)`` reads both files, checks them and builds the server's
``ssl.SSLContext``; the start (``startup.api_ssl_context``) and every reload use it, so a reloaded
context is built exactly like the first one. The checks, each refused with an ``ApiTlsError``
naming the file at fault: both files are readable regular files; the certificate file starts
with a PEM certificate (a chain may follow it); the key file holds an unencrypted PEM private key (an
encrypted one is refused rather than prompting for a passphrase); the key is the certificate's
(same public key); and OpenSSL loads the pair (``load_cert_chain``, which checks the match
again). A file replaced while it was being loaded is read again (up to ``LOAD_ATTEMPTS`` times),
so the fingerprint reported is the one of the certificate in the context.

``ApiTlsReloader`` is SIGHUP's action (``request``, on the event loop). Once the API serves, each
SIGHUP loads the pair from the same two paths the API was started with (``api.tls.cert``/``key``,
or the self-signed pair in ``<data-dir>/tls/``, which a reload never generates) and, only when
every check passes, hands the new context to ``ApiServer.replace_ssl_context``: TLS handshakes
from then on present the new certificate; established connections (keep-alive included) keep
their session and go on serving. It logs ``api_tls_reloaded fingerprint=sha256:... not_after=...
cert=... previous=...`` (INFO), or ``api_tls_reload_failed path=... error=...`` (ERROR, no
traceback) and keeps the pair it had. Both are counted in ``quorumd_api_tls_reloads_total{result}``
(``ok``, ``failed``). A SIGHUP before the API serves changes nothing (``api_tls_reload_skipped``):
the start reads the files. The files are read in the default executor (a slow file system never
stalls the loop; the load itself is about 2 ms, RSA-4096 included); a SIGHUP that arrives while a
reload runs makes one more reload run after it, so the last signal always sees the files as they
are then.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter

from quorumd.node.cluster import pki

log = logging.getLogger(__name__)

__all__ = ["LOAD_ATTEMPTS", "RELOAD_RESULTS", "ApiTlsError", "ApiTlsPair", "ApiTlsReloader", "load_api_tls"]

LOAD_ATTEMPTS = 3
RELOAD_RESULTS: tuple[str, ...] = ("ok", "failed")


class ApiTlsError(Exception):
    """A pair that cannot serve: ``path`` is the file at fault, ``reason`` says why (never key
    material)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApiTlsPair:
    """A checked pair and the server context built from it."""

    cert: Path
    key: Path
    context: ssl.SSLContext
    fingerprint: str  # sha256:<hex> of the (leaf) certificate's DER
    not_after: datetime.datetime


def _read(path: Path) -> bytes:
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block in open()
            raise ApiTlsError(path, "not a regular file")
        return path.read_bytes()
    except OSError as exc:
        raise ApiTlsError(path, f"cannot read: {exc.strerror or type(exc).__name__}") from None


def _no_passphrase() -> bytes:
    raise ValueError("encrypted private keys are not supported")


def _public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _check(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """The leaf certificate, once the key is known to be its unencrypted private key."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ApiTlsError(cert, "not a PEM certificate") from None
    try:
        # RSA's full key validation is skipped (hundreds of ms for a 4096-bit key); the match with
        # the certificate is the public-key comparison below, which is what OpenSSL checks too.
        private = serialization.load_pem_private_key(
            key_pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise ApiTlsError(key, "the private key is encrypted (not supported)") from None
    except UnsupportedAlgorithm:
        raise ApiTlsError(key, "unsupported key type") from None
    except ValueError:
        raise ApiTlsError(key, "not a PEM private key") from None
    if _public_der(private.public_key()) != _public_der(leaf.public_key()):
        raise ApiTlsError(key, f"the key does not match the certificate {cert}")
    return leaf


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except (ssl.SSLError, ValueError) as exc:
        raise ApiTlsError(cert, f"OpenSSL refused the pair: {exc}") from None
    except OSError as exc:
        raise ApiTlsError(Path(exc.filename or cert), f"cannot read: {exc.strerror}") from None
    return ctx


def load_api_tls(cert: Path, key: Path) -> ApiTlsPair:
    """Read, check and load the pair (``ApiTlsError`` when it cannot serve); blocking, ~2 ms."""
    cert, key = Path(cert), Path(key)
    for _ in range(LOAD_ATTEMPTS):
        cert_pem, key_pem = _read(cert), _read(key)
        leaf = _check(cert, key, cert_pem, key_pem)
        ctx = _context(cert, key)
        if _read(cert) == cert_pem and _read(key) == key_pem:  # what OpenSSL loaded is what we checked
            return ApiTlsPair(
                cert,
                key,
                ctx,
                pki.fingerprint(leaf.public_bytes(serialization.Encoding.DER)),
                leaf.not_valid_after_utc,
            )
    raise ApiTlsError(cert, "the files kept changing while being loaded; send SIGHUP again")


class TlsServer(Protocol):
    """What the reloader needs of the API server (``quorumd.api.server.ApiServer``)."""

    def replace_ssl_context(self, context: ssl.SSLContext) -> None: ...


class ApiTlsReloader:
    """SIGHUP's action: reload the API's pair (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.server: TlsServer | None = None
        self.pair: ApiTlsPair | None = None
        self.reloads = Counter(
            "quorumd_api_tls_reloads",
            "API certificate reloads (SIGHUP) by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False

    def serve(self, server: TlsServer, pair: ApiTlsPair) -> None:
        """``server`` serves ``pair``: from now on SIGHUP reloads it."""
        self.server, self.pair = server, pair
        log.info(
            "api_tls_loaded fingerprint=%s not_after=%s cert=%s",
            pair.fingerprint,
            pair.not_after.isoformat(),
            pair.cert,
        )

    def request(self) -> None:
        """SIGHUP's callback (on the event loop): start a reload, or, when one is under way, have
        one more run after it (it reads the files again). Nothing once the daemon stops."""
        if self._closed:
            log.info("api_tls_reload_skipped reason=stopping")
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._reload_while_asked(), name="api-tls-reload")

    async def _reload_while_asked(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Load the pair again (in the default executor) and swap it in; False (the old pair kept)
        when it is refused or when the API does not serve yet."""
        server, current = self.server, self.pair
        if server is None or current is None:
            log.info("api_tls_reload_skipped reason=api_not_serving")
            return False
        loop = asyncio.get_running_loop()
        try:
            pair = await loop.run_in_executor(None, load_api_tls, current.cert, current.key)
        except ApiTlsError as exc:
            self.reloads.labels("failed").inc()
            log.error("api_tls_reload_failed path=%s error=%s", exc.path, exc.reason)
            return False
        server.replace_ssl_context(pair.context)
        self.pair = pair
        self.reloads.labels("ok").inc()
        log.info(
            "api_tls_reloaded fingerprint=%s not_after=%s cert=%s previous=%s",
            pair.fingerprint,
            pair.not_after.isoformat(),
            pair.cert,
            current.fingerprint,
        )
        return True

    async def close(self) -> None:
        """Stop a reload under way (the daemon's stop), and take no more; its file reads end on
        their own."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
