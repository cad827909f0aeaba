"""StubBgpSpeaker: announced set follows the desired set while running, withdraw/re-announce, hooks."""

from __future__ import annotations

import logging

import pytest

from quorumd.node.effects.bgp import (
    BgpSpeaker,
    StubBgpSpeaker,
    normalize_prefix,
    prefix_sort_key,
    sorted_prefixes,
)


def _speaker() -> tuple[StubBgpSpeaker, list[tuple[bool, int]]]:
    changes: list[tuple[bool, int]] = []
    return StubBgpSpeaker(on_change=lambda running, n: changes.append((running, n))), changes


def test_satisfies_protocol() -> None:
    speaker: BgpSpeaker = StubBgpSpeaker()
    assert not speaker.running
    assert speaker.announced == frozenset()


def test_stopped_speaker_keeps_desired_set_but_announces_nothing() -> None:
    s, changes = _speaker()
    s.set_prefixes(["10.0.0.1/32", "10.0.0.2/32"])
    assert s.announced == frozenset()
    assert s.desired == {"10.0.0.1/32", "10.0.0.2/32"}
    assert changes == []


def test_start_announces_desired_and_stop_withdraws_all() -> None:
    s, changes = _speaker()
    s.set_prefixes(["10.0.0.1/32", "2001:db8::5/128"])
    s.start()
    assert s.running
    assert s.announced == {"10.0.0.1/32", "2001:db8::5/128"}
    s.stop()
    assert not s.running
    assert s.announced == frozenset()
    assert s.desired == {"10.0.0.1/32", "2001:db8::5/128"}  # kept for the next start
    s.start()
    assert s.announced == {"10.0.0.1/32", "2001:db8::5/128"}
    assert changes == [(True, 2), (False, 0), (True, 2)]


def test_start_and_stop_are_idempotent() -> None:
    s, changes = _speaker()
    s.start()
    s.start()
    s.stop()
    s.stop()
    assert changes == [(True, 0), (False, 0)]


def test_set_prefixes_while_running_applies_the_difference() -> None:
    s, changes = _speaker()
    s.start()
    s.set_prefixes(["10.0.0.1/32", "10.0.0.2/32"])
    s.set_prefixes(["10.0.0.2/32", "10.0.0.3/32"])
    assert s.announced == {"10.0.0.2/32", "10.0.0.3/32"}
    s.set_prefixes(["10.0.0.3/32", "10.0.0.2/32"])  # same set: no change reported
    s.set_prefixes([])
    assert s.announced == frozenset()
    assert changes == [(True, 0), (True, 2), (True, 2), (True, 0)]


def test_invalid_prefixes_are_skipped_and_counted() -> None:
    s, _ = _speaker()
    s.start()
    s.set_prefixes(["10.0.0.1/32", "not-an-ip", "10.0.0.1/24", "10.0.0.9"])
    assert s.announced == {"10.0.0.1/32", "10.0.0.9/32"}
    assert s.rejected_prefixes == 2


def test_prefixes_are_normalized() -> None:
    assert normalize_prefix("2001:DB8:0::1/128") == "2001:db8::1/128"
    assert normalize_prefix(" 192.0.2.7 ") == "192.0.2.7/32"
    with pytest.raises(ValueError):
        normalize_prefix("192.0.2.0/33")


def test_snapshot_reports_count_and_a_numerically_sorted_sample() -> None:
    s, _ = _speaker()
    assert s.snapshot() == {
        "running": False,
        "announcedPrefixes": 0,
        "samplePrefixes": [],
        "fencingToken": None,
    }
    s.set_prefixes([f"10.0.0.{i}/32" for i in range(20, 0, -1)] + ["2001:db8::1/128"])
    assert s.snapshot()["announcedPrefixes"] == 0
    s.start()
    snap = s.snapshot()
    assert snap["running"] is True
    assert snap["announcedPrefixes"] == 21
    assert snap["samplePrefixes"] == [
        "10.0.0.1/32",
        "10.0.0.2/32",
        "10.0.0.3/32",
        "10.0.0.4/32",
        "10.0.0.5/32",
    ]


def test_sorted_prefixes_is_numeric_not_lexical() -> None:
    assert sorted_prefixes(["10.0.0.10/32", "2001:db8::/128", "10.0.0.9/32"]) == [
        "10.0.0.9/32",
        "10.0.0.10/32",
        "2001:db8::/128",
    ]


def test_logs_each_prefix_for_small_changes(caplog: pytest.LogCaptureFixture) -> None:
    s, _ = _speaker()
    s.set_prefixes(["10.0.0.2/32", "10.0.0.1/32"])
    with caplog.at_level(logging.INFO, logger="quorumd.node.effects.bgp"):
        s.start()
        s.set_prefixes(["10.0.0.2/32"])
        s.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "bgp_speaker_started prefixes=2",
        "bgp_announce prefix=10.0.0.1/32",
        "bgp_announce prefix=10.0.0.2/32",
        "bgp_withdraw prefix=10.0.0.1/32",
        "bgp_withdraw prefix=10.0.0.2/32",
        "bgp_speaker_stopped",
    ]


def test_logs_counts_for_large_batches(caplog: pytest.LogCaptureFixture) -> None:
    s, _ = _speaker()
    s.set_prefixes([f"10.1.{i // 256}.{i % 256}/32" for i in range(1000)])
    with caplog.at_level(logging.INFO, logger="quorumd.node.effects.bgp"):
        s.start()
        s.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4
    assert msgs[1].startswith("bgp_announce count=1000 sample=10.1.0.0/32,10.1.0.1/32,")
    assert msgs[2].startswith("bgp_withdraw count=1000 ")


def test_update_applies_a_delta_while_running_and_keeps_it_while_stopped() -> None:
    s, changes = _speaker()
    s.set_prefixes(["10.0.0.1/32"])
    s.start()
    s.update(["10.0.0.2/32", "10.0.0.3/32"], ["10.0.0.1/32"])
    assert s.announced == {"10.0.0.2/32", "10.0.0.3/32"} == s.desired
    assert changes[-1] == (True, 2)
    s.update([], ["10.0.0.9/32"])  # withdrawing what is not announced changes nothing
    assert changes[-1] == (True, 2) and len(changes) == 2
    s.stop()
    s.update(["10.0.0.4/32"], ["10.0.0.2/32"])  # stopped: desired follows, nothing announced
    assert s.announced == frozenset() and s.desired == {"10.0.0.3/32", "10.0.0.4/32"}
    s.start()
    assert s.announced == {"10.0.0.3/32", "10.0.0.4/32"}


def test_update_is_independent_of_how_many_prefixes_are_held() -> None:
    s, _ = _speaker()
    s.set_prefixes([f"10.1.{i // 256}.{i % 256}/32" for i in range(5000)])
    s.start()
    calls = 0

    class Counting(str):
        __slots__ = ()

        def __hash__(self) -> int:
            nonlocal calls
            calls += 1
            return str.__hash__(self)

    s.update([Counting("10.2.0.1/32")], [Counting("10.1.0.7/32")])
    assert calls <= 8  # a handful of set operations on the delta, never a pass over the 5,000
    assert len(s.announced) == 5000 and "10.2.0.1/32" in s.announced


def test_sort_key_fast_path_agrees_with_ipaddress() -> None:
    import ipaddress

    samples = ["10.0.0.1/32", "10.0.0.0/8", "10.0.0.5/8", "2001:db8::1/128", "::/0", "192.168.1.0/24"]
    for p in samples:
        net = ipaddress.ip_network(p, strict=False)
        assert prefix_sort_key(p) == (net.version, int(net.network_address), net.prefixlen)


def test_canonical_prefixes_are_taken_as_given() -> None:
    s, _ = _speaker()
    s.set_prefixes(["10.0.0.2/32", "10.0.0.1/32"], canonical=True)
    s.start()
    assert s.announced == {"10.0.0.1/32", "10.0.0.2/32"}
    assert s.snapshot()["samplePrefixes"] == ["10.0.0.1/32", "10.0.0.2/32"]


def test_every_change_keeps_the_fencing_token_of_the_entry_behind_it() -> None:
    """the speaker records the (term, index) of the last change, not of calls that
    changed nothing, and shows it in /status."""
    from quorumd.node.effects.token import FencingToken

    s, _ = _speaker()
    assert s.fencing_token is None
    s.set_prefixes(["10.0.0.1/32"], canonical=True, token=FencingToken(1, 5))
    assert s.fencing_token is None  # stopped: nothing announced, nothing changed
    s.start(token=FencingToken(1, 6))
    assert s.fencing_token == FencingToken(1, 6)
    s.update(["10.0.0.2/32"], [], token=FencingToken(2, 9))
    assert s.snapshot()["fencingToken"] == {"term": 2, "index": 9}
    s.update(["10.0.0.2/32"], [], token=FencingToken(2, 10))  # already announced: no change
    assert s.fencing_token == FencingToken(2, 9)
    s.stop(token=FencingToken(2, 11))
    assert s.snapshot()["fencingToken"] == {"term": 2, "index": 11}
    assert FencingToken(1, 99) < FencingToken(2, 1) < FencingToken(2, 2)
