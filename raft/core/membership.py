"""Single-server membership changes (thesis 4.1) and quorum arithmetic.

A configuration takes effect on a node as soon as its entry is in that node's log, committed or
not; truncating the entry rolls it back. Only one change may be uncommitted at a time, so the old
and new voter sets always share a majority.
"""

from __future__ import annotations

from collections.abc import Iterable

from .ready import ConfChangeError
from .types import ConfChange, ConfChangeType, Configuration, NodeId


def validate(config: Configuration, cc: ConfChange) -> None:
    """Raise ConfChangeError when ``cc`` cannot apply to ``config``."""
    nid = cc.node_id
    if nid <= 0:
        raise ConfChangeError(f"invalid node id {nid}")
    if cc.type == ConfChangeType.ADD_NONVOTER:
        if nid in config.members():
            raise ConfChangeError(f"node {nid} is already a member")
    elif cc.type == ConfChangeType.PROMOTE:
        if nid in config.voters:
            raise ConfChangeError(f"node {nid} is already a voter")
    elif cc.type == ConfChangeType.DEMOTE:
        if nid not in config.voters:
            raise ConfChangeError(f"node {nid} is not a voter")
        if len(config.voters) == 1:
            raise ConfChangeError("cannot demote the last voter")
    elif cc.type == ConfChangeType.REMOVE:
        if nid not in config.members():
            raise ConfChangeError(f"node {nid} is not a member")
        if config.voters == frozenset({nid}):
            raise ConfChangeError("cannot remove the last voter")
    else:  # pragma: no cover - IntEnum exhausted
        raise ConfChangeError(f"unknown change type {cc.type}")


def apply(config: Configuration, cc: ConfChange) -> Configuration:
    """The configuration after ``cc``. Invalid changes that made it into a log are no-ops,
    so every node derives the same configuration from the same log."""
    try:
        validate(config, cc)
    except ConfChangeError:
        return config
    nid = cc.node_id
    voters, nonvoters = set(config.voters), set(config.nonvoters)
    if cc.type == ConfChangeType.ADD_NONVOTER:
        nonvoters.add(nid)
    elif cc.type == ConfChangeType.PROMOTE:
        nonvoters.discard(nid)
        voters.add(nid)
    elif cc.type == ConfChangeType.DEMOTE:
        voters.discard(nid)
        nonvoters.add(nid)
    else:
        voters.discard(nid)
        nonvoters.discard(nid)
    return Configuration(frozenset(voters), frozenset(nonvoters))


def quorum_index(matches: Iterable[int], quorum: int) -> int:
    """The highest index replicated on at least ``quorum`` of the given match indexes."""
    ordered = sorted(matches, reverse=True)
    if quorum <= 0 or len(ordered) < quorum:
        return 0
    return ordered[quorum - 1]


def has_quorum(granted: Iterable[NodeId], config: Configuration) -> bool:
    return len(config.voters.intersection(granted)) >= config.quorum()
