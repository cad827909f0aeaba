"""``quorumd demo`` (what ``make demo`` runs) end to end, as a user at a terminal would use it.

The demo runs in its own session; the test waits for it to print how to reach the cluster, calls
every node's API (and the quorumctl command line the demo suggests), then presses Ctrl-C the way
a terminal does (SIGINT to the whole foreground process group). The demo must exit 0 and stop
every daemon gracefully: each logs ``shutdown_done ... exit_code=0`` and none is hit by a second
signal (which makes a daemon exit at once).
"""

from __future__ import annotations

import os
import queue
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from quorumd.node.ctl import main as ctl
from tests.cluster import http, wait_for

pytestmark = pytest.mark.xdist_group("test_demo")

NODES = 3


def free_base_port() -> int:
    """A base port whose 2 x NODES ports (base+i, base+100+i) are free right now."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 60000)
        socks: list[socket.socket] = []
        try:
            for port in [base + i for i in range(1, NODES + 1)] + [
                base + 100 + i for i in range(1, NODES + 1)
            ]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range for the demo")


def processes_under(directory: Path) -> list[int]:
    """Pids of running ``quorumd run`` processes whose configuration is in ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"run --config {directory}/" in cmdline:
            pids.append(int(entry.name))
    return pids


class DemoRun:
    """``quorumd demo`` started as a shell would (its own process group), its output read by a
    thread so that ``read_until`` can wait for a line with a deadline."""

    def __init__(self, directory: Path, base: int) -> None:
        argv = [sys.executable, "-m", "quorumd.node.cli", "demo", "--nodes", str(NODES)]
        self.proc = subprocess.Popen(
            [*argv, "--base-port", str(base), "--dir", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def read_until(self, needle: str, timeout: float) -> str:
        """All output so far, once a line with ``needle`` has come (asserts within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not any(needle in x for x in self.output):
            assert time.monotonic() < deadline, f"no {needle!r} from the demo: {''.join(self.output)}"
            try:
                self.output.append(self._lines.get(timeout=1.0))
            except queue.Empty:
                alive = self.proc.poll() is None or not self._lines.empty()
                assert alive, f"demo exited {self.proc.returncode}: {''.join(self.output)}"
        return "".join(self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_demo_runs_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    base = free_base_port()
    run = DemoRun(directory, base)
    demo = run.proc
    try:
        text = run.read_until("Ctrl-C stops the cluster", 120)
        apis = re.findall(r"node (\d+): API (https://127\.0\.0\.1:\d+)", text)
        assert [int(n) for n, _ in apis] == list(range(1, NODES + 1)), text
        token_file = re.search(r"admin token file: (\S+)", text)
        assert token_file is not None, text
        token = Path(token_file.group(1)).read_text().strip()

        def all_voters(api: str) -> bool:
            st, body, _ = http("GET", f"{api}/api/v1/cluster/members", token)
            assert st == 200, body
            return [m["suffrage"] for m in body["result"]] == ["voter"] * NODES

        for nid, api in apis:
            st, body, _ = http("GET", f"{api}/api/v1/status")
            assert st == 200 and body["result"]["nodeId"] == int(nid)
            # Each node lists its own replica: the demo saw the last promotion on node 1, and another
            # node may take it in a moment later.
            wait_for(f"node {nid} lists every node as a voter", lambda api=api: all_voters(api), 30)
        hint = re.search(r"try: quorumctl (.+)", text)  # the command line the demo suggests works
        assert hint is not None and ctl.main(shlex.split(hint.group(1))) == 0
        daemons = processes_under(directory)
        assert len(daemons) == NODES, daemons

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C at the terminal
        assert demo.wait(60) == 0
        wait_for("the daemons to exit", lambda: not processes_under(directory), 10)
        for i in range(1, NODES + 1):
            log = (directory / f"node{i}.log").read_text()
            assert f"shutdown_done node={i} exit_code=0" in log, log[-2000:]
            assert "second_signal_exit" not in log
        for _, api in apis:
            with pytest.raises(OSError):
                http("GET", f"{api}/healthz", timeout=2)
    finally:
        run.kill()
        for pid in processes_under(directory):  # only the daemons this test started
            os.kill(pid, signal.SIGKILL)


def node_pid(directory: Path, node_id: int) -> int:
    pids = [
        p
        for p in processes_under(directory)
        if f"node{node_id}.yaml" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]
    assert len(pids) == 1, pids
    return pids[0]


def test_demo_keeps_the_others_running_when_a_node_is_killed(tmp_path: Path) -> None:
    """kill -9 of one daemon: the demo reports it with the command that restarts it and keeps
    the rest of the cluster running; that command brings the node back; Ctrl-C still stops the
    demo's daemons cleanly."""
    directory = tmp_path / "demo"
    base = free_base_port()
    run = DemoRun(directory, base)
    demo, read_until = run.proc, run.read_until
    restarted: subprocess.Popen[bytes] | None = None
    try:
        text = read_until("Ctrl-C stops the cluster", 120)
        apis = dict(re.findall(r"node (\d+): API (https://127\.0\.0\.1:\d+)", text))
        token = Path(re.findall(r"admin token file: (\S+)", text)[0]).read_text().strip()
        os.kill(node_pid(directory, 2), signal.SIGKILL)
        text = read_until("restart it with:", 30)
        assert "node 2 exited (killed by signal 9); the other nodes keep running" in text, text
        assert demo.poll() is None  # the demo keeps running ...
        for nid in ("1", "3"):  # ... and so do the other nodes, with a leader among them
            wait_for(
                f"node {nid} serving",
                lambda nid=nid: http("GET", f"{apis[nid]}/api/v1/cluster/members", token)[0] == 200,
            )
        wait_for(
            "a leader among 1 and 3",
            lambda: http("GET", f"{apis['1']}/api/v1/status")[1]["result"]["leaderNodeId"] in (1, 3),
        )
        command = re.search(r"restart it with: (.+) >> (\S+) 2>&1 &", text)
        assert command is not None, text
        with open(shlex.split(command.group(2))[0], "ab") as log:
            restarted = subprocess.Popen(shlex.split(command.group(1)), stdout=log, stderr=log)
        wait_for(
            "node 2 back and ready",
            lambda: http("GET", f"{apis['2']}/api/v1/status")[1]["result"]["ready"],
            60,
        )
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the demo stops its own daemons
        assert demo.wait(60) == 0
        for i in (1, 3):
            assert f"shutdown_done node={i} exit_code=0" in (directory / f"node{i}.log").read_text()
    finally:
        run.kill()
        if restarted is not None and restarted.poll() is None:
            restarted.terminate()
            restarted.wait(30)
        for pid in processes_under(directory):  # only the daemons this test started
            os.kill(pid, signal.SIGKILL)
