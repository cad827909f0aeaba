"""Tests of the API bearer token format (quorumd.node.apitoken)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.node.apitoken import (
    format_api_token,
    hash_secret,
    parse_api_token,
    token_id_from_bytes,
)

SECRET = bytes(range(32))


def test_format_and_parse_round_trip() -> None:
    token_id = token_id_from_bytes(b"\x00\x11\x22\x33\x44\xff")
    assert token_id == "0011223344ff"
    text = format_api_token(token_id, SECRET)
    assert text.startswith("qd_0011223344ff_") and len(text) == 3 + 12 + 1 + 43
    assert parse_api_token(text) == (token_id, hash_secret(SECRET))


def test_hash_is_domain_separated_sha256() -> None:
    h = hash_secret(SECRET)
    assert len(h) == 32 and h != hashlib.sha256(SECRET).digest()
    assert hash_secret(SECRET) == h and hash_secret(b"\x01" * 32) != h


@pytest.mark.parametrize(
    "text",
    [
        "",
        "qd_",
        "qd_0011223344ff",
        "xx_0011223344ff_" + "A" * 43,
        "qd_0011223344FF_" + "A" * 43,  # uppercase id
        "qd_0011223344f_" + "A" * 44,
        "qd_0011223344ff_" + "A" * 42,
        "qd_0011223344ff_" + "A" * 42 + "=",
        "qd_0011223344ff_" + "A" * 42 + "B",  # non-canonical trailing bits
        "qd_0011223344ff_" + "A" * 42 + "+",
        " qd_0011223344ff_" + "A" * 43,
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    assert parse_api_token(text) is None


def test_parse_rejects_non_text() -> None:
    assert parse_api_token(None) is None  # type: ignore[arg-type]
    assert parse_api_token(b"qd_") is None  # type: ignore[arg-type]


def test_format_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        format_api_token("XYZ", SECRET)
    with pytest.raises(ValueError):
        format_api_token("0011223344ff", b"short")
    with pytest.raises(ValueError):
        token_id_from_bytes(b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=6, max_size=6), st.binary(min_size=32, max_size=32))
def test_round_trip_any_bytes(id_bytes: bytes, secret: bytes) -> None:
    token_id = token_id_from_bytes(id_bytes)
    assert parse_api_token(format_api_token(token_id, secret)) == (token_id, hash_secret(secret))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises(text: str) -> None:
    result = parse_api_token(text)
    assert result is None or (len(result[0]) == 12 and len(result[1]) == 32)
