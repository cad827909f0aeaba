"""The architecture as import rules, checked on the source tree (relative imports included).

- ``raft/core`` and ``node/registry`` are pure: no I/O, clock, randomness, threads or event loop.
- ``raft`` imports nothing of ``api`` or ``node``; ``raft/core`` nothing of ``raft/aio`` or
  ``raft/sim``; ``raft/sim`` nothing of ``raft/aio``.
- ``api`` imports nothing of ``node`` and, of ``raft``, nothing at all (it sees the node only
  through ``api/ports.py``).
- ``node/registry`` (the replicated state) imports only itself, ``raft/core``, ``raft/codec`` and
  the API's ports (the enums the API and the state share).
- No product module is longer than ``MAX_LINES`` except the Raft core's step functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"raft": "quorumd.raft", "api": "quorumd.api", "node": "quorumd.node"}
IMPURE = {
    "asyncio",
    "time",
    "random",
    "os",
    "socket",
    "ssl",
    "secrets",
    "threading",
    "uvloop",
    "aiohttp",
    "concurrent",
    "subprocess",
    "signal",
    "selectors",
}
MAX_LINES = 600
# The engine's per-role step functions share one state object and read best side by side.
LONG_MODULES_ALLOWED = {
    "raft/core/node.py",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[parts[0]].split(".")[0], *parts]) if parts[0] in PACKAGES else ".".join(parts)


def imports_of(path: Path, me: str | None = None) -> Iterator[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:
                yield f"{mod}.{a.name}"


def product_modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


PURE = [p for f in ("raft/core", "node/registry") for p in product_modules(f)]


@pytest.mark.parametrize("path", PURE, ids=rel)
def test_pure_modules_do_no_io(path: Path) -> None:
    bad = sorted({m for m in imports_of(path) if m.split(".")[0] in IMPURE})
    assert not bad, f"{rel(path)} imports {bad}"


def _check(folder: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    problems = []
    for path in product_modules(folder):
        for m in imports_of(path):
            if not m.startswith("quorumd."):
                continue
            if any(m == f or m.startswith(f + ".") for f in forbidden) and not any(
                m == a or m.startswith(a + ".") for a in allowed
            ):
                problems.append(f"{rel(path)} -> {m}")
    return problems


@pytest.mark.parametrize(
    ("folder", "allowed", "forbidden"),
    [
        ("raft", (), ("quorumd.api", "quorumd.node")),
        ("raft/core", (), ("quorumd.raft.aio", "quorumd.raft.sim")),
        ("raft/sim", (), ("quorumd.raft.aio",)),
        ("api", (), ("quorumd.node", "quorumd.raft")),
        (
            "node/registry",
            ("quorumd.node.registry", "quorumd.raft.core", "quorumd.raft.codec", "quorumd.api.ports"),
            ("quorumd.node", "quorumd.raft", "quorumd.api"),
        ),
        ("node/config", ("quorumd.node.config", "quorumd.node.daemon.logs"), ("quorumd.node",)),
        ("node/ctl", ("quorumd.node.ctl", "quorumd.node.version"), ("quorumd.node", "quorumd.raft")),
    ],
)
def test_import_direction(folder: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _check(folder, allowed, forbidden) == []


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    """The rules above see through ``from ..x import y``: a relative import hides no edge."""
    src = tmp_path / "state.py"
    src.write_text("from ..cluster import service\nfrom .leases import Lease\nfrom . import commands\n")
    found = set(imports_of(src, "quorumd.node.registry.state"))
    expected = {
        "quorumd.node.cluster.service",
        "quorumd.node.registry.leases",
        "quorumd.node.registry.commands",
    }
    assert expected <= found


@pytest.mark.parametrize("path", [p for f in PACKAGES for p in product_modules(f)], ids=rel)
def test_modules_stay_readable(path: Path) -> None:
    if rel(path) in LONG_MODULES_ALLOWED:
        return
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel(path)} has {lines} lines (split it by responsibility)"


def test_the_running_node_is_composed_not_inherited() -> None:
    """``ClusterNode`` and its parts hold what they use; none builds on another class of ours."""
    from quorumd.node.cluster.addresses import AddressBook
    from quorumd.node.cluster.drain import DrainEffects
    from quorumd.node.cluster.foresight import Foresight
    from quorumd.node.cluster.isolation import IsolationGuard
    from quorumd.node.cluster.operations import ClusterNode
    from quorumd.node.cluster.service import ClusterService

    for cls in (ClusterNode, ClusterService, IsolationGuard, Foresight, AddressBook, DrainEffects):
        assert cls.__mro__ == (cls, object), cls


def _calls_wait_for(path: Path) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "wait_for"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "asyncio"
    ]


@pytest.mark.parametrize("path", [p for f in PACKAGES for p in product_modules(f)], ids=rel)
def test_deadlines_use_asyncio_timeout(path: Path) -> None:
    """``asyncio.wait_for`` on this Python returns normally when what it awaits completes just as
    its task is cancelled, so the cancellation is lost (a loop around it then never ends, and a
    shutdown that cancels once waits for ever); ``async with asyncio.timeout(...)`` does not."""
    lines = _calls_wait_for(path)
    assert not lines, f"{rel(path)} calls asyncio.wait_for at lines {lines}"
