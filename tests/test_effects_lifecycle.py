"""Closing the BGP speaker's pieces leaves nothing running: no reconciler task, no ``gobgp``
call, no supervised child, whatever the reconciler, a CLI call or the child was doing when
``close`` came. Fake ``gobgpd``/``gobgp`` programs hold the awkward states deterministically;
one test drives a real ``gobgpd`` (skipped without the Debian package ``gobgpd``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from quorumd.node.effects.gobgp import GoBgpSpeaker
from quorumd.node.effects.supervisor import ProcessSupervisor
from tests.bgp_support import kill_quietly, process_gone
from tests.test_bgp_speaker import settings

HAVE_GOBGP = shutil.which("gobgpd") is not None and shutil.which("gobgp") is not None
needs_gobgp = pytest.mark.skipif(not HAVE_GOBGP, reason="needs the Debian package gobgpd")


def others() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def until(what: str, fn: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)  # polling interval of a bounded wait


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def release(holders: Path, fds: int) -> None:
    """Kill the processes that hold a finished call's output open, and wait until the loop has
    seen that output end (its pipes closed: nothing is left to the garbage collector)."""
    for pid in pids_in(holders):
        kill_quietly(pid)
    await until("the held pipes to close", lambda: open_fds() <= fds, 10)


@needs_gobgp
def test_close_right_after_a_change_ends_the_reconciler(tmp_path: Path) -> None:
    """``stop()`` then ``close()`` in one go (a shutdown) just as the reconciler has gone idle: the
    wake-up and the cancellation reach it together, and it must still end."""
    want = {"10.96.0.1/32"}

    async def main() -> tuple[float, list[str], int]:
        sp = GoBgpSpeaker(settings(tmp_path))
        await sp.open()
        closed: list[float] = []
        closing: list[asyncio.Task[None]] = []

        async def timed_close() -> None:
            began = time.monotonic()
            await sp.close(2.0)
            closed.append(time.monotonic() - began)

        def stop_and_close() -> None:
            sp.stop()
            closing.append(asyncio.ensure_future(timed_close()))

        neighbors = sp.cli.neighbors

        async def last_call_of_a_pass() -> dict[str, str]:
            out = await neighbors()
            if sp.announced == want and not closing:  # the reconciler goes idle once this returns
                asyncio.get_running_loop().call_soon(stop_and_close)
            return out

        sp.cli.neighbors = last_call_of_a_pass  # type: ignore[method-assign]
        pid = 0
        try:
            sp.set_prefixes(sorted(want), canonical=True)
            sp.start()
            await until("announce", lambda: sp.announced == want or bool(closing), 20)
            pid = sp.supervisor.pid or 0
            await until("close", lambda: bool(closed), 20)
        finally:
            if not closing:
                await sp.close(2.0)
        return closed[0], [t.get_name() for t in others()], pid

    took, left, pid = asyncio.run(main())
    assert left == [], left
    assert took < 2.0, f"close waited {took:.2f}s for a reconciler that did not end"
    assert pid and process_gone(pid)


FAKE_GOBGP = """\
case "$*" in
  *"neighbor -j"*) echo '[]' ;;
  *"rib -a ipv4 -j"*) echo $$ >> {d}/v4; exec sleep 60 ;;
  *"rib -a ipv6 -j"*) sleep 60 & echo $! >> {d}/holders; echo $$ >> {d}/v6; exec sleep 60 ;;
  *) exit 0 ;;
esac
"""


def test_close_during_cli_calls_waits_for_every_call(tmp_path: Path) -> None:
    """Two read-back calls in flight when ``close`` comes; one of them takes its (bounded) time to
    end (a process it started keeps its output open). ``close`` returns after both ended."""
    d = tmp_path / "calls"
    d.mkdir()
    s = settings(
        tmp_path,
        gobgpd=script(tmp_path / "gobgpd", "exec sleep 60\n"),
        gobgp=script(tmp_path / "gobgp", FAKE_GOBGP.format(d=d)),
        command_timeout_seconds=30.0,
    )

    async def main() -> list[str]:
        fds = open_fds()
        sp = GoBgpSpeaker(s)
        await sp.open()
        try:
            await until("both read-back calls", lambda: pids_in(d / "v4") and pids_in(d / "v6"), 20)
        finally:
            await sp.close(10.0)
        left = [t.get_name() for t in others()]
        await release(d / "holders", fds)
        return left

    try:
        left = asyncio.run(main())
        assert left == [], left
        assert all(process_gone(p) for p in pids_in(d / "v4") + pids_in(d / "v6"))
    finally:
        for pid in pids_in(d / "holders"):
            kill_quietly(pid)


def test_supervisor_close_leaves_no_task_when_the_child_does_not_finish(tmp_path: Path) -> None:
    """A child that exits but whose output stays open (a process it started holds it): ``close``
    gives up on it within its bounds and still returns with its task ended."""
    holders = tmp_path / "holders"
    child = script(tmp_path / "child", f"sleep 60 & echo $! >> {holders}\nexec sleep 60\n")

    async def main() -> tuple[float, list[str], int]:
        fds = open_fds()
        sup = ProcessSupervisor("fake", [child])
        sup.start()
        assert await sup.wait_running(20)
        pid = sup.pid
        assert pid is not None
        await until("the helper process", lambda: bool(pids_in(holders)), 20)
        began = time.monotonic()
        await sup.close(0.5)
        took, left = time.monotonic() - began, [t.get_name() for t in others()]
        await release(holders, fds)
        return took, left, pid

    try:
        took, left, pid = asyncio.run(main())
        assert left == [], left
        assert took < 8.0, took
        assert process_gone(pid)
    finally:
        for p in pids_in(holders):
            kill_quietly(p)


def test_supervisor_never_restarts_after_close_came_during_a_start(tmp_path: Path) -> None:
    """``close`` while the child is being spawned: the new child is stopped at once."""
    starts = tmp_path / "starts"
    child = script(tmp_path / "child", f"echo $$ >> {starts}\nexec sleep 60\n")

    async def main() -> tuple[float, list[str]]:
        spawning = asyncio.Event()

        def prepare() -> None:
            spawning.set()

        sup = ProcessSupervisor("fake", [child], prepare=prepare)
        sup.start()
        await spawning.wait()  # prepare runs right before the spawn: close lands during it
        began = time.monotonic()
        await sup.close(5.0)
        return time.monotonic() - began, [t.get_name() for t in others()]

    try:
        took, left = asyncio.run(main())
        assert left == [], left
        assert took < 2.0, f"close took {took:.2f}s"
    finally:
        for p in pids_in(starts):
            kill_quietly(p)
