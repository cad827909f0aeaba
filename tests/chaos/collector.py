"""The route collector of a chaos run with real speakers (``--bgp gobgp``): BIRD in the lab's
collector namespace, one passive eBGP session per node (each node's gobgpd dials out), and a
watch that compares what the collector learned with the cluster's intended state.

The collector is a different BGP implementation from the nodes' speakers, and everything the
route checks see comes from its RIB (``birdc show route``), never from quorumd's own view. Each
node has its own BGP protocol ``n<i>`` (neighbor = the node's current address, AS 65000+i), so
each route is attributed to the session it came from. When a node moves, the collector is told
the new neighbor address (``set_neighbor``: config rewritten, ``birdc configure``) before the
node starts there, as an operator would tell the upstream router.

``RouteWatch.converge`` polls the RIB (bounded) until it equals an expected state, and records a
``RouteCheck`` (what was expected, whether and when it held, the last difference). The checker
``check_routes`` (in ``tests.chaos.netcheckers``) turns the records into violations.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.history import LeaseObs
from tests.chaos.netns import NetLab
from tests.chaos.nscluster import NsCluster
from tests.chaos.workload import POOL
from tests.cluster import ApiCallError, wait_for

COLLECTOR_AS = 64512
SPEAKERS = ("gobgp",)  # quorumd's real backends the chaos run can use
_ROUTE = re.compile(r"^(\S+/\d+)\s+\S+\s+\[n(\d+)\b")
_VIA = re.compile(r"^\s+via\s+(\S+)")

Rib = dict[int, dict[str, str]]  # node -> {prefix: next hop}
Expected = dict[int, dict[str, str]]  # the checked nodes -> {prefix: next hop ("" = any)}


def node_as(node: int) -> int:
    return 65000 + node


def bgp_section(lab: NetLab, node: int) -> dict[str, object]:
    """The ``bgp`` config section of a chaos node with the GoBGP speaker (next-hop defaults to the
    advertise address, so it follows a move)."""
    return {
        "speaker": "gobgp",
        "local-as": node_as(node),
        "peers": [{"address": lab.collector_addr, "remote-as": COLLECTOR_AS}],
    }


def parse_routes(text: str, nodes: list[int]) -> Rib:
    """``birdc show route`` text: each route line names its protocol (``n<i>``); the next ``via``
    line its next hop."""
    out: Rib = {i: {} for i in nodes}
    last: tuple[int, str] | None = None
    for line in text.splitlines():
        m = _ROUTE.match(line)
        if m:
            node, prefix = int(m.group(2)), m.group(1)
            out.setdefault(node, {})[prefix] = ""
            last = (node, prefix)
            continue
        v = _VIA.match(line)
        if v and last is not None:
            out[last[0]][last[1]] = v.group(1)
            last = None
    return out


@dataclass
class Collector:
    """BIRD in ``lab.collector_ns``, read and reconfigured through ``birdc``."""

    lab: NetLab
    directory: Path
    nodes: list[int]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.directory / "bird.ctl"

    @property
    def conf(self) -> Path:
        return self.directory / "bird.conf"

    def config(self) -> str:
        me = self.lab.collector_addr
        out = [
            f"router id {me};",
            "protocol device {}",
            "template bgp quorumd {",
            f"  local {me} as {COLLECTOR_AS};",
            "  passive on;",  # the nodes dial out
            "  ipv4 { import all; export none; };",
            "  ipv6 { import all; export none; };",
            "}",
        ]
        for i in self.nodes:
            out.append(f"protocol bgp n{i} from quorumd {{ neighbor {self.lab.addr(i)} as {node_as(i)}; }}")
        return "\n".join(out) + "\n"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        pidfile = self.directory / "bird.pid"
        argv = ["bird", "-f", "-c", str(self.conf), "-s", str(self.sock), "-P", str(pidfile)]
        with open(self.directory / "bird.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.lab.collector_argv(argv),
                stdout=log,
                stderr=log,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bird exited with {self.proc.returncode}; see {self.directory}/bird.log")
            try:
                return "Daemon is up" in self.birdc("show", "status")
            except OSError:
                return False

        wait_for("bird control socket", up, 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def birdc(self, *args: str) -> str:
        argv = ["birdc", "-s", str(self.sock), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        if proc.returncode != 0:
            raise OSError(f"birdc {' '.join(args)}: {proc.returncode} {proc.stderr.strip()}")
        return proc.stdout

    def set_neighbor(self, node: int) -> None:
        """Point the node's session at its current lab address (after a move)."""
        self.conf.write_text(self.config())
        out = self.birdc("configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise OSError(f"birdc configure: {out.strip()}")

    def routes(self) -> Rib:
        return parse_routes(self.birdc("show", "route"), self.nodes)

    def neighbor_capabilities(self, node: int) -> str:
        """The capabilities node ``node``'s speaker advertised (``show protocols all``)."""
        text = self.birdc("show", "protocols", "all", f"n{node}")
        section = text.split("Neighbor capabilities", 1)[1]
        return section.split("Session:", 1)[0]

    def established(self) -> dict[int, bool]:
        states: dict[int, bool] = {}
        for line in self.birdc("show", "protocols").splitlines():
            parts = line.split()
            if parts and re.fullmatch(r"n\d+", parts[0]):
                states[int(parts[0][1:])] = "Established" in line
        return states


@dataclass(frozen=True, slots=True)
class RouteCheck:
    """One bounded wait for the collector's RIB to reach an expected state."""

    label: str
    at: float  # run time of the start of the wait
    expected: dict[int, dict[str, str]]  # node -> {prefix: next hop}, only the nodes checked
    seconds: float | None  # time until it held; None: it never held within the bound
    last_diff: tuple[str, ...] = ()  # the difference at the last look when it never held


def rib_diff(expected: dict[int, dict[str, str]], rib: Rib) -> list[str]:
    """Differences between the expected routes of the checked nodes and the collector's RIB."""
    out = []
    for node, want in sorted(expected.items()):
        got = rib.get(node, {})
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        hops = sorted(p for p in set(want) & set(got) if want[p] and got[p] != want[p])
        if missing:
            out.append(f"node {node}: {len(missing)} routes missing, e.g. {missing[:3]}")
        if extra:
            out.append(f"node {node}: {len(extra)} routes not wanted, e.g. {extra[:3]}")
        if hops:
            p = hops[0]
            out.append(f"node {node}: {len(hops)} routes via other next hops: {p} via {got[p]} not {want[p]}")
    return out


def intended_routes(cluster: NsCluster) -> Expected | None:
    """What the network should see now, from the replicated state (read through the leader,
    linearizable) and the processes the harness runs: each running, unpaused node whose drain
    state is ``active`` announces the host route of every active lease it owns, next hop its
    current address; every other node announces nothing. None when it cannot be read."""
    lid = cluster.leader_id()
    if not lid:
        return None
    try:
        members = cluster.call(lid, "GET", "/api/v1/cluster/members?consistent=true")
        rows = cluster.call(lid, "GET", f"/api/v1/leases?pool={POOL}&limit=10000&consistent=true")
    except (OSError, ApiCallError, ValueError):
        return None
    drain = {int(m["nodeId"]): str(m["drainState"]) for m in members}
    out: Expected = {nid: {} for nid in cluster.nodes}
    for row in rows:
        lease = LeaseObs.from_api(row)
        node = cluster.nodes.get(lease.node_id)
        if node is not None and node.alive() and not node.paused and drain.get(lease.node_id) == "active":
            prefix = f"{lease.address}/{128 if ':' in lease.address else 32}"
            out[lease.node_id][prefix] = node.addr
    return out


@dataclass
class RouteWatch:
    collector: Collector
    now: Callable[[], float]
    bound_seconds: float = 20.0  # the convergence bound after quiescence (or after a fault)
    checks: list[RouteCheck] = field(default_factory=list)

    def converge(self, label: str, expected: Expected | Callable[[], Expected | None]) -> RouteCheck:
        """Poll the RIB (bounded by ``bound_seconds``) until the checked nodes' routes equal the
        expected state; record and return the result. ``expected`` may be a function, evaluated
        at every look (None: the intended state could not be read this time)."""
        at, began = self.now(), time.monotonic()
        deadline = began + self.bound_seconds
        want: Expected = {}
        diff = ["the collector's RIB could not be read"]
        while True:
            got = expected() if callable(expected) else expected
            if got is None:
                diff = ["the intended state could not be read"]
            else:
                want = got
                try:
                    diff = rib_diff(want, self.collector.routes())
                except (OSError, subprocess.TimeoutExpired) as exc:
                    diff = [f"the collector's RIB could not be read: {exc}"]
            if not diff:
                check = RouteCheck(label, at, want, time.monotonic() - began)
                break
            if time.monotonic() >= deadline:
                check = RouteCheck(label, at, want, None, tuple(diff))
                break
            time.sleep(0.1)  # poll interval of a bounded wait
        self.checks.append(check)
        return check

    def withdrawn(self, label: str, nodes: list[int]) -> RouteCheck:
        return self.converge(label, {n: {} for n in nodes})

    def summary(self) -> str:
        done = [c.seconds for c in self.checks if c.seconds is not None]
        failed = len(self.checks) - len(done)
        if not done:
            return f"{len(self.checks)} checks, {failed} never converged"
        done.sort()
        return (
            f"{len(self.checks)} checks, {failed} never converged; convergence median "
            f"{done[len(done) // 2]:.2f}s, max {done[-1]:.2f}s (bound {self.bound_seconds:g}s)"
        )
