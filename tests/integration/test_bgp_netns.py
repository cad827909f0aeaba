"""The BGP speaker proven on the wire: a 3-node quorumd cluster whose GoBGP speakers peer with a BIRD
route collector (a different implementation) in its own network namespace.

Topology (tests/chaos/netns.py): namespaces n1..n3 run quorumd (which runs gobgpd), the lab's
collector namespace runs ``bird`` with one passive eBGP session per node (quorumd dials out;
tests/chaos/collector.py, the chaos run's collector). Every check reads the
collector's RIB through its own CLI (``birdc show route protocol nX``):

- the RIB holds exactly the /32 and /128 of each node's active leases;
- a new lease appears, and a released one disappears, within 1 s of the API answer;
- a drain withdraws all of the node's routes within 1 s of the drain call returning; resume
  re-announces them;
- kill -9 of a quorumd drops its session and routes within a few seconds (gobgpd dies with it:
  PR_SET_PDEATHSIG, and no graceful restart is advertised, so BIRD keeps nothing), and its
  restart announces them again;
- ``/status`` and the metrics report what gobgpd holds.

Run alone with ``make bgp-test`` (about a minute); marked ``bgp`` so ``make unit`` skips it.
Everything it starts (processes, namespaces) is removed at the end, also on failure.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.bgp_support import kill_quietly, process_gone
from tests.chaos.collector import Collector, bgp_section
from tests.chaos.netns import NetLab
from tests.chaos.nscluster import NsCluster
from tests.cluster import wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.bgp,
    pytest.mark.slow,
    pytest.mark.xdist_group("bgp-netns"),
    pytest.mark.skipif(
        os.geteuid() != 0
        or not all(shutil.which(p) for p in ("ip", "nft", "gobgpd", "gobgp", "bird", "birdc")),
        reason="needs root, iproute2, nftables and the Debian packages gobgpd and bird2",
    ),
]

APPEAR_SECONDS = 1.0  # within 1 s of the API answer


def v6(lab: NetLab, i: int) -> str:
    return f"fd00:213:{lab.subnet}::{10 + i}"


def prefixes(collector: Collector) -> dict[int, set[str]]:
    """The collector's RIB: prefixes learned from each node's session."""
    return {node: set(routes) for node, routes in collector.routes().items()}


class BgpNsCluster(NsCluster):
    """NsCluster whose nodes run a gobgp speaker peering with the collector."""

    def write_config(self, node: Any, join_token: str | None = None) -> None:
        super().write_config(node, join_token)
        cfg = yaml.safe_load(node.config_path.read_text())
        i = node.node_id
        cfg["bgp"] = {**bgp_section(self.lab, i), "next-hop6": v6(self.lab, i)}
        node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab(3, collector=True) as lab:
        for i in lab.nodes():
            lab.run_in(i, ["ip", "addr", "add", f"{v6(lab, i)}/64", "dev", "eth0", "nodad"])
        # the collector on the nodes' IPv6 link too: the /128 routes' next hops are reachable there
        collector_v6 = ["ip", "addr", "add", f"{v6(lab, 0)}/64", "dev", "eth0", "nodad"]
        subprocess.run(lab.collector_argv(collector_v6), check=True, capture_output=True, timeout=10)
        yield lab


def _our_processes(directory: Path) -> list[int]:
    """Pids whose command line names our test directory (leftovers to remove)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(directory).encode() in cmd and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def scrape(api: str) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(f"{api}/metrics", context=ctx, timeout=5) as resp:
        return str(resp.read().decode())


def prefix_of(address: str) -> str:
    return f"{address}/128" if ":" in address else f"{address}/32"


def timed(what: str, fn: Any, timeout: float) -> float:
    """Seconds until ``fn()`` holds (polled every 10 ms, bounded by ``timeout``)."""
    began = time.monotonic()
    wait_for(what, fn, timeout, interval=0.01)
    return time.monotonic() - began


@pytest.mark.timeout(600)
def test_collector_rib_follows_leases_drain_and_kill(lab: NetLab, tmp_path: Path) -> None:
    collector = Collector(lab, tmp_path, [1, 2, 3])
    cluster = BgpNsCluster(lab, tmp_path)
    timings: dict[str, list[float]] = {}
    try:
        collector.start()
        cluster.form(timeout=120)
        timings["sessions"] = [
            timed(
                "every session established",
                lambda: collector.established() == {1: True, 2: True, 3: True},
                60,
            )
        ]
        for i in (1, 2, 3):  # no graceful restart: a peer keeps nothing when the session goes
            caps = collector.neighbor_capabilities(i)
            assert "Multiprotocol" in caps and "raceful restart" not in caps, caps
        lead = cluster.wait_leader()
        cluster.call(lead, "POST", "/api/v1/pools", {"name": "p4", "cidr": "10.77.0.0/24"})
        cluster.call(lead, "POST", "/api/v1/pools", {"name": "p6", "cidr": "fd00:77::/120"})
        leases: dict[str, dict[str, Any]] = {}  # id -> lease

        def expected() -> dict[int, set[str]]:
            out: dict[int, set[str]] = {1: set(), 2: set(), 3: set()}
            for lease in leases.values():
                out[lease["nodeId"]].add(prefix_of(lease["address"]))
            return out

        def allocate(owner: int, pool: str, holder: str) -> float:
            lease = cluster.call(
                owner, "POST", "/api/v1/leases", {"pool": pool, "holder": holder, "nodeId": owner}
            )
            leases[lease["id"]] = lease
            p = prefix_of(lease["address"])
            return timed(f"{p} at the collector", lambda: p in prefixes(collector)[owner], 10)

        # new leases appear within 1 s of the API answer
        for owner in (1, 2, 3):
            for k, pool in enumerate(("p4", "p4", "p6")):
                timings.setdefault("appear", []).append(allocate(owner, pool, f"ue-{owner}-{k}"))
        assert prefixes(collector) == expected()

        # /status and the metrics say what gobgpd holds (what gobgpd accepted, counted once the
        # node's own CLI call returns: the collector may have the route a moment before)
        for i in (1, 2, 3):
            wait_for(
                f"node {i} reports its prefixes",
                lambda i=i: cluster.status(i)["bgp"]["announcedPrefixes"] == 3,
                10,
            )
            bgp = cluster.status(i)["bgp"]
            assert bgp["speaker"] == "gobgp" and bgp["running"] is True and bgp["announcedPrefixes"] == 3
            assert bgp["peers"] == [{"address": lab.collector_addr, "state": "established"}]
            metrics = scrape(cluster.nodes[i].api)
            assert "quorumd_bgp_announced_prefixes 3.0" in metrics
            assert "quorumd_bgp_speaker_running 1.0" in metrics

        # a released lease disappears within 1 s of the API answer
        for owner in (1, 3):
            lease_id, lease = next((k, v) for k, v in leases.items() if v["nodeId"] == owner)
            cluster.call(owner, "DELETE", f"/api/v1/leases/{lease_id}")
            del leases[lease_id]
            p = prefix_of(lease["address"])
            timings.setdefault("disappear", []).append(
                timed(f"{p} withdrawn", lambda p=p, o=owner: p not in prefixes(collector)[o], 10)
            )
        assert prefixes(collector) == expected()

        # drain withdraws all of node 2's routes within 1 s of the call returning; resume re-announces
        drained = 2
        result = cluster.call(
            1 if drained != 1 else 3, "POST", f"/api/v1/cluster/members/{drained}/drain", {}
        )
        assert result["drainState"] == "drained"
        timings["drain"] = [timed("drain withdraws", lambda: not prefixes(collector)[drained], 10)]
        assert prefixes(collector) == {**expected(), drained: set()}
        # /status follows the read-back (the next pass or poll, well within a second)
        wait_for(
            "status reads back the withdrawal",
            lambda: cluster.status(drained)["bgp"]["announcedPrefixes"] == 0,
            3,
        )
        assert cluster.status(drained)["bgp"]["running"] is False
        cluster.call(1, "POST", f"/api/v1/cluster/members/{drained}/resume", {})
        timings["resume"] = [timed("resume re-announces", lambda: prefixes(collector) == expected(), 10)]

        # kill -9 of quorumd: gobgpd dies with it, the session and its routes go within seconds
        victim = 3
        speaker_pid = cluster.status(victim)["bgp"]["process"]["pid"]
        assert speaker_pid and not process_gone(speaker_pid)
        cluster.kill(victim)
        timings["kill"] = [
            timed(
                "session and routes dropped",
                lambda: not collector.established()[victim] and not prefixes(collector)[victim],
                5,
            )
        ]
        wait_for("gobgpd dies with quorumd", lambda: process_gone(speaker_pid), 5)
        assert prefixes(collector) == {**expected(), victim: set()}
        # its restart announces them again
        cluster.start(victim)
        timings["restart"] = [timed("restart re-announces", lambda: prefixes(collector) == expected(), 90)]
        cluster.wait_ready(victim, 60)
        assert prefixes(collector) == expected()
        # removal: drain (withdraws), then remove; the purged leases are never announced again.
        # (Forced removal of an active node is withdrawn by the removed node's isolation
        # fencing, a removed node is not told, it stops hearing from a quorum.)
        removed = 2
        cluster.call(1, "POST", f"/api/v1/cluster/members/{removed}/drain", {})
        timings["remove"] = [timed("drain before removal", lambda: not prefixes(collector)[removed], 10)]
        cluster.call(1, "DELETE", f"/api/v1/cluster/members/{removed}")
        for lease_id in [k for k, v in leases.items() if v["nodeId"] == removed]:
            del leases[lease_id]
        wait_for("removal seen", lambda: removed not in {m["nodeId"] for m in cluster.members()}, 10)
        assert prefixes(collector) == expected()
        print("bgp timings (s):", {k: [round(x, 3) for x in v] for k, v in timings.items()})
        for key in ("appear", "disappear", "drain"):
            assert max(timings[key]) <= APPEAR_SECONDS, (key, timings[key])
    finally:
        cluster.close()
        collector.stop()
        for pid in _our_processes(tmp_path):  # nothing of ours outlives the test
            kill_quietly(pid)
    assert not _our_processes(tmp_path)
