"""Supervision of one child program (the BGP speaker's ``gobgpd``): start, restart, die with us.

``ProcessSupervisor`` runs the program as a child of quorumd and keeps it running:

- It restarts the child whenever it exits, after a capped exponential backoff (``initial``, doubled
  per quick exit, at most ``max``); a child that ran for ``stable_seconds`` starts the backoff
  over. The wait is interruptible by ``close``.
- The child dies with quorumd, also when quorumd is SIGKILLed: it is spawned with
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (called through ctypes in ``preexec_fn``; the libc symbol is
  resolved before the fork, so the child only makes the one system call), and the child checks
  that its parent is still the one that spawned it (a parent that died between fork and prctl
  leaves no one to send the signal). The death signal follows the *thread* that forked the child:
  spawn only from the event loop's thread, which in quorumd is the main thread and lives as long
  as the process. The same child also goes away with the daemon's cgroup under systemd.
- Its stdout and stderr are one pipe, read asynchronously in bounded chunks and logged line by
  line (cut to ``MAX_LINE_CHARS``) as ``speaker_output``; a chatty or silent child never blocks
  the loop.
- ``prepare`` runs before every start (the speaker removes the socket a killed gobgpd left).
- ``close`` sends SIGTERM, waits a bounded time, then SIGKILL. ``kill`` SIGKILLs the current child
  (a wedged one) and lets the loop restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_LINE_CHARS = 400
READ_CHUNK = 4096
READER_GRACE = 1.0  # seconds the output is still read after the child exited


def pdeathsig_preexec(parent_pid: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive SIGKILL when its parent (thread) dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    getppid = os.getppid
    expected = os.getpid() if parent_pid is None else parent_pid

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if getppid() != expected:  # the parent died before the death signal was armed
            os._exit(0)

    return preexec


class ProcessSupervisor:
    """Keeps ``argv`` running as a child of this process until ``close``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        initial_backoff_seconds: float = 0.2,
        max_backoff_seconds: float = 10.0,
        stable_seconds: float = 10.0,
        on_state: Callable[[], None] | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.initial_backoff = initial_backoff_seconds
        self.max_backoff = max_backoff_seconds
        self.stable_seconds = stable_seconds
        self.on_state = on_state
        self.prepare = prepare  # runs before each start (e.g. remove a stale socket)
        self.starts = 0  # children spawned
        self.last_exit: int | None = None  # the last child's return code (negative: signal)
        self.next_backoff = initial_backoff_seconds
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._started = asyncio.Event()  # set while a child runs

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"supervise-{self.name}")

    async def wait_running(self, timeout: float) -> bool:
        """Wait (bounded) until a child runs; True if one does."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._started.wait()
        return self.pid is not None

    def kill(self) -> None:
        """SIGKILL the current child (a wedged one); the loop restarts it after the backoff."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("speaker_killed name=%s pid=%d", self.name, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop supervising: SIGTERM the child, SIGKILL it after ``timeout``; idempotent. Returns
        with the supervising task ended (bounded: a child that does not finish is given up on)."""
        self._closing.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await proc.wait()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=3.0)
            if not done:
                log.warning("supervisor_close_timeout name=%s", self.name)
                task.cancel()  # its cleanup is bounded: kill, then at most READER_GRACE for the output
                done, _ = await asyncio.wait({task}, timeout=READER_GRACE + 1.0)
                if not done:
                    log.error("supervisor_task_left name=%s", self.name)

    # --- internals -----------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            began = loop.time()
            rc = await self._run_once()
            if self._closing.is_set():
                return
            uptime = loop.time() - began
            if uptime >= self.stable_seconds:
                self.next_backoff = self.initial_backoff
            delay = self.next_backoff
            self.next_backoff = min(self.max_backoff, self.next_backoff * 2)
            log.warning(
                "speaker_exited name=%s code=%s uptime=%.1fs restart_in=%.2fs",
                self.name, rc, uptime, delay,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can lose a cancellation
                    await self._closing.wait()

    async def _run_once(self) -> int | None:
        try:
            if self.prepare is not None:
                self.prepare()
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=pdeathsig_preexec(),
            )
        except OSError as exc:
            log.error("speaker_spawn_failed name=%s error=%s", self.name, exc)
            self.last_exit = None
            return None
        self._proc = proc
        if self._closing.is_set():  # close came while it was being spawned: it saw no child
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        self.starts += 1
        self._started.set()
        log.info("speaker_process_started name=%s pid=%d starts=%d", self.name, proc.pid, self.starts)
        self._notify()
        reader = asyncio.get_running_loop().create_task(self._pump(proc), name=f"{self.name}-output")
        try:
            rc = await proc.wait()
        finally:
            self._started.clear()
            if proc.returncode is None:  # cancelled: never leave the child behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            try:  # a cancellation here still ends the task (never suppressed)
                await asyncio.wait({reader}, timeout=READER_GRACE)
            finally:
                if not reader.done():
                    reader.cancel()
                    await asyncio.wait({reader})  # it ends at its next step
        self.last_exit = rc
        self._notify()
        return rc

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Log the child's output line by line, reading bounded chunks."""
        stream = proc.stdout
        if stream is None:
            return
        partial = b""
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                break
            partial += chunk
            *lines, partial = partial.split(b"\n")
            if len(partial) > READ_CHUNK:  # a line without end: log what we have
                lines.append(partial)
                partial = b""
            for line in lines:
                text = line.decode("utf-8", "replace").strip()
                if text:
                    log.info("speaker_output name=%s line=%s", self.name, text[:MAX_LINE_CHARS])
        if partial.strip():
            log.info(
                "speaker_output name=%s line=%s",
                self.name,
                partial.decode("utf-8", "replace")[:MAX_LINE_CHARS],
            )

    def _notify(self) -> None:
        if self.on_state is not None:
            try:
                self.on_state()
            except Exception:
                log.exception("speaker_state_callback_failed name=%s", self.name)
