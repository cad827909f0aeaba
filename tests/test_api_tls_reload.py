"""The API certificate reload on SIGHUP (node/daemon/apitls.py).

Unit: ``load_api_tls`` accepts a good pair (and a chain) and refuses, naming the file at fault,
an unreadable file, a file that is not a regular file, a certificate or key that is not PEM, an
encrypted key (without prompting) and a key that is not the certificate's; ``ApiTlsReloader``
swaps the server's context only for a good pair, logs and counts both outcomes; the signal
handlers call the reload on SIGHUP and do not stop; ``api_ssl_context`` without ``api.tls``
serves, and reloads, the generated pair in the data dir.

Live: a real daemon with ``api.tls`` configured. A keep-alive HTTPS connection is opened; the
files are replaced and SIGHUP sent: new handshakes get the new certificate, the process is the
same one, and the old connection (same socket, no reconnect) still serves. A mismatched pair and
a missing file are then refused with an ERROR line, new handshakes keep the last good
certificate, and the daemon stays up; a good pair afterwards is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from quorumd.node.cluster import pki
from quorumd.node.config.schema import config_from_dict
from quorumd.node.daemon import apitls
from quorumd.node.daemon.apitls import ApiTlsError, ApiTlsPair, ApiTlsReloader, load_api_tls
from quorumd.node.daemon.datadir import FatalError
from quorumd.node.daemon.sdnotify import install_signal_handlers
from quorumd.node.daemon.startup import api_ssl_context

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "quorumd.service"


# --- pairs -------------------------------------------------------------------------------------------------


def _key_and_cert(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fp(cert: x509.Certificate) -> str:
    return pki.fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _install(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (what ``install``/``mv`` do), 0600."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def _write_pair(cert_path: Path, key_path: Path, name: str) -> str:
    """A new self-signed pair at the two paths; returns its certificate's fingerprint."""
    key, cert = _key_and_cert(name)
    _install(key_path, _key_pem(key))
    _install(cert_path, _cert_pem(cert))
    return _fp(cert)


def _served_fingerprint(ctx: ssl.SSLContext) -> str:
    """Handshake with ``ctx`` in memory and return the fingerprint of the certificate it presents."""
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a TLS 1.3 handshake is done in two round trips
        done = 0
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None, "the handshake did not complete"
    return pki.fingerprint(der)


# --- load_api_tls ------------------------------------------------------------------------------------------


def test_a_good_pair_loads_and_serves_its_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    fp = _write_pair(cert, key, "one")
    pair = load_api_tls(cert, key)
    assert (pair.cert, pair.key, pair.fingerprint) == (cert, key, fp)
    assert pair.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert _served_fingerprint(pair.context) == fp
    assert pair.not_after > datetime.datetime.now(datetime.UTC)


def test_a_chain_reports_the_leaf_and_a_combined_file_loads(tmp_path: Path) -> None:
    leaf_key, leaf = _key_and_cert("leaf")
    _, other = _key_and_cert("intermediate")
    cert, key = tmp_path / "chain.crt", tmp_path / "leaf.key"
    cert.write_bytes(_cert_pem(leaf) + _cert_pem(other))
    key.write_bytes(_key_pem(leaf_key))
    assert load_api_tls(cert, key).fingerprint == _fp(leaf)
    combined = tmp_path / "combined.pem"  # certificate and key in one file
    combined.write_bytes(_cert_pem(leaf) + _key_pem(leaf_key))
    assert load_api_tls(combined, combined).fingerprint == _fp(leaf)


def _refused(cert: Path, key: Path) -> ApiTlsError:
    with pytest.raises(ApiTlsError) as info:
        load_api_tls(cert, key)
    return info.value


def test_a_mismatched_pair_is_refused_naming_the_key(tmp_path: Path) -> None:
    key_a, cert_a = _key_and_cert("a")
    key_b, _ = _key_and_cert("b")
    cert, key = tmp_path / "a.crt", tmp_path / "b.key"
    cert.write_bytes(_cert_pem(cert_a))
    key.write_bytes(_key_pem(key_b))
    err = _refused(cert, key)
    assert err.path == key and "does not match the certificate" in err.reason
    key.write_bytes(_key_pem(key_a))  # the same files with the right key load
    assert load_api_tls(cert, key).fingerprint == _fp(cert_a)


def test_unreadable_and_malformed_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    _write_pair(cert, key, "one")
    missing = tmp_path / "missing.crt"
    err = _refused(missing, key)
    assert err.path == missing and err.reason == "cannot read: No such file or directory"
    err = _refused(cert, tmp_path)  # a directory
    assert err.path == tmp_path and err.reason == "not a regular file"
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    err = _refused(cert, fifo)  # refused at once: never opened (an open would block)
    assert err.path == fifo and err.reason == "not a regular file"
    err = _refused(key, key)  # a key where the certificate belongs
    assert err.path == key and err.reason == "not a PEM certificate"
    err = _refused(cert, cert)  # a certificate where the key belongs
    assert err.path == cert and err.reason == "not a PEM private key"
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    err = _refused(cert, garbage)
    assert err.path == garbage and err.reason == "not a PEM private key"
    assert "not base64" not in str(err)


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    k, c = _key_and_cert("enc")
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    cert.write_bytes(_cert_pem(c))
    key.write_bytes(_key_pem(k, password=b"secret-passphrase"))
    err = _refused(cert, key)
    assert err.path == key and "encrypted" in err.reason


# --- the reloader ------------------------------------------------------------------------------------------


class _FakeServer:
    def __init__(self, context: ssl.SSLContext) -> None:
        self.ssl_context = context
        self.replaced = 0

    def replace_ssl_context(self, context: ssl.SSLContext) -> None:
        self.ssl_context = context
        self.replaced += 1


def _reloads(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("quorumd_api_tls_reloads_total", {"result": result})
    assert value is not None
    return value


@pytest.mark.asyncio
async def test_the_reloader_swaps_only_a_good_pair(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quorumd.node.daemon.apitls")
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    fp1 = _write_pair(cert, key, "one")
    registry = CollectorRegistry()
    reloader = ApiTlsReloader(registry)
    assert await reloader.reload() is False  # before the API serves: nothing to reload
    assert "api_tls_reload_skipped reason=api_not_serving" in caplog.text
    assert _reloads(registry, "ok") == 0 and _reloads(registry, "failed") == 0

    first: ApiTlsPair = load_api_tls(cert, key)
    server = _FakeServer(first.context)
    reloader.serve(server, first)
    fp2 = _write_pair(cert, key, "two")
    assert await reloader.reload() is True
    assert server.replaced == 1 and _served_fingerprint(server.ssl_context) == fp2 != fp1
    assert f"api_tls_reloaded fingerprint={fp2}" in caplog.text and f"previous={fp1}" in caplog.text
    assert _reloads(registry, "ok") == 1

    good = server.ssl_context
    k3, _ = _key_and_cert("three")
    _install(key, _key_pem(k3))  # the key of another certificate
    caplog.clear()
    assert await reloader.reload() is False
    assert server.ssl_context is good and server.replaced == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith(f"api_tls_reload_failed path={key} error=the key does not match")
    assert record.exc_info is None
    assert _reloads(registry, "failed") == 1

    cert.unlink()
    assert await reloader.reload() is False and server.ssl_context is good
    assert f"api_tls_reload_failed path={cert} error=cannot read" in caplog.text
    assert _reloads(registry, "failed") == 2 and _reloads(registry, "ok") == 1
    assert reloader.pair is not None and reloader.pair.fingerprint == fp2


@pytest.mark.asyncio
async def test_api_ssl_context_without_api_tls_serves_and_reloads_the_generated_pair(tmp_path: Path) -> None:
    cfg = config_from_dict({"data-dir": str(tmp_path / "data"), "cluster": {"node-id": 1}})
    pair = api_ssl_context(cfg)
    tls_dir = tmp_path / "data" / "tls"
    assert (pair.cert, pair.key) == (tls_dir / pki.API_CERT_FILE, tls_dir / pki.API_KEY_FILE)
    assert _served_fingerprint(pair.context) == pair.fingerprint
    server = _FakeServer(pair.context)
    reloader = ApiTlsReloader(CollectorRegistry())
    reloader.serve(server, pair)
    fp = _write_pair(pair.cert, pair.key, "operator-supplied")
    assert await reloader.reload() is True and _served_fingerprint(server.ssl_context) == fp
    pair.key.unlink()  # a reload never generates a pair
    assert await reloader.reload() is False and not pair.key.exists()


@pytest.mark.asyncio
async def test_signals_during_a_reload_make_one_more_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    _write_pair(cert, key, "one")
    first = load_api_tls(cert, key)
    server = _FakeServer(first.context)
    registry = CollectorRegistry()
    reloader = ApiTlsReloader(registry)
    reloader.serve(server, first)
    loading, release = threading.Event(), threading.Event()
    loads: list[int] = []

    def held_load(c: Path, k: Path) -> ApiTlsPair:  # the first load waits until the test says
        loads.append(1)
        if len(loads) == 1:
            loading.set()
            assert release.wait(10)
        return load_api_tls(c, k)

    monkeypatch.setattr(apitls, "load_api_tls", held_load)
    fp = _write_pair(cert, key, "two")
    reloader.request()
    assert await asyncio.to_thread(loading.wait, 10)
    for _ in range(2):  # two SIGHUPs while the first load runs: one more reload after it
        reloader.request()
    release.set()
    task = reloader._task
    assert task is not None
    await asyncio.wait_for(task, 10)
    assert len(loads) == 2 and server.replaced == 2 and _reloads(registry, "ok") == 2
    assert _served_fingerprint(server.ssl_context) == fp

    loading.clear()
    release.clear()
    loads.clear()  # the next load is held again: the daemon stops while it runs
    reloader.request()
    assert await asyncio.to_thread(loading.wait, 10)
    await reloader.close()  # cancelled: the context is not swapped
    release.set()
    assert reloader._task is None and server.replaced == 2
    reloader.request()  # a SIGHUP after the stop began starts nothing
    assert reloader._task is None


def test_api_ssl_context_refuses_a_bad_configured_pair_at_start(tmp_path: Path) -> None:
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    _write_pair(cert, key, "one")
    _install(key, _key_pem(_key_and_cert("other")[0]))
    cfg = config_from_dict(
        {
            "data-dir": str(tmp_path / "data"),
            "api": {"tls": {"cert": str(cert), "key": str(key)}},
            "cluster": {"node-id": 1},
        }
    )
    with pytest.raises(FatalError, match="does not match the certificate"):
        api_ssl_context(cfg)


# --- signals and the unit ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _handlers(stop: asyncio.Event, reload: Callable[[], object] | None) -> Iterator[None]:
    """``install_signal_handlers`` for one test; SIGHUP falls back on a Python handler meanwhile,
    so that a handler that was not installed fails the test rather than ending the test runner."""
    previous = signal.signal(signal.SIGHUP, lambda _sig, _frame: None)
    loop = asyncio.get_running_loop()
    try:
        install_signal_handlers(stop, reload=reload)
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.asyncio
async def test_sighup_calls_the_reload_and_does_not_stop() -> None:
    stop = asyncio.Event()
    called = asyncio.Event()
    with _handlers(stop, called.set):
        for _ in range(2):
            called.clear()
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(called.wait(), 10)
        assert not stop.is_set()


@pytest.mark.asyncio
async def test_sighup_without_a_reload_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quorumd.node.daemon.sdnotify")
    stop = asyncio.Event()
    with _handlers(stop, None):
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):  # bounded poll: the handler runs on one of the next loop iterations
            if "signal_received signal=SIGHUP action=none" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "signal_received signal=SIGHUP action=none" in caplog.text
        assert not stop.is_set()


def test_the_systemd_unit_reloads_with_sighup() -> None:
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
