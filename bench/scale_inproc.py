"""The lease table's memory and speed in one process (deterministic; no cluster, no disk).

Run in a fresh interpreter per size so that RSS figures start from the same empty heap:
``python bench/scale_inproc.py --leases N [--src TREE]`` prints one JSON object. ``--src`` is
another checkout of the repository (e.g. ``git archive REV | tar -x -C TREE``): its modules are
imported instead of this one's, for a before/after comparison on the same host.

Steps, with the same commands as a replica applies: a state machine with 3 members and two /12
pools (``bench`` and ``bench2``, each holds 1,048,574 addresses) gets N ``AllocateLease`` commands
through ``StateMachine.apply`` (holders ``w<owner>-<k>``, owners 1..3 round robin); then
- ``bytes_per_lease_rss_built``: VmRSS growth over the empty state machine, divided by N;
- ``bytes_per_lease_traced``: the same from tracemalloc (Python's own allocations: exact);
- ``snapshot_ms``: ``StateMachine.snapshot()`` (best of 3), and its size per lease;
- ``restore_s``: ``StateMachine.restore`` of that snapshot in a fresh state machine (what a
  node does at startup and when a snapshot arrives), and ``bytes_per_lease_rss_restored``: that
  process's VmRSS growth after the built state and the snapshot bytes are dropped (a second
  process restores only, below);
- ``list_1000_ms``: one API page, ``[lease.as_dict() for lease in sm.leases(limit=1000, after=k)]``
  serialised with orjson as the API does, p50 over 200 pages at spread ``after`` values.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def use_tree(src: Path | None) -> Path | None:
    """Import ``quorumd`` from ``src`` (a checkout whose top folders are raft, api, node)."""
    if src is None:
        sys.path.insert(0, str(ROOT))
        return None
    shim = Path(tempfile.mkdtemp(prefix="quorumd-shim-"))
    (shim / "quorumd").mkdir()
    for part in ("raft", "api", "node"):
        (shim / "quorumd" / part).symlink_to(src.resolve() / part)
    sys.path.insert(0, str(shim))
    return shim


def build(n: int) -> Any:
    from quorumd.node.registry.commands import (
        AllocateLease,
        CreatePool,
        MemberContext,
        encode_command,
        encode_member_context,
    )
    from quorumd.node.registry.state import StateMachine
    from quorumd.raft.core.types import ConfChange, ConfChangeType

    sm = StateMachine()
    index = 0

    def apply(cmd: Any) -> None:
        nonlocal index
        index += 1
        res = sm.apply(index, encode_command(cmd))
        if res.error is not None:
            raise RuntimeError(f"{cmd}: {res.error} {res.message}")

    for nid in (1, 2, 3):  # the founder, then two members that joined (as tests/test_state.py)
        ctx = MemberContext(
            raft_address=f"127.0.0.{nid}:7000",
            api_address=f"https://127.0.0.{nid}:5002",
            binary_version="0.1.0",
            cert_fingerprint="sha256:" + f"{nid:02x}" * 32,
            cert_pem=f"-----BEGIN CERTIFICATE-----\n{nid}\n-----END CERTIFICATE-----\n",
            join_token_id=None,
            ts=100.0,
        )
        index += 1
        kind = ConfChangeType.PROMOTE if nid == 1 else ConfChangeType.ADD_NONVOTER
        res = sm.apply_conf_change(index, ConfChange(kind, nid, encode_member_context(ctx)))
        if res.error is not None:
            raise RuntimeError(f"member {nid}: {res.error} {res.message}")
    apply(CreatePool(1.0, "bench", "10.0.0.0/12"))
    apply(CreatePool(1.0, "bench2", "10.16.0.0/12"))
    ts0 = 1_700_000_000.0
    for k in range(n):
        owner = 1 + k % 3
        apply(AllocateLease(ts0 + k * 1e-4, "bench2" if k % 2 else "bench", f"w{owner}-{k}", owner))
    return sm


def measure(n: int) -> tuple[dict[str, Any], bytes]:
    import orjson

    from quorumd.node.registry.state import StateMachine

    out: dict[str, Any] = {"leases": n}
    tracemalloc.start()
    sm = build(0)
    traced0 = tracemalloc.get_traced_memory()[0]  # an empty state machine's own allocations
    tracemalloc.stop()
    gc.collect()
    r0 = rss()
    t0 = time.perf_counter()
    sm = build(n)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    if n:
        out["bytes_per_lease_rss_built"] = round((rss() - r0) / n, 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        snap = sm.snapshot()
        times.append(time.perf_counter() - t0)
    out["snapshot_ms"] = round(min(times) * 1000, 2)
    out["snapshot_bytes"] = len(snap)
    if n:
        out["snapshot_bytes_per_lease"] = round(len(snap) / n, 1)
    t0 = time.perf_counter()
    again = StateMachine()
    again.restore(snap)
    out["restore_s"] = round(time.perf_counter() - t0, 3)
    if again.snapshot() != snap:
        raise RuntimeError("restored state differs from the snapshot")
    del again
    pages = []
    step = max(1, n // 200)
    for k in range(200):
        t0 = time.perf_counter()
        body = orjson.dumps([x.as_dict() for x in sm.leases(limit=1000, after=k * step)])
        pages.append(time.perf_counter() - t0)
    out["list_1000_ms_p50"] = round(statistics.median(pages) * 1000, 3)
    out["list_page_bytes"] = len(body)
    del sm
    gc.collect()
    if n:  # tracemalloc slows the build ~3x: a smaller table gives the same figure per lease
        m = min(n, 200_000)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        sm = build(m)
        gc.collect()
        out["bytes_per_lease_traced"] = round((tracemalloc.get_traced_memory()[0] - base - traced0) / m, 1)
        tracemalloc.stop()
        del sm
    out["vmhwm_mb"] = hwm_mb()
    return out, snap


def restore_only(path: Path) -> dict[str, Any]:
    """A fresh process that only restores: RSS growth per lease once the snapshot bytes are gone."""
    from quorumd.node.registry.state import StateMachine

    gc.collect()
    r0 = rss()
    data = path.read_bytes()
    sm = StateMachine()
    t0 = time.perf_counter()
    sm.restore(data)
    secs = time.perf_counter() - t0
    n = sm.lease_count()
    del data
    gc.collect()
    return {
        "restore_s": round(secs, 3),
        "bytes_per_lease_rss_restored": round((rss() - r0) / n, 1) if n else None,
        "vmhwm_mb": hwm_mb(),
    }


def run(n: int, src: Path | None = None) -> dict[str, Any]:
    """Both steps, each in a fresh interpreter (``src``: another checkout to measure instead)."""
    args = [sys.executable, __file__, "--leases", str(n)] + (["--src", str(src)] if src else [])
    with tempfile.TemporaryDirectory(prefix="scale-inproc-") as tmp:
        snap = Path(tmp) / "snapshot"
        proc = subprocess.run([*args, "--save", str(snap)], capture_output=True, text=True, timeout=1800)
        try:
            out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"leases": n, "error": (proc.stdout + proc.stderr)[-2000:]}
        if n:
            argv = [*args, "--restore", str(snap)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            try:
                again = json.loads(proc.stdout.strip().splitlines()[-1])
                out["restore_only"] = again
                out["bytes_per_lease_rss_restored"] = again["bytes_per_lease_rss_restored"]
            except (ValueError, IndexError, KeyError):
                out["restore_error"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--leases", type=int, default=1_000_000)
    p.add_argument("--src", type=Path, default=None, help="another checkout to import quorumd from")
    p.add_argument("--save", type=Path, default=None, help="(internal) write the snapshot here")
    p.add_argument("--restore", type=Path, default=None, help="(internal) only restore this snapshot")
    args = p.parse_args()
    if args.save is None and args.restore is None:
        print(json.dumps(run(args.leases, args.src)))
        return 0
    shim = use_tree(args.src)
    try:
        if args.restore is not None:
            print(json.dumps(restore_only(args.restore)))
            return 0
        out, snap = measure(args.leases)
        if args.save is not None:
            args.save.write_bytes(snap)
        print(json.dumps(out))
    finally:
        if shim is not None:
            for part in ("raft", "api", "node"):
                (shim / "quorumd" / part).unlink()
            (shim / "quorumd").rmdir()
            shim.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
