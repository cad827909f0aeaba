"""The example config file, ``deploy/quorumd.example.yaml``, rendered from the schema table.

Every key appears with its default (a required key with its row's ``example``) and its row's doc as
the line's comment; an optional section is shown as ``null`` with the section's doc, a list of
mappings as ``[]`` followed by its item's keys as comments. The header comes from ``TABLE.header``
plus the generated list of keys where null means "not set".

Regenerate after changing the table::

    python -m quorumd.node.config.example > deploy/quorumd.example.yaml

``python -m quorumd.node.config.example --check deploy/quorumd.example.yaml`` exits 1 when the file
is stale; ``tests/test_config.py`` asserts the shipped file equals ``render_example()``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

from quorumd.node.config.table import Key, Section, Table
from quorumd.node.config.values import Duration

__all__ = ["COMMENT_COLUMN", "main", "render", "render_example"]

COMMENT_COLUMN = 36  # where a key line's comment starts (later, when the key and value are longer)
WRAP = 100
REGENERATE = "python -m quorumd.node.config.example > deploy/quorumd.example.yaml"


def render_example() -> str:
    """The text of ``deploy/quorumd.example.yaml``."""
    from quorumd.node.config.schema import TABLE

    return render(TABLE, generated_by=f"the schema table (node/config/schema.py): {REGENERATE}")


def render(table: Table, generated_by: str = "") -> str:
    """The example file of any table (one key per line, sections indented by two spaces)."""
    optional = [
        row.name
        for row in table.walk()
        if (isinstance(row, Key) and row.nullable) or (isinstance(row, Section) and row.optional)
    ]
    lines = [f"# {text}" for text in table.header]
    if optional:
        note = f'`null` means "not set" for optional keys ({", ".join(optional)}).'
        lines += [f"# {text}" for text in textwrap.wrap(note, WRAP - 2, break_on_hyphens=False)]
    if generated_by:
        lines.append(f"# Generated from {generated_by}")
    lines.append("")
    folded: list[str] = []  # sections shown on one line: their keys are not repeated below
    for row in table.walk():
        if any(row.name.startswith(name + ".") for name in folded):
            continue
        indent = "  " * row.name.count(".")
        if isinstance(row, Key):
            lines.append(_line(f"{indent}{row.leaf}: {_inline(_shown(row))}", _doc(row)))
            continue
        if not row.parent:
            lines.append("")
        if row.optional:
            folded.append(row.name)
            lines.append(_line(f"{indent}{row.leaf}: null", row.doc))
        elif row.repeated:
            folded.append(row.name)
            lines.append(_line(f"{indent}{row.leaf}: []", row.doc))
            for i, child in enumerate(table.children(row.name)):
                bullet = "- " if i == 0 else "  "
                value = "(required)" if isinstance(child, Key) and child.required else _inline(_shown(child))
                lines.append(_line(f"{indent}  # {bullet}{child.leaf}: {value}", _doc(child)))
        else:
            if row.doc:
                lines.append(f"{indent}# {row.doc}")
            lines.append(f"{indent}{row.leaf}:")
    return "\n".join(lines) + "\n"


def _shown(row: Key | Section) -> object:
    if isinstance(row, Section):
        return None if row.optional else {}
    return row.example if row.required else row.default


def _doc(row: Key | Section) -> str:
    if isinstance(row, Section):
        return row.doc
    kind = row.kind
    if isinstance(kind, Duration) and kind != Duration():  # bounds other than the default 1ms..24h
        return f"{row.doc} ({kind.low}..{kind.high})"
    return row.doc


def _line(text: str, doc: str) -> str:
    if not doc:
        return text
    return f"{text.ljust(COMMENT_COLUMN - 2)}  # {doc}"


def _inline(value: object) -> str:
    """``value`` as YAML on one line (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quorumd.node.config.example", description="Print the example config file."
    )
    parser.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the rendered text")
    args = parser.parse_args(argv)
    text = render_example()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    if Path(args.check).read_text(encoding="utf-8") != text:
        print(f"{args.check} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
