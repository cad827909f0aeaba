"""Tests of the API bearer token format (quorumd.node.registry.apitoken)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.node.registry.apitoken import (
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


def test_service_token_cache_keeps_revocation_and_expiry_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    """ClusterService.authenticate remembers parsed tokens, never the verdict: a revoked or
    expired token fails on the very next request."""
    from quorumd.api.ports import TokenRole
    from quorumd.node.cluster import service as service_mod
    from quorumd.node.cluster.service import ClusterService, Identity
    from quorumd.node.registry.commands import CreateApiToken, RevokeApiToken, encode_command
    from quorumd.node.registry.state import StateMachine

    sm = StateMachine()
    identity = Identity(1, "c", "0", "127.0.0.1:7000", "https://127.0.0.1:5002", "sha256:00", "")
    svc = ClusterService(
        identity,
        sm,
        cluster_enabled=False,
        propose_timeout_seconds=1.0,
        tick_seconds=0.1,
        max_trailing_logs=1,
    )
    now = [1000.0]
    monkeypatch.setattr(service_mod.time, "time", lambda: now[0])
    secret_a, secret_b = b"a" * 32, b"b" * 32
    hash_a, hash_b = hash_secret(secret_a), hash_secret(secret_b)
    create_a = CreateApiToken(1.0, "00000000000a", "a", TokenRole.ADMIN, hash_a, None)
    create_b = CreateApiToken(1.0, "00000000000b", "b", TokenRole.READONLY, hash_b, 2000)
    assert sm.apply(1, encode_command(create_a)).ok and sm.apply(2, encode_command(create_b)).ok
    token_a = format_api_token("00000000000a", secret_a)
    token_b = format_api_token("00000000000b", secret_b)
    wrong = format_api_token("00000000000a", secret_b)
    for _ in range(2):  # the second round is served from the cache
        principal = svc.authenticate(token_a)
        assert principal is not None and principal.role == TokenRole.ADMIN
        principal = svc.authenticate(token_b)
        assert principal is not None and principal.role == TokenRole.READONLY
        assert svc.authenticate(wrong) is None
        assert svc.authenticate("qd_garbage") is None
    now[0] = 2000.0
    assert svc.authenticate(token_b) is None  # expired
    assert sm.apply(3, encode_command(RevokeApiToken(3.0, "00000000000a"))).ok
    assert svc.authenticate(token_a) is None  # revoked
    assert svc.authenticate(token_a) is None
