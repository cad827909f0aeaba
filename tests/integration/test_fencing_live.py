"""Isolation fencing with real daemons in network namespaces (needs root, ip, nft).

Three nodes, each in its own namespace; faults are nftables drops (``tests/chaos/netns.py``).
election-timeout 500 ms, so isolation-fence-after defaults to 1.5 s. In order, on one cluster:

* a follower cut off from both peers fences within the bound (speaker stopped, every prefix
  withdrawn, /readyz 503 ``isolated``, ``quorumd_node_isolated`` 1, ``node_isolated`` logged) while
  the majority side stays unfenced with its speakers running; after the heal it rejoins (speaker
  back with its lease, metric 0, ``node_rejoined``);
* the same for the leader: it steps down, fences, the others elect a new leader, and after the
  heal it rejoins as a follower;
* a drained node that is cut off and healed rejoins but stays withdrawn (only an active node's
  speaker comes back);
* a node paused with SIGSTOP past the bound fences on waking before it announces a lease that was
  allocated to it while it slept, then rejoins and announces it.

After every heal the union of announced prefixes equals the host routes of the active nodes'
leases. Every wait is a bounded poll; the lab (namespaces, nftables) and the processes are torn
down also when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.netns import NetLab
from tests.chaos.nscluster import NsCluster
from tests.cluster import _SSL, ApiCallError, http, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.xdist_group("fencing"),
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
        reason="needs root, iproute2 and nftables",
    ),
]

ELECTION = 0.5
FENCE_AFTER = 3 * ELECTION  # the default: 3 x election-timeout
# A fence comes at most one check step (<= 0.1 s) after the bound; polls and a loaded 2-core
# machine add the rest. Rejoining takes a heartbeat, catching up and one election timeout of hold.
FENCE_SLACK = 1.5
REJOIN_BOUND = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsCluster]:
    lab = NetLab(3)
    lab.setup()
    c = NsCluster(
        lab,
        tmp_path_factory.mktemp("fencing"),
        cluster_overrides={
            "heartbeat-interval": "100ms",
            "election-timeout": f"{int(ELECTION * 1000)}ms",
            "autopilot": {"server-stabilization-time": "500ms", "reconcile-interval": "200ms"},
        },
    )
    try:
        c.form(timeout=90)
        c.call(c.wait_leader(), "POST", "/api/v1/pools", {"name": "f", "cidr": "10.77.0.0/24"})
        yield c
    finally:
        try:
            for nid in c.nodes:
                if c.nodes[nid].paused:
                    c.unpause(nid)
            c.close()
        finally:
            lab.destroy()


# --- helpers ---------------------------------------------------------------------------------------
def bgp(c: NsCluster, nid: int) -> dict[str, Any]:
    return dict(c.status(nid)["bgp"])


def isolated_metric(c: NsCluster, nid: int) -> float:
    with urllib.request.urlopen(f"{c.nodes[nid].api}/metrics", context=_SSL, timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "quorumd_node_isolated":
                return float(s.value)
    raise AssertionError("quorumd_node_isolated is not exported")


def readyz(c: NsCluster, nid: int) -> tuple[int, Any]:
    status, body, _ = http("GET", f"{c.nodes[nid].api}/readyz", timeout=3)
    return status, body


def lease(c: NsCluster, owner: int, holder: str) -> str:
    res = c.call(c.wait_leader(), "POST", "/api/v1/leases", {"pool": "f", "holder": holder, "nodeId": owner})
    return f"{res['address']}/32"


def expected_announcements(c: NsCluster) -> dict[int, set[str]]:
    """Node -> host routes of its active leases, for every active node (the leader's replica)."""
    lead = c.wait_leader()
    active = {
        m["nodeId"] for m in c.call(lead, "GET", "/api/v1/cluster/members") if m["drainState"] == "active"
    }
    out: dict[int, set[str]] = {n: set() for n in active}
    for x in c.call(lead, "GET", "/api/v1/leases?pool=f"):
        if x["nodeId"] in active:
            out[x["nodeId"]].add(f"{x['address']}/32")
    return out


def announced_union_matches(c: NsCluster) -> bool:
    """Every node announces exactly its active leases' routes (a drained node nothing); the
    per-node sample holds the whole set while a node has at most 5 prefixes."""
    want = expected_announcements(c)
    for nid in c.nodes:
        b = bgp(c, nid)
        have = set(b["samplePrefixes"]) if b["running"] else set()
        if have != want.get(nid, set()) or b["announcedPrefixes"] != len(want.get(nid, set())):
            return False
    return True


def log_of(c: NsCluster, nid: int) -> str:
    return c.nodes[nid].log_path.read_text(errors="replace")


def wait_fenced(c: NsCluster, nid: int, since: float) -> float:
    """Wait until ``nid`` reports itself isolated; returns the seconds since ``since``."""
    wait_for(f"node {nid} fenced", lambda: c.status(nid)["isolated"], FENCE_AFTER + FENCE_SLACK + 5, 0.05)
    return time.monotonic() - since


def check_fenced(c: NsCluster, nid: int) -> None:
    b = bgp(c, nid)
    assert (b["running"], b["announcedPrefixes"]) == (False, 0), b
    status, body = readyz(c, nid)
    assert status == 503 and body["code"] == "isolated", body
    assert isolated_metric(c, nid) == 1
    wait_for(f"node {nid} logs node_isolated", lambda: "node_isolated node=" in log_of(c, nid), 5)


def check_unfenced(c: NsCluster, nid: int) -> None:
    assert c.status(nid)["isolated"] is False
    assert isolated_metric(c, nid) == 0


def wait_rejoined(c: NsCluster, nid: int) -> None:
    wait_for(f"node {nid} rejoined", lambda: not c.status(nid)["isolated"], REJOIN_BOUND, 0.1)
    check_unfenced(c, nid)
    wait_for(f"node {nid} logs node_rejoined", lambda: "node_rejoined node=" in log_of(c, nid), 5)


# --- tests -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def healed_after(cluster: NsCluster) -> Iterator[None]:
    """The module shares one cluster: a test that fails while the lab is cut or a node is stopped
    leaves it healed and running for the next test, which would otherwise fail for that reason."""
    yield
    cluster.lab.heal()
    for nid in cluster.nodes:
        if cluster.nodes[nid].paused:
            cluster.unpause(nid)


def test_cut_off_follower_fences_within_the_bound_and_rejoins_after_the_heal(cluster: NsCluster) -> None:
    c = cluster
    lead = c.wait_leader()
    f, g = sorted(n for n in c.nodes if n != lead)
    pf, pg = lease(c, f, "fol-f"), lease(c, g, "fol-g")
    wait_for("speakers announce the leases", lambda: announced_union_matches(c), 15)
    before = log_of(c, f).count("node_isolated node=")
    t0 = time.monotonic()
    c.lab.isolate(f)
    elapsed = wait_fenced(c, f, t0)
    assert FENCE_AFTER - 0.2 <= elapsed <= FENCE_AFTER + FENCE_SLACK, elapsed
    check_fenced(c, f)
    wait_for("one node_isolated line", lambda: log_of(c, f).count("node_isolated node=") == before + 1, 5)
    # The majority side is not fenced and keeps announcing.
    for nid in (lead, g):
        check_unfenced(c, nid)
        assert bgp(c, nid)["running"] is True
    assert pg in bgp(c, g)["samplePrefixes"]
    c.lab.heal()
    wait_rejoined(c, f)
    wait_for("F announces its lease again", lambda: pf in bgp(c, f)["samplePrefixes"], REJOIN_BOUND)
    wait_for("announcements match the active leases", lambda: announced_union_matches(c), 15)


def test_cut_off_leader_steps_down_fences_and_rejoins(cluster: NsCluster) -> None:
    c = cluster
    old = c.wait_leader()
    p_old = lease(c, old, "lead-old")
    wait_for("announcements before the cut", lambda: announced_union_matches(c), 15)
    t0 = time.monotonic()
    c.lab.isolate(old)
    elapsed = wait_fenced(c, old, t0)
    assert elapsed <= FENCE_AFTER + FENCE_SLACK, elapsed
    check_fenced(c, old)
    assert c.status(old)["role"] != "leader"
    new = int(
        wait_for("a new leader on the majority side", lambda: _leader_among(c, set(c.nodes) - {old}), 15)
    )
    for nid in set(c.nodes) - {old}:
        check_unfenced(c, nid)
    assert new != old
    c.lab.heal()
    wait_rejoined(c, old)
    wait_for("old leader announces its lease again", lambda: p_old in bgp(c, old)["samplePrefixes"], 10)
    wait_for("announcements match the active leases", lambda: announced_union_matches(c), 15)


def _leader_among(c: NsCluster, nodes: set[int]) -> int:
    for nid in sorted(nodes):
        try:
            if c.status(nid, timeout=2)["role"] == "leader":
                return nid
        except (OSError, ApiCallError, ValueError):
            continue
    return 0


def test_drained_node_stays_withdrawn_after_a_heal(cluster: NsCluster) -> None:
    c = cluster
    lead = c.wait_leader()
    f = min(n for n in c.nodes if n != lead)
    assert c.call(lead, "POST", f"/api/v1/cluster/members/{f}/drain", {"deadlineSeconds": 0}) == {
        "drainState": "drained"
    }
    wait_for("F withdrawn", lambda: bgp(c, f)["running"] is False, 10)
    c.lab.isolate(f)
    wait_fenced(c, f, time.monotonic())
    c.lab.heal()
    wait_rejoined(c, f)
    # Rejoined, caught up, and still withdrawn: a drained node's speaker does not come back.
    wait_for("F caught up", lambda: c.status(f)["ready"], 10)
    assert bgp(c, f)["running"] is False and bgp(c, f)["announcedPrefixes"] == 0
    wait_for("announcements match the active leases", lambda: announced_union_matches(c), 15)
    lead = c.wait_leader()
    c.call(lead, "POST", f"/api/v1/cluster/members/{f}/resume")
    wait_for("F announces again after resume", lambda: bgp(c, f)["running"] is True, 10)
    wait_for("announcements match after resume", lambda: announced_union_matches(c), 15)


def test_paused_node_fences_on_waking_before_announcing(cluster: NsCluster) -> None:
    """SIGSTOP past the bound, a lease allocated to the node meanwhile, SIGCONT: the node's first
    speaker action is the fence (it withdraws), the new lease is announced only after it rejoined."""
    c = cluster
    lead = c.wait_leader()
    f = max(n for n in c.nodes if n != lead)
    wait_for("F running", lambda: bgp(c, f)["running"] is True, 10)
    mark = len(log_of(c, f))
    c.pause(f)
    try:
        new = lease(c, f, "asleep")
        # Let the bound pass while F sleeps: the other two keep a quorum, so the lease commits.
        deadline = time.monotonic() + FENCE_AFTER * 2
        wait_for(
            "time passes while F is stopped", lambda: time.monotonic() >= deadline, FENCE_AFTER * 2 + 5, 0.1
        )
    finally:
        c.unpause(f)
    wait_for(
        "F rejoined after waking", lambda: "node_rejoined node=" in log_of(c, f)[mark:], REJOIN_BOUND, 0.1
    )
    text = log_of(c, f)[mark:]
    fenced = re.search(r"node_isolated node=\d+ .*stalled_seconds=(\d+\.\d+)", text)
    assert fenced is not None, text[-3000:]
    assert float(fenced.group(1)) >= FENCE_AFTER, fenced.group(0)
    i_fence = fenced.start()
    i_stop = text.find("bgp_speaker_stopped", i_fence)
    i_rejoin = text.find("node_rejoined node=")
    i_announce = text.find(f"bgp_announce prefix={new}")
    assert 0 <= i_stop < i_rejoin, text[-3000:]
    assert i_announce == -1 or i_announce > i_rejoin, text[-3000:]  # nothing announced while fenced
    # before the fence line, F changed nothing on its speaker after waking
    assert "bgp_announce" not in text[:i_fence] and "bgp_speaker_started" not in text[:i_fence]
    check_unfenced(c, f)
    wait_for("F announces the lease it got while asleep", lambda: new in bgp(c, f)["samplePrefixes"], 10)
    wait_for("announcements match the active leases", lambda: announced_union_matches(c), 15)
