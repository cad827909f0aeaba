"""The data directory under operator mistakes and full disks, with real daemons.

* After ``chmod -R a+rwX`` on a stopped node's data dir, the next start tightens every directory to
  0700 and every file (keys, tokens, WAL, snapshots, node.json) to 0600, and names each file it
  fixed in a WARNING.
* Disk full (a small tmpfs as the data dir, filled by the test): the node exits 1 saying
  "disk full" with the path, without a Python traceback; started again on the still-full disk it
  says so again the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import ApiCallError, Cluster, wait_for

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


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(50):  # bounded: a process may still hold a file for a moment
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=False)


def fill(directory: Path) -> None:
    with open(directory / "ballast", "wb") as f:
        try:
            for _ in range(100_000):  # bounded: far more than the tmpfs holds
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_exits_1_naming_the_path_without_a_traceback(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "6m") as disk:
        c = Cluster(disk, 1)
        try:
            c.form()
            node = c.nodes[1]
            c.ok(1, "POST", "/api/v1/pools", {"name": "p", "cidr": "10.0.0.0/16"})
            fill(disk)
            for i in range(10_000):  # bounded: the first WAL write that needs a new block fails
                if not node.alive():
                    break
                with contextlib.suppress(ApiCallError, OSError):
                    c.ok(1, "POST", "/api/v1/leases", {"pool": "p", "holder": f"h{i}-" + "x" * 200})
            assert node.proc is not None
            rc = node.proc.wait(30)
            text = node.log_text()
            assert rc == 1, text[-3000:]
            assert "Traceback" not in text, text[-3000:]
            assert f"quorumd: disk full: {node.data_dir}" in text, text[-3000:]  # stderr, with the path
            assert "disk_full" in text and "CRITICAL" in text

            # Started again on the still-full disk: the same one line, no traceback, exit 1.
            with open(node.log_path, "w"):
                pass
            c.restart(1)
            # The restart itself may fit its few bytes into a page the log already holds: keep
            # writing until a write needs a new one (bounded, as above).
            for i in range(10_000):
                if not node.alive():
                    break
                with contextlib.suppress(ApiCallError, OSError):
                    c.ok(1, "POST", "/api/v1/leases", {"pool": "p", "holder": f"again{i}-" + "x" * 200})
            rc = node.proc.wait(60)
            text = node.log_text()
            assert rc == 1 and "Traceback" not in text, text[-3000:]
            assert "disk full:" in text, text[-3000:]

            # Space again: it starts and serves what it had.
            (disk / "ballast").unlink()
            c.restart(1)
            wait_for("ready after freeing space", lambda: c.status(1)["ready"], 60)
            assert c.ok(1, "GET", "/api/v1/pools")[0]["name"] == "p"
        finally:
            c.close()
            shutil.rmtree(disk, ignore_errors=True)
