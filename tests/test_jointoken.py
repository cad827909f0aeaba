"""Tests of the join token format (quorumd.node.registry.jointoken)."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quorumd.node.registry.jointoken import (
    DEFAULT_TTL_SECONDS,
    JoinClaims,
    JoinTokenError,
    mint_join_token,
    parse_join_token,
    validate_ttl,
    verify_join_token,
)

KEY = b"k" * 32
CLAIMS = JoinClaims(
    node_id=4,
    cluster_id="c0ffee",
    expires_at=10_000,
    token_id=bytes(range(16)),
    leader_fingerprint="sha256:" + "ab" * 32,
    leader_addresses=("10.0.0.1:7000", "[fd00::1]:7000", "node-1.example:7000"),
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def reason(key: bytes, token: str, **kw: object) -> str:
    args: dict[str, object] = {"now": 5_000.0, "cluster_id": "c0ffee", "node_id": 4, **kw}
    with pytest.raises(JoinTokenError) as info:
        verify_join_token(key, token, **args)  # type: ignore[arg-type]
    return info.value.reason


def test_round_trip_and_text_shape() -> None:
    token = mint_join_token(KEY, CLAIMS)
    assert "=" not in token and set(token) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    raw = unb64(token)
    assert raw[0] == 1 and len(raw) > 33
    assert parse_join_token(token) == CLAIMS
    assert parse_join_token(token + "\n") == CLAIMS  # token files end with a newline
    assert verify_join_token(KEY, token, now=9_999.0, cluster_id="c0ffee", node_id=4) == CLAIMS


def test_verify_reasons() -> None:
    token = mint_join_token(KEY, CLAIMS)
    assert reason(b"x" * 32, token) == "tampered"
    assert reason(KEY, token, now=10_000.0) == "expired"
    assert reason(KEY, token, cluster_id="other") == "wrong_cluster"
    assert reason(KEY, token, node_id=5) == "wrong_node"
    assert reason(KEY, "not a token!") == "malformed"
    assert reason(KEY, "") == "malformed"
    assert reason(KEY, token[:20]) == "malformed"


def test_every_flipped_byte_is_detected() -> None:
    raw = unb64(mint_join_token(KEY, CLAIMS))
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        got = reason(KEY, b64(bytes(bad)))
        # the version byte is checked before the MAC; every other flip breaks the MAC
        assert got == ("malformed" if i == 0 else "tampered"), i


def test_mac_is_checked_before_claims_are_trusted() -> None:
    """A forged token with well-formed but altered claims is tampered, not wrong_node."""
    forged_claims = mint_join_token(b"attacker-key-000", replace(CLAIMS, node_id=9))
    assert parse_join_token(forged_claims).node_id == 9
    assert reason(KEY, forged_claims, node_id=4) == "tampered"


def test_non_canonical_base64_is_malformed() -> None:
    # pick a claims length whose encoding has spare trailing bits (raw length not a multiple of 3)
    tokens = [mint_join_token(KEY, replace(CLAIMS, cluster_id="c" * n)) for n in (1, 2, 3)]
    token = next(t for t in tokens if len(unb64(t)) % 3)
    raw = unb64(token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    twisted = token[:-1] + alphabet[last | 1]
    assert twisted != token and unb64(twisted) == raw
    assert reason(KEY, twisted) == "malformed"


@pytest.mark.parametrize(
    "bad",
    [
        {"node_id": 0},
        {"node_id": 64},
        {"cluster_id": ""},
        {"token_id": b"short"},
        {"leader_fingerprint": "md5:abc"},
        {"leader_fingerprint": "sha256:" + "AB" * 32},
        {"leader_addresses": ()},
        {"leader_addresses": ("no-port",)},
        {"leader_addresses": ("host:0",)},
        {"leader_addresses": ("host:70000",)},
        {"expires_at": -1},
    ],
)
def test_mint_rejects_invalid_claims(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        mint_join_token(KEY, replace(CLAIMS, **bad))  # type: ignore[arg-type]


def test_mint_rejects_empty_key() -> None:
    with pytest.raises(ValueError):
        mint_join_token(b"", CLAIMS)


def test_signed_garbage_claims_are_malformed() -> None:
    import hashlib
    import hmac

    signed = b"\x01" + b"\x93\x01\x02\x03"  # a valid msgpack list, wrong shape
    token = b64(signed + hmac.new(KEY, signed, hashlib.sha256).digest())
    assert reason(KEY, token) == "malformed"
    with pytest.raises(JoinTokenError) as info:
        parse_join_token(token)
    assert info.value.reason == "malformed"


def test_validate_ttl() -> None:
    assert validate_ttl(None) == DEFAULT_TTL_SECONDS == 1800
    assert validate_ttl(300) == 300 and validate_ttl(86400) == 86400
    for bad in (299, 86401, 0, -5, True, 600.0, "600"):
        with pytest.raises(ValueError):
            validate_ttl(bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises_anything_but_malformed(text: str) -> None:
    try:
        parse_join_token(text)
    except JoinTokenError as exc:
        assert exc.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_verify_of_random_bytes_is_rejected(raw: bytes) -> None:
    with pytest.raises(JoinTokenError) as info:
        verify_join_token(KEY, b64(raw), now=0.0, cluster_id="c0ffee", node_id=4)
    assert info.value.reason in {"malformed", "tampered"}
