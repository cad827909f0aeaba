"""The real BGP speaker backend without a network: its config keys, the process
supervisor (restart with capped backoff, death with the parent, bounded close) driven by a fake
speaker program, and ``GoBgpSpeaker`` against a real ``gobgpd`` on loopback (skipped when the
Debian package ``gobgpd`` is not installed). The peering test in network namespaces is
``tests/integration/test_bgp_netns.py`` (``make bgp-test``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from quorumd.node.config.schema import BgpConfig, BgpPeer, ConfigError, config_from_dict, config_to_dict
from quorumd.node.effects.bgp import StubBgpSpeaker
from quorumd.node.effects.gobgp import GoBgpSpeaker, build_bgp_speaker
from quorumd.node.effects.gobgp_api import GoBgpPeer, GoBgpSettings, parse_neighbors, parse_rib, render_config
from quorumd.node.effects.supervisor import ProcessSupervisor
from tests.bgp_support import fake_speaker_argv, kill_quietly, process_gone, starts_of, wait_until

HAVE_GOBGP = shutil.which("gobgpd") is not None and shutil.which("gobgp") is not None
needs_gobgp = pytest.mark.skipif(not HAVE_GOBGP, reason="needs the Debian package gobgpd")


def cfg(bgp: dict[str, Any], advertise: str = "10.0.0.1:7000") -> Any:
    return config_from_dict({"cluster": {"node-id": 1, "advertise-address": advertise}, "bgp": bgp})


GOBGP = {"speaker": "gobgp", "local-as": 65001, "peers": [{"address": "10.0.0.254", "remote-as": 64512}]}


# --- configuration -------------------------------------------------------------------------------


def test_defaults_are_the_stub() -> None:
    c = cfg({})
    assert c.bgp == BgpConfig(enabled=True, speaker="stub")
    assert isinstance(build_bgp_speaker(c.bgp, Path("/nonexistent")), StubBgpSpeaker)


def test_gobgp_resolves_next_hop_and_router_id() -> None:
    c = cfg(GOBGP)
    assert c.bgp.next_hop == "10.0.0.1" and c.bgp.router_id == "10.0.0.1"
    assert c.bgp.peers == (BgpPeer("10.0.0.254", 64512, 179),)
    c2 = cfg({**GOBGP, "router-id": "192.0.2.7", "next-hop": "192.0.2.8", "next-hop6": "2001:db8::8"})
    assert (c2.bgp.router_id, c2.bgp.next_hop, c2.bgp.next_hop6) == ("192.0.2.7", "192.0.2.8", "2001:db8::8")
    # the serialized form loads back to the same config
    assert config_from_dict(config_to_dict(c2)).bgp == c2.bgp
    speaker = build_bgp_speaker(c2.bgp, Path("/var/lib/quorumd"))
    assert isinstance(speaker, GoBgpSpeaker)
    assert speaker.settings.state_dir == Path("/var/lib/quorumd/bgp")
    # bgp.enabled false: no process at all
    assert isinstance(build_bgp_speaker(cfg({**GOBGP, "enabled": False}).bgp, Path("/x")), StubBgpSpeaker)


@pytest.mark.parametrize(
    ("bgp", "key", "fragment"),
    [
        ({"speaker": "bird"}, "bgp.speaker", "stub|gobgp"),
        ({"speaker": "exabgp"}, "bgp.speaker", "stub|gobgp"),
        ({**GOBGP, "local-as": 0}, "bgp.local-as", "1..4294967295"),
        ({**GOBGP, "local-as": 4294967296}, "bgp.local-as", "1..4294967295"),
        ({**GOBGP, "local-as": True}, "bgp.local-as", "integer"),
        ({"speaker": "gobgp", "peers": GOBGP["peers"]}, "bgp.local-as", "is required"),
        ({**GOBGP, "router-id": "10.0.0"}, "bgp.router-id", "IPv4"),
        ({**GOBGP, "router-id": "fd00::1"}, "bgp.router-id", "IPv4"),
        ({**GOBGP, "router-id": "0.0.0.0"}, "bgp.router-id", "cannot be"),
        ({**GOBGP, "next-hop": "gw.example"}, "bgp.next-hop", "IPv4"),
        ({**GOBGP, "next-hop6": "10.0.0.1"}, "bgp.next-hop6", "IPv6"),
        ({**GOBGP, "peers": []}, "bgp.peers", "at least one peer"),
        ({**GOBGP, "peers": "10.0.0.254"}, "bgp.peers", "expected a list"),
        ({**GOBGP, "peers": ["10.0.0.254"]}, "bgp.peers[0]", "expected a mapping"),
        ({**GOBGP, "peers": [{"address": "router", "remote-as": 1}]}, "bgp.peers[0].address", "IP address"),
        ({**GOBGP, "peers": [{"address": "0.0.0.0", "remote-as": 1}]}, "bgp.peers[0].address", "cannot"),
        ({**GOBGP, "peers": [{"address": "224.0.0.5", "remote-as": 1}]}, "bgp.peers[0].address", "cannot"),
        ({**GOBGP, "peers": [{"remote-as": 1}]}, "bgp.peers[0].address", "is required"),
        ({**GOBGP, "peers": [{"address": "10.0.0.254"}]}, "bgp.peers[0].remote-as", "is required"),
        (
            {**GOBGP, "peers": [{"address": "10.0.0.254", "remote-as": 0}]},
            "bgp.peers[0].remote-as",
            "1..4294967295",
        ),
        (
            {**GOBGP, "peers": [{"address": "10.0.0.254", "remote-as": 1, "port": 0}]},
            "bgp.peers[0].port",
            "1..65535",
        ),
        (
            {**GOBGP, "peers": [{"address": "10.0.0.254", "remote-as": 1, "passive": True}]},
            "bgp.peers[0].passive",
            "unknown key",
        ),
        (
            {
                **GOBGP,
                "peers": [
                    {"address": "10.0.0.254", "remote-as": 1},
                    {"address": "10.0.0.254", "remote-as": 2},
                ],
            },
            "bgp.peers[1].address",
            "duplicate of bgp.peers[0]",
        ),
    ],
)
def test_bad_values_name_the_key(bgp: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(bgp)
    assert info.value.key_path == key, str(info.value)
    assert fragment in str(info.value)


def test_next_hop_is_required_when_the_advertise_address_is_a_name() -> None:
    with pytest.raises(ConfigError) as info:
        cfg(GOBGP, advertise="node1.example:7000")
    assert info.value.key_path == "bgp.next-hop"
    assert cfg({**GOBGP, "next-hop": "10.0.0.9"}, advertise="node1.example:7000").bgp.router_id == "10.0.0.9"


def test_the_daemon_exits_2_naming_the_bgp_key(tmp_path: Path) -> None:
    conf = tmp_path / "q.yaml"
    conf.write_text(
        yaml.safe_dump(
            {"data-dir": str(tmp_path / "d"), "cluster": {"node-id": 1}, "bgp": {"speaker": "bird"}}
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bgp.speaker" in proc.stderr


def test_the_daemon_exits_1_when_gobgpd_is_missing(tmp_path: Path) -> None:
    conf = tmp_path / "q.yaml"
    data = {"data-dir": str(tmp_path / "d"), "cluster": {"node-id": 1, "advertise-address": "127.0.0.1:7000"}}
    conf.write_text(yaml.safe_dump({**data, "bgp": GOBGP}))
    proc = subprocess.run(
        [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path / "empty")},
    )
    assert proc.returncode == 1, proc.stderr
    assert "gobgpd" in proc.stderr and "install the Debian package gobgpd" in proc.stderr


# --- gobgpd's config and answers -----------------------------------------------------------------


def settings(tmp: Path, **kw: Any) -> GoBgpSettings:
    base: dict[str, Any] = dict(
        local_as=65001,
        router_id="127.0.0.1",
        next_hop="127.0.0.1",
        next_hop6="::1",
        # a peer nobody answers: gobgpd keeps dialling it, which is all these tests need
        peers=(GoBgpPeer("127.0.0.1", 64512, 1),),
        state_dir=tmp / "bgp",
        poll_interval_seconds=0.2,
    )
    base.update(kw)
    return GoBgpSettings(**base)


def test_rendered_config_dials_out_only_and_has_no_graceful_restart(tmp_path: Path) -> None:
    text = render_config(
        settings(tmp_path, peers=(GoBgpPeer("192.0.2.1", 64512), GoBgpPeer("fd00::1", 4200000000, 1179)))
    )
    assert "port = -1" in text  # gobgpd does not listen: no CAP_NET_BIND_SERVICE
    assert "graceful" not in text
    assert 'neighbor-address = "fd00::1"' in text and "peer-as = 4200000000" in text
    assert "remote-port = 1179" in text and "remote-port = 179" in text
    assert "passive-mode = false" in text
    if HAVE_GOBGP:  # gobgpd itself accepts it
        path = tmp_path / "g.toml"
        path.write_text(text)
        subprocess.run(["gobgpd", "--dry-run", "-f", str(path), "--pprof-disable"], check=True, timeout=30,
                       capture_output=True)  # fmt: skip


def test_parse_rib_and_neighbors() -> None:
    rib = {"10.99.0.1/32": [{"best": True}], "2001:db8::1/128": [{"best": True}]}
    assert parse_rib(json.dumps(rib)) == {"10.99.0.1/32", "2001:db8::1/128"}
    assert parse_rib("{}") == set() and parse_rib("null") == set() and parse_rib("") == set()
    neighbors = [
        {
            "conf": {"neighbor_address": "10.0.0.254"},
            "state": {"neighbor_address": "10.0.0.254", "session_state": 6},
        },
        {"conf": {"neighbor_address": "10.0.0.253"}, "state": {"session_state": 3}},
    ]
    assert parse_neighbors(json.dumps(neighbors)) == {"10.0.0.254": "established", "10.0.0.253": "active"}


# --- the supervisor ------------------------------------------------------------------------------


def test_supervisor_restarts_with_capped_backoff(tmp_path: Path) -> None:
    log = tmp_path / "starts"

    async def main() -> ProcessSupervisor:
        sup = ProcessSupervisor(
            "fake", fake_speaker_argv(log, "exit", 3),
            initial_backoff_seconds=0.05, max_backoff_seconds=0.2, stable_seconds=60,
        )  # fmt: skip
        sup.start()
        deadline = time.monotonic() + 30
        while len(starts_of(log)) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling a file the children write
        await sup.close(2.0)
        return sup

    sup = asyncio.run(main())
    starts = starts_of(log)
    assert len(starts) >= 6
    assert sup.last_exit in (3, -signal.SIGTERM) and sup.next_backoff == 0.2  # close may end one early
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(starts)]
    # each restart waits at least its backoff: 0.05, 0.1, 0.2, then capped at 0.2
    for gap, floor in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=False):
        assert gap >= floor * 0.9, (gaps, floor)
    assert max(gaps) < 3.0, gaps  # capped (generously bounded: process start-up on 2 shared cores)
    assert len({pid for pid, _ in starts}) == len(starts)


def test_supervisor_kill_restarts_and_close_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "starts"
    caplog.set_level(logging.INFO, logger="quorumd.node.effects.supervisor")

    async def main() -> list[int]:
        sup = ProcessSupervisor("fake", fake_speaker_argv(log, "serve"), initial_backoff_seconds=0.05)
        sup.start()
        assert await sup.wait_running(20)
        first = sup.pid
        assert first is not None
        deadline = time.monotonic() + 20
        while not any("fake speaker up" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no output logged"
            await asyncio.sleep(0.02)  # polling the log records
        sup.kill()  # a wedged speaker
        deadline = time.monotonic() + 20
        while (sup.pid in (None, first)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        second = sup.pid
        assert second is not None and second != first and sup.restarts == 1
        began = time.monotonic()
        await sup.close(5.0)
        assert time.monotonic() - began < 5.0  # SIGTERM was enough
        assert sup.pid is None
        return [first, second]

    pids = asyncio.run(main())
    assert all(process_gone(p) for p in pids)
    lines = [r.getMessage() for r in caplog.records if "speaker_output" in r.getMessage()]
    assert any("fake speaker up" in line for line in lines)
    assert all(len(line) < 600 for line in lines)  # the 10,000-character line was cut


def test_supervisor_close_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "starts"

    async def main() -> int:
        sup = ProcessSupervisor("fake", fake_speaker_argv(log, "stubborn"))
        sup.start()
        assert await sup.wait_running(20)
        deadline = time.monotonic() + 20
        while not starts_of(log) and time.monotonic() < deadline:  # its SIGTERM handler is set
            await asyncio.sleep(0.02)
        pid = sup.pid
        assert pid is not None
        began = time.monotonic()
        await sup.close(0.5)
        assert 0.4 <= time.monotonic() - began < 5.0
        return pid

    assert process_gone(asyncio.run(main()))


PARENT = textwrap.dedent(
    """
    import asyncio, sys, time
    from quorumd.node.effects.supervisor import ProcessSupervisor
    from tests.bgp_support import fake_speaker_argv
    from pathlib import Path

    async def main():
        sup = ProcessSupervisor("fake", fake_speaker_argv(Path(sys.argv[1]), "serve"))
        sup.start()
        await asyncio.sleep(120)  # until the test SIGKILLs us (bounded)

    if sys.argv[2] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_child_dies_with_a_sigkilled_parent(tmp_path: Path, loop: str) -> None:
    log = tmp_path / "starts"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(log), loop], cwd=Path(__file__).resolve().parent.parent
    )
    child = 0
    try:
        wait_until("the child", lambda: bool(starts_of(log)) or parent.poll() is not None, 30)
        assert parent.poll() is None, "the parent exited"
        child = starts_of(log)[0][0]
        assert not process_gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(f"child {child} to die with its parent", lambda: process_gone(child), 5)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if child:
            kill_quietly(child)


# --- GoBgpSpeaker against a real gobgpd -----------------------------------------------------------


async def _until(what: str, fn: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        await asyncio.sleep(0.02)  # polling interval of a bounded wait
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@needs_gobgp
def test_gobgp_speaker_announces_withdraws_and_survives_a_speaker_crash(tmp_path: Path) -> None:
    changes: list[tuple[bool, int]] = []

    async def main() -> list[int]:
        sp = GoBgpSpeaker(settings(tmp_path), on_change=lambda r, n: changes.append((r, n)))
        await sp.open()
        pids: list[int] = []
        try:
            mode = stat.S_IMODE(os.stat(sp.config_path).st_mode)
            assert mode == 0o600 and stat.S_IMODE(os.stat(sp.settings.state_dir).st_mode) == 0o700
            sp.set_prefixes(["10.99.0.1/32", "10.99.0.2/32"], canonical=True)
            assert sp.announced == frozenset()  # not started: nothing announced
            sp.start()
            await _until("announce", lambda: sp.announced == {"10.99.0.1/32", "10.99.0.2/32"}, 20)
            await _until("sessions read back", lambda: bool(sp.snapshot()["peers"]), 5)
            snap = sp.snapshot()
            assert snap["running"] is True and snap["announcedPrefixes"] == 2 and snap["process"]["pid"]
            assert [p["address"] for p in snap["peers"]] == ["127.0.0.1"]
            assert snap["peers"][0]["state"] != "established"  # nobody answers on port 1
            sp.update(["10.99.0.3/32", "2001:db8::3/128"], ["10.99.0.1/32"])
            await _until(
                "delta", lambda: sp.announced == {"10.99.0.2/32", "10.99.0.3/32", "2001:db8::3/128"}, 5
            )
            sp.stop()
            assert sp.running is False
            await _until("withdraw", lambda: sp.announced == frozenset(), 5)
            assert sp.snapshot()["running"] is False and changes[-1] == (False, 0)
            sp.start()
            await _until("re-announce", lambda: len(sp.announced) == 3, 5)
            # gobgpd dies: the supervisor restarts it and the read-back refills it
            first = sp.supervisor.pid
            assert first is not None
            pids.append(first)
            os.kill(first, signal.SIGKILL)
            await _until("restart", lambda: sp.supervisor.pid not in (None, first), 20)
            second = sp.supervisor.pid
            assert second is not None
            pids.append(second)
            await _until("refill", lambda: len(sp.announced) == 3 and sp.supervisor.pid == second, 20)
            assert sp.snapshot()["process"]["restarts"] == 1
            await _until("metrics follow the read-back", lambda: changes[-1] == (True, 3), 5)
        finally:
            await sp.close(3.0)
        assert sp.supervisor.pid is None and changes[-1] == (False, 0)
        return pids

    pids = asyncio.run(main())
    assert all(process_gone(p) for p in pids)


@needs_gobgp
def test_a_wedged_speaker_is_killed_and_never_blocks_the_loop(tmp_path: Path) -> None:
    """A gobgpd whose API never answers: CLI calls time out, the loop keeps ticking, and after the
    start-up grace the supervisor kills and restarts it."""
    wedged = tmp_path / "wedged"
    wedged.write_text("#!/bin/sh\nexec sleep 60\n")
    wedged.chmod(0o755)
    s = settings(
        tmp_path,
        gobgpd=str(wedged),
        gobgp=str(wedged),
        command_timeout_seconds=0.2,
        startup_grace_seconds=0.5,
    )

    async def main() -> tuple[float, list[int]]:
        sp = GoBgpSpeaker(s)
        await sp.open()
        pids: list[int] = []
        worst = 0.0
        try:
            sp.set_prefixes(["10.99.0.1/32"], canonical=True)
            sp.start()
            deadline = time.monotonic() + 30
            last = time.monotonic()
            while sp.supervisor.starts < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the loop's own heartbeat, measured below
                now = time.monotonic()
                worst, last = max(worst, now - last), now
                if sp.supervisor.pid is not None and sp.supervisor.pid not in pids:
                    pids.append(sp.supervisor.pid)
            assert sp.supervisor.starts >= 2, "the wedged speaker was not restarted"
            assert sp.snapshot()["running"] is False and sp.announced == frozenset()
        finally:
            await sp.close(2.0)
        return worst, pids

    worst, pids = asyncio.run(main())
    assert worst < 0.5, f"the event loop stalled {worst:.3f}s"
    assert all(process_gone(p) for p in pids)


@needs_gobgp
@pytest.mark.parametrize("small_rib", [2048, 2])
def test_state_is_read_back_not_assumed(tmp_path: Path, small_rib: int) -> None:
    """Routes changed behind quorumd's back (another client of gobgpd's API) show in the
    read-back and are put right: a small RIB is re-read on every pass, a large one
    (``small_rib=2`` here) when gobgpd's counts disagree with what quorumd knows (a swap that
    keeps the counts is caught by the periodic full read, ``full_read_seconds``)."""

    async def main() -> None:
        sp = GoBgpSpeaker(settings(tmp_path, small_rib=small_rib, full_read_seconds=3600))
        await sp.open()
        try:
            want = {f"10.98.0.{i}/32" for i in range(1, 6)}
            sp.set_prefixes(sorted(want), canonical=True)
            sp.start()
            await _until("announce", lambda: sp.announced == want, 20)
            before = sp.reconciles
            await sp.cli.delete("10.98.0.3/32")  # someone else withdraws one ...
            if small_rib > len(want):  # ... and announces a stray one (a large RIB's counts would
                await sp.cli.add("10.98.0.99/32", "127.0.0.1")  # match: its periodic full read)
            # only a read-back can have seen it: nothing told the speaker
            await _until("put right", lambda: sp.reconciles > before and sp.announced == want, 5)
            assert sp.snapshot()["readBackAgeSeconds"] is not None
            assert await sp.cli.rib("ipv4") == want
        finally:
            await sp.close(3.0)

    asyncio.run(main())


@needs_gobgp
def test_a_stop_withdraws_many_routes_at_once(tmp_path: Path) -> None:
    """More routes than CLI calls in flight: stop withdraws them with one call per family."""

    async def main() -> None:
        sp = GoBgpSpeaker(settings(tmp_path, batch=64))
        await sp.open()
        try:
            want = {f"10.97.0.{i}/32" for i in range(1, 101)} | {
                f"2001:db8:97::{i:x}/128" for i in range(1, 21)
            }
            sp.set_prefixes(sorted(want), canonical=True)
            sp.start()  # 120 routes in batches of 64
            await _until("announce", lambda: sp.announced == want, 30)
            sp.stop()
            await _until("withdraw", lambda: sp.announced == frozenset(), 5)
            assert await sp.cli.rib("ipv4") == set() and await sp.cli.rib("ipv6") == set()
        finally:
            await sp.close(3.0)

    asyncio.run(main())
