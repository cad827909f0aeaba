"""Bearer-token authentication and brute-force protection for the HTTP API.

``authorize`` checks the ``Authorization: Bearer <token>`` header through ``NodeApi.authenticate``
(the node compares hashes in constant time against the replicated token table) and the caller's
role. ``FailedAuthLimiter`` counts failed attempts in a sliding window under two keys: the client
(its address; ``member:N`` for requests another member forwarded) and the token id the failed
token presents (``qd_<id>_...``). Once either key has ``max_failures`` failures within
``window_seconds``, further *failing* attempts under that key answer 429 ``rate_limited`` with
Retry-After instead of 401, until the oldest failure ages out.

A valid token is never refused because of other requests' failures: the limiter is consulted
only after a token failed. A flood of guesses from one address (or aimed at one token id from
many addresses) is throttled and logged, while the administrator's token keeps working from that
same address. This costs nothing in protection: a token's secret is 256 random bits, so a guess
never succeeds; what the limiter bounds is the noise (401 logs, metrics) and it signals the flood
with 429. The clock is injected (``time.monotonic`` by default) so tests move time by hand.
Requests without any token are not counted: only presented, wrong tokens are guesses. Tokens are
never logged (a token id is not a secret: it is listed by ``GET /tokens`` and in the audit trail).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from .errors import Forbidden, TooManyRequests, Unauthorized
from .ports import NodeApi, Principal, TokenRole

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 512
# The id part of an API token (``qd_<12 hex>_<secret>``, node/registry/apitoken.py).
_TOKEN_ID = re.compile(r"qd_([0-9a-f]{12})_")


def token_id_of(token: str) -> str | None:
    """The token id a presented token claims (None when it does not look like an API token)."""
    m = _TOKEN_ID.match(token)
    return m.group(1) if m else None


class FailedAuthLimiter:
    """Sliding-window failure counters per key (bounded memory: LRU of keys)."""

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

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, *keys: str | None) -> int | None:
        """Seconds until the first over-limit key among ``keys`` is under the limit again (None:
        none is over the limit)."""
        now = self.clock()
        worst: float | None = None
        for key in keys:
            if key is None:
                continue
            times = self._recent(key, now)
            if times is not None and len(times) >= self.max_failures:
                left = times[0] + self.window_seconds - now
                worst = left if worst is None else max(worst, left)
        return None if worst is None else math.ceil(worst)

    def check(self, client: str) -> None:
        """Raise ``TooManyRequests`` while ``client`` is over the limit."""
        retry = self.retry_after(client)
        if retry is not None:
            raise TooManyRequests("too many failed authentication attempts", retry_after_seconds=retry)

    def record_failure(self, *keys: str | None) -> None:
        now = self.clock()
        for key in keys:
            if key is None:
                continue
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque()
            self._failures.move_to_end(key)
            times.append(now)
            if len(times) > self.max_failures:
                times.popleft()
            if len(times) == self.max_failures:
                log.warning("auth_rate_limited %s window_seconds=%s", _describe(key), self.window_seconds)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def _describe(key: str) -> str:
    return f"token_id={key[6:]}" if key.startswith("token:") else f"client={key}"


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
    """The caller's principal, or 401/403/429 (429 only for a failing token whose client or token
    id is over the failure limit). ``client``: the address, ``member:N`` for a forwarded request,
    None to count the token id only."""
    if token is None:
        raise Unauthorized("a bearer token is required")
    principal = node.authenticate(token)
    if principal is None:
        tid = token_id_of(token)
        keys = (client, f"token:{tid}" if tid is not None else None)
        retry = limiter.retry_after(*keys)
        if retry is not None:
            raise TooManyRequests("too many failed authentication attempts", retry_after_seconds=retry)
        limiter.record_failure(*keys)
        raise Unauthorized("the token is invalid, expired or revoked", invalid_token=True)
    if need == TokenRole.ADMIN and principal.role != TokenRole.ADMIN:
        raise Forbidden("this operation needs an admin token")
    return principal
