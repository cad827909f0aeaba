"""What the cluster transport trusts and dials: the pins and addresses the daemon gives it.

Read from the replica (``StateMachine.pins``: one fingerprint per member, two while a member
rotates its certificate) after every applied entry that changes them, plus two local exceptions:
a joiner trusts what the join answered until its own replica lists it, and a member the replica
removed keeps its pin while an answer to it is being written (``ClusterService.pin_kept``).
Where to dial a member is the registry's address unless this node holds a local dial hint for it
(``AddressBook.dial_addresses``).
"""

from __future__ import annotations

from quorumd.node.cluster.addresses import AddressBook
from quorumd.node.cluster.service import ClusterService
from quorumd.node.registry.commands import PinCertificate, SetMemberAddress, UnpinCertificate
from quorumd.raft.aio.transport import ClusterTransport
from quorumd.raft.core.types import ConfChange

# applied entries after which the pins are read again
PEERS_CHANGED = (ConfChange, SetMemberAddress, PinCertificate, UnpinCertificate)


class PinBook:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.bootstrap_pins: dict[int, tuple[str, ...]] = {}  # what the join answered
        self.bootstrap_addrs: dict[int, str] = {}
        self._last_pins: dict[int, tuple[str, ...]] = {}
        self._last_addrs: dict[int, str] = {}

    def joined(self, members: list[tuple[int, str, str]]) -> None:
        for nid, raddr, fp in members:
            self.bootstrap_pins[nid] = (fp,)
            self.bootstrap_addrs[nid] = raddr

    def update(self, transport: ClusterTransport, service: ClusterService, addresses: AddressBook) -> None:
        sm = service.sm
        pins = sm.pins()
        addrs = {m.node_id: m.raft_address for m in sm.members()}
        if self.node_id not in pins:
            # Not yet in our own replica (a joiner catching up): trust what the join returned.
            for nid, fp in self.bootstrap_pins.items():
                pins.setdefault(nid, fp)
                addrs.setdefault(nid, self.bootstrap_addrs[nid])
        for nid in service.pins_kept:  # answering a removed member (ClusterService.pin_kept)
            if nid not in pins and nid in self._last_pins:
                pins[nid] = self._last_pins[nid]
                if nid in self._last_addrs:
                    addrs.setdefault(nid, self._last_addrs[nid])
        pins.pop(self.node_id, None)
        addrs.pop(self.node_id, None)  # never dial itself (its own entry may be stale)
        self._last_pins, self._last_addrs = dict(pins), dict(addrs)
        transport.update_pins(pins, addresses.dial_addresses(addrs))
