"""The on-disk log of one Raft node: ``LogStorage`` (synchronous, one thread) and its recovery.

Called from one thread at a time; nothing here is async. File formats: ``wal.py`` (segments),
``snapshots.py``; errors: ``storage_errors.py`` (re-exported here); creating and locking the
directory: ``directory.py``. This module owns what the files mean together, and opening them again:

- ``wal-<seq:016x>.log``: WAL segments, replayed in ``seq`` order, none missing. Every segment
  begins with a HARD_STATE record, so older segments can be deleted safely (``compact``).
- ``snap-<index:016x>-<term:016x>.snap``: snapshots; the newest valid one is used, the two newest
  are kept. ``.tmp`` leftovers of an interrupted write are removed when opening.
- ``LOCK``: an flock held while open, so two processes never share a directory.

A CRC-valid WAL record or snapshot file in a newer format than this build knows raises
``StorageFormatError`` from ``open`` before anything in the directory changes. Log semantics
(``replay.py``): the last writer wins; entries at or before the snapshot index are not returned.
Failures (EMFILE/ENFILE and a full disk are transient, other I/O errors and failed fsyncs stop
the storage) and what ``open`` makes durable: docs/design.md, "Storage".
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..codec import CodecError, encode_entry
from ..core.types import Entry, HardState, Snapshot, SnapshotMeta
from . import replay, snapshots, wal
from .directory import open_locked
from .storage_errors import (
    DISK_FULL_ERRNOS,
    TRANSIENT_ERRNOS,
    StorageCorruptError,
    StorageError,
    StorageFormatError,
    StorageFullError,
    StorageTransientError,
    free_bytes,
)
from .wal import RecordType

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveredState:
    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]  # contiguous, starting right after the snapshot index (or at 1)


class LogStorage:
    """WAL + snapshots of one node. Build it with ``LogStorage.open``."""

    def __init__(
        self,
        directory: Path,
        segment_bytes: int,
        lock_fd: int,
        snapshot: SnapshotMeta | None,
        preallocate_bytes: int = wal.PREALLOCATE_BYTES,
    ) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        self._preallocate_bytes = preallocate_bytes  # 0: append only (see wal.py)
        self._roll_at_next_sync = False
        self._lock_fd = lock_fd
        self._snapshot = snapshot  # latest saved snapshot
        self._snap_files: list[tuple[int, int]] = []  # (index, term) of valid files, ascending
        self._segments: list[wal.Segment] = []
        self._fd = -1  # current (last) segment, written at ``_size`` (pwrite)
        self._size = 0  # bytes of records in the current segment
        self._allocated = 0  # its file size: records, then preallocated zeros (see wal.py)
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
        self.full_errors = 0  # writes and opens refused for lack of space (retried)
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # for fsyncs: see module doc
        self._last_end = 0  # recovery: the end of the records of the segment read last

    def _open_new(self, path: Path, flags: int) -> int:
        """``os.open`` of a file the storage opens while running; EMFILE/ENFILE is transient."""
        try:
            return os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS:
                self.transient_errors += 1
                raise StorageTransientError(f"cannot open {path} now: {exc.strerror}") from exc
            if exc.errno in DISK_FULL_ERRNOS:
                self.full_errors += 1
                raise StorageFullError(path, free_bytes(self._dir)) from exc
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
        preallocate_bytes: int = wal.PREALLOCATE_BYTES,
        check_snapshot: Callable[[Snapshot], None] | None = None,
    ) -> tuple[LogStorage, RecoveredState]:
        """``check_snapshot``: called with the snapshot recovery chose before anything in the
        directory is changed; what it raises aborts ``open`` (the caller's own format check).
        ``preallocate_bytes``: the step by which the open segment is allocated ahead (0: none)."""
        if segment_bytes < 1:
            raise StorageError(f"segment_bytes must be positive, got {segment_bytes}")
        if preallocate_bytes < 0:
            raise StorageError(f"preallocate_bytes must not be negative, got {preallocate_bytes}")
        directory = Path(directory)
        lock_fd = open_locked(directory)
        # Recovery allocates millions of acyclic objects; the cyclic GC would rescan them again
        # and again (measured: 2x slower). Pause it for the duration, process-wide.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._recover(directory, segment_bytes, preallocate_bytes, lock_fd, check_snapshot)
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
        cls,
        directory: Path,
        segment_bytes: int,
        preallocate_bytes: int,
        lock_fd: int,
        check: Callable[[Snapshot], None] | None,
    ) -> tuple[LogStorage, RecoveredState]:
        wal_files: list[tuple[int, Path]] = []
        snaps: list[tuple[int, int, Path]] = []
        leftovers: list[Path] = []  # removed once every file's format is known to be readable
        for path in directory.iterdir():
            if path.name.endswith(".tmp"):
                leftovers.append(path)
            elif m := wal.WAL_NAME.fullmatch(path.name):
                wal_files.append((int(m[1], 16), path))
            elif m := snapshots.SNAP_NAME.fullmatch(path.name):
                snaps.append((int(m[1], 16), int(m[2], 16), path))
        snapshot: Snapshot | None = None
        valid: list[tuple[int, int]] = []
        for index, term, path in sorted(snaps, reverse=True):
            try:
                snap = snapshots.read_snapshot(path, index, term)  # OSError: StorageError from open()
            except ValueError as exc:
                logger.warning("snapshot corrupt skipped file=%s reason=%s", path, exc)
                continue
            snapshot = snapshot or snap
            valid.append((index, term))
        if check is not None and snapshot is not None:
            check(snapshot)
        wal_files.sort()
        wal.check_sequence(wal_files)
        if not wal_files and snaps:
            raise StorageCorruptError(f"snapshots but no wal segments in {directory}")
        self = cls(directory, segment_bytes, lock_fd, snapshot.meta if snapshot else None, preallocate_bytes)
        try:
            return self._finish_recovery(valid, wal_files, snapshot, leftovers)
        except BaseException:
            os.close(self._dir_fd)
            if self._fd >= 0:
                os.close(self._fd)
            raise

    def _finish_recovery(
        self,
        valid: list[tuple[int, int]],
        wal_files: list[tuple[int, Path]],
        snapshot: Snapshot | None,
        leftovers: list[Path],
    ) -> tuple[LogStorage, RecoveredState]:
        directory = self._dir
        self._snap_files = sorted(valid)
        entries, conflict = self._replay([wal.Segment(seq, path) for seq, path in wal_files], snapshot)
        for path in leftovers:
            path.unlink()
            logger.info("storage removed leftover temp file file=%s", path.name)
        self._terms.extend(e.term for e in entries)
        self._written_hard_state = self._hard_state
        if self._segments:
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY)
            self._size = self._last_end
            self._allocated = os.fstat(self._fd).st_size
            if self._size == 0:  # created, then a crash before its first record: head it now
                self._buf.append(wal.hard_state_record(self._hard_state))
                self._dir_dirty = True
                self._sync_now()
            else:  # a killed process's last records may be in the page cache only: recovery
                wal.fsync_data(self._fd)  # returns them as the log, so they must be durable
                self._fsync_directory()  # and so must the names of the files it read
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

    def _replay(self, segments: list[wal.Segment], snapshot: Snapshot | None) -> tuple[list[Entry], bool]:
        """Rebuild the log; also says whether it conflicts with the snapshot (must be dropped)."""
        log: list[Entry] = []
        for k, seg in enumerate(segments):
            self._replay_segment(seg, log, is_last=k == len(segments) - 1)
            self._segments.append(seg)
        entries, conflict = replay.after_snapshot(log, snapshot)
        if conflict:
            assert snapshot is not None
            logger.warning(
                "storage dropping log that conflicts with the snapshot index=%d", snapshot.meta.index
            )
        return entries, conflict

    def _replay_segment(self, seg: wal.Segment, log: list[Entry], *, is_last: bool) -> None:
        contents = wal.read_segment(seg.path)
        if contents.hard_state is not None:
            self._hard_state = contents.hard_state
        replay.apply_entries(log, contents.entries)
        seg.max_index = max((e.index for e in contents.entries), default=0)
        n, pos = len(contents.data), contents.end
        self._last_end = pos
        if pos == n or (is_last and wal.is_zero(contents.data, pos)):  # all records, or preallocated
            return
        wal.check_tail(seg.path, contents.data, pos, is_last=is_last)
        logger.warning("wal torn tail truncated file=%s offset=%d dropped_bytes=%d", seg.path, pos, n - pos)
        wal.truncate_segment(seg.path, pos)

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
        pack, crc_seed = wal.RECORD.pack, wal.ENTRY_CRC_SEED
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
            records.append(pack(len(payload) + 1, zlib.crc32(payload, crc_seed), wal.ENTRY))
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
            record = wal.hard_state_record(hs)
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
        if self._size + len(data) > self._allocated and self._preallocate_bytes:
            self._preallocate(len(data))
        try:
            wal.write_at(self._fd, data, self._size)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                self._undo_write(data, exc)
            self._failed = f"write of {self._segments[-1].path} failed: {exc}"
            raise StorageError(self._failed) from exc
        self._size += len(data)
        try:
            started = time.perf_counter()
            wal.fsync_data(self._fd)
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

    def _undo_write(self, data: bytes, exc: OSError) -> None:
        """A write that did not fit: cut what landed off again and keep ``data`` buffered, so the
        segment is as last synced and the retry writes the same bytes (``StorageFullError``)."""
        path = self._segments[-1].path
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as undo:
            self._failed = f"write of {path} failed ({exc}) and could not be cut back: {undo}"
            raise StorageError(self._failed) from exc
        self._allocated = self._size
        self._buf = [data]
        self.full_errors += 1
        raise StorageFullError(path, free_bytes(self._dir)) from exc

    def _preallocate(self, need: int) -> None:
        """Allocate the current segment ahead of the next ``need`` bytes (see wal.py). Best effort:
        where the file system refuses (no space for a whole step, no fallocate), the write goes
        ahead without, as an append (a full disk then shows as the write's own error). A file
        system without fallocate is not asked again: every later write would pay the refusal."""
        step = self._preallocate_bytes
        size = max(step, need + step // 2)
        try:
            os.posix_fallocate(self._fd, self._allocated, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._preallocate_bytes = 0
            logger.debug("wal preallocation refused file=%s reason=%s", self._segments[-1].path, exc)
            self._allocated = max(self._allocated, os.fstat(self._fd).st_size)
            return
        self._allocated += size

    def _cut_to_records(self) -> None:
        """Cut the current segment to its records and make that durable before another segment
        exists: only the last segment ever has a preallocated tail (see wal.py)."""
        if self._fd < 0 or self._allocated <= self._size:
            return
        path = self._segments[-1].path
        try:
            os.ftruncate(self._fd, self._size)
            wal.fsync_data(self._fd)
        except OSError as exc:
            self._failed = f"cannot cut {path} to its records: {exc}"
            raise StorageError(self._failed) from exc
        self._allocated = self._size

    def _roll(self) -> None:
        """Start a new segment (written by the next ``_sync_now``) headed by the hard state."""
        seq = self._segments[-1].seq + 1 if self._segments else 1
        path = wal.wal_path(self._dir, seq)
        self._cut_to_records()
        try:
            fd = self._open_new(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except StorageTransientError:
            raise
        except OSError as exc:
            self._failed = f"cannot create {path}: {exc}"
            raise StorageError(self._failed) from exc
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size, self._allocated, self._dir_dirty = fd, 0, 0, True
        self._segments.append(wal.Segment(seq, path))
        self._buf.insert(0, wal.hard_state_record(self._written_hard_state))
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
        """Drop every entry: a fresh durable segment (hard state only), then the old ones emptied
        newest first and deleted (see docs/design.md, "Storage": never stale entries after a crash)."""
        old = self._segments[:]
        fds: list[int] = []
        try:
            for seg in old[1:]:  # opened before anything changes (EMFILE: StorageTransientError)
                fds.append(self._open_new(seg.path, os.O_WRONLY))
            self._roll()
            self._sync_now()
            for seg, fd in zip(reversed(old[1:]), reversed(fds), strict=True):
                try:
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
                except OSError as exc:
                    self._failed = f"cannot empty {seg.path}: {exc}"
                    raise StorageError(self._failed) from exc
        finally:
            for fd in fds:
                os.close(fd)
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
        header = snapshots.snapshot_header(snapshot)
        path = snapshots.snap_path(self._dir, meta.index, meta.term)
        try:
            snapshots.write_snapshot_file(path, header, snapshot.data, self._open_new)
        except StorageTransientError:
            raise
        except OSError as exc:
            # Not renamed: ``path`` is as it was (absent, or this same snapshot from an earlier
            # call, e.g. an install retried), so nothing changed.
            if exc.errno in DISK_FULL_ERRNOS:
                self.full_errors += 1
                raise StorageFullError(path, free_bytes(self._dir)) from exc
            self._failed = f"cannot write snapshot {path}: {exc}"
            raise StorageError(self._failed) from exc
        try:
            self._fsync_directory()
        except OSError as exc:
            self._failed = f"cannot write snapshot {path}: {exc}"
            raise StorageError(self._failed) from exc
        self._snapshot = meta
        self._snap_files = sorted({*self._snap_files, (meta.index, meta.term)})
        for index, term in self._snap_files[: -snapshots.SNAPSHOTS_KEPT]:
            self._unlink(snapshots.snap_path(self._dir, index, term))
        self._snap_files = self._snap_files[-snapshots.SNAPSHOTS_KEPT :]
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
            if self._failed is None:  # a clean close leaves each segment its records only
                with contextlib.suppress(StorageError):
                    self._cut_to_records()
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
    "StorageFullError",
    "StorageTransientError",
]
