"""Audit trail benchmark: the write rate of audited admin operations, and that lease
allocation (not audited) keeps its rate.

Two parts, printed as one JSON object:

1. ``state_machine``: pure apply cost per entry on one replica (no I/O): an ``AllocateLease``
   (its fast decode path is untouched by the feature), a plain ``CreatePool``/``DeletePool`` pair
   and the same pair wrapped in ``Audited`` with a record (the extra cost of the record).
2. ``cluster``: real ``quorumd run`` daemons (3 nodes on 127.0.0.1, fsync on), driven over
   keep-alive HTTPS by ``--clients`` threads for ``--seconds`` each phase:
   - ``leases_fresh``: ``POST /leases`` on the leader (not audited);
   - ``admin_*``: ``POST /pools`` + ``DELETE /pools/{name}`` through the leader and through a
     follower (each an audited entry on this build);
   - ``leases_after_admin``: leases again, now with a trail of thousands of records.
   With ``--baseline-src DIR`` (a checkout of the build before the audit trail, e.g.
   ``git archive 1dfd937 | tar -x -C DIR``) a cluster of that build runs beside it: the lease
   phases alternate builds ``--rounds`` times (the order swapped every round, so both are compared
   on the same host minutes) and the admin phase runs on it too (the same calls, unaudited).

Run: ``.venv/bin/python bench/audit.py [--seconds S] [--clients C] [--rounds R]
[--baseline-src DIR]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from procs import free_port, stop_processes

from quorumd.node.registry.audit import Actor, AuditAction, note_of
from quorumd.node.registry.commands import (
    AllocateLease,
    Audited,
    CreatePool,
    DeletePool,
    MemberContext,
    SetClusterSecrets,
    encode_command,
    encode_member_context,
)
from quorumd.node.registry.state import StateMachine
from quorumd.raft.core.types import ConfChange, ConfChangeType

_SSL = ssl.create_default_context()
_SSL.check_hostname = False
_SSL.verify_mode = ssl.CERT_NONE


# --- part 1: the state machine -----------------------------------------------------------------


def _state() -> tuple[StateMachine, int]:
    sm = StateMachine()
    ctx = MemberContext("10.0.0.1:7000", "https://10.0.0.1:5002", "b", "sha256:" + "ab" * 32, "p", None, 1.0)
    sm.apply_conf_change(1, ConfChange(ConfChangeType.PROMOTE, 1, encode_member_context(ctx)))
    sm.apply(2, encode_command(SetClusterSecrets(1.0, "bench", b"k" * 32)))
    sm.apply(3, encode_command(CreatePool(1.0, "leases", "10.0.0.0/8")))
    return sm, 3


def state_machine(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    sm, index = _state()
    data = [encode_command(AllocateLease(2.0, "leases", f"h{i}", 1)) for i in range(n)]
    t = time.perf_counter()
    for d in data:
        index += 1
        sm.apply(index, d)
    out["allocate_lease_us"] = (time.perf_counter() - t) / n * 1e6
    actor = Actor.token("0123456789ab", "admin")
    for label, audited in (("pool_pair_plain_us", False), ("pool_pair_audited_us", True)):
        sm, index = _state()
        cmds = []
        for i in range(n // 2):
            create, delete = CreatePool(2.0, f"p{i}", "192.168.0.0/24"), DeletePool(2.0, f"p{i}")
            if audited:
                c_note = note_of(AuditAction.POOL_CREATE, f"pool:p{i}", actor, {"cidr": "192.168.0.0/24"})
                d_note = note_of(AuditAction.POOL_DELETE, f"pool:p{i}", actor)
                cmds += [
                    encode_command(Audited(2.0, c_note, create)),
                    encode_command(Audited(2.0, d_note, delete)),
                ]
            else:
                cmds += [encode_command(create), encode_command(delete)]
        t = time.perf_counter()
        for d in cmds:
            index += 1
            res = sm.apply(index, d)
            assert res.ok, res.error
        out[label] = (time.perf_counter() - t) / (n // 2) * 1e6
    return {k: round(v, 2) for k, v in out.items()}


# --- part 2: real daemons ----------------------------------------------------------------------


class Daemons:
    """A 3-node cluster of one build (``src``: None for this build, else a source checkout)."""

    def __init__(self, directory: Path, src: Path | None) -> None:
        self.dir = directory
        self.env = dict(os.environ)
        if src is not None:  # the checkout's folders mapped to quorumd.* (as the install maps them)
            shim = directory / "pkg" / "quorumd"
            shim.mkdir(parents=True)
            for name in ("raft", "api", "node"):
                (shim / name).symlink_to(src / name)
            self.env["PYTHONPATH"] = str(directory / "pkg")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api: dict[int, int] = {}
        self.token = ""

    def _start(self, nid: int, raft: dict[int, int], join: str | None) -> None:
        cluster: dict[str, Any] = {
            "node-id": nid,
            "bind-address": f"127.0.0.1:{raft[nid]}",
            "peers": [f"127.0.0.1:{p}" for p in raft.values()],
            "autopilot": {"server-stabilization-time": "1s", "reconcile-interval": "200ms"},
        }
        if join:
            cluster["join-token"] = join
        cfg = {"data-dir": str(self.dir / f"n{nid}"), "api": {"address": "127.0.0.1", "port": self.api[nid]},
               "cluster": cluster}  # fmt: skip
        path = self.dir / f"n{nid}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(self.dir / f"n{nid}.log", "ab")  # noqa: SIM115 - inherited by the child
        argv = [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(path)]
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=self.env))
        log.close()

    def start(self) -> Daemons:
        raft = {n: free_port() for n in (1, 2, 3)}
        self.api = {n: free_port() for n in (1, 2, 3)}
        self._start(1, raft, None)
        tf = self.dir / "n1" / "admin.token"
        self._until(lambda: tf.exists() and tf.read_text().strip() != "", "admin token")
        self.token = tf.read_text().strip()
        self._until(lambda: self.status(1).get("ready"), "founder ready")
        for nid in (2, 3):
            jt = self._until(lambda n=nid: self._mint(n), f"join token {nid}")
            self._start(nid, raft, jt)
        self._until(lambda: self._voters() == 3, "3 voters", 120)
        return self

    def _until(self, fn: Any, what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = fn()
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                got = None
            if got:
                return got
            time.sleep(0.1)  # polling a condition with a deadline
        raise RuntimeError(f"timed out waiting for {what}")

    def call(self, nid: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.api[nid], context=_SSL, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def status(self, nid: int) -> dict[str, Any]:
        return dict(self.call(nid, "GET", "/api/v1/status")[1]["result"])

    def _mint(self, nid: int) -> str:
        status, body = self.call(self.leader(), "POST", "/api/v1/cluster/pki/join-tokens", {"nodeID": nid})
        return str(body["result"]["token"]) if status == 201 else ""

    def _voters(self) -> int:
        rows = self.call(self.leader(), "GET", "/api/v1/cluster/members")[1]["result"]
        return sum(1 for r in rows if r["suffrage"] == "voter")

    def leader(self) -> int:
        for nid in self.api:
            try:
                if self.status(nid)["role"] == "leader":
                    return nid
            except (OSError, http.client.HTTPException, KeyError):
                continue
        raise OSError("no leader")

    def stop(self) -> None:
        stop_processes(self.procs, 15.0)


def drive(port: int, token: str, requests: Any, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads, each on one keep-alive connection, sending ``requests(thread, i)``
    (method, path, body) until ``seconds`` pass; ok/s, p50 and p99 latency of 2xx answers."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def worker(k: int) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=_SSL, timeout=10)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        i = 0
        while not stop.is_set():
            method, path, body = requests(k, i)
            i += 1
            t = time.perf_counter()
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            resp.read()
            if 200 <= resp.status < 300:
                lat[k].append(time.perf_counter() - t)
            else:
                errors[k] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    stop.wait(seconds)
    stop.set()
    for th in threads:
        th.join(30)
    elapsed = time.perf_counter() - t0
    flat = sorted(x for row in lat for x in row)
    return {
        "ok_per_s": round(len(flat) / elapsed, 1),
        "p50_ms": round(statistics.median(flat) * 1e3, 2) if flat else 0.0,
        "p99_ms": round(flat[int(len(flat) * 0.99) - 1] * 1e3, 2) if flat else 0.0,
        "errors": sum(errors),
    }


def probe(d: Daemons) -> bool:
    """Whether a write is audited yet (a pool made and deleted, then looked for)."""
    lead = d.leader()
    d.call(lead, "POST", "/api/v1/pools", {"name": "probe", "cidr": "10.99.0.0/24"})
    d.call(lead, "DELETE", "/api/v1/pools/probe")
    return bool(d.call(lead, "GET", "/api/v1/audit?action=pool_delete")[1]["result"])


def audited_admin(d: Daemons, nid: int, clients: int, seconds: float, tag: str) -> dict[str, float]:
    def req(k: int, i: int) -> tuple[str, str, Any]:
        name = f"{tag}{k}x{i // 2}"
        if i % 2 == 0:
            return "POST", "/api/v1/pools", {"name": name, "cidr": f"172.{16 + k}.{(i // 2) % 256}.0/24"}
        return "DELETE", f"/api/v1/pools/{name}", None

    return drive(d.api[nid], d.token, req, clients, seconds)


def leases(d: Daemons, clients: int, seconds: float, tag: str, octet: int) -> dict[str, float]:
    status, body = d.call(d.leader(), "POST", "/api/v1/pools", {"name": tag, "cidr": f"{octet}.0.0.0/8"})
    if status != 201:
        raise RuntimeError(f"pool {tag}: {status} {body}")

    def req(k: int, i: int) -> tuple[str, str, Any]:
        return "POST", "/api/v1/leases", {"pool": tag, "holder": f"{k}-{i}"}

    return drive(d.api[d.leader()], d.token, req, clients, seconds)


def count_records(d: Daemons) -> int:
    total, after = 0, 0
    while True:
        page = d.call(d.leader(), "GET", f"/api/v1/audit?limit=1000&after={after}")[1]["result"]
        if not page:
            return total
        total, after = total + len(page), page[-1]["id"]


def lease_rounds(this: Daemons, base: Daemons | None, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    """``POST /leases`` on each build in turn (the order swapped every round); the median of the
    rounds' this/baseline ratios."""
    rounds: list[dict[str, Any]] = []
    for r in range(a.rounds):
        builds = [("this", this), ("baseline", base)]
        row = {
            label: leases(d, a.clients, a.seconds, f"{tag}{r}{label}", (30 if tag == "a" else 60) + r)
            for label, d in (builds if r % 2 == 0 else builds[::-1])
            if d is not None
        }
        rounds.append(row)
    out: dict[str, Any] = {"rounds": rounds}
    if base is not None:
        ratios = [x["this"]["ok_per_s"] / max(0.1, x["baseline"]["ok_per_s"]) for x in rounds]
        out["this_over_baseline_median"] = round(statistics.median(ratios), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--baseline-src", type=Path, default=None)
    a = ap.parse_args()
    out: dict[str, Any] = {"state_machine": state_machine(a.entries), "cluster": {}}
    with tempfile.TemporaryDirectory(prefix="qd-bench-audit-") as tmp:
        this = Daemons(Path(tmp) / "this", None)
        (Path(tmp) / "this").mkdir()
        base = None
        if a.baseline_src is not None:
            (Path(tmp) / "base").mkdir()
            base = Daemons(Path(tmp) / "base", a.baseline_src.resolve())
        try:
            this.start()
            if base is not None:
                base.start()
            res: dict[str, Any] = out["cluster"]
            res["leases_fresh"] = lease_rounds(this, base, a, "a")
            # audited writes need the recorded protocol 2 (the leader ratchets within a few ticks)
            this._until(lambda: probe(this), "audited writes", 30)
            # the same admin load on both builds (audited here, not on the baseline), so both
            # clusters have the same history before the second lease phase
            for label, d in (("this", this), ("baseline", base)):
                if d is None:
                    continue
                leader = d.leader()
                follower = next(n for n in d.api if n != leader)
                res[f"admin_{label}_via_leader"] = audited_admin(d, leader, a.clients, a.seconds, "l")
                res[f"admin_{label}_via_follower"] = audited_admin(d, follower, a.clients, a.seconds, "f")
            res["audit_records_kept"] = count_records(this)
            res["leases_after_admin"] = lease_rounds(this, base, a, "b")
        finally:
            this.stop()
            if base is not None:
                base.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
