"""Fixtures shared by the test modules (plain helpers live in the support modules beside them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import RanReceiver


@pytest.fixture(scope="module")
def ran() -> Iterator[RanReceiver]:
    """A RAN webhook receiver for one module's cluster (closed when the module ends)."""
    r = RanReceiver()
    try:
        yield r
    finally:
        r.close()
