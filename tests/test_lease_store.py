"""The lease table's compact storage (node/registry/lease_store.py) against plain models, and the
memory a lease costs in the table."""

from __future__ import annotations

import gc
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.node.registry.lease_store import CHUNK, IdSet, RowStore
from quorumd.node.registry.leases import LeaseTable, SnapshotError

# ids around chunk boundaries and far apart, so chunks appear, fill and disappear
_IDS = st.one_of(
    st.integers(1, 3 * CHUNK), st.integers(10 * CHUNK - 3, 10 * CHUNK + 3), st.integers(1, 10**7)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _IDS), max_size=200), st.one_of(st.none(), _IDS))
def test_id_set_matches_a_set(ops: list[tuple[bool, int]], after: int | None) -> None:
    ids, model = IdSet(), set[int]()
    for add, lease_id in ops:
        if add and lease_id not in model:
            ids.add(lease_id)
            model.add(lease_id)
        elif not add and lease_id in model:
            ids.discard(lease_id)
            model.discard(lease_id)
        assert len(ids) == len(model)
    assert list(ids.iter_from(None)) == sorted(model)
    assert list(ids.iter_from(after)) == sorted(i for i in model if after is None or i > after)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("apr"), st.integers(1, 4 * CHUNK)), max_size=200), _IDS)
def test_row_store_matches_a_dict(ops: list[tuple[str, int]], after: int) -> None:
    """Appends in increasing id order (as lease ids grow), replacements and removals."""
    store, model, next_id = RowStore(), dict[int, bytes](), 1
    for kind, k in ops:
        if kind == "a":
            next_id += k % 5000
            store.append(next_id, b"%d" % next_id)
            model[next_id] = b"%d" % next_id
            next_id += 1
        elif model:
            victim = sorted(model)[k % len(model)]
            if kind == "p":
                assert store.pop(victim) == model.pop(victim)
            else:
                store.replace(victim, b"r%d" % k)
                model[victim] = b"r%d" % k
        assert store.pop(k + 10**8) is None  # absent: nothing changes
        assert len(store) == len(model)
    for lease_id in [*model, after, after + 1]:
        assert store.get(lease_id) == model.get(lease_id)
    assert list(store.rows_from(None)) == [model[i] for i in sorted(model)]
    assert list(store.rows_from(after)) == [model[i] for i in sorted(model) if i > after]
    assert [r for rows in store.chunk_rows() for r in rows] == [model[i] for i in sorted(model)]
    for limit in (1, 7, CHUNK + 1):
        assert store.take_from(after, limit) == [model[i] for i in sorted(model) if i > after][:limit]
    some = IdSet()
    for i in sorted(model)[::3]:
        some.add(i)
    assert list(store.rows_of(some, after)) == [model[i] for i in sorted(model)[::3] if i > after]
    if model:
        with pytest.raises(ValueError, match="increasing"):
            store.append(max(model), b"again")


def _big_table(n: int) -> LeaseTable:
    table = LeaseTable()
    table.create_pool("a", "10.0.0.0/12", 1.0)
    table.create_pool("b", "10.16.0.0/12", 1.0)
    for i in range(n):
        table.allocate("ab"[i % 2], f"w{i % 2 + 1}-{i}", 1 + i % 3, 1700000000.0 + i * 1e-5)
    return table


def test_a_lease_costs_under_250_bytes_allocated_or_restored() -> None:
    """Python's own allocations for the table (tracemalloc, deterministic), built by allocation
    and rebuilt from its snapshot encoding as a restore does: the row, the holder string, a
    share of the dicts and arrays. This build: ~160; a tuple per lease with its fields and a
    snapshot cache cost ~365."""
    n = 40_000
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        table = _big_table(n)
        allocated = (tracemalloc.get_traced_memory()[0] - base) / n
        data = table.packed_dump()
        del table
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        again = LeaseTable.load_stream(unpacker)
        del unpacker
        restored = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert again.lease_count() == n and again.packed_dump() == data
    assert allocated < 250 and restored < 250, (allocated, restored)


def test_stream_load_refuses_a_short_or_malformed_lease_list() -> None:
    data = _big_table(10).packed_dump()
    for bad in (data[:-5], data[:3] + b"\xc1" + data[4:]):
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(bad)
        with pytest.raises(SnapshotError):
            LeaseTable.load_stream(unpacker)
