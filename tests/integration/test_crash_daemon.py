"""Crash safety of whole daemons: SIGKILL under a heavy lease workload, seeded.

A 3-node cluster (small snapshot threshold, so snapshots, compaction and snapshot catch-up happen
throughout) runs ``LeaseWriter`` threads allocating and releasing leases through every node.

* ``test_kill_follower_while_writing``: a follower is SIGKILLed while writes flow, the survivors
  keep acknowledging writes, the follower restarts, catches up and holds every acknowledged lease.
* ``test_seeded_kill_restart_loop``: ``KILLS`` times, a node chosen by a seeded RNG (any node,
  the leader included) is SIGKILLed after a random delay and restarted at once. About a third of
  the time it is SIGKILLed again at a random point of its own restart (WAL recovery, snapshot
  install, catch-up). About a quarter of the time the test then waits until every restarted node
  is ready again; otherwise the next kill may hit another node while this one is still starting
  (no quorum for a while) or even all three (a whole-cluster crash), and the wait comes once all
  three are restarting. Every restarted node must become ready within ``READY_TIMEOUT``.

Afterwards: every acknowledged allocation is present, unchanged, on every node unless its release
was acknowledged (releases with no clear answer may go either way); an acknowledged release never
comes back; no address is leased twice; every node reads the same lease table at the same applied
index; and the apply traces (``QUORUMD_TEST_APPLY_TRACE``, written by every daemon incarnation
before it applies anything) show one entry per index and one state per snapshot index across all
nodes and incarnations: no node ever applied a different entry at an index.

The seed is printed; ``QUORUMD_CRASH_SEED=<n>`` replays a run's choices (timings still vary).
``QUORUMD_CRASH_KILLS`` changes the kill count (default 50).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.daemon_support import (
    LeaseWriter,
    check_apply_traces,
    check_leases,
    stable_tables,
)

pytestmark = pytest.mark.xdist_group("test_crash_daemon")

KILLS = int(os.environ.get("QUORUMD_CRASH_KILLS", "50"))
SEED = int(os.environ.get("QUORUMD_CRASH_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
READY_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def crash_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("crash")
    c = Cluster(
        directory,
        3,
        cluster_overrides={"snapshot-threshold": 300, "trailing-logs": 100},
        env={"QUORUMD_TEST_APPLY_TRACE": str(directory / "traces")},
    )
    try:
        c.form()
        c.ok(c.wait_leader(), "POST", "/api/v1/pools", {"name": "crash", "cidr": "10.64.0.0/12"})
        yield c
    finally:
        c.close()


def traces(cluster: Cluster) -> Path:
    return cluster.directory / "traces"


def verify_everywhere(cluster: Cluster, writer: LeaseWriter) -> int:
    """The end-of-run checks on every node; returns the common applied index."""
    index, tables = stable_tables(cluster)
    reference = sorted((x["id"], x["address"], x["holder"], x["nodeId"]) for x in tables[1])
    for nid, table in tables.items():
        check_leases(writer, table, f"node {nid}")
        assert sorted((x["id"], x["address"], x["holder"], x["nodeId"]) for x in table) == reference, (
            f"node {nid} and node 1 differ at applied index {index}"
        )
    check_apply_traces(traces(cluster))
    return index


def test_kill_follower_while_writing(crash_cluster: Cluster) -> None:
    c = crash_cluster
    writer = LeaseWriter(c, "crash", seed=SEED).start()
    try:
        writer.wait_acks(30)
        lead = c.wait_leader()
        follower = next(n for n in (1, 2, 3) if n != lead)
        c.kill(follower)
        writer.wait_acks(30)  # the two survivors are a quorum: writes keep being acknowledged
        c.restart(follower)
        c.wait_ready(follower, READY_TIMEOUT)
        writer.wait_acks(30)  # and the restarted follower serves writes again
    finally:
        writer.stop()
    assert not writer.bad, writer.bad[:5]
    verify_everywhere(c, writer)
    assert "node_restart" in c.nodes[follower].log_text()


def wait_recovered(c: Cluster, pending: set[int], done: int) -> int:
    """Wait until every restarted node is ready; returns how many were."""
    count = len(pending)
    for nid in sorted(pending):
        try:
            c.wait_ready(nid, READY_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(
                f"node {nid} did not recover after kill {done} (seed {SEED}): {exc}\n"
                + c.nodes[nid].log_text()[-3000:]
            ) from None
    pending.clear()
    return count


def test_seeded_kill_restart_loop(crash_cluster: Cluster) -> None:
    c = crash_cluster
    print(f"crash test seed {SEED} (replay with QUORUMD_CRASH_SEED={SEED}), kills {KILLS}")
    rng = random.Random(SEED)
    writer = LeaseWriter(c, "crash", seed=SEED).start()
    incarnations = check_apply_traces(traces(c)).incarnations  # so far (formation, other tests)
    kills = {"leader": 0, "follower": 0, "during_restart": 0}
    pending: set[int] = set()  # restarted, not yet seen ready
    recovered = 0  # restarts seen ready
    started = time.monotonic()
    try:
        writer.wait_acks(20)
        done = 0
        while done < KILLS:
            victim = rng.choice([1, 2, 3])
            mode = rng.random()
            time.sleep(rng.uniform(0.0, 0.4))  # not synchronization: a random crash point in the writes
            kills["leader" if c.leader_id() == victim else "follower"] += 1
            c.kill(victim)
            c.restart(victim)
            done += 1
            pending.add(victim)
            if mode < 0.3 and done < KILLS:
                time.sleep(rng.uniform(0.2, 1.6))  # a random point of the victim's own restart
                c.kill(victim)
                c.restart(victim)
                done += 1
                kills["during_restart"] += 1
            if mode > 0.75 or len(pending) == 3:
                # Otherwise the next kill may hit another node while this one is still starting
                # (no quorum for a while; with all three, a whole-cluster crash).
                recovered += wait_recovered(c, pending, done)
        recovered += wait_recovered(c, pending, done)
        acks_before = writer.count()
        writer.wait_acks(20)  # the cluster still makes progress after the last kill
    finally:
        writer.stop()
    elapsed = time.monotonic() - started
    assert not writer.bad, writer.bad[:5]
    index = verify_everywhere(c, writer)
    report = check_apply_traces(traces(c))
    print(
        f"seed {SEED}: {done} kills {kills}, {recovered} recoveries in {elapsed:.1f}s, "
        f"{len(writer.acked)} acknowledged allocations ({acks_before} before the last check), "
        f"{len(writer.released)} releases, "
        f"{writer.failures} failed writes, applied index {index}, trace: {report}"
    )
    # Every incarnation that became ready wrote a P line first; one killed early may not have.
    assert done >= KILLS and report.incarnations >= incarnations + recovered, (report, recovered)
    assert sum(kills.values()) == done and kills["leader"] >= 1, kills
    assert report.states >= 2  # snapshots were taken during the run: crash points covered them too
