"""The schema table's machinery: row types, and the one walker that reads, checks and writes config.

The table itself (the product's keys) is in ``schema.py``; this module knows no key. A table is a
sequence of rows in file order:

- ``Key(name, kind, default, doc)``: one leaf key. ``name`` is dotted (``cluster.join-timeout``);
  ``kind`` (from ``values.py``) is its type with its range or choices; ``default`` is written as in
  YAML (``"100ms"``, ``8192``, ``[]``), ``REQUIRED`` (no default), or ``None`` (optional: null is
  allowed and means "not set"); ``doc`` is the comment of its line in the example file.
- ``Section(name, doc)``: a mapping of keys. ``optional=True``: absent or null gives ``None``
  (otherwise an absent or null section is all defaults). ``repeated=True``: a list of mappings,
  giving a tuple (``bgp.peers: [{address, remote-as, port}]``); its keys are named without an
  index (``bgp.peers.port``) and errors name the item (``bgp.peers[1].port``).

Each section (``""`` is the top level) is bound to a frozen dataclass with ``@table.binds(name)``;
the field of a key is its last name part in snake_case plus the kind's suffix (``join-timeout`` ->
``join_timeout_seconds``), and a field takes its default from the table (``table.default(name)``).
Binding checks that every row has its field, so a key cannot be added to only one of the two.

The walker (``build``) checks each section's keys (duplicates, unknown keys with a hint), parses
each key with its kind, fills defaults, then runs that section's cross-key rule (a plain function
given a ``Fields``), and constructs the dataclass. Errors are ``ConfigError``s naming the dotted
key and, for a file, its line. ``dump`` is the inverse: the YAML-ready mapping of a built object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from quorumd.node.config.reader import check_keys, join, line_of
from quorumd.node.config.values import ConfigError, Kind, ValueProblem, describe

__all__ = ["REQUIRED", "Fields", "Key", "Row", "Rule", "Section", "Table"]

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def _snake(leaf: str) -> str:
    return leaf.replace("-", "_")


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    kind: Kind
    default: object = REQUIRED
    doc: str = ""
    example: object = None  # shown in the example file instead of a REQUIRED key's missing default

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def field(self) -> str:
        return _snake(self.leaf) + self.kind.field_suffix

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def nullable(self) -> bool:
        return self.default is None


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    doc: str = ""
    optional: bool = False
    repeated: bool = False
    absent: str = ""  # what leaving an optional section out gives, for messages ("a self-signed cert")

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def field(self) -> str:
        return _snake(self.leaf)


Row = Key | Section


@dataclass(slots=True)
class Fields:
    """One section while it is being built: the parsed values by key, for its cross-key rule."""

    table: Table
    section: str  # the section's row name ("" for the top level)
    path: str  # the dotted path in messages (with an item index inside repeated sections)
    raw: dict[Any, Any]
    line: int | None
    values: dict[str, Any]  # by dataclass field
    notes: list[str]
    base_dir: Path

    def _field(self, key: str) -> str:
        return self.table.row(join(self.section, key)).field

    def get(self, key: str) -> Any:
        return self.values[self._field(key)]

    def set(self, key: str, value: object) -> None:
        self.values[self._field(key)] = value

    def key_path(self, key: str) -> str:
        return join(self.path, key)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.key_path(key), message, line_of(self.raw, key, self.line))


Rule = Callable[[Fields], None]


class Table:
    """The rows of a configuration, in file order, with the dataclasses bound to its sections."""

    def __init__(self, rows: Sequence[Row], header: Sequence[str] = ()) -> None:
        self.rows: tuple[Row, ...] = tuple(rows)
        self.header = tuple(header)
        self._by_name: dict[str, Row] = {}
        for row in self.rows:
            if row.name in self._by_name:
                raise ValueError(f"{row.name}: two rows")
            if row.parent and not isinstance(self._by_name.get(row.parent), Section):
                raise ValueError(f"{row.name}: its section {row.parent!r} must come first")
            if isinstance(row, Key):  # a default, and a required key's example value, must be valid
                for shown in (row.default, row.example):
                    if shown is not REQUIRED and shown is not None:
                        row.kind.parse(shown, Path("/"))
            self._by_name[row.name] = row
        self._classes: dict[str, type] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Every accepted key, dotted; sections included."""
        return tuple(row.name for row in self.rows)

    def row(self, name: str) -> Row:
        return self._by_name[name]

    def children(self, section: str) -> list[Row]:
        return [row for row in self.rows if row.parent == section]

    def walk(self) -> Iterator[Row]:
        return iter(self.rows)

    def default(self, name: str) -> Any:
        """The parsed default of key ``name``, for its dataclass field."""
        row = self._by_name[name]
        if not isinstance(row, Key) or row.required:
            raise LookupError(f"{name} has no default")
        return None if row.default is None else row.kind.parse(row.default, Path("/"))

    def binds(self, section: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``cls`` is the dataclass of ``section``; it must have a field per row."""

        def bind(cls: type[T]) -> type[T]:
            names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            missing = [row.name for row in self.children(section) if row.field not in names]
            if missing:
                raise TypeError(f"{cls.__name__} has no field for {', '.join(missing)}")
            self._classes[section] = cls
            return cls

        return bind

    def unbound(self) -> list[str]:
        sections = ["", *(row.name for row in self.rows if isinstance(row, Section))]
        return [name for name in sections if name not in self._classes]

    # --- reading ---------------------------------------------------------------------------------

    def build(self, data: dict[Any, Any], base_dir: Path, rules: Mapping[str, Rule], notes: list[str]) -> Any:
        """The top-level dataclass for ``data`` (the top-level mapping), or a ``ConfigError``."""
        return self._section("", "", data, None, base_dir, rules, notes)

    def _section(
        self,
        section: str,
        path: str,
        raw: object,
        line: int | None,
        base_dir: Path,
        rules: Mapping[str, Rule],
        notes: list[str],
    ) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, f"expected a mapping, got {describe(raw)}", line)
        children = self.children(section)
        check_keys(raw, path, [row.leaf for row in children])
        values: dict[str, Any] = {}
        for row in children:
            key_path = join(path, row.leaf)
            value, row_line = raw.get(row.leaf), line_of(raw, row.leaf, line)
            if isinstance(row, Section):
                values[row.field] = self._child(row, key_path, value, row_line, base_dir, rules, notes)
            else:
                values[row.field] = self._key(row, key_path, row.leaf in raw, value, row_line, base_dir)
        fields = Fields(self, section, path, raw, line, values, notes, base_dir)
        rule = rules.get(section)
        if rule is not None:
            rule(fields)
        return self._classes[section](**fields.values)

    def _child(
        self,
        row: Section,
        path: str,
        raw: object,
        line: int | None,
        base_dir: Path,
        rules: Mapping[str, Rule],
        notes: list[str],
    ) -> Any:
        if row.repeated:
            if raw is None:
                return ()
            if not isinstance(raw, list):
                raise ConfigError(path, f"expected a list of mappings, got {describe(raw)}", line)
            return tuple(
                self._section(row.name, f"{path}[{i}]", item, line, base_dir, rules, notes)
                for i, item in enumerate(raw)
            )
        if row.optional and raw is None:
            return None
        return self._section(row.name, path, raw, line, base_dir, rules, notes)

    def _key(self, row: Key, path: str, present: bool, raw: object, line: int | None, base_dir: Path) -> Any:
        if raw is None:
            if present and not row.nullable:
                why = "it is required" if row.required else "remove the key to use the default"
                raise ConfigError(path, f"must not be null ({why})", line)
            if row.required:
                raise ConfigError(path, self._required_message(row), line)
            if row.nullable:
                return None
            raw = row.default
        try:
            return row.kind.parse(raw, base_dir)
        except ValueProblem as exc:
            raise ConfigError(path + exc.at, exc.message_for(path), line) from None

    def _required_message(self, row: Key) -> str:
        parent = self._by_name.get(row.parent)
        if isinstance(parent, Section) and parent.optional:
            unset = f" (remove {parent.name} for {parent.absent})" if parent.absent else ""
            return f"is required when {parent.name} is set{unset}"
        return "is required"

    # --- writing ---------------------------------------------------------------------------------

    def dump(self, obj: object, section: str = "") -> dict[str, Any]:
        """The YAML-ready mapping of a built dataclass: unset (None) keys and empty sections left out."""
        out: dict[str, Any] = {}
        for row in self.children(section):
            value = getattr(obj, row.field)
            if value is None:
                continue
            if isinstance(row, Key):
                out[row.leaf] = row.kind.dump(value)
            elif row.repeated:
                out[row.leaf] = [self.dump(item, row.name) for item in value]
            else:
                nested = self.dump(value, row.name)
                if nested or row.optional:
                    out[row.leaf] = nested
        return out
