"""The real BGP speaker backend: GoBGP's ``gobgpd``, supervised by quorumd, driven and
read back through its API with the ``gobgp`` CLI.

Why GoBGP (against ExaBGP and BIRD):

- Driving announcements: ``gobgp global rib add|del PREFIX nexthop NH`` changes one route through
  gobgpd's gRPC API, here on a unix socket inside the data dir (no TCP port, no pprof port). BIRD
  needs its config rewritten and ``birdc configure`` for every change (a full reparse per lease);
  ExaBGP reads commands from a process pipe with no acknowledgement of the result.
- Reading state back: ``gobgp global rib -a ipv4|ipv6 -j`` and ``gobgp neighbor -j`` are JSON of
  what gobgpd holds and of each session's state. ``birdc`` answers in text meant for people;
  ExaBGP can only echo what it was told (no RIB to query).
- Restart behaviour: gobgpd starts with an empty RIB and no listening socket (``port = -1``), so
  a restarted speaker announces nothing until quorumd reconciles it, which the read-back shows
  at once; it advertises no graceful-restart capability unless configured (not configured here),
  so a peer drops the routes the moment the session goes. BIRD listens on 179 per BGP protocol.
- Packaging: Debian's ``gobgpd`` package ships both binaries (static Go, no runtime deps);
  ``bird2`` is a Debian package too; ExaBGP comes from PyPI.
- ExaBGP is pure Python, but its state cannot be read back, which the status and metrics need.

How it works:

- ``node/effects/gobgp_api.py`` holds the settings, the generated config and the CLI client.
- ``open()`` writes ``<data-dir>/bgp/gobgpd.toml`` (0600, dir 0700) and starts a
  ``ProcessSupervisor`` (``node/effects/supervisor.py``): restarts with capped backoff, dies with
  quorumd (PR_SET_PDEATHSIG). The speaker dials its peers; it never listens, so it needs no
  CAP_NET_BIND_SERVICE.
- The ``BgpSpeaker`` methods are synchronous and O(delta): they change the wanted state (admin
  running or stopped, the desired prefix set) and wake the reconciler task. ``running`` is that
  admin state (what the drain logic asked for); ``announced`` and ``snapshot()`` are what gobgpd
  said the last time it was asked.
- The reconciler (one task) reads the RIB back, adds what is missing and deletes what is extra
  (target = desired while running, nothing while stopped), in bounded batches with bounded
  concurrency, reads back again, and reports. A RIB above ``small_rib`` routes (2048) is not
  re-read whole on every pass: each change counts once gobgpd has accepted it, gobgpd's
  per-family route counts are compared on every pass, and the whole set is re-read when they
  disagree, after any failure, and every ``full_read_seconds``. It also polls every ``poll_interval_seconds``
  (a restarted gobgpd is refilled from the read-back; a peer's session state is refreshed).
  Every CLI call runs as a subprocess with a timeout; a wedged gobgpd (calls keep failing after
  its start-up grace) is killed and restarted; a stop that gobgpd cannot confirm kills it (a dead
  speaker announces nothing). Nothing here blocks the event loop.
- /128 prefixes need ``next-hop6``; without it they are skipped (counted in the snapshot).
- Fencing tokens: each method accepts ``token`` (the ``(term, index)`` of the log entry behind
  the change) and the last one is shown as ``fencingToken``; typed ``Any`` so the protocol can
  name its own token type.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from quorumd.node.config.schema import BgpConfig
from quorumd.node.effects.bgp import (
    SAMPLE_PREFIXES,
    StubBgpSpeaker,
    _log_change,
    normalize_prefix,
    prefix_sort_key,
    sorted_prefixes,
)
from quorumd.node.effects.gobgp_api import GoBgpCli, GoBgpPeer, GoBgpSettings, SpeakerError, render_config
from quorumd.node.effects.supervisor import ProcessSupervisor

__all__ = [
    "GoBgpCli",
    "GoBgpPeer",
    "GoBgpSettings",
    "GoBgpSpeaker",
    "SpeakerError",
    "build_bgp_speaker",
    "render_config",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux


class GoBgpSpeaker:
    """A ``BgpSpeaker`` backed by a supervised gobgpd (see the module docstring)."""

    def __init__(self, settings: GoBgpSettings, on_change: Callable[[bool, int], None] | None = None) -> None:
        self.settings = settings
        self._on_change = on_change
        self._admin = False
        self._desired: dict[str, None] = {}
        self._rib: frozenset[str] = frozenset()  # read back from gobgpd
        self._rib_known = False  # _rib is what the current gobgpd said (not a dead one's)
        self._dirty = False  # the wanted state changed since the reconciler last looked
        self._sample: list[str] = []
        self._read_at: float | None = None  # loop time of the last full read-back
        self._next_full_read = 0.0
        self._sessions: dict[str, str] = {}
        self._answering = False  # the last read-back succeeded
        self._failures = 0  # consecutive failed passes
        self._token: Any = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._tmp_dir: Path | None = None
        self._pid_seen: int | None = None
        self._pid_since = 0.0
        self._last_report: tuple[bool, int] | None = None
        self.reconciles = 0  # passes that changed routes
        self.socket_path = settings.state_dir / "gobgpd.sock"
        self.config_path = settings.state_dir / "gobgpd.toml"
        self.supervisor = ProcessSupervisor(
            "gobgpd",
            self._argv(),
            cwd=settings.state_dir,
            on_state=self._wake.set,
            prepare=self._remove_socket,
        )
        s = settings
        self.cli = GoBgpCli(s.gobgp, f"unix://{self.socket_path}", s.command_timeout_seconds, s.concurrency)

    # --- BgpSpeaker ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the node wants the speaker announcing (start() .. stop())."""
        return self._admin

    @property
    def announced(self) -> frozenset[str]:
        """What gobgpd holds (and so announces to established peers), as last read back."""
        return self._rib

    @property
    def desired(self) -> frozenset[str]:
        return frozenset(self._desired)

    @property
    def fencing_token(self) -> Any:
        return self._token

    def start(self, *, token: Any = None) -> None:
        self._stamp(token)
        if not self._admin:
            self._admin = True
            log.info("bgp_speaker_started speaker=gobgp prefixes=%d", len(self._desired))
            self._kick()

    def stop(self, *, token: Any = None) -> None:
        self._stamp(token)
        if self._admin:
            self._admin = False
            log.info("bgp_speaker_stopped speaker=gobgp")
            self._kick()

    def set_prefixes(self, prefixes: Iterable[str], *, canonical: bool = False, token: Any = None) -> None:
        self._stamp(token)
        if canonical:
            self._desired = dict.fromkeys(prefixes)
        else:
            good: set[str] = set()
            for p in prefixes:
                try:
                    good.add(normalize_prefix(p))
                except ValueError:
                    log.warning("bgp_prefix_rejected prefix=%r", p[:60])
            self._desired = dict.fromkeys(sorted_prefixes(good))
        self._kick()

    def update(self, add: Iterable[str], withdraw: Iterable[str], *, token: Any = None) -> None:
        self._stamp(token)
        for p in withdraw:
            self._desired.pop(p, None)
        for p in add:
            self._desired[p] = None
        self._kick()

    def snapshot(self) -> dict[str, Any]:
        rib = self._rib
        token = self._token
        age = None if self._read_at is None else time.monotonic() - self._read_at
        return {
            "running": self._observed_running(),
            "announcedPrefixes": len(rib),
            "samplePrefixes": sorted_prefixes(p for p in self._sample if p in rib),
            "readBackAgeSeconds": None if age is None else round(age, 3),
            "speaker": "gobgp",
            "wanted": "running" if self._admin else "stopped",
            "desiredPrefixes": len(self._desired),
            "skippedPrefixes": self._skipped(),
            "process": {
                "pid": self.supervisor.pid,
                "starts": self.supervisor.starts,
                "restarts": self.supervisor.restarts,
                "lastExit": self.supervisor.last_exit,
            },
            "peers": [{"address": a, "state": s} for a, s in sorted(self._sessions.items())],
            "fencingToken": token.as_dict() if hasattr(token, "as_dict") else None,
        }

    # --- lifecycle ----------------------------------------------------------------------------------
    async def open(self) -> None:
        """Write the config, start gobgpd under supervision and the reconciler."""
        s = self.settings
        missing = [prog for prog in (s.gobgpd, s.gobgp) if shutil.which(prog) is None]
        if missing:
            raise SpeakerError(f"{' and '.join(missing)} not found (install the Debian package gobgpd)")
        s.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(s.state_dir, 0o700)
        if len(str(self.socket_path)) > MAX_UNIX_PATH:  # a deep data dir: a private short dir
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="quorumd-bgp-"))
            self.socket_path = self._tmp_dir / "gobgpd.sock"
            self.cli.target = f"unix://{self.socket_path}"
            self.supervisor.argv = self._argv()
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_config(s))
        os.chmod(self.config_path, 0o600)
        log.info(
            "bgp_speaker_configured speaker=gobgp local_as=%d router_id=%s next_hop=%s peers=%s",
            s.local_as, s.router_id, s.next_hop, ",".join(f"{p.address}:{p.port}" for p in s.peers),
        )  # fmt: skip
        self.supervisor.start()
        self._task = asyncio.get_running_loop().create_task(self._reconcile_loop(), name="bgp-reconcile")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop reconciling and stop gobgpd (its sessions close: the peers drop the routes)."""
        self._closing = True  # the reconciler ends at its next turn even if a cancellation is lost
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                log.warning("bgp_reconcile_close_timeout")
        await self.supervisor.close(timeout)
        self._rib = frozenset()
        self._answering = False
        self._sessions = {}
        self._report()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    # --- reconciler ---------------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while not self._closing:
            # asyncio.timeout, not wait_for: wait_for returns normally when the wake-up and a
            # cancellation arrive together, and the cancellation of this loop is lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_seconds):
                    await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            local, self._dirty = self._dirty, False
            try:
                again = await self._reconcile_once(local)
            except asyncio.CancelledError:
                raise
            except Exception:  # never die: the next poll tries again
                log.exception("bgp_reconcile_failed")
                again = False
            if again:
                self._wake.set()

    async def _reconcile_once(self, local_change: bool = False) -> bool:
        """One pass; True when more work is left (a batch limit was hit). ``local_change``: the
        pass was woken by start/stop/set_prefixes/update."""
        loop = asyncio.get_running_loop()
        pid = self.supervisor.pid
        if pid != self._pid_seen:  # a new gobgpd starts empty: know nothing until it answers
            self._pid_seen, self._pid_since = pid, loop.time()
            self._rib, self._rib_known = frozenset(), False
        if pid is None:
            self._mark_down()
            return False
        try:
            if not await self._rib_still_valid(loop.time(), local_change):
                await self._read_back(loop.time())
            rib = self._rib
            target = self._target()
            delete = [p for p in rib if p not in target]
            add = [p for p in target if p not in rib]
            more = len(add) + len(delete) > self.settings.batch
            if delete or add:
                self.reconciles += 1
                failed = await self._apply(add, delete)
                if (
                    failed
                    or len(self._rib) <= self.settings.small_rib
                    or len(target) <= self.settings.small_rib
                ):
                    await self._read_back(loop.time())
            try:  # session states are informative: their read failing is not the RIB's
                self._sessions = await self.cli.neighbors()
            except SpeakerError as exc:
                log.debug("bgp_sessions_unread error=%s", exc)
            self._failures = 0
            self._report()
            return more
        except SpeakerError as exc:
            self._failures += 1
            self._answering = False
            self._rib_known = False
            age = loop.time() - self._pid_since
            level = logging.DEBUG if age < self.settings.startup_grace_seconds else logging.WARNING
            log.log(level, "bgp_speaker_unanswered failures=%d error=%s", self._failures, exc)
            grace_over = age >= self.settings.startup_grace_seconds
            if grace_over and (self._failures >= 3 or (not self._admin and self._rib)):
                # A speaker that does not answer, or cannot confirm a withdraw: a dead one
                # announces nothing, and the supervisor starts a fresh (empty) one.
                self.supervisor.kill()
                self._failures = 0
                self._mark_down()
            else:
                self._report()
            return False

    async def _rib_still_valid(self, now: float, local_change: bool) -> bool:
        """Whether the known RIB can stand without a full read: a small RIB is always re-read
        (cheap); a large one only when gobgpd's per-family counts disagree with it, and every
        ``full_read_seconds`` (its JSON is megabytes: parsing it every second would cost the
        loop more than the routes are worth)."""
        if self._rib_known and local_change:  # act on what the last read said, read back after
            return True  # (one round of CLI calls less between a lease and its route)
        if not self._rib_known or len(self._rib) <= self.settings.small_rib or now >= self._next_full_read:
            return False
        v4, v6 = await _together(self.cli.count("ipv4"), self.cli.count("ipv6"))
        return v4 + v6 == len(self._rib)

    async def _read_back(self, now: float) -> None:
        v4, v6 = await _together(self.cli.rib("ipv4"), self.cli.rib("ipv6"))
        rib = v4 | v6
        if rib != self._rib or not self._rib_known:
            self._sample = heapq.nsmallest(SAMPLE_PREFIXES, rib, key=prefix_sort_key)
        self._rib, self._rib_known, self._answering = frozenset(rib), True, True
        self._read_at = time.monotonic()
        self._next_full_read = now + self.settings.full_read_seconds
        self._report()

    def _target(self) -> dict[str, None]:
        if not self._admin:
            return {}
        if self.settings.next_hop6 is not None:
            return self._desired
        return {p: None for p in self._desired if ":" not in p}

    def _skipped(self) -> int:
        if self.settings.next_hop6 is not None:
            return 0
        return sum(1 for p in self._desired if ":" in p)

    async def _apply(self, add: list[str], delete: list[str]) -> bool:
        """Send one batch of changes; the RIB takes each change gobgpd accepted. True if any failed."""
        s = self.settings
        rib = set(self._rib)
        if not self._admin and delete and len(delete) == len(rib) and len(delete) > s.concurrency:
            # A stop withdraws everything: one call per family instead of one per prefix.
            await _together(self.cli.delete_all("ipv4"), self.cli.delete_all("ipv6"))
            sample = heapq.nsmallest(SAMPLE_PREFIXES, delete, key=prefix_sort_key)
            log.info("bgp_withdraw count=%d sample=%s", len(delete), ",".join(sample))
            self._rib = frozenset()
            self._report()
            return False
        # at most one batch, in address order (the logs never depend on a set's iteration order)
        delete = sorted_prefixes(delete[: s.batch])
        add = sorted_prefixes(add[: max(0, s.batch - len(delete))])
        deleted = await asyncio.gather(*(self.cli.delete(p) for p in delete), return_exceptions=True)
        if not self._admin:
            add = []  # stopped (a fence, a drain) while the withdrawals were sent: announce nothing more
        added = await asyncio.gather(
            *(self.cli.add(p, s.next_hop6 if ":" in p and s.next_hop6 else s.next_hop) for p in add),
            return_exceptions=True,
        )
        failed: BaseException | None = None
        for p, r in zip(delete, deleted, strict=True):
            if isinstance(r, BaseException):
                failed = r
            else:
                rib.discard(p)
        for p, r in zip(add, added, strict=True):
            if isinstance(r, BaseException):
                failed = r
            else:
                rib.add(p)
        self._rib = frozenset(rib)
        self._report()
        _log_change("bgp_withdraw", [p for p, r in zip(delete, deleted, strict=True) if r is None])
        _log_change("bgp_announce", [p for p, r in zip(add, added, strict=True) if r is None])
        if isinstance(failed, asyncio.CancelledError):
            raise failed
        if failed is not None:
            raise failed if isinstance(failed, SpeakerError) else SpeakerError(str(failed))
        return False

    def _observed_running(self) -> bool:
        return self._admin and self._answering and self.supervisor.pid is not None

    def _mark_down(self) -> None:
        self._rib, self._rib_known = frozenset(), False
        self._answering = False
        self._sessions = {}
        self._report()

    def _report(self) -> None:
        state = (self._observed_running(), len(self._rib))
        if state != self._last_report:
            self._last_report = state
            if self._on_change is not None:
                self._on_change(*state)

    def _kick(self) -> None:
        self._dirty = True
        self._wake.set()

    def _remove_socket(self) -> None:
        """A killed gobgpd leaves its socket behind, and a new one cannot bind over it."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _stamp(self, token: Any) -> None:
        if token is not None:
            self._token = token

    def _argv(self) -> list[str]:
        s = self.settings
        return [
            s.gobgpd,
            "--config-file",
            str(self.config_path),
            "--config-type",
            "toml",
            "--api-hosts",
            f"unix://{self.socket_path}",
            "--pprof-disable",
            "--log-plain",
            "--log-level",
            "info",
        ]


async def _together(*calls: Awaitable[T]) -> list[T]:
    """Run the calls concurrently; return (or raise the first failure) once every one has ended.
    Unlike a plain ``gather``, a failed or cancelled call never leaves the others running."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    out: list[T] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


def build_bgp_speaker(
    bgp: BgpConfig, data_dir: Path, on_change: Callable[[bool, int], None] | None = None
) -> StubBgpSpeaker | GoBgpSpeaker:
    """The speaker ``bgp.speaker`` names (validated config: a real one has its keys resolved)."""
    if bgp.speaker == "stub" or not bgp.enabled:
        return StubBgpSpeaker(on_change=on_change)
    assert bgp.local_as is not None and bgp.router_id is not None and bgp.next_hop is not None
    settings = GoBgpSettings(
        local_as=bgp.local_as,
        router_id=bgp.router_id,
        next_hop=bgp.next_hop,
        next_hop6=bgp.next_hop6,
        peers=tuple(GoBgpPeer(p.address, p.remote_as, p.port) for p in bgp.peers),
        state_dir=data_dir / "bgp",
    )
    return GoBgpSpeaker(settings, on_change=on_change)
