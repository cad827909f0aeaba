"""Network namespaces for chaos runs: one namespace per node, joined by a bridge, faults as
nftables rules inside the node namespaces.

Topology (everything here is created by the run and deleted when it ends)::

    root ns: qc<X>h 10.213.X.1/24 --veth--+
                                          |  ns qc<X>-br: bridge br0
    ns qc<X>-n<i>: eth0 10.213.X.(10+i) --+
    ns qc<X>-c: eth0 10.213.X.2 ----------+  (optional: a route collector)

A node can move (``move``): its namespace's address is replaced by the address of another of its
slots, ``10.213.X.(10 + i + 20 * slot)`` (slot 0 is where it starts), so addresses are never
shared between nodes and a node can move back and forth or on to a fresh address. Addresses live
inside the namespaces, so deleting the namespaces removes every address a run added.

The root namespace gets an address on the bridge so the test process reaches every node's API
directly; that traffic is never filtered. ``X`` is chosen by a free-subnet probe under an flock
(``/run/lock/quorumd-chaos-10.213.X.lock``): the lock is held for the lab's lifetime, so two
concurrent runs never share a subnet, and a lock that can be taken proves its previous holder is
gone, so leftovers of that subnet (namespaces, the host veth) are removed first.

Faults are stateless nftables drops by peer (written with the peer's current address) in each node
namespace's ``inet chaos`` table (chains on the input and output hooks). The whole table is
rewritten atomically (``nft -f -``) from the lab's current rule set at every change (and for the
rules naming a node when it moves). ``tc netem`` is not used.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
HOST_OCTET = 1
COLLECTOR_OCTET = 2
BASE_OCTET = 10
SLOT_STRIDE = 20  # node i's slot k is 10.213.X.(BASE_OCTET + i + SLOT_STRIDE * k)
MAX_NODES = SLOT_STRIDE - 1
MAX_SLOTS = (254 - BASE_OCTET - MAX_NODES) // SLOT_STRIDE + 1


class NetnsError(RuntimeError):
    """A namespace or firewall command failed."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 15.0, stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _subnet_in_use(x: int) -> bool:
    addrs = run(["ip", "-o", "-4", "addr", "show"], check=False)
    return f"10.213.{x}." in addrs


@dataclass
class NetLab:
    """N node namespaces on one bridge. Use as a context manager (or ``setup``/``destroy``)."""

    n_nodes: int
    subnet: int = 0  # X of 10.213.X.0/24; 0 = probe for a free one
    collector: bool = False  # also a namespace for a route collector (``collector_ns``)
    drops: dict[int, set[tuple[str, int]]] = field(default_factory=dict)  # node -> {(hook, peer node)}
    slots: dict[int, int] = field(default_factory=dict)  # node -> its current address slot
    left_behind: list[str] = field(default_factory=list)  # what ``destroy`` could not remove
    _lock_fd: int = -1
    _up: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n_nodes <= MAX_NODES:
            raise ValueError(f"1..{MAX_NODES} nodes")
        self.slots = {i: 0 for i in self.nodes()}

    # --- names and addresses -------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"qc{self.subnet}-br"

    def ns(self, node: int) -> str:
        return f"qc{self.subnet}-n{node}"

    @property
    def host_if(self) -> str:
        return f"qc{self.subnet}h"

    @property
    def host_addr(self) -> str:
        return f"10.213.{self.subnet}.{HOST_OCTET}"

    @property
    def collector_ns(self) -> str:
        return f"qc{self.subnet}-c"

    @property
    def collector_addr(self) -> str:
        return f"10.213.{self.subnet}.{COLLECTOR_OCTET}"

    def slot_addr(self, node: int, slot: int) -> str:
        assert 0 <= slot < MAX_SLOTS, slot
        return f"10.213.{self.subnet}.{BASE_OCTET + node + SLOT_STRIDE * slot}"

    def addr(self, node: int) -> str:
        """The node's current address."""
        return self.slot_addr(node, self.slots[node])

    def nodes(self) -> list[int]:
        return list(range(1, self.n_nodes + 1))

    # --- lifecycle ---------------------------------------------------------------------------------
    def _claim_subnet(self) -> None:
        start = (os.getpid() % 240) + 10
        candidates = [self.subnet] if self.subnet else [((start + k - 1) % 254) + 1 for k in range(254)]
        for x in candidates:
            fd = os.open(LOCK_DIR / f"quorumd-chaos-10.213.{x}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.subnet = x
            self._remove_leftovers()
            if _subnet_in_use(x):  # someone else (not a chaos run) uses it: skip
                os.close(fd)
                continue
            self._lock_fd = fd
            return
        raise NetnsError("no free 10.213.X.0/24 subnet")

    def _remove_leftovers(self) -> None:
        prefix = f"qc{self.subnet}-"
        for line in run(["ip", "netns", "list"], check=False).splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(prefix):
                run(["ip", "netns", "del", name], check=False)
        run(["ip", "link", "del", self.host_if], check=False)

    def setup(self) -> NetLab:
        self._claim_subnet()
        atexit.register(self.destroy)
        self._up = True
        br = self.bridge_ns
        run(["ip", "netns", "add", br])
        run(["ip", "-n", br, "link", "set", "lo", "up"])
        run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i in self.nodes():
            ns = self.ns(i)
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth",
                 "peer", "name", f"p{i}", "netns", br])  # fmt: skip
            run(["ip", "-n", br, "link", "set", f"p{i}", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self.drops[i] = set()
            self._apply(i)
        if self.collector:
            ns = self.collector_ns
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth",
                 "peer", "name", "pc", "netns", br])  # fmt: skip
            run(["ip", "-n", br, "link", "set", "pc", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.collector_addr}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "name", self.host_if, "type", "veth", "peer", "name", "host", "netns", br])
        run(["ip", "-n", br, "link", "set", "host", "master", "br0", "up"])
        run(["ip", "addr", "add", f"{self.host_addr}/24", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        return self

    def destroy(self) -> None:
        """Delete everything this lab created (idempotent; safe from atexit)."""
        if self._up:
            self._up = False
            run(["ip", "link", "del", self.host_if], check=False)
            for i in self.nodes():
                run(["ip", "netns", "del", self.ns(i)], check=False)
            if self.collector:
                run(["ip", "netns", "del", self.collector_ns], check=False)
            run(["ip", "netns", "del", self.bridge_ns], check=False)
            self.left_behind = self.leftovers()  # looked at while the subnet's lock is still held
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)

    def __enter__(self) -> NetLab:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- running things inside ------------------------------------------------------------------
    def exec_argv(self, node: int, argv: Sequence[str]) -> list[str]:
        """``ip netns exec`` execs the command in place, so the child's pid is the command's pid."""
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def run_in(self, node: int, argv: Sequence[str], *, check: bool = True) -> str:
        return run(self.exec_argv(node, argv), check=check)

    def collector_argv(self, argv: Sequence[str]) -> list[str]:
        assert self.collector, "lab made without a collector namespace"
        return ["ip", "netns", "exec", self.collector_ns, *argv]

    def leftovers(self) -> list[str]:
        """Namespaces and host interfaces of this lab's subnet that still exist (after ``destroy``:
        none)."""
        prefix = f"qc{self.subnet}-"
        names = [ln.split()[0] for ln in run(["ip", "netns", "list"], check=False).splitlines() if ln.split()]
        out = [n for n in names if n.startswith(prefix)]
        if run(["ip", "-o", "link", "show", self.host_if], check=False).strip():
            out.append(self.host_if)
        return out

    # --- moving a node ---------------------------------------------------------------------------
    def node_addrs(self, node: int) -> list[str]:
        """The IPv4 addresses on the node namespace's eth0."""
        out = run(["ip", "-n", self.ns(node), "-o", "-4", "addr", "show", "dev", "eth0"])
        return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]

    def move(self, node: int, slot: int) -> str:
        """Give the node the address of ``slot`` instead of its current one; returns the new address.
        The old address is deleted first (deleting a primary address would take the same subnet's
        secondaries with it), so the namespace holds exactly one address afterwards. Fault rules
        naming the node follow it."""
        old, new = self.addr(node), self.slot_addr(node, slot)
        if old == new:
            return new
        ns = self.ns(node)
        run(["ip", "-n", ns, "addr", "del", f"{old}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "addr", "add", f"{new}/24", "dev", "eth0"])
        self.slots[node] = slot
        for i in self.nodes():  # rules are written with addresses: rewrite those naming the node
            if i == node or any(peer == node for _hook, peer in self.drops.get(i, ())):
                self._apply(i)
        return new

    # --- faults --------------------------------------------------------------------------------------
    def _apply(self, node: int) -> None:
        rules_in = "".join(
            f"    ip saddr {self.addr(p)} drop\n" for hook, p in sorted(self.drops[node]) if hook == "input"
        )
        rules_out = "".join(
            f"    ip daddr {self.addr(p)} drop\n" for hook, p in sorted(self.drops[node]) if hook == "output"
        )
        script = (
            "table inet chaos {}\n"
            "delete table inet chaos\n"
            "table inet chaos {\n"
            "  chain input {\n    type filter hook input priority 0; policy accept;\n"
            f"{rules_in}  }}\n"
            "  chain output {\n    type filter hook output priority 0; policy accept;\n"
            f"{rules_out}  }}\n"
            "}\n"
        )
        run(["ip", "netns", "exec", self.ns(node), "nft", "-f", "-"], stdin=script)

    def _set(self, new: dict[int, set[tuple[str, int]]]) -> None:
        for i in self.nodes():
            want = new.get(i, set())
            if want != self.drops.get(i):
                self.drops[i] = set(want)
                self._apply(i)

    def cut_rules(self, pairs: Iterable[tuple[int, int]]) -> dict[int, set[tuple[str, int]]]:
        """Rules that drop every packet from a to b for each (a, b) (one direction each)."""
        new: dict[int, set[tuple[str, int]]] = {i: set() for i in self.nodes()}
        for a, b in pairs:
            new[a].add(("output", b))
            new[b].add(("input", a))
        return new

    def partition(self, groups: Sequence[Iterable[int]]) -> None:
        """Nodes talk only within their group (nodes in no group are cut from everyone)."""
        group_of: dict[int, int] = {}
        for g, members in enumerate(groups):
            for m in members:
                group_of[m] = g
        pairs = [
            (a, b)
            for a in self.nodes()
            for b in self.nodes()
            if a != b and (a not in group_of or b not in group_of or group_of[a] != group_of[b])
        ]
        self._set(self.cut_rules(pairs))

    def isolate(self, node: int) -> None:
        self.partition([[node], [i for i in self.nodes() if i != node]])

    def one_way(self, src: int, dst: int) -> None:
        """Drop every packet from ``src`` to ``dst``; ``dst`` to ``src`` still flows."""
        self._set(self.cut_rules([(src, dst)]))

    def bridge(self, middle: int, left: Iterable[int], right: Iterable[int]) -> None:
        """``left`` and ``right`` cannot see each other; ``middle`` sees both."""
        left_l, right_l = list(left), list(right)
        pairs = [(a, b) for a in left_l for b in right_l] + [(b, a) for a in left_l for b in right_l]
        assert middle not in left_l and middle not in right_l
        self._set(self.cut_rules(pairs))

    def heal(self) -> None:
        self._set({})

    def describe(self) -> str:
        cuts = sorted(
            (p, i) if hook == "input" else (i, p) for i, rules in self.drops.items() for hook, p in rules
        )
        return "none" if not cuts else " ".join(f"{a}->{b}" for a, b in sorted(set(cuts)))
