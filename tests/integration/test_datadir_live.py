"""The data directory under operator mistakes, with real daemons (a full disk: test_disk_full.py).

* After ``chmod -R a+rwX`` on a stopped node's data dir, the next start tightens every directory to
  0700 and every file (keys, tokens, WAL, snapshots, node.json) to 0600, and names each file it
  fixed in a WARNING.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.xdist_group("test_datadir_live")


def test_loose_modes_are_tightened_at_start_and_each_fix_is_logged(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 1)
    try:
        c.form()
        c.ok(1, "POST", "/api/v1/pools", {"name": "p", "cidr": "10.1.0.0/24"})
        assert c.stop(1) == 0
        data = c.nodes[1].data_dir
        subprocess.run(["chmod", "-R", "a+rwX", str(data)], check=True)
        files = sorted(p for p in data.rglob("*") if p.is_file() and not p.is_symlink())
        names = {p.relative_to(data).as_posix() for p in files}
        assert {"tls/node.key", "admin.token", "node.json"} <= names
        assert any(n.startswith("raft/wal-") for n in names)
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 for p in files if p.name != "LOCK")
        log_before = len(c.nodes[1].log_text())
        c.restart(1)
        c.wait_ready(1)
        for p in [data, *data.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            if p.is_dir():
                assert mode == 0o700, (p, oct(mode))
            else:
                assert mode & 0o077 == 0, (p, oct(mode))
        new_log = c.nodes[1].log_text()[log_before:]
        warned = [ln for ln in new_log.splitlines() if "data_dir_mode_fixed" in ln and "WARNING" in ln]
        for p in files:
            assert any(f"path={p} " in line for line in warned), (p, warned)
        assert c.ok(1, "GET", "/api/v1/pools")[0]["name"] == "p"  # the node works as before
    finally:
        c.close()
