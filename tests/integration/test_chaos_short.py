"""Short real-network chaos runs inside ``make test`` (needs root, ``ip netns`` and ``nft``).

* ``test_lab_moves_a_node_and_removes_everything``: the lab alone (no daemons): a node moves
  back and forth between its address slots, fault rules follow it, and cleanup leaves nothing.
* ``test_chaos_short``: 5 nodes in network namespaces, every nemesis fault (the first round is a
  move of a node to a new address), the lease workload, then every checker must pass.
  ``QUORUMD_CHAOS_SEED`` pins the seed, ``QUORUMD_CHAOS_SECONDS`` the duration (default 120 s),
  ``QUORUMD_CHAOS_BGP=gobgp`` runs real speakers and the route collector (needs gobgpd and BIRD).
* ``test_chaos_detects_planted_bug`` (PLANTED BUG, a self-check of the checkers): the nodes run
  with ``QUORUMD_TEST_BUGS=bug_nonvoter_counts`` (a leader counts nonvoters toward its commit
  quorum), 3 voters + 2 nonvoters, and the nemesis puts the leader with both nonvoters on one side
  of a partition. The old leader keeps committing with the nonvoters while the other two voters
  elect a new leader; some checker must report a violation.

Both runs take one machine-wide flock, so even with pytest-xdist they never overlap (the lab
itself picks a free subnet, so concurrent runs would be correct, just slow on 2 cores); they
are also in one ``xdist_group``.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.chaos.netns import LOCK_DIR, NetLab
from tests.chaos.run import RunConfig, run_chaos

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.xdist_group("chaos"),
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
        reason="needs root, iproute2 and nftables",
    ),
]


@pytest.fixture
def chaos_lock() -> Iterator[None]:
    fd = os.open(LOCK_DIR / "quorumd-chaos-test.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the other chaos test is done
        yield
    finally:
        os.close(fd)


def _seed() -> int:
    env = os.environ.get("QUORUMD_CHAOS_SEED")
    return int(env) if env else random.SystemRandom().randrange(1, 2**31)


LISTEN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7999))
s.listen(16)
s.settimeout(20)
try:
    while True:
        s.accept()[0].close()
except OSError:
    pass
"""
CONNECT = (
    "import socket, sys\n"
    "socket.create_connection((sys.argv[1], 7999), float(sys.argv[2])).close()\n"
    "print('ok')\n"
)


def _reaches(lab: NetLab, src: int, addr: str, timeout: float = 1.0) -> bool:
    """One TCP connection attempt from node ``src``'s namespace to ``addr``."""
    return lab.run_in(src, [sys.executable, "-c", CONNECT, addr, str(timeout)], check=False).strip() == "ok"


@pytest.mark.timeout(120)
def test_lab_moves_a_node_and_removes_everything() -> None:
    lab = NetLab(3, collector=True)
    listener: subprocess.Popen[bytes] | None = None
    try:
        lab.setup()
        first = lab.addr(1)
        lab.isolate(1)  # the other nodes' rules name node 1: they must follow it
        seen = [first]
        for slot in (1, 2, 0, 2):  # on to fresh addresses, back home, and again
            new = lab.move(1, slot)
            assert new == lab.addr(1) and lab.node_addrs(1) == [new]
            for other in (2, 3):
                rules = lab.run_in(other, ["nft", "list", "table", "inet", "chaos"])
                assert f"ip saddr {new} drop" in rules and f"ip daddr {new} drop" in rules, rules
                assert all(f" {a} " not in rules for a in seen if a != new), rules
            seen.append(new)
        assert len(set(seen)) == 3 and seen[3] == first
        listener = subprocess.Popen(lab.exec_argv(1, [sys.executable, "-c", LISTEN, lab.addr(1)]))
        assert not _reaches(lab, 2, lab.addr(1))  # isolated at its new address
        lab.heal()
        attempts = 40  # bounded: at most 40 connection attempts of 0.5 s
        assert any(_reaches(lab, 2, lab.addr(1), 0.5) for _ in range(attempts)), "unreachable after the heal"
        assert not _reaches(lab, 2, first, 0.5)  # nothing answers at the address it left
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        lab.destroy()
    assert lab.left_behind == [] and lab.leftovers() == []


@pytest.mark.timeout(900)
def test_chaos_short(chaos_lock: None) -> None:
    cfg = RunConfig(
        seconds=float(os.environ.get("QUORUMD_CHAOS_SECONDS", "120")),
        seed=_seed(),
        linearizability_budget_seconds=180.0,
        first_faults=("move",),
        bgp=os.environ.get("QUORUMD_CHAOS_BGP", "stub"),
    )
    result = run_chaos(cfg)
    assert result.ok, (
        f"chaos seed {cfg.seed} failed (kept {result.directory}); replay: {cfg.replay_command()}\n"
        + (result.error or "")
        + "\n".join(str(v) for v in result.violations[:20])
        + (f"\nleft over: {result.leftovers}" if result.leftovers else "")
    )
    assert result.summary["moves"], "the first round moves a node"


@pytest.mark.timeout(900)
def test_chaos_detects_planted_bug(chaos_lock: None) -> None:
    """PLANTED BUG: the checkers must catch a leader that commits with nonvoters' acks."""
    cfg = RunConfig(
        seconds=25.0,
        seed=_seed(),
        bugs="bug_nonvoter_counts",
        nonvoters=2,
        faults={"leader_with_nonvoters": 1},
        recover_seconds=20.0,
        converge_seconds=30.0,
        tail_seconds=3.0,
        linearizability_budget_seconds=60.0,
    )
    result = run_chaos(cfg)
    assert result.violations, (
        f"planted bug_nonvoter_counts not detected by any checker (seed {cfg.seed}); "
        f"replay: {cfg.replay_command()}; error: {result.error}"
    )
    print(f"planted bug detected by {sorted(result.checkers_failed())} (seed {cfg.seed})")
    if result.ok is False and not cfg.keep:
        shutil.rmtree(result.directory, ignore_errors=True)  # expected failure: nothing to keep
