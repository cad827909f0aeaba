"""Compact storage for the lease table: rows by id and sorted id sets.

A node may hold millions of leases, so the table keeps no Python object per lease beyond one
``bytes`` row and its holder string (the holder index's key). Ids live in 4096-id chunks
(``id >> CHUNK_BITS``): each chunk keeps the low 12 bits of its ids in a sorted ``array('H')``
(2 bytes an id), and a ``RowStore`` chunk keeps a parallel list of rows. A chunk disappears with
its last id, so there are no tombstones, nothing to compact and no pause that grows with the
table; an insert or a delete moves at most one chunk's array (a few kilobytes).

A row is the lease's snapshot encoding, ``msgpack([id, pool, offset, holder, node_id,
created_at])``, so a snapshot of the lease list is the rows joined in id order (no encoding
at snapshot time), and a query decodes only the rows it returns.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator

CHUNK_BITS = 12
CHUNK = 1 << CHUNK_BITS
LOW = CHUNK - 1


class IdSet:
    """A set of lease ids, iterated in increasing order (see the module docstring)."""

    __slots__ = ("_chunks", "_count", "_keys")

    def __init__(self) -> None:
        self._chunks: dict[int, array[int]] = {}
        self._keys: list[int] = []  # chunk numbers, sorted
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, lease_id: int) -> None:
        """Add an id that is not in the set."""
        c = lease_id >> CHUNK_BITS
        low = lease_id & LOW
        arr = self._chunks.get(c)
        if arr is None:
            self._chunks[c] = array("H", (low,))
            keys = self._keys
            if not keys or keys[-1] < c:
                keys.append(c)
            else:
                insort(keys, c)
        elif arr[-1] < low:
            arr.append(low)
        else:
            arr.insert(bisect_left(arr, low), low)
        self._count += 1

    def discard(self, lease_id: int) -> None:
        """Remove an id that is in the set."""
        c = lease_id >> CHUNK_BITS
        arr = self._chunks[c]
        del arr[bisect_left(arr, lease_id & LOW)]
        self._count -= 1
        if not arr:
            del self._chunks[c]
            del self._keys[bisect_left(self._keys, c)]

    def fill(self, chunks: dict[int, array[int]], count: int) -> None:
        """Set the contents of an empty set: ``chunks`` holds each chunk's sorted low bits."""
        self._chunks = chunks
        self._keys = sorted(chunks)
        self._count = count

    def chunks_from(self, after: int | None) -> Iterator[tuple[int, array[int]]]:
        """(chunk number, low bits greater than ``after``'s) in order; do not mutate meanwhile."""
        keys, chunks = self._keys, self._chunks
        if after is None:
            for c in keys:
                yield c, chunks[c]
            return
        first = after >> CHUNK_BITS
        k = bisect_left(keys, first)
        if k < len(keys) and keys[k] == first:
            arr = chunks[first]
            yield first, arr[bisect_right(arr, after & LOW) :]
            k += 1
        for i in range(k, len(keys)):
            c = keys[i]
            yield c, chunks[c]

    def iter_from(self, after: int | None) -> Iterator[int]:
        """Ids greater than ``after`` in increasing order (do not mutate while iterating)."""
        for c, lows in self.chunks_from(after):
            base = c << CHUNK_BITS
            for low in lows:
                yield base + low


class RowStore:
    """Lease id -> row, in id order. Ids are added in increasing order only (lease ids grow)."""

    __slots__ = ("_chunks", "_count", "_keys")

    def __init__(self) -> None:
        self._chunks: dict[int, tuple[array[int], list[bytes]]] = {}
        self._keys: list[int] = []  # chunk numbers, sorted
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def fill(self, chunks: dict[int, tuple[array[int], list[bytes]]], count: int) -> None:
        """Set the contents of an empty store: each chunk's sorted low bits and their rows."""
        self._chunks = chunks
        self._keys = sorted(chunks)
        self._count = count

    def get(self, lease_id: int) -> bytes | None:
        ch = self._chunks.get(lease_id >> CHUNK_BITS)
        if ch is None:
            return None
        lows, rows = ch
        low = lease_id & LOW
        j = bisect_left(lows, low)
        if j < len(lows) and lows[j] == low:
            return rows[j]
        return None

    def append(self, lease_id: int, row: bytes) -> None:
        """Add a row for an id greater than every id held."""
        c = lease_id >> CHUNK_BITS
        ch = self._chunks.get(c)
        if ch is None:
            if self._keys and self._keys[-1] > c:
                raise ValueError("lease ids must be appended in increasing order")
            ch = self._chunks[c] = (array("H"), [])
            self._keys.append(c)
        elif ch[0][-1] >= lease_id & LOW:
            raise ValueError("lease ids must be appended in increasing order")
        ch[0].append(lease_id & LOW)
        ch[1].append(row)
        self._count += 1

    def replace(self, lease_id: int, row: bytes) -> None:
        """Replace the row of an id that is held."""
        lows, rows = self._chunks[lease_id >> CHUNK_BITS]
        rows[bisect_left(lows, lease_id & LOW)] = row

    def pop(self, lease_id: int) -> bytes | None:
        """Remove and return the row of ``lease_id`` (None, and nothing changed, if absent)."""
        c = lease_id >> CHUNK_BITS
        ch = self._chunks.get(c)
        if ch is None:
            return None
        lows, rows = ch
        low = lease_id & LOW
        j = bisect_left(lows, low)
        if j == len(lows) or lows[j] != low:
            return None
        del lows[j]
        row = rows.pop(j)
        self._count -= 1
        if not lows:
            del self._chunks[c]
            del self._keys[bisect_left(self._keys, c)]
        return row

    def _after(self, after: int | None) -> tuple[int, list[bytes], int]:
        """Where the ids greater than ``after`` begin: the index in ``_keys`` of the first chunk
        wholly after it, and the rows of the chunk holding ``after`` (empty when none) with the
        position in them of the first greater id."""
        if after is None:
            return 0, [], 0
        keys, first = self._keys, after >> CHUNK_BITS
        k = bisect_left(keys, first)
        if k < len(keys) and keys[k] == first:
            lows, rows = self._chunks[first]
            return k + 1, rows, bisect_right(lows, after & LOW)
        return k, [], 0

    def rows_from(self, after: int | None) -> Iterator[bytes]:
        """Rows of ids greater than ``after``, in id order (do not mutate while iterating)."""
        keys, chunks = self._keys, self._chunks
        k, rows, start = self._after(after)
        yield from rows[start:]
        for i in range(k, len(keys)):
            yield from chunks[keys[i]][1]

    def take_from(self, after: int | None, limit: int) -> list[bytes]:
        """At most ``limit`` rows of ids greater than ``after``, in id order (list slices)."""
        keys, chunks = self._keys, self._chunks
        k, rows, start = self._after(after)
        out = rows[start : start + limit]
        while len(out) < limit and k < len(keys):
            out += chunks[keys[k]][1][: limit - len(out)]
            k += 1
        return out

    def rows_of(self, ids: IdSet, after: int | None = None) -> Iterator[bytes]:
        """Rows of the ids in ``ids`` greater than ``after`` (all held here), in id order."""
        chunks = self._chunks
        for c, wanted in ids.chunks_from(after):
            lows, rows = chunks[c]
            j = 0
            for low in wanted:
                j = bisect_left(lows, low, j)
                yield rows[j]

    def chunk_rows(self) -> list[list[bytes]]:
        """Each chunk's rows, chunks in id order (the lists themselves: do not mutate)."""
        chunks = self._chunks
        return [chunks[c][1] for c in self._keys]


def array_header(n: int) -> bytes:
    """msgpack's header of an n-element array."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")
