"""The daemon's configuration: strict YAML (SPEC section 3) parsed into frozen dataclasses.

``load_config(path)`` reads a file, ``config_from_dict(d)`` validates an already-parsed mapping (tests,
the demo). Every problem is a ``ConfigError`` whose ``str`` starts with the dotted key it concerns, e.g.
``cluster.heartbeat-interval: expected a duration like 100ms, got 'fast' (line 12)``.

Rules and choices (documented here and in ``deploy/quorumd.example.yaml``):

- Strict: an unknown key (with a "did you mean" hint), a duplicate key, a wrong type (a bool is not an
  int), an out-of-range value, a YAML syntax error (with its line), an empty file or a non-mapping top
  level are all errors. ``CONFIG_KEYS`` is the one list of accepted keys.
- ``null`` means "not set": it is accepted for the optional keys without a fixed default
  (``api.tls``, ``cluster.advertise-address``, ``cluster.join-token``, ``cluster.join-token-file``,
  ``ran.notify-url``) and for whole sections (an empty section such as ``ran:`` is all defaults).
  Any other key set to ``null`` is an error.
- Durations are strings with a unit: ``ms``, ``s``, ``m``, ``h``, optionally compound (``1m30s``) and
  fractional (``1.5s``); they must be > 0, at least 1ms and at most 24h (a longer timer is a typo,
  and a huge one overflows the event loop's timers). A bare number is an error (the unit is ambiguous).
  Dataclass fields holding durations are floats named ``*_seconds``; every other field is the key in
  snake_case.
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
- Strings must be valid Unicode text (YAML escapes can produce lone surrogates); a value echoed in
  an error message is cut to ``MAX_ECHO_CHARS``.
- ``Config.notes`` carries non-fatal remarks the daemon logs at startup.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import yaml

from quorumd.node.daemon.logs import LogFormat, LogLevel

__all__ = [
    "CONFIG_KEYS",
    "ApiConfig",
    "AutopilotConfig",
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

# Every accepted key, dotted; a key with children is a section. The reader refuses anything else.
CONFIG_KEYS: tuple[str, ...] = (
    "data-dir",
    "log-level",
    "log-format",
    "api",
    "api.address",
    "api.port",
    "api.tls",
    "api.tls.cert",
    "api.tls.key",
    "cluster",
    "cluster.enabled",
    "cluster.node-id",
    "cluster.bind-address",
    "cluster.advertise-address",
    "cluster.peers",
    "cluster.join-token",
    "cluster.join-token-file",
    "cluster.join-timeout",
    "cluster.propose-timeout",
    "cluster.heartbeat-interval",
    "cluster.election-timeout",
    "cluster.snapshot-threshold",
    "cluster.trailing-logs",
    "cluster.autopilot",
    "cluster.autopilot.last-contact-threshold",
    "cluster.autopilot.max-trailing-logs",
    "cluster.autopilot.server-stabilization-time",
    "cluster.autopilot.cleanup-dead-servers",
    "cluster.autopilot.min-quorum",
    "cluster.autopilot.reconcile-interval",
    "bgp",
    "bgp.enabled",
    "bgp.speaker",
    "bgp.local-as",
    "bgp.router-id",
    "bgp.next-hop",
    "bgp.next-hop6",
    "bgp.peers",  # a list of {address, remote-as, port}: see BGP_PEER_KEYS
    "ran",
    "ran.notify-url",
)

# bgp.speaker (SPEC 16): the stub, or the one real backend (node/effects/gobgp.py says why GoBGP).
BGP_SPEAKERS: tuple[str, ...] = ("stub", "gobgp")
BGP_PEER_KEYS: tuple[str, ...] = ("address", "remote-as", "port")
MAX_AS = 4294967295

ELECTION_TO_HEARTBEAT_MIN_RATIO = 5
MAX_TOKEN_CHARS = 4096
MIN_DURATION_SECONDS = 0.001
MAX_DURATION_SECONDS = 24 * 3600.0
MAX_ECHO_CHARS = 80


class ConfigError(Exception):
    """A configuration problem; ``key_path`` is the dotted key ("" for file-level problems)."""

    def __init__(self, key_path: str, message: str, line: int | None = None) -> None:
        self.key_path = key_path
        self.message = message
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.key_path}: {self.message}" if self.key_path else self.message
        return f"{text} (line {self.line})" if self.line is not None else text


# --- value types ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` address; ``host`` is an IP literal (no brackets) or a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return _is_unspecified(self.host)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ApiConfig:
    address: str = "0.0.0.0"
    port: int = 5002
    tls: TlsConfig | None = None  # None => self-signed certificate generated once in data-dir


@dataclass(frozen=True, slots=True)
class AutopilotConfig:
    last_contact_threshold_seconds: float = 10.0
    max_trailing_logs: int = 500
    server_stabilization_time_seconds: float = 10.0
    cleanup_dead_servers: bool = False
    min_quorum: int = 0  # 0 => no floor
    reconcile_interval_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    node_id: int
    enabled: bool = True
    bind_address: HostPort = HostPort("0.0.0.0", 7000)
    advertise_address: HostPort = HostPort("127.0.0.1", 7000)
    peers: tuple[HostPort, ...] = ()
    join_token: str | None = field(default=None, repr=False)  # from join-token or join-token-file
    join_token_file: Path | None = None
    join_timeout_seconds: float = 120.0
    propose_timeout_seconds: float = 5.0
    heartbeat_interval_seconds: float = 0.1
    election_timeout_seconds: float = 1.0
    snapshot_threshold: int = 8192
    trailing_logs: int = 10240
    autopilot: AutopilotConfig = AutopilotConfig()

    @property
    def is_joiner(self) -> bool:
        """A join token is configured: the node joins an existing cluster (when its data-dir is empty)."""
        return self.join_token is not None


@dataclass(frozen=True, slots=True)
class BgpPeer:
    address: str  # an IP literal
    remote_as: int
    port: int = 179


@dataclass(frozen=True, slots=True)
class BgpConfig:
    enabled: bool = True
    speaker: str = "stub"  # one of BGP_SPEAKERS
    local_as: int | None = None  # required by a real speaker
    router_id: str | None = None  # IPv4; a real speaker defaults it to next_hop
    next_hop: str | None = None  # IPv4; a real speaker defaults it to the advertise address
    next_hop6: str | None = None  # IPv6 next hop of /128 routes (none: /128 leases are not announced)
    peers: tuple[BgpPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class RanConfig:
    notify_url: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    cluster: ClusterConfig
    data_dir: Path = Path("/var/lib/quorumd")
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    api: ApiConfig = ApiConfig()
    bgp: BgpConfig = BgpConfig()
    ran: RanConfig = RanConfig()
    notes: tuple[str, ...] = ()  # non-fatal remarks, logged by the daemon at startup
    source: Path | None = None  # the file it was loaded from

    @property
    def node_id(self) -> int:
        return self.cluster.node_id


# --- entry points --------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; raise ``ConfigError`` on any problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {file}: {_os_reason(exc)}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _BadValue as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise ConfigError(exc.key_path, f"invalid value: {exc.problem}", line) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = exc.problem or exc.context or "syntax error"
        raise ConfigError("", f"{file}: invalid YAML{where}: {reason}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{file}: invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError("", f"{file}: invalid YAML: nested too deeply") from exc
    if data is None:
        raise ConfigError("", f"{file}: config file is empty (cluster.node-id at least is required)")
    if not isinstance(data, dict):
        raise ConfigError("", f"{file}: the top level must be a mapping of keys, got {_describe(data)}")
    return _build(data, base_dir=file.resolve().parent, source=file)


def config_from_dict(data: Mapping[str, Any], base_dir: str | Path | None = None) -> Config:
    """Validate an already-parsed config mapping (same rules as ``load_config``)."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"the top level must be a mapping of keys, got {_describe(data)}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return _build(dict(data), base_dir=base, source=None)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The YAML-ready mapping of ``config`` (round-trips through ``config_from_dict``).

    The join token is written inline only when no ``join_token_file`` is set.
    """
    c = config.cluster
    ap = c.autopilot
    cluster: dict[str, Any] = {
        "enabled": c.enabled,
        "node-id": c.node_id,
        "bind-address": str(c.bind_address),
        "advertise-address": str(c.advertise_address),
        "peers": [str(p) for p in c.peers],
        "join-timeout": format_duration(c.join_timeout_seconds),
        "propose-timeout": format_duration(c.propose_timeout_seconds),
        "heartbeat-interval": format_duration(c.heartbeat_interval_seconds),
        "election-timeout": format_duration(c.election_timeout_seconds),
        "snapshot-threshold": c.snapshot_threshold,
        "trailing-logs": c.trailing_logs,
        "autopilot": {
            "last-contact-threshold": format_duration(ap.last_contact_threshold_seconds),
            "max-trailing-logs": ap.max_trailing_logs,
            "server-stabilization-time": format_duration(ap.server_stabilization_time_seconds),
            "cleanup-dead-servers": ap.cleanup_dead_servers,
            "min-quorum": ap.min_quorum,
            "reconcile-interval": format_duration(ap.reconcile_interval_seconds),
        },
    }
    if c.join_token_file is not None:
        cluster["join-token-file"] = str(c.join_token_file)
    elif c.join_token is not None:
        cluster["join-token"] = c.join_token
    api: dict[str, Any] = {"address": config.api.address, "port": config.api.port}
    if config.api.tls is not None:
        api["tls"] = {"cert": str(config.api.tls.cert), "key": str(config.api.tls.key)}
    out: dict[str, Any] = {
        "data-dir": str(config.data_dir),
        "log-level": config.log_level,
        "log-format": config.log_format,
        "api": api,
        "cluster": cluster,
        "bgp": _bgp_to_dict(config.bgp),
    }
    if config.ran.notify_url is not None:
        out["ran"] = {"notify-url": config.ran.notify_url}
    return out


def _bgp_to_dict(bgp: BgpConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"enabled": bgp.enabled, "speaker": bgp.speaker}
    for key, value in (
        ("local-as", bgp.local_as),
        ("router-id", bgp.router_id),
        ("next-hop", bgp.next_hop),
        ("next-hop6", bgp.next_hop6),
    ):
        if value is not None:
            out[key] = value
    if bgp.peers:
        out["peers"] = [{"address": p.address, "remote-as": p.remote_as, "port": p.port} for p in bgp.peers]
    return out


# --- scalar parsers ------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")


def parse_duration(text: str) -> float:
    """``"1.5s"`` -> 1.5, ``"100ms"`` -> 0.1, ``"1m30s"`` -> 90.0. Raises ``ValueError``."""
    if not _DURATION_FULL.fullmatch(text):
        raise ValueError(text)
    total = 0.0
    for number, unit in _DURATION_PART.findall(text):
        if unit == "ms":
            total += float(number) / 1000.0
        else:
            total += float(number) * _DURATION_UNITS[unit]
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact duration text for ``seconds`` (``0.1`` -> ``"100ms"``, ``120`` -> ``"120s"``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    ms = seconds * 1000.0
    return f"{round(ms)}ms" if math.isclose(ms, round(ms), abs_tol=1e-9) else f"{ms:.15g}ms"


_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_dns_name(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return False
    return not labels[-1].isdigit()  # "10.0.0" is a broken IP, not a name


def _valid_host(host: str) -> bool:
    return _is_ip(host) or _is_dns_name(host)


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port``; host is an IP or a DNS name. Raises ``ValueError``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("an IPv6 address is written [addr]:port")
        host, port_text = text[1:end], text[end + 2 :]
        if ":" not in host or not _is_ip(host):
            raise ValueError(f"{_quote(host)} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("an IPv6 address is written [addr]:port")
        if not _valid_host(host):
            raise ValueError(f"{_quote(host)} is neither an IP address nor a DNS name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {_quote(port_text)} is not in 1..65535")
    return HostPort(host, int(port_text))


# --- the strict reader ---------------------------------------------------------------------------


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key, and any duplicated key."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}
        self.duplicates: dict[Any, int] = {}


class _BadValue(yaml.constructor.ConstructorError):
    """A scalar YAML cannot construct; ``key_path`` is the dotted key whose value it is."""

    def __init__(self, key_path: str, problem: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, problem, mark)
        self.key_path = key_path


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_stack: list[str] = []  # keys of the mappings being constructed, outermost first

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """SafeLoader's, with a bad tagged or implicit scalar (``2001-02-30``, ``!!int x``,
        ``!!bool maybe``) reported with its key and line instead of a bare ValueError/KeyError."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            what = _quote(node.value) if isinstance(node.value, str) else "the value"
            hint = "; quote it to make it a string" if node.tag.startswith("tag:yaml.org") else ""
            raise _BadValue(
                ".".join(self.key_stack), f"{what} is not a valid YAML {kind}{hint}", node.start_mark
            ) from exc


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    result = _Mapping()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            key = repr(key)
        line = key_node.start_mark.line + 1
        if key in result and key not in result.duplicates:
            result.duplicates[key] = line
        stack = loader.key_stack if isinstance(loader, _StrictLoader) else []
        stack.append(str(key))
        try:
            result[key] = loader.construct_object(value_node, deep=True)
        finally:
            stack.pop()
        result.lines.setdefault(key, line)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _quote(text: str) -> str:
    """``repr`` of a value echoed in an error, cut to ``MAX_ECHO_CHARS``."""
    if len(text) > MAX_ECHO_CHARS:
        return repr(text[:MAX_ECHO_CHARS]) + f"... ({len(text)} characters)"
    return repr(text)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Section:
    """One mapping of the config being read: typed getters that name the key on error."""

    def __init__(self, raw: object, path: str, line: int | None, keys: tuple[str, ...] | None = None) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(raw)}", line)
        self.raw: dict[Any, Any] = raw
        self.path = path
        self.line = line
        self._lines: dict[Any, int] = raw.lines if isinstance(raw, _Mapping) else {}
        prefix = f"{path}." if path else ""
        allowed = (
            list(keys)
            if keys is not None
            else [
                k[len(prefix) :] for k in CONFIG_KEYS if k.startswith(prefix) and "." not in k[len(prefix) :]
            ]
        )
        if isinstance(raw, _Mapping) and raw.duplicates:
            key, dup_line = next(iter(raw.duplicates.items()))
            raise ConfigError(_join(path, str(key)), "duplicate key", dup_line)
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                why = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key"
                if not allowed:
                    why = "unknown key"
                raise ConfigError(_join(path, str(key)), why, self._lines.get(key))

    def key_path(self, key: str) -> str:
        return _join(self.path, key)

    def line_of(self, key: str) -> int | None:
        return self._lines.get(key, self.line)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.key_path(key), message, self.line_of(key))

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def _value(self, key: str, nullable: bool = False) -> object:
        value = self.raw.get(key)
        if key in self.raw and value is None and not nullable:
            raise self.error(key, "must not be null (remove the key to use the default)")
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.raw.get(key), self.key_path(key), self._lines.get(key))

    def string(self, key: str, default: str | None, nullable: bool = False) -> str | None:
        value = self._value(key, nullable)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.error(key, "must be valid Unicode text (no lone surrogates)") from None
        return value

    def required_string(self, key: str, default: str) -> str:
        value = self.string(key, default)
        assert value is not None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
        return value

    def integer(self, key: str, default: int | None, low: int, high: int | None = None) -> int:
        value = self._value(key)
        if value is None:
            if default is None:
                raise self.error(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self._value(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"expected a duration like 100ms, got {_describe(value)}")
        if not isinstance(value, str):
            raise self.error(
                key,
                f"expected a duration like 100ms, got {value!r}: a bare number has no unit "
                f"(write {value}s or {value}ms; units are ms, s, m, h)",
            )
        try:
            seconds = parse_duration(value.strip())
        except ValueError:
            raise self.error(
                key, f"expected a duration like 100ms, got {_quote(value)} (units are ms, s, m, h)"
            ) from None
        if seconds <= 0:
            raise self.error(key, f"must be greater than zero, got {_quote(value)}")
        if seconds < MIN_DURATION_SECONDS:
            raise self.error(key, f"must be at least 1ms, got {_quote(value)}")
        if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
            raise self.error(key, f"must be at most 24h, got {_quote(value)}")
        return seconds

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._value(key)
        if value is None:
            return default
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, f"expected one of {'|'.join(choices)}, got {_describe(value)}")
        return value

    def path_value(
        self, key: str, default: Path | None, base_dir: Path, nullable: bool = False
    ) -> Path | None:
        text = self.string(key, None, nullable)
        if text is None:
            return default
        if "\x00" in text:
            raise self.error(key, "must not contain NUL characters")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of an unknown user, or no home directory
            raise self.error(key, f"cannot expand the ~ in {_quote(text)}") from None
        return path if path.is_absolute() else base_dir / path

    def host_port(self, key: str, default: HostPort | None, nullable: bool = False) -> HostPort | None:
        text = self.string(key, None, nullable)
        if text is None:
            return default
        try:
            return parse_host_port(text.strip())
        except ValueError as exc:
            raise self.error(key, f"expected host:port, got {_quote(text)}: {exc}") from None


def _build(data: dict[Any, Any], base_dir: Path, source: Path | None) -> Config:
    top = _Section(data, "", None)
    notes: list[str] = []
    data_dir = top.path_value("data-dir", Path("/var/lib/quorumd"), base_dir)
    assert data_dir is not None
    log_level = cast(LogLevel, top.choice("log-level", "info", LOG_LEVELS))
    log_format = cast(LogFormat, top.choice("log-format", "text", LOG_FORMATS))
    api = _build_api(top.section("api"), base_dir)
    cluster = _build_cluster(top.section("cluster"), base_dir, notes)
    bgp = _build_bgp(top.section("bgp"), cluster)
    ran = _build_ran(top.section("ran"))
    return Config(
        cluster=cluster,
        data_dir=data_dir,
        log_level=log_level,
        log_format=log_format,
        api=api,
        bgp=bgp,
        ran=ran,
        notes=tuple(notes),
        source=source,
    )


def _build_api(sec: _Section, base_dir: Path) -> ApiConfig:
    address = sec.required_string("address", "0.0.0.0").strip()
    if not _valid_host(address):
        raise sec.error("address", f"expected an IP address or a host name, got {_quote(address)}")
    port = sec.integer("port", 5002, 1, 65535)
    tls: TlsConfig | None = None
    if sec.has("tls"):
        tsec = sec.section("tls")
        cert = tsec.path_value("cert", None, base_dir)
        key = tsec.path_value("key", None, base_dir)
        if cert is None:
            raise tsec.error(
                "cert", "is required when api.tls is set (remove api.tls for a self-signed cert)"
            )
        if key is None:
            raise tsec.error("key", "is required when api.tls is set (remove api.tls for a self-signed cert)")
        tls = TlsConfig(cert=cert, key=key)
    return ApiConfig(address=address, port=port, tls=tls)


def _read_token_file(sec: _Section, path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise sec.error("join-token-file", f"cannot read {path}: {_os_reason(exc)}") from exc
    if not token:
        raise sec.error("join-token-file", f"{path} is empty")
    return token


def _check_token(sec: _Section, key: str, token: str) -> str:
    if len(token) > MAX_TOKEN_CHARS:
        raise sec.error(key, f"is longer than {MAX_TOKEN_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in token):
        raise sec.error(key, "must be printable ASCII without spaces")  # never echo the token itself
    return token


def _build_cluster(sec: _Section, base_dir: Path, notes: list[str]) -> ClusterConfig:
    enabled = sec.boolean("enabled", True)
    node_id = sec.integer("node-id", None, MIN_NODE_ID, MAX_NODE_ID)
    bind = sec.host_port("bind-address", HostPort("0.0.0.0", 7000))
    assert bind is not None
    advertise = sec.host_port("advertise-address", None, nullable=True)
    if advertise is None:
        if bind.is_wildcard:
            loopback = "::1" if ":" in bind.host else "127.0.0.1"
            advertise = HostPort(loopback, bind.port)
            if enabled:
                notes.append(
                    f"cluster.advertise-address is not set and cluster.bind-address is {bind}: advertising "
                    f"{advertise}, which other hosts cannot reach; set cluster.advertise-address for a "
                    "multi-host cluster"
                )
        else:
            advertise = bind
    elif advertise.is_wildcard:
        raise sec.error(
            "advertise-address", f"must be an address other nodes can reach, not {advertise.host}"
        )

    peers: list[HostPort] = []
    raw_peers = sec._value("peers")
    if raw_peers is not None:
        if not isinstance(raw_peers, list):
            raise sec.error("peers", f"expected a list of host:port, got {_describe(raw_peers)}")
        for i, item in enumerate(raw_peers):
            key = f"peers[{i}]"
            if not isinstance(item, str):
                raise ConfigError(
                    sec.key_path(key), f"expected host:port, got {_describe(item)}", sec.line_of("peers")
                )
            try:
                peer = parse_host_port(item.strip())
            except ValueError as exc:
                raise ConfigError(
                    sec.key_path(key), f"expected host:port, got {_quote(item)}: {exc}", sec.line_of("peers")
                ) from None
            if peer.is_wildcard:
                raise ConfigError(
                    sec.key_path(key), f"{peer.host} is not an address to connect to", sec.line_of("peers")
                )
            if peer in peers:
                first = peers.index(peer)
                raise ConfigError(
                    sec.key_path(key), f"duplicate of cluster.peers[{first}] ({peer})", sec.line_of("peers")
                )
            peers.append(peer)

    inline = sec.string("join-token", None, nullable=True)
    token_file = sec.path_value("join-token-file", None, base_dir, nullable=True)
    if inline is not None and token_file is not None:
        raise sec.error(
            "join-token-file", "cluster.join-token and cluster.join-token-file are mutually exclusive"
        )
    token: str | None = None
    if inline is not None:
        token = _check_token(sec, "join-token", inline.strip())
    elif token_file is not None:
        token = _check_token(sec, "join-token-file", _read_token_file(sec, token_file))
    if token is not None and enabled and not peers:
        raise sec.error("peers", "a joiner (join token set) needs at least one peer to find the cluster")
    if not enabled and (peers or token is not None):
        notes.append("cluster.enabled is false: cluster.peers and the join token are ignored")

    join_timeout = sec.duration("join-timeout", 120.0)
    propose_timeout = sec.duration("propose-timeout", 5.0)
    heartbeat = sec.duration("heartbeat-interval", 0.1)
    election = sec.duration("election-timeout", 1.0)
    if election < ELECTION_TO_HEARTBEAT_MIN_RATIO * heartbeat - 1e-12:
        raise sec.error(
            "election-timeout",
            f"must be at least {ELECTION_TO_HEARTBEAT_MIN_RATIO} x cluster.heartbeat-interval "
            f"({format_duration(heartbeat)}), got {format_duration(election)}",
        )
    snapshot_threshold = sec.integer("snapshot-threshold", 8192, 1)
    trailing_logs = sec.integer("trailing-logs", 10240, 0)
    autopilot = _build_autopilot(sec.section("autopilot"))
    return ClusterConfig(
        node_id=node_id,
        enabled=enabled,
        bind_address=bind,
        advertise_address=advertise,
        peers=tuple(peers),
        join_token=token,
        join_token_file=token_file,
        join_timeout_seconds=join_timeout,
        propose_timeout_seconds=propose_timeout,
        heartbeat_interval_seconds=heartbeat,
        election_timeout_seconds=election,
        snapshot_threshold=snapshot_threshold,
        trailing_logs=trailing_logs,
        autopilot=autopilot,
    )


def _build_autopilot(sec: _Section) -> AutopilotConfig:
    return AutopilotConfig(
        last_contact_threshold_seconds=sec.duration("last-contact-threshold", 10.0),
        max_trailing_logs=sec.integer("max-trailing-logs", 500, 0),
        server_stabilization_time_seconds=sec.duration("server-stabilization-time", 10.0),
        cleanup_dead_servers=sec.boolean("cleanup-dead-servers", False),
        min_quorum=sec.integer("min-quorum", 0, 0, MAX_NODE_ID),
        reconcile_interval_seconds=sec.duration("reconcile-interval", 2.0),
    )


def _ip_value(sec: _Section, key: str, version: int | None, what: str) -> str | None:
    """An IP literal (``version`` 4 or 6, or either) that names a host: not unspecified, not multicast."""
    text = sec.string(key, None, nullable=True)
    if text is None:
        return None
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise sec.error(key, f"expected {what}, got {_quote(text)}") from None
    if version is not None and addr.version != version:
        raise sec.error(key, f"expected {what}, got {_quote(text)}")
    if addr.is_unspecified or addr.is_multicast:
        raise sec.error(key, f"{addr} cannot be {what.removeprefix('an ').removeprefix('a ')}")
    return str(addr)


def _build_bgp(sec: _Section, cluster: ClusterConfig) -> BgpConfig:
    """SPEC 16. Every key is validated whatever the speaker (switching to a real one cannot
    surprise); a real speaker also needs ``local-as`` and a peer, and resolves its defaults:
    ``next-hop`` from the advertise address, ``router-id`` from ``next-hop``."""
    enabled = sec.boolean("enabled", True)
    speaker = sec.choice("speaker", "stub", BGP_SPEAKERS)
    local_as = sec.integer("local-as", 0, 1, MAX_AS) if sec.has("local-as") else None
    router_id = _ip_value(sec, "router-id", 4, "an IPv4 address")
    next_hop = _ip_value(sec, "next-hop", 4, "an IPv4 address")
    next_hop6 = _ip_value(sec, "next-hop6", 6, "an IPv6 address")
    peers: list[BgpPeer] = []
    raw = sec._value("peers")
    if raw is not None:
        if not isinstance(raw, list):
            raise sec.error("peers", f"expected a list of {{address, remote-as, port}}, got {_describe(raw)}")
        for i, item in enumerate(raw):
            psec = _Section(item, sec.key_path(f"peers[{i}]"), sec.line_of("peers"), BGP_PEER_KEYS)
            address = _ip_value(psec, "address", None, "an IP address")
            if address is None:
                raise psec.error("address", "is required")
            remote_as = psec.integer("remote-as", None, 1, MAX_AS)
            port = psec.integer("port", 179, 1, 65535)
            if any(p.address == address for p in peers):
                first = next(j for j, p in enumerate(peers) if p.address == address)
                raise psec.error("address", f"duplicate of bgp.peers[{first}] ({address})")
            peers.append(BgpPeer(address, remote_as, port))
    if speaker != "stub":
        if local_as is None:
            raise sec.error("local-as", f"is required with bgp.speaker {speaker}")
        if not peers:
            raise sec.error("peers", f"bgp.speaker {speaker} needs at least one peer to dial")
        if next_hop is None:
            host = cluster.advertise_address.host
            if not _is_ip(host) or ipaddress.ip_address(host).version != 4:
                raise sec.error(
                    "next-hop",
                    f"is required with bgp.speaker {speaker} when cluster.advertise-address is not "
                    f"an IPv4 address ({_quote(host)})",
                )
            next_hop = host
        if router_id is None:
            router_id = next_hop
    return BgpConfig(
        enabled=enabled,
        speaker=speaker,
        local_as=local_as,
        router_id=router_id,
        next_hop=next_hop,
        next_hop6=next_hop6,
        peers=tuple(peers),
    )


def _build_ran(sec: _Section) -> RanConfig:
    url = sec.string("notify-url", None, nullable=True)
    if url is None:
        return RanConfig()
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [IPv6 bracket
        raise sec.error(
            "notify-url", f"expected an http:// or https:// URL, got {_quote(url)}: {exc}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise sec.error("notify-url", f"expected an http:// or https:// URL, got {_quote(url)}")
    try:
        _ = parts.port
    except ValueError:
        raise sec.error("notify-url", f"bad port in {_quote(url)}") from None
    return RanConfig(notify_url=url)
