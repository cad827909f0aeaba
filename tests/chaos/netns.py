"""Network namespaces for chaos runs: one namespace per node, joined by a bridge, faults as
nftables rules inside the node namespaces.

Topology (everything here is created by the run and deleted when it ends)::

    root ns: qc<X>h 10.213.X.1/24 --veth--+
                                          |  ns qc<X>-br: bridge br0
    ns qc<X>-n<i>: eth0 10.213.X.(10+i) --+

The root namespace gets an address on the bridge so the test process reaches every node's API
directly; that traffic is never filtered. ``X`` is chosen by a free-subnet probe under an flock
(``/run/lock/quorumd-chaos-10.213.X.lock``): the lock is held for the lab's lifetime, so two
concurrent runs never share a subnet, and a lock that can be taken proves its previous holder is
gone, so leftovers of that subnet (namespaces, the host veth) are removed first.

Faults are stateless nftables drops by peer address in each node namespace's ``inet chaos``
table (chains on the input and output hooks). The whole table is rewritten atomically
(``nft -f -``) from the lab's current rule set at every change. ``tc netem`` is not used.
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
BASE_OCTET = 10


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
    drops: dict[int, set[tuple[str, str]]] = field(default_factory=dict)  # node -> {(hook, peer addr)}
    _lock_fd: int = -1
    _up: bool = False

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

    def addr(self, node: int) -> str:
        return f"10.213.{self.subnet}.{BASE_OCTET + node}"

    def node_of(self, addr: str) -> int:
        return int(addr.rsplit(".", 1)[1]) - BASE_OCTET

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
            run(["ip", "netns", "del", self.bridge_ns], check=False)
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

    # --- faults --------------------------------------------------------------------------------------
    def _apply(self, node: int) -> None:
        rules_in = "".join(
            f"    ip saddr {a} drop\n" for hook, a in sorted(self.drops[node]) if hook == "input"
        )
        rules_out = "".join(
            f"    ip daddr {a} drop\n" for hook, a in sorted(self.drops[node]) if hook == "output"
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

    def _set(self, new: dict[int, set[tuple[str, str]]]) -> None:
        for i in self.nodes():
            want = new.get(i, set())
            if want != self.drops.get(i):
                self.drops[i] = set(want)
                self._apply(i)

    def cut_rules(self, pairs: Iterable[tuple[int, int]]) -> dict[int, set[tuple[str, str]]]:
        """Rules that drop every packet from a to b for each (a, b) (one direction each)."""
        new: dict[int, set[tuple[str, str]]] = {i: set() for i in self.nodes()}
        for a, b in pairs:
            new[a].add(("output", self.addr(b)))
            new[b].add(("input", self.addr(a)))
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
            (self.node_of(a), i) if hook == "input" else (i, self.node_of(a))
            for i, rules in self.drops.items()
            for hook, a in rules
        )
        return "none" if not cuts else " ".join(f"{a}->{b}" for a, b in sorted(set(cuts)))
