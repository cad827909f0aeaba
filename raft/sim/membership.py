"""Configuration arithmetic the simulator needs independently of the engine.

``apply_conf_change`` is the simulator's own reading of the four change types (it is what the
durable-log-derived configuration is compared against), ``changed_nodes`` counts how many members
a change touched, and ``majorities_overlap`` decides whether two configurations can form disjoint
quorums.
"""

from __future__ import annotations

from ..core.types import ConfChange, ConfChangeType, Configuration, NodeId


def apply_conf_change(config: Configuration, cc: ConfChange) -> Configuration:
    """The configuration after ``cc``; a change that does not fit ``config`` (adding a member,
    promoting a voter, demoting a nonmember or the last voter, removing a nonmember or the last
    voter) is a no-op, so every node derives the same configuration from the same log."""
    voters, nonvoters = set(config.voters), set(config.nonvoters)
    nid = cc.node_id
    t = cc.type
    if nid <= 0:
        return config
    if t == ConfChangeType.ADD_NONVOTER:
        if nid in voters or nid in nonvoters:
            return config
        nonvoters.add(nid)
    elif t == ConfChangeType.PROMOTE:
        if nid in voters:
            return config
        nonvoters.discard(nid)
        voters.add(nid)
    elif t == ConfChangeType.DEMOTE:
        if nid not in voters or len(voters) == 1:
            return config
        voters.discard(nid)
        nonvoters.add(nid)
    else:
        if (nid not in voters and nid not in nonvoters) or voters == {nid}:
            return config
        voters.discard(nid)
        nonvoters.discard(nid)
    return Configuration(voters=frozenset(voters), nonvoters=frozenset(nonvoters))


def changed_nodes(a: Configuration, b: Configuration) -> list[NodeId]:
    """Sorted ids whose suffrage (voter, nonvoter, absent) differs between ``a`` and ``b``."""
    out = []
    for nid in sorted(a.members() | b.members()):
        if (nid in a.voters) != (nid in b.voters) or (nid in a.nonvoters) != (nid in b.nonvoters):
            out.append(nid)
    return out


def majorities_overlap(a: Configuration, b: Configuration) -> bool:
    """True when every majority of ``a``'s voters intersects every majority of ``b``'s voters."""
    if not a.voters or not b.voters:
        return True
    shared = len(a.voters & b.voters)
    need_a = max(0, a.quorum() - len(a.voters - b.voters))
    need_b = max(0, b.quorum() - len(b.voters - a.voters))
    return need_a + need_b > shared


def describe(config: Configuration) -> str:
    return f"voters={sorted(config.voters)} nonvoters={sorted(config.nonvoters)}"
