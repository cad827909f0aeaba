"""The benchmark report's computed verdicts (bench/run.py): the etcd targets are judged on the
median of the paired rounds' ratios when the run has them, on the separate phases otherwise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import run as bench_run


def _round(first: str, q64: float, e64: float, q1: float, e1: float) -> dict[str, Any]:
    return {
        "first": first,
        "loop_ms": 20.0,
        "quorumd_64": {"throughput_ok_per_s": q64, "p50_ms": 10.0},
        "etcd_64": {"throughput_ok_per_s": e64, "p50_ms": 15.0},
        "quorumd_1": {"throughput_ok_per_s": 900.0, "p50_ms": q1},
        "etcd_1": {"throughput_ok_per_s": 1000.0, "p50_ms": e1},
    }


def _results(paired: dict[str, Any] | None) -> dict[str, Any]:
    res: dict[str, Any] = {
        "quorumd": {"wrk": {"1": {"p50_ms": 1.0}, "64": {"throughput_ok_per_s": 3000.0}}},
        "etcd_tls": {"wrk": {"1": {"p50_ms": 1.0}, "64": {"throughput_ok_per_s": 2500.0}}},
    }
    if paired is not None:
        res["paired"] = paired
    return res


def _verdict(report_lines: list[str], target: str) -> tuple[str, str]:
    row = next(line for line in report_lines if line.startswith(f"| {target}"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return cells[1], cells[2]


def test_paired_median_decides_the_etcd_targets() -> None:
    paired = {
        "rounds": [
            _round("quorumd", 3000, 1800, 0.8, 2.0),  # 1.67x, 0.40x
            _round("etcd", 3000, 2100, 1.2, 2.0),  # 1.43x, 0.60x
            _round("quorumd", 3300, 2000, 0.9, 2.0),  # 1.65x, 0.45x
            _round("etcd", 2800, 2000, 0.95, 2.0),  # 1.40x, 0.475x
        ]
    }
    lines = bench_run.targets_table(bench_run.Figures(_results(paired)))
    detail, met = _verdict(lines, "64 clients: >= 1.5x etcd")
    assert detail.startswith("1.54x, median of 4 paired rounds; separate phases: 1.20x")
    assert met == "yes"
    detail, met = _verdict(lines, "1 client: p50 <= 0.8x etcd")
    assert detail.startswith("0.46x, median of 4 paired rounds; separate phases: 1.00x")
    assert met == "yes"
    section = bench_run.paired_section(paired)
    assert section[-1] == "| median | | | | | 1.54x | | | 0.46x |"


@pytest.mark.parametrize("paired", [None, {"rounds": []}])
def test_without_paired_rounds_the_separate_phases_decide(paired: dict[str, Any] | None) -> None:
    lines = bench_run.targets_table(bench_run.Figures(_results(paired)))
    detail, met = _verdict(lines, "64 clients: >= 1.5x etcd")
    assert detail.startswith("1.20x (3,000.0 vs 2,500.0/s)")
    assert met == "no"
    assert bench_run.paired_section(paired) == []


def test_a_round_missing_a_figure_is_left_out_of_the_median() -> None:
    broken = _round("etcd", 3000, 2000, 1.0, 2.0)
    broken["etcd_64"] = {"error": "wrk failed"}
    tput, p50 = bench_run.paired_ratios({"rounds": [_round("quorumd", 3000, 1000, 1.0, 4.0), broken]})
    assert tput == [3.0]
    assert p50 == [0.25, 0.5]
