"""Fencing tokens: the ``(term, index)`` of the log entry that caused a side effect.

Every side effect of the replicated state (a BGP announce or withdraw, a RAN event) carries the
token of the entry behind it, so a receiver (a router's policy, an AMF) can drop a stale or
reordered effect: tokens order like log positions (term first, then index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, order=True)
class FencingToken:
    term: int
    index: int

    def as_dict(self) -> dict[str, Any]:
        return {"term": self.term, "index": self.index}


NO_TOKEN = FencingToken(0, 0)


def token_of(entries: Sequence[Any], i: int, default: FencingToken | None) -> FencingToken | None:
    """The token of the ``i``-th of the entries being applied (``default`` when unknown)."""
    if i < len(entries):
        e = entries[i]
        return FencingToken(e.term, e.index)
    return default
