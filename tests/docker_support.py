"""Helpers of the live deployment tests (tests/integration/test_compose_live.py and
tests/integration/test_systemd_live.py).

Those tests run the walk-throughs of docs/operations.md for real, in docker containers built
offline by deploy/image/build.sh. They hold the documented commands as constants and check first
that the documentation shows exactly those commands (``doc_commands``), so the runbook cannot drift
from what is tested; tests/test_deploy_docs.py makes the same check without docker, in ``make test``.

They run only when ``QUORUMD_DOCKER_TESTS=1`` (set by ``make compose-test`` and ``make
systemd-test``) and a docker daemon answers. Every command has a timeout; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests import cluster

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "operations.md"
VENV_BIN = REPO / ".venv" / "bin"


def docker_tests_enabled() -> bool:
    return os.environ.get("QUORUMD_DOCKER_TESTS") == "1"


skip_unless_docker = pytest.mark.skipif(
    not docker_tests_enabled(), reason="live docker test: run it with make compose-test / make systemd-test"
)


# --- the documentation -------------------------------------------------------------------------------


def doc_section(heading: str) -> str:
    """The text of the docs/operations.md section under ``heading`` (e.g. ``### docker-compose``),
    up to the next heading of the same or a higher level."""
    text = DOCS.read_text(encoding="utf-8")
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading)
    out: list[str] = []
    for line in lines[start + 1 :]:
        match = re.match(r"^(#+) ", line)
        if match and len(match.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def doc_blocks(heading: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks of a docs section, dedented, in order."""
    blocks = []
    for match in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```$", doc_section(heading), re.M | re.S):
        indent = len(match.group(1))
        blocks.append("\n".join(line[indent:] for line in match.group(2).splitlines()))
    return blocks


def strip_comment(line: str) -> str:
    """A shell line without its trailing ``  # comment`` (the docs' explanations)."""
    return re.sub(r"\s+#\s.*$", "", line).rstrip()


def doc_commands(heading: str) -> list[str]:
    """Every command line of the ``sh`` blocks of a docs section, without comments, continuation
    lines joined."""
    commands: list[str] = []
    for block in doc_blocks(heading, "sh"):
        pending = ""
        for raw in block.splitlines():
            line = strip_comment(raw)
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


# --- processes ---------------------------------------------------------------------------------------


def sh(
    command: str,
    cwd: Path | None = None,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``bash -c command`` with the virtualenv's bin first on PATH (quorumctl), bounded in time."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{VENV_BIN}:{full_env.get('PATH', '/usr/bin:/bin')}"
    full_env.update(env or {})
    started = time.monotonic()
    res = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        check=False,
    )
    took = time.monotonic() - started
    print(f"$ {command}  -> {res.returncode} ({took:.1f}s)", flush=True)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{command!r} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


def sh_json(command: str, **kwargs: Any) -> Any:
    return json.loads(sh(command, **kwargs).stdout)


# A docker command that fails (``sh`` raises AssertionError) or hangs is retried too.
DOCKER_RETRIED = (*cluster.RETRIED, AssertionError, subprocess.TimeoutExpired)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 1.0) -> Any:
    """``tests.cluster.wait_for`` at the pace of containers, retrying failed commands."""
    return cluster.wait_for(what, fn, timeout, interval, retried=DOCKER_RETRIED)


class Stopwatch:
    """Wall-clock phases of a live test, printed at the end (the times docs/operations.md quotes)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.monotonic() - self.start))
        print(f"[{self.marks[-1][1]:6.1f}s] {phase}", flush=True)
