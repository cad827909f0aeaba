"""Fixtures shared by the test modules (plain helpers live in the support modules beside them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.api_support import Env, close_env, make_env
from tests.cluster import RanReceiver


@pytest.fixture(scope="module")
def ran() -> Iterator[RanReceiver]:
    """A RAN webhook receiver for one module's cluster (closed when the module ends)."""
    r = RanReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest_asyncio.fixture
async def env() -> AsyncIterator[Env]:
    """Fake nodes (leader and follower) over the real state machine, each behind the real API app."""
    e = await make_env()
    try:
        yield e
    finally:
        await close_env(e)
