"""Deterministic simulation sweep: 500 seeds x 8,000 steps over 3- and 5-voter clusters.

Seed s runs with 3 voters when s is even and 5 when odd (``sweep_options``). Every chunk prints
its seeds; a failure prints the violation, the trace tail and the one command that replays it.
"""

from __future__ import annotations

import pytest

from quorumd.raft.sim import SimOptions, run_simulation, sweep_options
from quorumd.raft.sim.__main__ import main

SEEDS = 500
STEPS = 8000
CHUNK = 25


@pytest.mark.parametrize("start", range(0, SEEDS, CHUNK))
def test_sweep_chunk(start: int) -> None:
    print(f"seeds {start}..{start + CHUNK - 1}, {STEPS} steps")
    failures = []
    for opts in sweep_options(CHUNK, start=start, steps=STEPS, nodes=(3, 5)):
        r = run_simulation(opts)
        print(r.summary_line())
        assert r.steps == STEPS or not r.ok
        if not r.ok:
            tail = "\n    ".join(r.trace_tail[-15:])
            failures.append(f"{r.kind}: {r.violation}\n    {tail}\n  replay: {opts.replay_command()}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("seed,nodes", [(7, 3), (8, 5)])
def test_same_seed_same_trace(seed: int, nodes: int) -> None:
    a = run_simulation(SimOptions(seed=seed, steps=3000, nodes=nodes))
    b = run_simulation(SimOptions(seed=seed, steps=3000, nodes=nodes))
    print(a.summary_line())
    assert a.trace_hash == b.trace_hash
    assert a.trace_tail == b.trace_tail
    assert a.stats == b.stats
    c = run_simulation(SimOptions(seed=seed + 1000, steps=3000, nodes=nodes))
    assert c.trace_hash != a.trace_hash


def test_run_exercises_faults() -> None:
    """Across a few seeds every fault and client action actually happens (the sweep is not idle)."""
    totals: dict[str, int] = {}
    for opts in sweep_options(10, start=100, steps=5000):
        r = run_simulation(opts)
        print(r.summary_line(), r.stats_line())
        for k, v in r.stats:
            totals[k] = totals.get(k, 0) + v
    for key in (
        "elections",
        "crashes",
        "crashes_mid_ready",
        "restarts",
        "partitions",
        "transfers",
        "compactions",
        "snapshots_installed",
        "conf_changes",
        "proposals",
        "reads_checked",
        "msgs_lost",
    ):
        assert totals[key] > 0, key


def test_cli_single_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "3", "--steps", "2000", "--nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed=3 nodes=3 steps=2000+")
    assert "hash=" in out and out.rstrip().endswith("ok")


def test_cli_failure_prints_replay(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--seed", "0", "--steps", "3000", "--nodes", "3", "--liveness-ticks", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "VIOLATION liveness" in out
    assert "replay: python -m quorumd.raft.sim --seed 0 --steps 3000 --nodes 3 --liveness-ticks 0" in out


def test_cli_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sweep", "4", "--start", "20", "--steps", "1000", "--nodes", "3,5", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 4 seeds, 4 ok, 0 failed" in out
