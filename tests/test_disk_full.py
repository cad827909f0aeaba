"""A full disk is a condition a node waits out, never a crash loop, and no acknowledged write is lost.

Every test puts a data dir on a small tmpfs (root only) and fills it with a ballast file:

* The storage: a WAL append that does not fit is cut back to what was synced and stays buffered
  (``StorageFullError``); once space is free the same ``sync`` writes it and a reopen finds every
  entry. A snapshot that does not fit leaves no temporary file behind.
* The retry loop says ``disk_full path=... free=...`` once at ERROR, backs off, and says
  ``disk_space_recovered`` when a write fits again.
* The start waits for space (``disk_full`` at ERROR once, ``STATUS=`` and
  ``EXTEND_TIMEOUT_USEC=`` for systemd at each check) instead of exiting; a stop request ends the
  wait at once.
* Live, three daemons: the leader's disk fills. It stays up with one ``disk_full`` line and no
  traceback, the other two elect a leader and go on acknowledging writes; once space is freed the
  node catches up with every acknowledged write. Restarted on a full disk it waits (systemd hears
  it is waiting), exits 0 on SIGTERM while waiting, and once space is free starts and serves,
  again with every acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quorumd.node.daemon import startup
from quorumd.raft.aio import fdretry
from quorumd.raft.aio import storage as storage_mod
from quorumd.raft.aio.fdretry import StorageRetries
from quorumd.raft.aio.storage import LogStorage, StorageError
from quorumd.raft.core.types import Entry, EntryType, HardState
from tests.test_storage import snap

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
    pytest.mark.xdist_group("test_disk_full"),
]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(50):  # bounded: a process may still hold a file for a moment
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)  # never left mounted


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def full_error(path: Path, free: int) -> Exception:
    return storage_mod.StorageFullError(path, free)


def fill(directory: Path) -> None:
    """A ballast file that takes every free byte (unbuffered: a short write fills the last page)."""
    fd = os.open(directory / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(100_000):  # bounded: far more than any tmpfs here holds
            try:
                os.write(fd, b"\0" * 65536)
            except OSError:
                break
    finally:
        os.close(fd)


def big_entries(first: int, last: int, size: int = 8192) -> list[Entry]:
    return [Entry(1, i, EntryType.NORMAL, (b"%08d" % i) * (size // 8)) for i in range(first, last + 1)]


# --- the storage --------------------------------------------------------------------------------------
def test_a_wal_append_that_does_not_fit_is_cut_back_and_written_once_space_is_free(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        d = disk / "raft"
        st, _ = LogStorage.open(d)
        try:
            st.append(big_entries(1, 3))
            st.set_hard_state(HardState(1, 1, 3))
            st.sync()
            (segment,) = sorted(d.glob("wal-*.log"))
            synced = segment.stat().st_size
            fill(disk)
            st.append(big_entries(4, 20))  # 136 KiB: more than the part-used last page holds
            with pytest.raises(StorageError) as info:
                st.sync()
            assert segment.stat().st_size == synced  # what landed of it was cut off again
            with pytest.raises(StorageError):
                st.sync()  # still full: still nothing changes
            assert segment.stat().st_size == synced
            (disk / "ballast").unlink()
            st.sync()  # the same buffered records, written once there is room
            assert segment.stat().st_size > synced
            assert isinstance(info.value, storage_mod.StorageFullError)
            assert info.value.path == segment and 0 <= info.value.free < 8192
            assert st.full_errors == 2
        finally:
            st.close()
        st, rec = LogStorage.open(d)
        with st:
            assert [e.index for e in rec.entries] == list(range(1, 21))
            assert rec.entries == big_entries(1, 20)


def test_a_snapshot_that_does_not_fit_leaves_no_temporary_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        d = disk / "raft"
        st, _ = LogStorage.open(d)
        try:
            st.append(big_entries(1, 5, 64))
            st.sync()
            fill(disk)
            with pytest.raises(StorageError) as info:
                st.save_snapshot(snap(3, 1, b"s" * 200_000))
            assert not list(d.glob("*.tmp")) and not list(d.glob("snap-*"))
            assert isinstance(info.value, storage_mod.StorageFullError)
            (disk / "ballast").unlink()
            st.save_snapshot(snap(3, 1, b"s" * 100_000))
            st.append(big_entries(6, 6, 64))
            st.sync()
        finally:
            st.close()
        st, rec = LogStorage.open(d)
        with st:
            assert rec.snapshot is not None and rec.snapshot.meta.index == 3
            assert [e.index for e in rec.entries] == [4, 5, 6]


# --- the retry loop ----------------------------------------------------------------------------------
class Hooks:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.on_storage_retry = self.retries.append


@pytest.mark.asyncio
async def test_retries_say_disk_full_once_back_off_and_say_when_it_is_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fdretry, "FULL_MIN_SECONDS", 0.001)
    monkeypatch.setattr(fdretry, "FULL_MAX_SECONDS", 0.004)
    hooks = Hooks()
    retries = StorageRetries(hooks)
    fails = 6
    delays: list[float] = []
    last = [time.monotonic()]

    async def call(attempt: int) -> str:
        now = time.monotonic()
        delays.append(now - last[0])
        last[0] = now
        if attempt < fails:
            raise full_error(Path("/data/raft/wal-0000000000000001.log"), 123)
        return "written"

    with caplog.at_level(logging.DEBUG, logger="quorumd.raft.aio.fdretry"):
        assert await retries.run("write", call, lambda: False) == "written"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(
        "disk_full path=/data/raft/wal-0000000000000001.log free=123 what=write"
    )
    recovered = [r for r in caplog.records if "disk_space_recovered" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].levelno == logging.WARNING
    assert not any(r.exc_info for r in caplog.records)  # no traceback anywhere
    assert hooks.retries == ["write"] * fails and retries.count == fails
    assert retries.full_since is None

    # A second episode within FULL_LOG_SECONDS of the first: counted, but no second ERROR line.
    caplog.clear()
    fails = 2
    with caplog.at_level(logging.DEBUG, logger="quorumd.raft.aio.fdretry"):
        assert await retries.run("snapshot", lambda n: call(n), lambda: False) == "written"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert retries.count == 8


@pytest.mark.asyncio
async def test_stopping_ends_the_retries_with_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdretry, "FULL_MIN_SECONDS", 0.001)
    stopped = False

    async def call(attempt: int) -> None:
        nonlocal stopped
        stopped = attempt >= 3
        raise full_error(Path("/data/raft/x"), 0)

    with pytest.raises(StorageError):
        await StorageRetries(Hooks()).run("write", call, lambda: stopped)


# --- the start ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_the_start_waits_for_space_and_tells_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(startup, "DISK_WAIT_MIN_SECONDS", 0.01)
    monkeypatch.setattr(startup, "DISK_WAIT_MAX_SECONDS", 0.05)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        data_dir = disk / "data"  # not created yet: a first start
        fill(disk)
        notes: list[str] = []
        stop = asyncio.Event()
        with caplog.at_level(logging.DEBUG, logger="quorumd.node.daemon.startup"):
            task = asyncio.create_task(startup.wait_for_disk_space(data_dir, stop, notes.append))
            async with asyncio.timeout(10):
                while len(notes) < 5:
                    await asyncio.sleep(0.01)
            assert not task.done() and not data_dir.exists()
            assert all("EXTEND_TIMEOUT_USEC=" in n and f"STATUS=disk full: {data_dir}" in n for n in notes)
            (disk / "ballast").unlink()
            async with asyncio.timeout(10):
                assert await task is True
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith(f"disk_full path={data_dir} free=")
        assert any("disk_space_recovered" in r.getMessage() for r in caplog.records)
        assert notes[-1] == "STATUS=starting"

        fill(disk)
        task = asyncio.create_task(startup.wait_for_disk_space(data_dir, stop, notes.append))
        stop.set()
        async with asyncio.timeout(10):
            assert await task is False  # a stop request ends the wait: a clean exit
