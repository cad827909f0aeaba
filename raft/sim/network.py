"""The simulated network: per-message fate (drop, duplicate, delay) and partitions.

Time is in simulator units (``TICK_UNITS`` per node tick). Every decision draws from the run's one
``random.Random``. Partitions are reference-counted directed links, so overlapping partitions heal
independently; a link blocked at send time or at delivery time loses the message. A symmetric
partition blocks both directions, a one-way partition only one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.types import NodeId

TICK_UNITS = 100

Link = tuple[NodeId, NodeId]


@dataclass(frozen=True, slots=True)
class NetworkProfile:
    drop: float = 0.02  # probability a message is lost
    dup: float = 0.02  # probability a message is delivered twice
    slow: float = 0.02  # probability of a long delay (reordering across many ticks)
    latency_units: int = 40  # normal one-way delay is uniform in [1, latency_units]
    slow_units: int = 10 * TICK_UNITS  # long delays are uniform in [latency_units, slow_units]


CALM = NetworkProfile(drop=0.0, dup=0.0, slow=0.0, latency_units=20)


class SimNetwork:
    __slots__ = ("blocked", "profile", "rng")

    def __init__(self, rng: random.Random, profile: NetworkProfile) -> None:
        self.rng = rng
        self.profile = profile
        self.blocked: dict[Link, int] = {}

    def is_blocked(self, frm: NodeId, to: NodeId) -> bool:
        return (frm, to) in self.blocked

    def block(self, links: Iterable[Link]) -> None:
        for link in links:
            self.blocked[link] = self.blocked.get(link, 0) + 1

    def unblock(self, links: Iterable[Link]) -> None:
        for link in links:
            n = self.blocked.get(link, 0)
            if n <= 1:
                self.blocked.pop(link, None)
            else:
                self.blocked[link] = n - 1

    def heal_all(self) -> None:
        self.blocked.clear()

    def delays(self, frm: NodeId, to: NodeId) -> list[int]:
        """Delivery delays for one sent message: [] = lost, two values = duplicated."""
        if (frm, to) in self.blocked:
            return []
        p = self.profile
        rng = self.rng
        r = rng.random()
        if r < p.drop:
            return []
        out = [self._delay()]
        if r > 1.0 - p.dup:
            out.append(self._delay())
        return out

    def _delay(self) -> int:
        p = self.profile
        if p.slow and self.rng.random() < p.slow:
            return self.rng.randint(p.latency_units, p.slow_units)
        return self.rng.randint(1, p.latency_units)

    @staticmethod
    def split_links(side_a: Iterable[NodeId], side_b: Iterable[NodeId], *, one_way: bool) -> list[Link]:
        """Links cut by a partition from side_a to side_b (and back unless one_way)."""
        b = list(side_b)
        links: list[Link] = []
        for x in side_a:
            for y in b:
                links.append((x, y))
                if not one_way:
                    links.append((y, x))
        return links
