"""Address pools and leases: the allocation part of the replicated state machine.

``LeaseTable`` owns the pools, the leases and every index over them; ``StateMachine`` (in
``quorumd.node.registry.state``) owns it, checks membership and drain state first, and turns a
``Rejection`` into an ``ApplyResult``. Pure and deterministic: no clock, no randomness, and
no output depends on set iteration order.

Allocation is lowest-free-address first. A pool keeps a high-water mark (offsets below it
have been handed out at least once) and a min-heap of the released offsets below it, so an
allocation is O(log n) whatever the pool size: pop the heap, or take the high-water mark.
IPv4 pools of /30 or shorter skip the network and broadcast addresses; from cluster protocol 2 on
(``set_protocol``: the rule follows the log, so a mixed cluster allocates alike) IPv6 pools of /126
or shorter skip the subnet-router anycast address (RFC 4291 2.6.1; /127 and /128: RFC 6164).

Lease ids are increasing integers assigned here. Listing is sorted by id with ``after``
pagination. Storage (``quorumd.node.registry.lease_store``): each lease is one ``bytes`` row,
its own snapshot encoding, kept by id in 4096-id chunks; the indices (one each pool, one each
owning node) are sorted id sets in the same chunks, two bytes an id, and each pool maps its
holders to their rows. A page costs O(log n + page size) and decodes only the rows it returns;
allocation and release cost O(log n) plus a move within one chunk; active counts are O(1).
Nothing per lease is a Python object but its row and its holder string (about 200 bytes a
lease in all, against ~400 for a tuple per lease with its fields and dict entries); the
address is derived from the pool's base and the lease's offset when asked for.

Snapshot form (canonical: pools sorted by name, leases by id; free offsets are not stored,
they are derived from the high-water mark and the live offsets on load):
``[next_lease_id, [[name, cidr, created_at, hwm], ...], [[id, pool, offset, holder, node_id,
created_at], ...]]``.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import compress, repeat
from math import isfinite
from typing import Any, NamedTuple

import msgpack
from msgpack import unpackb

from quorumd.node.registry.commands import CommandError, check_float, check_int, check_list, check_str
from quorumd.node.registry.lease_store import CHUNK_BITS, LOW, IdSet, RowStore, array_header
from quorumd.raft.codec import packb

logger = logging.getLogger(__name__)

POOL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_HOLDER_CHARS = 256

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SnapshotError(ValueError):
    """A snapshot could not be decoded or breaks an invariant of the state."""


class Rejection(Exception):
    """A command refused for a deterministic reason; raised before any mutation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_last_rfc3339: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp (second precision, ``Z`` suffix).

    The last second's text is remembered: consecutive leases are mostly created in the same
    second, and formatting a datetime costs more than the rest of a lease's JSON."""
    global _last_rfc3339
    sec = int(ts)
    last_sec, text = _last_rfc3339
    if sec != last_sec:
        text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _last_rfc3339 = (sec, text)
    return text


class AddressSpace:
    """Turns a pool offset into its address text; one per pool, shared by the pool's leases."""

    __slots__ = ("base", "version")

    def __init__(self, base: int, version: int) -> None:
        self.base = base
        self.version = version

    def address(self, offset: int) -> str:
        value = self.base + offset
        if self.version == 4:
            return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"
        return str(ipaddress.IPv6Address(value))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressSpace) and self.base == other.base and self.version == other.version

    def __hash__(self) -> int:
        return hash((self.base, self.version))

    def __repr__(self) -> str:
        return f"AddressSpace(base={self.base}, version={self.version})"


class Lease(NamedTuple):
    """One lease (immutable). ``address`` is derived: ``space`` is the pool's shared
    ``AddressSpace`` and ``offset`` the lease's position in the pool."""

    lease_id: int
    pool: str
    offset: int
    holder: str
    node_id: int
    created_at: float
    space: AddressSpace

    @property
    def address(self) -> str:
        return self.space.address(self.offset)

    @property
    def prefix(self) -> str:
        """The host route a BGP speaker announces for this lease: ``addr/32`` or ``addr/128``."""
        return f"{self.address}/{32 if self.space.version == 4 else 128}"

    def as_dict(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "id": self.lease_id,
            "pool": self.pool,
            "address": self.address,
            "holder": self.holder,
            "nodeId": self.node_id,
            "createdAt": rfc3339(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class PoolInfo:
    name: str
    cidr: str
    capacity: int  # usable addresses
    allocated: int  # live leases
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        """The API shape: ``{name, cidr}`` plus usage."""
        return {
            "name": self.name,
            "cidr": self.cidr,
            "size": self.capacity,
            "allocated": self.allocated,
            "createdAt": rfc3339(self.created_at),
        }


class _Pool:
    __slots__ = ("capacity", "created_at", "free", "holders", "hwm", "index", "name", "network", "space",
                 "span")  # fmt: skip

    def __init__(self, name: str, network: IPNetwork, created_at: float) -> None:
        self.name = name
        self.network = network
        self.created_at = created_at
        skip_edges = network.version == 4 and network.prefixlen <= 30
        self.space = AddressSpace(int(network.network_address) + (1 if skip_edges else 0), network.version)
        self.span = network.num_addresses - (2 if skip_edges else 0)  # offsets [0, span)
        self.set_rule(1)  # capacity: how many can be handed out (offsets [span - capacity, span))
        self.hwm = 0  # offsets [0, hwm) have been handed out at least once
        self.free: list[int] = []  # min-heap of released offsets < hwm
        self.holders: dict[str, bytes] = {}  # holder -> the lease's row
        self.index = IdSet()  # the pool's lease ids

    def set_rule(self, protocol: int) -> None:  # from protocol 2 on, IPv6 /126 and shorter skip offset 0
        skip = protocol >= 2 and self.network.version == 6 and self.network.prefixlen <= 126
        self.capacity = self.span - (1 if skip else 0)  # the API's ``size``

    def info(self) -> PoolInfo:
        return PoolInfo(self.name, str(self.network), self.capacity, len(self.index), self.created_at)


def parse_cidr(cidr: str) -> IPNetwork:
    """Strict CIDR parse (host bits must be zero); raises ``Rejection('invalid_cidr')``."""
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise Rejection("invalid_cidr", f"invalid CIDR {cidr!r}: {exc}") from None


_INVERT = bytes.maketrans(b"\x00\x01", b"\x01\x00")
_new = tuple.__new__


class LeaseTable:
    """Pools, leases and their indices. Mutators raise ``Rejection`` before changing anything."""

    __slots__ = ("_by_node", "_next_id", "_pools", "_protocol", "_rows")

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._rows = RowStore()  # lease id -> row (lease_store's module docstring)
        self._by_node: dict[int, IdSet] = {}
        self._next_id = 1
        self._protocol = 1  # the cluster protocol version: selects the allocation rule

    # --- queries ---------------------------------------------------------------------------

    def pools(self) -> list[PoolInfo]:
        return [self._pools[name].info() for name in sorted(self._pools)]

    def pool(self, name: str) -> PoolInfo | None:
        p = self._pools.get(name)
        return None if p is None else p.info()

    def lease(self, lease_id: int) -> Lease | None:
        row = self._rows.get(lease_id)
        return None if row is None else self._lease(row)

    def lease_count(self) -> int:
        return len(self._rows)

    def active_count(self, node_id: int) -> int:
        idx = self._by_node.get(node_id)
        return 0 if idx is None else len(idx)

    def owners(self) -> list[int]:
        """Node ids that own at least one lease, sorted."""
        return sorted(self._by_node)

    def leases(
        self,
        *,
        node_id: int | None = None,
        pool: str | None = None,
        limit: int = 1000,
        after: int | None = None,
    ) -> list[Lease]:
        """Leases sorted by id, filtered by owner and/or pool, ids > ``after``, at most ``limit``."""
        if limit <= 0:
            return []
        pool_filter: str | None = None  # only when the owner index is the one walked
        rows: Iterator[bytes]
        if node_id is not None:
            idx = self._by_node.get(node_id)
            if idx is None:
                return []
            rows, pool_filter = self._rows.rows_of(idx, after), pool
        elif pool is not None:
            p = self._pools.get(pool)
            if p is None:
                return []
            rows = self._rows.rows_of(p.index, after)
        else:  # one decoding call for the page: its rows joined behind an array header
            page = self._rows.take_from(after, limit)
            spaces = {name: p.space for name, p in self._pools.items()}
            decoded = unpackb(array_header(len(page)) + b"".join(page))
            for r in decoded:
                r.append(spaces[r[1]])
            return list(map(_new, repeat(Lease, len(decoded)), decoded))
        out: list[Lease] = []
        spaces = {name: p.space for name, p in self._pools.items()}
        for row in rows:
            r = unpackb(row)
            if pool_filter is None or r[1] == pool_filter:
                r.append(spaces[r[1]])
                out.append(_new(Lease, r))  # a Lease from the decoded row, without a call per field
                if len(out) >= limit:
                    break
        return out

    def next_lease_id(self) -> int:
        """The id the next new lease gets: ids only grow, so every lease with an id from here
        on is allocated after this call."""
        return self._next_id

    def announced_prefixes(self, node_id: int) -> list[str]:
        """``addr/32`` or ``addr/128`` for each lease the node owns, in lease id order."""
        idx = self._by_node.get(node_id)
        if idx is None:
            return []
        pools = self._pools
        out: list[str] = []
        for row in self._rows.rows_of(idx):
            r = unpackb(row)
            space = pools[r[1]].space
            out.append(f"{space.address(r[2])}/{32 if space.version == 4 else 128}")
        return out

    # --- mutators ----------------------------------------------------------------------------

    def set_protocol(self, protocol: int) -> None:  # the allocation rule of that cluster protocol
        self._protocol = protocol
        for p in self._pools.values():
            p.set_rule(protocol)

    def create_pool(self, name: str, cidr: str, ts: float) -> PoolInfo:
        if not POOL_NAME_RE.fullmatch(name):
            raise Rejection("invalid_argument", "pool name must be 1-63 of [A-Za-z0-9_.-]")
        if name in self._pools:
            raise Rejection("pool_exists", f"pool {name!r} already exists")
        network = parse_cidr(cidr)
        for other in self._sorted_pools():
            if other.network.version == network.version and other.network.overlaps(network):
                raise Rejection("pool_overlap", f"{network} overlaps pool {other.name!r}")
        p = _Pool(name, network, ts)
        p.set_rule(self._protocol)
        if p.capacity <= 0:  # pragma: no cover - every network has at least one usable address
            raise Rejection("invalid_cidr", f"{network} has no usable address")
        self._pools[name] = p
        logger.info("pool_created name=%s cidr=%s", name, network)
        return p.info()

    def delete_pool(self, name: str) -> PoolInfo:
        p = self._pools.get(name)
        if p is None:
            raise Rejection("unknown_pool", f"unknown pool {name!r}")
        if len(p.index):
            raise Rejection("pool_in_use", f"pool {name!r} has {len(p.index)} active leases")
        del self._pools[name]
        logger.info("pool_deleted name=%s", name)
        return p.info()

    def allocate(self, pool: str, holder: str, node_id: int, ts: float) -> Lease:
        """Lowest free address of ``pool`` for ``holder``; the same (pool, holder) returns the
        existing lease, re-owned to ``node_id``. The caller has checked the node."""
        p = self._pools.get(pool)
        if p is None:
            raise Rejection("unknown_pool", f"unknown pool {pool!r}")
        if not holder or len(holder) > MAX_HOLDER_CHARS:
            raise Rejection("invalid_argument", f"holder must be 1-{MAX_HOLDER_CHARS} characters")
        existing = p.holders.get(holder)
        if existing is not None:
            lease_id, name, offset, held_by, old_owner, created_at = unpackb(existing)
            if old_owner != node_id:
                row = packb((lease_id, name, offset, held_by, node_id, created_at))
                self._rows.replace(lease_id, row)
                p.holders[holder] = row
                self._node_discard(old_owner, lease_id)
                self._node_index(node_id).add(lease_id)
            return Lease(lease_id, name, offset, held_by, node_id, created_at, p.space)
        first = p.span - p.capacity  # the lowest offset handed out
        while p.free and p.free[0] < first:  # released before the rule changed: never again
            heapq.heappop(p.free)
        if p.free:
            offset = heapq.heappop(p.free)
        elif (offset := max(p.hwm, first)) < p.span:
            p.hwm = offset + 1
        else:
            raise Rejection("pool_exhausted", f"pool {pool!r} has no free address")
        lease_id = self._next_id
        self._next_id += 1
        row = packb((lease_id, pool, offset, holder, node_id, ts))
        self._rows.append(lease_id, row)
        p.holders[holder] = row
        p.index.add(lease_id)
        self._node_index(node_id).add(lease_id)
        return Lease(lease_id, pool, offset, holder, node_id, ts, p.space)

    def release(self, lease_id: int) -> Lease:
        row = self._rows.pop(lease_id)
        if row is None:
            raise Rejection("unknown_lease", f"unknown lease {lease_id}")
        _, pool, offset, holder, node_id, created_at = unpackb(row)
        p = self._pools[pool]
        del p.holders[holder]
        p.index.discard(lease_id)
        self._node_discard(node_id, lease_id)
        heapq.heappush(p.free, offset)
        return Lease(lease_id, pool, offset, holder, node_id, created_at, p.space)

    def purge_node(self, node_id: int) -> int:
        """Release every lease ``node_id`` owns; returns how many."""
        idx = self._by_node.get(node_id)
        if idx is None:
            return 0
        ids = list(idx.iter_from(None))
        for lease_id in ids:
            self.release(lease_id)
        return len(ids)

    # --- snapshot ----------------------------------------------------------------------------

    def dump(self) -> list[Any]:
        pools = [[p.name, str(p.network), p.created_at, p.hwm] for p in self._sorted_pools()]
        leases = [unpackb(row) for row in self._rows.rows_from(None)]
        return [self._next_id, pools, leases]

    def packed_dump(self) -> bytes:
        """``msgpack.packb(self.dump(), use_bin_type=True)``, byte for byte, without encoding
        any lease: each row already is its lease's encoding (tests/test_state.py compares)."""
        return b"".join(self.packed_dump_parts())

    def packed_dump_parts(self) -> list[bytes]:
        """``packed_dump()`` as pieces: the head, then one piece per 4096-id chunk (its rows
        joined, ~1 ms per 100,000 leases)."""
        pools = [[p.name, str(p.network), p.created_at, p.hwm] for p in self._sorted_pools()]
        head = b"\x93" + packb(self._next_id) + packb(pools) + array_header(len(self._rows))
        return [head, *map(b"".join, self._rows.chunk_rows())]

    def encode_dirty_chunks(self, max_chunks: int) -> int:
        """What ``packed_dump`` leaves to do beforehand: nothing (the rows are the encoding);
        kept for callers that prepare a snapshot in steps. Always 0."""
        return 0

    @classmethod
    def load(cls, obj: object) -> LeaseTable:
        """Rebuild from ``dump()`` output; raises ``SnapshotError`` on any inconsistency."""
        table, n, leases = cls._load_head(obj)
        return table._load_rows(n, iter(leases))

    @classmethod
    def load_stream(cls, unpacker: msgpack.Unpacker) -> LeaseTable:
        """Rebuild from an ``Unpacker`` positioned at ``dump()``'s encoding: the lease rows are
        decoded one at a time (a million of them never exist as decoded objects at once)."""
        try:
            if unpacker.read_array_header() != 3:
                raise SnapshotError("lease table: expected 3 items")
            head = [unpacker.unpack(), unpacker.unpack(), []]
            table, _, _ = cls._load_head(head)
            n = unpacker.read_array_header()
        except (msgpack.UnpackException, ValueError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"lease table: undecodable ({type(exc).__name__})") from None
        return table._load_rows(n, (unpacker.unpack() for _ in range(n)))

    @classmethod
    def _load_head(cls, obj: object) -> tuple[LeaseTable, int, list[Any]]:
        try:
            next_id_raw, pools_raw, leases_raw = check_list(obj, "lease table", 3)
            leases = check_list(leases_raw, "leases")
            table = cls()
            table._next_id = check_int(next_id_raw, "next_lease_id")
            if table._next_id < 1:
                raise SnapshotError("next_lease_id < 1")
            prev_name: str | None = None
            for item in check_list(pools_raw, "pools"):
                name_raw, cidr_raw, created_raw, hwm_raw = check_list(item, "pool", 4)
                name = check_str(name_raw, "pool name")
                if prev_name is not None and name <= prev_name:
                    raise SnapshotError("pools not sorted by name")
                prev_name = name
                table.create_pool(name, check_str(cidr_raw, "cidr"), check_float(created_raw, "created_at"))
                p = table._pools[name]
                if str(p.network) != cidr_raw:
                    raise SnapshotError(f"pool {name!r}: non-canonical cidr")
                hwm = check_int(hwm_raw, "hwm")
                if not 0 <= hwm <= p.span:
                    raise SnapshotError(f"pool {name!r}: hwm out of range")
                p.hwm = hwm
        except (CommandError, Rejection) as exc:
            raise SnapshotError(f"lease table: {exc}") from None
        return table, len(leases), leases

    def _load_rows(self, n: int, items: Iterator[Any]) -> LeaseTable:
        try:
            self._fill(n, items)
        except (CommandError, Rejection) as exc:
            raise SnapshotError(f"lease table: {exc}") from None
        except (msgpack.UnpackException, ValueError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"lease table: undecodable ({type(exc).__name__})") from None
        return self

    def _fill(self, n: int, items: Iterator[Any]) -> None:
        """Validate and add ``n`` rows in id order. The indices are built chunk by chunk here
        (the per-call path, ``IdSet.add``, costs more than the rest of a row's work)."""
        pools = self._pools
        taken = {name: bytearray(p.hwm) for name, p in pools.items()}  # offset -> 1 once seen
        pool_chunks: dict[str, dict[int, array[int]]] = {name: {} for name in pools}
        node_chunks: dict[int, dict[int, array[int]]] = {}
        counts: dict[int, int] = {}
        row_chunks: dict[int, tuple[array[int], list[bytes]]] = {}
        pack = msgpack.Packer(use_bin_type=True).pack
        prev_id, chunk = 0, -1
        lows: array[int] = array("H")
        rows: list[bytes] = []
        next_id = self._next_id
        for _ in range(n):
            item = next(items)
            if type(item) is not list or len(item) != 6:
                check_list(item, "lease", 6)  # raises with the usual message
            lease_id, pool, offset, holder, node_id, created_at = item
            # Exact type checks first (the common, valid case), the shared checkers for the message.
            if type(lease_id) is not int:
                lease_id = check_int(lease_id, "lease id")
            if not prev_id < lease_id < next_id:
                raise SnapshotError("lease ids not increasing or not below next_lease_id")
            prev_id = lease_id
            p_or_none = pools.get(pool) if type(pool) is str else None
            if p_or_none is None:
                check_str(pool, "lease pool")
                raise SnapshotError(f"lease {lease_id}: unknown pool")
            p = p_or_none
            if type(offset) is not int:
                offset = check_int(offset, "offset")
            seen = taken[pool]
            if not 0 <= offset < p.hwm or seen[offset]:
                raise SnapshotError(f"lease {lease_id}: bad or duplicate offset")
            seen[offset] = 1
            if type(holder) is not str:
                holder = check_str(holder, "holder")
            if type(node_id) is not int:
                node_id = check_int(node_id, "node_id")
            if type(created_at) is not float or not isfinite(created_at):
                created_at = check_float(created_at, "created_at")
            row = pack((lease_id, p.name, offset, holder, node_id, created_at))
            if not holder or p.holders.setdefault(holder, row) is not row:
                raise SnapshotError(f"lease {lease_id}: empty or duplicate holder")
            low = lease_id & LOW
            if lease_id >> CHUNK_BITS != chunk:
                chunk = lease_id >> CHUNK_BITS
                lows, rows = row_chunks[chunk] = (array("H"), [])
            lows.append(low)
            rows.append(row)
            by_chunk = pool_chunks[pool]
            if (ids := by_chunk.get(chunk)) is None:
                ids = by_chunk[chunk] = array("H")
            ids.append(low)
            if (nodes := node_chunks.get(node_id)) is None:
                nodes = node_chunks[node_id] = {}
                counts[node_id] = 0
            if (ids := nodes.get(chunk)) is None:
                ids = nodes[chunk] = array("H")
            ids.append(low)
            counts[node_id] += 1
        self._rows.fill(row_chunks, n)
        for name, p in pools.items():  # offsets below hwm not held: sorted, hence a valid heap
            p.index.fill(pool_chunks[name], len(p.holders))
            p.free = list(compress(range(p.hwm), taken[name].translate(_INVERT)))
        for node_id, nodes in node_chunks.items():
            self._node_index(node_id).fill(nodes, counts[node_id])

    # --- internals ---------------------------------------------------------------------------

    def _lease(self, row: bytes) -> Lease:
        r = unpackb(row)
        r.append(self._pools[r[1]].space)
        return _new(Lease, r)

    def _sorted_pools(self) -> list[_Pool]:
        return [self._pools[name] for name in sorted(self._pools)]

    def _node_index(self, node_id: int) -> IdSet:
        idx = self._by_node.get(node_id)
        if idx is None:
            idx = self._by_node[node_id] = IdSet()
        return idx

    def _node_discard(self, node_id: int, lease_id: int) -> None:
        idx = self._by_node[node_id]
        idx.discard(lease_id)
        if not len(idx):
            del self._by_node[node_id]
