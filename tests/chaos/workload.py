"""The lease workload: concurrent clients against every node's API, recording a history.

Each client is bound to one node and loops (bounded in count and in time) over a seeded mix of
``POST /api/v1/leases {pool, holder, nodeId}`` (allocate; the same holder again re-owns),
``DELETE /api/v1/leases/{id}`` (release of a lease id the clients have seen for that holder) and
``GET /api/v1/leases?pool=P&limit=10000&consistent=true`` (a linearizable read of the whole pool).
Holders come from a small shared set so operations on one holder overlap and conflict.
A client looks its node's address up before every operation (``endpoints`` follows a moved
node) and records it in the operation. ``quiesce`` holds every client before its next operation
and waits (bounded) until none is in flight; ``resume`` lets them go on.

Classification of answers: 2xx is ``ok``; 4xx is a definite ``fail`` (nothing happened; for a
release a 404 also says the lease was absent); a timeout, a 5xx or a connection error is ``info``
(indeterminate). Clients pace themselves with a short random think time (a rate limit, not a
synchronization).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.chaos.history import ALLOCATE, FAIL, INFO, OK, READ, RELEASE, History, LeaseObs

POOL = "chaos"
POOL_CIDR = "198.18.0.0/24"  # data only (benchmarking range), never configured on an interface


@dataclass
class WorkloadConfig:
    clients_per_node: int = 2
    holders: int = 24
    request_timeout_seconds: float = 8.0
    think_seconds: tuple[float, float] = (0.02, 0.15)
    weights: tuple[int, int, int] = (45, 20, 35)  # allocate, release, read
    max_ops_per_client: int = 100_000


@dataclass
class Workload:
    endpoints: dict[int, str]  # node id -> https://addr:port
    token: str
    history: History
    seed: int
    t0: float  # monotonic time of the run's start; history times are relative to it
    cfg: WorkloadConfig = field(default_factory=WorkloadConfig)
    known: dict[str, int] = field(default_factory=dict)  # holder -> a lease id last seen for it
    counts: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # set: clients may start operations
    inflight: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    async def quiesce(self, timeout: float) -> bool:
        """Hold every client before its next operation; True once none is in flight (bounded)."""
        self.gate.clear()
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # poll interval of a bounded wait
        return self.inflight == 0

    def resume(self) -> None:
        self.gate.set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self, stop: asyncio.Event, deadline: float) -> None:
        """Run every client until ``stop`` is set or ``deadline`` (monotonic) passes."""
        connector = aiohttp.TCPConnector(ssl=False, limit=0, force_close=False)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession(connector=connector, headers=headers) as session,
            asyncio.TaskGroup() as tg,
        ):
            n = 0
            for node in sorted(self.endpoints):
                for _ in range(self.cfg.clients_per_node):
                    rng = random.Random(f"{self.seed}/client/{n}")
                    tg.create_task(self._client(n, node, rng, session, stop, deadline))
                    n += 1

    async def _client(
        self,
        client: int,
        node: int,
        rng: random.Random,
        session: aiohttp.ClientSession,
        stop: asyncio.Event,
        deadline: float,
    ) -> None:
        kinds = [ALLOCATE, RELEASE, READ]
        for _ in range(self.cfg.max_ops_per_client):
            while not self.gate.is_set() and not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gate.wait(), 0.2)
            if stop.is_set() or time.monotonic() >= deadline:
                return
            kind = rng.choices(kinds, weights=self.cfg.weights)[0]
            holder = f"h{rng.randrange(self.cfg.holders)}"
            if kind == RELEASE and holder not in self.known:
                kind = ALLOCATE
            base = self.endpoints[node]
            self.inflight += 1
            try:
                if kind == ALLOCATE:
                    await self._allocate(client, node, base, holder, session)
                elif kind == RELEASE:
                    await self._release(client, node, base, holder, self.known[holder], session)
                else:
                    await self._read(client, node, base, session)
            finally:
                self.inflight -= 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*self.cfg.think_seconds))

    async def _request(
        self, session: aiohttp.ClientSession, method: str, url: str, body: Any = None
    ) -> tuple[str, int, Any, str]:
        """(status class, http status, parsed body, error text)."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_seconds)
        try:
            async with session.request(method, url, json=body, timeout=timeout) as resp:
                try:
                    parsed = await resp.json(content_type=None)
                except ValueError:
                    parsed = None
                if resp.status < 300:
                    return OK, resp.status, parsed, ""
                code = parsed.get("code", "") if isinstance(parsed, dict) else ""
                if resp.status < 500:
                    return FAIL, resp.status, parsed, code
                return INFO, resp.status, parsed, code
        except TimeoutError:
            return INFO, 0, None, "timeout"
        except aiohttp.ClientError as exc:
            return INFO, 0, None, type(exc).__name__

    def _count(self, kind: str, status: str) -> None:
        key = f"{kind}.{status}"
        self.counts[key] = self.counts.get(key, 0) + 1

    async def _allocate(
        self, client: int, node: int, base: str, holder: str, session: aiohttp.ClientSession
    ) -> None:
        op = self.history.invoke(ALLOCATE, client=client, node=node, at=self.now(), pool=POOL,
                                 holder=holder, owner=node, addr=base)  # fmt: skip
        status, code, body, err = await self._request(
            session, "POST", f"{base}/api/v1/leases", {"pool": POOL, "holder": holder, "nodeId": node}
        )
        if status == OK:
            op.lease = LeaseObs.from_api(body["result"])
            self.known[holder] = op.lease.lease_id
        self.history.complete(op, status, self.now(), http_status=code, error=err)
        self._count(ALLOCATE, status)

    async def _release(
        self, client: int, node: int, base: str, holder: str, lease_id: int, session: aiohttp.ClientSession
    ) -> None:
        op = self.history.invoke(RELEASE, client=client, node=node, at=self.now(), pool=POOL,
                                 holder=holder, lease_id=lease_id, addr=base)  # fmt: skip
        status, code, _body, err = await self._request(session, "DELETE", f"{base}/api/v1/leases/{lease_id}")
        if status == OK or code == 404:
            if self.known.get(holder) == lease_id:
                del self.known[holder]
        self.history.complete(op, status, self.now(), http_status=code, error=err)
        self._count(RELEASE, status)

    async def _read(self, client: int, node: int, base: str, session: aiohttp.ClientSession) -> None:
        op = self.history.invoke(READ, client=client, node=node, at=self.now(), pool=POOL, addr=base)
        status, code, body, err = await self._request(
            session, "GET", f"{base}/api/v1/leases?pool={POOL}&limit=10000&consistent=true"
        )
        if status == OK:
            op.leases = [LeaseObs.from_api(x) for x in body["result"]]
            for lease in op.leases:
                self.known[lease.holder] = lease.lease_id
        self.history.complete(op, status, self.now(), http_status=code, error=err)
        self._count(READ, status)
