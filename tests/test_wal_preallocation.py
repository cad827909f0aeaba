"""The WAL's preallocated segments (raft/aio/wal.py, storage.py): the open segment is allocated
ahead of its records, its zero tail is told from a torn write, closed segments hold their records
only, and a file system that refuses to preallocate changes nothing but the speed."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

from quorumd.raft.aio import storage as storage_mod
from quorumd.raft.aio import wal as wal_mod
from quorumd.raft.aio.storage import LogStorage, StorageCorruptError, StorageError
from quorumd.raft.core.types import Entry, EntryType, HardState

STEP = wal_mod.PREALLOCATE_BYTES


def entries(first: int, last: int, tag: bytes = b"") -> list[Entry]:
    return [Entry(1, i, EntryType.NORMAL, b"e%d" % i + tag) for i in range(first, last + 1)]


def wal_files(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def record_starts(path: Path) -> list[int]:
    """Offsets of the records of ``path``, up to its zero tail if it has one."""
    data = path.read_bytes()
    pos, out = 0, []
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 4], "little")
        if length == 0:
            break
        out.append(pos)
        pos += 8 + length
    return [*out, pos]


def records_end(path: Path) -> int:
    """Offset just past the last record of ``path`` (where its zero tail, if any, begins)."""
    return record_starts(path)[-1]


def write_batches(st: LogStorage, last: int, tag: bytes = b"") -> None:
    """Entries 1..``last`` in synced batches of ten."""
    for first in range(1, last + 1, 10):
        st.append(entries(first, min(first + 9, last), tag=tag))
        st.sync()


def crashed_copy(st: LogStorage, src: Path, dst: Path) -> Path:
    """The directory as a crash would leave it now: the files copied while the storage is open
    (every record written so far was synced), the open segment with its preallocated tail."""
    assert st.last_index >= 0
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst


def test_open_segment_is_allocated_ahead_and_reopens_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st, _ = LogStorage.open(tmp_path / "a")
    with st:
        st.append(entries(1, 20))
        st.set_hard_state(HardState(1, 1, 20))
        st.sync()
        path = wal_files(tmp_path / "a")[-1]
        end = records_end(path)
        assert path.stat().st_size == STEP > end  # allocated ahead: the records, then zeros
        copy = crashed_copy(st, tmp_path / "a", tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="quorumd.raft.aio.storage"):
        st, rec = LogStorage.open(copy)
    with st:
        assert rec.entries == entries(1, 20) and rec.hard_state == HardState(1, 1, 20)
        assert "torn" not in caplog.text  # a zero tail is preallocated space, not a torn write
        copied = wal_files(copy)[-1]
        assert copied.stat().st_size == STEP  # left allocated: the next write goes in there
        st.append(entries(21, 25))
        st.sync()
        assert records_end(copied) > end and copied.stat().st_size == STEP
    st, rec = LogStorage.open(copy)
    with st:
        assert rec.entries == entries(1, 25)


def test_a_clean_close_cuts_the_segment_to_its_records(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path)
    with st:
        st.append(entries(1, 5))
        st.sync()
    path = wal_files(tmp_path)[-1]
    assert path.stat().st_size == records_end(path)  # what a build without preallocation writes


@pytest.mark.parametrize("torn", [1, 8, 9, 20])
def test_a_torn_write_into_preallocated_space_is_cut_off(
    tmp_path: Path, torn: int, caplog: pytest.LogCaptureFixture
) -> None:
    st, _ = LogStorage.open(tmp_path / "a")
    with st:
        st.append(entries(1, 10))
        st.sync()
        st.append(entries(11, 11, tag=b"x" * 40))
        copy = crashed_copy(st, tmp_path / "a", tmp_path / "b")
        st.sync()
        record = (tmp_path / "a" / wal_files(tmp_path / "a")[-1].name).read_bytes()
    path = wal_files(copy)[-1]
    end = records_end(path)
    with path.open("r+b") as f:  # the first ``torn`` bytes of the next record landed, no more
        f.seek(end)
        f.write(record[end : end + torn])
    assert path.stat().st_size == STEP
    with caplog.at_level(logging.WARNING, logger="quorumd.raft.aio.storage"):
        st, rec = LogStorage.open(copy)
    with st:
        assert rec.entries == entries(1, 10)
        assert f"wal torn tail truncated file={path} offset={end}" in caplog.text
        st.append(entries(11, 12, tag=b"again"))
        st.sync()
        assert path.stat().st_size > records_end(path)  # allocated ahead again
    st, rec = LogStorage.open(copy)
    with st:
        assert rec.entries == entries(1, 10) + entries(11, 12, tag=b"again")


def test_a_valid_record_after_zeros_is_corruption_not_a_tail(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path / "a")
    with st:
        st.append(entries(1, 10))
        st.sync()
        copy = crashed_copy(st, tmp_path / "a", tmp_path / "b")
    path = wal_files(copy)[-1]
    data = path.read_bytes()
    *_, start, end = record_starts(path)
    with path.open("r+b") as f:  # a block of zeros inside the log, records after it
        f.seek(end + 4096)
        f.write(data[start:end])
    where = rf"offset {end}, followed by a valid record at offset {end + 4096}"
    with pytest.raises(StorageCorruptError, match=where):
        LogStorage.open(copy)


def test_closed_segments_hold_their_records_only(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path, segment_bytes=1024)
    with st:
        write_batches(st, 200, tag=b"y" * 30)
        files = wal_files(tmp_path)
        assert len(files) > 3
        for path in files[:-1]:
            assert path.stat().st_size == records_end(path)
        assert files[-1].stat().st_size > records_end(files[-1])


def test_a_zero_tail_in_a_closed_segment_is_corruption(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path, segment_bytes=1024)
    with st:
        write_batches(st, 100, tag=b"y" * 30)
    first = wal_files(tmp_path)[0]
    with first.open("ab") as f:  # never written so: a closed segment is cut and synced first
        f.write(bytes(4096))
    with pytest.raises(StorageCorruptError, match="not the last segment"):
        LogStorage.open(tmp_path, segment_bytes=1024)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EOPNOTSUPP])
def test_refused_preallocation_writes_as_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    refusals: list[int] = []

    def refuse(fd: int, offset: int, length: int) -> None:
        refusals.append(length)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage_mod.os, "posix_fallocate", refuse)
    st, _ = LogStorage.open(tmp_path)
    with st:
        write_batches(st, 50)
        path = wal_files(tmp_path)[-1]
        assert path.stat().st_size == records_end(path)
    # a full disk may have room again by the next write; a file system without fallocate never
    assert len(refusals) == (6 if code == errno.ENOSPC else 1)  # 6 syncs: the first segment + 5 batches
    st, rec = LogStorage.open(tmp_path)
    with st:
        assert rec.entries == entries(1, 50)


def test_a_batch_larger_than_a_step_is_allocated_whole(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path)
    big = [Entry(1, i, EntryType.NORMAL, bytes([i % 251]) * 65536) for i in range(1, 100)]
    with st:
        st.append(big)
        st.sync()
        path = wal_files(tmp_path)[-1]
        assert path.stat().st_size >= records_end(path) > STEP
    st, rec = LogStorage.open(tmp_path)
    with st:
        assert rec.entries == big


def test_one_fdatasync_per_sync_with_preallocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = wal_mod.fsync_data

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    st, _ = LogStorage.open(tmp_path)
    monkeypatch.setattr(storage_mod.wal, "fsync_data", counting)
    with st:
        st.append(entries(1, 3))
        st.sync()  # allocates the first step
        st.append(entries(4, 6))
        st.sync()
        assert len(calls) == 2


def test_a_zero_step_writes_as_appends(tmp_path: Path) -> None:
    st, _ = LogStorage.open(tmp_path, preallocate_bytes=0)
    with st:
        write_batches(st, 30)
        path = wal_files(tmp_path)[-1]
        assert path.stat().st_size == records_end(path)
    with pytest.raises(StorageError, match="must not be negative"):
        LogStorage.open(tmp_path / "other", preallocate_bytes=-1)
