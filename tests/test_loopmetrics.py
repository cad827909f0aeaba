"""LoopCounter / LoopHistogram expose exactly what prometheus-client's own metrics would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from quorumd.api import metrics as loopmetrics
from quorumd.api.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0001, 0.00025, 0.001, 0.01, 0.1, 1.0, 5.0)


def _samples(registry: CollectorRegistry) -> set[str]:
    return {
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    }


def test_histogram_matches_prometheus_client_including_bucket_edges() -> None:
    rng = random.Random(7)
    values = [rng.choice([rng.uniform(0, 6), rng.choice(BUCKETS), 0.0]) for _ in range(500)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = LoopHistogram("x_seconds", "doc", ("route",), ours, buckets=BUCKETS)
    ref = Histogram("x_seconds", "doc", ["route"], registry=theirs, buckets=BUCKETS)
    for i, v in enumerate(values):
        route = "/a" if i % 3 else "/b"
        h.observe((route,), v)
        ref.labels(route).observe(v)
    assert _samples(ours) == _samples(theirs)


def test_unlabelled_histogram_is_exposed_at_zero() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    LoopHistogram("y_seconds", "doc", (), ours, buckets=BUCKETS)
    Histogram("y_seconds", "doc", registry=theirs, buckets=BUCKETS)
    assert _samples(ours) == _samples(theirs)


def test_counter_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c = LoopCounter("z_total", "doc", ("method", "status"), ours)
    ref = Counter("z_total", "doc", ["method", "status"], registry=theirs)
    for method, status in [("GET", "200"), ("GET", "200"), ("POST", "201")]:
        c.inc((method, status))
        ref.labels(method, status).inc()
    assert _samples(ours) == _samples(theirs)


def test_label_sets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopmetrics, "MAX_SERIES", 3)
    reg = CollectorRegistry()
    c = LoopCounter("w_total", "doc", ("k",), reg)
    h = LoopHistogram("w_seconds", "doc", ("k",), reg, buckets=BUCKETS)
    for i in range(10):
        c.inc((str(i),))
        h.observe((str(i),), 0.5)
    assert len(c.values) == 4 and c.values[("overflow",)] == 7
    assert len(h.series) == 4 and h.series[("overflow",)][-1] == 3.5
