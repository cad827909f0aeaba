"""The API's answers where a forwarded call loses its answer, and input the registry must never store."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from quorumd.api.errors import LeaderUnreachable
from quorumd.api.ports import ForwardedRequest, ForwardedResponse
from tests.api_support import Env, request

pytestmark = pytest.mark.asyncio
M = "/api/v1/cluster/members"


@pytest.mark.parametrize("force", [None, "true"])
async def test_removing_a_non_member_with_the_leader_unreachable_is_not_a_success(
    env: Env, force: str | None
) -> None:
    """A follower that gets no answer from the leader may settle a removal from its replica only
    for a node that was a member before it forwarded: a node that never was one is not removed."""
    env.follower.forward_failure = "unreachable"
    params = {"force": force} if force else None
    r = await request(env.fc, "DELETE", f"{M}/42", env.admin, params=params)
    assert r.status == 502 and r.code == "leader_unreachable", r.body
    assert len(env.follower.forwarded) == 1


async def test_removal_whose_answer_is_lost_is_reported_from_the_replica(env: Env) -> None:
    """The leader removed the member, then its answer was lost: the follower's replica shows the
    member gone, so the removal is reported as done."""
    real = env.follower.forward

    async def lost_answer(request: ForwardedRequest, timeout: float, *, to: int | None = None) -> Any:
        resp: ForwardedResponse = await real(request, timeout, to=to)
        assert resp.status == 200, resp.body
        raise LeaderUnreachable("node 1 is unreachable")

    env.follower.forward = lost_answer  # type: ignore[method-assign]
    assert env.follower.has_member(6)
    r = await request(env.fc, "DELETE", f"{M}/6", env.admin)
    assert r.status == 200 and r.result == {"message": "Cluster member removed"}
    assert not env.follower.has_member(6)
    # a member still present after a lost answer: the error stands
    env.follower.forward_failure = "unreachable"
    r = await request(env.fc, "DELETE", f"{M}/3", env.admin, params={"force": "true"})
    assert r.status == 502 and r.code == "leader_unreachable"
    assert env.follower.has_member(3)


@pytest.mark.parametrize("cidr", ["fd00::%eth0/120", "fe80::%1/126", "fd00::%a\nb/120", "fd00::%\x00/120"])
@pytest.mark.parametrize("via", ["leader", "follower"])
async def test_pool_cidr_with_an_ipv6_zone_is_refused(
    env: Env, via: str, cidr: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A zone index names an interface of one host: it is no part of a network in CIDR notation,
    and whatever follows ``%`` (newlines, NUL) would otherwise be stored, echoed and logged."""
    with caplog.at_level(logging.INFO):
        r = await request(
            env.client(via), "POST", "/api/v1/pools", env.admin, json_body={"name": "z", "cidr": cidr}
        )
    assert r.status == 400 and r.code == "invalid_cidr", r.body
    assert "'cidr'" in r.body["error"]
    assert env.follower.forwarded == []
    assert (await request(env.lc, "GET", "/api/v1/pools/z", env.readonly)).code == "pool_not_found"
    assert "pool_created" not in caplog.text
    # the same network without a zone is a pool
    plain = cidr.split("%")[0] + "/" + cidr.rsplit("/", 1)[1]
    r = await request(
        env.client(via), "POST", "/api/v1/pools", env.admin, json_body={"name": "z", "cidr": plain}
    )
    assert r.status == 201 and r.result["cidr"] == plain, r.body
