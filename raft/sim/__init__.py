"""Deterministic simulator and invariant checkers for the Raft engine.

``run_simulation(SimOptions(seed=...))`` runs one seeded cluster through faults and returns a
``SimResult``; ``python -m quorumd.raft.sim`` is the command line (single seed or ``--sweep``).
Modules: ``simulator`` (scheduler, driver, faults), ``network`` and ``disk`` (fault models),
``checkers`` (invariants), ``app`` (the hash-chain state machine), ``membership`` (configuration
arithmetic), ``sweep`` (many seeds in worker processes).
"""

from __future__ import annotations

from .checkers import SafetyChecker, Violation
from .model import BUG_SWITCHES, SimOptions, SimResult
from .simulator import Simulation, run_simulation
from .sweep import SweepResult, run_sweep, sweep_options

__all__ = [
    "BUG_SWITCHES",
    "SafetyChecker",
    "SimOptions",
    "SimResult",
    "Simulation",
    "SweepResult",
    "Violation",
    "run_simulation",
    "run_sweep",
    "sweep_options",
]
