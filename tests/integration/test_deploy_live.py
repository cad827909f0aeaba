"""bringup.py (deploy/compose) against real daemons in network namespaces (the deployment file checks
and bringup.py against a fake API: tests/test_deploy.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chaos.netns import NetLab
from tests.chaos.nscluster import API_PORT, RAFT_PORT, NsCluster
from tests.cluster import wait_for
from tests.test_deploy import COMPOSE

pytestmark = pytest.mark.xdist_group("test_deploy")

# --- bringup.py against real daemons in network namespaces ------------------------------------------


def _netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None


@pytest.mark.netns
@pytest.mark.skipif(not _netns_available(), reason="needs root, iproute2 and nftables (network namespaces)")
@pytest.mark.timeout(300)
def test_bringup_forms_a_cluster_in_network_namespaces(tmp_path: Path) -> None:
    """The compose flow on three network namespaces: node 1 founds; bringup.py (started at the same
    time, as the compose ``init`` service is) waits for the admin token and a leader, mints join
    tokens for nodes 2 and 3 into token files; the joiners start with ``join-token-file`` pointing at
    them and become voters. Nodes bind the wildcard address and advertise their namespace address,
    as in deploy/compose. A second run is a no-op; ``--force`` (verifying node 1's self-signed API
    certificate with ``--cacert``) skips the members (409)."""
    out_dir = tmp_path / "join"

    def compose_style(nc: NsCluster, node_id: int, token_file: Path | None) -> None:
        node = nc.nodes[node_id]
        nc.write_config(node)
        cfg = yaml.safe_load(node.config_path.read_text())
        cfg["api"]["address"] = "0.0.0.0"
        cfg["cluster"]["bind-address"] = f"0.0.0.0:{RAFT_PORT}"
        cfg["cluster"]["peers"] = [f"{n.addr}:{RAFT_PORT}" for n in nc.nodes.values() if n.node_id != node_id]
        if token_file is not None:
            cfg["cluster"]["join-token-file"] = str(token_file)
        node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def bringup(nc: NsCluster, *extra: str) -> subprocess.Popen[str]:
        tls = extra if any(a.startswith("--cacert") for a in extra) else ("--insecure", *extra)
        return subprocess.Popen(
            [
                sys.executable,
                str(COMPOSE / "bringup.py"),
                f"--endpoint=https://{nc.nodes[1].addr}:{API_PORT}",
                f"--token-file={nc.nodes[1].data_dir / 'admin.token'}",
                "--node-ids=2,3",
                f"--out-dir={out_dir}",
                "--poll-interval=0.2",
                "--timeout=90",
                *tls,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    with NetLab(3) as lab:
        nc = NsCluster(lab, tmp_path / "nodes")
        try:
            compose_style(nc, 1, None)
            init = bringup(nc)  # started with the founder: it waits for the token file and a leader
            nc.start(1)
            out, err = init.communicate(timeout=120)
            assert init.returncode == 0, err + nc.log_tail(1)
            assert out == ""
            tokens = {n: (out_dir / f"node{n}.token").read_text().strip() for n in (2, 3)}
            admin = (nc.nodes[1].data_dir / "admin.token").read_text().strip()
            for secret in (admin, *tokens.values()):
                assert secret and secret not in err  # bringup never prints a token
            assert "waiting for" in err and "join token written" in err
            for n in (2, 3):
                assert stat.S_IMODE((out_dir / f"node{n}.token").stat().st_mode) == 0o600
                compose_style(nc, n, out_dir / f"node{n}.token")
                nc.start(n)
            nc.token = admin
            nc.wait_voters({1, 2, 3}, timeout=90)
            members = nc.members()
            assert [m["raftAddress"] for m in members] == [f"{lab.addr(i)}:{RAFT_PORT}" for i in (1, 2, 3)]
            for nid in (1, 2, 3):
                nc.wait_ready(nid, 30)
            again = bringup(nc)  # token files exist: nothing to do, the API is not even needed
            _, err = again.communicate(timeout=60)
            assert again.returncode == 0 and err.count("exists; skipping") == 2, err
            # members already: 409 -> skipped, files left alone; verifying node 1's own API certificate
            # (its SAN is the advertise address), as the README's systemd walk-through does
            forced = bringup(nc, "--force", f"--cacert={nc.nodes[1].data_dir / 'tls' / 'api.crt'}")
            _, err = forced.communicate(timeout=120)
            assert forced.returncode == 0 and err.count("skipping") == 2, err
            assert {n: (out_dir / f"node{n}.token").read_text().strip() for n in (2, 3)} == tokens
            wait_for("still three voters", lambda: len(nc.members()) == 3, timeout=10)
        finally:
            nc.close()
