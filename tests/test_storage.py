"""Tests for quorumd.raft.aio.storage: WAL + snapshots, corruption handling, and a SIGKILL test."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from quorumd.raft.aio import storage as storage_mod
from quorumd.raft.aio import wal as wal_mod
from quorumd.raft.aio.storage import LogStorage, StorageCorruptError, StorageError, StorageTransientError
from quorumd.raft.core.types import Configuration, Entry, EntryType, HardState, Snapshot, SnapshotMeta

CONFIG = Configuration(frozenset({1, 2}), frozenset({3}))


def entries(first: int, last: int, term: int = 1, tag: bytes = b"") -> list[Entry]:
    return [Entry(term, i, EntryType.NORMAL, b"e%d" % i + tag) for i in range(first, last + 1)]


def snap(index: int, term: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, CONFIG), data)


def reopen(d: Path, segment_bytes: int = 64 << 20) -> tuple[LogStorage, storage_mod.RecoveredState]:
    return LogStorage.open(d, segment_bytes=segment_bytes)


def wal_files(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def record_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, end, type) of every record in a WAL file (up to its preallocated zeros, if any)."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        length, _ = struct.unpack_from("<II", data, pos)
        if length == 0:  # no record has length 0: the preallocated tail of the open segment
            assert not data[pos:].strip(b"\0")
            break
        out.append((pos, pos + 8 + length, data[pos + 8]))
        pos += 8 + length
    return out


def write_log(d: Path, last: int, segment_bytes: int = 64 << 20) -> None:
    st, _ = reopen(d, segment_bytes)
    with st:
        for first in range(1, last + 1, 10):
            st.append(entries(first, min(first + 9, last)))
            st.set_hard_state(HardState(1, 1, first))
            st.sync()


# --- basics ------------------------------------------------------------------------------------
def test_empty_directory(tmp_path: Path) -> None:
    st, rec = reopen(tmp_path / "new")
    with st:
        assert rec.hard_state == HardState() and rec.snapshot is None and rec.entries == []
        assert (st.first_index, st.last_index, st.last_term) == (1, 0, 0)
        assert st.sync() == 0.0
    assert len(wal_files(tmp_path / "new")) == 1


def test_round_trip(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    batch = [*entries(1, 3), Entry(2, 4, EntryType.CONF_CHANGE, b"\x00\xff"), Entry(2, 5)]
    st.append(batch)
    st.set_hard_state(HardState(2, 3, 4))
    assert st.sync() >= 0.0
    st.close()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == batch
        assert rec.hard_state == HardState(2, 3, 4)
        assert (st.last_index, st.last_term, st.term(3), st.term(9)) == (5, 2, 1, None)


def test_unsynced_records_are_not_durable(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    st.append(entries(1, 2))
    st.sync()
    st.append(entries(3, 4))
    st.set_hard_state(HardState(5, 0, 0))
    st.close()
    st, rec = reopen(tmp_path)
    with st:
        assert [e.index for e in rec.entries] == [1, 2] and rec.hard_state == HardState()


def test_one_write_per_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = reopen(tmp_path)
    writes: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if "wal-" in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(storage_mod.wal.os, "pwrite", counting_pwrite)
    with st:
        st.append(entries(1, 500))
        st.set_hard_state(HardState(1, 1, 1))
        st.sync()
    assert len(writes) == 1


def test_truncation_last_writer_wins(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    st.append(entries(1, 10))
    st.sync()
    st.append(entries(6, 8, term=2, tag=b"new"))
    assert st.last_index == 8
    st.sync()
    st.append(entries(9, 9, term=2, tag=b"new"))
    st.sync()
    st.close()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 5) + entries(6, 9, term=2, tag=b"new")


def test_truncation_before_sync_is_one_stream(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    st.append(entries(1, 5))
    st.append(entries(3, 4, term=3))
    st.sync()
    st.close()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 2) + entries(3, 4, term=3)


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        (entries(7, 8), "gap"),
        ([Entry(1, 6), Entry(1, 8)], "not contiguous"),
        ([Entry(0, 6)], "term 0 below previous term 1"),
        ([Entry(1, 2)], "at or before the snapshot index 2"),
        ([Entry(-1, 6)], "term -1 below"),
    ],
)
def test_append_rejects_bad_batches(tmp_path: Path, batch: list[Entry], fragment: str) -> None:
    st, _ = reopen(tmp_path)
    with st:
        st.append(entries(1, 5))
        st.save_snapshot(snap(2, 1))
        with pytest.raises(StorageError, match=fragment):
            st.append(batch)
        assert st.last_index == 5  # unchanged
        st.sync()


def test_append_rejects_unencodable_entry(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    with st, pytest.raises(StorageError, match="cannot encode"):
        st.append([Entry(2**64, 1)])


def test_directory_lock(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    with st, pytest.raises(StorageError, match="in use"):
        reopen(tmp_path)
    reopen(tmp_path)[0].close()  # released on close


def test_closed_storage_refuses(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    st.close()
    st.close()
    with pytest.raises(StorageError, match="closed"):
        st.append(entries(1, 1))


def test_failed_fsync_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = reopen(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_mod, "fsync_data", broken)
    with st:
        st.append(entries(1, 1))
        with pytest.raises(StorageError, match="fsync"):
            st.sync()
        with pytest.raises(StorageError, match="failed earlier"):
            st.append(entries(2, 2))


def test_bad_segment_bytes(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="segment_bytes"):
        LogStorage.open(tmp_path, segment_bytes=0)


# --- segments and compaction -------------------------------------------------------------------
def test_segments_roll_and_each_starts_with_hard_state(tmp_path: Path) -> None:
    write_log(tmp_path, 200, segment_bytes=512)
    files = wal_files(tmp_path)
    assert len(files) > 5
    for f in files:
        assert record_offsets(f)[0][2] == storage_mod.RecordType.HARD_STATE
    st, rec = reopen(tmp_path, segment_bytes=512)
    with st:
        assert rec.entries == entries(1, 200) and rec.hard_state == HardState(1, 1, 191)


def test_compaction_deletes_only_covered_segments(tmp_path: Path) -> None:
    write_log(tmp_path, 200, segment_bytes=512)
    before = wal_files(tmp_path)
    st, _ = reopen(tmp_path, segment_bytes=512)
    with st:
        with pytest.raises(StorageError, match="beyond the snapshot index"):
            st.compact(100)
        st.save_snapshot(snap(150, 1))
        st.compact(100)
        after = wal_files(tmp_path)
        assert before[-1] in after and len(after) < len(before)
        st.compact(150)
        st.compact(150)
        assert len(wal_files(tmp_path)) >= 1
        st.append(entries(201, 210))
        st.sync()
    st, rec = reopen(tmp_path, segment_bytes=512)
    with st:
        assert rec.snapshot is not None and rec.snapshot.meta.index == 150
        assert rec.entries == entries(151, 210)
        assert st.first_index == 151


def test_compaction_never_deletes_the_current_segment(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    with st:
        st.append(entries(1, 5))
        st.sync()
        st.save_snapshot(snap(5, 1))
        st.compact(5)
        assert len(wal_files(tmp_path)) == 1
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == [] and st.last_index == 5 and st.last_term == 1


def test_snapshot_starts_a_new_segment_so_history_is_compacted(tmp_path: Path) -> None:
    """With large segments, the driver's snapshot-then-compact cycle must still bound the WAL: each
    snapshot closes the current segment, so compaction can delete whole intervals behind it."""
    st, _ = reopen(tmp_path)  # 64 MiB segments: size alone would never roll here
    with st:
        for k in range(6):  # six snapshot intervals of 100 entries, 50 trailing entries kept
            st.append(entries(k * 100 + 1, (k + 1) * 100))
            st.set_hard_state(HardState(1, 1, (k + 1) * 100))
            st.sync()
            st.save_snapshot(snap((k + 1) * 100, 1))
            st.compact(max(0, (k + 1) * 100 - 50))
        st.append(entries(601, 610))
        st.sync()
        on_disk = sum(
            1
            for f in wal_files(tmp_path)
            for _, _, kind in record_offsets(f)
            if kind == storage_mod.RecordType.ENTRY
        )
        assert on_disk == 110  # 501-610: every interval at or below 550 is gone (610 without rolling)
    st, rec = reopen(tmp_path)
    with st:
        assert rec.snapshot is not None and rec.snapshot.meta.index == 600
        assert rec.entries == entries(601, 610)
        assert st.first_index == 601


# --- snapshots ---------------------------------------------------------------------------------
def test_snapshot_round_trip_and_retention(tmp_path: Path) -> None:
    st, _ = reopen(tmp_path)
    with st:
        st.append(entries(1, 30))
        st.sync()
        for index in (10, 20, 25):
            st.save_snapshot(snap(index, 1, b"data%d" % index))
        assert st.first_index == 26
        with pytest.raises(StorageError, match="older than the stored one"):
            st.save_snapshot(snap(20, 1))
        with pytest.raises(StorageError, match="beyond last index"):
            st.save_snapshot(snap(31, 1))
        with pytest.raises(StorageError, match="does not match the log"):
            st.save_snapshot(snap(28, 7))
    names = sorted(p.name for p in tmp_path.glob("snap-*"))
    assert names == [f"snap-{20:016x}-{1:016x}.snap", f"snap-{25:016x}-{1:016x}.snap"]
    st, rec = reopen(tmp_path)
    with st:
        assert rec.snapshot == snap(25, 1, b"data25")
        assert rec.entries == entries(26, 30)


@pytest.mark.parametrize("damage", ["flip", "header", "truncate", "empty", "rename"])
def test_corrupt_snapshot_is_skipped(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    st, _ = reopen(tmp_path)
    with st:
        st.append(entries(1, 30))
        st.sync()
        st.save_snapshot(snap(10, 1, b"old" * 100))
        st.save_snapshot(snap(20, 1, b"new" * 100))
    newest = tmp_path / f"snap-{20:016x}-{1:016x}.snap"
    raw = bytearray(newest.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
        newest.write_bytes(raw)
    elif damage == "header":  # the reserved field of the header (always 0)
        raw[6] ^= 0x10
        newest.write_bytes(raw)
    elif damage == "truncate":
        newest.write_bytes(raw[:-3])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:  # a valid file under the wrong name
        newest.rename(tmp_path / f"snap-{21:016x}-{1:016x}.snap")
    (tmp_path / "snap-junk.snap.tmp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="quorumd.raft.aio.storage"):
        st, rec = reopen(tmp_path)
    with st:
        assert rec.snapshot == snap(10, 1, b"old" * 100)
        assert rec.entries == entries(11, 30)
    assert "snapshot corrupt skipped" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_install_snapshot_beyond_log_drops_everything(tmp_path: Path) -> None:
    write_log(tmp_path, 50, segment_bytes=256)
    st, _ = reopen(tmp_path, segment_bytes=256)
    with st:
        st.set_hard_state(HardState(3, 2, 40))
        st.install_snapshot(snap(80, 3))
        assert len(wal_files(tmp_path)) == 1
        assert (st.first_index, st.last_index, st.last_term) == (81, 80, 3)
        st.append(entries(81, 85, term=3))
        st.sync()
    st, rec = reopen(tmp_path, segment_bytes=256)
    with st:
        assert rec.snapshot == snap(80, 3) and rec.entries == entries(81, 85, term=3)
        assert rec.hard_state == HardState(3, 2, 40)


def test_install_snapshot_matching_log_keeps_the_tail(tmp_path: Path) -> None:
    write_log(tmp_path, 50)
    st, _ = reopen(tmp_path)
    with st:
        st.install_snapshot(snap(30, 1))
        assert (st.first_index, st.last_index) == (31, 50)
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(31, 50)


def test_install_snapshot_conflicting_term_drops_log(tmp_path: Path) -> None:
    write_log(tmp_path, 50)
    st, _ = reopen(tmp_path)
    with st:
        st.install_snapshot(snap(30, 4))
        assert st.last_index == 30
        st.append(entries(31, 32, term=4))
        st.sync()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(31, 32, term=4)


def test_interrupted_install_is_finished_on_open(tmp_path: Path) -> None:
    # Crash after the snapshot file was written but before the old log was dropped.
    write_log(tmp_path / "a", 50)
    st, _ = reopen(tmp_path / "b")
    with st:
        st.append(entries(1, 30, term=4))
        st.sync()
        st.save_snapshot(snap(30, 4))
    name = f"snap-{30:016x}-{4:016x}.snap"
    shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    st, rec = reopen(tmp_path / "a")
    with st:
        assert rec.entries == [] and st.last_index == 30
        st.append(entries(31, 33, term=4))  # would have truncated into the stale log
        st.sync()
    st, rec = reopen(tmp_path / "a")
    with st:
        assert rec.entries == entries(31, 33, term=4)


def test_missing_wal_with_snapshots_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 10)
    st, _ = reopen(tmp_path)
    with st:
        st.save_snapshot(snap(5, 1))
    for f in wal_files(tmp_path):
        f.unlink()
    with pytest.raises(StorageCorruptError, match="no wal segments"):
        reopen(tmp_path)


def test_log_gap_without_snapshot_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 100, segment_bytes=256)
    wal_files(tmp_path)[0].unlink()
    with pytest.raises(StorageCorruptError, match="starts at index"):
        reopen(tmp_path, segment_bytes=256)


def test_missing_middle_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 100, segment_bytes=256)
    wal_files(tmp_path)[2].unlink()
    with pytest.raises(StorageCorruptError, match="segment missing"):
        reopen(tmp_path, segment_bytes=256)


# --- torn writes and corruption ----------------------------------------------------------------
def _last_record(d: Path) -> tuple[Path, int, int]:
    path = wal_files(d)[-1]
    start, end, _ = record_offsets(path)[-1]
    return path, start, end


def _sample_offsets(seed: int, start: int, end: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(
        {start, start + 1, start + 7, start + 8, start + 9, end - 1, *rng.sample(range(start, end), 6)}
    )


@pytest.mark.parametrize("cut", range(12))
def test_torn_tail_recovers_previous_record(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    seed = 1234 + cut
    print(f"seed={seed}")
    st, _ = reopen(tmp_path)
    with st:
        st.append(entries(1, 4))
        st.sync()
        st.append([Entry(1, 5, data=bytes(range(40)))])
        st.sync()
    path, start, end = _last_record(tmp_path)
    offsets = _sample_offsets(seed, start, end)
    offset = offsets[cut % len(offsets)]
    with path.open("r+b") as f:
        f.truncate(offset)
    with caplog.at_level(logging.WARNING, logger="quorumd.raft.aio.storage"):
        st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 4)
        if offset > start:
            assert f"wal torn tail truncated file={path} offset={start}" in caplog.text
        assert path.stat().st_size == start
        st.append(entries(5, 6, tag=b"again"))
        st.sync()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 4) + entries(5, 6, tag=b"again")


def test_torn_tail_with_zero_fill(tmp_path: Path) -> None:
    write_log(tmp_path, 10)
    path = wal_files(tmp_path)[-1]
    with path.open("ab") as f:
        f.write(bytes(4096))  # a crash after the size grew but before the data landed
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 10)


@pytest.mark.parametrize("byte", [0, 4, 8, 9, -1])
def test_flipped_byte_in_last_record_is_truncated(tmp_path: Path, byte: int) -> None:
    write_log(tmp_path, 10)
    st, _ = reopen(tmp_path)
    with st:
        st.append([Entry(1, 11, data=b"z" * 30)])
        st.sync()
    path, start, end = _last_record(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[start + byte if byte >= 0 else end + byte] ^= 0x04
    path.write_bytes(raw)
    st, rec = reopen(tmp_path)
    with st:
        assert rec.entries == entries(1, 10)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_flipped_byte_mid_log_refuses_to_start(tmp_path: Path, where: str) -> None:
    write_log(tmp_path, 30)
    path = wal_files(tmp_path)[-1]
    start, end, _ = record_offsets(path)[10]
    raw = bytearray(path.read_bytes())
    raw[start + 1 if where == "header" else end - 2] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(
        StorageCorruptError, match=rf"{path.name} at offset {start}, followed by a valid record"
    ):
        reopen(tmp_path)
    assert path.read_bytes() == raw  # nothing truncated


def test_corrupt_non_last_segment_refuses_to_start(tmp_path: Path) -> None:
    write_log(tmp_path, 100, segment_bytes=256)
    path = wal_files(tmp_path)[0]
    start, end, _ = record_offsets(path)[-1]
    with path.open("r+b") as f:
        f.truncate(end - 1)
    with pytest.raises(StorageCorruptError, match=rf"{path.name} at offset {start} \(not the last segment\)"):
        reopen(tmp_path, segment_bytes=256)


def test_valid_crc_but_unknown_record_type_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    path = wal_files(tmp_path)[-1]
    body = b"\x09payload"
    with path.open("ab") as f:
        f.write(struct.pack("<II", len(body), zlib.crc32(body)) + body)
    with pytest.raises(StorageCorruptError, match="unknown record type 9"):
        reopen(tmp_path)


def test_valid_crc_but_undecodable_entry_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    path = wal_files(tmp_path)[-1]
    offset = path.stat().st_size
    body = b"\x01\x01\x93\x01\x02\x03"  # ENTRY record whose entry has 3 fields
    with path.open("ab") as f:
        f.write(struct.pack("<II", len(body), zlib.crc32(body)) + body)
    with pytest.raises(StorageCorruptError, match=f"offset {offset}: entry: expected a list of 4 fields"):
        reopen(tmp_path)


# --- SIGKILL crash test ------------------------------------------------------------------------
CHILD = Path(__file__).with_name("storage_crash_child.py")


class Model:
    """What the child acknowledged: entry CRCs after the snapshot, and the snapshot (index, crc)."""

    def __init__(self) -> None:
        self.log: dict[int, int] = {}
        self.snap: tuple[int, int] | None = None

    def copy(self) -> Model:
        m = Model()
        m.log, m.snap = dict(self.log), self.snap
        return m

    def apply(self, op: tuple[str, int, list[int]]) -> Model:
        kind, index, crcs = op
        m = self.copy()
        if kind == "batch":
            m.log = {i: c for i, c in m.log.items() if i < index}
            m.log.update({index + k: c for k, c in enumerate(crcs)})
        elif kind == "snap":
            m.snap = (index, crcs[0])
            m.log = {i: c for i, c in m.log.items() if i > index}
        else:  # install
            m.snap, m.log = (index, crcs[0]), {}
        return m

    def last(self) -> tuple[int, int]:
        if self.log:
            i = max(self.log)
            return i, self.log[i]
        return self.snap or (0, 0)

    def matches(self, snapshot: tuple[int, int] | None, log: dict[int, int]) -> bool:
        s = snapshot[0] if snapshot else 0
        return self.snap == snapshot and {i: c for i, c in self.log.items() if i > s} == log


def _parse(line: str) -> tuple[str, int, list[int]]:
    kind, index, crcs = line.split()
    return kind, int(index), [int(c) for c in crcs.split(",")]


def _recovered(data_dir: Path, scratch: Path) -> tuple[tuple[int, int] | None, dict[int, int], int]:
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(data_dir, scratch)  # check a copy: the child must meet the torn tail itself
    st, rec = LogStorage.open(scratch, segment_bytes=16 << 10)
    with st:
        snapshot = None
        if rec.snapshot is not None:
            index, crc = struct.unpack("<QI", rec.snapshot.data)
            assert index == rec.snapshot.meta.index
            snapshot = (index, crc)
        base = rec.snapshot.meta.index if rec.snapshot else 0
        assert [e.index for e in rec.entries] == list(range(base + 1, base + 1 + len(rec.entries)))
        for e in rec.entries:
            assert struct.unpack_from("<Q", e.data)[0] == e.index
        return snapshot, {e.index: zlib.crc32(e.data) for e in rec.entries}, st.last_index


@pytest.mark.timeout(180)
def test_crash_recovery_under_sigkill(tmp_path: Path) -> None:
    seed = int(os.environ.get("QUORUMD_CRASH_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"crash test seed={seed} (replay the operations: QUORUMD_CRASH_SEED={seed})")
    rng = random.Random(seed)
    data_dir, scratch = tmp_path / "data", tmp_path / "check"
    model = Model()
    kills = acks = partial_batches = in_flight_landed = 0
    stderr_path = tmp_path / "child.stderr"
    for round_no in range(55):
        with stderr_path.open("wb") as err:
            child = subprocess.Popen(
                [sys.executable, str(CHILD), str(data_dir), str(rng.getrandbits(32))],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert child.stdout is not None
        pending: tuple[str, int, list[int]] | None = None

        def consume(line: str) -> None:
            nonlocal model, pending, acks
            if line.startswith("acked"):
                assert pending is not None
                model = model.apply(pending)
                _, last, crcs = _parse(line)
                assert (last, crcs[0]) == model.last()
                pending, acks = None, acks + 1
            else:
                pending = _parse(line)

        try:
            ready = child.stdout.readline().split()
            assert ready and ready[0] == "ready", f"round {round_no}: {ready} {stderr_path.read_text()}"
            assert int(ready[1]) == model.last()[0], f"round {round_no}: child recovered {ready}"
            for _ in range(rng.randrange(1, 40)):
                line = child.stdout.readline()
                assert line, f"child died: {stderr_path.read_text()}"
                consume(line)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for line in child.stdout:  # what it announced or acked before the kill landed
            consume(line)
        child.stdout.close()
        kills += 1
        snapshot, log, last = _recovered(data_dir, scratch)
        candidates = [model]
        if pending is not None and pending[0] == "batch":
            kind, first, crcs = pending
            candidates += [model.apply((kind, first, crcs[:p])) for p in range(1, len(crcs) + 1)]
        elif pending is not None:
            candidates.append(model.apply(pending))
        found = [k for k, m in enumerate(candidates) if m.matches(snapshot, log)]
        assert found, f"seed={seed} round={round_no}: recovered state matches no allowed state"
        if 0 < found[0] < len(candidates) - 1:
            partial_batches += 1
        in_flight_landed += found[0] > 0
        model = candidates[found[0]]
        assert last == model.last()[0]
    print(
        f"crash test kills={kills} acks={acks} in_flight_landed={in_flight_landed} partial={partial_batches}"
    )
    assert kills >= 50 and acks >= kills


def test_out_of_file_descriptors_is_transient_and_leaves_the_storage_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE/ENFILE on a snapshot's temp file or a new WAL segment raises StorageTransientError,
    changes nothing, and the same call succeeds once descriptors are free again; any other
    error still stops the storage."""
    import errno

    d = tmp_path / "raft"
    st, _ = LogStorage.open(d, segment_bytes=1)  # every sync rolls a new segment
    try:
        st.append(entries(1, 5))
        st.sync()
        real_open = os.open
        errs = [errno.EMFILE, errno.ENFILE]

        def exhausted(path, flags, mode=0o777, *a, **kw):  # type: ignore[no-untyped-def]
            name = os.fspath(path)
            if errs and (name.endswith(".tmp") or (flags & os.O_CREAT and "wal-" in name)):
                raise OSError(errs.pop(0), "Too many open files", name)
            return real_open(path, flags, mode, *a, **kw)

        monkeypatch.setattr(os, "open", exhausted)
        with pytest.raises(StorageTransientError):
            st.save_snapshot(snap(3, 1))
        st.append(entries(6, 6))
        with pytest.raises(StorageTransientError):
            st.sync()  # the roll to a new segment
        assert st.transient_errors == 2
        st.sync()  # descriptors free again: the same calls succeed
        st.save_snapshot(snap(3, 1))
        st.append(entries(7, 8))
        st.sync()
        monkeypatch.undo()
        errs[:] = []
    finally:
        st.close()
    st, rec = reopen(d)
    try:
        assert rec.snapshot is not None and rec.snapshot.meta.index == 3
        assert [e.index for e in rec.entries] == [4, 5, 6, 7, 8]
    finally:
        st.close()


# --- crashes between the steps of a multi-step update ----------------------------------------
def test_a_segment_left_empty_by_a_crash_is_headed_by_the_hard_state(tmp_path: Path) -> None:
    """A crash right after a new segment was created (or while its first record was written)
    leaves it empty; once the older segments are compacted away, the hard state must survive."""
    st, _ = reopen(tmp_path)
    with st:
        st.set_hard_state(HardState(5, 2, 10))
        st.append(entries(1, 10, term=5))
        st.sync()
    wal_mod.wal_path(tmp_path, 2).write_bytes(b"")  # the crash: created, nothing written yet
    st, rec = reopen(tmp_path)
    with st:
        assert rec.hard_state == HardState(5, 2, 10)
        st.append(entries(11, 12, term=5))
        st.sync()
        st.save_snapshot(snap(12, 5))
        st.compact(12)
        assert len(wal_files(tmp_path)) == 1
    st, rec = reopen(tmp_path)
    with st:
        assert rec.hard_state == HardState(5, 2, 10)
        assert rec.snapshot == snap(12, 5) and rec.entries == []


def test_a_crash_while_an_install_drops_the_old_log_recovers_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installing a snapshot that conflicts with the log removes the old segments one by one; a
    crash before any of those steps must reopen as the snapshot alone, never as a log gap nor
    with stale entries after it."""
    d = tmp_path / "raft"
    write_log(d, 100, segment_bytes=256)
    assert len(wal_files(d)) >= 4
    crashes: list[Path] = []
    real_unlink, real_ftruncate = os.unlink, os.ftruncate

    def crash_copy() -> None:
        dst = tmp_path / f"crash{len(crashes)}"
        shutil.copytree(d, dst, ignore=shutil.ignore_patterns("LOCK"))
        crashes.append(dst)

    def unlink(path, *a, **kw):  # type: ignore[no-untyped-def]
        crash_copy()
        real_unlink(path, *a, **kw)

    def ftruncate(fd: int, length: int) -> None:
        crash_copy()
        real_ftruncate(fd, length)

    st, _ = reopen(d, segment_bytes=256)
    with st:
        st.set_hard_state(HardState(7, 1, 30))
        st.sync()
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        st.install_snapshot(snap(40, 7))  # the log has term 1 at index 40: it is dropped
        monkeypatch.undo()
    crash_copy()
    assert len(crashes) >= 4
    for c in crashes:
        st, rec = reopen(c, segment_bytes=256)
        with st:
            assert rec.snapshot == snap(40, 7), c
            assert rec.entries == [] and (st.last_index, st.last_term) == (40, 7), c
            assert rec.hard_state == HardState(7, 1, 30), c
            st.append(entries(41, 42, term=7))
            st.sync()
        st, rec = reopen(c, segment_bytes=256)
        with st:
            assert rec.entries == entries(41, 42, term=7), c


def test_open_makes_what_it_recovered_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between a write and its fsync leaves records in the page cache only; the
    next ``open`` reads them as the log and the node acts on them (votes, acknowledges), so
    ``open`` must fsync the segment they are in and the directory before returning them."""
    st, _ = reopen(tmp_path, segment_bytes=256)
    with st:
        st.append(entries(1, 30))
        st.sync()
        st.set_hard_state(HardState(4, 2, 0))
        st.append(entries(31, 31, term=4))
        payload = b"".join(st._buf)  # written by the killed process, never synced
    last = wal_files(tmp_path)[-1]
    with last.open("ab") as f:
        f.write(payload)
    synced: set[str] = set()
    real_fsync, real_fsync_data = os.fsync, wal_mod.fsync_data

    def record(fd: int) -> None:
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", lambda fd: (record(fd), real_fsync(fd))[1])
    monkeypatch.setattr(wal_mod, "fsync_data", lambda fd: (record(fd), real_fsync_data(fd))[1])
    st, rec = reopen(tmp_path, segment_bytes=256)
    with st:
        assert rec.hard_state == HardState(4, 2, 0) and rec.entries[-1] == entries(31, 31, term=4)[0]
        assert {str(last.resolve()), str(tmp_path.resolve())} <= synced


def test_creating_the_data_directory_makes_its_name_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first hard state is synced into a directory ``open`` created: the directories that
    hold the new names (the parent of each one created) must be fsynced too, or a power loss
    can take the whole directory, and the votes in it, away."""
    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    st, _ = reopen(tmp_path / "a" / "raft")
    with st:
        assert {str(tmp_path.resolve()), str((tmp_path / "a").resolve())} <= synced
        synced.clear()
    st, _ = reopen(tmp_path / "a" / "raft")
    with st:
        assert str(tmp_path.resolve()) not in synced  # nothing created: nothing more to fsync


def test_a_snapshot_install_retried_on_a_full_disk_stays_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install whose new segment did not fit is retried: the retry writes the same snapshot
    file again, and a full disk then must again be ``StorageFullError`` (nothing changed: the
    file already there is the same snapshot), not a failure that stops the storage."""
    import errno

    write_log(tmp_path, 50)
    real_pwrite, real_write = os.pwrite, os.write
    full = {"pwrite": 1, "write": 0}

    def is_full(call: str) -> bool:
        if full[call]:
            full[call] -= 1
            return True
        return False

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if is_full("pwrite"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    def write(fd: int, data: bytes) -> int:
        if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".tmp") and is_full("write"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    st, _ = reopen(tmp_path)
    with st:
        st.set_hard_state(HardState(3, 2, 40))
        st.sync()
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "write", write)
        with pytest.raises(storage_mod.StorageFullError):
            st.install_snapshot(snap(80, 3))  # the snapshot landed, the new segment did not fit
        full["write"] = 1
        with pytest.raises(storage_mod.StorageFullError):
            st.install_snapshot(snap(80, 3))  # the same snapshot file does not fit this time
        st.install_snapshot(snap(80, 3))  # space again: the same call succeeds
        monkeypatch.undo()
        assert (st.last_index, st.last_term) == (80, 3)
        st.append(entries(81, 82, term=3))
        st.sync()
    st, rec = reopen(tmp_path)
    with st:
        assert rec.snapshot == snap(80, 3) and rec.entries == entries(81, 82, term=3)
        assert rec.hard_state == HardState(3, 2, 40)
