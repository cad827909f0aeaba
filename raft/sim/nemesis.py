"""The simulator's nemesis: the faults and membership changes one seed schedules.

``Nemesis.fault`` picks a fault by the run's profile (crash, possibly mid-Ready; partitions, one-way
or two-way; leadership transfer; compaction; campaigns; campaign suppression), ``depose`` crashes
or isolates a fresh leader, and ``member`` drives the configuration toward the target size with
adds, promotions, demotions and removals. Every choice draws from the simulation's one ``Random``
in a fixed order, so a seed replays exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.ready import ConfChangeError, NotLeaderError, ProposalDroppedError, RaftError
from ..core.types import ConfChange, ConfChangeType, NodeId
from .model import EV_FAULT, EV_HEAL, EV_MEMBER, EV_UNSUPPRESS, SimNode
from .network import TICK_UNITS, SimNetwork

if TYPE_CHECKING:
    from .simulator import Simulation


class Nemesis:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def fault(self) -> None:
        sim = self.sim
        rng = sim.rng
        if not sim.chaos:
            return
        sim._push(sim.now + rng.randint(1, 2 * sim.profile.fault_gap_units), (EV_FAULT, None, 0))
        what = rng.choices(sim.fault_names, sim.fault_weights)[0]
        if not sim.live:
            return
        node = sim.nodes[rng.choice(sim.live)]
        leader = sim._leader()
        if leader is not None and what in ("crash", "partition") and rng.random() < 0.5:
            node = leader  # leader churn is where elections, truncation and Figure 8 happen
        core = node.core
        assert core is not None
        if what == "crash":
            down = sum(1 for n in sim.nodes.values() if not n.alive and not n.retired)
            if down >= max(1, sim.opts.nodes // 2):
                return  # keep a majority of the target size running most of the time
            if rng.random() < sim.profile.mid_ready_crash:
                node.doomed = True  # crash while handling its next Ready
                sim._log(f"{sim.now} doom {node.node_id}")
            else:
                sim._crash(node)
        elif what in ("partition", "oneway"):
            ids = [nid for nid in sorted(sim.nodes) if not sim.nodes[nid].retired]
            if len(ids) < 2:
                return
            rng.shuffle(ids)
            if node.node_id in ids:
                ids.remove(node.node_id)
                ids.insert(0, node.node_id)
            if what == "partition":
                cut = rng.randint(1, len(ids) - 1)
                links = SimNetwork.split_links(ids[:cut], ids[cut:], one_way=False)
            elif rng.random() < 0.5:
                links = SimNetwork.split_links(ids[:1], ids[1:], one_way=True)  # cannot send
            else:
                links = SimNetwork.split_links(ids[1:], ids[:1], one_way=True)  # cannot hear
            sim.net.block(links)
            sim.stats["partitions"] += 1
            sim._log(f"{sim.now} {what} {ids}")
            sim._push(sim.now + rng.randint(3, 60) * TICK_UNITS, (EV_HEAL, links, 0))
        elif what == "transfer":
            if leader is None or leader.core is None:
                return
            others = sorted(leader.core.config.voters - {leader.node_id})
            if not others:
                return
            target = rng.choice(others)
            try:
                leader.core.transfer_leadership(target)
            except RaftError:
                return
            sim.stats["transfers"] += 1
            sim._log(f"{sim.now} transfer {leader.node_id}->{target}")
            sim._drain(leader)
        elif what == "compact":
            sim._compact(node)
        elif what == "campaign":
            try:
                core.campaign()
            except RaftError:
                return
            sim.stats["campaigns"] += 1
            sim._log(f"{sim.now} campaign {node.node_id}")
            sim._drain(node)
        elif what == "suppress":
            node.suppressed = True
            core.set_campaign_suppressed(True)
            sim.stats["suppressions"] += 1
            sim._log(f"{sim.now} suppress {node.node_id}")
            sim._push(sim.now + rng.randint(5, 80) * TICK_UNITS, (EV_UNSUPPRESS, node, node.incarnation))
            sim._drain(node)

    def depose(self, node: SimNode) -> None:
        """Crash or isolate a fresh leader: leader churn with divergent, partly replicated logs
        (the ground Figure 8 of the Raft paper grows on)."""
        sim = self.sim
        rng = sim.rng
        down = sum(1 for n in sim.nodes.values() if not n.alive and not n.retired)
        if rng.random() < 0.5 and down < max(1, sim.opts.nodes // 2):
            if rng.random() < sim.profile.mid_ready_crash:
                node.doomed = True
            else:
                sim._crash(node)
            return
        others = [nid for nid in sorted(sim.nodes) if nid != node.node_id and not sim.nodes[nid].retired]
        links = SimNetwork.split_links([node.node_id], others, one_way=False)
        sim.net.block(links)
        sim.stats["partitions"] += 1
        sim._log(f"{sim.now} isolate {node.node_id}")
        sim._push(sim.now + rng.randint(3, 30) * TICK_UNITS, (EV_HEAL, links, 0))

    def member(self) -> None:
        sim = self.sim
        rng = sim.rng
        target = sim.opts.nodes
        growing = len(sim.checker.committed_config.voters) < target
        if not sim.chaos:
            return
        gap = 3 * TICK_UNITS if growing else sim.profile.member_gap_units
        sim._push(sim.now + rng.randint(1, 2 * gap), (EV_MEMBER, None, 0))
        leader = sim._leader()
        if leader is None or leader.core is None:
            return
        cfg = leader.core.config
        voters = sorted(cfg.voters)
        nonvoters = sorted(cfg.nonvoters)
        options: list[tuple[ConfChangeType, NodeId]] = []
        if len(voters) < target:
            if nonvoters:
                options = [(ConfChangeType.PROMOTE, n) for n in nonvoters]
            else:
                options = [(ConfChangeType.ADD_NONVOTER, 0)]
        else:
            if len(voters) + len(nonvoters) < target + 2:
                options.append((ConfChangeType.ADD_NONVOTER, 0))
            if len(voters) < target + 1:
                options += [(ConfChangeType.PROMOTE, n) for n in nonvoters]
            if len(voters) > max(1, target - 1):
                options += [(ConfChangeType.DEMOTE, n) for n in voters]
                options += [(ConfChangeType.REMOVE, n) for n in voters]
            options += [(ConfChangeType.REMOVE, n) for n in nonvoters]
        if not options:
            return
        kind, nid = rng.choice(options)
        if kind == ConfChangeType.ADD_NONVOTER:
            nid = sim.next_id  # a fresh id: removed nodes come back as new members
        try:
            index = leader.core.propose_conf_change(ConfChange(kind, nid))
        except (ConfChangeError, NotLeaderError, ProposalDroppedError):
            sim._log(f"{sim.now} conf {kind.name} {nid} refused")
            return
        sim._log(f"{sim.now} conf {kind.name} {nid} at i{index} via {leader.node_id}")
        if kind == ConfChangeType.ADD_NONVOTER:
            sim._start(sim._new_node())
        sim._drain(leader)
