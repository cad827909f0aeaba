"""``python -m tests.chaos --minutes M --seed S [--keep] [--bgp gobgp]``: one chaos run (needs root and
ip netns; ``--bgp gobgp`` also gobgpd and BIRD: every node runs a real speaker peering with a route
collector, and the route checks read the collector's RIB).

Also re-checks a kept history offline: ``python -m tests.chaos --check DIR/history.json``.
Exit status: 0 pass, 1 a checker found a violation or the run failed.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from pathlib import Path
from types import FrameType

from tests.chaos.checkers import check_exclusive
from tests.chaos.collector import SPEAKERS
from tests.chaos.history import History
from tests.chaos.linearizability import check_history
from tests.chaos.nemesis import FAULTS
from tests.chaos.run import RunConfig, run_chaos


def _parse_faults(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in FAULTS and name != "leader_with_nonvoters":
            raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")
        out[name] = int(weight or 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the run directory even on success")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--bugs", default="", help="QUORUMD_TEST_BUGS for the nodes (planted bugs)")
    ap.add_argument("--nonvoters", type=int, default=0, help="the last N nodes stay nonvoters")
    ap.add_argument("--faults", type=_parse_faults, default=None, help="name=weight,... (default: all)")
    ap.add_argument(
        "--first-faults",
        type=lambda text: tuple(name for part in text.split(",") for name in _parse_faults(part)),
        default=(),
        help="name,... run first, in this order, before the seeded choice",
    )
    ap.add_argument(
        "--bgp",
        choices=("stub", *SPEAKERS),
        default="stub",
        help="the nodes' BGP speaker: stub (default) or gobgp (gobgpd peering with a BIRD collector)",
    )
    ap.add_argument("--check", type=Path, default=None, help="re-check a saved history.json and exit")
    args = ap.parse_args(argv)

    if args.check:
        history = History.load(args.check)
        bad = check_exclusive(history)
        for v in bad:
            print(v)
        rep = check_history(history)
        print(rep.describe())
        return 0 if rep.ok and not bad else 1

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes or 2.0)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    cfg = RunConfig(
        seconds=seconds,
        seed=seed,
        keep=args.keep,
        directory=args.dir,
        bugs=args.bugs,
        nonvoters=args.nonvoters,
        faults=args.faults or dict(FAULTS),
        linearizability_budget_seconds=max(300.0, seconds),
        bgp=args.bgp,
        first_faults=args.first_faults,
    )
    result = run_chaos(cfg)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
