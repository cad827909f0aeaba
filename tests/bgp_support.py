"""Helpers of the BGP speaker tests: a fake speaker program for the supervisor, process probes."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

# A speaker stand-in. argv: LOG MODE [CODE]; every start appends "pid monotonic" to LOG.
#   exit CODE  exits at once with CODE
#   serve      prints a line, then sleeps (bounded: 120 s) until a signal ends it
#   stubborn   like serve, but ignores SIGTERM
FAKE_SPEAKER = r"""
import os, signal, sys, time
log, mode = sys.argv[1], sys.argv[2]
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(log, "a") as f:
    f.write(f"{os.getpid()} {time.monotonic()}\n")
if mode == "exit":
    sys.exit(int(sys.argv[3]))
print("fake speaker up", flush=True)
print("x" * 10000, flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.5)
"""


def fake_speaker_argv(log: Path, mode: str, code: int = 0) -> list[str]:
    return [sys.executable, "-c", FAKE_SPEAKER, str(log), mode, str(code)]


def starts_of(log: Path) -> list[tuple[int, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        pid, t = line.split()
        out.append((int(pid), float(t)))
    return out


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(what: str, fn: object, timeout: float, interval: float = 0.05) -> None:
    """Poll ``fn`` (bounded in time) until it is true."""
    assert callable(fn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(interval)  # polling interval of a bounded wait
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, 9)
