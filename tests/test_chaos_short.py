"""Short real-network chaos runs inside ``make test`` (needs root, ``ip netns`` and ``nft``).

* ``test_chaos_short``: 5 nodes in network namespaces, every nemesis fault, the lease workload,
  then every checker must pass. ``QUORUMD_CHAOS_SEED`` pins the seed, ``QUORUMD_CHAOS_SECONDS``
  the duration (default 120 s).
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
from collections.abc import Iterator

import pytest

from tests.chaos.netns import LOCK_DIR
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


@pytest.mark.timeout(900)
def test_chaos_short(chaos_lock: None) -> None:
    cfg = RunConfig(
        seconds=float(os.environ.get("QUORUMD_CHAOS_SECONDS", "120")),
        seed=_seed(),
        linearizability_budget_seconds=180.0,
    )
    result = run_chaos(cfg)
    assert result.ok, (
        f"chaos seed {cfg.seed} failed (kept {result.directory}); replay: {cfg.replay_command()}\n"
        + (result.error or "")
        + "\n".join(str(v) for v in result.violations[:20])
    )


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
