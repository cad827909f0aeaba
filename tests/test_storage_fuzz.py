"""Fuzzing of the on-disk readers of quorumd.raft.aio.storage (WAL segments and snapshot files).

Two realistic data directories are written through ``LogStorage`` itself: ``rewrites`` (several
small segments, hard states, and log rewrites by later terms, some across segments) and
``snapshots`` (two snapshots, compaction, a tail in a new term). The oracle is the set of states
a *clean* torn tail can leave: the last segment cut at each record boundary, with any subset of
the snapshot files lost. Then hypothesis damages copies of them:

* ``test_damaged_files_never_yield_a_corrupt_state``: bit flips and random overwrites anywhere,
  and truncation, inserted or appended garbage in the last segment (a torn or garbled tail), and
  truncation or garbage in snapshot files. ``LogStorage.open`` must either raise
  ``StorageCorruptError`` or return one of the oracle states exactly: never another exception,
  never an entry, hard state or snapshot whose bytes were changed. A successful open is durable
  and usable: opening again gives the same state, and an append after it survives a reopen.
* ``test_crc_valid_garbage_is_refused_or_decoded``: records and snapshots whose payload is
  replaced by random or mutated bytes *with a recomputed checksum* (what a bug or an attacker,
  not bit rot, would write): the decoders either accept a well-formed value or raise
  ``StorageCorruptError`` (a snapshot is skipped); the result still satisfies the log invariants.
* ``test_random_files``: a directory of random bytes named like segments and snapshots.

Damage model: in-place damage (flips, overwrites) anywhere; size changes only in the last WAL
segment and in snapshot files. A non-last segment is closed only after its last fsync, so it
cannot be torn; a clean cut of one at a record boundary is not detectable with this format
(there is no per-segment seal) and is deliberately not generated.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorumd.raft.aio.storage import LogStorage, RecoveredState, StorageCorruptError, StorageFormatError
from quorumd.raft.aio.wal import hard_state_record
from quorumd.raft.core.types import Configuration, Entry, EntryType, HardState, Snapshot, SnapshotMeta

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONFIG = Configuration(frozenset({1, 2, 3}), frozenset())
Outcome = tuple[object, ...]


# --- building the reference directories -------------------------------------------------------
def payload(index: int, term: int) -> bytes:
    return (b"%d/%d:" % (index, term)) * (1 + (index * 7 + term) % 9)


def write(st_: LogStorage, first: int, last: int, term: int, commit: int) -> None:
    st_.append([Entry(term, i, EntryType.NORMAL, payload(i, term)) for i in range(first, last + 1)])
    st_.set_hard_state(HardState(term, 1, commit))
    st_.sync()


def build_rewrites(d: Path) -> None:
    st_, _ = LogStorage.open(d, segment_bytes=400)
    with st_:
        for first in range(1, 13, 3):
            write(st_, first, first + 2, 1, first - 1)
        write(st_, 9, 14, 2, 8)  # a new leader rewrites 9..12
        for first in range(15, 31, 4):
            write(st_, first, first + 3, 2, first - 2)
        write(st_, 28, 33, 3, 26)  # and again, across a segment boundary
        write(st_, 34, 36, 3, 30)


def build_snapshots(d: Path) -> None:
    st_, _ = LogStorage.open(d, segment_bytes=500)
    with st_:
        for first in range(1, 41, 5):
            write(st_, first, first + 4, 1, first)
        st_.save_snapshot(Snapshot(SnapshotMeta(20, 1, CONFIG), b"state@20" * 30))
        st_.compact(20)
        for first in range(41, 61, 5):
            write(st_, first, first + 4, 1, first)
        st_.save_snapshot(Snapshot(SnapshotMeta(45, 1, CONFIG), b"state@45" * 30))
        st_.compact(45)
        for first in range(61, 71, 5):
            write(st_, first, first + 4, 2, first - 1)


def records(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of an undamaged segment."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        out.append((pos, pos + 8 + length))
        pos += 8 + length
    assert pos == len(data)
    return out


def wal_files(d: Path) -> list[Path]:
    return sorted(d.glob("wal-*.log"))


def snap_files(d: Path) -> list[Path]:
    return sorted(d.glob("snap-*.snap"))


def canonical(rec: RecoveredState) -> Outcome:
    snap = (rec.snapshot.meta, rec.snapshot.data) if rec.snapshot is not None else None
    return (rec.hard_state, snap, tuple(rec.entries))


def open_outcome(d: Path) -> Outcome | None:
    """The recovered state, or None for StorageCorruptError (anything else propagates)."""
    try:
        st_, rec = LogStorage.open(d)
    except (StorageCorruptError, StorageFormatError):  # CRC-valid and newer: a refusal too
        return None
    st_.close()
    return canonical(rec)


def refused_as_newer(d: Path) -> bool:
    """Whether opening ``d`` refuses it as a newer format; if so, it must have changed nothing
    (a refusal is safe whether the file is a newer build's or damaged: nothing is lost)."""
    before = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    try:
        st_, _rec = LogStorage.open(d)
    except StorageFormatError:
        after = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
        assert after == before, "a refused data dir was changed"
        return True
    except StorageCorruptError:
        return False
    st_.close()
    return False


@dataclass
class Layout:
    name: str
    base: Path
    oracle: set[Outcome]
    full: Outcome


def make_layout(root: Path, name: str) -> Layout:
    base = root / name
    (build_rewrites if name == "rewrites" else build_snapshots)(base)
    assert len(wal_files(base)) >= 2
    last = wal_files(base)[-1]
    cuts = [0, *(end for _, end in records(last.read_bytes()))]
    oracle: set[Outcome] = set()
    snaps = [p.name for p in snap_files(base)]
    for n in range(len(snaps) + 1):
        for lost in itertools.combinations(snaps, n):
            for cut in cuts:
                d = root / f"{name}-oracle"
                shutil.copytree(base, d)
                for s in lost:
                    (d / s).unlink()
                with (d / last.name).open("r+b") as f:
                    f.truncate(cut)
                outcome = open_outcome(d)
                shutil.rmtree(d)
                if outcome is not None:
                    oracle.add(outcome)
    full = open_outcome(base)
    assert full is not None and full in oracle
    return Layout(name, base, oracle, full)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Layout]:
    root = tmp_path_factory.mktemp("fuzz")
    result = {name: make_layout(root, name) for name in ("rewrites", "snapshots")}
    full = result["rewrites"].full[2]
    assert isinstance(full, tuple) and [e.term for e in full][8:14] == [2] * 6  # rewrites applied
    return result


@pytest.fixture()
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="quorumd-fuzz-") as d:
        yield Path(d)


# --- damage -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    kind: str  # flip | overwrite | truncate | insert | append
    target: int  # which file (modulo the candidates for this kind)
    where: int  # offset (modulo the file size)
    data: bytes


damages = st.builds(
    Damage,
    st.sampled_from(["flip", "overwrite", "truncate", "insert", "append"]),
    st.integers(0, 1000),
    st.integers(0, 1 << 20),
    st.binary(min_size=1, max_size=24),
)


@dataclass(frozen=True)
class Applied:
    """What one damage did: the file, the kind, and the first/last changed offsets (in-place
    kinds) or the offset of the cut or insertion."""

    name: str
    kind: str
    first: int
    last: int
    size: int  # the file's size before the damage


def apply(d: Path, damage: Damage) -> Applied | None:
    """Damage one file; None when the damage changed nothing."""
    wal, snaps = wal_files(d), snap_files(d)
    if damage.kind in ("flip", "overwrite"):
        candidates = wal + snaps
    else:
        candidates = wal[-1:] + snaps  # size changes: only where a torn write is possible
    path = candidates[damage.target % len(candidates)]
    old = path.read_bytes()
    raw = bytearray(old)
    at = damage.where % (len(raw) + 1)
    if damage.kind in ("flip", "overwrite"):
        at %= max(1, len(raw))
        chunk = damage.data[: len(raw) - at]
        for k, b in enumerate(chunk):
            raw[at + k] = raw[at + k] ^ (b or 1) if damage.kind == "flip" else b
    elif damage.kind == "truncate":
        del raw[at:]
    elif damage.kind == "insert":
        raw[at:at] = damage.data
    else:
        at = len(raw)
        raw += damage.data
    if bytes(raw) == old:
        return None
    path.write_bytes(bytes(raw))
    if damage.kind in ("flip", "overwrite"):
        changed = [i for i in range(len(old)) if raw[i] != old[i]]
        return Applied(path.name, damage.kind, changed[0], changed[-1], len(old))
    return Applied(path.name, damage.kind, at, at, len(old))


def expected_for(layout: Layout, done: Applied, scratch: Path) -> Outcome | None:
    """The exact outcome of one damage, computed on undamaged data (None: StorageCorruptError).

    Damage to a WAL segment that is not the last one is corruption. In the last segment, the
    first damaged record and everything after it are dropped as a torn tail when no intact
    record follows the damage, and it is corruption otherwise. A damaged snapshot is skipped.
    """
    d = scratch / "expected"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(layout.base, d)
    if done.name.startswith("snap-"):
        (d / done.name).unlink()
        return open_outcome(d)
    last = wal_files(d)[-1]
    if done.name != last.name:
        return None
    spans = records(last.read_bytes())
    if done.kind == "append" or (done.kind == "insert" and done.first == done.size):
        cut = done.size  # garbage after the last record: a torn tail, dropped
    elif done.kind == "truncate":
        cut = max(end for _, end in [(0, 0), *spans] if end <= done.first)
    else:
        hit = next(
            k for k, (start, end) in enumerate(spans) if start <= done.first < end or done.first == start
        )
        damaged_until = done.last if done.kind != "insert" else done.first
        if any(start > damaged_until for start, _ in spans[hit + 1 :]) or (
            done.kind == "insert" and done.first == spans[hit][0]
        ):
            return None  # an intact record follows the damage
        cut = spans[hit][0]
    with last.open("r+b") as f:
        f.truncate(cut)
    return open_outcome(d)


def check_usable_after(d: Path, outcome: Outcome) -> None:
    """Open again (same state: the repair was durable), append one entry, reopen and find it."""
    again = open_outcome(d)
    assert again == outcome
    st_, rec = LogStorage.open(d)
    with st_:
        nxt = Entry(max(st_.last_term, 9), st_.last_index + 1, EntryType.NORMAL, b"after recovery")
        st_.append([nxt])
        st_.set_hard_state(HardState(nxt.term, 1, rec.hard_state.commit))
        st_.sync()
    st_, rec2 = LogStorage.open(d)
    with st_:
        assert list(rec2.entries) == [*rec.entries, nxt]


@FUZZ
@given(name=st.sampled_from(["rewrites", "snapshots"]), damage=st.lists(damages, min_size=1, max_size=3))
def test_damaged_files_never_yield_a_corrupt_state(
    layouts: dict[str, Layout], scratch: Path, name: str, damage: list[Damage]
) -> None:
    layout = layouts[name]
    d = scratch / "d"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(layout.base, d)
    done = [a for a in (apply(d, dmg) for dmg in damage) if a is not None]
    if refused_as_newer(d):
        return  # a damaged version field reads as a newer build's file: refused, nothing changed
    outcome = open_outcome(d)  # any exception but StorageCorruptError fails the test
    if len(done) == 1:
        assert outcome == expected_for(layout, done[0], scratch), done[0]
    if outcome is None:
        return
    assert outcome in layout.oracle, "recovered a state no clean torn tail can produce"
    check_usable_after(d, outcome)


# --- checksum-valid garbage -------------------------------------------------------------------------
def rewrite_record(raw: bytes, index: int, new_body: bytes) -> bytes:
    """Replace the body (type + payload) of record ``index`` and fix its length and CRC."""
    spans = records(raw)
    start, end = spans[index % len(spans)]
    record = struct.pack("<II", len(new_body), zlib.crc32(new_body)) + new_body
    return raw[:start] + record + raw[end:]


def check_invariants(rec: RecoveredState) -> None:
    first = rec.snapshot.meta.index + 1 if rec.snapshot is not None else 1
    assert [e.index for e in rec.entries] == list(range(first, first + len(rec.entries)))


@FUZZ
@given(
    name=st.sampled_from(["rewrites", "snapshots"]),
    target=st.integers(0, 1000),
    record=st.integers(0, 1000),
    rtype=st.sampled_from([1, 2, 1, 2, 3, 0]),
    body=st.one_of(
        st.binary(max_size=80), st.builds(lambda n: b"\x01" + bytes([n]) * 5, st.integers(0, 255))
    ),
    mutate_existing=st.booleans(),
    flip=st.integers(0, 10_000),
)
def test_crc_valid_garbage_is_refused_or_decoded(
    layouts: dict[str, Layout],
    scratch: Path,
    name: str,
    target: int,
    record: int,
    rtype: int,
    body: bytes,
    mutate_existing: bool,
    flip: int,
) -> None:
    d = scratch / "d"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(layouts[name].base, d)
    files = wal_files(d) + snap_files(d)
    path = files[target % len(files)]
    raw = path.read_bytes()
    if path.suffix == ".log":
        spans = records(raw)
        start, end = spans[record % len(spans)]
        old = bytearray(raw[start + 8 : end])
        if mutate_existing:  # a plausible payload with one byte changed
            old[flip % len(old)] ^= 1 + flip % 255
            new = bytes(old)
        else:
            new = bytes([rtype]) + body
        path.write_bytes(rewrite_record(raw, record, new))
    else:
        head = struct.Struct("<4sHHIQI")
        magic, version, reserved, meta_len, _, _ = head.unpack_from(raw)
        meta, data = raw[head.size : head.size + meta_len], raw[head.size + meta_len :]
        if mutate_existing:  # one byte of the metadata changed
            changed = bytearray(meta)
            changed[flip % len(changed)] ^= 1 + flip % 255
            meta = bytes(changed)
        else:  # random metadata
            meta = body
        crc = zlib.crc32(data, zlib.crc32(meta))
        path.write_bytes(head.pack(magic, version, reserved, len(meta), len(data), crc) + meta + data)
    try:
        st_, rec = LogStorage.open(d)
    except (StorageCorruptError, StorageFormatError):  # CRC-valid and newer: a refusal too
        return
    with st_:
        check_invariants(rec)


# --- random files ---------------------------------------------------------------------------------------
@FUZZ
@given(
    segments=st.lists(st.binary(max_size=200), min_size=0, max_size=3),
    snapshots=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 5), st.binary(max_size=120)), min_size=0, max_size=2
    ),
)
def test_random_files(scratch: Path, segments: list[bytes], snapshots: list[tuple[int, int, bytes]]) -> None:
    d = scratch / "d"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for seq, data in enumerate(segments, start=1):
        (d / f"wal-{seq:016x}.log").write_bytes(data)
    for index, term, data in snapshots:
        (d / f"snap-{index:016x}-{term:016x}.snap").write_bytes(data)
    try:
        st_, rec = LogStorage.open(d)
    except (StorageCorruptError, StorageFormatError):  # CRC-valid and newer: a refusal too
        return
    with st_:
        check_invariants(rec)
        assert rec.snapshot is None  # random bytes never pass the snapshot checks
        if segments:  # garbage at the end of the only/last segment is a torn tail: dropped; one
            # left with no record at all is headed by the hard state again (and allocated ahead)
            data = (d / f"wal-{len(segments):016x}.log").read_bytes()
            head = hard_state_record(rec.hard_state)
            assert len(data) <= len(segments[-1]) or (
                data.startswith(head) and not data[len(head) :].strip(b"\0")
            )
