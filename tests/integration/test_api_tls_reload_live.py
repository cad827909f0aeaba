"""SIGHUP reloads ``api.tls`` on a running daemon: new handshakes get the new certificate, a keep-alive
connection opened before serves on (same socket), a mismatched or missing file is refused with an
ERROR line and the last good pair stays (the pair checks and signal handlers: tests/test_api_tls_reload.py).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
import yaml

from quorumd.node.cluster import pki
from tests.cluster import _SSL, Cluster, wait_for
from tests.test_api_tls_reload import _cert_pem, _fp, _install, _key_and_cert, _key_pem, _write_pair

# --- live: a real daemon -----------------------------------------------------------------------------------


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _new_handshake(port: int) -> str:
    """The fingerprint a brand-new TLS connection is shown (a fresh context: no resumption)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        _client_ctx().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return pki.fingerprint(der)


def _get(conn: http.client.HTTPSConnection, path: str) -> int:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert not resp.will_close, "the server closed the keep-alive connection"
    return resp.status


def _metric(url: str, result: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", context=_SSL, timeout=5) as r:
        text = r.read().decode()
    prefix = f'quorumd_api_tls_reloads_total{{result="{result}"}} '
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


@pytest.mark.xdist_group("test_api_tls_reload")
def test_sighup_reloads_the_api_certificate_of_a_running_daemon(tmp_path: Path) -> None:
    tls_dir = tmp_path / "api-tls"
    tls_dir.mkdir()
    cert, key = tls_dir / "api.crt", tls_dir / "api.key"
    fp1 = _write_pair(cert, key, "first")
    c = Cluster(tmp_path, 1)
    node = c.make_node(1)
    c.write_config(node)
    cfg = yaml.safe_load(node.config_path.read_text())
    cfg["api"]["tls"] = {"cert": str(cert), "key": str(key)}
    node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    conn: http.client.HTTPSConnection | None = None
    try:
        c.start(node)
        assert node.proc is not None
        pid = node.proc.pid
        c.wait_ready(1, timeout=60)

        def lines(needle: str) -> list[str]:
            return [line for line in node.log_text().splitlines() if needle in line]

        def refusals(count: int) -> list[str]:
            found = lines("api_tls_reload_failed")
            return found if len(found) >= count else []

        assert lines(f"api_tls_loaded fingerprint={fp1}")
        assert _new_handshake(node.api_port) == fp1

        # one keep-alive connection, kept across every reload below
        conn = http.client.HTTPSConnection("127.0.0.1", node.api_port, context=_client_ctx(), timeout=10)
        conn.connect()
        conn.auto_open = 0  # never reconnect behind the test's back: a dead socket raises instead
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert pki.fingerprint(sock.getpeercert(binary_form=True) or b"") == fp1
        assert _get(conn, "/healthz") == 200

        # a new pair, SIGHUP: new handshakes see it; same process; the old connection serves on
        fp2 = _write_pair(cert, key, "second")
        os.kill(pid, signal.SIGHUP)
        wait_for("the reload", lambda: lines(f"api_tls_reloaded fingerprint={fp2}"), timeout=30)
        assert _new_handshake(node.api_port) == fp2 != fp1
        assert node.proc.poll() is None and not lines("shutdown_start")
        assert _get(conn, "/api/v1/status") == 200
        assert conn.sock is sock and pki.fingerprint(sock.getpeercert(binary_form=True) or b"") == fp1

        # a mismatched pair (the certificate of one key, another key): refused, fp2 stays
        other_key, other_cert = _key_and_cert("third")
        _install(cert, _cert_pem(other_cert))
        _install(key, _key_pem(_key_and_cert("fourth")[0]))
        os.kill(pid, signal.SIGHUP)
        [failed] = wait_for("the refusal", lambda: refusals(1), timeout=30)
        assert " ERROR " in failed and f"path={key} error=the key does not match the certificate" in failed
        assert _new_handshake(node.api_port) == fp2
        assert node.proc.poll() is None

        # an unreadable pair (the certificate is gone): refused, fp2 stays
        cert.unlink()
        os.kill(pid, signal.SIGHUP)
        failures = wait_for("the second refusal", lambda: refusals(2), timeout=30)
        assert len(failures) == 2
        assert " ERROR " in failures[1] and f"path={cert} error=cannot read: No such file" in failures[1]
        assert _new_handshake(node.api_port) == fp2
        assert node.proc.poll() is None
        assert _get(conn, "/healthz") == 200 and conn.sock is sock

        # a good pair again is taken
        _install(key, _key_pem(other_key))
        _install(cert, _cert_pem(other_cert))
        fp3 = _fp(other_cert)
        os.kill(pid, signal.SIGHUP)
        wait_for("the third reload", lambda: lines(f"api_tls_reloaded fingerprint={fp3}"), timeout=30)
        assert _new_handshake(node.api_port) == fp3
        assert _metric(node.api, "ok") == 2 and _metric(node.api, "failed") == 2
        assert _get(conn, "/healthz") == 200 and conn.sock is sock
        assert node.proc.poll() is None and node.proc.pid == pid
        assert "Traceback" not in node.log_text()
        conn.close()
        conn = None
        assert c.stop(1) == 0
    finally:
        if conn is not None:
            conn.close()
        c.close()
