"""Startup benchmark: startup-to-ready time and peak RSS of a node with a large state.

Target: a node whose log has reached index 1,000,000 and that holds 100,000 active leases is ready
in under 3 s and stays under 150 MB RSS.

How the state is built (see ``generate``): driving a million writes through the API would take
hours, so only the cluster's *real* history goes through the API:

1. a real 3-node cluster is formed with the test harness (``tests/cluster.py``, production timing
   defaults: heartbeat 100 ms, election timeout 1 s, snapshot-threshold 8192, trailing-logs 10240),
   an IPv4 pool ``bench`` (10.0.0.0/8) is created through the API, and all nodes stop (SIGTERM);
2. offline, with the product's own modules, every node's data dir is brought to what a running node
   would have left behind at that log position. The most up-to-date log of the three (what a leader
   would replicate) is replayed into a ``StateMachine`` (``ClusterService.apply_entries``'s logic)
   and copied to the nodes that lack part of it. Then, in the current term, entries up to
   ``log_index`` follow: ``leases`` real ``AllocateLease`` commands (owners 1..3 round robin,
   spread evenly over the log and applied through ``StateMachine.apply``) with leader no-op
   entries (empty data) in between, and a tail after the snapshot of real AllocateLease /
   ReleaseLease pairs (the node replays these at startup). The entries are written through
   ``LogStorage.append``/``sync`` in 64k batches by one forked writer per node, interleaved
   with the driver's snapshot sequence at the last three snapshot points (``save_snapshot`` with
   the real 3-voter configuration, then ``compact(index - trailing_logs)``; saving a snapshot
   closes the WAL segment, so compaction deletes the history exactly as on a running node);
   hard state commit = ``log_index``. By default the last snapshot is ``snapshot_threshold - 1``
   entries behind the end (the worst case: the node was about to snapshot again).
3. all three nodes start at once; for each: wall time from ``Popen`` to the API port accepting
   TCP, to ``/api/v1/status`` answering, and to ``ready == true`` (polled) plus the same points
   from the node's own log lines (millisecond timestamps); the CPU seconds the process used until
   ready (robust when the machine is shared); VmHWM/VmRSS from /proc at ready and after a short
   write load; checks that every node applied ``log_index``, that the pool holds the
   expected number of leases and that allocations succeed. Then one follower is restarted alone
   while the other two run (no CPU contention from the siblings' startups).
4. optionally (``breakdown=True``) the same files are opened once more before the restart in a
   separate process that repeats the daemon's startup steps one by one (imports,
   ``LogStorage.open``, ``StateMachine.restore``, replay of the tail) and reports the time and
   VmHWM after each (wall and CPU seconds), which attributes the cost.

Run: ``.venv/bin/python bench/startup.py [--leases N] [--log-index N] [--dir DIR]``; prints one JSON
object. The work directory is kept (node logs, configs, data) unless it was a temporary one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import proc_cpu_s  # noqa: E402

from quorumd.node.config.schema import load_config  # noqa: E402
from quorumd.node.registry.commands import AllocateLease, ReleaseLease, encode_command  # noqa: E402
from quorumd.node.registry.leases import Lease  # noqa: E402
from quorumd.node.registry.state import StateMachine  # noqa: E402
from quorumd.raft.aio.storage import LogStorage, RecoveredState  # noqa: E402
from quorumd.raft.codec import decode_conf_change  # noqa: E402
from quorumd.raft.core import membership  # noqa: E402
from quorumd.raft.core.types import (  # noqa: E402
    Configuration,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from tests.cluster import Cluster, wait_for  # noqa: E402

POOL = "bench"
POOL_CIDR = "10.0.0.0/8"
PRODUCTION_TIMING = {"heartbeat-interval": "100ms", "election-timeout": "1s"}
TARGET_READY_S = 3.0
TARGET_RSS_MB = 150.0
APPEND_BATCH = 65536
WRITES_PER_NODE = 50
READY_TIMEOUT_S = 120.0
TS_STEP = 1e-5  # seconds between the generated commands' timestamps
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


# --- small helpers --------------------------------------------------------------------------------
def proc_mem_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def _pid(c: Cluster, node_id: int) -> int:
    proc = c.nodes[node_id].proc
    assert proc is not None
    return proc.pid


def _log_time(line: str) -> float | None:
    m = _LOG_TS.match(line)
    if m is None:
        return None
    return datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def apply_entry(sm: StateMachine, e: Entry) -> Any:
    """Apply one committed entry the way ``ClusterService.apply_entries`` does."""
    if e.type == EntryType.CONF_CHANGE:
        return sm.apply_conf_change(e.index, decode_conf_change(e.data))
    return sm.apply(e.index, e.data)


def _last(rec: RecoveredState) -> tuple[int, int]:
    """(last term, last index) of a recovered log."""
    if rec.entries:
        return rec.entries[-1].term, rec.entries[-1].index
    if rec.snapshot is not None:
        return rec.snapshot.meta.term, rec.snapshot.meta.index
    return 0, 0


# --- step 1: a real cluster -----------------------------------------------------------------------
def form_cluster(directory: Path) -> Cluster:
    c = Cluster(directory, 3, cluster_overrides=dict(PRODUCTION_TIMING))
    try:
        c.form()
        lead = c.wait_leader()
        c.ok(lead, "POST", "/api/v1/pools", {"name": POOL, "cidr": POOL_CIDR})
        target = c.applied(lead)
        wait_for("all nodes applied the pool", lambda: all(c.applied(n) >= target for n in (1, 2, 3)))
    except BaseException:
        c.close()
        raise
    return c


# --- step 2: the large state, offline -------------------------------------------------------------
@dataclass
class Generated:
    term: int
    base_index: int  # last index of the real history (the most up-to-date log of the three)
    snapshot_index: int
    prev_snapshot_index: int
    config: Configuration
    lease_count: int  # after the whole log is applied
    snapshot_bytes: int
    wal_bytes: dict[str, int] = field(default_factory=dict)
    wal_segments: dict[str, int] = field(default_factory=dict)
    wal_entries: dict[str, int] = field(default_factory=dict)  # known when no segment was deleted
    timings: dict[str, float] = field(default_factory=dict)


def _spread(count: int, lo: int, hi: int) -> Iterator[int]:
    """``count`` distinct indexes spread evenly over [lo, hi]."""
    span = hi - lo + 1
    for k in range(count):
        yield lo + (k * span) // count


def generate(
    data_dirs: dict[int, Path],
    *,
    leases: int,
    log_index: int,
    snapshot_threshold: int,
    trailing_logs: int,
    tail: int,
) -> Generated:
    """Write the large state into every node's ``raft`` directory (see the module docstring)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    opened: dict[int, tuple[LogStorage, RecoveredState]] = {
        nid: LogStorage.open(d / "raft") for nid, d in data_dirs.items()
    }
    try:
        # The reference history: the most up-to-date log (a new leader's), as Raft would elect.
        ref_id = max(opened, key=lambda n: _last(opened[n][1]))
        ref = opened[ref_id][1]
        sm = StateMachine()
        config = Configuration()
        if ref.snapshot is not None:
            sm.restore(ref.snapshot.data)
            config = ref.snapshot.meta.config
        for e in ref.entries:
            apply_entry(sm, e)
            if e.type == EntryType.CONF_CHANGE:
                config = membership.apply(config, decode_conf_change(e.data))
        if config.voters != frozenset(data_dirs) or config.nonvoters:
            raise RuntimeError(f"unexpected configuration {config} (expected voters {sorted(data_dirs)})")
        ref_term, base = _last(ref)
        term = max([ref_term, *(rec.hard_state.term for _, rec in opened.values())])
        snap_index = log_index - tail
        prev_snap = snap_index - snapshot_threshold
        if prev_snap <= base + leases:
            raise ValueError(f"log_index {log_index} too small for {leases} leases after index {base}")
        if sm.pool(POOL) is None:
            raise RuntimeError(f"pool {POOL!r} missing from the replicated state")
        timings["recover_real_history_s"] = time.perf_counter() - t

        # Entries base+1 .. log_index, applied to ``sm`` as a replica would apply them.
        t = time.perf_counter()
        # Command clock: after the real history, and in the past again by the time nodes restart.
        ts0 = time.time()
        alloc_at = {i: k for k, i in enumerate(_spread(leases, base + 1, prev_snap))}
        # A third, older snapshot point: with trailing-logs > snapshot-threshold, the segment the
        # newest compaction deletes is the one closed by the snapshot two intervals back.
        first_snap = prev_snap - snapshot_threshold
        first_data = b""
        entries: list[Entry] = []
        append = entries.append
        for i in range(base + 1, prev_snap + 1):
            k = alloc_at.get(i)
            if k is None:
                # Leader no-op: StateMachine.apply of empty data only advances the applied index,
                # which the next applied index does too (it need not be contiguous).
                append(Entry(term, i))
                if i == first_snap:
                    sm.apply(i, b"")
                    first_data = sm.snapshot()
                continue
            data = encode_command(AllocateLease(ts0 + k * TS_STEP, POOL, f"ue-{k:07d}", 1 + k % 3))
            e = Entry(term, i, EntryType.NORMAL, data)
            res = sm.apply(i, data)
            if not res.ok:
                raise RuntimeError(f"allocation {k} rejected: {res.error} {res.message}")
            append(e)
            if i == first_snap:
                first_data = sm.snapshot()
        if sm.applied_index < prev_snap:
            sm.apply(prev_snap, b"")
        timings["build_and_apply_leases_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prev_data = sm.snapshot()
        for i in range(prev_snap + 1, snap_index + 1):
            e = Entry(term, i)
            apply_entry(sm, e)
            append(e)
        snap_data = sm.snapshot()
        timings["snapshots_s"] = time.perf_counter() - t
        # The tail after the last snapshot (replayed by the daemon at startup): real lease churn.
        t = time.perf_counter()
        i = snap_index + 1
        if (log_index - snap_index) % 2:
            append(Entry(term, i))
            apply_entry(sm, entries[-1])
            i += 1
        j = 0
        while i < log_index:
            ts = ts0 + (leases + j) * TS_STEP
            data = encode_command(AllocateLease(ts, POOL, f"tmp-{j}", 1 + j % 3))
            alloc = Entry(term, i, EntryType.NORMAL, data)
            res = apply_entry(sm, alloc)
            assert res.ok and isinstance(res.value, Lease), res
            data = encode_command(ReleaseLease(ts, res.value.lease_id))
            release = Entry(term, i + 1, EntryType.NORMAL, data)
            res2 = apply_entry(sm, release)
            assert res2.ok, res2
            entries += (alloc, release)
            i += 2
            j += 1
        assert entries[-1].index == log_index == sm.applied_index
        timings["tail_s"] = time.perf_counter() - t

        t = time.perf_counter()
        if not first_data:
            raise RuntimeError(f"no state captured at the first snapshot point {first_snap}")
        snapshots = [
            Snapshot(SnapshotMeta(first_snap, term, config), first_data),
            Snapshot(SnapshotMeta(prev_snap, term, config), prev_data),
            Snapshot(SnapshotMeta(snap_index, term, config), snap_data),
        ]
        result = Generated(
            term, base, snap_index, prev_snap, config, sm.lease_count(), len(snap_data), timings=timings
        )
        # One forked writer per node (they share ``entries`` copy-on-write); the parent keeps the
        # LogStorage objects untouched until the children are done, then only closes them.
        children: dict[int, int] = {}
        for nid, (st, rec) in opened.items():
            pid = os.fork()
            if pid == 0:  # child: write, then leave without running the parent's cleanup
                code = 1
                try:
                    _write_node(st, rec, ref, entries, base, term, log_index, trailing_logs, snapshots)
                    code = 0
                except BaseException as exc:
                    print(f"node {nid} writer failed: {exc!r}", file=sys.stderr)
                finally:
                    os._exit(code)
            children[nid] = pid
        for nid, pid in children.items():
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"writing node {nid}'s storage failed")
        for nid in opened:
            wal = sorted((data_dirs[nid] / "raft").glob("wal-*.log"))
            result.wal_segments[str(nid)] = len(wal)
            if wal and wal[0].name == "wal-0000000000000001.log":  # nothing compacted away
                result.wal_entries[str(nid)] = log_index
            result.wal_bytes[str(nid)] = sum(p.stat().st_size for p in wal)
        timings["write_storage_s"] = time.perf_counter() - t
    finally:
        for st, _ in opened.values():
            st.close()
    result.timings = {k: round(v, 3) for k, v in timings.items()}
    return result


def _write_node(
    st: LogStorage,
    rec: RecoveredState,
    ref: RecoveredState,
    entries: list[Entry],
    base: int,
    term: int,
    log_index: int,
    trailing_logs: int,
    snapshots: list[Snapshot],
) -> None:
    """Append the generated log to one node's storage, then store the snapshots as the driver does."""
    # Bring the node's log in line with the reference first (what the leader would replicate).
    mine = {e.index: e.term for e in rec.entries}
    first = next((e.index for e in ref.entries if mine.get(e.index) != e.term), base + 1)
    missing = [e for e in ref.entries if e.index >= first]
    if missing:
        st.append(missing)
    vote = rec.hard_state.vote if rec.hard_state.term == term else 0
    # Entries in order; at each snapshot point the driver's sequence (RaftDriver._save_snapshot):
    # save, then compact to (snapshot index - trailing_logs). Saving a snapshot closes the WAL
    # segment, so this leaves the segments a running node would have left.
    k = 0
    for snap in [*snapshots, None]:
        stop = len(entries) if snap is None else snap.meta.index - entries[0].index + 1
        while k < stop:
            st.append(entries[k : min(stop, k + APPEND_BATCH)])
            k = min(stop, k + APPEND_BATCH)
            st.set_hard_state(HardState(term, vote, entries[k - 1].index))
            st.sync()
        if snap is not None:
            st.save_snapshot(snap)
            st.compact(max(0, snap.meta.index - trailing_logs))


# --- step 3: restart and measure ------------------------------------------------------------------
@dataclass
class Probe:
    """External view of one starting node (times are seconds after ``Popen``)."""

    node_id: int
    started: float = 0.0  # time.time() just before Popen
    port_s: float | None = None
    status_s: float | None = None
    ready_s: float | None = None
    mem_at_ready: dict[str, float] = field(default_factory=dict)
    cpu_s_at_ready: float | None = None
    error: str = ""


def _probe(c: Cluster, p: Probe, deadline: float, interval: float = 0.05) -> None:
    node = c.nodes[p.node_id]
    try:
        while time.time() < deadline and p.port_s is None:
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", node.api_port)) == 0:
                    p.port_s = time.time() - p.started
                    break
            time.sleep(0.01)  # a refused connect is cheap; a status call is a TLS handshake
        while time.time() < deadline:
            try:
                st = c.status(p.node_id)
            except Exception:  # not serving yet (or a 503 while starting)
                st = None
            if st is not None:
                if p.status_s is None:
                    p.status_s = time.time() - p.started
                if st.get("ready"):
                    p.ready_s = time.time() - p.started
                    p.mem_at_ready = proc_mem_mb(_pid(c, p.node_id))
                    p.cpu_s_at_ready = proc_cpu_s(_pid(c, p.node_id))
                    return
            time.sleep(interval)
        p.error = "timed out"
    except Exception as exc:
        p.error = f"{type(exc).__name__}: {exc}"


_LOG_EVENTS = {
    "storage_opened": "storage opened",
    "state_restored": "state_restored",
    "local_log_replayed": "local_log_replayed",
    "api_listening": "api_listening",
    "first_role_change": "raft_role_change",
    "bgp_speaker_started": "bgp_speaker_started",
    "node_ready": "node_ready",
    "snapshot_saved": "raft_snapshot_saved",
}
_SECONDS = re.compile(r"\bseconds=([0-9.]+)")


def log_breakdown(text: str, started: float) -> dict[str, float]:
    """Seconds after ``Popen`` at which the node logged each startup milestone (first occurrence)."""
    out: dict[str, float] = {}
    first_line: float | None = None
    for line in text.splitlines():
        ts = _log_time(line)
        if ts is None:
            continue
        if first_line is None:
            first_line = ts
        for key, needle in _LOG_EVENTS.items():
            if key not in out and needle in line:
                out[key] = round(ts - started, 3)
                if key == "local_log_replayed" and (m := _SECONDS.search(line)):
                    out["local_log_replay_dur"] = float(m[1])
        if "role=leader" in line and "became_leader" not in out:
            out["became_leader"] = round(ts - started, 3)
    if first_line is not None:
        out["first_log_line"] = round(first_line - started, 3)
    for name, a, b in (
        ("restore_snapshot_dur", "storage_opened", "state_restored"),
        ("state_restored_to_api_dur", "state_restored", "api_listening"),
        ("api_to_ready_dur", "api_listening", "node_ready"),
    ):
        if a in out and b in out:
            out[name] = round(out[b] - out[a], 3)
    return out


def start_and_probe(c: Cluster, ids: list[int]) -> tuple[dict[int, Probe], dict[str, dict[str, float]]]:
    """Start ``ids`` back to back and probe each until ready; also each node's log milestones."""
    offsets = {n: c.nodes[n].log_path.stat().st_size if c.nodes[n].log_path.exists() else 0 for n in ids}
    probes = {n: Probe(n) for n in ids}
    deadline = time.time() + READY_TIMEOUT_S
    threads = []
    for n in ids:
        probes[n].started = time.time()
        c.restart(n)
        th = threading.Thread(target=_probe, args=(c, probes[n], deadline), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(READY_TIMEOUT_S + 5)

    def new_log(n: int) -> str:
        with open(c.nodes[n].log_path, "rb") as f:
            f.seek(offsets[n])
            return f.read().decode(errors="replace")

    deadline = time.time() + 5.0  # the daemon logs node_ready a moment after /status says ready
    for n in ids:
        while probes[n].ready_s is not None and time.time() < deadline and "node_ready" not in new_log(n):
            time.sleep(0.05)
    logs = {str(n): log_breakdown(new_log(n), probes[n].started) for n in ids}
    return probes, logs


def restart_and_measure(c: Cluster, log_index: int, expected_leases: int) -> dict[str, Any]:
    ids = sorted(c.nodes)
    probes, logs = start_and_probe(c, ids)
    mem_after_ready = {str(n): proc_mem_mb(_pid(c, n)) for n in ids if c.nodes[n].alive()}

    # Checks: every node applied the whole log and sees every lease.
    checks: dict[str, Any] = {}
    status = {n: c.status(n) for n in ids}
    checks["applied_index"] = {str(n): status[n]["appliedIndex"] for n in ids}
    checks["all_applied_log"] = all(status[n]["appliedIndex"] >= log_index for n in ids)
    pool = {n: c.ok(n, "GET", f"/api/v1/pools/{POOL}") for n in ids}
    checks["pool_allocated"] = {str(n): pool[n]["allocated"] for n in ids}
    checks["all_see_leases"] = all(pool[n]["allocated"] == expected_leases for n in ids)
    members = c.members()
    checks["active_leases_by_owner"] = {str(m["nodeId"]): m["activeLeases"] for m in members}

    # A short write load through every node (followers forward to the leader), then a page read.
    t = time.perf_counter()
    failures: list[Any] = []
    for n in ids:
        for k in range(WRITES_PER_NODE):
            st, body, _ = c.api(n, "POST", "/api/v1/leases", {"pool": POOL, "holder": f"after-{n}-{k}"})
            if st not in (200, 201):
                failures.append((n, st, body))
    write_s = time.perf_counter() - t
    for n in ids:
        page = c.ok(n, "GET", f"/api/v1/leases?pool={POOL}&limit=10000")
        checks.setdefault("page_len", {})[str(n)] = len(page)
    checks["writes_ok"] = len(ids) * WRITES_PER_NODE - len(failures)
    checks["write_failures"] = failures[:5]
    checks["write_load_s"] = round(write_s, 3)
    final = expected_leases + checks["writes_ok"]
    wait_for(
        "every node applied the writes",
        lambda: all(c.ok(n, "GET", f"/api/v1/pools/{POOL}")["allocated"] == final for n in ids),
    )
    mem_after_load = {str(n): proc_mem_mb(_pid(c, n)) for n in ids if c.nodes[n].alive()}
    return {
        "probes": {str(n): p for n, p in probes.items()},
        "mem_after_ready": mem_after_ready,
        "mem_after_load": mem_after_load,
        "checks": checks,
        "log_breakdown": logs,
    }


def single_restart(c: Cluster, node_id: int) -> dict[str, Any]:
    """Restart one follower while the other two run: no CPU contention from sibling startups."""
    lead = c.wait_leader()
    if node_id == lead:
        node_id = next(n for n in sorted(c.nodes) if n != lead)
    c.stop(node_id)
    probes, logs = start_and_probe(c, [node_id])
    p = probes[node_id]
    return {
        "node": node_id,
        "ready_s": _r(p.ready_s),
        "api_port_s": _r(p.port_s),
        "cpu_s_at_ready": p.cpu_s_at_ready,
        "rss_mb_at_ready": p.mem_at_ready.get("VmRSS"),
        "rss_mb_peak_at_ready": p.mem_at_ready.get("VmHWM"),
        "log_breakdown_s": logs[str(node_id)],
        "error": p.error,
    }


# --- step 4: attribution, offline ---------------------------------------------------------------
_BREAKDOWN_SCRIPT = r"""
import gc, json, sys, time
from pathlib import Path

def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out

out = {}
marks = [time.perf_counter(), time.process_time()]

def step(name):
    now = [time.perf_counter(), time.process_time()]
    out[name + "_s"] = round(now[0] - marks[0], 3)
    out[name + "_cpu_s"] = round(now[1] - marks[1], 3)
    out["mem_after_" + name] = mem()
    marks[:] = now

import quorumd.node.daemon.root  # noqa: F401  (everything the daemon imports)
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.codec import decode_conf_change
from quorumd.raft.core.types import EntryType
from quorumd.node.registry.state import StateMachine
step("import")
st, rec = LogStorage.open(Path(sys.argv[1]))
step("open_storage")
out["entries_returned"] = len(rec.entries)
sm = StateMachine()
sm.restore(rec.snapshot.data)
step("restore_snapshot")
for e in rec.entries:
    if e.type == EntryType.CONF_CHANGE:
        sm.apply_conf_change(e.index, decode_conf_change(e.data))
    else:
        sm.apply(e.index, e.data)
step("replay_tail")
gc.collect()
out["mem_after_gc"] = mem()
st.close()
print(json.dumps(out))
"""


def offline_breakdown(raft_dir: Path) -> dict[str, Any]:
    """The daemon's startup steps one at a time in a fresh process: seconds and VmHWM after each."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _BREAKDOWN_SCRIPT, str(raft_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    out["process_s"] = round(time.perf_counter() - t, 3)
    return out


# --- the benchmark --------------------------------------------------------------------------------
def run_startup_bench(
    work_dir: Path,
    leases: int = 100_000,
    log_index: int = 1_000_000,
    *,
    tail: int | None = None,
    breakdown: bool = True,
    single: bool = True,
) -> dict[str, Any]:
    """Form, grow the state offline, restart and measure (see the module docstring).

    ``tail``: entries after the last snapshot (default ``snapshot_threshold - 1``, the worst case).
    ``single``: afterwards, also restart one follower alone while the other two run.
    """
    started = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cluster_dir = Path(tempfile.mkdtemp(prefix="startup-", dir=work_dir))
    result: dict[str, Any] = {"log_index": log_index, "leases": leases, "work_dir": str(cluster_dir)}
    t = time.perf_counter()
    c = form_cluster(cluster_dir)
    try:
        result["form_s"] = round(time.perf_counter() - t, 3)
        cfg = load_config(c.nodes[1].config_path)
        threshold, trailing = cfg.cluster.snapshot_threshold, cfg.cluster.trailing_logs
        tail = threshold - 1 if tail is None else tail
        t = time.perf_counter()
        c.close()
        result["stop_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        gen = generate(
            {n: node.data_dir for n, node in c.nodes.items()},
            leases=leases,
            log_index=log_index,
            snapshot_threshold=threshold,
            trailing_logs=trailing,
            tail=tail,
        )
        result["generate_s"] = round(time.perf_counter() - t, 3)
        result["generated"] = {
            "term": gen.term,
            "real_history_last_index": gen.base_index,
            "snapshot_index": gen.snapshot_index,
            "previous_snapshot_index": gen.prev_snapshot_index,
            "tail_entries": log_index - gen.snapshot_index,
            "voters": sorted(gen.config.voters),
            "snapshot_mb": round(gen.snapshot_bytes / 2**20, 2),
            "wal_mb": {k: round(v / 2**20, 2) for k, v in gen.wal_bytes.items()},
            "wal_segments": gen.wal_segments,
            "wal_entries_read_at_startup": gen.wal_entries or "unknown (segments were compacted)",
            "snapshot_threshold": threshold,
            "trailing_logs": trailing,
            "timings": gen.timings,
        }
        if breakdown:
            result["offline_breakdown"] = offline_breakdown(c.nodes[1].data_dir / "raft")

        load_before = os.getloadavg()[0]
        measured = restart_and_measure(c, log_index, gen.lease_count)
        probes: dict[str, Probe] = measured["probes"]
        ready = {k: round(p.ready_s, 3) for k, p in probes.items() if p.ready_s is not None}
        result["startup_to_ready_s"] = ready
        result["startup_to_ready_s_median"] = _median(list(ready.values()))
        result["cpu_s_at_ready"] = {k: p.cpu_s_at_ready for k, p in probes.items()}
        result["startup_to_api_port_s"] = {k: _r(p.port_s) for k, p in probes.items()}
        result["startup_to_status_s"] = {k: _r(p.status_s) for k, p in probes.items()}
        result["rss_mb_after_ready"] = {k: p.mem_at_ready.get("VmRSS") for k, p in probes.items()}
        result["rss_mb_peak_at_ready"] = {k: p.mem_at_ready.get("VmHWM") for k, p in probes.items()}
        result["rss_mb_peak"] = {k: v.get("VmHWM") for k, v in measured["mem_after_load"].items()}
        result["rss_mb_after_load"] = {k: v.get("VmRSS") for k, v in measured["mem_after_load"].items()}
        result["log_breakdown_s"] = measured["log_breakdown"]
        result["checks"] = measured["checks"]
        errors = {k: p.error for k, p in probes.items() if p.error}
        checks = measured["checks"]
        result["ok"] = bool(
            not errors
            and len(ready) == len(probes)
            and checks["all_applied_log"]
            and checks["all_see_leases"]
            and checks["writes_ok"] == len(probes) * WRITES_PER_NODE
        )
        peak = max((v for v in result["rss_mb_peak"].values() if v is not None), default=0.0)
        worst = max(ready.values(), default=float("inf"))
        result["targets"] = {
            "ready_under_3s": worst < TARGET_READY_S,
            "rss_under_150mb": peak < TARGET_RSS_MB,
        }
        result["loadavg_1m_before_restart"] = round(load_before, 2)
        if single:
            result["loadavg_1m_before_single_restart"] = round(os.getloadavg()[0], 2)
            result["single_follower_restart"] = single_restart(c, 3)
        result["notes"] = (f"errors={errors}; " if errors else "") + (
            "all three nodes start at once on this machine (startup_to_ready_s: they compete for the "
            "cores; cpu_s_at_ready is the contention-free cost, single_follower_restart one node alone); "
            "ready = leader known and applied >= commit, so an election (election timeout 1 s) is "
            "included; rss_mb_peak = VmHWM after ready and a write load of "
            f"{len(probes) * WRITES_PER_NODE} allocations; log entries before the snapshot are "
            f"{leases} AllocateLease commands spread over leader no-ops (empty data), the tail after it "
            "AllocateLease/ReleaseLease pairs; the machine may be shared, see loadavg"
        )
    finally:
        c.close()
        result["total_s"] = round(time.perf_counter() - started, 3)
    return result


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--leases", type=int, default=100_000)
    p.add_argument("--log-index", type=int, default=1_000_000)
    p.add_argument("--tail", type=int, default=None, help="entries after the last snapshot")
    p.add_argument("--dir", default=None, help="work directory (kept); default: a temporary one")
    p.add_argument("--no-breakdown", action="store_true", help="skip the offline per-step breakdown")
    p.add_argument("--no-single", action="store_true", help="skip the single follower restart")
    args = p.parse_args(argv)
    tmp = None if args.dir else tempfile.mkdtemp(prefix="quorumd-startup-")
    work = Path(args.dir or tmp or ".")
    try:
        out = run_startup_bench(
            work,
            args.leases,
            args.log_index,
            tail=args.tail,
            breakdown=not args.no_breakdown,
            single=not args.no_single,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2, default=lambda o: o.__dict__))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
