"""Child process for the storage kill test (tests/test_storage.py::test_crash_recovery).

Usage: python storage_crash_child.py DATA_DIR SEED

Opens the storage (recovering whatever the previous, SIGKILLed, incarnation left), verifies the
recovered log, prints ``ready <last_index>``, then loops forever over seeded random operations,
announcing each one before doing it and acknowledging it once it is durable:

- ``batch <first_index> <crc,crc,...>``: append entries (sometimes rewriting the tail), set the
  hard state, sync;
- ``snap <index> <crc>``: save a local snapshot at an existing index, then compact;
- ``install <index> <crc>``: install a "leader" snapshot beyond the log;
- ``acked <last_index> <crc>`` after each operation, where ``crc`` is the CRC32 of the data of the
  entry at ``last_index`` (or of the snapshot data when the log is empty after the snapshot).

Entry data is ``<u64 index><random bytes>``; snapshot data is ``<u64 index><u32 crc>`` where
``crc`` is the CRC32 of the entry data the snapshot stands for.
"""

from __future__ import annotations

import random
import struct
import sys
import zlib
from pathlib import Path

from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.core.types import Configuration, Entry, HardState, Snapshot, SnapshotMeta

SEGMENT_BYTES = 16 << 10
CONFIG = Configuration(frozenset({1, 2, 3}))


def snapshot_crc(snapshot: Snapshot) -> int:
    index, crc = struct.unpack("<QI", snapshot.data)
    if index != snapshot.meta.index:
        raise SystemExit(f"snapshot data index {index} != meta index {snapshot.meta.index}")
    return int(crc)


def main() -> None:
    directory, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    storage, rec = LogStorage.open(directory, segment_bytes=SEGMENT_BYTES)
    snap_index = rec.snapshot.meta.index if rec.snapshot else 0
    expected = snap_index + 1
    datas: dict[int, bytes] = {}
    for e in rec.entries:
        if e.index != expected or struct.unpack_from("<Q", e.data)[0] != e.index:
            raise SystemExit(f"recovered log broken at {e.index} (expected {expected})")
        datas[e.index] = e.data
        expected += 1
    last = storage.last_index
    snap_crc = snapshot_crc(rec.snapshot) if rec.snapshot else 0
    term = max(rec.hard_state.term, storage.last_term, 1)
    out = sys.stdout
    out.write(f"ready {last}\n")
    out.flush()

    def ack() -> None:
        crc = zlib.crc32(datas[last]) if last in datas else snap_crc
        out.write(f"acked {last} {crc}\n")
        out.flush()

    for _ in range(100_000):  # bounded, in case the parent forgets us
        roll = rng.random()
        if roll < 0.08 and last > storage.first_index:
            index = rng.randrange(storage.first_index, last + 1)
            snap_crc = zlib.crc32(datas[index])
            out.write(f"snap {index} {snap_crc}\n")
            out.flush()
            snap = Snapshot(
                SnapshotMeta(index, storage.term(index) or 0, CONFIG), struct.pack("<QI", index, snap_crc)
            )
            storage.save_snapshot(snap)
            storage.compact(index - rng.randrange(0, 50) if index > 50 else index)
            for i in [i for i in datas if i <= index]:
                del datas[i]
        elif roll < 0.10:
            index = last + rng.randrange(1, 20)
            term += 1
            snap_crc = rng.getrandbits(32)
            out.write(f"install {index} {snap_crc}\n")
            out.flush()
            storage.install_snapshot(
                Snapshot(SnapshotMeta(index, term, CONFIG), struct.pack("<QI", index, snap_crc))
            )
            datas.clear()
            last = index
        else:
            first = last + 1
            if rng.random() < 0.15 and last >= storage.first_index:
                first = rng.randrange(max(storage.first_index, last - 5), last + 1)
                term += 1
            batch = [
                Entry(term, i, data=struct.pack("<Q", i) + rng.randbytes(rng.randrange(0, 300)))
                for i in range(first, first + rng.randrange(1, 40))
            ]
            crcs = ",".join(str(zlib.crc32(e.data)) for e in batch)
            out.write(f"batch {first} {crcs}\n")
            out.flush()
            storage.append(batch)
            storage.set_hard_state(HardState(term, 1, batch[-1].index))
            storage.sync()
            for i in [i for i in datas if i >= first]:
                del datas[i]
            datas.update((e.index, e.data) for e in batch)
            last = batch[-1].index
        ack()


if __name__ == "__main__":
    main()
