"""Protocol versions on real daemons: the stop (exit 1, one log line) on an entry written for a
newer protocol, and a baseline joiner refused by a cluster of this build."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgpack

from quorumd.node.registry.commands import COMMAND_ENVELOPE_V2
from quorumd.node.registry.protocol import PROTOCOL_VERSION
from quorumd.raft.aio.storage import LogStorage
from quorumd.raft.core.types import Entry, EntryType, HardState
from tests.baseline_support import baseline_python
from tests.cluster import Cluster, wait_for
from tests.upgrade_support import VersionedCluster

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "baseline-017d9cc"


def test_daemon_stops_with_exit_1_on_an_entry_for_a_newer_protocol(tmp_path: Path) -> None:
    """A committed entry in the log that needs protocol 3: the node applies everything before
    it, then stops with one log line naming the index and both versions; a restart does the same
    (it is never skipped)."""
    c = Cluster(tmp_path, 1)
    node = c.make_node(1)
    shutil.copytree(FIXTURE / "data", node.data_dir)
    for p in [node.data_dir, *node.data_dir.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    c.write_config(node)
    storage, rec = LogStorage.open(node.data_dir / "raft")
    with storage:
        index = storage.last_index + 1
        data = msgpack.packb([COMMAND_ENVELOPE_V2, PROTOCOL_VERSION + 1, 40, 1.0, "from the future"])
        storage.append([Entry(storage.last_term, index, EntryType.NORMAL, data)])
        storage.set_hard_state(HardState(rec.hard_state.term, rec.hard_state.vote, index))
        storage.sync()
    for attempt in range(2):
        c.start(node)
        assert node.proc is not None
        assert node.proc.wait(timeout=60) == 1
        lines = [x for x in node.log_text().splitlines() if "entry_needs_newer_protocol" in x]
        assert len(lines) == attempt + 1, node.log_text()[-3000:]
        needle = (
            f"entry_needs_newer_protocol index={index} needs={PROTOCOL_VERSION + 1} have={PROTOCOL_VERSION}"
        )
        assert needle in lines[-1]
        assert "raft_driver_died" not in node.log_text()


def test_a_baseline_joiner_is_refused_by_a_cluster_of_this_build(tmp_path: Path) -> None:
    c = VersionedCluster(tmp_path, 2)
    try:
        c.start_first(1)
        wait_for("this protocol", lambda: c.status(1)["clusterProtocolVersion"] == PROTOCOL_VERSION)
        c.make_node(2)
        c.use(2, baseline_python())
        c.add_node(2, start_only=True)
        proc = c.nodes[2].proc
        assert proc is not None and proc.wait(timeout=60) == 1
        text = c.nodes[2].log_text()
        assert "protocol_too_old" in text, text[-2000:]
        expected = f"this build speaks protocol 1; the cluster's log already uses protocol {PROTOCOL_VERSION}"
        assert expected in text
        assert [m["nodeId"] for m in c.members(1)] == [1]
        refused = [
            x for x in c.nodes[1].log_text().splitlines() if "join_refused reason=protocol_too_old" in x
        ]
        assert refused
    finally:
        c.close()
