"""The daemon's configuration: one table of keys, the dataclasses built from it, and
the rules that span keys.

``load_config(path)`` reads a file, ``config_from_dict(d)`` validates an already-parsed mapping (tests,
the demo), ``config_to_dict(cfg)`` writes one back. Every problem is a ``ConfigError`` whose ``str``
starts with the dotted key it concerns, e.g.
``cluster.heartbeat-interval: expected a duration like 100ms, got 'fast' (line 12)``.

The package:

- ``values.py``: scalar parsers (durations, host:port, DNS names, URLs, paths, tokens) as *kinds*;
  ``ConfigError``.
- ``reader.py``: the strict YAML reader (duplicate keys, lines, unknown keys with "did you mean").
- ``table.py``: the row types (``Key``, ``Section``) and the one walker that reads and writes config.
- this module: ``TABLE`` (every key: dotted name, kind with its range or choices, default as
  written in YAML, ``None`` for optional keys where null means "not set", one-line doc), the
  dataclasses, and the cross-key rules.
- ``example.py``: ``deploy/quorumd.example.yaml`` rendered from ``TABLE`` (a test keeps them equal):
  ``python -m quorumd.node.config.example > deploy/quorumd.example.yaml``.

Adding a key is one row in ``TABLE`` plus one field in its section's dataclass, e.g. for
``api.max-connections``::

    Key("api.max-connections", Int(1, 100_000), 1024, "concurrent API connections; more wait"),
    ...
    max_connections: int = _default("api.max-connections")   # in ApiConfig

(a duration key's field ends in ``_seconds``: ``Duration(high="3650d")`` for
``cluster.certificate-lifetime`` gives ``certificate_lifetime_seconds``). Then regenerate the example
file. A missing field fails at import (``TABLE.binds``); a test fails until every leaf key has a
mistake case in ``tests/test_config_fuzz.py``. A new section is a ``Section`` row, its keys, and a
bound dataclass; a list of mappings is a repeated section, e.g. ``bgp.peers: [{address, remote-as,
port}]``::

    Section("bgp.peers", repeated=True, doc="BGP neighbours the speaker dials"),
    Key("bgp.peers.address", Address(reachable=True), REQUIRED, "neighbour host:port ..."),
    Key("bgp.peers.remote-as", Int(1, 4_294_967_295), REQUIRED, "the neighbour's AS number"),
    Key("bgp.peers.port", Int(1, 65535), 179, "the neighbour's BGP port"),

    @TABLE.binds("bgp.peers")
    @dataclass(frozen=True, slots=True)
    class BgpPeerConfig:
        address: HostPort
        remote_as: int
        port: int = _default("bgp.peers.port")

and ``peers: tuple[BgpPeerConfig, ...] = ()`` in ``BgpConfig``; an error then names the item
(``bgp.peers[1].remote-as: is required``). A rule across keys of one section is a function in
``CROSS_KEY_RULES``.

Rules and choices (documented here and in the example file):

- Strict: an unknown key (with a "did you mean" hint), a duplicate key, a wrong type (a bool is not an
  int), an out-of-range value, a YAML syntax error (with its line), an empty file or a non-mapping top
  level are all errors. ``CONFIG_KEYS`` is the one list of accepted keys.
- ``null`` means "not set": it is accepted for the optional keys (default ``None`` in the table:
  ``api.tls``, ``cluster.advertise-address``, ``cluster.join-token``, ``cluster.join-token-file``,
  ``ran.notify-url``) and for whole sections (an empty section such as ``ran:`` is all defaults).
  Any other key set to ``null`` is an error.
- Durations are strings with a unit: ``ms``, ``s``, ``m``, ``h``, ``d``, optionally compound
  (``1m30s``) and fractional (``1.5s``); they must be > 0 and within the key's bounds (1ms..24h
  unless the row says otherwise: a longer timer is a typo, and a huge one overflows the event
  loop's timers). A bare number is an error (the unit is ambiguous).
- Relative paths (``data-dir``, TLS files, ``join-token-file``) are resolved against the directory of
  the config file (``config_from_dict``: against ``base_dir``, default the working directory).
- ``cluster.node-id`` is required even when ``cluster.enabled`` is false: it names the node in logs,
  metrics and the data-dir pin. With clustering disabled the cluster keys are still validated (so
  re-enabling cannot surprise) but peers and join tokens are unused, which ``Config.notes`` says.
- ``cluster.advertise-address`` defaults to ``cluster.bind-address``; when that is a wildcard
  (``0.0.0.0`` / ``::``) the default is the loopback address with the same port, and a note tells the
  operator to set it for a multi-host cluster. Explicit wildcard advertise addresses are errors.
- A join token (``join-token`` or the stripped content of ``join-token-file``; the two are mutually
  exclusive) makes the node a joiner, which needs at least one peer. The token is kept out of ``repr``.
- ``cluster.election-timeout`` is at least ``ELECTION_TO_HEARTBEAT_MIN_RATIO`` heartbeat intervals.
- Strings must be valid Unicode text (YAML escapes can produce lone surrogates); a value echoed in
  an error message is cut to ``MAX_ECHO_CHARS``.
- ``Config.notes`` carries non-fatal remarks the daemon logs at startup.
"""

# A field's default is the table's parsed default: an immutable value (str, int, float, bool, Path,
# HostPort, tuple), so sharing it between instances is safe.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quorumd.node.config.reader import line_of, os_reason, read_bounded, read_yaml
from quorumd.node.config.table import REQUIRED, Fields, Key, Rule, Section, Table
from quorumd.node.config.values import (
    MAX_ECHO_CHARS,
    Address,
    Bool,
    Choice,
    ConfigError,
    Duration,
    FilePath,
    Host,
    HostPort,
    Int,
    ListOf,
    Text,
    Token,
    Url,
    ValueProblem,
    describe,
    format_duration,
    parse_duration,
    parse_host_port,
    quote,
)
from quorumd.node.daemon.logs import LogFormat, LogLevel

__all__ = [
    "CONFIG_KEYS",
    "CROSS_KEY_RULES",
    "MAX_ECHO_CHARS",
    "TABLE",
    "ApiConfig",
    "AuditConfig",
    "AutopilotConfig",
    "BackupConfig",
    "BgpConfig",
    "BgpPeer",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "HostPort",
    "LogFormat",
    "LogLevel",
    "RanConfig",
    "TlsConfig",
    "config_from_dict",
    "config_to_dict",
    "format_duration",
    "load_config",
    "parse_duration",
    "parse_host_port",
]

LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

MIN_NODE_ID = 1
MAX_NODE_ID = 63
ELECTION_TO_HEARTBEAT_MIN_RATIO = 5
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_FILE_BYTES = 64 * 1024  # the token and any whitespace around it

JOIN_TOKEN = Token(max_chars=MAX_TOKEN_CHARS)
HOST_PORT = Address()
REACHABLE = Address(reachable=True)

# bgp.speaker: the stub, or the one real backend (node/effects/gobgp.py says why GoBGP).
BGP_SPEAKERS: tuple[str, ...] = ("stub", "gobgp")
AS_NUMBER = Int(1, 4_294_967_295)


@dataclass(frozen=True, slots=True)
class IpAddress(Text):
    """An IP literal naming one host (``version`` 4 or 6, or 0 for either): not unspecified, not
    multicast. Kept as its canonical text."""

    version: int = 0
    what = "an IP address"

    def parse(self, raw: object, base_dir: Path) -> object:
        text = self.text(raw).strip()
        family = {4: "an IPv4 address", 6: "an IPv6 address"}.get(self.version, "an IP address")
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ValueProblem(f"expected {family}, got {quote(text)}") from None
        if self.version and addr.version != self.version:
            raise ValueProblem(f"expected {family}, got {quote(text)}")
        if addr.is_unspecified or addr.is_multicast:
            raise ValueProblem(f"{addr} cannot be {family.removeprefix('an ')}")
        return str(addr)


# fmt: off
TABLE = Table(
    header=(
        "quorumd configuration: every key with its default.",
        "Strict: an unknown key or a bad value stops the daemon with exit code 2 and names the key.",
        "Durations take a unit: ms, s, m, h, d (e.g. 100ms, 1.5s, 2m, 1m30s); a bare number is an error.",
        "A duration is from 1ms to 24h unless its comment gives other bounds.",
        "Relative paths are resolved against the directory of this file.",
    ),
    rows=[
        Key("data-dir", FilePath(), "/var/lib/quorumd",
            "holds raft/, tls/, admin.token, node pin; created 0700"),
        Key("log-level", Choice(LOG_LEVELS), "info", "debug | info | warning | error"),
        Key("log-format", Choice(LOG_FORMATS), "text", "text | json (one object per line)"),

        Section("api"),
        Key("api.address", Host(), "0.0.0.0", "HTTPS API listen address (IP or host name)"),
        Key("api.port", Int(1, 65535), 5002, "HTTPS API port, also serves /metrics, /healthz, /readyz"),
        Key("api.max-connections", Int(1, 1_000_000), 1024,
            "concurrent API connections; more are closed at accept (and always 256 fds kept spare)"),
        Section("api.tls", optional=True, absent="a self-signed cert",
                doc="{cert: /etc/quorumd/api.crt, key: /etc/quorumd/api.key}; "
                    "null => self-signed cert generated once in data-dir"),
        Key("api.tls.cert", FilePath(), REQUIRED, "PEM certificate (chain) the API serves"),
        Key("api.tls.key", FilePath(), REQUIRED, "PEM private key of that certificate"),

        Section("cluster"),
        Key("cluster.enabled", Bool(), True,
            "false => standalone single node; /api/v1/cluster/* answers 404"),
        Key("cluster.node-id", Int(MIN_NODE_ID, MAX_NODE_ID), REQUIRED, example=1,
            doc="required, 1..63, unique; pinned in data-dir (a mismatch refuses to start)"),
        Key("cluster.bind-address", HOST_PORT, "0.0.0.0:7000",
            "the one cluster port (Raft and internal RPCs, mutual TLS 1.3)"),
        Key("cluster.advertise-address", REACHABLE, None,
            "default: bind-address (127.0.0.1:<port> when that is a wildcard); may be a DNS name; "
            "never 0.0.0.0"),
        Key("cluster.peers", ListOf(REACHABLE, unique=True), [],
            "seed list host:port used to find the cluster, e.g. [10.0.0.1:7000, 10.0.0.2:7000]"),
        Key("cluster.join-token", JOIN_TOKEN, None,
            "present => joiner (needs peers); absent => founder. Prefer join-token-file"),
        Key("cluster.join-token-file", FilePath(), None,
            "file holding the join token (stripped); mutually exclusive with join-token"),
        Key("cluster.join-timeout", Duration(), "120s", "give up joining after this long"),
        Key("cluster.propose-timeout", Duration(), "5s", "commit wait before the API answers 503"),
        Key("cluster.heartbeat-interval", Duration(), "100ms", "leader heartbeat period"),
        Key("cluster.election-timeout", Duration(), "1000ms",
            "randomized in [T, 2T); must be >= 5 x heartbeat-interval"),
        Key("cluster.snapshot-threshold", Int(1), 8192,
            "entries between snapshots (>= 1); with a large state, one per KiB of the last snapshot"),
        Key("cluster.trailing-logs", Int(0), 10240,
            "entries kept after a snapshot for slow followers (>= 0)"),
        Key("cluster.isolation-fence-after", Duration(), None, example="3s",
            doc="no quorum heard for this long => the node fences itself (withdraws its routes); "
                "default 3 x election-timeout, at least election-timeout"),
        Key("cluster.certificate-lifetime", Duration(low="10s", high="3650d"), "365d",
            "validity of the node certificates this node makes (at its first start and when it "
            "rotates); 10s to 3650d"),
        Key("cluster.certificate-renew-before", Duration(low="1s", high="3650d"), "30d",
            "the node rotates its certificate this long before it expires; less than "
            "certificate-lifetime"),
        Section("cluster.autopilot"),
        Key("cluster.autopilot.last-contact-threshold", Duration(), "10s",
            "no contact for longer => server failed / unhealthy"),
        Key("cluster.autopilot.max-trailing-logs", Int(0), 500,
            "a healthy server is within this many entries of the leader"),
        Key("cluster.autopilot.server-stabilization-time", Duration(), "10s",
            "a nonvoter must be healthy this long before automatic promotion"),
        Key("cluster.autopilot.cleanup-dead-servers", Bool(), False,
            "remove failed servers automatically (never below min-quorum)"),
        Key("cluster.autopilot.min-quorum", Int(0, MAX_NODE_ID), 0,
            "0 => no floor; otherwise never clean up below this many voters (0..63)"),
        Key("cluster.autopilot.reconcile-interval", Duration(), "2s",
            "how often promotions and cleanup are decided"),

        Section("bgp"),
        Key("bgp.enabled", Bool(), True, "the BGP speaker (stub by default); false => drain/resume skip it"),
        Key("bgp.speaker", Choice(BGP_SPEAKERS), "stub",
            "stub | gobgp (a supervised gobgpd, Debian package gobgpd)"),
        Key("bgp.local-as", AS_NUMBER, None, "1..4294967295; required with a real speaker"),
        Key("bgp.router-id", IpAddress(version=4), None, "IPv4; default next-hop"),
        Key("bgp.next-hop", IpAddress(version=4), None,
            "IPv4 next hop of /32 routes; default the advertise-address host"),
        Key("bgp.next-hop6", IpAddress(version=6), None,
            "IPv6 next hop of /128 routes; unset => /128s not announced"),
        Section("bgp.peers", repeated=True,
                doc="peers the speaker dials (it never listens); a list of:"),
        Key("bgp.peers.address", IpAddress(), REQUIRED, "the peer's IP address"),
        Key("bgp.peers.remote-as", AS_NUMBER, REQUIRED, "the peer's AS number, 1..4294967295"),
        Key("bgp.peers.port", Int(1, 65535), 179, "the peer's BGP port"),

        Section("ran"),
        Key("ran.notify-url", Url(), None, 'optional http(s) webhook for RAN "GUAMI unavailable" events'),

        Section("backup"),
        Key("backup.dir", FilePath(), None,
            "scheduled backups: each node writes an archive of its state here (0600); null => off"),
        Key("backup.interval", Duration(), "1h", "time between scheduled backups"),
        Key("backup.keep", Int(1, 10000), 24, "the newest archives kept in backup.dir (1..10000)"),

        Section("audit"),
        Key("audit.retention", Int(1, 10_000_000), 10000,
            "the newest audit records kept in the replicated state (1..10000000); the leader's "
            "value applies"),
    ],
)
# fmt: on

# Every accepted key, dotted; a key with children is a section. The reader refuses anything else.
CONFIG_KEYS: tuple[str, ...] = TABLE.names

_default = TABLE.default


# --- the dataclasses: one per section, a field per row ---------------------------------------------


@TABLE.binds("api.tls")
@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path


@TABLE.binds("api")
@dataclass(frozen=True, slots=True)
class ApiConfig:
    address: str = _default("api.address")
    port: int = _default("api.port")
    max_connections: int = _default("api.max-connections")
    tls: TlsConfig | None = None  # None => self-signed certificate generated once in data-dir


@TABLE.binds("cluster.autopilot")
@dataclass(frozen=True, slots=True)
class AutopilotConfig:
    last_contact_threshold_seconds: float = _default("cluster.autopilot.last-contact-threshold")
    max_trailing_logs: int = _default("cluster.autopilot.max-trailing-logs")
    server_stabilization_time_seconds: float = _default("cluster.autopilot.server-stabilization-time")
    cleanup_dead_servers: bool = _default("cluster.autopilot.cleanup-dead-servers")
    min_quorum: int = _default("cluster.autopilot.min-quorum")  # 0 => no floor
    reconcile_interval_seconds: float = _default("cluster.autopilot.reconcile-interval")


@TABLE.binds("cluster")
@dataclass(frozen=True, slots=True)
class ClusterConfig:
    node_id: int
    enabled: bool = _default("cluster.enabled")
    bind_address: HostPort = _default("cluster.bind-address")
    # derived from bind-address when unset (see _cluster_rules); this is the default bind's value
    advertise_address: HostPort = HostPort("127.0.0.1", 7000)
    peers: tuple[HostPort, ...] = _default("cluster.peers")
    join_token: str | None = field(default=None, repr=False)  # from join-token or join-token-file
    join_token_file: Path | None = None
    join_timeout_seconds: float = _default("cluster.join-timeout")
    propose_timeout_seconds: float = _default("cluster.propose-timeout")
    heartbeat_interval_seconds: float = _default("cluster.heartbeat-interval")
    election_timeout_seconds: float = _default("cluster.election-timeout")
    snapshot_threshold: int = _default("cluster.snapshot-threshold")
    trailing_logs: int = _default("cluster.trailing-logs")
    autopilot: AutopilotConfig = AutopilotConfig()
    isolation_fence_after_seconds: float = 3.0  # the rules set 3 x election-timeout when unset
    certificate_lifetime_seconds: float = _default("cluster.certificate-lifetime")
    certificate_renew_before_seconds: float = _default("cluster.certificate-renew-before")

    @property
    def is_joiner(self) -> bool:
        """A join token is configured: the node joins an existing cluster (when its data-dir is empty)."""
        return self.join_token is not None


@TABLE.binds("bgp.peers")
@dataclass(frozen=True, slots=True)
class BgpPeer:
    address: str  # an IP literal
    remote_as: int
    port: int = _default("bgp.peers.port")


@TABLE.binds("bgp")
@dataclass(frozen=True, slots=True)
class BgpConfig:
    enabled: bool = _default("bgp.enabled")
    speaker: str = _default("bgp.speaker")  # one of BGP_SPEAKERS
    local_as: int | None = None  # required by a real speaker
    router_id: str | None = None  # a real speaker defaults it to next_hop
    next_hop: str | None = None  # a real speaker defaults it to the advertise address
    next_hop6: str | None = None  # None: /128 leases are not announced
    peers: tuple[BgpPeer, ...] = ()


@TABLE.binds("ran")
@dataclass(frozen=True, slots=True)
class RanConfig:
    notify_url: str | None = None


@TABLE.binds("backup")
@dataclass(frozen=True, slots=True)
class BackupConfig:
    """Scheduled backups; ``dir`` None: off."""

    dir: Path | None = None
    interval_seconds: float = _default("backup.interval")
    keep: int = _default("backup.keep")


@TABLE.binds("audit")
@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit trail; ``retention`` travels in each record's log entry."""

    retention: int = _default("audit.retention")


@TABLE.binds("")
@dataclass(frozen=True, slots=True)
class Config:
    cluster: ClusterConfig
    data_dir: Path = _default("data-dir")
    log_level: LogLevel = _default("log-level")
    log_format: LogFormat = _default("log-format")
    api: ApiConfig = ApiConfig()
    bgp: BgpConfig = BgpConfig()
    ran: RanConfig = RanConfig()
    backup: BackupConfig = BackupConfig()
    audit: AuditConfig = AuditConfig()
    notes: tuple[str, ...] = ()  # non-fatal remarks, logged by the daemon at startup
    source: Path | None = None  # the file it was loaded from

    @property
    def node_id(self) -> int:
        return self.cluster.node_id


# --- rules across keys ---------------------------------------------------------------------------


def _cluster_rules(f: Fields) -> None:
    """Advertise-address default, join-token vs join-token-file, joiner needs peers, timer ratio."""
    enabled: bool = f.get("enabled")
    bind: HostPort = f.get("bind-address")
    if f.get("advertise-address") is None:
        if bind.is_wildcard:
            loopback = "::1" if ":" in bind.host else "127.0.0.1"
            advertise = HostPort(loopback, bind.port)
            if enabled:
                f.notes.append(
                    f"{f.key_path('advertise-address')} is not set and {f.key_path('bind-address')} is "
                    f"{bind}: advertising {advertise}, which other hosts cannot reach; set "
                    f"{f.key_path('advertise-address')} for a multi-host cluster"
                )
        else:
            advertise = bind
        f.set("advertise-address", advertise)

    inline: str | None = f.get("join-token")
    token_file: Path | None = f.get("join-token-file")
    if inline is not None and token_file is not None:
        raise f.error(
            "join-token-file",
            f"{f.key_path('join-token')} and {f.key_path('join-token-file')} are mutually exclusive",
        )
    if token_file is not None:
        f.set("join-token", _read_token_file(f, token_file))
    token: str | None = f.get("join-token")
    peers: tuple[HostPort, ...] = f.get("peers")
    if token is not None and enabled and not peers:
        raise f.error("peers", "a joiner (join token set) needs at least one peer to find the cluster")
    if not enabled and (peers or token is not None):
        f.notes.append(
            f"{f.key_path('enabled')} is false: {f.key_path('peers')} and the join token are ignored"
        )

    heartbeat: float = f.get("heartbeat-interval")
    election: float = f.get("election-timeout")
    if election < ELECTION_TO_HEARTBEAT_MIN_RATIO * heartbeat - 1e-12:
        raise f.error(
            "election-timeout",
            f"must be at least {ELECTION_TO_HEARTBEAT_MIN_RATIO} x {f.key_path('heartbeat-interval')} "
            f"({format_duration(heartbeat)}), got {format_duration(election)}",
        )
    lifetime: float = f.get("certificate-lifetime")
    if f.get("certificate-renew-before") >= lifetime:
        raise f.error(
            "certificate-renew-before",
            f"must be less than {f.key_path('certificate-lifetime')} ({format_duration(lifetime)})",
        )
    fence_after: float | None = f.get("isolation-fence-after")
    if fence_after is None:
        f.set("isolation-fence-after", 3.0 * election)
    elif fence_after < election - 1e-12:
        raise f.error(
            "isolation-fence-after",
            f"must be at least {f.key_path('election-timeout')} ({format_duration(election)}), "
            f"got {format_duration(fence_after)}",
        )


def _read_token_file(f: Fields, path: Path) -> str:
    try:
        token = read_bounded(path, MAX_TOKEN_FILE_BYTES).strip()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise f.error("join-token-file", f"cannot read {path}: {os_reason(exc)}") from exc
    if not token:
        raise f.error("join-token-file", f"{path} is empty")
    try:
        return JOIN_TOKEN.check(token)
    except ValueProblem as exc:
        raise f.error("join-token-file", exc.message) from None


def _bgp_rules(f: Fields) -> None:
    """A real speaker needs local-as and a peer; peers are distinct. Every key is checked whatever
    the speaker (switching to a real one cannot surprise)."""
    peers: tuple[BgpPeer, ...] = f.get("peers")
    for i, peer in enumerate(peers):
        first = next(j for j, p in enumerate(peers) if p.address == peer.address)
        if first != i:
            raise ConfigError(
                f"{f.key_path('peers')}[{i}].address",
                f"duplicate of {f.key_path('peers')}[{first}] ({peer.address})",
                line_of(f.raw, "peers", f.line),
            )
    speaker: str = f.get("speaker")
    if speaker != "stub":
        if f.get("local-as") is None:
            raise f.error("local-as", f"is required with {f.key_path('speaker')} {speaker}")
        if not peers:
            raise f.error("peers", f"{f.key_path('speaker')} {speaker} needs at least one peer to dial")


def _top_rules(f: Fields) -> None:
    """A real speaker's next-hop defaults to the advertise address (it must then be IPv4), and its
    router-id to the next-hop."""
    bgp: BgpConfig = f.get("bgp")
    if bgp.speaker == "stub":
        return
    next_hop = bgp.next_hop
    if next_hop is None:
        host = f.get("cluster").advertise_address.host
        try:
            v4 = ipaddress.ip_address(host).version == 4
        except ValueError:
            v4 = False
        if not v4:
            raw_bgp, bgp_line = f.raw.get("bgp"), line_of(f.raw, "bgp", None)
            raise ConfigError(
                "bgp.next-hop",
                f"is required with bgp.speaker {bgp.speaker} when cluster.advertise-address is not an "
                f"IPv4 address ({quote(host)})",
                line_of(raw_bgp, "next-hop", bgp_line) if isinstance(raw_bgp, dict) else bgp_line,
            )
        next_hop = host
    f.set("bgp", dataclasses.replace(bgp, next_hop=next_hop, router_id=bgp.router_id or next_hop))


# The rules that read more than one key, by section. Single-key checks belong in the row's kind.
CROSS_KEY_RULES: Mapping[str, Rule] = {"cluster": _cluster_rules, "bgp": _bgp_rules, "": _top_rules}

if TABLE.unbound():
    raise TypeError(f"sections without a dataclass: {TABLE.unbound()}")


# --- entry points --------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; raise ``ConfigError`` on any problem."""
    file = Path(path)
    data = read_yaml(file)
    return _build(data, base_dir=file.resolve().parent, source=file)


def config_from_dict(data: Mapping[str, Any], base_dir: str | Path | None = None) -> Config:
    """Validate an already-parsed config mapping (same rules as ``load_config``)."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the top level must be a mapping of keys, got {describe(data)}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return _build(dict(data), base_dir=base, source=None)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The YAML-ready mapping of ``config`` (round-trips through ``config_from_dict``).

    Unset optional keys are left out. The join token is written inline only when no
    ``join_token_file`` is set (the file is read again on load).
    """
    out = TABLE.dump(config)
    if config.cluster.join_token_file is not None:
        out["cluster"].pop("join-token", None)
    return out


def _build(data: dict[Any, Any], base_dir: Path, source: Path | None) -> Config:
    notes: list[str] = []
    config = TABLE.build(data, base_dir, CROSS_KEY_RULES, notes)
    assert isinstance(config, Config)
    return dataclasses.replace(config, notes=tuple(notes), source=source)
