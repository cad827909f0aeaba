"""The strict YAML reader: text in, plain mappings out, every file-level problem a ``ConfigError``.

- Mappings come back as ``Mapping`` (a ``dict`` that remembers the line of each key and any key
  written twice); ``line_of`` and ``check_keys`` read that back for the schema walker.
- A scalar YAML itself cannot build (``2001-02-30``, ``!!int x``, ``!!int`` with nothing after it)
  is an error naming its dotted key and line, with a hint to quote it. So is an integer YAML 1.1
  reads in another base than it seems to have: a leading zero (``010`` is octal 8) or colons
  (``1:00`` is base 60, i.e. 60).
- A file is read up to ``MAX_FILE_BYTES`` (``read_bounded``): a larger one, or a device that never
  ends, is an error rather than a read that exhausts memory.
- Syntax errors carry their line and column; an empty file or a non-mapping top level is an error.
- ``check_keys`` refuses a duplicate key, then an unknown key with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from quorumd.node.config.values import ConfigError, describe, quote

__all__ = [
    "MAX_FILE_BYTES",
    "Mapping",
    "check_keys",
    "join",
    "line_of",
    "os_reason",
    "read_bounded",
    "read_yaml",
]

MAX_FILE_BYTES = 1024 * 1024  # a config file is far smaller (the example with every key: ~5 KiB)


class Mapping(dict[Any, Any]):
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


class _OtherBase(ValueError):
    """An integer YAML 1.1 reads in a base its text does not show; the message says which."""


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_stack: list[str] = []  # keys of the mappings being constructed, outermost first

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """SafeLoader's, with a bad tagged or implicit scalar (``2001-02-30``, ``!!int x``,
        ``!!bool maybe``) reported with its key and line instead of a bare ValueError/KeyError."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, TypeError, OverflowError, IndexError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            what = quote(node.value) if isinstance(node.value, str) else "the value"
            hint = "; quote it to make it a string" if node.tag.startswith("tag:yaml.org") else ""
            problem = str(exc) if isinstance(exc, _OtherBase) else f"{what} is not a valid YAML {kind}{hint}"
            raise _BadValue(".".join(self.key_stack), problem, node.start_mark) from exc


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """SafeLoader's integers, refusing those YAML 1.1 reads as octal (``010``: 8) or base 60
    (``1:00``: 60): a silently different number is worse than an error."""
    value: int = loader.construct_yaml_int(node)
    digits = str(node.value).replace("_", "").lstrip("+-")
    if ":" in digits:
        raise _OtherBase(f"{quote(node.value)} is a base 60 number in YAML ({value}); write {value}")
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "bx":
        raise _OtherBase(
            f"{quote(node.value)} is an octal number in YAML ({value}); write {value}, "
            f"or {digits.lstrip('0') or '0'} without the leading zero"
        )
    return value


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Mapping:
    loader.flatten_mapping(node)
    result = Mapping()
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
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def read_bounded(file: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``file``, reading at most ``limit`` + 1 bytes: ``ValueError`` when it is
    larger (a device such as /dev/zero included), ``OSError`` or ``UnicodeDecodeError`` otherwise."""
    with file.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit} bytes")
    return data.decode("utf-8")


def read_yaml(file: Path) -> dict[Any, Any]:
    """The top-level mapping of a config file; ``ConfigError`` for anything that is not one."""
    try:
        text = read_bounded(file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("", f"cannot read config file {file}: {os_reason(exc)}") from exc
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
        raise ConfigError("", f"{file}: the top level must be a mapping of keys, got {describe(data)}")
    return data


def join(path: str, key: str) -> str:
    """The dotted key ``key`` inside section ``path`` ("" is the top level)."""
    return f"{path}.{key}" if path else key


def line_of(mapping: dict[Any, Any], key: object, default: int | None) -> int | None:
    """The line of ``key`` in a mapping read from a file (``default`` when unknown)."""
    lines = mapping.lines if isinstance(mapping, Mapping) else {}
    return lines.get(key, default)


def check_keys(mapping: dict[Any, Any], path: str, allowed: Sequence[str]) -> None:
    """Refuse a key written twice, then a key not in ``allowed`` (with a "did you mean" hint)."""
    if isinstance(mapping, Mapping) and mapping.duplicates:
        key, dup_line = next(iter(mapping.duplicates.items()))
        raise ConfigError(join(path, str(key)), "duplicate key", dup_line)
    for key in mapping:
        if not isinstance(key, str) or key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1) if allowed else []
            why = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key"
            raise ConfigError(join(path, str(key)), why, line_of(mapping, key, None))
