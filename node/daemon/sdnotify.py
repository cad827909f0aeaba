"""Talking to the service manager: signals (SIGTERM/SIGINT stop, SIGHUP reloads the API
certificate), and a minimal ``sd_notify(3)`` client (READY=1, WATCHDOG=1, STOPPING=1, STATUS=...
to systemd).

``SdNotifier.from_env()`` reads ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract
namespace) and ``WATCHDOG_USEC``/``WATCHDOG_PID``. Without ``NOTIFY_SOCKET`` (not under systemd, or
``Type=`` is not ``notify``) every call is a no-op returning False, so the daemon calls it
unconditionally. Each ``notify`` opens a datagram socket, sends one datagram and closes it (what
libsystemd does); a send that cannot complete within ``SEND_TIMEOUT_SECONDS`` is reported as False
rather than blocking the event loop for longer. Environment variables are left in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["SEND_TIMEOUT_SECONDS", "SdNotifier"]

SEND_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class SdNotifier:
    """Where to send notifications (``address`` None = disabled) and the watchdog settings."""

    address: str | None = None  # a path, or "\0name" for an abstract socket
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None
    pid: int = 0  # this process's pid, compared with WATCHDOG_PID

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> SdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | None = None
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@") and len(raw) > 1:
            address = "\0" + raw[1:]
        # anything else (unset, empty, vsock:..., relative) is unsupported: notifications are disabled
        return cls(
            address=address,
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
            pid=os.getpid() if pid is None else pid,
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments); True when sent."""
        if self.address is None or not state:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                sock.connect(self.address)
                sock.sendall(state.encode("utf-8"))
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog_interval_seconds(self) -> float | None:
        """systemd's watchdog timeout (``WatchdogSec``) in seconds, or None when not for this process.

        Send ``WATCHDOG=1`` at least every half of it (libsystemd's advice). ``WATCHDOG_PID``, when
        set, must be this process's pid.
        """
        if self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != self.pid:
            return None
        return self.watchdog_usec / 1_000_000


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    value = int(text)
    return value if value > 0 else None


def install_signal_handlers(stop: asyncio.Event, reload: Callable[[], object] | None = None) -> None:
    """SIGTERM/SIGINT set ``stop`` (a graceful stop); a second one exits at once (code 1).
    SIGHUP calls ``reload`` (the API certificate reload) and nothing else; it never stops the
    daemon (without ``reload`` it is logged and ignored). Install early: SIGHUP's default action
    would end the process."""
    loop = asyncio.get_running_loop()
    count = 0

    def on_signal(signame: str) -> None:
        nonlocal count
        count += 1
        if count > 1:
            log.warning("second_signal_exit signal=%s", signame)
            os._exit(1)
        log.info("signal_received signal=%s", signame)
        stop.set()

    def on_hangup() -> None:
        log.info("signal_received signal=SIGHUP action=%s", "reload" if reload is not None else "none")
        if reload is None:
            return
        try:
            reload()
        except Exception:  # a bug in the reload must not take the loop's signal handling with it
            log.exception("reload_failed signal=SIGHUP")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
