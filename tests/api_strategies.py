"""Hypothesis strategies that walk the OpenAPI document: path and query values (valid per schema,
near the bounds, or arbitrary text) and a body (a valid object, a mutated one, any JSON value or
raw bytes). Shared by the in-process fuzz (tests/test_api_fuzz.py) and the fuzz against a running
cluster (tests/integration/api/test_fuzz.py), which differ only in the names worth drawing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import strategies as st

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
ODD_TEXTS = ["", "-1", "0", "01", "1.0", "null", "true", "yes", " 1", "9" * 20]


def as_text(value: Any) -> str:
    """A drawn value as it would be written in a path segment or a query string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


class RequestStrategies:
    """``names``: values worth drawing for a field of that name (pools that exist, ...);
    ``small_ints``: values worth drawing for a small integer range (member ids); ``max_text``:
    a bound on drawn texts below the schema's own (requests to a live cluster stay small)."""

    def __init__(
        self, names: Mapping[str, list[Any]], small_ints: Sequence[int] = (), max_text: int | None = None
    ) -> None:
        self.names = names
        self.small_ints = list(small_ints)
        self.max_text = max_text

    def valid(self, name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "integer":
            lo, hi = schema.get("minimum", 0), schema.get("maximum", 10**6)
            edges = [lo, hi, *(self.small_ints if hi <= 63 else [])]
            small = st.integers(max(lo, 0), max(min(hi, 8), lo))
            return st.one_of(small, st.integers(lo, hi), st.sampled_from(edges))
        if kind == "boolean":
            return st.booleans()
        choices = self.names.get(name)
        pattern = schema.get("pattern")
        gen: st.SearchStrategy[Any]
        if pattern and "\\u0000" not in pattern:
            gen = st.from_regex(pattern, fullmatch=True)
        else:
            gen = st.text(
                alphabet=st.characters(blacklist_categories=("Cc", "Cs")),
                min_size=schema.get("minLength", 0),
                max_size=min(schema.get("maxLength", 20), self.max_text or 2**31),
            )
        return st.one_of(st.sampled_from(choices), gen) if choices else gen

    def any(self, name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
        """A valid value, one just outside the bounds or of another type, or any JSON value."""
        near: st.SearchStrategy[Any] = st.nothing()
        if schema.get("type") == "integer":
            lo, hi = schema.get("minimum", 0), schema.get("maximum", 10**6)
            near = st.sampled_from([lo - 1, hi + 1, -1, 2**64, True, False, 1.5, float(lo), str(lo)])
        return st.one_of(self.valid(name, schema), self.valid(name, schema), near, JSON_VALUES)

    def text(self, name: str, schema: dict[str, Any]) -> st.SearchStrategy[str]:
        return st.one_of(
            self.valid(name, schema).map(as_text),
            self.valid(name, schema).map(as_text),
            st.sampled_from(ODD_TEXTS),
            st.text(max_size=30),
        )

    def segment(self, name: str, schema: dict[str, Any]) -> st.SearchStrategy[str]:
        return self.text(name, schema).filter(lambda s: s not in ("", ".", "..") and "/" not in s)

    def request_parts(
        self, draw: st.DrawFn, op: dict[str, Any]
    ) -> tuple[dict[str, str], list[tuple[str, str]], bytes | None]:
        """Path values, query pairs (now and then an undocumented one) and a body for ``op``."""
        values: dict[str, str] = {}
        query: list[tuple[str, str]] = []
        for p in op.get("parameters", []):
            if p["in"] == "path":
                values[p["name"]] = draw(self.segment(p["name"], p["schema"]))
            elif draw(st.booleans()):
                query.append((p["name"], draw(self.text(p["name"], p["schema"]))))
        if draw(st.integers(0, 9)) == 0:
            query.append((draw(st.text(min_size=1, max_size=8)), draw(st.text(max_size=8))))
        body: bytes | None = None
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            kind = draw(st.integers(0, 9))
            if kind <= 6:  # an object, mostly valid, sometimes with wrong values or extra fields
                obj: dict[str, Any] = {}
                for name, fschema in schema["properties"].items():
                    if name in schema.get("required", []) or draw(st.booleans()):
                        obj[name] = draw(self.valid(name, fschema) if kind <= 3 else self.any(name, fschema))
                if kind == 6:
                    obj[draw(st.text(max_size=8))] = draw(JSON_VALUES)
                body = json.dumps(obj).encode()
            elif kind <= 8:
                body = json.dumps(draw(JSON_VALUES)).encode()
            else:
                body = draw(st.binary(max_size=40))
        return values, query, body
