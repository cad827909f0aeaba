"""The nemesis: seeded faults against a running ``NsCluster``, one at a time, each logged with a
timestamp (seconds since the run started) to the run's ``nemesis.log``.

A round picks a fault from the seeded ``random.Random``, applies it, holds it for a seeded
duration, undoes it, then waits (bounded) until the cluster has a leader and every node that
should run answers ``/status`` again before the next round. Faults:

* ``partition``: random halves (2 | 3); ``isolate_leader``: the leader alone;
  ``bridge``: two halves that cannot see each other and one node that sees both;
  ``one_way``: every packet from one node (often the leader) to another is dropped;
* ``kill``: SIGKILL a node (often the leader) and restart it with its data;
* ``pause``: SIGSTOP a node for longer than the election timeout, then SIGCONT;
* ``drain``: drain a node (deadlineSeconds 0 or a few seconds), then resume it;
* ``transfer``: drain the leader with deadline 0 (leadership moves), then resume it;
* ``remove_rejoin``: DELETE the member with force=true (recorded in the history: the removal purges
  the node's leases), stop it, and re-join it under the same id with a fresh data dir and a new
  join token.
* ``rogue_member``: a node joins as a nonvoter with a join token (tests/rogue_member.py, in the
  host namespace) and calls every internal RPC on every member with hostile arguments: removing
  voters, draining them, rewriting their registry records, proposing tokens, pools and leases,
  forwarding admin requests without a valid token, replaying its join. The members as seen by the
  leader before and after the attack are recorded (``membership_observations``) for the checker
  "no membership change without an authorized API request"; then the rogue removes itself (the
  one change a member may ask for), or the admin removes it.
* ``move``: a node (often the leader) is stopped (SIGTERM, sometimes SIGKILL), its namespace's
  address is replaced by another of its address slots (``NetLab.move``: back to an address it
  had before or on to a fresh one), every config names the new address, and it starts there with
  its data dir, node id and certificate, under the ongoing workload. The workload's clients of
  that node follow it. The nemesis then waits (bounded) until the node is ready, every node's
  members list shows its new ``raftAddress`` and ``apiAddress``, and a consistent read through
  the new API address (recorded in the history) succeeds; the ``MoveRecord`` feeds checker 6.

With a route collector (``routes``, the ``--bgp gobgp`` runs) the faults also wait (bounded) for
the collector's RIB to show what the fault must do to it: a killed or stopped node's routes
withdrawn, a drained node's withdrawn, a minority node that reports itself fenced withdrawn.

The schedule is a pure function of the seed; wall-clock timing (and so the exact interleaving with
the workload) is not, which is why a failing run keeps its whole history for offline re-checking.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.collector import RouteWatch
from tests.chaos.history import FAIL, INFO, OK, READ, REMOVE, History, LeaseObs
from tests.chaos.netcheckers import MoveRecord
from tests.chaos.nscluster import RAFT_PORT, NsCluster
from tests.chaos.workload import POOL
from tests.cluster import ApiCallError, http

FAULTS: dict[str, int] = {
    "partition": 3,
    "isolate_leader": 3,
    "bridge": 2,
    "one_way": 2,
    "kill": 3,
    "pause": 3,
    "drain": 2,
    "transfer": 2,
    "remove_rejoin": 1,
    "rogue_member": 3,
    "move": 3,
}
MOVE_SLOTS = 3  # a node moves among its first three address slots: back, forth and to fresh ones


@dataclass
class Nemesis:
    cluster: NsCluster
    history: History
    seed: int
    t0: float
    log_path: Path
    hold_seconds: tuple[float, float] = (3.0, 8.0)
    quiet_seconds: tuple[float, float] = (1.0, 3.0)
    election_timeout_seconds: float = 1.0
    recover_seconds: float = 60.0
    faults: dict[str, int] = field(default_factory=lambda: dict(FAULTS))
    rng: random.Random = field(init=False)
    actions: list[str] = field(default_factory=list)
    rounds: int = 0
    problems: list[str] = field(default_factory=list)  # e.g. a node that never came back
    after_recovered: Callable[[], Awaitable[None]] | None = None  # a check after every heal
    # (what, members before, members after) around each unauthorized attempt: see checkers.py
    membership_observations: list[tuple[str, Any, Any]] = field(default_factory=list)
    first_faults: tuple[str, ...] = ()  # run these first, in order, then the seeded choice
    routes: RouteWatch | None = None  # the route collector's watch (real speakers)
    endpoints: dict[int, str] | None = None  # the workload's API address of each node (a move updates it)
    moves: list[MoveRecord] = field(default_factory=list)
    fault_counts: dict[str, int] = field(default_factory=dict)  # rounds of each fault

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}/nemesis")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, msg: str) -> None:
        line = f"{self.now():9.3f} {msg}"
        self.actions.append(line)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    # --- helpers ------------------------------------------------------------------------------
    async def _bg(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _leader(self) -> int:
        return int(await self._bg(self.cluster.leader_id))

    async def _api(self, method: str, path: str, *, timeout: float = 15.0) -> tuple[int, Any]:
        """Admin call through the leader (or node 1 when none is known)."""
        via = await self._leader() or self.rng.choice(sorted(self.cluster.nodes))
        url = f"{self.cluster.nodes[via].api}{path}"
        try:
            status, body, _ = await self._bg(lambda: http(method, url, self.cluster.token, timeout=timeout))
        except OSError as exc:
            return 0, str(exc)
        return int(status), body

    async def _hold(self) -> None:
        await asyncio.sleep(self.rng.uniform(*self.hold_seconds))  # the fault's duration (chaos input)

    async def wait_recovered(self, timeout: float | None = None) -> bool:
        """Bounded wait: a leader exists and every running node answers /status."""
        timeout = self.recover_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lid = await self._leader()
            if lid:
                ok = True
                for nid, node in self.cluster.nodes.items():
                    if not node.alive():
                        continue
                    try:
                        st = await self._bg(self.cluster.status, nid)
                        ok = ok and bool(st.get("leaderNodeId"))
                    except (OSError, ApiCallError, ValueError):
                        ok = False
                if ok:
                    return True
            await asyncio.sleep(0.2)  # poll interval of a bounded wait
        self.problems.append(f"t={self.now():.1f}: cluster did not recover within {timeout}s")
        self.log(f"WARN cluster not recovered within {timeout}s")
        return False

    # --- the loop ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, deadline: float, max_rounds: int = 10_000) -> None:
        names = sorted(self.faults)
        weights = [self.faults[n] for n in names]
        self.log(f"nemesis start seed={self.seed}")
        for k in range(max_rounds):
            if stop.is_set() or time.monotonic() >= deadline:
                break
            name = self.rng.choices(names, weights=weights)[0]
            if k < len(self.first_faults):
                name = self.first_faults[k]
            self.rounds += 1
            self.fault_counts[name] = self.fault_counts.get(name, 0) + 1
            self.log(f"round {self.rounds}: {name}")
            try:
                await getattr(self, f"_fault_{name}")()
            finally:
                await self.heal_all()
            await self.wait_recovered()
            if self.after_recovered is not None:
                await self.after_recovered()
            await asyncio.sleep(self.rng.uniform(*self.quiet_seconds))  # quiet time between faults
        self.log(f"nemesis done rounds={self.rounds}")

    async def heal_all(self) -> None:
        """Undo every fault: network healed, paused nodes continued, dead nodes restarted."""
        await self._bg(self.cluster.lab.heal)
        for nid, node in sorted(self.cluster.nodes.items()):
            if node.paused:
                await self._bg(self.cluster.unpause, nid)
                self.log(f"SIGCONT node {nid}")
            if not node.alive():
                await self._bg(self.cluster.start, nid)
                self.log(f"restart node {nid}")
        self.log("heal")

    # --- faults -----------------------------------------------------------------------------------
    async def _fault_partition(self) -> None:
        nodes = sorted(self.cluster.nodes)
        self.rng.shuffle(nodes)
        k = self.rng.choice([1, 2])
        a, b = sorted(nodes[:k]), sorted(nodes[k:])
        await self._bg(self.cluster.lab.partition, [a, b])
        self.log(f"partition {a} | {b}")
        await self._hold()
        await self._fenced_withdrawn(a)

    async def _fault_isolate_leader(self) -> None:
        lid = await self._leader() or self.rng.choice(sorted(self.cluster.nodes))
        await self._bg(self.cluster.lab.isolate, lid)
        self.log(f"isolate leader {lid}")
        await self._hold()
        await self._fenced_withdrawn([lid])

    async def _fault_leader_with_nonvoters(self) -> None:
        """The leader and every nonvoter on one side, the other voters on the other (a leader that
        counts nonvoters toward its quorum keeps committing; used by the planted-bug test)."""
        status, body = await self._api("GET", "/api/v1/cluster/members")
        lid = await self._leader()
        if status != 200 or not lid:
            self.log(f"leader_with_nonvoters skipped: members {status}, leader {lid}")
            return
        nonvoters = [m["nodeId"] for m in body["result"] if m["suffrage"] != "voter"]
        side = sorted({lid, *nonvoters})
        rest = sorted(set(self.cluster.nodes) - set(side))
        await self._bg(self.cluster.lab.partition, [side, rest])
        self.log(f"partition leader+nonvoters {side} | {rest}")
        await self._hold()

    async def _fault_bridge(self) -> None:
        nodes = sorted(self.cluster.nodes)
        self.rng.shuffle(nodes)
        middle, left, right = nodes[0], sorted(nodes[1:3]), sorted(nodes[3:])
        await self._bg(self.cluster.lab.bridge, middle, left, right)
        self.log(f"bridge {left} <-{middle}-> {right}")
        await self._hold()

    async def _fault_one_way(self) -> None:
        nodes = sorted(self.cluster.nodes)
        lid = await self._leader()
        src = lid if lid and self.rng.random() < 0.5 else self.rng.choice(nodes)
        dst = self.rng.choice([n for n in nodes if n != src])
        await self._bg(self.cluster.lab.one_way, src, dst)
        self.log(f"one-way loss {src} -> {dst}")
        await self._hold()

    async def _fault_kill(self) -> None:
        lid = await self._leader()
        victim = lid if lid and self.rng.random() < 0.5 else self.rng.choice(sorted(self.cluster.nodes))
        await self._bg(self.cluster.kill, victim)
        self.log(f"SIGKILL node {victim}{' (leader)' if victim == lid else ''}")
        await self._withdrawn(f"node {victim} killed", [victim])
        await self._hold()
        await self._bg(self.cluster.start, victim)
        self.log(f"restart node {victim}")

    async def _fault_pause(self) -> None:
        lid = await self._leader()
        victim = lid if lid and self.rng.random() < 0.6 else self.rng.choice(sorted(self.cluster.nodes))
        seconds = self.rng.uniform(2.0, 5.0) * self.election_timeout_seconds
        await self._bg(self.cluster.pause, victim)
        self.log(f"SIGSTOP node {victim}{' (leader)' if victim == lid else ''} for {seconds:.1f}s")
        await asyncio.sleep(seconds)  # the pause's duration (chaos input)
        await self._bg(self.cluster.unpause, victim)
        self.log(f"SIGCONT node {victim}")

    async def _drain(self, node: int, deadline_seconds: int) -> None:
        status, body = await self._api(
            "POST", f"/api/v1/cluster/members/{node}/drain?deadlineSeconds={deadline_seconds}", timeout=30
        )
        self.log(f"drain node {node} deadlineSeconds={deadline_seconds} -> {status} {_short(body)}")
        if status == 200:
            await self._withdrawn(f"node {node} drained (deadlineSeconds={deadline_seconds})", [node])

    async def _resume(self, node: int) -> None:
        for _ in range(20):
            status, body = await self._api("POST", f"/api/v1/cluster/members/{node}/resume")
            self.log(f"resume node {node} -> {status} {_short(body)}")
            if status == 200:
                return
            await asyncio.sleep(0.5)  # retry pacing of a bounded retry loop
        self.problems.append(f"t={self.now():.1f}: resume of node {node} never succeeded")

    async def _fault_drain(self) -> None:
        node = self.rng.choice(sorted(self.cluster.nodes))
        await self._drain(node, self.rng.choice([0, 0, 2, 5]))
        await self._hold()
        await self._resume(node)

    async def _fault_transfer(self) -> None:
        lid = await self._leader()
        if not lid:
            self.log("transfer skipped: no leader")
            return
        await self._drain(lid, 0)
        new = await self._bg(self.cluster.wait_leader)
        self.log(f"leadership {lid} -> {new}")
        await self._hold()
        await self._resume(lid)

    async def _removed(self, node: int, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = await self._api("GET", "/api/v1/cluster/members")
            if status == 200:
                if all(m["nodeId"] != node for m in body["result"]):
                    return True
            await asyncio.sleep(0.5)  # poll interval of a bounded wait
        return False

    async def _fault_remove_rejoin(self) -> None:
        node = self.rng.choice(sorted(self.cluster.nodes))
        op = self.history.invoke(REMOVE, client=-1, node=0, at=self.now(), owner=node)
        status, body = await self._api("DELETE", f"/api/v1/cluster/members/{node}?force=true", timeout=30)
        result = OK if status == 200 else (FAIL if 400 <= status < 500 else INFO)
        self.history.complete(op, result, self.now(), http_status=status)
        self.log(f"remove node {node} force=true -> {status} {_short(body)}")
        if result == FAIL:
            return
        if result == INFO and not await self._removed(node):
            self.log(f"removal of node {node} did not take effect; node stays")
            return
        # the removed host is replaced: stop it, wipe, new token, re-join under the same id
        await self._bg(self.cluster.kill, node)
        self.log(f"stopped removed node {node}")
        for _ in range(30):
            try:
                await self._bg(self.cluster.wipe_and_rejoin, node)
                break
            except (AssertionError, ApiCallError, OSError) as exc:
                self.log(f"rejoin node {node} retry: {exc}")
                if self.cluster.nodes[node].alive():
                    break
                await asyncio.sleep(1.0)  # retry pacing of a bounded retry loop
        self.log(f"re-join node {node} generation {self.cluster.nodes[node].generation}")
        try:
            await self._bg(self.cluster.wait_voters, set(self.cluster.nodes), 90.0)
            self.log(f"node {node} is a voter again")
        except AssertionError as exc:
            self.problems.append(f"t={self.now():.1f}: node {node} not a voter after re-join: {exc}")
            self.log(f"WARN node {node} not a voter after re-join")

    async def _members_view(self, exclude: int) -> Any:
        """(nodeId, suffrage, drainState, raftAddress, apiAddress) of every member but ``exclude``, read
        through the leader (consistent), or None when it cannot be read."""
        status, body = await self._api("GET", "/api/v1/cluster/members?consistent=true")
        if status != 200:
            return None
        rows = body["result"]
        return sorted(
            (m["nodeId"], m["suffrage"], m["drainState"], m["raftAddress"], m["apiAddress"])
            for m in rows
            if m["nodeId"] != exclude
        )

    async def _fault_rogue_member(self) -> None:
        from quorumd.node.cluster.service import pack
        from tests.rogue_member import RogueMember

        rogue_id = self.rng.randrange(40, 64)
        lid = await self._leader()
        if not lid:
            self.log("rogue_member skipped: no leader")
            return
        try:
            token = await self._bg(self.cluster.mint, rogue_id)
        except (ApiCallError, OSError, AssertionError) as exc:
            self.log(f"rogue_member skipped: no join token ({exc})")
            return
        cluster_id = str((await self._bg(self.cluster.status, lid))["clusterId"])
        port = self.rng.randrange(20000, 40000)
        rogue = RogueMember(rogue_id, cluster_id, token, port, host=self.cluster.lab.host_addr)
        try:
            await rogue.start([f"{n.addr}:7000" for n in self.cluster.nodes.values()])
            self.log(f"rogue member {rogue_id} joined as a nonvoter from {rogue.host}:{port}")
            before = await self._members_view(rogue_id)
            answered = await rogue.attack(sorted(self.cluster.nodes), sorted(self.cluster.nodes), "0" * 12)
            after = await self._members_view(rogue_id)
            self.membership_observations.append(
                (f"rogue member {rogue_id} at t={self.now():.1f}", before, after)
            )
            self.log(
                f"rogue member {rogue_id} attacked: {len(answered)} calls answered, "
                f"members unchanged: {before == after}"
            )
            removed = ("error", b"")
            for _ in range(10):  # bounded: the leader may move meanwhile
                lead = await self._leader()
                if lead:
                    removed = await rogue.call(lead, "member.remove", pack([rogue_id]))
                    if removed[0] == "ok":
                        break
                await asyncio.sleep(0.5)  # retry pacing of a bounded retry loop
            self.log(f"rogue member {rogue_id} removes itself -> {removed[0]} {removed[1][:80]!r}")
        except Exception as exc:  # a rogue that cannot even join is no violation; the cleanup below runs
            self.log(f"rogue member {rogue_id} failed: {type(exc).__name__}: {exc}")
        finally:
            await rogue.close()
        if not await self._removed(rogue_id, timeout=10.0):
            status, body = await self._api(
                "DELETE", f"/api/v1/cluster/members/{rogue_id}?force=true", timeout=30
            )
            self.log(f"admin removes rogue member {rogue_id} -> {status} {_short(body)}")
            if not await self._removed(rogue_id):
                self.problems.append(f"t={self.now():.1f}: rogue member {rogue_id} could not be removed")

    # --- moves ------------------------------------------------------------------------------------
    async def _fault_move(self) -> None:
        lid = await self._leader()
        node = lid if lid and self.rng.random() < 0.4 else self.rng.choice(sorted(self.cluster.nodes))
        kill = self.rng.random() < 0.3
        lab = self.cluster.lab
        slot = self.rng.choice([k for k in range(MOVE_SLOTS) if k != lab.slots[node]])
        old = self.cluster.nodes[node].addr
        await self._bg(self.cluster.kill if kill else self.cluster.stop, node)
        role = " (leader)" if node == lid else ""
        self.log(f"{'SIGKILL' if kill else 'SIGTERM'} node {node}{role} to move it")
        await self._withdrawn(f"node {node} stopped to move", [node])
        new = await self._bg(self.cluster.move, node, slot)
        if self.routes is not None:
            await self._bg(self.routes.collector.set_neighbor, node)
        if self.endpoints is not None:
            self.endpoints[node] = self.cluster.nodes[node].api
        at = self.now()
        await self._bg(self.cluster.start, node)
        self.log(f"move node {node} {old} -> {new} (slot {slot}); started there")
        await self._settle_move(node, at, f"{old}:{RAFT_PORT}")

    async def _settle_move(self, node: int, at: float, old_raft: str) -> None:
        """Bounded wait until the moved node is ready, listed at its new addresses by every running
        node, and has served a consistent read through its new API address; record the outcome."""
        n = self.cluster.nodes[node]
        want = (f"{n.addr}:{RAFT_PORT}", n.api)
        began = time.monotonic()
        deadline = began + self.recover_seconds
        ready = served = False
        listings: dict[int, tuple[str, str] | None] = {}
        seen: dict[str, float] = {}  # phase -> seconds after the start, for the log
        while True:
            ready = ready or await self._bg(self._ready, node)
            listings = await self._bg(self._listings_of, node)
            listed = bool(listings) and all(e == want for e in listings.values())
            if ready and listed and not served:
                served = await self._probe_read(node)
            for phase, done in (("ready", ready), ("listed", listed), ("served", served)):
                if done:
                    seen.setdefault(phase, time.monotonic() - began)
            if (ready and listed and served) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)  # poll interval of a bounded wait
        settled = time.monotonic() - began if ready and listed and served else None
        self.moves.append(MoveRecord(node, at, old_raft, want[0], want[1], listings, ready, settled))
        if settled is None:
            self.problems.append(f"t={self.now():.1f}: moved node {node} not settled in time")
            self.log(f"WARN moved node {node}: ready={ready} listings={listings} served={served}")
        else:
            phases = " ".join(f"{k} {v:.2f}s" for k, v in seen.items())
            self.log(f"moved node {node} settled at {want[0]} (after the start: {phases})")

    def _ready(self, node: int) -> bool:
        try:
            return bool(self.cluster.status(node)["ready"])
        except (OSError, ApiCallError, ValueError, KeyError):
            return False

    def _listings_of(self, node: int) -> dict[int, tuple[str, str] | None]:
        """Each running node's entry (raftAddress, apiAddress) for ``node`` in its own members list."""
        out: dict[int, tuple[str, str] | None] = {}
        for nid, other in sorted(self.cluster.nodes.items()):
            if not other.alive() or other.paused:
                continue
            try:
                rows = self.cluster.call(nid, "GET", "/api/v1/cluster/members", timeout=3.0)
            except (OSError, ApiCallError, ValueError):
                out[nid] = None
                continue
            me = next((m for m in rows if m["nodeId"] == node), None)
            out[nid] = None if me is None else (str(me["raftAddress"]), str(me["apiAddress"]))
        return out

    async def _probe_read(self, node: int) -> bool:
        """A consistent read of the pool through the node's API, recorded in the history."""
        base = self.cluster.nodes[node].api
        op = self.history.invoke(READ, client=-1, node=node, at=self.now(), pool=POOL, addr=base)
        url = f"{base}/api/v1/leases?pool={POOL}&limit=10000&consistent=true"
        try:
            status, body, _ = await self._bg(lambda: http("GET", url, self.cluster.token, timeout=8.0))
        except OSError as exc:
            self.history.complete(op, INFO, self.now(), error=type(exc).__name__)
            return False
        if status == 200:
            op.leases = [LeaseObs.from_api(x) for x in body["result"]]
            self.history.complete(op, OK, self.now(), http_status=status)
            return True
        self.history.complete(op, FAIL if 400 <= status < 500 else INFO, self.now(), http_status=status)
        return False

    # --- the route collector ------------------------------------------------------------------------
    async def _withdrawn(self, label: str, nodes: list[int]) -> None:
        if self.routes is not None:
            check = await self._bg(self.routes.withdrawn, label, nodes)
            self.log(f"collector: {label}: routes withdrawn after {check.seconds}s")

    async def _fenced_withdrawn(self, side: list[int]) -> None:
        """The nodes of a cut-off minority that report themselves fenced have no route at the
        collector (a minority cannot hear a quorum, so it stays fenced while the cut holds)."""
        if self.routes is None:
            return
        fenced = []
        for nid in side:
            node = self.cluster.nodes[nid]
            if node.alive() and not node.paused:
                try:
                    if (await self._bg(self.cluster.status, nid)).get("isolated"):
                        fenced.append(nid)
                except (OSError, ApiCallError, ValueError):
                    continue
        if fenced:
            await self._withdrawn(f"nodes {fenced} fenced", fenced)


def _short(body: Any) -> str:
    text = str(body)
    return text if len(text) <= 160 else text[:157] + "..."
