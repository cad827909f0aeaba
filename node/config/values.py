"""Scalar values of the configuration: parsers, their error type, and the kinds the schema table uses.

Two layers:

- plain parsers that raise ``ValueError`` (``parse_duration``, ``parse_host_port``) and their
  formatters (``format_duration``, ``str(HostPort)``), usable anywhere (``quorumd recover --peers``);
- *kinds* (``Int``, ``Bool``, ``Choice``, ``Text``, ``Host``, ``Address``, ``Url``, ``FilePath``,
  ``Duration``, ``Token``, ``ListOf``): one per column type of the schema table. A kind checks a
  value as YAML produced it (``parse``), writes a parsed value back as YAML (``dump``), and says what
  it expects (``what``). A kind raises ``ValueProblem`` with a message that does not name the key;
  the table's walker adds the dotted key and the line, making it a ``ConfigError``.

Durations are strings with units ``ms``, ``s``, ``m``, ``h``, ``d`` (days), optionally compound (``1m30s``)
and fractional (``1.5s``). A bare number is refused (the unit is ambiguous). Each duration key has
bounds (by default 1ms..24h: a longer timer is a typo, and a huge one overflows the event loop).
A value echoed in a message is cut to ``MAX_ECHO_CHARS``; a token is never echoed.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "MAX_ECHO_CHARS",
    "Address",
    "Bool",
    "Choice",
    "ConfigError",
    "Duration",
    "FilePath",
    "Host",
    "HostPort",
    "Int",
    "Kind",
    "ListOf",
    "Text",
    "Token",
    "Url",
    "ValueProblem",
    "describe",
    "format_duration",
    "parse_duration",
    "parse_host_port",
    "quote",
]

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


class ValueProblem(ValueError):
    """A bad value, not yet tied to its key. ``at`` is a suffix of the key (``[1]`` for a list item);
    ``{key}`` in the message stands for the dotted key (``duplicate of {key}[0]``)."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.at = at

    def message_for(self, key: str) -> str:
        return self.message.replace("{key}", key)


def quote(text: str) -> str:
    """``repr`` of a value echoed in an error, cut to ``MAX_ECHO_CHARS``."""
    if len(text) > MAX_ECHO_CHARS:
        return repr(text[:MAX_ECHO_CHARS]) + f"... ({len(text)} characters)"
    return repr(text)


def describe(value: object) -> str:
    """What a YAML value is, for messages: ``a boolean (true)``, ``'fast'``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


# --- durations -----------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_NAMES = "ms, s, m, h, d"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")


def parse_duration(text: str) -> float:
    """``"1.5s"`` -> 1.5, ``"100ms"`` -> 0.1, ``"1m30s"`` -> 90.0, ``"2d"`` -> 172800.0.

    Raises ``ValueError``."""
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


# --- hosts and addresses -------------------------------------------------------------------------

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


def valid_host(host: str) -> bool:
    """An IP literal (no brackets) or a DNS name."""
    return _is_ip(host) or _is_dns_name(host)


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


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port``; host is an IP or a DNS name. Raises ``ValueError``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("an IPv6 address is written [addr]:port")
        host, port_text = text[1:end], text[end + 2 :]
        if ":" not in host or not _is_ip(host):
            raise ValueError(f"{quote(host)} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("an IPv6 address is written [addr]:port")
        if not valid_host(host):
            raise ValueError(f"{quote(host)} is neither an IP address nor a DNS name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {quote(port_text)} is not in 1..65535")
    return HostPort(host, int(port_text))


# --- kinds: one per column type of the schema table ---------------------------------------------


class Kind:
    """How one key's value is checked, converted and written back.

    ``what`` names the expected form in messages; ``yaml_type`` is the Python type YAML gives it;
    ``field_suffix`` is appended to the dataclass field name (``_seconds`` for durations).
    """

    what = "a value"
    yaml_type: type | tuple[type, ...] = object
    field_suffix = ""

    def parse(self, raw: object, base_dir: Path) -> object:
        raise NotImplementedError

    def dump(self, value: object) -> object:
        """The YAML-ready form of a parsed value (``parse(dump(v)) == v``)."""
        return value


class Bool(Kind):
    what = "true or false"
    yaml_type = bool

    def parse(self, raw: object, base_dir: Path) -> object:
        if not isinstance(raw, bool):
            raise ValueProblem(f"expected true or false, got {describe(raw)}")
        return raw


@dataclass(frozen=True, slots=True)
class Int(Kind):
    """An integer in ``low..high`` (``high`` None: no upper bound). A boolean is not an integer."""

    low: int
    high: int | None = None
    what = "an integer"
    yaml_type = int

    def parse(self, raw: object, base_dir: Path) -> object:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueProblem(f"expected an integer, got {describe(raw)}")
        if raw < self.low or (self.high is not None and raw > self.high):
            raise ValueProblem(f"must be {self.bounds}, got {raw}")
        return raw

    @property
    def bounds(self) -> str:
        return f"in {self.low}..{self.high}" if self.high is not None else f">= {self.low}"


@dataclass(frozen=True, slots=True)
class Choice(Kind):
    """One of a fixed set of strings, case-sensitive."""

    choices: tuple[str, ...]
    what = "a choice"
    yaml_type = str

    def parse(self, raw: object, base_dir: Path) -> object:
        if not isinstance(raw, str) or raw not in self.choices:
            raise ValueProblem(f"expected one of {'|'.join(self.choices)}, got {describe(raw)}")
        return raw


class Text(Kind):
    """A non-blank string of valid Unicode (YAML escapes can produce lone surrogates)."""

    what = "a string"
    yaml_type = str

    def parse(self, raw: object, base_dir: Path) -> object:
        return self.text(raw)

    @staticmethod
    def text(raw: object) -> str:
        if not isinstance(raw, str):
            raise ValueProblem(f"expected a string, got {describe(raw)}")
        if not raw.strip():
            raise ValueProblem("must not be empty")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueProblem("must be valid Unicode text (no lone surrogates)") from None
        return raw


class Host(Text):
    """An IP address (no brackets) or a DNS name."""

    what = "an IP address or a host name"

    def parse(self, raw: object, base_dir: Path) -> object:
        host = self.text(raw).strip()
        if not valid_host(host):
            raise ValueProblem(f"expected an IP address or a host name, got {quote(host)}")
        return host


@dataclass(frozen=True, slots=True)
class Address(Text):
    """``host:port`` as a ``HostPort``; ``reachable``: not a wildcard (others must connect to it)."""

    reachable: bool = False
    what = "host:port"

    def parse(self, raw: object, base_dir: Path) -> object:
        text = self.text(raw)
        try:
            address = parse_host_port(text.strip())
        except ValueError as exc:
            raise ValueProblem(f"expected host:port, got {quote(text)}: {exc}") from None
        if self.reachable and address.is_wildcard:
            raise ValueProblem(
                f"must be an address other nodes can reach, not {address.host} "
                "(a wildcard is not an address to connect to)"
            )
        return address

    def dump(self, value: object) -> object:
        return str(value)


def _valid_url_host(host: str) -> bool:
    """An IP literal or a DNS name, internationalized names in their IDNA form."""
    if _is_ip(host):
        return True
    try:
        ascii_name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _is_dns_name(ascii_name)


@dataclass(frozen=True, slots=True)
class Url(Text):
    """A URL with one of ``schemes`` and a host that is an IP address or a DNS name. No whitespace
    or control character anywhere: URL parsers drop tabs and newlines inside a URL without a word
    (``http://amf.exa<newline>mple/`` would reach ``amf.example``)."""

    schemes: tuple[str, ...] = ("http", "https")
    what = "a URL"

    def parse(self, raw: object, base_dir: Path) -> object:
        url = self.text(raw).strip()
        expected = f"expected an {' or '.join(s + '://' for s in self.schemes)} URL, got {quote(url)}"
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            raise ValueProblem(f"{expected}: a URL has no whitespace or control characters (write %20)")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. an unclosed [IPv6 bracket
            raise ValueProblem(f"{expected}: {exc}") from None
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueProblem(expected)
        if not _valid_url_host(parts.hostname):
            raise ValueProblem(f"{expected}: {quote(parts.hostname)} is neither an IP address nor a DNS name")
        try:
            _ = parts.port
        except ValueError:
            raise ValueProblem(f"bad port in {quote(url)}") from None
        return url


class FilePath(Text):
    """A filesystem path; ``~`` is expanded, a relative path is resolved against ``base_dir``."""

    what = "a path"

    def parse(self, raw: object, base_dir: Path) -> object:
        text = self.text(raw)
        if "\x00" in text:
            raise ValueProblem("must not contain NUL characters")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of an unknown user, or no home directory
            raise ValueProblem(f"cannot expand the ~ in {quote(text)}") from None
        return path if path.is_absolute() else base_dir / path

    def dump(self, value: object) -> object:
        return str(value)


@dataclass(frozen=True, slots=True)
class Token(Text):
    """A secret: printable ASCII without spaces, stripped, at most ``max_chars``; never echoed."""

    max_chars: int = 4096
    what = "a token"

    def parse(self, raw: object, base_dir: Path) -> object:
        return self.check(self.text(raw).strip())

    def check(self, token: str) -> str:
        if len(token) > self.max_chars:
            raise ValueProblem(f"is longer than {self.max_chars} characters")
        if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in token):
            raise ValueProblem("must be printable ASCII without spaces")  # never echo the token itself
        return token


@dataclass(frozen=True, slots=True)
class Duration(Kind):
    """A duration string, as float seconds, within ``low..high`` (both written as durations)."""

    low: str = "1ms"
    high: str = "24h"
    what = "a duration like 100ms"
    yaml_type = str
    field_suffix = "_seconds"

    def parse(self, raw: object, base_dir: Path) -> object:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueProblem(f"expected a duration like 100ms, got {describe(raw)}")
        if not isinstance(raw, str):
            raise ValueProblem(
                f"expected a duration like 100ms, got {raw!r}: a bare number has no unit "
                f"(write {raw}s or {raw}ms; units are {_UNIT_NAMES})"
            )
        try:
            seconds = parse_duration(raw.strip())
        except ValueError:
            raise ValueProblem(
                f"expected a duration like 100ms, got {quote(raw)} (units are {_UNIT_NAMES})"
            ) from None
        if seconds <= 0:
            raise ValueProblem(f"must be greater than zero, got {quote(raw)}")
        if seconds < parse_duration(self.low):
            raise ValueProblem(f"must be at least {self.low}, got {quote(raw)}")
        if not math.isfinite(seconds) or seconds > parse_duration(self.high):
            raise ValueProblem(f"must be at most {self.high}, got {quote(raw)}")
        return seconds

    def dump(self, value: object) -> object:
        assert isinstance(value, float | int)
        return format_duration(value)


@dataclass(frozen=True, slots=True)
class ListOf(Kind):
    """A list of scalars of one kind, as a tuple; ``unique``: no item twice. Item errors name ``[i]``."""

    item: Kind
    unique: bool = False
    what = "a list"
    yaml_type = list

    def parse(self, raw: object, base_dir: Path) -> object:
        if not isinstance(raw, list):
            raise ValueProblem(f"expected a list of {self.item.what}, got {describe(raw)}")
        out: list[object] = []
        for i, element in enumerate(raw):
            if not isinstance(element, self.item.yaml_type):
                raise ValueProblem(f"expected {self.item.what}, got {describe(element)}", at=f"[{i}]")
            try:
                value = self.item.parse(element, base_dir)
            except ValueProblem as exc:
                raise ValueProblem(exc.message, at=f"[{i}]") from None
            if self.unique and value in out:
                first = out.index(value)
                shown = self.item.dump(value)
                raise ValueProblem(f"duplicate of {{key}}[{first}] ({shown})", at=f"[{i}]")
            out.append(value)
        return tuple(out)

    def dump(self, value: object) -> object:
        assert isinstance(value, tuple)
        return [self.item.dump(v) for v in value]
