"""The scale benchmark's report: figures from a results JSON, the BENCHMARKS.md section, the plot.

``publish`` rewrites the block between the scale markers in BENCHMARKS.md and bench/notes.md
(``make bench`` rebuilds BENCHMARKS.md from bench/notes.md, so the block survives it) and
draws ``<results>.png`` with matplotlib (the ``bench`` extra; without it the plot is skipped).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BEGIN = "<!-- scale:begin (bench/scale.py writes this block) -->"
END = "<!-- scale:end -->"
TARGETS = {"write_ratio_1m": 0.90, "list_p50_ms": 5.0, "startup_s": 5.0, "bytes_per_lease": 350.0,
           "catch_up_s": 15.0, "voters5": 0.80, "voters7": 0.65, "nonvoter_cpu": 1.5}  # fmt: skip


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def _tput(run: dict[str, Any] | None) -> float | None:
    return None if not run else run.get("throughput_ok_per_s")


def _ratios(
    rounds: list[dict[str, Any]], num: str, den: str, key: str = "throughput_ok_per_s"
) -> list[float]:
    out = []
    for r in rounds:
        a, b = r.get(num, {}).get(key), r.get(den, {}).get(key)
        if a and b:
            out.append(a / b)
    return out


def figures(res: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = {"state": {}, "size": {}}
    st = res.get("state") or {}
    sizes = [str(n) for n in st.get("sizes", [])]
    rounds = st.get("rounds", [])
    base = sizes[0] if sizes else None
    clusters = st.get("clusters", {})
    base_info = clusters.get(base, {}) if base else {}
    base_rss = _med([m["VmRSS"] for m in base_info.get("mem_after_rounds_mb", {}).values()])
    base_leases = base_info.get("leases_after_rounds", 0)
    base_ready = _med([m["VmRSS"] for m in base_info.get("mem_at_ready_mb", {}).values()])
    for s in sizes:
        info = clusters.get(s, {})
        lst = st.get("list", {}).get(s, {})
        row: dict[str, Any] = {
            "writes_per_s": _med([_tput(r.get(s)) for r in rounds]),
            "ratio_vs_empty": _med(_ratios(rounds, s, base)) if base else None,
            "ratios": [round(x, 3) for x in _ratios(rounds, s, base)] if base else [],
            "leader_cpu_us_per_write": _med([r.get(s, {}).get("leader_cpu_us_per_write") for r in rounds]),
            "list_p50_ms": lst.get("wrk", {}).get("p50_ms", lst.get("first_page_p50_ms")),
            "list_py_p50_ms": lst.get("first_page_p50_ms"),
            "list_spread_p50_ms": lst.get("spread_p50_ms"),
            "startup_one_s": info.get("restart_one", {}).get("ready_s"),
            "startup_three_s": _med(list((info.get("startup_three_at_once_s") or {}).values())),
            "catch_up_s": info.get("catch_up", {}).get("seconds"),
            "catch_up_by_snapshot": info.get("catch_up", {}).get("by_snapshot"),
            "leases_at_start": info.get("leases_at_start"),
            "leases_after_rounds": info.get("leases_after_rounds"),
            "rss_mb": {k: v.get("VmRSS") for k, v in info.get("mem_after_rounds_mb", {}).items()},
            "hwm_mb": {k: v.get("VmHWM") for k, v in info.get("mem_after_rounds_mb", {}).items()},
        }
        ready = {k: v.get("VmRSS") for k, v in info.get("mem_at_ready_mb", {}).items()}
        at_start = row["leases_at_start"] or 0
        if s != base and base_ready and at_start > 0:
            row["bytes_per_lease_at_ready"] = {
                k: round((v - base_ready) * 2**20 / at_start, 1) for k, v in ready.items() if v
            }
        held = (row["leases_after_rounds"] or 0) - base_leases
        if s != base and base_rss and held > 0:
            row["bytes_per_lease"] = {
                k: round((v - base_rss) * 2**20 / held, 1) for k, v in row["rss_mb"].items() if v
            }
        f["state"][s] = row
    sz = res.get("size") or {}
    srounds = sz.get("rounds", [])
    for name in ("quorumd-3", "quorumd-5", "quorumd-7", "quorumd-3+4nv", "etcd-3", "etcd-5", "etcd-7"):
        if not any(name in r for r in srounds):
            continue
        ref = "etcd-3" if name.startswith("etcd") else "quorumd-3"
        f["size"][name] = {
            "writes_per_s": _med([_tput(r.get(name)) for r in srounds]),
            "ratio_vs_3": _med(_ratios(srounds, name, ref)),
            "ratios": [round(x, 3) for x in _ratios(srounds, name, ref)],
            "leader_cpu_us_per_write": _med(
                [r.get(name, {}).get("leader_cpu_us_per_write") for r in srounds]
            ),
            "cpu_ratio_vs_3": _med(_ratios(srounds, name, ref, "leader_cpu_us_per_write")),
        }
    return f


def _fmt(x: Any, nd: int = 1, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) else f"{x}{unit}"


def verdicts(f: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    st, sz = f["state"], f["size"]
    big = st.get(max(st, key=int)) if st else {}
    out: list[tuple[str, str, bool | None]] = []

    def add(target: str, value: float | None, text: str, ok: bool | None) -> None:
        out.append((target, text if value is not None else "not measured", ok if value is not None else None))

    r = big.get("ratio_vs_empty")
    add(
        "writes/s at 64 clients with 1M leases >= 90% of empty",
        r,
        f"{_fmt(r, 2)}x",
        r is not None and r >= 0.9,
    )
    v = big.get("list_p50_ms")
    py = big.get("list_py_p50_ms")
    text = f"{_fmt(v, 2, ' ms')} (wrk, one connection; Python client with JSON parsing {_fmt(py, 2, ' ms')})"
    add("`GET /leases?limit=1000` p50 <= 5 ms (1M)", v, text, v is not None and v <= 5)
    v = big.get("startup_one_s")
    v3 = big.get("startup_three_s")
    text = f"{_fmt(v, 2, ' s')} (all three at once: median {_fmt(v3, 2, ' s')})"
    add("startup to ready <= 5 s (1M; one follower restarted alone)", v, text, v is not None and v <= 5)
    bpl = big.get("bytes_per_lease") or {}
    worst = max(bpl.values()) if bpl else None
    per_node = ", ".join(f"node {k}: {v:.0f}" for k, v in sorted(bpl.items()))
    text = f"worst node {_fmt(worst, 0, ' B')} ({per_node})"
    met = worst is not None and worst <= 350
    add("RSS growth <= 350 bytes per lease held, every node (1M)", worst, text, met)
    v = big.get("catch_up_s")
    add("a new node catches up by snapshot <= 15 s (1M)", v, _fmt(v, 1, " s"), v is not None and v <= 15)
    for n, bound in ((5, 0.8), (7, 0.65)):
        q, e = sz.get(f"quorumd-{n}", {}).get("ratio_vs_3"), sz.get(f"etcd-{n}", {}).get("ratio_vs_3")
        add(f"{n} voters >= {bound:.0%} of 3 voters' writes/s", q, f"{_fmt(q, 2)}x (etcd {_fmt(e, 2)}x)",
            q is not None and q >= bound)  # fmt: skip
    v = sz.get("quorumd-3+4nv", {}).get("cpu_ratio_vs_3")
    add("3 voters + 4 nonvoters: leader CPU per write <= 1.5x of 3 voters", v, f"{_fmt(v, 2)}x",
        v is not None and v <= 1.5)  # fmt: skip
    return out


def section(res: dict[str, Any], json_name: str, png_name: str) -> str:
    f = figures(res)
    lines = [
        BEGIN,
        "## Scale (bench/scale.py)",
        "",
        f"{res.get('started')}, {res['host']['cpus']} CPUs ({res['host']['machine']}), Python "
        f"{res['host']['python']}; `{res.get('command')}` ({res.get('wall_s', 0) / 60:.0f} min). "
        f"Raw results: `bench/runs/{json_name}`; plot: `bench/runs/{png_name}`. Host speed per phase "
        f"(bench/run.py's interpreter loop, ms before / after): "
        + ", ".join(f"{k} {a} / {b}" for k, (a, b) in res.get("loop_ms", {}).items())
        + "; CPU steal: "
        + ", ".join(f"{k} {v}%" for k, v in res.get("steal_pct", {}).items())
        + ".",
        "",
        f"![scale curves](bench/runs/{png_name})",
        "",
        "| target | this run | met |",
        "|---|---|---|",
    ]
    for target, text, ok in verdicts(f):
        lines.append(f"| {target} | {text} | {'yes' if ok else 'no' if ok is False else 'n/a'} |")
    st = f["state"]
    if st:
        lines += [
            "",
            f"State size: three 3-voter clusters up at once; {res.get('rounds')} paired rounds of "
            f"{res.get('seconds'):.0f} s at 64 wrk clients, every write a new lease (so each cluster "
            "grows during the rounds: the lease columns say by how much). Bytes per lease: a node's "
            "RSS minus the median of the empty cluster's nodes at the same point, over the leases "
            "it holds beyond that cluster's (after the rounds: the empty cluster holds leases too, so "
            "at 100k the difference is ~70k leases and a few MB of noise move it by ~100 B; at ready: "
            "before any write; a restored node's fixed costs, ~10 MB, weigh ~100 B a lease at 100k). "
            "The target is judged after the rounds at 1M.",
            "",
            "| leases at start | after rounds | writes/s (median) | vs empty (median of rounds) | "
            "leader CPU us/write | list p50 ms: wrk / Python first page / Python spread | "
            "startup one / three at once s | "
            "catch-up s | RSS per node MB | bytes per lease held: after rounds / at ready |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s, r in st.items():
            bpl, bpr = r.get("bytes_per_lease"), r.get("bytes_per_lease_at_ready")
            per_lease = " / ".join(
                ", ".join(f"{v:.0f}" for _, v in sorted(d.items())) for d in (bpl, bpr) if d
            )
            lines.append(
                f"| {int(s):,} | {_fmt(r['leases_after_rounds'])} | {_fmt(r['writes_per_s'], 0)} | "
                f"{_fmt(r['ratio_vs_empty'], 2)}x ({', '.join(f'{x:.2f}' for x in r['ratios'])}) | "
                f"{_fmt(r['leader_cpu_us_per_write'], 0)} | {_fmt(r['list_p50_ms'], 2)} / "
                f"{_fmt(r['list_py_p50_ms'], 2)} / {_fmt(r['list_spread_p50_ms'], 2)} | "
                f"{_fmt(r['startup_one_s'], 2)} / "
                f"{_fmt(r['startup_three_s'], 2)} | {_fmt(r['catch_up_s'], 1)} | "
                f"{', '.join(f'{v:.0f}' for _, v in sorted(r['rss_mb'].items()))} | "
                f"{per_lease} |"
            )
    sz = f["size"]
    if sz:
        lines += [
            "",
            "Cluster size: every cluster up at once (3 + 5 + 7 + 7 quorumd processes, 3 + 5 + 7 etcd "
            "processes, all on the same 2 cores with wrk: a 7-member cluster runs 7 processes on 2 "
            "cores, so its figures measure CPU contention as much as replication).",
            "",
            "| cluster | writes/s (median) | vs 3 (median of rounds) | leader CPU us/write | vs 3 |",
            "|---|---|---|---|---|",
        ]
        for name, r in sz.items():
            lines.append(
                f"| {name} | {_fmt(r['writes_per_s'], 0)} | {_fmt(r['ratio_vs_3'], 2)}x "
                f"({', '.join(f'{x:.2f}' for x in r['ratios'])}) | {_fmt(r['leader_cpu_us_per_write'], 0)} | "
                f"{_fmt(r['cpu_ratio_vs_3'], 2)}x |"
            )
    lines += _inproc_lines(res)
    lines += _profile_lines(res)
    lines.append(END)
    return "\n".join(lines)


def _inproc_lines(res: dict[str, Any]) -> list[str]:
    ip, base = res.get("inproc") or {}, res.get("inproc_baseline") or {}
    if not ip:
        return []
    lines = [
        "",
        "In one process (bench/scale_inproc.py: the state machine applies N AllocateLease commands; "
        + (f"the baseline is revision {base.get('revision')}'s tree, same host, same run" if base else "")
        + "):",
        "",
        "| leases | build | bytes/lease RSS built / restored | traced | snapshot ms | restore s | page ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag, src in (("", ip), (" (baseline)", base)):
        for n, r in src.items():
            if not isinstance(r, dict) or "error" in r:
                continue
            built, restored = r.get("bytes_per_lease_rss_built"), r.get("bytes_per_lease_rss_restored")
            restore_s = (r.get("restore_only") or {}).get("restore_s")
            lines.append(
                f"| {int(n):,}{tag} | {_fmt(r.get('build_s'), 1, ' s')} | "
                f"{_fmt(built, 0)} / {_fmt(restored, 0)} | "
                f"{_fmt(r.get('bytes_per_lease_traced'), 0)} | {_fmt(r.get('snapshot_ms'), 1)} | "
                f"{_fmt(restore_s, 2)} | {_fmt(r.get('list_1000_ms_p50'), 2)} |"
            )
    return lines


def _profile_lines(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for phase in ("state", "size"):
        for name, run in ((res.get(phase) or {}).get("profiles") or {}).items():
            prof = run.get("profile") or {}
            if not prof.get("samples"):
                continue
            if not lines:
                lines = ["", "Leader profiles (py-spy, GIL-holding samples, one extra write run each; "
                         "files beside the results): share of samples per area, inclusive, and the "
                         "top functions by own samples.", ""]  # fmt: skip
            areas = ", ".join(f"{a} {v}%" for a, v in prof["areas_inclusive_pct"].items())
            top = "; ".join(f"`{fn}` {v}%" for fn, v in prof["top_own_pct"][:6])
            lines.append(f"- {phase} {name} ({_fmt(_tput(run), 0)} ok/s during the profile, "
                         f"`{run.get('profile_file')}`): {areas}. Top: {top}.")  # fmt: skip
    return lines


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    f = figures(res)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    st = f["state"]
    xs = [int(s) for s in st]
    labels = [f"{x:,}" for x in xs]
    ax = axes[0][0]
    ax.plot(labels, [st[s]["ratio_vs_empty"] for s in st], "o-", label="quorumd")
    ax.axhline(TARGETS["write_ratio_1m"], color="red", ls="--", label="target at 1M (0.90)")
    ax.set(
        title="writes/s at 64 clients vs empty state", xlabel="leases held", ylabel="ratio (median of rounds)"
    )
    ax.set_ylim(0, 1.2)
    ax.legend()
    ax = axes[0][1]
    sz = f["size"]
    for system in ("quorumd", "etcd"):
        pts = [(n, sz[f"{system}-{n}"]["ratio_vs_3"]) for n in (3, 5, 7) if f"{system}-{n}" in sz]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=system)
    ax.plot([5, 7], [TARGETS["voters5"], TARGETS["voters7"]], "rv", label="quorumd targets")
    ax.set(
        title="writes/s vs 3 voters (7 processes on 2 cores)",
        xlabel="voters",
        ylabel="ratio (median of rounds)",
    )
    ax.set_xticks([3, 5, 7])
    ax.set_ylim(0, 1.2)
    nv = sz.get("quorumd-3+4nv", {}).get("cpu_ratio_vs_3")
    if nv is not None:
        note = f"3 voters + 4 nonvoters: leader CPU/write {nv:.2f}x of 3 voters (target <= 1.5x)"
        ax.text(3.1, 0.08, note, fontsize=8)
    ax.legend()
    ax = axes[1][0]
    rss = [max(st[s]["rss_mb"].values()) if st[s]["rss_mb"] else None for s in st]
    held = [st[s].get("leases_after_rounds") or 0 for s in st]
    ax.plot(labels, rss, "o-", label="largest node RSS after the rounds")
    if rss and rss[0]:
        budget = [rss[0] + (h - held[0]) * TARGETS["bytes_per_lease"] / 2**20 for h in held]
        ax.plot(labels, budget, "r--", label="budget: empty + 350 B per lease held")
    ax.set(title="memory per node", xlabel="leases at start", ylabel="MB")
    ax.legend()
    ax = axes[1][1]
    for key, label in (("list_p50_ms", "list 1000 p50 (ms)"), ("startup_one_s", "startup to ready (s)"),
                       ("catch_up_s", "catch-up by snapshot (s)")):  # fmt: skip
        ax.plot(labels, [st[s].get(key) for s in st], "o-", label=label)
    ax.axhline(5.0, color="red", ls="--", lw=0.8, label="5 (list ms, startup s)")
    ax.axhline(15.0, color="orange", ls="--", lw=0.8, label="15 s (catch-up)")
    ax.set(title="reads, startup, catch-up (log scale)", xlabel="leases held")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.suptitle(f"quorumd at scale, {res.get('started')} (2 cores shared by every process)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _replace_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def publish(res: dict[str, Any], json_path: Path) -> None:
    png = json_path.with_suffix(".png")
    plot(res, png)
    block = section(res, json_path.name, png.name)
    for page in (ROOT / "BENCHMARKS.md", BENCH / "notes.md"):
        _replace_block(page, block)
    print(block)
