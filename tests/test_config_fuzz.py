"""Every kind of configuration mistake (the targets): a ``ConfigError`` naming the key, and through the real
CLI (``python -m quorumd.node.cli run --config F``) exit code 2 with that message on stderr.

The table covers: an unknown key in every section, every section given a non-mapping, at least one
wrong value (type, range, format) for every leaf key in ``CONFIG_KEYS`` (the test fails when a key
is added without a case), bad durations for every duration key (bare number, no unit, zero, below
1ms, above 24h, overflowing), bad addresses, missing required keys, cross-key rules (election vs
heartbeat, joiner without peers, join-token vs join-token-file, wildcard advertise address), YAML
values YAML itself cannot build (``2001-02-30``), null for a non-nullable key, duplicate keys, YAML
syntax errors, a non-mapping top level, an empty file, and missing, unreadable, undecodable files.

Then hypothesis mutates a valid config (drops keys, changes types, injects random keys and values,
and edits the YAML text itself) and asserts the loader either accepts it (and the accepted config
serializes and reloads) or raises ``ConfigError`` -- never any other exception.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorumd.node import cli
from quorumd.node.config.schema import (
    CONFIG_KEYS,
    TABLE,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
)
from quorumd.node.config.table import Section

JOIN_TOKEN = "qd_jt_abcdefgh12345678"

# A valid config setting every key (join-token-file aside: it excludes join-token).
VALID: dict[str, Any] = {
    "data-dir": "state",
    "log-level": "info",
    "log-format": "text",
    "api": {"address": "127.0.0.1", "port": 5002, "tls": {"cert": "api.crt", "key": "api.key"}},
    "cluster": {
        "enabled": True,
        "node-id": 2,
        "bind-address": "10.0.0.2:7000",
        "advertise-address": "node2.example:7000",
        "peers": ["10.0.0.1:7000", "10.0.0.3:7000"],
        "join-token": JOIN_TOKEN,
        "join-timeout": "120s",
        "propose-timeout": "5s",
        "heartbeat-interval": "100ms",
        "election-timeout": "1000ms",
        "snapshot-threshold": 8192,
        "trailing-logs": 10240,
        "autopilot": {
            "last-contact-threshold": "10s",
            "max-trailing-logs": 500,
            "server-stabilization-time": "10s",
            "cleanup-dead-servers": False,
            "min-quorum": 0,
            "reconcile-interval": "2s",
        },
    },
    "bgp": {
        "enabled": True,
        "speaker": "gobgp",
        "local-as": 65002,
        "router-id": "10.0.0.2",
        "next-hop": "10.0.0.2",
        "next-hop6": "fd00::2",
        "peers": [{"address": "10.0.0.254", "remote-as": 64512, "port": 179}],
    },
    "ran": {"notify-url": "https://amf.example:8443/ran"},
    "backup": {"dir": "backups", "interval": "1h", "keep": 24},
}

# A repeated section (a list of mappings, bgp.peers) is checked item by item: see item_case().
REPEATED = sorted(r.name for r in TABLE.walk() if isinstance(r, Section) and r.repeated)
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in CONFIG_KEYS if "." in k} - set(REPEATED))
LEAVES = sorted(k for k in CONFIG_KEYS if k not in SECTIONS)
DURATION_KEYS = [
    "cluster.join-timeout",
    "cluster.propose-timeout",
    "cluster.heartbeat-interval",
    "cluster.election-timeout",
    "cluster.isolation-fence-after",
    "cluster.autopilot.last-contact-threshold",
    "cluster.autopilot.server-stabilization-time",
    "cluster.autopilot.reconcile-interval",
    "backup.interval",
]
BAD_DURATIONS: list[tuple[Any, str]] = [
    (5, "bare number"),
    ("5", "expected a duration like 100ms"),
    ("5 s", "expected a duration like 100ms"),
    ("5w", "expected a duration like 100ms"),
    ("2d", "at most 24h"),
    ("-5s", "expected a duration like 100ms"),
    ("0s", "greater than zero"),
    ("0.5ms", "at least 1ms"),
    ("25h", "at most 24h"),
    ("9" * 400 + "h", "at most 24h"),
    (True, "expected a duration like 100ms"),
]

# At least one mistake per leaf key: (value, fragment of the message).
LEAF_MISTAKES: dict[str, list[tuple[Any, str]]] = {
    "data-dir": [
        (5, "expected a string"),
        ("", "must not be empty"),
        ("~no-such-user-qd/x", "cannot expand"),
    ],
    "log-level": [("verbose", "debug|info|warning|error"), ("INFO", "debug|info|warning|error")],
    "log-format": [("xml", "text|json"), (["json"], "text|json")],
    "api.address": [("not a host", "IP address or a host name"), (5002, "expected a string")],
    "api.port": [(0, "1..65535"), (65536, "1..65535"), ("5002", "expected an integer"), (True, "boolean")],
    "api.max-connections": [(0, "1..1000000"), ("many", "expected an integer")],
    "audit.retention": [(0, "1.."), ("all", "expected an integer")],
    "api.tls": [("/etc/api.pem", "expected a mapping")],
    "api.tls.cert": [(None, "is required"), (5, "expected a string")],
    "api.tls.key": [(None, "is required"), ("", "must not be empty")],
    "cluster.enabled": [("yes", "true or false"), (1, "true or false")],
    "cluster.node-id": [
        (0, "1..63"),
        (64, "1..63"),
        (-1, "1..63"),
        ("1", "expected an integer"),
        (1.0, "integer"),
    ],
    "cluster.bind-address": [
        ("0.0.0.0", "expected host:port"),
        ("10.0.0.2:0", "1..65535"),
        ("10.0.0.2:70000", "1..65535"),
        ("::1:7000", "[addr]:port"),
        ("[nothost]:7000", "not an IPv6 address"),
        ("bad_name:7000", "neither an IP address nor a DNS name"),
        (7000, "expected a string"),
    ],
    "cluster.advertise-address": [
        ("0.0.0.0:7000", "not 0.0.0.0"),
        ("[::]:7000", "not ::"),
        ("10.0.0:7000", "neither"),
        ("node2.example", "expected host:port"),
    ],
    "cluster.peers": [
        ("10.0.0.1:7000", "expected a list"),
        ({"a": 1}, "expected a list"),
    ],
    "cluster.join-token": [
        ("ab cd", "without spaces"),
        (12345, "expected a string"),
        ("é" * 10, "printable ASCII"),
    ],
    "cluster.join-token-file": [("missing.token", "cannot read")],
    "cluster.snapshot-threshold": [
        (0, ">= 1"),
        ("8192", "expected an integer"),
        (1.5, "expected an integer"),
    ],
    "cluster.trailing-logs": [(-1, ">= 0"), (None, "must not be null")],
    "cluster.autopilot": [(["x"], "expected a mapping"), ("on", "expected a mapping")],
    "cluster.autopilot.max-trailing-logs": [(-5, ">= 0")],
    "cluster.autopilot.cleanup-dead-servers": [("false", "true or false")],
    "cluster.autopilot.min-quorum": [(64, "0..63"), (-1, "0..63")],
    "bgp.enabled": [(0, "true or false"), ("off", "true or false")],
    "bgp.speaker": [("bird", "stub|gobgp"), ("exabgp", "stub|gobgp"), (True, "stub|gobgp")],
    "bgp.local-as": [(0, "1..4294967295"), (4294967296, "1..4294967295"), ("65001", "expected an integer")],
    "bgp.router-id": [("10.0.0", "IPv4 address"), ("fd00::1", "IPv4 address"), ("0.0.0.0", "cannot be")],
    "bgp.next-hop": [("gw.example", "IPv4 address"), (5, "expected a string")],
    "bgp.next-hop6": [("10.0.0.1", "IPv6 address"), ("::", "cannot be")],
    "bgp.peers": [
        ("10.0.0.254", "expected a list of mappings"),
        ({"address": "10.0.0.254"}, "expected a list of mappings"),
    ],
    "bgp.peers.address": [(None, "is required"), ("router.example", "IP address"), ("0.0.0.0", "cannot be")],
    "bgp.peers.remote-as": [(None, "is required"), (0, "1..4294967295"), ("64512", "expected an integer")],
    "bgp.peers.port": [(0, "1..65535"), (None, "must not be null")],
    "ran.notify-url": [
        ("ftp://amf.example/", "http:// or https://"),
        ("https://", "http:// or https://"),
        ("http://amf.example:99999/", "bad port"),
        ("http://[::1", "http:// or https://"),
        (5, "expected a string"),
    ],
    "backup.dir": [(5, "expected a string"), ("", "must not be empty")],
    "backup.keep": [(0, "1..10000"), (10001, "1..10000"), ("24", "expected an integer")],
    "cluster.certificate-lifetime": [("5s", "at least 10s"), ("3651d", "at most 3650d"), (5, "bare number")],
    "cluster.certificate-renew-before": [("0.5s", "at least 1s"), ("1y", "expected a duration")],
}
for _key in DURATION_KEYS:
    LEAF_MISTAKES[_key] = list(BAD_DURATIONS)


def setting(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``dotted`` set (``None`` value: the key removed)."""
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return out


@dataclass(frozen=True)
class Case:
    id: str
    text: str  # the config file's content
    key: str  # the dotted key the error must name ("" for file-level problems)
    fragment: str
    files: tuple[tuple[str, str], ...] = ()  # (name, content) created next to the config
    has_line: bool = True  # a key error from a file carries the line of the key (or of its section)


def case(id: str, data: dict[str, Any], key: str, fragment: str, **kw: Any) -> Case:
    return Case(id, yaml.safe_dump(data, sort_keys=False, allow_unicode=True), key, fragment, **kw)


def raw_null(dotted: str) -> dict[str, Any]:
    """VALID with ``dotted`` explicitly null (setting() removes keys for None)."""
    out = copy.deepcopy(VALID)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = None
    return out


def item_case(id: str, dotted: str, value: Any, fragment: str) -> Case:
    """A mistake in the first item of a repeated section: the error names ``section[0].key``."""
    section, _, leaf = dotted.rpartition(".")
    item = dict(copy.deepcopy(VALID[section.split(".")[0]][section.split(".")[1]][0]))
    if value is None and fragment == "is required":
        item.pop(leaf)
    else:
        item[leaf] = value
    return case(id, setting(VALID, section, [item]), f"{section}[0].{leaf}", fragment)


def build_cases() -> list[Case]:
    cases: list[Case] = []
    # an unknown key in every section, and a misspelt one with a hint
    for section in ["", *SECTIONS]:
        dotted = f"{section}.colour" if section else "colour"
        cases.append(case(f"unknown-key:{dotted}", setting(VALID, dotted, "blue"), dotted, "unknown key"))
    cases.append(
        case(
            "unknown-key:typo",
            setting(VALID, "cluster.hearbeat-interval", "1s"),
            "cluster.hearbeat-interval",
            "did you mean 'heartbeat-interval'",
        )
    )
    for section in REPEATED:  # an unknown key in an item; an item that is not a mapping
        item = {**VALID[section.split(".")[0]][section.split(".")[1]][0], "colour": "blue"}
        cases.append(
            case(
                f"unknown-key:{section}",
                setting(VALID, section, [item]),
                f"{section}[0].colour",
                "unknown key",
            )
        )
        cases.append(
            case(
                f"not-a-mapping:{section}",
                setting(VALID, section, [7]),
                f"{section}[0]",
                "expected a mapping",
            )
        )
    # every section given something other than a mapping
    for section in SECTIONS:
        cases.append(
            case(f"not-a-mapping:{section}", setting(VALID, section, [1, 2]), section, "expected a mapping")
        )
    # every leaf key: wrong values
    for dotted, mistakes in LEAF_MISTAKES.items():
        for i, (value, fragment) in enumerate(mistakes):
            if dotted.rpartition(".")[0] in REPEATED:
                cases.append(item_case(f"value:{dotted}:{i}", dotted, value, fragment))
                continue
            base = VALID
            if dotted == "cluster.join-token-file":  # exclusive with join-token: a file-only config
                base = setting(VALID, "cluster.join-token", None)
            if value is None:  # a missing required key inside a present section, or an explicit null
                data = setting(base, dotted, None) if fragment == "is required" else raw_null(dotted)
            else:
                data = setting(base, dotted, value)
            cases.append(case(f"value:{dotted}:{i}", data, dotted, fragment))
    # missing required keys
    no_cluster = {k: v for k, v in VALID.items() if k != "cluster"}
    cases += [
        case("missing:node-id", setting(VALID, "cluster.node-id", None), "cluster.node-id", "is required"),
        case("missing:cluster-section", no_cluster, "cluster.node-id", "is required", has_line=False),
        case(
            "missing:peers-for-joiner",
            setting(VALID, "cluster.peers", None),
            "cluster.peers",
            "at least one peer",
        ),
        case("null:log-level", raw_null("log-level"), "log-level", "must not be null"),
    ]
    # rules across keys
    both = setting(VALID, "cluster.join-token-file", "join.token")
    file_only = setting(setting(VALID, "cluster.join-token", None), "cluster.join-token-file", "join.token")
    cases += [
        case(
            "rule:election-vs-heartbeat",
            setting(VALID, "cluster.election-timeout", "400ms"),
            "cluster.election-timeout",
            "at least 5 x cluster.heartbeat-interval",
        ),
        case(
            "rule:fence-vs-election",
            setting(VALID, "cluster.isolation-fence-after", "500ms"),
            "cluster.isolation-fence-after",
            "at least cluster.election-timeout",
        ),
        case(
            "rule:renew-before-vs-lifetime",
            setting(VALID, "cluster.certificate-renew-before", "400d"),
            "cluster.certificate-renew-before",
            "less than cluster.certificate-lifetime",
        ),
        case(
            "rule:token-and-token-file",
            both,
            "cluster.join-token-file",
            "mutually exclusive",
            files=(("join.token", JOIN_TOKEN),),
        ),
        case(
            "rule:token-file-empty",
            file_only,
            "cluster.join-token-file",
            "is empty",
            files=(("join.token", "\n"),),
        ),
        case("rule:token-file-missing", file_only, "cluster.join-token-file", "cannot read"),
        case(
            "rule:wildcard-bind-and-advertise",
            setting(
                setting(VALID, "cluster.bind-address", "0.0.0.0:7000"),
                "cluster.advertise-address",
                "0.0.0.0:7000",
            ),
            "cluster.advertise-address",
            "must be an address other nodes can reach",
        ),
        case(
            "rule:peer-duplicate",
            setting(VALID, "cluster.peers", ["10.0.0.1:7000", "10.0.0.1:7000"]),
            "cluster.peers[1]",
            "duplicate of cluster.peers[0]",
        ),
        case(
            "rule:peer-wildcard",
            setting(VALID, "cluster.peers", ["0.0.0.0:7000"]),
            "cluster.peers[0]",
            "not an address",
        ),
        case(
            "rule:peer-type",
            setting(VALID, "cluster.peers", ["10.0.0.1:7000", 7]),
            "cluster.peers[1]",
            "host:port",
        ),
    ]
    # text-level mistakes
    valid_text = yaml.safe_dump(VALID, sort_keys=False)
    cases += [
        Case(
            "yaml:date-for-a-path",
            valid_text.replace("data-dir: state", "data-dir: 2001-02-30"),
            "data-dir",
            "quote it",
        ),
        Case(
            "yaml:bad-bool-tag",
            valid_text.replace("enabled: true", "enabled: !!bool maybe", 1),
            "cluster.enabled",
            "bool",
        ),
        Case(
            "yaml:empty-int-tag",
            valid_text.replace("trailing-logs: 10240", "trailing-logs: !!int"),
            "cluster.trailing-logs",
            "not a valid YAML int",
        ),
        Case("yaml:duplicate-key", valid_text + "log-level: debug\n", "log-level", "duplicate key"),
        Case("yaml:syntax", "cluster:\n  node-id: 1\n  peers: [10.0.0.1:7000\n", "", "invalid YAML at line"),
        Case("yaml:bad-indent", "cluster:\n  node-id: 1\n bad: 2\n", "", "invalid YAML at line 3"),
        Case("yaml:tab-indent", "cluster:\n\tnode-id: 1\n", "", "invalid YAML"),
        Case("yaml:unknown-tag", "cluster: !!python/object:os.system {node-id: 1}\n", "", "invalid YAML"),
        Case("top:list", "- cluster\n- node-id\n", "", "top level must be a mapping"),
        Case("top:scalar", "cluster node-id 1\n", "", "top level must be a mapping"),
        Case("file:empty", "", "", "config file is empty"),
        Case("file:comment-only", "# nothing here\n", "", "config file is empty"),
    ]
    return cases


CASES = build_cases()


def materialize(tmp: Path, c: Case) -> Path:
    for name, content in c.files:
        (tmp / name).write_text(content)
    path = tmp / "quorumd.yaml"
    path.write_text(c.text)
    return path


def check_message(message: str, c: Case) -> None:
    assert c.fragment in message, (c.id, message)
    if c.key:
        assert message.startswith(f"{c.key}: "), (c.id, message)


def test_every_leaf_key_has_a_mistake() -> None:
    assert set(LEAVES) - set(LEAF_MISTAKES) == set()
    assert set(LEAF_MISTAKES) <= set(CONFIG_KEYS)
    cfg = config_from_dict(VALID)  # the base every case mutates is valid
    assert cfg.cluster.is_joiner and cfg.api.tls is not None and cfg.ran.notify_url


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_mistake_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], c: Case) -> None:
    path = materialize(tmp_path, c)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == c.key, str(info.value)
    check_message(str(info.value), c)
    if c.key and c.has_line:
        assert info.value.line is not None  # from a file, a key error carries its line
    # the CLI entry point (in process): exit status 2 and the same message, one line on stderr
    assert cli.main(["run", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"quorumd: config error: {info.value}\n"


# --- the real CLI, as a process -------------------------------------------------------------------


def run_cli(
    config: Path, cwd: Path, command: str = "run", prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    extra = ["--peers", "1=127.0.0.1:7000"] if command == "recover" else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "quorumd.node.cli", command, "--config", str(config), *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def check_cli(res: subprocess.CompletedProcess[str], key: str, fragment: str) -> None:
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    prefix = f"quorumd: config error: {key}: " if key else "quorumd: config error: "
    assert lines[0].startswith(prefix) and fragment in lines[0], lines[0]


def cli_sample() -> list[Case]:
    """The first case of every category, and every loader-level (YAML, file, top-level) case."""
    seen: set[str] = set()
    out: list[Case] = []
    for c in CASES:
        category = c.id.split(":", 1)[0]
        if category not in seen or category in ("yaml", "file", "top", "rule"):
            seen.add(category)
            out.append(c)
    return out


def test_cli_process_exits_2_with_the_message(tmp_path: Path) -> None:
    def one(i_case: tuple[int, Case]) -> str | None:
        i, c = i_case
        d = tmp_path / f"c{i}"
        d.mkdir()
        res = run_cli(materialize(d, c), d)
        try:
            check_cli(res, c.key, c.fragment)
        except AssertionError as exc:
            return f"{c.id}: {exc}"
        return None

    sample = cli_sample()
    assert len(sample) >= 15
    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [f for f in pool.map(one, enumerate(sample)) if f is not None]
    assert failures == []


def test_cli_missing_directory_and_undecodable_files(tmp_path: Path) -> None:
    check_cli(run_cli(tmp_path / "absent.yaml", tmp_path), "", "cannot read config file")
    check_cli(run_cli(tmp_path, tmp_path), "", "cannot read config file")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"cluster:\n  node-id: 1\ndata-dir: /caf\xe9\n")
    check_cli(run_cli(latin1, tmp_path), "", "cannot read config file")
    # quorumd recover reads the same config the same way
    check_cli(
        run_cli(materialize(tmp_path, CASES[0]), tmp_path, command="recover"), CASES[0].key, "unknown key"
    )


def test_cli_unreadable_file(tmp_path: Path) -> None:
    config = tmp_path / "quorumd.yaml"
    config.write_text(yaml.safe_dump({"cluster": {"node-id": 1}}))
    config.chmod(0o000)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads anything; without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH it obeys the mode bits
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is missing"
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")
        assert load_config(config).node_id == 1  # with the capabilities, the file itself is fine
    res = run_cli(config, tmp_path, prefix=prefix)
    check_cli(res, "", "cannot read config file")
    assert "Permission denied" in res.stderr


# --- hypothesis ---------------------------------------------------------------------------------

INTERESTING_STRINGS = [
    "100ms", "1.5s", "0s", "25h", "9" * 40 + "h", "0.0001ms", "1m30s", "10", "fast",
    "127.0.0.1:7000", "[::]:7000", "0.0.0.0:7000", "[::1]:7000", "host:0", "[::1", "a..b:1", "node1:7000",
    "http://[::1", "https://amf.example/", "ftp://x", "~no-such-user-qd/x", "~/x", "/abs/path", "rel/path",
    "", " ", "\x00", "\ud800", "é", "qd_jt_" + "x" * 20, "debug", "json", "text", "yes", "null",
]  # fmt: skip
KEY_NAMES = [k.rsplit(".", 1)[-1] for k in CONFIG_KEYS] + ["colour", ""]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(INTERESTING_STRINGS)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
keys_anywhere = st.sampled_from(sorted(CONFIG_KEYS))
weird_keys = st.sampled_from(KEY_NAMES) | st.text(max_size=8) | st.integers() | st.booleans() | st.none()
Mutation = Callable[[dict[str, Any]], None]


def _parent(data: dict[str, Any], dotted: str) -> tuple[Any, str]:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node, last


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["drop", "set", "inject"]))
    dotted = draw(keys_anywhere)
    value = draw(values)
    extra_key = draw(weird_keys)

    def apply(data: dict[str, Any]) -> None:
        node, last = _parent(data, dotted)
        if not isinstance(node, dict):
            return
        if kind == "drop":
            node.pop(last, None)
        elif kind == "set":
            node[last] = value
        else:
            child = node.get(last)
            target: dict[Any, Any] = child if isinstance(child, dict) else node
            target[extra_key] = value

    return apply


def accepted_or_config_error(load: Callable[[], Config]) -> None:
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc)  # a message, and the documented type
        return
    # accepted: it must serialize and load again
    again = config_from_dict(config_to_dict(cfg), base_dir=cfg.data_dir.parent)
    assert again.node_id == cfg.node_id and again.cluster.is_joiner == cfg.cluster.is_joiner


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("config-fuzz")
    (d / "join.token").write_text(JOIN_TOKEN + "\n")
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutations(), min_size=1, max_size=6))
def test_fuzz_mutated_dicts(fuzz_dir: Path, muts: list[Mutation]) -> None:
    data = copy.deepcopy(VALID)
    for mutate in muts:
        mutate(data)
    accepted_or_config_error(lambda: config_from_dict(data, base_dir=fuzz_dir))


YAML_CHARS = st.sampled_from([*":-[]{}!&*#|>'\"%@`,? \n\t\\", "~", "0", "a", "!!int", "!!binary", "<<"])


@st.composite
def edited_text(draw: st.DrawFn) -> str:
    text = yaml.safe_dump(VALID, sort_keys=False)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        pos = draw(st.integers(min_value=0, max_value=len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.lists(YAML_CHARS | st.characters(), min_size=1, max_size=4).map("".join))
        if op == "insert":
            text = text[:pos] + chunk + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + len(chunk) :]
        else:
            text = text[:pos] + chunk + text[pos + len(chunk) :]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited_text())
def test_fuzz_edited_yaml_text(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    accepted_or_config_error(lambda: load_config(path))
