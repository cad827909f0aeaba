"""GET /api/v1/backup relayed by a follower, with real daemons, on a cluster whose archive is large
enough (~8 MB: 30,000 leases with long holders, restored from an archive built offline, then two
nodes joined) that a relay in 64 KiB chunks is still under way while its client holds back.

* ``test_leader_change_mid_transfer_fails_visibly``: a client of a follower reads the headers and
  a little of the body, then stops reading (a small receive buffer: the follower's relay blocks
  once the socket buffers are full, far short of the end); leadership moves (the leader is
  drained); when the client reads on, its connection ends short of ``Content-Length`` (the
  follower logs the failed relay and the aborted answer). A retry through the same follower
  gets a complete archive made by the new leader.
* ``test_rogue_member_cannot_take_a_backup_without_an_admin_token``: a rogue nonvoter (joined with
  nothing but a join token, tests/rogue_member.py) forwards GET /api/v1/backup to the leader
  without a token, with a bad one and with a readonly one (as a forwarded and as a direct call):
  401/403, no archive made, nothing recorded. ``backup.read`` with a made-up transfer id is
  refused; an archive it opened with the admin token is refused to a readonly token and then gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quorumd.node.cluster.service import pack, unpack
from quorumd.node.registry.archive import decode_archive
from quorumd.node.registry.commands import AllocateLease, encode_command
from quorumd.node.version import PROTOCOL_VERSION
from tests.cluster import _SSL, Cluster, free_port, wait_for
from tests.rogue_member import RogueMember
from tests.test_backup import make_archive, sample_state

pytestmark = pytest.mark.xdist_group("test_backup_relay_live")

CHUNK = 64 * 1024
LEASES = 30_000


def big_archive(path: Path) -> int:
    """An archive of a 2-member state with ``LEASES`` leases of 240-character holders."""
    sm = sample_state(0)
    index = sm.applied_index
    for n in range(LEASES):
        index += 1
        holder = f"holder-{n:06d}-" + "x" * 226
        assert sm.apply(index, encode_command(AllocateLease(101.0, "p", holder, 1 + n % 2))).ok
    data = make_archive(sm)
    path.write_bytes(data)
    return len(data)


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("relay")
    source = base / "seed.backup"
    assert big_archive(source) > 7_000_000
    cl = Cluster(base, 3, env={"QUORUMD_TEST_BACKUP_CHUNK_BYTES": str(CHUNK)})
    try:
        node = cl.make_node(1)
        cl.write_config(node)
        done = subprocess.run(
            [sys.executable, "-m", "quorumd.node.cli", "restore", "--config", str(node.config_path),
             "--from", str(source)], capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        cl.start(node)
        cl.token = (node.data_dir / "admin.token").read_text().strip()
        cl.wait_ready(1, timeout=60)
        for nid in (2, 3):
            cl.add_node(nid)
        cl.wait_voters({1, 2, 3}, timeout=120)
        for nid in (2, 3):
            wait_for(f"node {nid} caught up", lambda nid=nid: cl.applied(nid) >= cl.applied(1), 60)
        wait_for("this protocol", lambda: cl.status(2)["clusterProtocolVersion"] == PROTOCOL_VERSION, 60)
        yield cl
    finally:
        cl.close()


class Download:
    """GET /api/v1/backup over a raw TLS socket with a small receive buffer, read at will."""

    def __init__(self, port: int, token: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        self.sock = _SSL.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock.sendall(
            b"GET /api/v1/backup HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            more = self.sock.recv(4096)
            assert more, buf
            buf += more
        head, self.body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.length = int(self.headers["content-length"])

    def read_some(self, at_least: int) -> None:
        while len(self.body) < at_least:
            more = self.sock.recv(4096)
            assert more
            self.body += more

    def read_rest(self) -> BaseException | None:
        """Read until the server closes; the error that ended it (None: a clean end)."""
        try:
            while more := self.sock.recv(65536):
                self.body += more
        except (OSError, ssl.SSLError) as exc:
            return exc
        finally:
            self.sock.close()
        return None


def test_leader_change_mid_transfer_fails_visibly(c: Cluster) -> None:
    lead = c.wait_leader()
    follower = next(n for n in (1, 2, 3) if n != lead)
    other = next(n for n in (1, 2, 3) if n not in (lead, follower))
    dl = Download(c.nodes[follower].api_port, c.token)
    assert dl.status == 200 and dl.length > 7_000_000
    dl.read_some(CHUNK)  # the relay is under way
    st, body, _ = c.api(other, "POST", f"/api/v1/cluster/members/{lead}/drain", {"deadlineSeconds": 0},
                        timeout=60)  # fmt: skip
    assert st == 200, body
    new = c.wait_leader(exclude={lead}, timeout=60)
    error = dl.read_rest()
    assert len(dl.body) < dl.length, ("the download completed although leadership moved", error)
    log = c.nodes[follower].log_text()
    assert f"backup_relay_failed leader={lead} " in log and "api_stream_aborted" in log

    st, body, _ = c.api(other, "POST", f"/api/v1/cluster/members/{lead}/resume", timeout=30)
    assert st == 200, body
    retry = Download(c.nodes[next(n for n in (1, 2, 3) if n != new)].api_port, c.token)
    assert retry.read_rest() is None and retry.status == 200 and len(retry.body) == retry.length
    assert hashlib.sha256(retry.body).hexdigest() == retry.headers["x-quorumd-backup-sha256"]
    assert decode_archive(retry.body).header.node_id == new


def unpack_json(envelope: bytes) -> dict[str, Any]:
    doc = json.loads(envelope)
    assert isinstance(doc, dict)
    return doc


def _forward(token: str, hops: int, rogue_id: int) -> bytes:
    return pack(["GET", "/api/v1/backup", [], b"", token, hops, "203.0.113.9", rogue_id])


def _exports(c: Cluster, nid: int) -> list[dict[str, Any]]:
    st, body, _ = c.api(nid, "GET", "/api/v1/audit?action=backup_export&limit=1000")
    assert st == 200, body
    return list(body["result"])


def test_rogue_member_cannot_take_a_backup_without_an_admin_token(c: Cluster) -> None:
    cluster_id = str(c.status(1)["clusterId"])
    reader = c.ok(c.wait_leader(), "POST", "/api/v1/tokens", {"name": "viewer", "role": "readonly"})["token"]
    bad = "qd_" + "0" * 12 + "_" + "A" * 43
    rogue_id = 9
    join = c.mint(rogue_id)

    async def scenario() -> dict[str, Any]:
        rogue = RogueMember(rogue_id, cluster_id, join, free_port())
        out: dict[str, Any] = {}
        try:
            await rogue.start([f"127.0.0.1:{c.nodes[n].raft_port}" for n in (1, 2, 3)])
            await asyncio.to_thread(c.wait_member, rogue_id)
            lead = await asyncio.to_thread(c.wait_leader)
            out["lead"] = lead
            out["exports_before"] = len(await asyncio.to_thread(_exports, c, lead))
            for name, token in (("none", ""), ("bad", bad), ("readonly", reader)):
                for hops in (0, 1):
                    kind, raw = await rogue.call(lead, "api.forward", _forward(token, hops, rogue_id), 60)
                    assert kind == "ok", raw
                    status, envelope, _headers, _applied = unpack(raw)
                    out[f"{name}/{hops}"] = (status, unpack_json(envelope)["code"])
            out["exports_after_refusals"] = len(await asyncio.to_thread(_exports, c, lead))
            out["guessed"] = await rogue.call(lead, "backup.read", pack(["ab" * 16, 0, CHUNK, c.token]))
            # an archive it may open (it holds the admin token here), read with a readonly token
            kind, raw = await rogue.call(lead, "api.forward", _forward(c.token, 1, rogue_id), 60)
            status, envelope, _headers, _applied = unpack(raw)
            assert kind == "ok" and status == 200, envelope
            transfer = unpack_json(envelope)["result"]["transfer"]
            out["readonly_read"] = await rogue.call(lead, "backup.read", pack([transfer, 0, CHUNK, reader]))
            out["after_refusal"] = await rogue.call(lead, "backup.read", pack([transfer, 0, CHUNK, c.token]))
            out["removed"] = await rogue.call(lead, "member.remove", pack([rogue_id]))
        finally:
            await rogue.close()
        return out

    out = asyncio.run(scenario())
    for hops in (0, 1):
        assert out[f"none/{hops}"] == (401, "unauthorized"), out
        assert out[f"bad/{hops}"] == (401, "unauthorized"), out
        assert out[f"readonly/{hops}"] == (403, "forbidden"), out
    assert out["exports_after_refusals"] == out["exports_before"]  # nothing made, nothing recorded
    assert out["guessed"][0] == "error" and b"backup_gone" in out["guessed"][1], out["guessed"]
    assert out["readonly_read"][0] == "error" and b"forbidden" in out["readonly_read"][1], out
    assert out["after_refusal"][0] == "error" and b"backup_gone" in out["after_refusal"][1], out
    assert (
        f"internal_rpc_refused method=backup.read node={rogue_id} reason=token"
        in c.nodes[out["lead"]].log_text()
    )
    assert out["removed"][0] == "ok", out["removed"]
    wait_for("rogue removed", lambda: rogue_id not in {m["nodeId"] for m in c.members()})
