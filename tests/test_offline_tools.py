"""The offline tools on hostile input: ``quorumd backup verify`` on files that are not archives
(devices, pipes, directories, huge sparse files), ``quorumd restore`` interrupted or out of space
part way (nothing kept), and ``quorumd recover --peers`` refusals."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from quorumd.node import cli
from quorumd.node.config.schema import load_config
from quorumd.node.tools import backup as backup_tool
from quorumd.node.tools.recover import RecoverError, parse_peers
from tests.test_backup import make_archive, restore_config, sample_state, small_tmpfs
from tests.test_backup import quorumd as run_quorumd

MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def quorumd(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a child whose address space is bounded: reading without a bound fails."""
    return run_quorumd(*args, preexec_fn=_limit_memory)


def test_verify_refuses_what_is_not_an_archive_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # no writer: reading it would wait for ever
    sparse = tmp_path / "sparse.backup"
    with sparse.open("wb") as f:
        f.truncate(1 << 40)  # 1 TiB of zeros, no disk used
    cases = {
        "/dev/zero": "not a regular file",
        str(fifo): "not a regular file",
        str(tmp_path): "it is a directory",
        str(sparse): "bad magic",
    }
    for path, needle in cases.items():
        res = quorumd("backup", "verify", path)
        assert res.returncode == 1 and "Traceback" not in res.stderr, (path, res.stderr[-2000:])
        assert f"{path}: " in res.stderr and needle in res.stderr, (path, res.stderr)


def test_verify_reads_no_further_than_the_archive_declares(tmp_path: Path) -> None:
    good = make_archive(sample_state(3))
    longer = tmp_path / "longer.backup"
    with longer.open("wb") as f:
        f.write(good)
        f.truncate(1 << 40)  # the archive, then a sparse TiB
    res = quorumd("backup", "verify", str(longer))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"trailing data: {1 << 40} bytes, the archive ends at {len(good)}" in res.stderr


def test_an_interrupted_restore_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "a.backup"
    archive.write_bytes(make_archive(sample_state()))
    target = tmp_path / "data"
    cfg = load_config(str(restore_config(tmp_path, target)))

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(backup_tool, "write_node_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backup_tool.restore(cfg, archive)
    assert not target.exists()
    target.mkdir()
    with pytest.raises(KeyboardInterrupt):
        backup_tool.restore(cfg, archive)
    assert list(target.iterdir()) == []


def test_a_restore_that_runs_out_of_space_keeps_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "a.backup"
    archive.write_bytes(make_archive(sample_state(12_000)))  # about 300 kB
    with small_tmpfs(tmp_path, "256k") as mnt:
        target = mnt / "srv" / "quorumd" / "data"  # its parents are made by the restore too
        res = quorumd("restore", "--config", str(restore_config(tmp_path, target)), "--from", str(archive))
        assert res.returncode == 1 and "nothing kept" in res.stderr, res.stderr[-2000:]
        assert list(mnt.iterdir()) == []


@pytest.mark.parametrize(
    ("peers", "needle"),
    [
        ("1=127.0.0.1:7000,1=127.0.0.2:7000", "node 1 is given twice"),
        ("\u00b2=127.0.0.1:7000", "expected ID=HOST:PORT"),
        ("x=127.0.0.1:7000", "expected ID=HOST:PORT"),
        ("1=127.0.0.1", "bad address"),
        (" , ", "at least one voter"),
    ],
)
def test_recover_refuses_bad_peers(
    tmp_path: Path, peers: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RecoverError, match=needle):
        parse_peers(peers)
    cfg = restore_config(tmp_path, tmp_path / "data")
    assert cli.main(["recover", "--config", str(cfg), "--peers", peers]) == 1
    assert needle in capsys.readouterr().err
