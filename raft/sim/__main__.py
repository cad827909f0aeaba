"""Command line: ``python -m quorumd.raft.sim --seed N --steps M [--nodes K]`` or ``--sweep COUNT``.

Exit status 0 when every run passed, 1 when a run found a violation (the violation, the trace
tail and the replay command are printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .model import BUG_SWITCHES, DEFAULT_LIVENESS_TICKS, SimOptions, SimResult
from .simulator import run_simulation
from .sweep import run_sweep, sweep_options


def _nodes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad node counts {text!r}") from None
    if not out or any(n < 1 or n > 9 for n in out):
        raise argparse.ArgumentTypeError("node counts must be 1..9")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quorumd.raft.sim", description="deterministic Raft simulator")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (single run)")
    p.add_argument("--steps", type=int, default=5000, help="scheduler events before the liveness phase")
    p.add_argument("--nodes", type=_nodes, default=[3], help="target voters, e.g. 3 or 3,5 for a sweep")
    p.add_argument("--bug", action="append", choices=BUG_SWITCHES, default=[], help="engine bug switch")
    p.add_argument("--no-liveness", action="store_true", help="skip the final heal-and-commit check")
    p.add_argument("--liveness-ticks", type=int, default=DEFAULT_LIVENESS_TICKS)
    p.add_argument("--sweep", type=int, default=0, metavar="COUNT", help="run COUNT seeds from --start")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("-v", "--verbose", action="store_true", help="print per-run fault statistics")
    return p


def _report_failure(r: SimResult) -> None:
    print(f"VIOLATION {r.kind}: {r.violation}")
    print(f"last {len(r.trace_tail)} trace events:")
    for line in r.trace_tail:
        print(f"  {line}")
    print(f"replay: {r.options.replay_command()}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bugs = tuple(args.bug)
    if args.sweep:
        opts = sweep_options(args.sweep, start=args.start, steps=args.steps, nodes=args.nodes, bugs=bugs)
        opts = [
            SimOptions(o.seed, o.steps, o.nodes, o.bugs, not args.no_liveness, args.liveness_ticks)
            for o in opts
        ]
        sw = run_sweep(opts, jobs=args.jobs)
        for r in sw.failures:
            print(r.summary_line())
            print(f"  {r.kind}: {r.violation.splitlines()[0] if r.violation else ''}")
            print(f"  replay: {r.options.replay_command()}")
        print(sw.summary_line())
        return 1 if sw.failures else 0
    o = SimOptions(
        seed=args.seed,
        steps=args.steps,
        nodes=args.nodes[0],
        bugs=bugs,
        liveness=not args.no_liveness,
        liveness_ticks=args.liveness_ticks,
    )
    r = run_simulation(o)
    print(r.summary_line())
    if args.verbose:
        print(r.stats_line())
    if not r.ok:
        _report_failure(r)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
