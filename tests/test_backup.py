"""Backup archives without a running cluster: the format and its refusals (with a fuzz of the
decoder), ``quorumd backup verify``, ``quorumd restore`` (refusals; the restored data dir is
exercised live in tests/integration/test_backup_live.py), the refounded state, and scheduled backups on a
disk that fills up (a small tmpfs)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorumd.api.ports import DrainState, TokenRole
from quorumd.api.ports_backup import BackupArchive
from quorumd.node.config.schema import BackupConfig, config_from_dict
from quorumd.node.daemon.backupmetrics import BackupMetrics
from quorumd.node.daemon.backups import BackupScheduler
from quorumd.node.registry import jointoken
from quorumd.node.registry.apitoken import hash_secret
from quorumd.node.registry.archive import (
    ARCHIVE_MAGIC,
    ArchiveError,
    ArchiveHeader,
    decode_archive,
    encode_archive,
)
from quorumd.node.registry.commands import (
    AllocateLease,
    CreateApiToken,
    CreatePool,
    MemberContext,
    SetClusterSecrets,
    encode_command,
    encode_member_context,
)
from quorumd.node.registry.records import ApiToken, Member
from quorumd.node.registry.state import StateMachine
from quorumd.node.tools.backup import load_archive_bytes
from quorumd.raft.core.types import ConfChange, ConfChangeType

CLUSTER = "c0ffee" * 5 + "ab"


def _ctx(node_id: int) -> bytes:
    return encode_member_context(
        MemberContext(
            raft_address=f"10.0.0.{node_id}:7000",
            api_address=f"https://10.0.0.{node_id}:5002",
            binary_version="0.1.0",
            cert_fingerprint="sha256:" + f"{node_id:02x}" * 32,
            cert_pem="pem",
            join_token_id=None,
            ts=100.0,
        )
    )


def sample_state(leases: int = 10) -> StateMachine:
    sm = StateMachine()
    i = 0

    def run(data: bytes) -> None:
        nonlocal i
        i += 1
        assert sm.apply(i, data).ok

    i += 1
    sm.apply_conf_change(i, ConfChange(ConfChangeType.PROMOTE, 1, _ctx(1)))
    i += 1
    sm.apply_conf_change(i, ConfChange(ConfChangeType.ADD_NONVOTER, 2, _ctx(2)))
    run(encode_command(SetClusterSecrets(100.0, CLUSTER, b"k" * 32)))
    run(encode_command(CreateApiToken(100.0, "0123456789ab", "ops", TokenRole.ADMIN, b"h" * 32, None)))
    run(encode_command(CreatePool(100.0, "p", "10.0.0.0/16")))
    for n in range(leases):
        run(encode_command(AllocateLease(101.0, "p", f"h{n}", 1 + n % 2)))
    return sm


def make_archive(sm: StateMachine, *, term: int = 3, version_override: int | None = None) -> bytes:
    header = ArchiveHeader(CLUSTER, sm.applied_index, term, 1_700_000_000.0, 1, "0.1.0", 1)
    data, _ = encode_archive(header, sm.snapshot())
    if version_override is not None:
        data = data[:8] + struct.pack(">H", version_override) + data[10:]
        data = data[:-32] + hashlib.sha256(data[:-32]).digest()
    return data


# --- the format ----------------------------------------------------------------------------------


def test_round_trip_and_digest() -> None:
    sm = sample_state()
    data = make_archive(sm)
    a = decode_archive(data)
    assert data.startswith(ARCHIVE_MAGIC)
    assert a.sha256 == hashlib.sha256(data).hexdigest() and a.size == len(data)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    assert (a.header.cluster_id, a.header.index, a.header.term) == (CLUSTER, sm.applied_index, 3)
    loaded = load_archive_bytes(data)
    assert loaded.state.snapshot() == sm.snapshot()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: b"", "empty"),
        (lambda d: d[:5], "truncated"),
        (lambda d: d[:12], "truncated"),
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"x", "trailing data"),
        (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
        (lambda d: b'{"result": 1}', "bad magic"),
        (lambda d: d[:200] + bytes([d[200] ^ 0x01]) + d[201:], "digest mismatch"),
        (lambda d: d[:-5] + bytes([d[-5] ^ 0x80]) + d[-4:], "digest mismatch"),
    ],
    ids=[
        "empty",
        "5-bytes",
        "12-bytes",
        "half",
        "last-byte",
        "trailing",
        "zip",
        "json",
        "flip",
        "flip-digest",
    ],
)
def test_refusals_name_the_problem(mutate: object, needle: str) -> None:
    data = make_archive(sample_state())
    assert callable(mutate)
    with pytest.raises(ArchiveError, match=needle):
        load_archive_bytes(mutate(data))


def test_newer_format_version_is_refused() -> None:
    data = make_archive(sample_state(), version_override=2)
    with pytest.raises(ArchiveError, match=r"unknown format version 2 \(this build reads versions 1..1\)"):
        decode_archive(data)


def test_newer_state_format_is_refused() -> None:
    sm = sample_state()
    header = ArchiveHeader(CLUSTER, sm.applied_index, 3, 1.0, 1, "9.0", 99)
    data, _ = encode_archive(header, sm.snapshot())
    with pytest.raises(ArchiveError, match="unknown state format version 99"):
        load_archive_bytes(data)


def test_header_must_match_state() -> None:
    sm = sample_state()
    for header in (
        ArchiveHeader(CLUSTER, sm.applied_index + 1, 3, 1.0, 1, "0.1.0", 1),
        ArchiveHeader("other", sm.applied_index, 3, 1.0, 1, "0.1.0", 1),
    ):
        data, _ = encode_archive(header, sm.snapshot())
        with pytest.raises(ArchiveError, match="invalid state"):
            load_archive_bytes(data)


def _with_digest(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _framed(header: bytes, state: bytes) -> bytes:
    prefix = ARCHIVE_MAGIC + struct.pack(">HI", 1, len(header)) + header + struct.pack(">Q", len(state))
    return _with_digest(prefix + state)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ArchiveError):
        load_archive_bytes(data)
    with contextlib.suppress(ArchiveError):
        load_archive_bytes(ARCHIVE_MAGIC + data)


_SAMPLE = make_archive(sample_state(20))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_archives(data: st.DataObject) -> None:
    """Byte flips, cuts and insertions anywhere, with the digest recomputed half of the time so
    the decoder behind it (header, state) is exercised too."""
    buf = bytearray(_SAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    raw = bytes(buf)
    if data.draw(st.booleans()) and len(raw) > 32:
        raw = _with_digest(raw[:-32])
    with contextlib.suppress(ArchiveError):
        load_archive_bytes(raw)


@settings(max_examples=300, deadline=None)
@given(
    header=st.one_of(
        st.binary(max_size=80),
        st.dictionaries(
            st.sampled_from(["clusterId", "index", "term", "createdAt", "nodeId", "version", "stateFormat"]),
            st.one_of(st.integers(-5, 2**64 - 1), st.floats(), st.text(max_size=5), st.none(), st.booleans()),
        ).map(lambda d: msgpack.packb(d)),
    ),
    state=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.one_of(st.integers(-3, 2**40), st.text(max_size=4), st.binary(max_size=4), st.none()),
            lambda inner: st.lists(inner, max_size=9),
            max_leaves=30,
        ).map(lambda o: msgpack.packb(o, use_bin_type=True)),
    ),
)
def test_fuzz_well_framed_garbage(header: bytes, state: bytes) -> None:
    """Correct framing and digest around arbitrary headers and states: only ArchiveError."""
    with contextlib.suppress(ArchiveError):
        load_archive_bytes(_framed(header, state))


# --- the refounded state ---------------------------------------------------------------------------


def test_refound_keeps_leases_tokens_and_replaces_members_and_join_key() -> None:
    sm = sample_state(8)
    before = sm.leases(limit=100)
    me = Member(
        3, "h:1", "https://h:2", "0.1.0", "sha256:" + "33" * 32, "pem", DrainState.ACTIVE, 1.0, None, False
    )
    admin = ApiToken("aaaaaaaaaaaa", "admin", TokenRole.ADMIN, hash_secret(b"s" * 32), 1.0, None)
    index = sm.applied_index + 1
    sm.refound(index, me, b"n" * 32, admin)
    assert [m.node_id for m in sm.members()] == [3] and sm.pins() == {3: (me.cert_fingerprint,)}
    assert sm.join_key == b"n" * 32 and sm.cluster_id == CLUSTER and sm.applied_index == index
    assert sm.leases(limit=100) == before  # owners 1 and 2 kept although not members
    assert {t.token_id for t in sm.api_tokens()} == {"0123456789ab", "aaaaaaaaaaaa"}
    claims = jointoken.JoinClaims(9, CLUSTER, 10_000, b"t" * 16, "sha256:" + "11" * 32, ("10.0.0.1:7000",))
    old_token = jointoken.mint_join_token(b"k" * 32, claims)  # minted under the archive's key
    assert jointoken.verify_join_token(b"k" * 32, old_token, now=1.0, cluster_id=CLUSTER, node_id=9)
    with pytest.raises(jointoken.JoinTokenError):
        jointoken.verify_join_token(sm.join_key or b"", old_token, now=1.0, cluster_id=CLUSTER, node_id=9)
    again = StateMachine()
    again.restore(sm.snapshot())  # a state with leases of non-members is a valid snapshot
    assert again.snapshot() == sm.snapshot() and again.active_lease_count(1) == 4


# --- the CLI ---------------------------------------------------------------------------------------


def quorumd(*args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quorumd.node.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=preexec_fn,
    )


def test_verify_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.backup"
    good.write_bytes(make_archive(sample_state(7)))
    res = quorumd("backup", "verify", str(good))
    assert res.returncode == 0, res.stderr
    for needle in (
        f"cluster id: {CLUSTER}",
        "members:    2",
        "pools:      1",
        "leases:     7",
        "tokens:     1",
    ):
        assert needle in res.stdout, res.stdout
    assert "created:    2023-11-14T22:13:20Z" in res.stdout
    cases = {
        "empty": (b"", "empty"),
        "cut": (good.read_bytes()[:100], "truncated"),
        "flip": (good.read_bytes()[:90] + b"\xff" + good.read_bytes()[91:], "digest mismatch"),
        "foreign": (b"\x7fELF" + os.urandom(200), "bad magic"),
        "newer": (make_archive(sample_state(), version_override=7), "unknown format version 7"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / f"{name}.backup"
        path.write_bytes(content)
        res = quorumd("backup", "verify", str(path))
        assert res.returncode == 1 and needle in res.stderr, (name, res)
        assert "Traceback" not in res.stderr + res.stdout
    res = quorumd("backup", "verify", str(tmp_path / "missing"))
    assert res.returncode == 1 and "cannot read" in res.stderr and "Traceback" not in res.stderr


def restore_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "restore.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data-dir": str(data_dir),
                "api": {"address": "127.0.0.1", "port": 5999},
                "cluster": {"node-id": 4, "bind-address": "127.0.0.1:7999"},
            }
        )
    )
    return cfg


def test_restore_refusals_write_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "a.backup"
    archive.write_bytes(make_archive(sample_state()))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    res = quorumd("restore", "--config", str(restore_config(tmp_path, busy)), "--from", str(archive))
    assert res.returncode == 2 and str(busy) in res.stderr and "not empty" in res.stderr, res
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]

    for name, content in (("bad", archive.read_bytes()[:-3]), ("empty", b"")):
        bad = tmp_path / f"{name}.backup"
        bad.write_bytes(content)
        for target in (tmp_path / f"absent-{name}", tmp_path / f"empty-{name}"):
            if target.name.startswith("empty"):
                target.mkdir()
            res = quorumd("restore", "--config", str(restore_config(tmp_path, target)), "--from", str(bad))
            assert res.returncode == 1 and ("truncated" in res.stderr or "empty" in res.stderr), res
            assert "Traceback" not in res.stderr
            assert not target.exists() or list(target.iterdir()) == []

    res = quorumd("restore", "--config", str(tmp_path / "nope.yaml"), "--from", str(archive))
    assert res.returncode == 2


def test_restore_writes_a_founder_data_dir(tmp_path: Path) -> None:
    archive = tmp_path / "a.backup"
    archive.write_bytes(make_archive(sample_state(5)))
    target = tmp_path / "fresh"
    res = quorumd("restore", "--config", str(restore_config(tmp_path, target)), "--from", str(archive))
    assert res.returncode == 0, res.stderr
    assert "5 leases" in res.stdout
    for rel in ("admin.token", "node.json", "tls/node.key", "tls/node.crt"):
        assert stat.S_IMODE((target / rel).stat().st_mode) == 0o600, rel
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    again = quorumd("restore", "--config", str(restore_config(tmp_path, target)), "--from", str(archive))
    assert again.returncode == 2 and str(target) in again.stderr


# --- scheduled backups -----------------------------------------------------------------------------


def test_backup_config_keys() -> None:
    cfg = config_from_dict({"cluster": {"node-id": 1}, "backup": {"dir": "/b", "interval": "30m", "keep": 3}})
    assert cfg.backup == BackupConfig(Path("/b"), 1800.0, 3)
    assert config_from_dict({"cluster": {"node-id": 1}}).backup.dir is None


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


@pytest.mark.asyncio
async def test_scheduled_backup_on_a_full_disk_keeps_earlier_archives(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "256k") as mnt:
        bodies = [os.urandom(40_000), os.urandom(40_000), os.urandom(40_000), os.urandom(400_000)]
        served = iter(bodies)
        index = iter(range(10, 100))

        async def archive() -> BackupArchive:
            body = next(served)
            return BackupArchive(body, next(index), hashlib.sha256(body).hexdigest(), CLUSTER)

        metrics = BackupMetrics()
        sched = BackupScheduler(BackupConfig(mnt / "b", 3600.0, 2), 1, CLUSTER, archive, metrics)
        metrics.enable(3600.0, 0.0)
        written = [await sched.run_once() for _ in range(3)]
        assert all(p is not None for p in written)
        kept = sched.archives()
        assert [p.read_bytes() for p in kept] == bodies[1:3]  # keep=2: the oldest pruned
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept)
        assert metrics.counts == {"ok": 3, "failed": 0} and metrics.last_success > 0

        assert await sched.run_once() is None  # 400 kB on a 256 kB disk: ENOSPC
        assert metrics.counts == {"ok": 3, "failed": 1}
        assert [p.read_bytes() for p in sched.archives()] == bodies[1:3]
        assert sorted(os.listdir(mnt / "b")) == sorted(p.name for p in kept)  # no temp file left


def test_first_delay_follows_the_newest_archive(tmp_path: Path) -> None:
    metrics = BackupMetrics()

    async def archive() -> BackupArchive:
        raise AssertionError("not called")

    cid = uuid.uuid4().hex
    sched = BackupScheduler(BackupConfig(tmp_path, 600.0, 2), 2, cid, archive, metrics)
    assert sched.first_delay_seconds(1000.0) == 0.0
    f = tmp_path / f"quorumd-{cid}-20260101T000000Z-n2-5.backup"
    f.write_bytes(b"x")
    os.utime(f, (900.0, 900.0))
    (tmp_path / f"quorumd-{cid}-20270101T000000Z-n3-5.backup").write_bytes(b"other node")
    assert sched.first_delay_seconds(1000.0) == 500.0 and metrics.last_success == 900.0


def test_archive_of_the_first_backup_format_stays_readable(tmp_path: Path) -> None:
    """every later build reads this file (written by the first build that made backups:
    format 1, state format 1). Regenerating it is never the fix for a failure here."""
    path = Path(__file__).parent / "data" / "backup-format1.backup"
    res = quorumd("backup", "verify", str(path))
    assert res.returncode == 0, res.stderr
    assert f"cluster id: {CLUSTER}" in res.stdout and "leases:     5" in res.stdout
    target = tmp_path / "restored"
    done = quorumd("restore", "--config", str(restore_config(tmp_path, target)), "--from", str(path))
    assert done.returncode == 0, done.stderr


class _CountedMetrics(BackupMetrics):
    """Sets ``counted`` at every count, so a test can wait for the scheduler's next result."""

    def __init__(self) -> None:
        super().__init__()
        self.counted = asyncio.Event()

    def count(self, result: str, at: float | None = None) -> None:
        super().count(result, at)
        self.counted.set()

    async def next_count(self, task: asyncio.Task[None]) -> dict[str, int]:
        """The counts after the next result of the scheduler ``task`` (which must not end)."""
        self.counted.clear()
        waiter = asyncio.ensure_future(self.counted.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert waiter in done, f"no result counted; the schedule {task}"
        return dict(self.counts)


@pytest.mark.asyncio
async def test_a_backup_dir_that_cannot_be_made_is_counted_and_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "backups"
    blocker.write_text("a file where the directory should be")
    body = b"archive"

    async def archive() -> BackupArchive:
        return BackupArchive(body, 7, hashlib.sha256(body).hexdigest(), CLUSTER)

    async def ready() -> None:
        return None

    metrics = _CountedMetrics()
    sched = BackupScheduler(BackupConfig(blocker / "q", 0.01, 2), 1, CLUSTER, archive, metrics)
    task = asyncio.create_task(sched.run(ready))
    try:
        assert (await metrics.next_count(task))["failed"] >= 1
        assert metrics.enabled and not task.done()  # exported, so the staleness alert can fire
        blocker.unlink()
        while (await metrics.next_count(task))["ok"] == 0:
            pass
        assert [p.read_bytes() for p in sched.archives()] == [body]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_pruning_never_removes_the_archive_just_written(tmp_path: Path) -> None:
    body = b"new archive"

    async def archive() -> BackupArchive:
        return BackupArchive(body, 9, hashlib.sha256(body).hexdigest(), CLUSTER)

    later = tmp_path / f"quorumd-{CLUSTER}-20990101T000000Z-n1-8.backup"  # written before the clock went back
    later.write_bytes(b"older archive")
    sched = BackupScheduler(BackupConfig(tmp_path, 3600.0, 1), 1, CLUSTER, archive, BackupMetrics())
    path = await sched.run_once()
    assert path is not None and path.read_bytes() == body
    assert sched.archives() == [path]
