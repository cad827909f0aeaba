"""Address changes with real daemons: members restarted at another address, and the operator's PATCH.

One 3-node cluster on 127.0.0.1; nodes move to other loopback addresses (127.0.0.x) and ports,
keeping their data dir, node id and certificate:

- a follower, then the leader, stopped with SIGTERM and started elsewhere; then a follower killed
  with SIGKILL and started elsewhere: each time the node is ready, every node lists it at its new
  raftAddress and apiAddress, autopilot is healthy with failure tolerance 1, and a write through
  the moved node reaches every node. No operator action. The time to healthy is compared with a
  restart on the old address (the target: as fast);
- PATCH for a member that is down: refused PATCHes change nothing, an accepted one is listed by
  every node at once, and the node started at those addresses rejoins;
- a rogue member (a process holding member 3's certificate) asks the leader to move member 2,
  directly and through ``node.propose``: refused, nothing changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from quorumd.node.cluster.addresses import ADDRESS_RPC
from quorumd.node.cluster.service import pack, unpack
from quorumd.node.registry.commands import SetMemberAddress, encode_command
from quorumd.raft.aio.transport import ClusterTransport, RpcRemoteError
from tests.cluster import Cluster, free_port, wait_for
from tests.daemon_support import node_fingerprint, quiesce

pytestmark = pytest.mark.xdist_group("test_addresses_live")
M = "/api/v1/cluster/members"


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("addresses"), 3)
    try:
        cluster.form()
        cluster.ok(cluster.wait_leader(), "POST", "/api/v1/pools", {"name": "moves", "cidr": "10.77.0.0/20"})
        yield cluster
    finally:
        cluster.close()


def addresses(c: Cluster, nid: int) -> tuple[str, str]:
    node = c.nodes[nid]
    return f"{node.host}:{node.raft_port}", f"https://{node.host}:{node.api_port}"


def live(c: Cluster) -> list[int]:
    return [n for n, node in c.nodes.items() if node.alive()]


def listed_everywhere(c: Cluster, nid: int, want: tuple[str, str]) -> bool:
    for n in live(c):
        item = next(m for m in c.ok(n, "GET", M) if m["nodeId"] == nid)
        if (item["raftAddress"], item["apiAddress"]) != want:
            return False
    return True


def healthy(c: Cluster) -> bool:
    ap = c.ok(c.wait_leader(), "GET", "/api/v1/cluster/autopilot")
    alive = all(s["nodeStatus"] == "alive" and s["healthy"] for s in ap["servers"])
    return bool(ap["healthy"] and ap["failureTolerance"] == 1 and alive and len(ap["voters"]) == 3)


def wait_settled(c: Cluster, nid: int, timeout: float = 60.0) -> float:
    """Wait until ``nid`` is ready, listed at its current addresses by every node, and autopilot
    is healthy with failure tolerance 1; returns when that was seen (monotonic)."""
    want = addresses(c, nid)
    c.wait_ready(nid, timeout)
    wait_for(f"node {nid} listed at {want} by every node", lambda: listed_everywhere(c, nid, want), timeout)
    wait_for("autopilot healthy, failure tolerance 1", lambda: healthy(c), timeout)
    return time.monotonic()


def write_through(c: Cluster, nid: int, holder: str, nodes: list[int] | None = None) -> None:
    """A lease allocated through ``nid`` shows up on every live node (or on ``nodes``)."""
    lease = c.ok(nid, "POST", "/api/v1/leases", {"pool": "moves", "holder": holder})

    def everywhere() -> bool:
        return all(
            any(
                x["id"] == lease["id"]
                for x in c.ok(n, "GET", f"/api/v1/leases?pool=moves&after={lease['id'] - 1}")
            )
            for n in (nodes or live(c))
        )

    wait_for(f"lease {lease['id']} (via node {nid}) on every node", everywhere, 30)


def restart_at(c: Cluster, nid: int, host: str | None, *, kill: bool = False) -> float:
    """Stop ``nid`` (SIGTERM, or SIGKILL) and start it on ``host`` with fresh ports (None: where it
    was); returns the monotonic time of the start."""
    if kill:
        c.kill(nid)
    else:
        assert c.stop(nid) == 0
    node = c.nodes[nid]
    if host is not None:
        node.host = host
        node.raft_port, node.api_port = free_port(host), free_port(host)
    c.write_config(node)
    started = time.monotonic()
    c.start(node)
    return started


def test_a_follower_then_the_leader_move_and_the_cluster_heals(c: Cluster) -> None:
    lead = c.wait_leader()
    follower = min(n for n in c.nodes if n != lead)
    wait_settled(c, follower)

    # The reference: the same follower restarted where it was.
    t0 = restart_at(c, follower, None)
    same_place = wait_settled(c, follower) - t0

    t0 = restart_at(c, follower, "127.0.0.21")
    moved = wait_settled(c, follower) - t0
    print(
        f"follower {follower}: healthy {same_place:.2f}s after a restart in place, {moved:.2f}s after a move"
    )
    assert moved <= same_place + 5.0, (moved, same_place)
    write_through(c, follower, "after-follower-move")

    lead = c.wait_leader()
    t0 = restart_at(c, lead, "127.0.0.22")
    moved = wait_settled(c, lead) - t0
    print(f"leader {lead}: healthy {moved:.2f}s after a move")
    assert moved <= same_place + 5.0, (moved, same_place)
    write_through(c, lead, "after-leader-move")
    for n in live(c):
        write_through(c, n, f"everyone-{n}")


def test_a_killed_follower_moves_and_the_cluster_heals(c: Cluster) -> None:
    lead = c.wait_leader()
    victim = max(n for n in c.nodes if n != lead)
    t0 = restart_at(c, victim, "127.0.0.23", kill=True)
    moved = wait_settled(c, victim) - t0
    print(f"node {victim}: healthy {moved:.2f}s after kill -9 and a move")
    write_through(c, victim, "after-kill-move")


def test_patch_for_a_node_that_is_down(c: Cluster) -> None:
    lead = c.wait_leader()
    down = min(n for n in c.nodes if n != lead)
    assert c.stop(down) == 0
    others = live(c)
    via = next(n for n in others if n != lead)  # through a follower: forwarded to the leader
    before = {n: c.ok(n, "GET", M) for n in others}
    readonly = c.ok(lead, "POST", "/api/v1/tokens", {"name": "reader", "role": "readonly"})["token"]
    taken = addresses(c, lead)[0]
    refused: list[tuple[str, Any, str | None, int, str]] = [
        (f"{M}/{down}", {"raftAddress": "0.0.0.0:7000"}, "admin", 400, "invalid_raft_address"),
        (f"{M}/{down}", {"raftAddress": "127.0.0.24"}, "admin", 400, "invalid_raft_address"),
        (f"{M}/{down}", {"apiAddress": "http://127.0.0.24:5002"}, "admin", 400, "invalid_api_address"),
        (f"{M}/{down}", {"apiAddress": "https://127.0.0.24"}, "admin", 400, "invalid_api_address"),
        (f"{M}/{down}", {}, "admin", 400, "missing_field"),
        (f"{M}/{down}", {"raftAddress": taken}, "admin", 409, "address_in_use"),
        (f"{M}/{down}", {"raftAddress": "127.0.0.24:7000"}, readonly, 403, "forbidden"),
        (f"{M}/42", {"raftAddress": "127.0.0.24:7000"}, "admin", 404, "member_not_found"),
        (f"{M}/64", {"raftAddress": "127.0.0.24:7000"}, "admin", 400, "invalid_node_id"),
    ]
    for path, body, token, status, code in refused:
        for n in (lead, via):
            got, resp, _ = c.api(n, "PATCH", path, body, token=token)
            assert (got, resp.get("code")) == (status, code), (n, path, body, resp)
            if status == 400:
                assert (
                    ("raftAddress" in resp["error"])
                    or ("apiAddress" in resp["error"])
                    or code != "invalid_raft_address"
                )
    assert {n: c.ok(n, "GET", M) for n in others} == before  # nothing changed

    node = c.nodes[down]
    node.host = "127.0.0.24"
    node.raft_port, node.api_port = free_port(node.host), free_port(node.host)
    raft, api = addresses(c, down)
    item = c.ok(via, "PATCH", f"{M}/{down}", {"raftAddress": raft, "apiAddress": api})
    assert (item["nodeId"], item["raftAddress"], item["apiAddress"]) == (down, raft, api)
    wait_for("the PATCH on every live node", lambda: listed_everywhere(c, down, (raft, api)), 10)
    c.write_config(node)
    c.start(node)
    wait_settled(c, down)
    write_through(c, down, "after-patch")


def test_a_member_cannot_move_another(c: Cluster) -> None:
    lead = c.wait_leader()
    rogue, target = sorted(n for n in c.nodes if n != lead)
    before = {n: c.ok(n, "GET", M) for n in live(c)}
    rogue_dir = c.nodes[rogue].data_dir
    cluster_id = c.status(lead)["clusterId"]

    async def attempt() -> list[str]:
        t = ClusterTransport(
            node_id=rogue,
            cluster_id=cluster_id,
            cert_pem=(rogue_dir / "tls" / "node.crt").read_bytes(),
            key_pem=(rogue_dir / "tls" / "node.key").read_bytes(),
            pins={lead: node_fingerprint(c.nodes[lead].data_dir)},
            addresses={lead: addresses(c, lead)[0]},
            on_raft_frame=lambda _frm, _frame: None,
        )
        await t.start("127.0.0.1:0")
        answers = []
        try:
            moved = {"raft_address": "127.0.0.66:7000", "api_address": "https://127.0.0.66:5002"}
            raw = await t.rpc(
                lead, ADDRESS_RPC, pack({"node_id": target, "protocol_version": 2, **moved}), 10.0
            )
            answers.append(unpack(raw)["reason"])
            cmd = SetMemberAddress(time.time(), target, moved["raft_address"], moved["api_address"])
            try:
                await t.rpc(lead, "node.propose", encode_command(cmd), 10.0)
                answers.append("accepted")
            except RpcRemoteError as exc:
                answers.append(str(exc))
        finally:
            await t.close()
        return answers

    answers = asyncio.run(attempt())
    assert answers[0] == "forbidden", answers
    assert "forbidden" in answers[1], answers
    lead_log = c.nodes[lead].log_text()
    assert f"member_address_refused from={rogue} target={target} reason=not_own_entry" in lead_log
    # Nothing changed anywhere (let any stray entry apply first, on every live node).
    quiesce(c)
    assert {n: c.ok(n, "GET", M) for n in live(c)} == before


def test_two_members_move_while_the_cluster_has_no_quorum(c: Cluster) -> None:
    """Both followers stop and come back elsewhere: the remaining member alone cannot lead, and
    the two moved members only know each other's old addresses. Each one's announcement tells
    the member it reaches where to dial it, which gives a quorum; a leader that moved too is
    found through the member that reaches it; both moves are recorded."""
    lead = c.wait_leader()
    first, second = sorted(n for n in c.nodes if n != lead)
    assert c.stop(first) == 0 and c.stop(second) == 0
    for nid, host in ((first, "127.0.0.27"), (second, "127.0.0.28")):
        node = c.nodes[nid]
        node.host = host
        node.raft_port, node.api_port = free_port(host), free_port(host)
        c.write_config(node)
    for nid in (first, second):
        c.start(c.nodes[nid])
    for nid in (first, second):
        wait_settled(c, nid)
    for n in live(c):
        write_through(c, n, f"after-double-move-{n}")


def test_every_member_moves_at_once(c: Cluster) -> None:
    """The whole cluster renumbered (every host at a new address, configs updated): no replica
    knows where any other member is. Each node asks the configured peers it has not tried, learns
    from the certificate which member answers there, and dials it there; a leader is elected and
    records every move."""
    for nid in c.nodes:
        assert c.stop(nid) == 0
    for nid, node in c.nodes.items():
        node.host = f"127.0.0.{40 + nid}"
        node.raft_port, node.api_port = free_port(node.host), free_port(node.host)
    for node in c.nodes.values():
        c.write_config(node)  # cluster.peers: the new addresses
    for node in c.nodes.values():
        c.start(node)
    for nid in c.nodes:
        wait_settled(c, nid)
    for n in live(c):
        write_through(c, n, f"after-renumbering-{n}")


def test_a_running_member_corrects_a_wrong_patch(c: Cluster) -> None:
    lead = c.wait_leader()
    target = min(n for n in c.nodes if n != lead)
    real = addresses(c, target)
    item = c.ok(lead, "PATCH", f"{M}/{target}", {"raftAddress": "127.0.0.99:7999"})
    assert item["nodeId"] == target
    wait_for(f"node {target} back at {real} everywhere", lambda: listed_everywhere(c, target, real), 30)
    lines = [line for n in live(c) for line in c.nodes[n].log_text().splitlines()]
    assert any(f"member_address_change node_id={target}" in x and "was=127.0.0.99:7999" in x for x in lines)
    wait_for("autopilot healthy, failure tolerance 1", lambda: healthy(c), 30)
