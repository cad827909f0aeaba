"""Request metrics for the HTTP API, registered on the registry the node layer hands in.

``quorumd_api_requests_total{method,route,status}``,
``quorumd_api_request_duration_seconds{method,route}`` and
``quorumd_api_refused_connections_total{reason}`` (counted by the server) and
``quorumd_api_auth_failures_total{reason}`` (refused requests). ``route`` is the route template
(``/api/v1/cluster/members/{id}``) or ``unmatched``; ``method`` is one of the standard HTTP
methods or ``OTHER``, so clients cannot inflate label cardinality.

Per-write series are kept by ``LoopCounter`` and ``LoopHistogram``: plain counters updated on the
event-loop thread and exposed through prometheus-client's custom-collector interface at scrape
time. prometheus-client's own metric objects take a lock and go through several calls per
increment (five lock round trips per write for the request and commit-latency series); every
update here happens on the one loop thread, and so does the scrape (the /metrics route).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in prometheus-client

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Bound on label sets per metric; label sets are few (methods x routes x statuses), the bound only
# guards against a bug producing unbounded labels (further label sets are counted under the last
# accepted one's family as ``overflow``).
MAX_SERIES = 4096
_OVERFLOW = "overflow"


class LoopCounter:
    """A labelled counter for the event-loop thread (see the module docstring)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        current = values.get(labels)
        if current is None:
            if len(values) >= MAX_SERIES:
                labels = (_OVERFLOW,) * len(self.labelnames)
            current = values.get(labels, 0.0)
        values[labels] = current + amount

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(list(labels), value)
        yield family


class LoopHistogram:
    """A (labelled) histogram for the event-loop thread (see the module docstring). Buckets
    count observations <= their bound, as Prometheus defines them."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = [float(b) for b in buckets if b != float("inf")]
        if self.bounds != sorted(self.bounds) or not self.bounds:
            raise ValueError("histogram buckets must be sorted and non-empty")
        self._le = [_go_float(b) for b in self.bounds] + ["+Inf"]
        # labels -> per-bucket counts (the last slot: above every bound), then the sum
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:  # an unlabelled histogram is exposed (at zero) from the start
            self.series[()] = [0.0] * (len(self.bounds) + 2)
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            if len(self.series) >= MAX_SERIES:
                labels = (_OVERFLOW,) * len(self.labelnames)
            series = self.series.setdefault(labels, [0.0] * (len(self.bounds) + 2))
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(self._le, series[:-1], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, sum_value=series[-1])
        yield family


class ApiMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        self.requests = LoopCounter(
            "quorumd_api_requests_total",
            "HTTP API requests by method, route template and status.",
            ["method", "route", "status"],
            registry,
        )
        self.duration = LoopHistogram(
            "quorumd_api_request_duration_seconds",
            "HTTP API request duration by method and route template.",
            ["method", "route"],
            registry,
        )

        # Counted by quorumd.api.server: connections closed at accept (reason: max_connections,
        # fd_reserve, closing).
        self.refused_connections = LoopCounter(
            "quorumd_api_refused_connections_total",
            "API connections closed at accept: over the connection cap or into the descriptor reserve.",
            ["reason"],
            registry,
        )
        self.auth_failures = LoopCounter(
            "quorumd_api_auth_failures_total",
            "API requests refused by authentication or role (401, 403, 429), by reason.",
            ["reason"],
            registry,
        )

    def count_auth_failure(self, reason: str, source: str | None) -> None:
        """One refused request (``reason``: missing_token, invalid_token, forbidden,
        rate_limited); the pipeline has logged it with ``source``."""
        self.auth_failures.inc((reason,))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        m = method if method in _METHODS else "OTHER"
        self.requests.inc((m, route, str(status)))
        self.duration.observe((m, route), max(0.0, seconds))
