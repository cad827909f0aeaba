"""``quorumd demo``: a local N-node cluster on 127.0.0.1 formed with the real join flow.

Node 1 founds the cluster; the demo then mints one join token per further node through the
public API with the founder's admin token, starts each joiner with ``cluster.join-token-file``,
waits until autopilot has promoted them all to voters, prints how to reach the cluster, and
runs until Ctrl-C (then stops every daemon gracefully). A node that exits meanwhile (killed, to
see the cluster survive it) is reported once with the command that restarts it; the others keep
running, and the demo ends only on Ctrl-C or when no node is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

_PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    pass


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the demo's API certificates are self-signed
    return ctx


def api_call(
    url: str, token: str | None = None, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout, context=_ctx()) as resp:
        return json.loads(resp.read())["result"]


def wait_for(what: str, fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.2)
    raise DemoError(f"timed out waiting for {what} ({last})")


def node_config(directory: Path, node_id: int, base_port: int, n: int, join_token_file: Path | None) -> Path:
    cfg: dict[str, Any] = {
        "data-dir": str(directory / f"node{node_id}"),
        "log-level": "info",
        "api": {"address": "127.0.0.1", "port": base_port + 100 + node_id},
        "cluster": {
            "node-id": node_id,
            "bind-address": f"127.0.0.1:{base_port + node_id}",
            "advertise-address": f"127.0.0.1:{base_port + node_id}",
            "peers": [f"127.0.0.1:{base_port + i}" for i in range(1, n + 1)],
            "autopilot": {"server-stabilization-time": "2s", "reconcile-interval": "500ms"},
        },
    }
    if join_token_file is not None:
        cfg["cluster"]["join-token-file"] = str(join_token_file)
    path = directory / f"node{node_id}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the demo dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_node(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """A daemon in its own process group: Ctrl-C at the terminal reaches only the demo, which
    then stops each daemon with one SIGTERM (a daemon that also got the terminal's SIGINT would
    take that SIGTERM as a second signal and exit at once, skipping its graceful stop)."""
    with open(log_path, "ab") as out:  # the child holds its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def form_cluster(
    directory: Path, nodes: int, base_port: int, procs: list[subprocess.Popen[bytes]]
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Start the nodes (appended to ``procs`` as they start, so the caller can always stop
    them) and wait until every one is a voter."""
    api = [f"https://127.0.0.1:{base_port + 100 + i}" for i in range(1, nodes + 1)]
    procs.append(start_node(node_config(directory, 1, base_port, nodes, None), directory / "node1.log"))
    token_file = directory / "node1" / "admin.token"
    wait_for("node 1 admin token", lambda: token_file.exists() and token_file.read_text().strip(), 30)
    token = token_file.read_text().strip()
    wait_for("node 1 ready", lambda: api_call(api[0] + "/api/v1/status")["ready"], 30)
    for i in range(2, nodes + 1):
        jt = wait_for(
            f"join token for node {i}",
            lambda i=i: api_call(api[0] + "/api/v1/cluster/pki/join-tokens", token, {"nodeID": i}),
            30,
        )
        jt_file = directory / f"node{i}.join-token"
        jt_file.write_text(jt["token"] + "\n")
        jt_file.chmod(0o600)
        procs.append(
            start_node(node_config(directory, i, base_port, nodes, jt_file), directory / f"node{i}.log")
        )

    def all_voters() -> bool:
        members = api_call(api[0] + "/api/v1/cluster/members", token)
        return len(members) == nodes and all(m["suffrage"] == "voter" for m in members)

    wait_for("every node to become a voter", all_voters, 60)
    return procs, str(token_file)


def restart_command(directory: Path, node_id: int) -> str:
    """The shell command that starts node ``node_id`` again on its data dir (appending to its log)."""
    exe = shutil.which("quorumd")
    cmd = [exe] if exe else [sys.executable, "-m", "quorumd.node.cli"]
    config = directory / f"node{node_id}.yaml"
    log = directory / f"node{node_id}.log"
    return f"{shlex.join([*cmd, 'run', '--config', str(config)])} >> {shlex.quote(str(log))} 2>&1 &"


def report_exit(directory: Path, node_id: int, code: int | None) -> None:
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    print(
        f"quorumd demo: node {node_id} exited ({how}); the other nodes keep running.\n"
        f"  its log: {directory / f'node{node_id}.log'}\n"
        f"  restart it with: {restart_command(directory, node_id)}\n"
        "  (a node started that way runs on its own: Ctrl-C of the demo does not stop it)",
        file=sys.stderr,
    )
    sys.stderr.flush()


def run_demo(nodes: int = 3, base_port: int = 15000, directory: str | None = None) -> int:
    if not 1 <= nodes <= 7:
        print("quorumd demo: --nodes must be 1..7", file=sys.stderr)
        return 2
    d = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="quorumd-demo-"))
    d.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    stop = False
    up = False

    def on_signal(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True
        if not up:  # still forming: give up now rather than after the formation's timeouts
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, on_signal)
    try:
        procs, token_file = form_cluster(d, nodes, base_port, procs)
        up = True
        print(f"quorumd demo: {nodes}-node cluster is up (data and logs in {d})")
        for i in range(1, nodes + 1):
            print(
                f"  node {i}: API https://127.0.0.1:{base_port + 100 + i}  cluster 127.0.0.1:{base_port + i}"
            )
        print(f"  admin token file: {token_file}")
        print(
            f"  try: quorumctl --endpoint https://127.0.0.1:{base_port + 101} --token-file {token_file} "
            "--insecure members list"
        )
        print("Ctrl-C stops the cluster.")
        sys.stdout.flush()
        reported: set[int] = set()
        while not stop:
            for i, p in enumerate(procs, start=1):
                if i not in reported and p.poll() is not None:
                    reported.add(i)
                    report_exit(d, i, p.returncode)
            if len(reported) == len(procs):
                print("quorumd demo: every node has exited", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except DemoError as exc:
        print(f"quorumd demo: {exc} (logs in {d})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"quorumd demo: interrupted while forming the cluster (logs in {d})", file=sys.stderr)
        return 130
    finally:
        up = True  # a further Ctrl-C must not interrupt the cleanup (it is only noted)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
