"""Bearer-token authentication and brute-force protection for the HTTP API.

``authorize`` checks the ``Authorization: Bearer <token>`` header through ``NodeApi.authenticate``
(the node compares hashes in constant time against the replicated token table) and the caller's
role. ``FailedAuthLimiter`` counts failed attempts per client address in a sliding window; once a
client has failed ``max_failures`` times within ``window_seconds`` every authenticated request from
it answers 429 ``rate_limited`` with Retry-After until the oldest failure ages out. The clock is
injected (``time.monotonic`` by default) so tests move time by hand. Requests without any token
are not counted: only presented, wrong tokens are guesses. Tokens are never logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from .errors import Forbidden, TooManyRequests, Unauthorized
from .ports import NodeApi, Principal, TokenRole

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 512


class FailedAuthLimiter:
    """Sliding-window failure counter per client address (bounded memory: LRU of clients)."""

    def __init__(
        self,
        *,
        max_failures: int = 20,
        window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.clock = clock
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def check(self, client: str) -> None:
        """Raise ``TooManyRequests`` while ``client`` is over the limit."""
        now = self.clock()
        times = self._recent(client, now)
        if times is not None and len(times) >= self.max_failures:
            retry = math.ceil(times[0] + self.window_seconds - now)
            raise TooManyRequests("too many failed authentication attempts", retry_after_seconds=retry)

    def record_failure(self, client: str) -> None:
        now = self.clock()
        times = self._recent(client, now)
        if times is None:
            times = self._failures[client] = deque()
        self._failures.move_to_end(client)
        times.append(now)
        if len(times) > self.max_failures:
            times.popleft()
        if len(times) == self.max_failures:
            log.warning("auth_rate_limited client=%s window_seconds=%s", client, self.window_seconds)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or len(token) > MAX_TOKEN_CHARS:
        return None
    return token


def authorize(
    node: NodeApi,
    token: str | None,
    need: TokenRole,
    *,
    client: str | None,
    limiter: FailedAuthLimiter,
) -> Principal:
    """The caller's principal, or 401/403/429. ``client`` None: a forwarded request, whose
    sender already applied the limiter (the leader still re-checks the token itself)."""
    if client is not None:
        limiter.check(client)
    if token is None:
        raise Unauthorized("a bearer token is required")
    principal = node.authenticate(token)
    if principal is None:
        if client is not None:
            limiter.record_failure(client)
        raise Unauthorized("the token is invalid, expired or revoked", invalid_token=True)
    if need == TokenRole.ADMIN and principal.role != TokenRole.ADMIN:
        raise Forbidden("this operation needs an admin token")
    return principal
