"""Linearizability checking of the lease history: a WGL (Wing-Gong-Lowe) search in the style of
Porcupine, with a sequential model of the lease table partitioned by holder and by address.

The engine (``check_operations``) is generic: a ``Model`` gives an initial state and a ``step``
that returns every possible next state (an empty list means the operation is illegal in that
state). Nondeterminism is handled as Porcupine does, by searching over *sets* of states (the
power-set model), which is what lets an indeterminate operation (a timeout, a 5xx) both take
effect and not take effect. An indeterminate operation's return time is +infinity: it may take
effect at any time after its invocation, or never (its "no effect" outcome is always allowed).
The search is Lowe's just-in-time linearization with a cache of (linearized set, state set), on a
doubly linked list of call/return events; equal timestamps put calls before returns, which treats
touching operations as concurrent (the conservative choice).

The lease table model (``SlotModel``). The full table (lowest-free-address allocation, global id
order) is not P-compositional, so the check runs on two abstractions of it, each a necessary
condition of linearizability of the full table (a violation in either is a real violation):

* per (pool, holder): the holder's single lease, as seen by allocate (create or re-own), release,
  the holder's row in each read, and removals (purge of the owner's leases);
* per (pool, address): which lease holds the address (allocations answered with that address,
  releases of lease ids known to have it, the address's row in each read, removals).

Each slot holds at most one lease ``(id, address, node)``; ids increase, so a new lease in a slot
must have an id above every id the slot held before. Fields of a lease created by an
indeterminate allocate are unknown until a read or release binds them. In the address partition
the owner node is not tracked (an indeterminate re-own cannot be placed there), so a removal may
or may not purge the slot; indeterminate allocates are not placed there either (their address is
unknown), so a lease that an indeterminate allocate of its holder may have created may appear
once, at a read (the holder partition checks when).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tests.chaos.history import ALLOCATE, FAIL, INFO, OK, READ, RELEASE, REMOVE, History, Op

S = TypeVar("S", bound=Hashable)
I_contra = TypeVar("I_contra", contravariant=True)
I = TypeVar("I")  # noqa: E741 - conventional name for an operation's input


class Model(Protocol[S, I_contra]):
    def init(self) -> S: ...

    def step(self, state: S, op: I_contra) -> Iterable[S]: ...


@dataclass(frozen=True, slots=True)
class Operation(Generic[I]):
    """One operation of a partition: ``call``/``ret`` times (ret = inf when indeterminate)."""

    call: float
    ret: float
    op: I
    ref: int = -1  # the history op id, for reports


@dataclass(slots=True)
class CheckResult:
    ok: bool | None  # None: gave up (time budget)
    linearized_max: int = 0  # the deepest prefix the search linearized
    stuck: list[int] = field(default_factory=list)  # history op ids not linearizable after it
    steps: int = 0


class _Entry:
    __slots__ = ("index", "is_call", "match", "next", "prev")

    def __init__(self, index: int, is_call: bool) -> None:
        self.index = index
        self.is_call = is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _lift(e: _Entry) -> None:
    assert e.prev is not None and e.match is not None
    e.prev.next = e.next
    if e.next is not None:
        e.next.prev = e.prev
    m = e.match
    assert m.prev is not None
    m.prev.next = m.next
    if m.next is not None:
        m.next.prev = m.prev


def _unlift(e: _Entry) -> None:
    m = e.match
    assert m is not None and m.prev is not None and e.prev is not None
    m.prev.next = m
    if m.next is not None:
        m.next.prev = m
    e.prev.next = e
    if e.next is not None:
        e.next.prev = e


def check_operations(
    model: Model[S, I], ops: Sequence[Operation[I]], *, budget_seconds: float = 60.0
) -> CheckResult:
    """Is there a linearization of ``ops`` legal under ``model``? (WGL with a state cache.)"""
    events: list[tuple[float, int, int]] = []
    for i, o in enumerate(ops):
        events.append((o.call, 0, i))
        events.append((o.ret, 1, i))
    events.sort()
    head = _Entry(-1, False)
    calls: dict[int, _Entry] = {}
    prev = head
    for _t, kind, i in events:
        e = _Entry(i, kind == 0)
        if kind == 0:
            calls[i] = e
        else:
            e.match = calls[i]
            calls[i].match = e
        e.prev = prev
        prev.next = e
        prev = e

    deadline = time.monotonic() + budget_seconds
    state: frozenset[S] = frozenset([model.init()])
    linearized = 0
    depth = 0
    best = 0
    best_missing: list[int] = []
    cache: dict[int, set[frozenset[S]]] = {}
    stack: list[tuple[_Entry, frozenset[S]]] = []
    steps = 0
    entry = head.next
    while head.next is not None:
        steps += 1
        if steps & 0x3FF == 0 and time.monotonic() > deadline:
            return CheckResult(None, best, best_missing, steps)
        assert entry is not None
        if entry.is_call:
            nxt: set[S] = set()
            o = ops[entry.index]
            for s in state:
                nxt.update(model.step(s, o.op))
            if nxt:
                bits = linearized | (1 << entry.index)
                frozen = frozenset(nxt)
                seen = cache.setdefault(bits, set())
                if frozen not in seen:
                    seen.add(frozen)
                    stack.append((entry, state))
                    state = frozen
                    linearized = bits
                    depth += 1
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if depth >= best:
                best = depth
                best_missing = _pending_calls(head, ops)
            if not stack:
                return CheckResult(False, best, best_missing, steps)
            top, state = stack.pop()
            depth -= 1
            linearized &= ~(1 << top.index)
            _unlift(top)
            entry = top.next
    return CheckResult(True, len(ops), [], steps)


def _pending_calls(head: _Entry, ops: Sequence[Operation[I]], limit: int = 8) -> list[int]:
    out: list[int] = []
    e = head.next
    while e is not None and len(out) < limit:
        if e.is_call:
            out.append(ops[e.index].ref)
        e = e.next
    return out


# --- the lease slot model --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseVal:
    """A lease as far as a slot knows it; None fields are not known yet."""

    lease_id: int | None
    address: str | None
    node: int | None


SlotState = tuple[LeaseVal | None, int]  # (the lease in the slot, the highest id it ever held)


@dataclass(frozen=True, slots=True)
class SlotOp:
    kind: str  # ALLOCATE | RELEASE | READ | REMOVE
    status: str  # OK | FAIL (release answered 404) | INFO
    lease: LeaseVal | None = None  # ALLOCATE ok: the answer; READ: the slot's row (None = empty)
    lease_id: int = 0  # RELEASE target
    node: int = 0  # ALLOCATE: requested owner; REMOVE: the removed node


def _bind(cur: LeaseVal, seen: LeaseVal, max_id: int, *, with_node: bool) -> LeaseVal | None:
    """``cur`` refined by the observation ``seen``, or None when they contradict."""
    if cur.lease_id is None:
        if seen.lease_id is None or seen.lease_id <= max_id:
            return None
    elif cur.lease_id != seen.lease_id:
        return None
    if cur.address is not None and cur.address != seen.address:
        return None
    node = cur.node
    if with_node:
        if cur.node is not None and seen.node is not None and cur.node != seen.node:
            return None
        node = seen.node if seen.node is not None else cur.node
    return LeaseVal(seen.lease_id, seen.address, node)


@dataclass(frozen=True, slots=True)
class SlotModel:
    """At most one lease per slot (a holder, or an address) with increasing ids; see the module
    docstring. ``spontaneous``: lease ids a read may reveal without a matching allocate."""

    spontaneous: frozenset[int] = frozenset()

    def init(self) -> SlotState:
        return (None, 0)

    def step(self, state: SlotState, op: SlotOp) -> list[SlotState]:
        cur, max_id = state
        if op.kind == ALLOCATE:
            if op.status == OK:
                assert op.lease is not None and op.lease.lease_id is not None
                new, new_id = op.lease, op.lease.lease_id
                if cur is None:
                    return [(new, new_id)] if new_id > max_id else []
                bound = _bind(cur, new, max_id, with_node=False)
                if bound is None:
                    return []
                return [(LeaseVal(bound.lease_id, bound.address, new.node), max(max_id, new_id))]
            # indeterminate: no effect, or create / re-own
            if cur is None:
                return [state, (LeaseVal(None, None, op.node or None), max_id)]
            return [state, (LeaseVal(cur.lease_id, cur.address, op.node or None), max_id)]
        if op.kind == RELEASE:
            matches = cur is not None and (
                cur.lease_id == op.lease_id or (cur.lease_id is None and op.lease_id > max_id)
            )
            released: SlotState = (None, max(max_id, op.lease_id))
            if op.status == OK:
                return [released] if matches else []
            if op.status == FAIL:
                return [] if cur is not None and cur.lease_id == op.lease_id else [state]
            return [state, released] if matches else [state]
        if op.kind == READ:
            seen = op.lease
            if cur is None:
                if seen is None:
                    return [state]
                sid = seen.lease_id
                if sid is not None and sid in self.spontaneous and sid > max_id:
                    return [(seen, sid)]
                return []
            if seen is None:
                return []
            bound = _bind(cur, seen, max_id, with_node=True)
            if bound is None:
                return []
            return [(bound, max(max_id, bound.lease_id or 0))]
        if op.kind == REMOVE:
            if cur is None or (cur.node is not None and cur.node != op.node):
                return [state]
            purged: SlotState = (None, max(max_id, cur.lease_id or 0))
            if cur.node == op.node and op.status == OK:
                return [purged]
            return [state, purged]
        raise ValueError(f"unknown op kind {op.kind!r}")


# --- partitioning the history ----------------------------------------------------------------


@dataclass(slots=True)
class Partition:
    key: tuple[str, str, str]  # ("holder"|"address", pool, holder-or-address)
    ops: list[Operation[SlotOp]]
    model: SlotModel


def _timing(op: Op) -> tuple[float, float]:
    return op.invoke, (math.inf if op.status == INFO else op.complete)


def partitions(history: History) -> list[Partition]:
    """Split the history into per-holder and per-address slot histories (see module docstring)."""
    ops = history.ops
    reads = [op for op in ops if op.kind == READ and op.status == OK and op.leases is not None]
    removes = [op for op in ops if op.kind == REMOVE and op.status != FAIL]
    address_of: dict[int, tuple[str, str]] = {}  # lease id -> (pool, address)
    holder_of: dict[int, tuple[str, str]] = {}  # lease id -> (pool, holder)
    allocated_ok: set[int] = set()
    holders: set[tuple[str, str]] = set()
    indeterminate_holders: set[tuple[str, str]] = set()
    for op in ops:
        if op.kind == ALLOCATE and op.status != FAIL:
            holders.add((op.pool, op.holder))
        if op.kind == ALLOCATE and op.status == INFO:
            indeterminate_holders.add((op.pool, op.holder))
        if op.kind == ALLOCATE and op.status == OK and op.lease is not None:
            address_of[op.lease.lease_id] = (op.lease.pool, op.lease.address)
            holder_of[op.lease.lease_id] = (op.lease.pool, op.lease.holder)
            allocated_ok.add(op.lease.lease_id)
    for op in reads:
        for lease in op.leases or []:
            address_of.setdefault(lease.lease_id, (lease.pool, lease.address))
            holder_of.setdefault(lease.lease_id, (lease.pool, lease.holder))
            holders.add((lease.pool, lease.holder))
    addresses = sorted(set(address_of.values()))
    pools = sorted({p for p, _ in holders} | {p for p, _ in addresses})

    out: list[Partition] = []
    for pool, holder in sorted(holders):
        part: list[Operation[SlotOp]] = []
        for op in ops:
            if op.kind == ALLOCATE and op.pool == pool and op.holder == holder and op.status != FAIL:
                val = None
                if op.status == OK and op.lease is not None:
                    val = LeaseVal(op.lease.lease_id, op.lease.address, op.lease.node_id)
                part.append(
                    Operation(*_timing(op), SlotOp(ALLOCATE, op.status, val, node=op.owner), op.op_id)
                )
            elif op.kind == RELEASE and op.pool == pool and op.holder == holder:
                if op.status == FAIL and op.http_status != 404:
                    continue
                part.append(
                    Operation(*_timing(op), SlotOp(RELEASE, op.status, lease_id=op.lease_id), op.op_id)
                )
        for op in reads:
            if op.pool != pool:
                continue
            row = next((x for x in op.leases or [] if x.holder == holder), None)
            val = None if row is None else LeaseVal(row.lease_id, row.address, row.node_id)
            part.append(Operation(*_timing(op), SlotOp(READ, OK, val), op.op_id))
        for op in removes:
            part.append(Operation(*_timing(op), SlotOp(REMOVE, op.status, node=op.owner), op.op_id))
        out.append(Partition(("holder", pool, holder), part, SlotModel()))

    for pool, address in addresses:
        if pool not in pools:
            continue
        ids = {lid for lid, pa in address_of.items() if pa == (pool, address)}
        part = []
        for op in ops:
            if op.kind == ALLOCATE and op.status == OK and op.lease is not None and op.lease.lease_id in ids:
                val = LeaseVal(op.lease.lease_id, op.lease.address, None)
                part.append(Operation(*_timing(op), SlotOp(ALLOCATE, OK, val), op.op_id))
            elif op.kind == RELEASE and op.lease_id in ids:
                if op.status == FAIL and op.http_status != 404:
                    continue
                part.append(
                    Operation(*_timing(op), SlotOp(RELEASE, op.status, lease_id=op.lease_id), op.op_id)
                )
        for op in reads:
            if op.pool != pool:
                continue
            row = next((x for x in op.leases or [] if x.address == address), None)
            val = None if row is None else LeaseVal(row.lease_id, row.address, None)
            part.append(Operation(*_timing(op), SlotOp(READ, OK, val), op.op_id))
        for op in removes:
            part.append(Operation(*_timing(op), SlotOp(REMOVE, INFO, node=op.owner), op.op_id))
        # a lease whose holder has an indeterminate allocate may have been created by it, before
        # any acknowledged allocate returned it (the API answers 201 for a re-own as well, so an
        # acknowledged answer does not tell a creation from a re-own)
        spontaneous = {
            lid for lid in ids if lid not in allocated_ok or holder_of[lid] in indeterminate_holders
        }
        model = SlotModel(spontaneous=frozenset(spontaneous))
        out.append(Partition(("address", pool, address), part, model))
    return out


@dataclass(slots=True)
class LinearizabilityReport:
    ok: bool  # no partition was proven non-linearizable
    checked: int = 0
    failures: list[tuple[tuple[str, str, str], CheckResult]] = field(default_factory=list)
    unknown: list[tuple[str, str, str]] = field(default_factory=list)  # budget exhausted
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [
            f"linearizability: {self.checked} partitions, {len(self.failures)} violations, "
            f"{len(self.unknown)} undecided, {self.seconds:.1f}s"
        ]
        for key, res in self.failures:
            lines.append(
                f"  NOT LINEARIZABLE {key}: linearized {res.linearized_max} ops, "
                f"then none of ops {res.stuck} can go next"
            )
        for key in self.unknown:
            lines.append(f"  undecided (time budget) {key}")
        return "\n".join(lines)


def check_history(
    history: History,
    *,
    budget_seconds: float = 300.0,
    progress: Callable[[str], None] | None = None,
) -> LinearizabilityReport:
    """Check every partition; the budget is shared (each partition gets a fair slice)."""
    started = time.monotonic()
    parts = partitions(history)
    report = LinearizabilityReport(ok=True, checked=len(parts))
    for n, part in enumerate(parts):
        remaining = budget_seconds - (time.monotonic() - started)
        share = max(1.0, remaining / max(1, len(parts) - n))
        res = check_operations(part.model, part.ops, budget_seconds=share)
        if res.ok is False:
            report.ok = False
            report.failures.append((part.key, res))
            if progress:
                progress(f"partition {part.key}: NOT linearizable")
        elif res.ok is None:
            report.unknown.append(part.key)
    report.seconds = time.monotonic() - started
    return report
