"""Config loading (node/config/schema.py) and logging setup (node/daemon/logs.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quorumd.node.config import example
from quorumd.node.config.schema import (
    CONFIG_KEYS,
    TABLE,
    ApiConfig,
    AutopilotConfig,
    BgpConfig,
    ClusterConfig,
    Config,
    ConfigError,
    HostPort,
    RanConfig,
    TlsConfig,
    config_from_dict,
    config_to_dict,
    format_duration,
    load_config,
    parse_duration,
    parse_host_port,
)
from quorumd.node.config.table import REQUIRED, Fields, Key, Section, Table
from quorumd.node.config.values import Address, Bool, Duration, Int, ListOf
from quorumd.node.daemon.logs import add_redaction, configure_logging

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "quorumd.example.yaml"


def minimal(**cluster: Any) -> dict[str, Any]:
    return {"cluster": {"node-id": 1, **cluster}}


def error_of(data: dict[str, Any], base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base_dir=base_dir)
    return info.value


def write(tmp_path: Path, text: str, name: str = "quorumd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and the example file ---------------------------------------------------------------


def test_defaults_match_the_spec() -> None:
    cfg = config_from_dict(minimal())
    assert cfg.data_dir == Path("/var/lib/quorumd")
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert cfg.api == ApiConfig(address="0.0.0.0", port=5002, tls=None)
    c = cfg.cluster
    assert c.enabled is True and c.node_id == 1 and cfg.node_id == 1
    assert c.bind_address == HostPort("0.0.0.0", 7000)
    assert c.advertise_address == HostPort("127.0.0.1", 7000)  # wildcard bind => loopback + note
    assert any("advertise-address" in note for note in cfg.notes)
    assert c.peers == () and c.join_token is None and not c.is_joiner
    assert c.join_timeout_seconds == 120.0
    assert c.propose_timeout_seconds == 5.0
    assert c.heartbeat_interval_seconds == 0.1
    assert c.election_timeout_seconds == 1.0
    assert (c.snapshot_threshold, c.trailing_logs) == (8192, 10240)
    assert c.autopilot == AutopilotConfig(
        last_contact_threshold_seconds=10.0,
        max_trailing_logs=500,
        server_stabilization_time_seconds=10.0,
        cleanup_dead_servers=False,
        min_quorum=0,
        reconcile_interval_seconds=2.0,
    )
    assert cfg.bgp == BgpConfig(enabled=True)
    assert cfg.ran == RanConfig(notify_url=None)


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.add(path)
            out |= _key_paths(value, path)
    return out


def test_example_file_lists_every_key_with_its_default() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    paths = _key_paths(raw)
    # api.tls is null in the example, so its children are documented in its comment; bgp.peers is
    # an empty list, its item keys documented in the comment lines below it
    item_keys = {"bgp.peers.address", "bgp.peers.remote-as", "bgp.peers.port"}
    assert set(CONFIG_KEYS) - paths == {"api.tls.cert", "api.tls.key", *item_keys}
    assert all(f"#   {k.rpartition('.')[2]}:" in EXAMPLE.read_text() or f"# - {k.rpartition('.')[2]}:"
               in EXAMPLE.read_text() for k in item_keys)  # fmt: skip
    assert paths <= set(CONFIG_KEYS)
    tls_line = next(line for line in EXAMPLE.read_text().splitlines() if line.strip().startswith("tls:"))
    assert "{cert:" in tls_line and "key:" in tls_line
    cfg = load_config(EXAMPLE)
    assert dataclasses.replace(cfg, source=None) == config_from_dict(minimal())
    # every key line carries a comment
    for line in EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, line


def test_full_config_with_every_key(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "join.token").write_text("  qd_jt_abcdefgh12345678\n\n")
    path = write(
        tmp_path,
        """
data-dir: state
log-level: debug
log-format: json
api:
  address: 10.0.0.1
  port: 8443
  tls: {cert: tls/api.crt, key: /etc/quorumd/api.key}
cluster:
  enabled: true
  node-id: 63
  bind-address: "[::]:7001"
  advertise-address: node-a.example.com:7001
  peers: [10.0.0.1:7000, "[fd00::2]:7000", node-c.example.com:7000]
  join-token-file: secrets/join.token
  join-timeout: 2m
  propose-timeout: 1.5s
  heartbeat-interval: 50ms
  election-timeout: 250ms
  snapshot-threshold: 1
  trailing-logs: 0
  autopilot:
    last-contact-threshold: 1m30s
    max-trailing-logs: 0
    server-stabilization-time: 500ms
    cleanup-dead-servers: true
    min-quorum: 3
    reconcile-interval: 1h
bgp:
  enabled: false
ran:
  notify-url: https://amf.example.com:8443/ran-events
""",
    )
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.data_dir == tmp_path / "state"
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert cfg.api == ApiConfig(
        "10.0.0.1", 8443, tls=TlsConfig(tmp_path / "tls/api.crt", Path("/etc/quorumd/api.key"))
    )
    c = cfg.cluster
    assert c.node_id == 63
    assert c.bind_address == HostPort("::", 7001) and str(c.bind_address) == "[::]:7001"
    assert c.advertise_address == HostPort("node-a.example.com", 7001)
    assert c.peers == (
        HostPort("10.0.0.1", 7000),
        HostPort("fd00::2", 7000),
        HostPort("node-c.example.com", 7000),
    )
    assert c.join_token == "qd_jt_abcdefgh12345678"  # read and stripped
    assert c.join_token_file == tmp_path / "secrets" / "join.token"
    assert c.is_joiner
    assert (c.join_timeout_seconds, c.propose_timeout_seconds) == (120.0, 1.5)
    assert (c.heartbeat_interval_seconds, c.election_timeout_seconds) == (0.05, 0.25)
    assert (c.snapshot_threshold, c.trailing_logs) == (1, 0)
    assert c.autopilot == AutopilotConfig(90.0, 0, 0.5, True, 3, 3600.0)
    assert cfg.bgp.enabled is False
    assert cfg.ran.notify_url == "https://amf.example.com:8443/ran-events"
    assert cfg.notes == ()
    assert "qd_jt_abcdefgh12345678" not in repr(cfg)  # the token stays out of reprs and logs


def test_config_to_dict_round_trips(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "data-dir": "/srv/q",
            "api": {"tls": {"cert": "/a.crt", "key": "/a.key"}},
            "cluster": {
                "node-id": 7,
                "bind-address": "10.1.1.1:7000",
                "peers": ["10.1.1.2:7000"],
                "join-token": "qd_jt_0123456789",
                "heartbeat-interval": "20ms",
                "election-timeout": "1.5s",
                "join-timeout": "90s",
            },
            "ran": {"notify-url": "http://x.example:80/"},
        }
    )
    text = yaml.safe_dump(config_to_dict(cfg))
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert again.cluster.advertise_address == HostPort("10.1.1.1", 7000)  # non-wildcard bind is the default


# --- the schema table ----------------------------------------------------------------------------


def test_shipped_example_is_rendered_from_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert EXAMPLE.read_text() == example.render_example(), (
        "deploy/quorumd.example.yaml is stale: python -m quorumd.node.config.example > "
        "deploy/quorumd.example.yaml"
    )
    assert example.main(["--check", str(EXAMPLE)]) == 0
    stale = write(tmp_path, EXAMPLE.read_text() + "# edited by hand\n")
    assert example.main(["--check", str(stale)]) == 1
    assert "regenerate" in capsys.readouterr().err
    assert example.main([]) == 0
    assert capsys.readouterr().out == EXAMPLE.read_text()


# a repeated section (bgp.peers) is a tuple of its dataclass: look at its one item
WITH_ONE_PEER = {"bgp": {"peers": [{"address": "10.0.0.254", "remote-as": 64512}]}}


def _owner(cfg: Any, section: str) -> Any:
    owner = cfg
    for part in section.split(".") if section else ():
        owner = getattr(owner, part.replace("-", "_"))
        if isinstance(owner, tuple):
            owner = owner[0]
    return owner


def test_every_row_has_a_doc_and_a_field() -> None:
    cfg = config_from_dict({**minimal(), **WITH_ONE_PEER})
    for row in TABLE.walk():
        assert row.doc or (isinstance(row, Section) and not row.optional), row.name
        owner = _owner(cfg, row.parent)
        if owner is not None:  # an optional section that is unset has no fields to look at
            assert hasattr(owner, row.field), row.name
    assert TABLE.names == CONFIG_KEYS


def test_table_defaults_are_the_dataclass_defaults() -> None:
    cfg = config_from_dict({**minimal(), **WITH_ONE_PEER})
    for row in TABLE.walk():
        if isinstance(row, Key) and not row.required and not row.nullable:
            owner = _owner(cfg, row.parent)
            assert getattr(owner, row.field) == TABLE.default(row.name), row.name
    loopback = HostPort("127.0.0.1", 7000)
    assert ClusterConfig(node_id=1) == dataclasses.replace(cfg.cluster, advertise_address=loopback)


def test_a_table_rejects_rows_out_of_order_and_bad_defaults() -> None:
    with pytest.raises(ValueError, match="must come first"):
        Table([Key("a.b", Bool(), True, "x")])
    with pytest.raises(ValueError, match="two rows"):
        Table([Key("a", Bool(), True, "x"), Key("a", Bool(), True, "x")])
    with pytest.raises(ValueError):
        Table([Key("t", Duration(), "5", "a default must be a valid value")])
    with pytest.raises(ValueError):
        Table([Key("n", Int(1, 63), REQUIRED, "an example must be valid too", example=64)])


# A toy table with what the product table will need next: a nested section with bounds other than the
# default, and a list of mappings (bgp.peers: [{address, remote-as, port}]).
TOY = Table(
    header=("toy",),
    rows=[
        Section("bgp", doc="routing"),
        Key("bgp.enabled", Bool(), True, "speaker on"),
        Section("bgp.peers", repeated=True, doc="neighbours the speaker dials"),
        Key("bgp.peers.address", Address(reachable=True), REQUIRED, "neighbour host:port"),
        Key("bgp.peers.remote-as", Int(1, 4_294_967_295), REQUIRED, "neighbour AS"),
        Key("bgp.peers.port", Int(1, 65535), 179, "BGP port"),
        Section("cluster"),
        Key(
            "cluster.certificate-lifetime", Duration(high="3650d"), "365d", "node certificates live this long"
        ),
    ],
)


@TOY.binds("bgp.peers")
@dataclasses.dataclass(frozen=True, slots=True)
class ToyPeer:
    address: HostPort
    remote_as: int
    port: int = TOY.default("bgp.peers.port")


@TOY.binds("bgp")
@dataclasses.dataclass(frozen=True, slots=True)
class ToyBgp:
    enabled: bool = True
    peers: tuple[ToyPeer, ...] = ()


@TOY.binds("cluster")
@dataclasses.dataclass(frozen=True, slots=True)
class ToyCluster:
    certificate_lifetime_seconds: float = TOY.default("cluster.certificate-lifetime")


@TOY.binds("")
@dataclasses.dataclass(frozen=True, slots=True)
class ToyConfig:
    bgp: ToyBgp = ToyBgp()
    cluster: ToyCluster = ToyCluster()


def _no_ports(f: Fields) -> None:
    if f.get("port") == 1:
        raise f.error("port", "port 1 is tcpmux")


def toy(data: dict[str, Any], rules: dict[str, Any] | None = None) -> Any:
    return TOY.build(data, Path("/"), rules or {}, [])


def test_toy_table_lists_of_mappings_and_nested_sections() -> None:
    assert toy({}) == ToyConfig()
    assert ToyCluster().certificate_lifetime_seconds == 365 * 86400.0
    lifetime = toy({"cluster": {"certificate-lifetime": "1d12h"}}).cluster.certificate_lifetime_seconds
    assert lifetime == 129600.0
    peers = [
        {"address": "10.0.0.9:1179", "remote-as": 65001},
        {"address": "r2:179", "remote-as": 65002, "port": 1179},
    ]
    cfg = toy({"bgp": {"peers": peers}})
    assert cfg.bgp.peers == (
        ToyPeer(HostPort("10.0.0.9", 1179), 65001),
        ToyPeer(HostPort("r2", 179), 65002, 1179),
    )
    assert TOY.dump(cfg)["bgp"]["peers"][1] == {"address": "r2:179", "remote-as": 65002, "port": 1179}
    assert toy(TOY.dump(cfg)) == cfg
    assert TOY.names == (
        "bgp",
        "bgp.enabled",
        "bgp.peers",
        "bgp.peers.address",
        "bgp.peers.remote-as",
        "bgp.peers.port",
        "cluster",
        "cluster.certificate-lifetime",
    )


@pytest.mark.parametrize(
    ("data", "key_path", "fragment"),
    [
        ({"bgp": {"peers": {"address": "a:1"}}}, "bgp.peers", "expected a list of mappings"),
        ({"bgp": {"peers": ["a:1"]}}, "bgp.peers[0]", "expected a mapping"),
        (
            {"bgp": {"peers": [{"address": "a:1", "remote-as": 1}, {"address": "b:1"}]}},
            "bgp.peers[1].remote-as",
            "is required",
        ),
        (
            {"bgp": {"peers": [{"address": "a:1", "remote-as": 1, "prot": 1}]}},
            "bgp.peers[0].prot",
            "did you mean 'port'",
        ),
        ({"bgp": {"peers": [{"address": "0.0.0.0:1", "remote-as": 1}]}}, "bgp.peers[0].address", "reach"),
        ({"bgp": {"peers": [{"address": "a:1", "remote-as": 0}]}}, "bgp.peers[0].remote-as", "1..4294967295"),
        ({"bgp": {"peers": [{"address": "a:1", "remote-as": 1, "port": 1}]}}, "bgp.peers[0].port", "tcpmux"),
        ({"cluster": {"certificate-lifetime": "3651d"}}, "cluster.certificate-lifetime", "at most 3650d"),
    ],
)
def test_toy_table_errors_name_the_item(data: dict[str, Any], key_path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        toy(data, {"bgp.peers": _no_ports})
    assert info.value.key_path == key_path and str(info.value).startswith(f"{key_path}: ")
    assert fragment in str(info.value)


def test_toy_table_renders_an_example() -> None:
    text = example.render(TOY)
    peers = next(line for line in text.splitlines() if line.startswith("  peers: []"))
    assert peers.index("#") == example.COMMENT_COLUMN and peers.endswith("# neighbours the speaker dials")
    assert "Generated" not in text  # only the product's file says how it is regenerated
    assert "    # - address: (required)" in text and "    #   port: 179" in text
    assert "certificate-lifetime: 365d" in text and "(1ms..3650d)" in text
    assert yaml.safe_load(text) == {
        "bgp": {"enabled": True, "peers": []},
        "cluster": {"certificate-lifetime": "365d"},
    }


def test_a_dataclass_without_a_field_for_a_row_is_refused() -> None:
    table = Table([Section("s"), Key("s.new-key", Bool(), True, "x"), Key("s.t", ListOf(Int(0)), [], "y")])
    with pytest.raises(TypeError, match=r"no field for s\.new-key"):

        @table.binds("s")
        @dataclasses.dataclass(frozen=True)
        class Missing:
            t: tuple[int, ...] = ()

    assert table.unbound() == ["", "s"]


# --- rules and choices ---------------------------------------------------------------------------


def test_heartbeat_error_message_names_the_key() -> None:
    err = error_of(minimal(**{"heartbeat-interval": "fast"}))
    assert err.key_path == "cluster.heartbeat-interval"
    assert str(err).startswith("cluster.heartbeat-interval: expected a duration like 100ms, got 'fast'")


def test_bare_number_duration_says_why() -> None:
    err = error_of(minimal(**{"propose-timeout": 5}))
    assert err.key_path == "cluster.propose-timeout"
    assert "bare number" in str(err) and "5s" in str(err)


@pytest.mark.parametrize(
    ("data", "key_path", "fragment"),
    [
        ({"cluster": {"node-id": 1}, "colour": "blue"}, "colour", "unknown key"),
        (
            minimal(**{"hearbeat-interval": "1s"}),
            "cluster.hearbeat-interval",
            "did you mean 'heartbeat-interval'",
        ),
        (
            {"cluster": {"node-id": 1, "autopilot": {"min_quorum": 1}}},
            "cluster.autopilot.min_quorum",
            "unknown",
        ),
        ({"cluster": {"node-id": 1}, "bgp": {"enabled": True, "asn": 1}}, "bgp.asn", "unknown key"),
        (
            {"cluster": {"node-id": 1}, "api": {"tls": {"cert": "/a", "key": "/b", "ca": "/c"}}},
            "api.tls.ca",
            "unknown",
        ),
        ({"cluster": {}}, "cluster.node-id", "required"),
        ({"log-level": "info"}, "cluster.node-id", "required"),
        (minimal(**{"node-id": True}), "cluster.node-id", "expected an integer, got a boolean"),
        ({"cluster": {"node-id": 0}}, "cluster.node-id", "1..63"),
        ({"cluster": {"node-id": 64}}, "cluster.node-id", "1..63"),
        ({"cluster": {"node-id": "1"}}, "cluster.node-id", "expected an integer"),
        ({"cluster": {"node-id": 1.0}}, "cluster.node-id", "expected an integer"),
        ({"cluster": {"node-id": 1}, "api": {"port": 0}}, "api.port", "1..65535"),
        ({"cluster": {"node-id": 1}, "api": {"port": 65536}}, "api.port", "1..65535"),
        ({"cluster": {"node-id": 1}, "api": {"port": True}}, "api.port", "boolean"),
        ({"cluster": {"node-id": 1}, "api": {"port": "5002"}}, "api.port", "expected an integer"),
        (
            {"cluster": {"node-id": 1}, "api": {"address": "not a host"}},
            "api.address",
            "IP address or a host name",
        ),
        ({"cluster": {"node-id": 1}, "api": "0.0.0.0:5002"}, "api", "expected a mapping"),
        ({"cluster": {"node-id": 1}, "api": {"tls": {"cert": "/a"}}}, "api.tls.key", "required"),
        ({"cluster": {"node-id": 1}, "api": {"tls": "/a.pem"}}, "api.tls", "expected a mapping"),
        ({"cluster": {"node-id": 1}, "log-level": "verbose"}, "log-level", "debug|info|warning|error"),
        ({"cluster": {"node-id": 1}, "log-level": "INFO"}, "log-level", "debug|info|warning|error"),
        ({"cluster": {"node-id": 1}, "log-level": None}, "log-level", "must not be null"),
        ({"cluster": {"node-id": 1}, "log-format": "xml"}, "log-format", "text|json"),
        ({"cluster": {"node-id": 1}, "data-dir": ""}, "data-dir", "must not be empty"),
        ({"cluster": {"node-id": 1}, "data-dir": 5}, "data-dir", "expected a string"),
        (minimal(enabled="true"), "cluster.enabled", "expected true or false"),
        (minimal(**{"bind-address": "0.0.0.0"}), "cluster.bind-address", "expected host:port"),
        (minimal(**{"bind-address": "0.0.0.0:0"}), "cluster.bind-address", "1..65535"),
        (minimal(**{"bind-address": "::1:7000"}), "cluster.bind-address", "[addr]:port"),
        (minimal(**{"advertise-address": "0.0.0.0:7000"}), "cluster.advertise-address", "not 0.0.0.0"),
        (minimal(**{"advertise-address": "[::]:7000"}), "cluster.advertise-address", "not ::"),
        (minimal(**{"advertise-address": "10.0.0.1"}), "cluster.advertise-address", "host:port"),
        (minimal(**{"advertise-address": "10.0.0:7000"}), "cluster.advertise-address", "neither"),
        (minimal(**{"advertise-address": "bad_name:7000"}), "cluster.advertise-address", "neither"),
        (minimal(peers="10.0.0.1:7000"), "cluster.peers", "expected a list"),
        (minimal(peers=["10.0.0.1:7000", "10.0.0.2"]), "cluster.peers[1]", "host:port"),
        (minimal(peers=["10.0.0.1:7000", 7000]), "cluster.peers[1]", "expected host:port"),
        (
            minimal(peers=["a.example:7000", "a.example:7000"]),
            "cluster.peers[1]",
            "duplicate of cluster.peers[0]",
        ),
        (minimal(peers=["0.0.0.0:7000"]), "cluster.peers[0]", "not an address to connect to"),
        (
            minimal(peers=["a.example:7000"], **{"join-token": "qd_jt_x1234567", "join-token-file": "/t"}),
            "cluster.join-token-file",
            "mutually exclusive",
        ),
        (minimal(**{"join-token": "qd_jt_x1234567"}), "cluster.peers", "at least one peer"),
        (minimal(peers=["a.example:7000"], **{"join-token": ""}), "cluster.join-token", "must not be empty"),
        (
            minimal(peers=["a.example:7000"], **{"join-token": 12345}),
            "cluster.join-token",
            "expected a string",
        ),
        (
            minimal(peers=["a.example:7000"], **{"join-token": "ab cd"}),
            "cluster.join-token",
            "without spaces",
        ),
        (minimal(**{"join-timeout": "0s"}), "cluster.join-timeout", "greater than zero"),
        (minimal(**{"join-timeout": "-1s"}), "cluster.join-timeout", "expected a duration"),
        (minimal(**{"join-timeout": "10"}), "cluster.join-timeout", "expected a duration"),
        (minimal(**{"join-timeout": "10 s"}), "cluster.join-timeout", "expected a duration"),
        (minimal(**{"join-timeout": "10d"}), "cluster.join-timeout", "at most 24h"),
        (minimal(**{"join-timeout": "10w"}), "cluster.join-timeout", "expected a duration"),
        (minimal(**{"join-timeout": True}), "cluster.join-timeout", "expected a duration"),
        (minimal(**{"election-timeout": "400ms"}), "cluster.election-timeout", "at least 5 x"),
        (
            minimal(**{"heartbeat-interval": "1s", "election-timeout": "4999ms"}),
            "cluster.election-timeout",
            "at least 5 x",
        ),
        (minimal(**{"snapshot-threshold": 0}), "cluster.snapshot-threshold", ">= 1"),
        (minimal(**{"trailing-logs": -1}), "cluster.trailing-logs", ">= 0"),
        (minimal(autopilot={"min-quorum": 64}), "cluster.autopilot.min-quorum", "0..63"),
        (minimal(autopilot={"min-quorum": -1}), "cluster.autopilot.min-quorum", "0..63"),
        (minimal(autopilot={"max-trailing-logs": -5}), "cluster.autopilot.max-trailing-logs", ">= 0"),
        (
            minimal(autopilot={"cleanup-dead-servers": "yes"}),
            "cluster.autopilot.cleanup-dead-servers",
            "true or false",
        ),
        (
            minimal(autopilot={"reconcile-interval": "0ms"}),
            "cluster.autopilot.reconcile-interval",
            "greater than zero",
        ),
        (
            minimal(autopilot={"last-contact-threshold": 10}),
            "cluster.autopilot.last-contact-threshold",
            "bare number",
        ),
        (minimal(autopilot=[1]), "cluster.autopilot", "expected a mapping"),
        (
            {"cluster": {"node-id": 1}, "ran": {"notify-url": "ftp://x.example/"}},
            "ran.notify-url",
            "http:// or https://",
        ),
        (
            {"cluster": {"node-id": 1}, "ran": {"notify-url": "https://"}},
            "ran.notify-url",
            "http:// or https://",
        ),
        ({"cluster": {"node-id": 1}, "ran": {"notify-url": "http://x:99999/"}}, "ran.notify-url", "bad port"),
        ({"cluster": {"node-id": 1}, "bgp": {"enabled": 1}}, "bgp.enabled", "true or false"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key_path: str, fragment: str) -> None:
    err = error_of(data)
    assert err.key_path == key_path
    assert str(err).startswith(f"{key_path}: ")
    assert fragment in str(err)


def test_error_does_not_echo_a_bad_token() -> None:
    err = error_of(minimal(peers=["a.example:7000"], **{"join-token": "qd_secret\tvalue1234"}))
    assert "qd_secret" not in str(err)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("0.5ms", 0.0005),
        ("1d", 86400.0),
        ("1d12h", 129600.0),
        ("365d", 365 * 86400.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "5", "s", "1.s", ".5s", "5 s", "-5s", "1w", "1D", "1ms2", "fast", "1e3ms"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.1, 1.0, 120.0, 1.5, 0.0005)] == [
        "100ms",
        "1s",
        "120s",
        "1500ms",
        "0.5ms",
    ]


def test_host_port_forms() -> None:
    assert parse_host_port("10.0.0.1:7000") == HostPort("10.0.0.1", 7000)
    assert parse_host_port("[fd00::1]:7000") == HostPort("fd00::1", 7000)
    assert str(HostPort("fd00::1", 7000)) == "[fd00::1]:7000"
    assert parse_host_port("node-1.cluster.local:7000") == HostPort("node-1.cluster.local", 7000)
    assert parse_host_port("localhost:1") == HostPort("localhost", 1)
    for bad in ["", ":7000", "host:", "host:x", "[::1]7000", "[nothost]:1", "a..b:1", "-a:1", "host:65536"]:
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_advertise_defaults() -> None:
    assert config_from_dict(
        minimal(**{"bind-address": "10.0.0.5:7100"})
    ).cluster.advertise_address == HostPort("10.0.0.5", 7100)
    cfg = config_from_dict(minimal(**{"bind-address": "[::]:7100"}))
    assert cfg.cluster.advertise_address == HostPort("::1", 7100)
    assert cfg.notes
    explicit = config_from_dict(minimal(**{"advertise-address": "q1.example.com:7000"}))
    assert explicit.cluster.advertise_address == HostPort("q1.example.com", 7000)
    assert explicit.notes == ()


def test_cluster_disabled_still_needs_node_id_and_notes_unused_keys() -> None:
    assert error_of({"cluster": {"enabled": False}}).key_path == "cluster.node-id"
    cfg = config_from_dict(
        {
            "cluster": {
                "enabled": False,
                "node-id": 4,
                "peers": ["a.example:7000"],
                "join-token": "qd_jt_12345678",
            }
        }
    )
    assert cfg.cluster.enabled is False and cfg.node_id == 4
    assert any("cluster.enabled is false" in note for note in cfg.notes)
    assert not any("advertise-address" in note for note in cfg.notes)  # irrelevant when standalone


def test_null_means_unset_for_optional_keys_and_sections() -> None:
    cfg = config_from_dict(
        {
            "api": {"tls": None},
            "cluster": {"node-id": 2, "join-token": None, "join-token-file": None, "advertise-address": None},
            "bgp": None,
            "ran": {"notify-url": None},
        }
    )
    assert cfg.api.tls is None and cfg.cluster.join_token is None and cfg.bgp.enabled is True


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    cfg = config_from_dict({"data-dir": "d", "cluster": {"node-id": 1}}, base_dir=tmp_path)
    assert cfg.data_dir == tmp_path / "d"


# --- join-token-file -----------------------------------------------------------------------------


def test_join_token_file_missing_names_the_key(tmp_path: Path) -> None:
    err = error_of(minimal(peers=["a.example:7000"], **{"join-token-file": "nope.token"}), base_dir=tmp_path)
    assert err.key_path == "cluster.join-token-file"
    assert "cannot read" in str(err) and "nope.token" in str(err)


def test_join_token_file_empty_or_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.token").write_text(" \n")
    err = error_of(minimal(peers=["a.example:7000"], **{"join-token-file": "empty.token"}), base_dir=tmp_path)
    assert err.key_path == "cluster.join-token-file" and "is empty" in str(err)
    err = error_of(minimal(peers=["a.example:7000"], **{"join-token-file": str(tmp_path)}))
    assert err.key_path == "cluster.join-token-file"


def test_join_token_file_with_bad_content_does_not_echo_it(tmp_path: Path) -> None:
    (tmp_path / "j.token").write_text("qd_jt_aaaa bbbb\n")
    err = error_of(minimal(peers=["a.example:7000"], **{"join-token-file": "j.token"}), base_dir=tmp_path)
    assert err.key_path == "cluster.join-token-file" and "bbbb" not in str(err)


# --- file-level errors ---------------------------------------------------------------------------


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster:\n  node-id: 1\n  peers: [a.example:7000\nbgp:\n  enabled: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == ""
    assert re.search(r"invalid YAML at line \d+, column \d+", str(info.value))
    path = write(tmp_path, "cluster:\n  node-id: 1\n bad-indent: 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text", ["- cluster\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, text))


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"cluster:\n  node-id: 1\ndata-dir: /caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(bad)


def test_duplicate_keys_are_errors_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster:\n  node-id: 1\n  node-id: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == "cluster.node-id"
    assert str(info.value) == "cluster.node-id: duplicate key (line 3)"


def test_errors_from_files_carry_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "log-level: info\ncluster:\n  node-id: 1\n  autopilot:\n    min-quorum: 99\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == "cluster.autopilot.min-quorum"
    assert info.value.line == 5
    assert str(info.value).endswith("(line 5)")
    path = write(tmp_path, "cluster:\n  node-id: 1\nsurprise: 1\n")
    with pytest.raises(ConfigError, match=r"^surprise: unknown key \(line 3\)$"):
        load_config(path)


def test_config_types_are_frozen() -> None:
    cfg = config_from_dict(minimal())
    for obj in (cfg, cfg.api, cfg.cluster, cfg.cluster.autopilot, cfg.bgp, cfg.ran, HostPort("a", 1)):
        assert dataclasses.is_dataclass(obj)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, None)
        assert not hasattr(obj, "__dict__")  # slotted
    assert isinstance(cfg, Config) and isinstance(cfg.cluster, ClusterConfig)


@pytest.mark.parametrize(
    ("text", "key_path", "fragment"),
    [
        ("cluster:\n  node-id: 010\n", "cluster.node-id", "octal"),  # YAML 1.1 would give 8
        ("cluster:\n  node-id: 1\napi:\n  port: 05002\n", "api.port", "octal"),  # would give 2562
        ("cluster:\n  node-id: 1:00\n", "cluster.node-id", "base 60"),  # would give 60
        ("cluster:\n  node-id: 1\nbackup:\n  keep: 1:0:0\n", "backup.keep", "base 60"),
    ],
)
def test_integers_yaml_reads_in_another_base_are_refused(
    tmp_path: Path, text: str, key_path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key_path == key_path
    assert fragment in str(info.value) and info.value.line is not None


@pytest.mark.parametrize("text", ["0", "-7", "+7", "10", "1_000", "0x1f", "0b101"])
def test_plain_integers_still_load(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, f"cluster:\n  node-id: 1\nbogus: {text}\n")
    with pytest.raises(ConfigError, match=r"^bogus: unknown key"):  # the value itself loads
        load_config(path)


@pytest.mark.parametrize(
    "url",
    [
        "http://a b.example/",
        "http://amf.exa\nmple/ran",  # the URL parser drops the newline: amf.example
        "https://amf.example/ran\tevents",
        "http://amf_1.example/",
        "http://-amf.example/",
        "http://amf..example/",
    ],
)
def test_notify_url_needs_a_valid_host_and_no_whitespace(url: str) -> None:
    err = error_of({"cluster": {"node-id": 1}, "ran": {"notify-url": url}})
    assert err.key_path == "ran.notify-url", err


@pytest.mark.parametrize(
    "url",
    ["https://amf.example:8443/ran", "http://10.0.0.1/", "http://[fd00::1]:80/x", "http://bücher.example/"],
)
def test_notify_url_forms_accepted(url: str) -> None:
    assert config_from_dict({"cluster": {"node-id": 1}, "ran": {"notify-url": url}}).ran.notify_url == url


def _cli_under_memory_limit(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``quorumd run --config`` with its address space capped: an unbounded read fails fast."""

    def cap() -> None:
        limit = 1024 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "quorumd.node.cli", "run", "--config", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=cap,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_endless_join_token_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    config = write(
        tmp_path, "cluster:\n  node-id: 2\n  peers: [a.example:7000]\n  join-token-file: /dev/zero\n"
    )
    res = _cli_under_memory_limit(config, tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.startswith("quorumd: config error: cluster.join-token-file: "), res.stderr
    assert "larger than" in res.stderr


def test_endless_config_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    res = _cli_under_memory_limit(Path("/dev/zero"), tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.startswith("quorumd: config error: ") and "larger than" in res.stderr, res.stderr
    big = tmp_path / "big.yaml"
    big.write_text("cluster:\n  node-id: 1\n" + "# padding\n" * (2 * 1024 * 1024 // 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)


# --- logging -------------------------------------------------------------------------------------

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_text_format(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("info", "text", 3, stream=out)
    logging.getLogger("quorumd.raft.core").info("became leader term=%d", 4)
    logging.getLogger("quorumd.x").debug("hidden")
    logging.getLogger("quorumd.node.drain").warning("drain started", extra={"target": 2, "why": "ops req"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(rf"{TS} INFO quorumd\.raft\.core node=3 became leader term=4", lines[0])
    assert re.fullmatch(
        rf'{TS} WARNING quorumd\.node\.drain node=3 drain started target=2 why="ops req"', lines[1]
    )


def test_json_format(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", 7, stream=out)
    log = logging.getLogger("quorumd.node.daemon.root")
    log.debug("tick n=%d", 1, extra={"peer": 2})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("crashed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(TS, first["ts"])
    assert {k: first[k] for k in ("level", "logger", "node", "msg", "peer")} == {
        "level": "debug",
        "logger": "quorumd.node.daemon.root",
        "node": 7,
        "msg": "tick n=1",
        "peer": 2,
    }
    assert second["level"] == "error" and "RuntimeError: boom" in second["exc"]


def test_text_format_keeps_one_record_on_one_line(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("info", "text", 5, stream=out)
    log = logging.getLogger("quorumd.test")
    forged = "x\n2026-01-01T00:00:00.000Z INFO quorumd.fake node=1 member_removed node_id=2"
    log.warning("join_refused detail=%s", forged)
    log.info("extra", extra={"why": "a\r\nb"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(re.match(rf"{TS} \w+ quorumd\.test node=5 ", line) for line in lines)
    assert lines[0].endswith(
        "detail=x\\n2026-01-01T00:00:00.000Z INFO quorumd.fake node=1 member_removed node_id=2"
    )
    assert lines[1].endswith('why="a\\r\\nb"')


def test_configure_twice_keeps_one_handler(root_logger: logging.Logger) -> None:
    before = len(root_logger.handlers)
    out1, out2 = io.StringIO(), io.StringIO()
    configure_logging("info", "text", 1, stream=out1)
    configure_logging("warning", "json", 1, stream=out2)
    assert len(root_logger.handlers) == before + 1
    logging.getLogger("t").warning("once")
    assert out1.getvalue() == "" and len(out2.getvalue().splitlines()) == 1


def test_bad_level_or_format(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError):
        configure_logging("verbose", "text", 1)
    with pytest.raises(ValueError):
        bad_format: Any = "xml"
        configure_logging("info", bad_format, 1)


def test_redaction(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("info", "text", 1, stream=out, secrets=["JT-v1.abcdefghijklmnop"])
    log = logging.getLogger("quorumd.test")
    log.info("token=%s joined", "qd_adm_0123456789abcdef")
    log.info("join with JT-v1.abcdefghijklmnop now")
    log.info("ok", extra={"hdr": "Bearer qd_xyz_ABCDEFGH12345"})
    add_redaction("short")  # too short to redact safely: ignored
    log.info("a short word")
    try:
        raise ValueError("bad token qd_zzzzzzzzzzzzzz")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert "qd_adm_0123456789abcdef" not in text and "token=[REDACTED] joined" in text
    assert "JT-v1.abcdefghijklmnop" not in text and "join with [REDACTED] now" in text
    assert "ABCDEFGH12345" not in text and 'hdr="Bearer [REDACTED]"' in text
    assert "a short word" in text
    assert "qd_zzzzzzzzzzzzzz" not in text and "ValueError: bad token [REDACTED]" in text
