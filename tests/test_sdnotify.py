"""sd_notify client (node/daemon/sdnotify.py) against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from quorumd.node.daemon.sdnotify import SdNotifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "unix socket path too long for this tmp_path"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    yield sock, str(path)
    sock.close()


def test_notify_sends_datagrams_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"
    assert n.ready("serving") and sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping() and sock.recv(4096) == b"STOPPING=1"
    assert n.status("joining node=2") and sock.recv(4096) == b"STATUS=joining node=2"


def test_abstract_socket() -> None:
    name = f"quorumd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        n = SdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.address == "\0" + name
        assert n.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("value", [None, "", "@", "relative/path.sock", "vsock:2:1234"])
def test_unset_or_unsupported_socket_is_a_no_op(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    n = SdNotifier.from_env(env)
    assert not n.enabled
    assert n.notify("READY=1") is False


def test_send_failure_returns_false(tmp_path: Path) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert n.notify("READY=1") is False


def test_empty_state_is_not_sent(listener: tuple[socket.socket, str]) -> None:
    _sock, path = listener
    assert SdNotifier.from_env({"NOTIFY_SOCKET": path}).notify("") is False


def test_watchdog_interval() -> None:
    pid = os.getpid()
    assert SdNotifier.from_env({}).watchdog_interval_seconds() is None
    assert SdNotifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval_seconds() == 30.0
    same = {"WATCHDOG_USEC": "15000000", "WATCHDOG_PID": str(pid)}
    assert SdNotifier.from_env(same).watchdog_interval_seconds() == 15.0
    other = {"WATCHDOG_USEC": "15000000", "WATCHDOG_PID": str(pid + 1)}
    assert SdNotifier.from_env(other).watchdog_interval_seconds() is None
    assert SdNotifier.from_env(other, pid=pid + 1).watchdog_interval_seconds() == 15.0
    for bad in ("0", "-5", "abc", ""):
        assert SdNotifier.from_env({"WATCHDOG_USEC": bad}).watchdog_interval_seconds() is None


def test_from_env_defaults_to_os_environ(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = SdNotifier.from_env()
    assert n.pid == os.getpid()
    assert n.watchdog_interval_seconds() == 2.0
    assert n.notify("WATCHDOG=1") and sock.recv(4096) == b"WATCHDOG=1"
    assert os.environ["NOTIFY_SOCKET"] == path  # left in place
