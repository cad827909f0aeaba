"""Drive an HTTPS endpoint with wrk (Debian package ``wrk``) and bench/wrk_post.lua.

The shared Python load generator costs about 0.3 ms of CPU per request and saturates near 3-4k
requests/s on this machine, so for the quorumd-vs-etcd throughput comparison both systems are driven
by wrk (C, ~10 us per request). Returns the Lua script's JSON plus derived figures and wrk's own CPU.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
_RUNS = itertools.count(1)


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: str,
    concurrency: int,
    duration: float,
    *,
    auth: str | None = None,
    ok_substring: str | None = None,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """POST ``body`` (``$key``/``$key_b64`` replaced per request) at fixed concurrency. The keys
    are new in every run (``w<run>.<thread>-<n>``): every write creates a lease (or an etcd key)
    rather than re-owning one an earlier run created."""
    threads = 1 if concurrency < 2 else 2
    env = {
        **os.environ,
        "WRK_BODY": body,
        "WRK_RUN": f"{next(_RUNS)}.",
        "WRK_AUTH": auth or "",
        "WRK_OK": ok_substring or "",
    }
    argv = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(concurrency),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        f"{max(1, round(timeout_s))}s",
        "-s",
        str(SCRIPT),
        url,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (out.stdout + out.stderr)[-1500:]}
    secs = r["duration_us"] / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r.update(
        concurrency=concurrency,
        throughput_ok_per_s=round(r["ok"] / secs, 1) if secs else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=r["bad"] + r["socket_errors"] + r["timeouts"],
        generator_cpu_pct_of_one_core=round(100 * cpu / secs, 1) if secs else 0.0,
    )
    return r
