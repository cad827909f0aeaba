"""Request metrics for the HTTP API, registered on the registry the node layer hands in.

``quorumd_api_requests_total{method,route,status}`` and
``quorumd_api_request_duration_seconds{method,route}``. ``route`` is the route template
(``/api/v1/cluster/members/{id}``) or ``unmatched``; ``method`` is one of the standard HTTP
methods or ``OTHER``, so clients cannot inflate label cardinality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Bound on the cache of labelled children; label sets are few (methods x routes x statuses), the
# bound only guards against a bug producing unbounded labels.
_MAX_CACHED_CHILDREN = 4096


class ApiMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.clock = clock
        self.requests = Counter(
            "quorumd_api_requests_total",
            "HTTP API requests by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "quorumd_api_request_duration_seconds",
            "HTTP API request duration by method and route template.",
            ["method", "route"],
            registry=registry,
        )

        # (method, route, status) -> (requests child, duration child). ``labels()`` validates and
        # joins its arguments and takes a lock on every call; the children never change.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        m = method if method in _METHODS else "OTHER"
        key = (m, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(m, route, str(status)), self.duration.labels(m, route))
            if len(self._children) < _MAX_CACHED_CHILDREN:
                self._children[key] = children
        children[0].inc()
        children[1].observe(max(0.0, seconds))
