"""The shared 3-node cluster of the API suites in this package (``live``): autopilot never
promotes by itself, so tests control suffrage; joined "spare" nodes serve promote/remove and
not-caught-up. Package-scoped: the route walk, the error cases, the auth table and the fuzz share
it (one xdist group keeps them on one worker); no test relies on another having run first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from quorumd.node.version import PROTOCOL_VERSION
from tests.api_live_support import (
    LOAD_POOL,
    MANUAL_PROMOTION,
    WALK_POOL,
    Live,
    admin_request,
    create_token,
    form_with_manual_promotion,
    shutdown,
    wait_token_everywhere,
)
from tests.cluster import Cluster, wait_for


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    c = Cluster(tmp_path_factory.mktemp("apilive"), 3, cluster_overrides=MANUAL_PROMOTION)
    try:
        form_with_manual_promotion(c)
        ro = create_token(c, "readonly", "live-reader")["token"]
        wait_token_everywhere(c, ro)
        # audited writes begin at this build's protocol: ratcheted before any test (and any
        # joined spare) runs, so no test depends on the order of the modules
        lead = c.wait_leader()
        wait_for(
            "this build's protocol", lambda: c.status(lead)["clusterProtocolVersion"] == PROTOCOL_VERSION, 60
        )
        for name, cidr in ((WALK_POOL, "10.60.0.0/16"), (LOAD_POOL, "10.61.0.0/16")):
            r = admin_request(c, c.wait_leader(), "POST", "/api/v1/pools", body={"name": name, "cidr": cidr})
            assert r.status == 201, str(r)
        yield Live(c, ro)
    finally:
        shutdown(c)
