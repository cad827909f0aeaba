"""The baseline build (protocol 1, commit ``017d9cc``) installed from this repository's history.

``baseline_python()`` returns the interpreter of a virtualenv that has the baseline build
installed, building it once: ``git archive`` of the commit, ``python -m venv``, ``pip install``.
It is cached outside the source tree's packages, in ``$QUORUMD_UPGRADE_CACHE`` or
``<repo>/.upgrade-cache/`` (git-ignored); a lock file makes concurrent callers build it once.
``BaselineUnavailable`` when the commit is not in the history (a shallow clone) or pip fails.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "017d9cc"


class BaselineUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QUORUMD_UPGRADE_CACHE", ROOT / ".upgrade-cache"))


def baseline_python(commit: str = BASELINE_COMMIT) -> Path:
    home = cache_dir() / f"quorumd-{commit}"
    python = home / "venv" / "bin" / "python"
    done = home / "installed"
    if done.exists() and python.exists():
        return python
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it
        if done.exists() and python.exists():
            return python
        # The source folder must not be called "src": pip reads a bare "src" as a requirement.
        source = home / f"quorumd-{commit}-source"
        for path in (source, home / "venv"):
            shutil.rmtree(path, ignore_errors=True)
        source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit], capture_output=True, timeout=120, check=False
        )
        if archive.returncode != 0:
            raise BaselineUnavailable(f"git archive {commit} failed: {archive.stderr.decode()[-500:]}")
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True, timeout=120)
        subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True, timeout=300)
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", str(source)],
            capture_output=True,
            timeout=900,
            check=False,
        )
        if pip.returncode != 0:
            raise BaselineUnavailable(f"pip install of {commit} failed: {pip.stderr.decode()[-2000:]}")
        done.write_text(commit + "\n")
    return python
