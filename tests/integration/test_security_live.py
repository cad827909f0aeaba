"""Security refusals of a running 3-node cluster, each visible in the logs AND in /metrics.

* The cluster port refuses a client with an unpinned, freshly self-signed certificate (also one
  that claims a member's node id), a TLS 1.2 client and plaintext: ``peer_refused reason=...``
  in the log and ``quorumd_transport_refused_connections_total{reason}`` in the metrics.
* A member removed with ``force`` and restarted on its old data dir is refused by every member
  (``not_pinned``) and does not get back in.
* Join tokens: expired, replayed, tampered, wrong node (refused by the joiner itself and, sent
  anyway, by the cluster), wrong cluster, and a joiner whose token pins another leader certificate
  are all refused: the joiner exits non-zero saying why, the cluster logs ``join_refused
  reason=<why>`` and counts ``quorumd_join_tokens_total{result="rejected"}`` (the pin mismatch is
  refused by the joiner before it sends anything: the members log and count ``no_proof``).
  Expired and wrong-cluster tokens carry a valid MAC: the test mints them with the cluster's join
  key read from a copy of a node's log, as an attacker holding the key could.
* TLS: the API refuses plaintext HTTP; certificate, key, token and state files are 0600 and every
  directory of the data dir 0700.
* Brute force on API tokens: after 20 wrong tokens from one address within a minute that address
  gets 429 with Retry-After for its further wrong tokens on that node, while a valid token from
  the same address is still served; logged as ``auth_rate_limited`` and counted by status.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shutil
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from http.client import HTTPSConnection

import pytest
import yaml

from quorumd.node.cluster import pki
from quorumd.node.cluster.service import pack, unpack
from quorumd.node.registry import jointoken
from quorumd.node.registry.commands import MemberContext, encode_member_context
from quorumd.raft.aio.transport import ClusterTransport, RpcUnreachable, join_call
from tests.cluster import _SSL, Cluster, Node, free_port, http, wait_for
from tests.daemon_support import log_lines, metric_sum, node_fingerprint, replica_state

pytestmark = pytest.mark.xdist_group("test_security_live")

MEMBERS = [1, 2, 3]
SECRETS: list[str] = []  # every join token used here: none may ever be logged


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("security"), 3)
    try:
        c.form()
        yield c
    finally:
        c.close()


# --- helpers -------------------------------------------------------------------------------------
def refused(c: Cluster, reason: str) -> float:
    return metric_sum(c, "quorumd_transport_refused_connections_total", MEMBERS, reason=reason)


def rejected_joins(c: Cluster) -> float:
    return metric_sum(c, "quorumd_join_tokens_total", MEMBERS, result="rejected")


def cluster_id(c: Cluster) -> str:
    return str(c.status(1)["clusterId"])


def raft_address(c: Cluster, nid: int) -> str:
    return f"127.0.0.1:{c.nodes[nid].raft_port}"


def outsider(c: Cluster, node_id: int, tag: str, token: str, join_timeout: str | None = None) -> Node:
    """A joiner with its own fresh directory (not registered in ``c.nodes``)."""
    directory = c.directory / tag
    directory.mkdir()
    node = Node(
        node_id=node_id,
        directory=directory,
        raft_port=free_port(),
        api_port=free_port(),
        config_path=directory / "quorumd.yaml",
        log_path=directory / "quorumd.log",
    )
    SECRETS.append(token)
    c.write_config(node, join_token=token)
    if join_timeout is not None:
        cfg = yaml.safe_load(node.config_path.read_text())
        cfg["cluster"]["join-timeout"] = join_timeout
        node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return node


def run_refused_joiner(c: Cluster, node: Node, expect_in_log: str, timeout: float = 60.0) -> str:
    c.start(node)
    assert node.proc is not None
    rc = node.proc.wait(timeout)
    text = node.log_text()
    assert rc == 1, f"joiner exited {rc}:\n{text[-2000:]}"
    assert expect_in_log in text, text[-2000:]
    assert "node_ready" not in text and "api_listening" not in text
    return text


def expect_join_refusal(c: Cluster, reason: str, attempt: Callable[[], object]) -> None:
    """Run ``attempt`` and check the cluster logged and counted one more refusal."""
    logged, counted = len(log_lines(c, f"join_refused reason={reason}", MEMBERS)), rejected_joins(c)
    attempt()
    wait_for(
        f"join refusal {reason} logged",
        lambda: len(log_lines(c, f"join_refused reason={reason}", MEMBERS)) > logged,
    )
    wait_for(f"join refusal {reason} counted", lambda: rejected_joins(c) > counted)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forged(c: Cluster, *, node_id: int, expires_at: int, cluster: str | None = None) -> str:
    """A correctly signed token, minted with the join key read from node 1's log."""
    sm = replica_state(c.nodes[1].data_dir, c.directory)
    assert sm.join_key is not None and sm.cluster_id == cluster_id(c)
    lead = c.wait_leader()
    claims = jointoken.JoinClaims(
        node_id=node_id,
        cluster_id=cluster or sm.cluster_id,
        expires_at=expires_at,
        token_id=secrets.token_bytes(16),
        leader_fingerprint=node_fingerprint(c.nodes[lead].data_dir),
        leader_addresses=(raft_address(c, lead),),
    )
    return jointoken.mint_join_token(sm.join_key, claims)


# --- the cluster port -------------------------------------------------------------------------------
def test_unpinned_certificates_are_refused(sec: Cluster) -> None:
    lead = sec.wait_leader()
    before, lines = refused(sec, "not_pinned"), len(log_lines(sec, "peer_refused reason=not_pinned"))
    fingerprints: list[str] = []

    async def attempt(node_id: int) -> None:
        ident = pki.generate_node_identity(node_id, cluster_id(sec))  # fresh, self-signed, unpinned
        fingerprints.append(ident.fingerprint)
        t = ClusterTransport(
            node_id=node_id,
            cluster_id=cluster_id(sec),
            cert_pem=ident.cert_pem,
            key_pem=ident.key_pem,
            pins={lead: node_fingerprint(sec.nodes[lead].data_dir)},
            addresses={lead: raft_address(sec, lead)},
            on_raft_frame=lambda _frm, _frame: None,
        )
        await t.start("127.0.0.1:0")
        try:
            with pytest.raises(RpcUnreachable):
                await t.rpc(lead, "api.forward", b"", 5.0)
        finally:
            await t.close()

    asyncio.run(attempt(7))  # a stranger
    asyncio.run(attempt(2))  # an impostor claiming a member's node id with its own key
    wait_for("refusals counted", lambda: refused(sec, "not_pinned") >= before + 2)
    new = log_lines(sec, "peer_refused reason=not_pinned")[lines:]
    for fp in fingerprints:
        assert any(fp in line and "WARNING" in line for line in new), new


def test_cluster_port_accepts_only_tls13(sec: Cluster) -> None:
    before = refused(sec, "handshake")
    lead = sec.wait_leader()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["quorumd-raft/1"])
    port = sec.nodes[lead].raft_port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        ctx.wrap_socket(raw).close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plaintext
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except ConnectionError:
            answer = b""
        assert not answer.startswith(b"HTTP/")
    wait_for("TLS refusals counted", lambda: refused(sec, "handshake") >= before + 2)
    assert log_lines(sec, "peer_refused reason=handshake", [lead])
    # The good path: TLS 1.3 handshakes fine (a member would now prove its certificate).
    ok = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ok.check_hostname, ok.verify_mode = False, ssl.CERT_NONE
    ok.set_alpn_protocols(["quorumd-raft/1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ok.wrap_socket(raw) as tls,
    ):
        assert tls.version() == "TLSv1.3" and tls.selected_alpn_protocol() == "quorumd-raft/1"


def test_api_refuses_plaintext_http(sec: Cluster) -> None:
    with socket.create_connection(("127.0.0.1", sec.nodes[1].api_port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except (ConnectionError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    st, _, _ = http("GET", f"{sec.nodes[1].api}/api/v1/status")  # HTTPS is served
    assert st == 200


def test_private_files_and_directories(sec: Cluster) -> None:
    for nid in MEMBERS:
        d = sec.nodes[nid].data_dir
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for name in ("tls/node.key", "tls/node.crt", "tls/api.key", "tls/api.crt", "node.json"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, f"node {nid} {name}"
        for path in [d, *d.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_dir():
                assert mode == 0o700, f"{path} is {oct(mode)}"
            else:
                assert mode & 0o077 == 0, f"{path} is {oct(mode)}"  # 0600 or stricter
    assert stat.S_IMODE((sec.nodes[1].data_dir / "admin.token").stat().st_mode) == 0o600


# --- membership: a removed node ------------------------------------------------------------------------
def test_removed_node_is_refused_and_its_token_cannot_be_replayed(sec: Cluster) -> None:
    node = sec.add_node(5)
    token = (sec.directory / "node5.join-token").read_text().strip()  # the one node 5 consumed
    sec.wait_voters({1, 2, 3, 5})
    fp5 = node_fingerprint(node.data_dir)
    assert sec.stop(5) == 0  # gone before its removal: it never learns about it
    lead = sec.wait_leader()
    st, body, _ = sec.api(lead, "DELETE", "/api/v1/cluster/members/5?force=true")
    assert st == 200, body
    sec.wait_voters({1, 2, 3})
    before, lines = refused(sec, "not_pinned"), len(log_lines(sec, f"fingerprint={fp5}", MEMBERS))

    sec.restart(5)  # its old data dir: it still believes it is a voter and campaigns
    wait_for("the removed node refused", lambda: refused(sec, "not_pinned") > before, 30)
    new = log_lines(sec, f"fingerprint={fp5}", MEMBERS)[lines:]
    assert any("peer_refused reason=not_pinned" in line for line in new), new
    assert {m["nodeId"] for m in sec.members()} == {1, 2, 3}
    sec.stop(5)

    # Its join token was consumed: a fresh node 5 replaying it is refused.
    replay = outsider(sec, 5, "replay", token)
    expect_join_refusal(sec, "replayed", lambda: run_refused_joiner(sec, replay, "join refused: replayed"))
    del sec.nodes[5]
    shutil.rmtree(node.data_dir)


# --- join tokens --------------------------------------------------------------------------------------
def test_expired_token_is_refused(sec: Cluster) -> None:
    token = forged(sec, node_id=6, expires_at=int(time.time()) - 60)
    node = outsider(sec, 6, "expired", token)
    expect_join_refusal(sec, "expired", lambda: run_refused_joiner(sec, node, "join refused: expired"))


def test_wrong_cluster_token_is_refused(sec: Cluster) -> None:
    token = forged(sec, node_id=6, expires_at=int(time.time()) + 600, cluster="another-cluster")
    node = outsider(sec, 6, "wrong-cluster", token)
    expect_join_refusal(
        sec, "wrong_cluster", lambda: run_refused_joiner(sec, node, "join refused: wrong_cluster")
    )


def test_tampered_token_is_refused(sec: Cluster) -> None:
    raw = bytearray(unb64(sec.mint(6)))
    claims = jointoken.parse_join_token(b64(bytes(raw)))
    old = pack(claims.expires_at)
    new = pack(claims.expires_at + 86400 * 365)  # a year more, same MAC
    assert len(old) == len(new) and bytes(raw).count(old) == 1
    start = bytes(raw).index(old)
    raw[start : start + len(old)] = new
    node = outsider(sec, 6, "tampered", b64(bytes(raw)))
    expect_join_refusal(sec, "tampered", lambda: run_refused_joiner(sec, node, "join refused: tampered"))


def test_wrong_node_token_is_refused_by_joiner_and_by_cluster(sec: Cluster) -> None:
    token = sec.mint(6)
    # The joiner checks first: node 7 will not even try a token for node 6.
    run_refused_joiner(sec, outsider(sec, 7, "wrong-node", token), "join token is for node 6")
    # A client that skips that check is refused by the cluster.
    lead = sec.wait_leader()
    ident = pki.generate_node_identity(7, cluster_id(sec))
    claims = jointoken.parse_join_token(token)
    context = encode_member_context(
        MemberContext(
            raft_address="127.0.0.1:1",
            api_address="https://127.0.0.1:1",
            binary_version="x",
            cert_fingerprint=ident.fingerprint,
            cert_pem=ident.cert_pem.decode(),
            join_token_id=claims.token_id,
            ts=time.time(),
        )
    )
    payload = pack({"token": token, "node_id": 7, "context": context})

    def attempt() -> None:
        reply = asyncio.run(
            join_call(
                raft_address(sec, lead),
                node_fingerprint(sec.nodes[lead].data_dir),
                payload,
                ident.cert_pem,
                ident.key_pem,
            )
        )
        answer = unpack(reply)
        assert answer["ok"] is False and answer["reason"] == "wrong_node", answer

    expect_join_refusal(sec, "wrong_node", attempt)
    assert 7 not in {m["nodeId"] for m in sec.members()}


def test_joiner_pinned_to_another_leader_certificate_is_refused(sec: Cluster) -> None:
    token = sec.mint(6)
    real_fp = jointoken.parse_join_token(token).leader_fingerprint
    other_fp = pki.generate_node_identity(1, cluster_id(sec)).fingerprint
    raw = unb64(token)
    assert raw.count(real_fp.encode()) == 1
    pinned_elsewhere = b64(raw.replace(real_fp.encode(), other_fp.encode()))
    before, lines = refused(sec, "no_proof"), len(log_lines(sec, "peer_refused reason=no_proof"))
    node = outsider(sec, 6, "wrong-pin", pinned_elsewhere, join_timeout="3s")
    text = run_refused_joiner(sec, node, "could not join within 3s")
    assert "error=JoinPinMismatch detail=" in text and other_fp in text
    # The members saw a TLS client walk away without proving anything; nothing reached the
    # join handler.
    wait_for("pin mismatch counted", lambda: refused(sec, "no_proof") > before)
    assert len(log_lines(sec, "peer_refused reason=no_proof")) > lines


# --- the API ----------------------------------------------------------------------------------------
def get_members(port: int, token: str, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    conn = HTTPSConnection("127.0.0.1", port, timeout=10, context=_SSL, source_address=(source, 0))
    try:
        conn.request("GET", "/api/v1/cluster/members", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        conn.close()


def test_api_token_brute_force_is_rate_limited_per_address(sec: Cluster) -> None:
    """Last in the module: 127.0.0.1's wrong tokens answer 429 on node 3 for a minute."""
    port = sec.nodes[3].api_port
    for i in range(20):
        st, _ = get_members(port, f"qd_guess{i:04d}_{secrets.token_hex(16)}")
        assert st == 401
    st, headers = get_members(port, "qd_guess_final")
    assert st == 429 and int(headers["Retry-After"]) > 0
    assert get_members(port, sec.token)[0] == 200  # a valid token is still served from that address
    assert get_members(port, "qd_guess_again")[0] == 429  # while its guesses stay throttled
    assert get_members(port, "qd_guess_x", source="127.0.0.2")[0] == 401  # another address: counted anew
    assert get_members(sec.nodes[2].api_port, sec.token)[0] == 200  # and the other nodes too
    assert log_lines(sec, "auth_rate_limited client=127.0.0.1", [3])
    assert metric_sum(sec, "quorumd_api_requests_total", [3], status="429") >= 2
    assert metric_sum(sec, "quorumd_api_requests_total", [3], status="401") >= 20


def test_no_secret_in_any_log(sec: Cluster) -> None:
    """Every API and join token used above, and the admin token, never appear in a log file."""
    texts = [p.read_text(errors="replace") for p in sec.directory.rglob("*.log")]
    assert len(texts) >= 3  # the members (and the refused joiners of the tests run before)
    for secret in [sec.token, *SECRETS]:
        assert not any(secret in t for t in texts)
