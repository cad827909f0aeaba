"""One chaos run end to end: namespaces, a 5-node cluster formed with the real join flow, the
workload and the nemesis for the given time, a final heal, then the checkers.

Order: set up the lab, form the cluster, create the pool, run workload + nemesis, heal everything
(network, paused and dead nodes, drained nodes resumed), let the workload run a short tail against
the healed cluster, stop it, wait (bounded) for convergence, take the final lease table, then run
checkers 1 (exclusive), 2 (durable), 3 (linearizable) and 4 (converged). Checker 5 (fencing,
isolation fencing) runs throughout: every node's /status is sampled while the nemesis works (no node may
announce while fenced), after every heal the announcements must come to equal the active leases of
the active nodes (a bounded poll), and at the end each node's log is scanned for speaker changes
inside its fenced intervals. Checker 6 (moves, ``netcheckers``) judges every move of a node to a
new address and every node's final members list. With ``bgp`` set to a real speaker
(``gobgp``) every node runs gobgpd peering with a BIRD route collector in its own namespace
(``collector``); the nemesis waits for the collector's RIB to withdraw a killed, stopped, drained
or fenced node's routes, and after every heal (the workload held: quiescence) and at the end the
RIB must reach the intended state within a bound (checker 7, routes). Every run prints its seed
and the one command that replays it. The run directory (history.json, nemesis.log, node logs and
configs, report.txt) is kept when the run fails or ``keep`` is set; cleanup of processes and
namespaces happens in ``finally`` (and in atexit hooks for the hard cases).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.checkers import (
    NodeView,
    SpeakerSample,
    SpeakerView,
    Violation,
    check_announcements,
    check_converged,
    check_durable,
    check_exclusive,
    check_fence_logs,
    check_fenced_silent,
    check_no_unauthorized_membership_change,
)
from tests.chaos.collector import SPEAKERS, Collector, RouteWatch, bgp_section, intended_routes
from tests.chaos.history import History, LeaseObs
from tests.chaos.linearizability import LinearizabilityReport, check_history
from tests.chaos.nemesis import FAULTS, Nemesis
from tests.chaos.netcheckers import Listing, check_moves, check_routes
from tests.chaos.netns import NetLab
from tests.chaos.nscluster import RAFT_PORT, NsCluster
from tests.chaos.workload import POOL, POOL_CIDR, Workload, WorkloadConfig
from tests.cluster import ApiCallError, http, wait_for

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunConfig:
    seconds: float
    seed: int
    keep: bool = False
    directory: Path | None = None
    nodes: int = 5
    bugs: str = ""  # QUORUMD_TEST_BUGS for every node
    nonvoters: int = 0  # the last N nodes stay nonvoters (planted-bug scenario)
    faults: dict[str, int] = field(default_factory=lambda: dict(FAULTS))
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    tail_seconds: float = 4.0
    converge_seconds: float = 120.0
    recover_seconds: float = 60.0  # bound on each wait for the cluster to come back after a fault
    linearizability_budget_seconds: float = 300.0
    cluster_overrides: dict[str, Any] = field(default_factory=dict)
    sample_seconds: float = 0.3  # how often every node's fence and speaker are sampled
    announce_seconds: float = 30.0  # bound on the wait for announcements to settle after a heal
    bgp: str = "stub"  # the nodes' speaker: stub, or a real one (SPEAKERS) peering with a collector
    route_bound_seconds: float = 20.0  # bound on the collector's RIB reaching the intended state
    # a real speaker confirms changes sent before a fence (and reads back its RIB) up to this late
    withdraw_grace_seconds: float = 2.0
    first_faults: tuple[str, ...] = ()  # the nemesis starts with these, then chooses by seed

    def replay_command(self) -> str:
        cmd = f"cd {REPO} && .venv/bin/python -m tests.chaos --seconds {self.seconds:g} --seed {self.seed}"
        if self.bgp != "stub":
            cmd += f" --bgp {self.bgp}"
        if self.first_faults:
            cmd += " --first-faults " + ",".join(self.first_faults)
        if self.bugs:
            cmd += f" --bugs {self.bugs}"
        if self.nonvoters:
            cmd += f" --nonvoters {self.nonvoters}"
        if set(self.faults) != set(FAULTS) or self.faults != FAULTS:
            cmd += " --faults " + ",".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        return cmd + " --keep"


@dataclass
class RunResult:
    seed: int
    directory: Path
    violations: list[Violation] = field(default_factory=list)
    linearizability: LinearizabilityReport | None = None
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # namespaces/interfaces left after cleanup

    @property
    def ok(self) -> bool:
        return not self.violations and not self.error and not self.leftovers

    def checkers_failed(self) -> set[str]:
        return {v.checker for v in self.violations}


def _say(msg: str) -> None:
    print(f"[chaos] {msg}", flush=True)


def run_chaos(cfg: RunConfig) -> RunResult:
    directory = cfg.directory or Path(tempfile.mkdtemp(prefix=f"quorumd-chaos-{cfg.seed}-"))
    directory.mkdir(parents=True, exist_ok=True)
    _say(f"seed={cfg.seed} seconds={cfg.seconds:g} dir={directory}")
    _say(f"replay: {cfg.replay_command()}")
    result = RunResult(cfg.seed, directory)
    history = History()
    real_bgp = cfg.bgp != "stub"
    lab = NetLab(cfg.nodes, collector=real_bgp)
    cluster: NsCluster | None = None
    nemesis: Nemesis | None = None
    collector: Collector | None = None
    try:
        if real_bgp and cfg.bgp not in SPEAKERS:
            raise ValueError(f"unknown speaker {cfg.bgp!r}; known: stub, {', '.join(SPEAKERS)}")
        if real_bgp and cfg.nonvoters:
            raise ValueError("the planted-bug scenario (nonvoters) runs with the stub speaker only")
        lab.setup()
        _say(f"lab subnet 10.213.{lab.subnet}.0/24 host {lab.host_addr}")
        env = {"QUORUMD_TEST_BUGS": cfg.bugs} if cfg.bugs else {}
        overrides = dict(cfg.cluster_overrides)
        if cfg.nonvoters:
            overrides["autopilot"] = {**overrides.get("autopilot", {}), "server-stabilization-time": "10h"}
        cluster = NsCluster(lab, directory, env=env, cluster_overrides=overrides)
        atexit.register(cluster.close)
        if real_bgp:
            collector = Collector(lab, directory / "collector", lab.nodes())
            atexit.register(collector.stop)
            collector.start()
            cluster.bgp_config = lambda node: bgp_section(lab, node.node_id)
            _say(f"route collector (BIRD) at {lab.collector_addr}; speakers: {cfg.bgp}")
        voters = set(range(1, cfg.nodes - cfg.nonvoters + 1))
        t_form = time.monotonic()
        cluster.form(voters=voters)
        _say(f"cluster formed in {time.monotonic() - t_form:.1f}s, voters {sorted(voters)}")
        _create_pool(cluster)
        t0 = time.monotonic()
        nemesis = Nemesis(
            cluster,
            history,
            cfg.seed,
            t0,
            directory / "nemesis.log",
            faults=cfg.faults,
            recover_seconds=cfg.recover_seconds,
            first_faults=cfg.first_faults,
        )
        routes = None if collector is None else RouteWatch(collector, nemesis.now, cfg.route_bound_seconds)
        nemesis.routes = routes
        endpoints = {i: n.api for i, n in cluster.nodes.items()}
        nemesis.endpoints = endpoints
        workload = Workload(endpoints, cluster.token, history, cfg.seed, t0, cfg.workload)
        samples: list[SpeakerSample] = []
        fence_violations: list[Violation] = []
        if not cfg.nonvoters:  # the planted-bug scenario keeps nonvoters: announcements are not its point

            async def after_heal() -> None:
                label = f"after the heal at t={nemesis.now():.1f}s"
                if routes is None:
                    fence_violations.extend(
                        await asyncio.to_thread(_settled_announcements, cluster, label, cfg, None)
                    )
                    return
                # quiescence: the workload is held while the speakers and the collector settle
                quiet = await workload.quiesce(cfg.workload.request_timeout_seconds + 2.0)
                try:
                    fence_violations.extend(
                        await asyncio.to_thread(_settled_announcements, cluster, label, cfg, None)
                    )
                    check = await asyncio.to_thread(
                        routes.converge, f"{label} (quiescent: {quiet})", lambda: intended_routes(cluster)
                    )
                    nemesis.log(f"collector: {label}: intended state after {check.seconds}s")
                finally:
                    workload.resume()

            nemesis.after_recovered = after_heal
        asyncio.run(_drive(cfg, cluster, nemesis, workload, samples))
        grace = 0.0 if routes is None else cfg.withdraw_grace_seconds
        result.violations += fence_violations + check_fenced_silent(samples, grace)
        _say(f"workload done: {sorted(workload.counts.items())}; nemesis rounds {nemesis.rounds}")
        views, autopilot, final = _converge(cluster, len(voters), cfg.converge_seconds)
        result.violations += check_converged(views, autopilot, len(voters))
        if final is None:
            result.violations.append(Violation("durable", "no final lease listing could be read"))
        else:
            result.violations += check_durable(history, final)
        result.violations += check_exclusive(history)
        if not cfg.nonvoters:
            result.violations += _settled_announcements(cluster, "after the final heal", cfg, final)
        result.violations += check_fence_logs(
            {
                i: n.log_path.read_text(errors="replace")
                for i, n in cluster.nodes.items()
                if n.log_path.exists()
            },
            grace,
        )
        result.violations += check_no_unauthorized_membership_change(nemesis.membership_observations)
        if not cfg.nonvoters:  # the planted-bug scenario diverges on purpose: addresses are not its point
            current = {i: (f"{n.addr}:{RAFT_PORT}", n.api) for i, n in cluster.nodes.items()}
            listings = _final_listings(cluster, current, 20.0)
            result.violations += check_moves(nemesis.moves, history, listings, current)
        if routes is not None:
            routes.converge("after the final heal", lambda: intended_routes(cluster))
            result.violations += check_routes(routes.checks)
        _say(f"checking linearizability of {len(history.ops)} ops")
        lin = check_history(history, budget_seconds=cfg.linearizability_budget_seconds)
        result.linearizability = lin
        for key, res in lin.failures:
            result.violations.append(
                Violation("linearizable", f"partition {key} not linearizable", tuple(res.stuck))
            )
        result.summary = {
            "ops": history.summary(),
            "nemesis_rounds": nemesis.rounds,
            "nemesis_problems": nemesis.problems,
            "rogue_member_attacks": len(nemesis.membership_observations),
            "linearizability": lin.describe(),
            "final_leases": None if final is None else len(final),
            "speaker_samples": len(samples),
            "fenced_samples": sum(1 for x in samples if x.isolated),
            "bgp": cfg.bgp,
            "moves": [
                f"node {m.node} -> {m.raft} at t={m.at:.0f}s settled in "
                + ("never" if m.settled_seconds is None else f"{m.settled_seconds:.1f}s")
                for m in nemesis.moves
            ],
            "nemesis_faults": dict(sorted(nemesis.fault_counts.items())),
        }
        if routes is not None:
            result.summary["route_checks"] = routes.summary()
    except BaseException as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        _say("run aborted:\n" + traceback.format_exc())
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            _finish(cfg, result, history, nemesis, cluster, lab, collector)
            raise
    _finish(cfg, result, history, nemesis, cluster, lab, collector)
    return result


def _finish(
    cfg: RunConfig,
    result: RunResult,
    history: History,
    nemesis: Nemesis | None,
    cluster: NsCluster | None,
    lab: NetLab,
    collector: Collector | None = None,
) -> None:
    try:
        history.save(result.directory / "history.json", {"seed": cfg.seed, "replay": cfg.replay_command()})
    finally:
        try:
            if cluster is not None:
                cluster.close()
                atexit.unregister(cluster.close)
            if collector is not None:
                collector.stop()
                atexit.unregister(collector.stop)
        finally:
            lab.destroy()
            result.leftovers = list(lab.left_behind)
            report = _report(cfg, result)
            (result.directory / "report.txt").write_text(report)
            print(report, flush=True)
            if result.ok and not cfg.keep:
                shutil.rmtree(result.directory, ignore_errors=True)
            else:
                _say(f"kept {result.directory} (history.json, nemesis.log, node*/quorumd.log, report.txt)")


def _report(cfg: RunConfig, result: RunResult) -> str:
    lines = [
        f"chaos run seed={cfg.seed} seconds={cfg.seconds:g} bugs={cfg.bugs or '-'}: "
        + ("PASS" if result.ok else "FAIL"),
        f"replay: {cfg.replay_command()}",
    ]
    for k, v in result.summary.items():
        lines.append(f"{k}: {v}")
    if result.error:
        lines.append(f"error: {result.error}")
    if result.leftovers:
        lines.append(f"LEFT OVER after cleanup: {result.leftovers}")
    for v in result.violations[:50]:
        lines.append(f"VIOLATION {v}")
    if len(result.violations) > 50:
        lines.append(f"... {len(result.violations) - 50} more violations")
    return "\n".join(lines) + "\n"


async def _drive(
    cfg: RunConfig,
    cluster: NsCluster,
    nemesis: Nemesis,
    workload: Workload,
    samples: list[SpeakerSample] | None = None,
) -> None:
    stop_workload = asyncio.Event()
    stop_nemesis = asyncio.Event()
    deadline = time.monotonic() + cfg.seconds
    hard_deadline = deadline + cfg.tail_seconds + 300.0
    work = asyncio.create_task(workload.run(stop_workload, hard_deadline))
    sampler = asyncio.create_task(_sample_speakers(cluster, nemesis, cfg, stop_workload, samples))
    try:
        await nemesis.run(stop_nemesis, deadline)
        await nemesis.heal_all()
        for nid in sorted(cluster.nodes):
            await nemesis._resume(nid)
        await nemesis.wait_recovered(1.5 * cfg.recover_seconds)
        nemesis.log("final heal done; workload tail")
        await asyncio.sleep(cfg.tail_seconds)  # the workload's tail against the healed cluster
    finally:
        stop_workload.set()
        await work
        await sampler


async def _sample_speakers(
    cluster: NsCluster, nemesis: Nemesis, cfg: RunConfig, stop: asyncio.Event, out: list[SpeakerSample] | None
) -> None:
    """Sample every running node's fence and speaker (/status answers both from one moment)."""
    if out is None:
        return
    while not stop.is_set():
        for nid, node in sorted(cluster.nodes.items()):
            if not node.alive() or node.paused:
                continue
            try:
                st = await asyncio.to_thread(cluster.status, nid, 1.0)
            except (OSError, ApiCallError, ValueError):
                continue
            bgp = st.get("bgp") or {}
            out.append(
                SpeakerSample(
                    nemesis.now(),
                    nid,
                    bool(st.get("isolated")),
                    bool(bgp.get("running")),
                    int(bgp.get("announcedPrefixes") or 0),
                )
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), cfg.sample_seconds)


def _speaker_views(cluster: NsCluster) -> list[SpeakerView] | None:
    """Each running member's speaker and what its own replica says it owns (None: not settled)."""
    views = []
    for nid, node in sorted(cluster.nodes.items()):
        if not node.alive():
            return None
        try:
            st = cluster.status(nid)
            members = cluster.call(nid, "GET", "/api/v1/cluster/members")
        except (OSError, ApiCallError, ValueError):
            return None
        me = next((m for m in members if m["nodeId"] == nid), None)
        if me is None:
            return None  # not (yet) a member in its own replica: a re-join in progress
        bgp = st.get("bgp") or {}
        views.append(
            SpeakerView(
                node_id=nid,
                isolated=bool(st.get("isolated")),
                running=bool(bgp.get("running")),
                announced=int(bgp.get("announcedPrefixes") or 0),
                sample=tuple(bgp.get("samplePrefixes") or ()),
                drain_state=str(st.get("drainState")),
                owned=int(me["activeLeases"]),
            )
        )
    return views


def _settled_announcements(
    cluster: NsCluster, label: str, cfg: RunConfig, leases: list[LeaseObs] | None
) -> list[Violation]:
    """Bounded poll until the announcements equal the active leases of the active nodes (the
    workload may still be changing them: they must match at some moment); the last violations
    otherwise."""
    deadline = time.monotonic() + cfg.announce_seconds
    problems = [Violation("announcements", f"{label}: no node view could be read")]
    while True:
        views = _speaker_views(cluster)
        if views is not None:
            problems = check_announcements(views, leases, label)
            if not problems:
                return []
        if time.monotonic() >= deadline:
            return problems
        time.sleep(0.2)  # poll interval of a bounded wait


def _final_listings(cluster: NsCluster, want: Listing, timeout: float) -> dict[int, Listing | None]:
    """Every node's members list (its own replica): member -> (raftAddress, apiAddress). Polled
    (bounded) until every node answers with ``want``; the last answers otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        out: dict[int, Listing | None] = {}
        for nid in sorted(cluster.nodes):
            try:
                rows = cluster.call(nid, "GET", "/api/v1/cluster/members")
            except (OSError, ApiCallError, ValueError):
                out[nid] = None
                continue
            out[nid] = {int(m["nodeId"]): (str(m["raftAddress"]), str(m["apiAddress"])) for m in rows}
        if all(v == want for v in out.values()) or time.monotonic() >= deadline:
            return out
        time.sleep(0.5)  # poll interval of a bounded wait


def _create_pool(cluster: NsCluster) -> None:
    def create() -> bool:
        lid = cluster.leader_id()
        if not lid:
            return False
        status, body, _ = http(
            "POST", f"{cluster.nodes[lid].api}/api/v1/pools", cluster.token, {"name": POOL, "cidr": POOL_CIDR}
        )
        if status in (200, 201) or (
            status == 409 and isinstance(body, dict) and body.get("code") == "pool_exists"
        ):
            return True
        raise ApiCallError(status, body)

    wait_for("pool creation", create, 60, interval=0.2)


def _converge(
    cluster: NsCluster, voters: int, timeout: float
) -> tuple[list[NodeView], dict[str, Any] | None, list[LeaseObs] | None]:
    """Poll (bounded) until checker 4 passes; return the last views, autopilot and final leases."""
    deadline = time.monotonic() + timeout
    views: list[NodeView] = []
    autopilot: dict[str, Any] | None = None
    while True:
        views = []
        for nid in sorted(cluster.nodes):
            try:
                st = cluster.status(nid)
                rows = cluster.call(nid, "GET", f"/api/v1/leases?pool={POOL}&limit=10000")
                views.append(NodeView(nid, st, [LeaseObs.from_api(x) for x in rows]))
            except (OSError, ApiCallError, ValueError, KeyError):
                views.append(NodeView(nid, None, None))
        autopilot = None
        lid = cluster.leader_id()
        if lid:
            try:
                autopilot = cluster.call(lid, "GET", "/api/v1/cluster/autopilot")
            except (OSError, ApiCallError, ValueError):
                autopilot = None
        if not check_converged(views, autopilot, voters) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)  # poll interval of a bounded wait
    final: list[LeaseObs] | None = None
    lid = cluster.leader_id()
    if lid:
        try:
            rows = cluster.call(lid, "GET", f"/api/v1/leases?pool={POOL}&limit=10000&consistent=true")
            final = [LeaseObs.from_api(x) for x in rows]
        except (OSError, ApiCallError, ValueError, KeyError):
            final = None
    if final is None:
        final = next((v.leases for v in views if v.leases is not None), None)
    return views, autopilot, final
