"""Run many seeds in worker processes and summarize (the ``--sweep`` mode of the CLI)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .model import SimOptions, SimResult
from .simulator import run_simulation


@dataclass(frozen=True, slots=True)
class SweepResult:
    results: tuple[SimResult, ...]  # sorted by seed
    seconds: float

    @property
    def failures(self) -> tuple[SimResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    def summary_line(self) -> str:
        n = len(self.results)
        steps = sum(r.steps + r.liveness_steps for r in self.results)
        fails = self.failures
        rate = steps / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"sweep: {n} seeds, {n - len(fails)} ok, {len(fails)} failed, {steps} steps "
            f"in {self.seconds:.1f}s ({rate:.0f} steps/s)"
        )
        if fails:
            line += "; failing seeds: " + " ".join(
                f"{r.options.seed}({r.options.nodes}n:{r.kind})" for r in fails
            )
        return line


def sweep_options(
    count: int,
    *,
    start: int = 0,
    steps: int = 5000,
    nodes: Sequence[int] = (3, 5),
    bugs: tuple[str, ...] = (),
) -> list[SimOptions]:
    """Seeds start..start+count-1; seed s runs with nodes[s % len(nodes)] voters."""
    return [
        SimOptions(seed=s, steps=steps, nodes=nodes[s % len(nodes)], bugs=bugs)
        for s in range(start, start + count)
    ]


def run_sweep(
    options: Sequence[SimOptions], *, jobs: int = 1, on_result: Callable[[SimResult], None] | None = None
) -> SweepResult:
    t0 = time.perf_counter()
    results: list[SimResult] = []
    if jobs <= 1:
        for o in options:
            r = run_simulation(o)
            results.append(r)
            if on_result:
                on_result(r)
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for r in pool.imap_unordered(run_simulation, options, chunksize=1):
                results.append(r)
                if on_result:
                    on_result(r)
    results.sort(key=lambda r: r.options.seed)
    return SweepResult(tuple(results), time.perf_counter() - t0)
