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
pagination through ``_IdIndex``: a sorted id list (appends are the common case since ids
increase) with lazy deletion (a released or moved id stays as a tombstone, recognised by a
membership test against the lease itself, until tombstones outnumber live ids, then the list is
compacted), so neither allocation nor release costs O(n) per call in the common path, and a page
costs O(log n + page size) amortized. One index covers all leases, one each pool, one each owning
node; each keeps a live count, so active counts are O(1).

Memory: a node may hold hundreds of thousands of leases, so a lease is one small tuple (its
address is derived from the pool's base and the lease's offset when asked for, not stored) and
the indices hold only id lists, not sets.

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
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from math import isfinite
from typing import Any, NamedTuple

from quorumd.node.registry.commands import CommandError, check_float, check_int, check_list, check_str
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


class _IdIndex:
    """Sorted lease ids with lazy deletion (see the module docstring).

    ``live(id)`` says whether an id listed here still belongs to the index (the lease exists and
    is in this pool / owned by this node). The table calls ``add`` only for an id that is not
    live here and ``discard`` only for one that was, after updating the lease itself."""

    __slots__ = ("_count", "_ids", "_live")

    def __init__(self, live: Callable[[int], bool]) -> None:
        self._ids: list[int] = []
        self._count = 0
        self._live = live

    def __len__(self) -> int:
        return self._count

    def fill(self, sorted_ids: list[int]) -> None:
        """Set the contents of an empty index to ``sorted_ids`` (all live, increasing)."""
        self._ids = sorted_ids
        self._count = len(sorted_ids)

    def add(self, lease_id: int) -> None:
        self._count += 1
        ids = self._ids
        if not ids or ids[-1] < lease_id:
            ids.append(lease_id)
            return
        pos = bisect_left(ids, lease_id)
        if pos == len(ids) or ids[pos] != lease_id:  # else: a tombstone comes back to life
            ids.insert(pos, lease_id)

    def discard(self, lease_id: int) -> None:
        self._count -= 1
        if len(self._ids) > 2 * self._count + 32:
            live = self._live
            self._ids = [i for i in self._ids if live(i)]

    def iter_from(self, after: int | None) -> Iterator[int]:
        """Live ids greater than ``after`` in increasing order (do not mutate while iterating)."""
        ids, live = self._ids, self._live
        start = 0 if after is None else bisect_right(ids, after)
        for k in range(start, len(ids)):
            lease_id = ids[k]
            if live(lease_id):
                yield lease_id


class _Pool:
    __slots__ = ("capacity", "created_at", "free", "holders", "hwm", "index", "name", "network", "space",
                 "span")  # fmt: skip

    def __init__(self, name: str, network: IPNetwork, created_at: float, leases: dict[int, Lease]) -> None:
        self.name = name
        self.network = network
        self.created_at = created_at
        skip_edges = network.version == 4 and network.prefixlen <= 30
        self.space = AddressSpace(int(network.network_address) + (1 if skip_edges else 0), network.version)
        self.span = network.num_addresses - (2 if skip_edges else 0)  # offsets [0, span)
        self.set_rule(1)  # capacity: how many can be handed out (offsets [span - capacity, span))
        self.hwm = 0  # offsets [0, hwm) have been handed out at least once
        self.free: list[int] = []  # min-heap of released offsets < hwm
        self.holders: dict[str, int] = {}  # holder -> lease id

        def live(lease_id: int) -> bool:
            lease = leases.get(lease_id)
            return lease is not None and lease.pool == name

        self.index = _IdIndex(live)

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


_CHUNK_BITS = 12
_CHUNK = 1 << _CHUNK_BITS


def _array_header(n: int) -> bytes:
    """msgpack's header of an n-element array."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _array_header_size(n: int) -> int:
    return 1 if n < 16 else 3 if n < 0x10000 else 5


class LeaseTable:
    """Pools, leases and their indices. Mutators raise ``Rejection`` before changing anything."""

    __slots__ = ("_all", "_by_node", "_dirty", "_leases", "_next_id", "_packed", "_pools", "_protocol")

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._leases: dict[int, Lease] = {}
        self._all = _IdIndex(self._leases.__contains__)
        self._by_node: dict[int, _IdIndex] = {}
        self._next_id = 1
        self._protocol = 1  # the cluster protocol version: selects the allocation rule
        # Snapshot encoding cache (see packed_dump): chunk -> the msgpack encoding of its leases,
        # and the chunks changed since they were encoded.
        self._packed: dict[int, bytes] = {}
        self._dirty: set[int] = set()

    # --- queries ---------------------------------------------------------------------------

    def pools(self) -> list[PoolInfo]:
        return [self._pools[name].info() for name in sorted(self._pools)]

    def pool(self, name: str) -> PoolInfo | None:
        p = self._pools.get(name)
        return None if p is None else p.info()

    def lease(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def lease_count(self) -> int:
        return len(self._leases)

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
        if node_id is not None:
            idx = self._by_node.get(node_id)
            pool_filter = pool
        elif pool is not None:
            p = self._pools.get(pool)
            idx = None if p is None else p.index
        else:
            idx = self._all
        if idx is None:
            return []
        out: list[Lease] = []
        for lease_id in idx.iter_from(after):
            lease = self._leases[lease_id]
            if pool_filter is None or lease.pool == pool_filter:
                out.append(lease)
                if len(out) >= limit:
                    break
        return out

    def announced_prefixes(self, node_id: int) -> list[str]:
        """``addr/32`` or ``addr/128`` for each lease the node owns, in lease id order."""
        idx = self._by_node.get(node_id)
        if idx is None:
            return []
        return [self._leases[i].prefix for i in idx.iter_from(None)]

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
        p = _Pool(name, network, ts, self._leases)
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
            lease = self._leases[existing]
            if lease.node_id != node_id:
                old_owner = lease.node_id
                lease = lease._replace(node_id=node_id)
                self._leases[existing] = lease
                self._dirty.add(existing >> _CHUNK_BITS)
                self._node_discard(old_owner, existing)
                self._node_index(node_id).add(existing)
            return lease
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
        lease = Lease(lease_id, pool, offset, holder, node_id, ts, p.space)
        self._insert(p, lease)
        return lease

    def release(self, lease_id: int) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise Rejection("unknown_lease", f"unknown lease {lease_id}")
        p = self._pools[lease.pool]
        del self._leases[lease_id]
        self._dirty.add(lease_id >> _CHUNK_BITS)
        del p.holders[lease.holder]
        p.index.discard(lease_id)
        self._all.discard(lease_id)
        self._node_discard(lease.node_id, lease_id)
        heapq.heappush(p.free, lease.offset)
        return lease

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
        # The lease dict is in id order: ids only grow, and a re-owned lease keeps its slot.
        leases = [lease[:6] for lease in self._leases.values()]  # msgpack packs tuples as arrays
        return [self._next_id, pools, leases]

    def packed_dump(self) -> bytes:
        """``msgpack.packb(self.dump(), use_bin_type=True)``, byte for byte, without re-encoding
        leases that did not change since the last call.

        A snapshot used to pack every lease (300,000 leases: ~300 ms of the event loop, several
        times a minute under write load). Leases are kept in 4096-id chunks, each chunk's
        encoding is cached until one of its leases is added, re-owned or released, and the list
        is the array header followed by the chunks' encodings in id order -- exactly what
        msgpack writes for the whole list. tests/test_state.py compares the two."""
        return b"".join(self.packed_dump_parts())

    def packed_dump_parts(self) -> list[bytes]:
        """``packed_dump()`` as pieces (the cached chunk encodings themselves, not copied)."""
        for chunk in self._dirty:
            self._encode_chunk(chunk)
        self._dirty.clear()
        packed = self._packed
        pools = [[p.name, str(p.network), p.created_at, p.hwm] for p in self._sorted_pools()]
        head = b"\x93" + packb(self._next_id) + packb(pools) + _array_header(len(self._leases))
        return [head, *(packed[c] for c in sorted(packed))]

    def encode_dirty_chunks(self, max_chunks: int) -> int:
        """Refresh the cache of at most ``max_chunks`` changed chunks; returns how many remain.

        A caller that must not hold the event loop for long (a backup of a cold cache right
        after a restart: ~1 ms per thousand leases) calls this between yields until it returns
        0, then ``packed_dump`` has little left to do."""
        for _ in range(min(max_chunks, len(self._dirty))):
            self._encode_chunk(self._dirty.pop())
        return len(self._dirty)

    def _encode_chunk(self, chunk: int) -> None:
        leases, packed = self._leases, self._packed
        base = chunk << _CHUNK_BITS
        items = [lease[:6] for i in range(base, base + _CHUNK) if (lease := leases.get(i)) is not None]
        if items:
            encoded = packb(items)
            packed[chunk] = encoded[_array_header_size(len(items)) :]
        else:
            packed.pop(chunk, None)

    @classmethod
    def load(cls, obj: object) -> LeaseTable:
        """Rebuild from ``dump()`` output; raises ``SnapshotError`` on any inconsistency."""
        try:
            return cls._load(obj)
        except (CommandError, Rejection) as exc:
            raise SnapshotError(f"lease table: {exc}") from None

    @classmethod
    def _load(cls, obj: object) -> LeaseTable:
        table = cls()
        next_id_raw, pools_raw, leases_raw = check_list(obj, "lease table", 3)
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
        used: dict[str, set[int]] = {name: set() for name in table._pools}
        leases = table._leases
        pools = table._pools
        pool_ids: dict[str, list[int]] = {name: [] for name in pools}
        node_ids: dict[int, list[int]] = {}
        prev_id = 0
        next_id = table._next_id
        for item in check_list(leases_raw, "leases"):
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
            taken = used[pool]
            if not 0 <= offset < p.hwm or offset in taken:
                raise SnapshotError(f"lease {lease_id}: bad or duplicate offset")
            taken.add(offset)
            if type(holder) is not str:
                holder = check_str(holder, "holder")
            if not holder or holder in p.holders:
                raise SnapshotError(f"lease {lease_id}: empty or duplicate holder")
            if type(node_id) is not int:
                node_id = check_int(node_id, "node_id")
            if type(created_at) is not float or not isfinite(created_at):
                created_at = check_float(created_at, "created_at")
            leases[lease_id] = Lease(lease_id, p.name, offset, holder, node_id, created_at, p.space)
            p.holders[holder] = lease_id
            pool_ids[pool].append(lease_id)
            ids = node_ids.get(node_id)
            if ids is None:
                ids = node_ids[node_id] = []
            ids.append(lease_id)
        # Ids arrived in increasing order, so every index's list is already sorted.
        table._all.fill(list(leases))
        for name, p in pools.items():
            p.index.fill(pool_ids[name])
            taken = used[name]
            p.free = [o for o in range(p.hwm) if o not in taken]  # sorted, hence a valid heap
        for node_id, ids in node_ids.items():
            table._node_index(node_id).fill(ids)
        table._dirty.update({lease_id >> _CHUNK_BITS for lease_id in leases})
        return table

    # --- internals ---------------------------------------------------------------------------

    def _sorted_pools(self) -> list[_Pool]:
        return [self._pools[name] for name in sorted(self._pools)]

    def _insert(self, p: _Pool, lease: Lease) -> None:
        self._leases[lease.lease_id] = lease
        self._dirty.add(lease.lease_id >> _CHUNK_BITS)
        p.holders[lease.holder] = lease.lease_id
        p.index.add(lease.lease_id)
        self._all.add(lease.lease_id)
        self._node_index(lease.node_id).add(lease.lease_id)

    def _node_index(self, node_id: int) -> _IdIndex:
        idx = self._by_node.get(node_id)
        if idx is None:
            leases = self._leases

            def live(lease_id: int) -> bool:
                lease = leases.get(lease_id)
                return lease is not None and lease.node_id == node_id

            idx = self._by_node[node_id] = _IdIndex(live)
        return idx

    def _node_discard(self, node_id: int, lease_id: int) -> None:
        idx = self._by_node[node_id]
        idx.discard(lease_id)
        if not idx:
            del self._by_node[node_id]
