"""Backup and restore with real daemons, run as an operator would.

* ``test_backup_through_a_follower_then_restore_elsewhere``: a 3-node cluster under a bounded
  write load through every node; ``quorumctl backup save`` through a follower, which forwards it:
  the leader makes the archive (its header names the leader; its index is at least the leader's
  commit index before the request) and the follower relays it in many small chunks
  (``QUORUMD_TEST_BACKUP_CHUNK_BYTES``). Every host is then
  lost; ``quorumd restore`` builds a fresh data dir with other ports, and the restored node serves
  every pool and every lease acknowledged before the backup was requested (owner ids kept), a
  pre-backup API token works, a pre-backup join token is refused, a fresh join token brings a
  second node in (its old leases count for it again), and scheduled backups run on it.
* ``test_backup_headers_and_route``: the GET /api/v1/backup answer (headers, body digest, the
  OpenAPI entry) and its refusals (no token, a readonly token).
* On a cluster restored from an ~8 MB archive (tests/integration/test_backup_relay_live.py): a leader change
  while a follower relays fails the client's download visibly, and a rogue member cannot take a
  backup without an admin token.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from quorumd.api.app import all_routes
from quorumd.api.openapi import build_document
from quorumd.node.registry.archive import decode_archive
from tests.cluster import _SSL, Cluster, wait_for
from tests.daemon_support import LeaseWriter, list_leases, metric_samples

pytestmark = pytest.mark.xdist_group("test_backup_live")


def run(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def fetch(url: str, token: str | None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30, context=_SSL) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_backup_headers_and_route(tmp_path: Path) -> None:
    doc = build_document(all_routes())["paths"]["/api/v1/backup"]["get"]
    ok = doc["responses"]["200"]
    assert "application/octet-stream" in ok["content"]
    assert {"X-Quorumd-Backup-Index", "X-Quorumd-Backup-Sha256", "Content-Disposition"} <= set(ok["headers"])
    assert doc["x-quorumd-role"] == "admin" and "503" in doc["responses"]

    c = Cluster(tmp_path, 1, cluster_overrides={"enabled": False})
    try:
        node = c.start_first(1)
        c.wait_ready(1)
        c.ok(1, "POST", "/api/v1/pools", {"name": "p", "cidr": "10.9.0.0/24"})
        status, body, headers = fetch(f"{node.api}/api/v1/backup", c.token)
        assert status == 200 and headers["Content-Type"] == "application/octet-stream"
        assert headers["X-Quorumd-Backup-Sha256"] == hashlib.sha256(body).hexdigest()
        cid = c.status(1)["clusterId"]
        index = int(headers["X-Quorumd-Backup-Index"])
        assert headers["Content-Disposition"] == f'attachment; filename="quorumd-{cid}-{index}.backup"'
        assert index >= 1 and hashlib.sha256(body[:-32]).digest() == body[-32:]
        status, body, _ = fetch(f"{node.api}/api/v1/backup", None)
        assert status == 401 and b'"code":"unauthorized"' in body.replace(b" ", b"")
        reader = c.ok(1, "POST", "/api/v1/tokens", {"name": "r", "role": "readonly"})["token"]
        status, body, _ = fetch(f"{node.api}/api/v1/backup", reader)
        assert status == 403
    finally:
        c.close()


def test_backup_through_a_follower_then_restore_elsewhere(tmp_path: Path) -> None:
    chunk = 512  # the archive of the ~150 leases written first is ~8 KB: many chunks
    c = Cluster(tmp_path / "old", 3, cluster_overrides={"snapshot-threshold": 300, "trailing-logs": 50},
                env={"QUORUMD_TEST_BACKUP_CHUNK_BYTES": str(chunk)})  # fmt: skip
    (tmp_path / "old").mkdir()
    archive = tmp_path / "cluster.backup"
    writer: LeaseWriter | None = None
    try:
        c.form()
        lead = c.wait_leader()
        c.ok(lead, "POST", "/api/v1/pools", {"name": "w", "cidr": "10.80.0.0/16"})
        c.ok(lead, "POST", "/api/v1/pools", {"name": "v6", "cidr": "fd00:80::/64"})
        ops = c.ok(lead, "POST", "/api/v1/tokens", {"name": "ops", "role": "admin"})["token"]
        old_join = c.mint(9)
        writer = LeaseWriter(c, "w", seed=1010, threads=3).start()
        writer.wait_acks(150, timeout=60)
        lead = c.wait_leader()
        follower = next(n for n in (1, 2, 3) if n != lead)
        commit_before = int(c.status(lead)["commitIndex"])
        with writer._lock:
            before = dict(writer.acked)
        token_file = c.nodes[1].data_dir / "admin.token"
        saved = run("quorumd.node.ctl.main", "--endpoint", c.nodes[follower].api, "--insecure",
                    "--token-file", str(token_file), "backup", "save", str(archive))  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        # made by the leader at an index confirmed after the request arrived, relayed in chunks
        made = decode_archive(archive.read_bytes()).header
        assert made.node_id != follower and made.index >= commit_before, (made, follower, commit_before)
        assert any(f"backup_taken index={made.index} " in x and "leader=True" in x
                   for x in c.nodes[made.node_id].log_text().splitlines())  # fmt: skip
        relayed = f"backup_relayed leader={made.node_id} index={made.index} bytes={archive.stat().st_size}"
        # (logged one loop step after the last piece went out: the client may be done before)
        relayed += f" chunk_bytes={chunk}"
        wait_for("the relay logged", lambda: relayed in c.nodes[follower].log_text(), 30)
        assert archive.stat().st_size > 8 * chunk  # many chunks
        writer.wait_acks(50, timeout=60)  # the load went on during and after the backup
        writer.stop()
        assert not writer.bad, writer.bad[:5]
    finally:
        if writer is not None and not writer._stop.is_set():
            writer.stop()
        c.close()  # every host lost
    index = int(next(line.split()[-1] for line in saved.stdout.splitlines() if line.startswith("index:")))

    verify = run("quorumd.node.cli", "backup", "verify", str(archive))
    assert verify.returncode == 0 and f"index:      {index}" in verify.stdout, verify
    assert "members:    3" in verify.stdout and "pools:      2" in verify.stdout

    r = Cluster(
        tmp_path / "new", 2, top_overrides={"backup": {"dir": str(tmp_path / "sched"), "interval": "1h"}}
    )
    (tmp_path / "new").mkdir()
    try:
        node = r.make_node(1)
        assert {node.raft_port, node.api_port}.isdisjoint({c.nodes[1].raft_port, c.nodes[1].api_port})
        r.write_config(node)
        done = run("quorumd.node.cli", "restore", "--config", str(node.config_path), "--from", str(archive))
        assert done.returncode == 0, done.stderr
        r.start(node)
        r.token = (node.data_dir / "admin.token").read_text().strip()
        r.wait_ready(1, timeout=60)
        st = r.status(1)
        cluster_id = next(x.split()[-1] for x in verify.stdout.splitlines() if x.startswith("cluster id:"))
        assert st["role"] == "leader" and st["clusterId"] == cluster_id

        # every lease acknowledged before the backup was requested, and the pools
        table = list_leases(r, 1)
        by_id = {str(x["id"]): x for x in table}
        missing = [
            lid for lid in before if lid not in by_id and lid not in writer.released | writer.maybe_released
        ]
        assert not missing, f"{len(missing)} leases acknowledged before the backup are missing: {missing[:5]}"
        for lid, lease in before.items():
            if lid in by_id:
                got = by_id[lid]
                assert (got["address"], got["holder"], got["nodeId"]) == (lease["address"], lease["holder"],
                                                                         lease["nodeId"])  # fmt: skip
        assert {p["name"] for p in r.ok(1, "GET", "/api/v1/pools")} == {"w", "v6"}
        assert [m["nodeId"] for m in r.members(1)] == [1]

        # the pre-backup API token works, and the restored admin token too
        status, _, _ = r.api(1, "GET", "/api/v1/pools", token=ops)
        assert status == 200

        # a join token minted before the backup is refused
        stale = r.make_node(9)
        r.write_config(stale, join_token=old_join)
        cfg = yaml.safe_load(stale.config_path.read_text())
        cfg["cluster"]["join-timeout"] = "3s"
        stale.config_path.write_text(yaml.safe_dump(cfg))
        r.start(stale)
        assert stale.proc is not None and stale.proc.wait(timeout=60) == 1
        assert "could not join" in stale.log_text() or "join refused" in stale.log_text()
        assert [m["nodeId"] for m in r.members(1)] == [1]

        # a fresh join token brings node 2 in; its old leases count for it again
        r.add_node(2)
        r.wait_voters({1, 2}, timeout=90)
        owned = sum(1 for x in table if x["nodeId"] == 2)
        members: dict[int, Any] = {m["nodeId"]: m for m in r.members(1)}
        assert owned > 0 and members[2]["activeLeases"] == owned
        wait_for("node 2 caught up", lambda: len(list_leases(r, 2)) == len(table), 60)

        # scheduled backups: each node writes its own archive into the shared directory
        def backups_ok(nid: int) -> float:
            return sum(
                v for labels, v in metric_samples(r, nid, "quorumd_backups_total") if labels["result"] == "ok"
            )

        wait_for("a scheduled backup on each node", lambda: backups_ok(1) >= 1 and backups_ok(2) >= 1, 30)
        files = sorted((tmp_path / "sched").iterdir())
        assert [f.name.split("-")[-2] for f in files] == ["n1", "n2"], files
        assert all((f.stat().st_mode & 0o777) == 0o600 for f in files)
        again = run("quorumd.node.cli", "backup", "verify", str(files[0]))
        assert again.returncode == 0 and f"leases:     {len(table)}" in again.stdout, again
    finally:
        r.close()
