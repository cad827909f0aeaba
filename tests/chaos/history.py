"""The recorded history of a chaos run: every client operation with its invoke and completion
time and its outcome, plus the nemesis operations that change the lease table (removals).

Outcomes follow Jepsen's vocabulary: ``ok`` (acknowledged; the value is known), ``fail``
(a definite failure: a 4xx answer, so the operation did not take effect, or for a release
answered 404 the lease was known to be absent) and ``info`` (indeterminate: a timeout, a 5xx or a
connection error; the operation may take effect at any time after its invocation, or never).
Times are seconds since the start of the run (monotonic clock). The history saves to and loads
from JSON so a failing run can be re-checked offline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK = "ok"
FAIL = "fail"
INFO = "info"

ALLOCATE = "allocate"
RELEASE = "release"
READ = "read"
REMOVE = "remove"  # removal of a member: purges every lease the node owns


@dataclass(frozen=True, slots=True)
class LeaseObs:
    """One lease as the API showed it."""

    lease_id: int
    pool: str
    address: str
    holder: str
    node_id: int

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> LeaseObs:
        return cls(int(d["id"]), str(d["pool"]), str(d["address"]), str(d["holder"]), int(d["nodeId"]))


@dataclass(slots=True)
class Op:
    op_id: int
    client: int  # workload client number; -1 for the nemesis
    node: int  # the node whose API was called
    kind: str  # ALLOCATE | RELEASE | READ | REMOVE
    invoke: float
    complete: float = 0.0
    status: str = INFO
    pool: str = ""
    holder: str = ""  # ALLOCATE (and RELEASE: the holder the released lease belongs to)
    owner: int = 0  # ALLOCATE: the requested nodeId; REMOVE: the removed node
    lease_id: int = 0  # RELEASE target
    lease: LeaseObs | None = None  # ALLOCATE ok
    leases: list[LeaseObs] | None = None  # READ ok: the full listing of the pool
    http_status: int = 0
    error: str = ""
    addr: str = ""  # the API base URL called (a moved node is called at its new address)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        d = dict(d)
        lease = d.pop("lease", None)
        leases = d.pop("leases", None)
        op = cls(**d)
        op.lease = LeaseObs(**lease) if lease else None
        op.leases = [LeaseObs(**x) for x in leases] if leases is not None else None
        return op


@dataclass(slots=True)
class History:
    ops: list[Op] = field(default_factory=list)
    _next_id: int = 0

    def invoke(self, kind: str, *, client: int, node: int, at: float, **fields: Any) -> Op:
        """Record the invocation of an operation; complete it later with ``complete``."""
        op = Op(op_id=self._next_id, client=client, node=node, kind=kind, invoke=at, **fields)
        self._next_id += 1
        self.ops.append(op)
        return op

    @staticmethod
    def complete(op: Op, status: str, at: float, *, http_status: int = 0, error: str = "") -> None:
        op.status = status
        op.complete = at
        op.http_status = http_status
        op.error = error

    def by_kind(self, kind: str) -> list[Op]:
        return [op for op in self.ops if op.kind == kind]

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        doc = {"ops": [op.to_json() for op in self.ops], **(extra or {})}
        path.write_text(json.dumps(doc, indent=None, separators=(",", ":")))

    @classmethod
    def load(cls, path: Path) -> History:
        doc = json.loads(path.read_text())
        ops = [Op.from_json(d) for d in doc["ops"]]
        return cls(ops=ops, _next_id=max((op.op_id for op in ops), default=-1) + 1)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for op in self.ops:
            out.setdefault(op.kind, {}).setdefault(op.status, 0)
            out[op.kind][op.status] += 1
        return out
