"""The on-disk write-ahead log and snapshot store of one Raft node (synchronous, one thread).

The asyncio driver calls ``LogStorage`` from a single executor thread; nothing here is async.

Directory layout (``directory``):

- ``wal-<seq:016x>.log``: WAL segments, read in ``seq`` order. A segment is a stream of records
  ``[u32 length][u32 crc32(type + payload)][u8 type][payload]`` (little-endian; ``length`` counts
  type + payload). ENTRY and HARD_STATE records share one stream, so one fsync covers both.
  Every segment begins with a HARD_STATE record, so older segments can be deleted safely.
- ``snap-<index:016x>-<term:016x>.snap``: ``[magic][u16 version][u16 0][u32 meta_len][u64 data_len]
  [u32 crc32(meta + data)]`` + encoded SnapshotMeta + data. Written to ``.tmp``, fsynced, renamed,
  directory fsynced. The two newest are kept.
- ``LOCK``: an flock held while open, so two processes never share a directory.

Format versions: every WAL record's payload begins with the codec's version byte
(``raft.codec.VERSION``) and every snapshot file's header carries ``_SNAP_VERSION``. A
CRC-valid record or a snapshot file in a newer format than this build knows raises
``StorageFormatError`` from ``open`` before anything in the directory is changed (no temp file
removed, no torn tail truncated): the daemon refuses to start (SPEC 13).

Log semantics: the last writer wins. An ENTRY record for an index at or below the current last
index truncates the log there (the log becomes the prefix before that index, then the new entry).
A record that jumps past the end restarts the log (only legitimate after a snapshot that covers
the jump, which recovery checks). Entries at or before the snapshot index are not returned.

Out of file descriptors (EMFILE/ENFILE) is transient, not a failure: the directory's fd is held
open for its fsyncs, and the only files opened while running (a new WAL segment, a snapshot's
temporary file) are opened before anything changes, so such an open raises
``StorageTransientError`` with the storage untouched and usable; the driver retries with a
bounded backoff. Any other I/O error stops the storage (``_failed``): after a failed write or
fsync the state of the page cache is unknown.

Durability: nothing is durable until ``sync()`` returns. Only the tail of the last segment can be
torn (records are only appended there, and a segment is closed only after its last fsync), so a
bad record there with nothing valid after it is a torn write and is truncated; any other bad
record is corruption and ``open`` raises ``StorageCorruptError`` (the daemon refuses to start).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import re
import struct
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from ..codec import VERSION as CODEC_VERSION
from ..codec import (
    CodecError,
    decode_entries,
    decode_entry,
    decode_hard_state,
    decode_snapshot_meta,
    encode_entry,
    encode_hard_state,
    encode_snapshot_meta,
)
from ..core.ready import RaftError
from ..core.types import Entry, HardState, Snapshot, SnapshotMeta

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_RECORD = struct.Struct("<IIB")  # length, crc32, type
_RECORD_HEAD = struct.Struct("<II")
_SNAP_HEAD = struct.Struct("<4sHHIQI")  # magic, version, reserved, meta_len, data_len, crc32
_SNAP_MAGIC = b"QSNP"
_SNAP_VERSION = 1
_WAL_NAME = re.compile(r"wal-([0-9a-f]{16})\.log")
_SNAP_NAME = re.compile(r"snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap")
_SNAPSHOTS_KEPT = 2
_fsync_data = getattr(os, "fdatasync", os.fsync)  # appends only: fdatasync persists the size too


class RecordType(IntEnum):
    """WAL record types: part of the disk format, never renumber."""

    ENTRY = 1
    HARD_STATE = 2


_ENTRY = int(RecordType.ENTRY)
_ENTRY_CRC_SEED = zlib.crc32(bytes([RecordType.ENTRY]))
_HARD_STATE_CRC_SEED = zlib.crc32(bytes([RecordType.HARD_STATE]))


class StorageError(RaftError):
    """A storage operation failed or was asked to break the log's invariants."""


class StorageTransientError(StorageError):
    """Out of file descriptors (EMFILE/ENFILE) while opening a file: nothing was changed; the
    same call may be retried later (the caller backs off)."""


_TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class StorageCorruptError(StorageError):
    """The data on disk is corrupt beyond a torn tail; the node must not start on it."""


class StorageFormatError(StorageError):
    """A file written in a newer format than this build reads (a newer build's data dir)."""

    def __init__(self, path: Path, found: int, known: int, what: str) -> None:
        super().__init__(
            f"{path} is in {what} format version {found}; this build reads up to version {known} "
            "(run a newer build on this data dir)"
        )
        self.path, self.found, self.known = path, found, known


@dataclass(frozen=True, slots=True)
class RecoveredState:
    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]  # contiguous, starting right after the snapshot index (or at 1)


@dataclass(slots=True)
class _Segment:
    """Bookkeeping of one WAL segment (mutable: ``max_index`` grows while it is current)."""

    seq: int
    path: Path
    max_index: int = 0  # highest entry index ever written to it (0: none)


def _wal_path(directory: Path, seq: int) -> Path:
    return directory / f"wal-{seq:016x}.log"


def _snap_path(directory: Path, index: int, term: int) -> Path:
    return directory / f"snap-{index:016x}-{term:016x}.snap"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hard_state_record(hs: HardState) -> bytes:
    payload = encode_hard_state(hs)
    crc = zlib.crc32(payload, _HARD_STATE_CRC_SEED)
    return _RECORD.pack(len(payload) + 1, crc, RecordType.HARD_STATE) + payload


def _find_valid_record(data: bytes, start: int) -> int:
    """Offset of the first CRC-valid record at or after ``start``, or -1."""
    n = len(data)
    mv = memoryview(data)
    for pos in range(start, n - _RECORD.size + 1):
        if data[pos + 8] not in (RecordType.ENTRY, RecordType.HARD_STATE):
            continue
        length, crc = _RECORD_HEAD.unpack_from(data, pos)
        if 1 <= length <= n - pos - 8 and zlib.crc32(mv[pos + 8 : pos + 8 + length]) == crc:
            return pos
    return -1


def _read_snapshot(path: Path, index: int, term: int) -> Snapshot:
    """Read and verify one snapshot file; ValueError (with the reason) when it is not valid."""
    raw = path.read_bytes()
    if len(raw) < _SNAP_HEAD.size:
        raise ValueError(f"short file ({len(raw)} bytes)")
    magic, version, _, meta_len, data_len, crc = _SNAP_HEAD.unpack_from(raw)
    if magic != _SNAP_MAGIC:
        raise ValueError("bad magic")
    if version > _SNAP_VERSION:
        raise StorageFormatError(path, version, _SNAP_VERSION, "snapshot file")
    if version != _SNAP_VERSION:
        raise ValueError(f"unsupported version {version}")
    if _SNAP_HEAD.size + meta_len + data_len != len(raw):
        raise ValueError(f"length mismatch (header says {meta_len}+{data_len}, file has {len(raw)})")
    body = memoryview(raw)[_SNAP_HEAD.size :]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    try:
        meta = decode_snapshot_meta(body[:meta_len])
    except CodecError as exc:
        raise ValueError(f"bad metadata: {exc}") from None
    if (meta.index, meta.term) != (index, term):
        raise ValueError(f"metadata {meta.index}/{meta.term} does not match the file name")
    return Snapshot(meta, bytes(body[meta_len:]))


class LogStorage:
    """WAL + snapshots of one node. Build it with ``LogStorage.open``."""

    def __init__(
        self, directory: Path, segment_bytes: int, lock_fd: int, snapshot: SnapshotMeta | None
    ) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._roll_at_next_sync = False
        self._lock_fd = lock_fd
        self._snapshot = snapshot  # latest saved snapshot
        self._snap_files: list[tuple[int, int]] = []  # (index, term) of valid files, ascending
        self._segments: list[_Segment] = []
        self._fd = -1  # current (last) segment, O_APPEND
        self._size = 0  # bytes in the current segment
        self._buf: list[bytes] = []
        self._buf_max_index = 0
        self._dir_dirty = False
        self._offset = snapshot.index if snapshot else 0  # log holds (offset, offset + len(terms)]
        self._offset_term = snapshot.term if snapshot else 0
        self._terms = array("Q")
        self._hard_state = HardState()  # latest set (maybe not yet synced)
        self._written_hard_state = HardState()  # latest written to the current segment
        self._failed: str | None = None
        self.transient_errors = 0  # opens refused for lack of file descriptors (retried)
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # for fsyncs: see module doc

    def _open_new(self, path: Path, flags: int) -> int:
        """``os.open`` of a file the storage creates while running; EMFILE/ENFILE is transient."""
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno in _TRANSIENT_ERRNOS:
                self.transient_errors += 1
                raise StorageTransientError(f"cannot open {path} now: {exc.strerror}") from exc
            raise

    def _fsync_directory(self) -> None:
        os.fsync(self._dir_fd)

    # --- opening and recovery -----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_bytes: int = 64 << 20,
        check_snapshot: Callable[[Snapshot], None] | None = None,
    ) -> tuple[LogStorage, RecoveredState]:
        """``check_snapshot``: called with the snapshot recovery chose before anything in the
        directory is changed; what it raises aborts ``open`` (the caller's own format check)."""
        if segment_bytes < 1:
            raise StorageError(f"segment_bytes must be positive, got {segment_bytes}")
        directory = Path(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open data directory {directory}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise StorageError(f"data directory {directory} is in use by another process") from None
        # Recovery allocates millions of acyclic objects; the cyclic GC would rescan them again
        # and again (measured: 2x slower). Pause it for the duration, process-wide.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._recover(directory, segment_bytes, lock_fd, check_snapshot)
        except OSError as exc:
            os.close(lock_fd)
            raise StorageError(f"cannot recover {directory}: {exc}") from exc
        except BaseException:
            os.close(lock_fd)
            raise
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def _recover(
        cls, directory: Path, segment_bytes: int, lock_fd: int, check: Callable[[Snapshot], None] | None
    ) -> tuple[LogStorage, RecoveredState]:
        wal: list[tuple[int, Path]] = []
        snaps: list[tuple[int, int, Path]] = []
        leftovers: list[Path] = []  # removed once every file's format is known to be readable
        for path in directory.iterdir():
            if path.name.endswith(".tmp"):
                leftovers.append(path)
            elif m := _WAL_NAME.fullmatch(path.name):
                wal.append((int(m[1], 16), path))
            elif m := _SNAP_NAME.fullmatch(path.name):
                snaps.append((int(m[1], 16), int(m[2], 16), path))
        snapshot: Snapshot | None = None
        valid: list[tuple[int, int]] = []
        for index, term, path in sorted(snaps, reverse=True):
            try:
                snap = _read_snapshot(path, index, term)  # OSError: StorageError from open()
            except ValueError as exc:
                logger.warning("snapshot corrupt skipped file=%s reason=%s", path, exc)
                continue
            snapshot = snapshot or snap
            valid.append((index, term))
        if check is not None and snapshot is not None:
            check(snapshot)
        wal.sort()
        for (a, pa), (b, _) in pairwise(wal):
            if b != a + 1:
                raise StorageCorruptError(f"wal segment missing after {pa} (next is seq {b:016x})")
        if not wal and snaps:
            raise StorageCorruptError(f"snapshots but no wal segments in {directory}")
        self = cls(directory, segment_bytes, lock_fd, snapshot.meta if snapshot else None)
        try:
            return self._finish_recovery(valid, wal, snapshot, leftovers)
        except BaseException:
            os.close(self._dir_fd)
            if self._fd >= 0:
                os.close(self._fd)
            raise

    def _finish_recovery(
        self,
        valid: list[tuple[int, int]],
        wal: list[tuple[int, Path]],
        snapshot: Snapshot | None,
        leftovers: list[Path],
    ) -> tuple[LogStorage, RecoveredState]:
        directory = self._dir
        self._snap_files = sorted(valid)
        entries, conflict = self._replay([_Segment(seq, path) for seq, path in wal], snapshot)
        for path in leftovers:
            path.unlink()
            logger.info("storage removed leftover temp file file=%s", path.name)
        self._terms.extend(e.term for e in entries)
        self._written_hard_state = self._hard_state
        if self._segments:
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
            if conflict:  # a snapshot install was cut short: finish dropping the old log
                self._restart_log()
        else:
            self._roll()
            self._sync_now()
        logger.info(
            "storage opened dir=%s segments=%d snapshot_index=%d first_index=%d last_index=%d",
            directory, len(self._segments), self._offset, self.first_index, self.last_index,
        )  # fmt: skip
        return self, RecoveredState(self._hard_state, snapshot, entries)

    def _replay(self, segments: list[_Segment], snapshot: Snapshot | None) -> tuple[list[Entry], bool]:
        """Rebuild the log; also says whether it conflicts with the snapshot (must be dropped)."""
        log: list[Entry] = []
        for k, seg in enumerate(segments):
            self._replay_segment(seg, log, is_last=k == len(segments) - 1)
            self._segments.append(seg)
        if snapshot is None:
            if log and log[0].index != 1:
                first = log[0].index
                raise StorageCorruptError(f"log starts at index {first} with no snapshot (lost segment?)")
            return log, False
        s, first = snapshot.meta.index, log[0].index if log else 0
        if log and first <= s <= log[-1].index and log[s - first].term != snapshot.meta.term:
            logger.warning("storage dropping log that conflicts with the snapshot index=%d", s)
            return [], True
        if not log or log[-1].index <= s:
            return [], False
        if first > s + 1:
            raise StorageCorruptError(f"log gap: wal starts at index {first}, snapshot ends at {s}")
        return log[s + 1 - first :], False

    @staticmethod
    def _decode_at(seg: _Segment, offset: int, decode: Callable[[bytes], _T], payload: bytes) -> _T:
        try:
            return decode(payload)
        except CodecError as exc:
            if payload and payload[0] > CODEC_VERSION:  # CRC-valid, so written that way
                raise StorageFormatError(seg.path, payload[0], CODEC_VERSION, "WAL record") from None
            raise StorageCorruptError(f"bad record in {seg.path} at offset {offset}: {exc}") from None

    def _replay_segment(self, seg: _Segment, log: list[Entry], *, is_last: bool) -> None:
        try:
            data = seg.path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {seg.path}: {exc}") from exc
        n = len(data)
        pos = 0
        payloads: list[bytes] = []  # ENTRY payloads, decoded in one batch below
        offsets: list[int] = []
        hard_state: tuple[int, bytes] | None = None  # only the last one matters
        unpack = _RECORD_HEAD.unpack_from
        crc32 = zlib.crc32
        while n - pos >= _RECORD.size:
            length, crc = unpack(data, pos)
            start = pos + 8
            end = start + length
            body = data[start:end]  # small bytes slices are cheaper than memoryview slices
            if length == 0 or end > n or crc32(body) != crc:
                break
            rtype = body[0]
            if rtype == _ENTRY:
                payloads.append(body[1:])
                offsets.append(pos)
            elif rtype == RecordType.HARD_STATE:
                hard_state = (pos, body[1:])
            else:
                raise StorageCorruptError(f"unknown record type {rtype} in {seg.path} at offset {pos}")
            pos = end
        if hard_state is not None:
            self._hard_state = self._decode_at(seg, hard_state[0], decode_hard_state, hard_state[1])
        try:
            entries = decode_entries(payloads)
        except CodecError:  # find the culprit for the message
            for off, payload in zip(offsets, payloads, strict=True):
                self._decode_at(seg, off, decode_entry, payload)
            raise StorageCorruptError(f"bad entry records in {seg.path}") from None
        nxt = log[-1].index + 1 if log else 0
        for e in entries:
            i = e.index
            if i == nxt:
                log.append(e)
                nxt += 1
                continue
            if log and log[0].index <= i < nxt:  # rewritten: the last writer wins
                del log[i - log[0].index :]
            else:  # jump (after an installed snapshot): start over from here
                log.clear()
            log.append(e)
            nxt = i + 1
        max_index = max((e.index for e in entries), default=0)
        seg.max_index = max_index
        if pos == n:
            return
        if not is_last:
            raise StorageCorruptError(f"corrupt record in {seg.path} at offset {pos} (not the last segment)")
        later = _find_valid_record(data, pos + 1)
        if later >= 0:
            raise StorageCorruptError(
                f"corrupt record in {seg.path} at offset {pos}, followed by a valid record at offset {later}"
            )
        logger.warning("wal torn tail truncated file=%s offset=%d dropped_bytes=%d", seg.path, pos, n - pos)
        try:
            with seg.path.open("r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"cannot truncate {seg.path}: {exc}") from exc

    # --- positions ----------------------------------------------------------------------------
    @property
    def first_index(self) -> int:
        """First index after the snapshot (entries at or before the snapshot are not kept)."""
        return self._offset + 1

    @property
    def last_index(self) -> int:
        """Index of the last appended entry (buffered or synced), or the snapshot index."""
        return self._offset + len(self._terms)

    @property
    def last_term(self) -> int:
        return self._terms[-1] if self._terms else self._offset_term

    @property
    def snapshot_meta(self) -> SnapshotMeta | None:
        return self._snapshot

    @property
    def hard_state(self) -> HardState:
        """The latest hard state set (durable only once ``sync`` returned)."""
        return self._hard_state

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None when before the snapshot or beyond the end."""
        if index == self._offset:
            return self._offset_term
        if self._offset < index <= self.last_index:
            return self._terms[index - self._offset - 1]
        return None

    # --- writing ------------------------------------------------------------------------------
    def append(self, entries: Sequence[Entry]) -> None:
        """Buffer ``entries``; an ``entries[0].index`` at or below ``last_index`` truncates there."""
        self._check_usable()
        if not entries:
            return
        first = entries[0].index
        if first <= self._offset:
            raise StorageError(f"append at index {first} at or before the snapshot index {self._offset}")
        if first > self.last_index + 1:
            raise StorageError(f"append at index {first} leaves a gap after last index {self.last_index}")
        prev = self.term(first - 1)
        assert prev is not None
        records: list[bytes] = []
        expected = first
        for e in entries:
            if e.index != expected:
                raise StorageError(f"append not contiguous: index {e.index} where {expected} was expected")
            if e.term < prev:
                raise StorageError(f"append at index {e.index}: term {e.term} below previous term {prev}")
            try:
                payload = encode_entry(e)
            except CodecError as exc:
                raise StorageError(f"cannot encode entry {e.index}: {exc}") from None
            records.append(_RECORD.pack(len(payload) + 1, zlib.crc32(payload, _ENTRY_CRC_SEED), _ENTRY))
            records.append(payload)
            prev = e.term
            expected += 1
        del self._terms[first - self._offset - 1 :]
        self._terms.extend(e.term for e in entries)
        self._buf.extend(records)
        self._buf_max_index = max(self._buf_max_index, expected - 1)

    def set_hard_state(self, hs: HardState) -> None:
        """Buffer a hard state record (durable with the next ``sync``)."""
        self._check_usable()
        try:
            record = _hard_state_record(hs)
        except CodecError as exc:
            raise StorageError(f"cannot encode hard state: {exc}") from None
        self._buf.append(record)
        self._hard_state = hs

    def sync(self) -> float:
        """Write the buffered records and fsync them; returns the seconds spent in fsync."""
        self._check_usable()
        if not self._buf:
            return 0.0
        if self._size >= self._segment_bytes or (self._roll_at_next_sync and self._size > 0):
            self._roll()  # StorageTransientError: nothing changed, the next sync rolls again
            self._roll_at_next_sync = False
        return self._sync_now()

    def _sync_now(self) -> float:
        data = b"".join(self._buf)
        self._buf.clear()
        try:
            _write_all(self._fd, data)
            self._size += len(data)
            started = time.perf_counter()
            _fsync_data(self._fd)
            if self._dir_dirty:
                self._fsync_directory()
                self._dir_dirty = False
            spent = time.perf_counter() - started
        except OSError as exc:  # after a failed fsync the page cache state is unknown: stop
            self._failed = f"write/fsync of {self._segments[-1].path} failed: {exc}"
            raise StorageError(self._failed) from exc
        seg = self._segments[-1]
        seg.max_index = max(seg.max_index, self._buf_max_index)
        self._buf_max_index = 0
        self._written_hard_state = self._hard_state
        return spent

    def _roll(self) -> None:
        """Start a new segment (written by the next ``_sync_now``) headed by the hard state."""
        seq = self._segments[-1].seq + 1 if self._segments else 1
        path = _wal_path(self._dir, seq)
        try:
            fd = self._open_new(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        except StorageTransientError:
            raise
        except OSError as exc:
            self._failed = f"cannot create {path}: {exc}"
            raise StorageError(self._failed) from exc
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size, self._dir_dirty = fd, 0, True
        self._segments.append(_Segment(seq, path))
        self._buf.insert(0, _hard_state_record(self._written_hard_state))
        logger.debug("wal segment created file=%s", path.name)

    # --- snapshots and compaction -------------------------------------------------------------
    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Durably store a local snapshot; its index must be in the log (or be the snapshot's)."""
        self._check_usable()
        meta = snapshot.meta
        if meta.index > self.last_index:
            raise StorageError(f"snapshot index {meta.index} beyond last index {self.last_index}")
        if self.term(meta.index) not in (None, meta.term):
            raise StorageError(f"snapshot term {meta.term} does not match the log at index {meta.index}")
        self._write_snapshot(snapshot)
        self._trim_front(meta)
        # The next write starts a new segment: every segment then spans about one snapshot
        # interval, so compaction deletes the old ones and a restart reads only the trailing
        # entries, never the whole history.
        self._roll_at_next_sync = True

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot received from a leader and drop the log entries it makes obsolete."""
        self._check_usable()
        self.sync()
        meta = snapshot.meta
        if meta.index <= self.last_index and self.term(meta.index) == meta.term:
            self._write_snapshot(snapshot)
            self._trim_front(meta)
            return
        self._write_snapshot(snapshot)
        self._restart_log()
        self._offset, self._offset_term = meta.index, meta.term
        del self._terms[:]
        logger.info("storage installed snapshot index=%d term=%d", meta.index, meta.term)

    def _restart_log(self) -> None:
        """Drop every entry: a fresh durable segment (hard state only), then delete the others."""
        old = self._segments[:]
        self._roll()
        self._sync_now()
        for seg in old:
            self._unlink(seg.path)
        del self._segments[: len(old)]
        self._sync_dir()

    def compact(self, upto_index: int) -> None:
        """Delete the oldest segments whose every entry is at or before ``upto_index``."""
        self._check_usable()
        if upto_index > self._offset:
            raise StorageError(f"compact to {upto_index} beyond the snapshot index {self._offset}")
        deleted = 0
        while len(self._segments) > 1 and self._segments[0].max_index <= upto_index:
            self._unlink(self._segments.pop(0).path)
            deleted += 1
        if deleted:
            self._sync_dir()
            logger.info("wal compacted segments_deleted=%d upto_index=%d", deleted, upto_index)

    def _write_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        stored = self._snapshot
        if stored is not None and (meta.index, meta.term) < (stored.index, stored.term):
            raise StorageError(f"snapshot {meta.index}/{meta.term} older than the stored one")
        try:
            encoded = encode_snapshot_meta(meta)
        except CodecError as exc:
            raise StorageError(f"cannot encode snapshot metadata: {exc}") from None
        crc = zlib.crc32(snapshot.data, zlib.crc32(encoded))
        head = _SNAP_HEAD.pack(_SNAP_MAGIC, _SNAP_VERSION, 0, len(encoded), len(snapshot.data), crc)
        path = _snap_path(self._dir, meta.index, meta.term)
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = self._open_new(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                _write_all(fd, head + encoded)
                _write_all(fd, snapshot.data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._fsync_directory()
        except StorageTransientError:
            raise
        except OSError as exc:
            self._failed = f"cannot write snapshot {path}: {exc}"
            raise StorageError(self._failed) from exc
        self._snapshot = meta
        self._snap_files = sorted({*self._snap_files, (meta.index, meta.term)})
        for index, term in self._snap_files[:-_SNAPSHOTS_KEPT]:
            self._unlink(_snap_path(self._dir, index, term))
        self._snap_files = self._snap_files[-_SNAPSHOTS_KEPT:]
        logger.info("storage saved snapshot index=%d term=%d", meta.index, meta.term)

    def _trim_front(self, meta: SnapshotMeta) -> None:
        if meta.index > self._offset:
            del self._terms[: meta.index - self._offset]
            self._offset, self._offset_term = meta.index, meta.term

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._failed = f"cannot delete {path}: {exc}"
            raise StorageError(self._failed) from exc

    def _sync_dir(self) -> None:
        try:
            self._fsync_directory()
        except OSError as exc:
            self._failed = f"cannot fsync directory {self._dir}: {exc}"
            raise StorageError(self._failed) from exc

    # --- lifecycle ----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageError(f"storage failed earlier: {self._failed}")
        if self._lock_fd < 0:
            raise StorageError("storage is closed")

    def close(self) -> None:
        """Release the files; buffered records that were not synced are dropped."""
        if self._lock_fd < 0:
            return
        if self._buf:
            logger.debug("storage closed with unsynced records count=%d", len(self._buf))
            self._buf.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> LogStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "LogStorage",
    "RecordType",
    "RecoveredState",
    "StorageCorruptError",
    "StorageError",
    "StorageFormatError",
    "StorageTransientError",
]
