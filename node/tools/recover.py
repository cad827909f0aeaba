"""``quorumd recover``: offline quorum-loss recovery (the stopped-cluster peers.json).

Run on a stopped node. Every entry in its log is applied (as etcd's --force-new-cluster does,
the uncommitted tail is kept: it is the most this node knows), registry members that are not in
the new voter set are removed, and with them the leases they own (as any removal does: the
state keeps no lease without an owner; the summary says how many), and the result is written as
a snapshot whose configuration is exactly the given voters. The log behind it is dropped. Start
the node afterwards: with itself as the only voter it leads at once; other nodes rejoin with
fresh data dirs and join tokens. ``--peers`` must include this node. The addresses in
``--peers`` are checked against the registry (a mismatch is reported; the registry keeps its
address).

Recover one survivor and let the others rejoin fresh: two survivors recovered separately each
keep their own uncommitted tail, and their snapshots can then disagree at the same index.
"""

from __future__ import annotations

from pathlib import Path

from quorumd.node.config.schema import Config, HostPort, parse_host_port
from quorumd.node.daemon.datadir import read_node_file
from quorumd.node.registry.state import StateMachine
from quorumd.raft.aio.storage import LogStorage, StorageError
from quorumd.raft.codec import decode_conf_change
from quorumd.raft.core.types import (
    ConfChange,
    ConfChangeType,
    Configuration,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)


class RecoverError(Exception):
    pass


def parse_peers(text: str) -> dict[int, HostPort]:
    peers: dict[int, HostPort] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        nid_s, sep, addr = part.partition("=")
        if not sep or not (nid_s.isascii() and nid_s.isdigit()) or not 1 <= int(nid_s) <= 63:
            raise RecoverError(f"--peers: expected ID=HOST:PORT with ID in 1..63, got {part!r}")
        if int(nid_s) in peers:
            raise RecoverError(f"--peers: node {int(nid_s)} is given twice")
        try:
            peers[int(nid_s)] = parse_host_port(addr)
        except Exception as exc:
            raise RecoverError(f"--peers: bad address in {part!r}: {exc}") from exc
    if not peers:
        raise RecoverError("--peers: at least one voter is required")
    return peers


def recover(cfg: Config, peers: dict[int, HostPort]) -> str:
    data_dir: Path = cfg.data_dir
    meta = read_node_file(data_dir) if data_dir.exists() else None
    if meta is None:
        raise RecoverError(f"{data_dir}: no node state to recover")
    if meta["node_id"] != cfg.node_id:
        raise RecoverError(f"{data_dir} belongs to node {meta['node_id']}, config says {cfg.node_id}")
    if cfg.node_id not in peers:  # it would restart outside its own configuration, never to lead
        raise RecoverError(f"--peers must include this node ({cfg.node_id})")
    notes: list[str] = []
    try:
        storage, rec = LogStorage.open(data_dir / "raft")
    except StorageError as exc:
        raise RecoverError(str(exc)) from exc
    with storage:
        sm = StateMachine()
        if rec.snapshot is not None:
            sm.restore(rec.snapshot.data)
        last_index = rec.snapshot.meta.index if rec.snapshot else 0
        last_term = rec.snapshot.meta.term if rec.snapshot else 0
        for e in rec.entries:
            if e.type == EntryType.CONF_CHANGE:
                sm.apply_conf_change(e.index, decode_conf_change(e.data))
            else:
                sm.apply(e.index, e.data)
            last_index, last_term = e.index, e.term
        if last_index == 0:
            raise RecoverError("the log is empty: nothing to recover")
        missing = sorted(set(peers) - {m.node_id for m in sm.members()})
        if missing:
            raise RecoverError(f"--peers names nodes that are not members: {missing}")
        for m in sm.members():
            if m.node_id in peers and m.raft_address != str(peers[m.node_id]):
                notes.append(
                    f"note: node {m.node_id} is registered at {m.raft_address}, --peers says "
                    f"{peers[m.node_id]}; the registered address is kept"
                )
        index = last_index
        removed: list[int] = []
        purged = 0
        for m in sm.members():
            if m.node_id not in peers:
                index += 1
                res = sm.apply_conf_change(index, ConfChange(ConfChangeType.REMOVE, m.node_id))
                removed.append(m.node_id)
                purged += res.value if isinstance(res.value, int) else 0
        config = Configuration(voters=frozenset(peers), nonvoters=frozenset())
        snap = Snapshot(SnapshotMeta(index, last_term, config), sm.snapshot())
        storage.install_snapshot(snap)
        term = max(rec.hard_state.term, last_term)
        storage.set_hard_state(HardState(term=term, vote=0, commit=index))
        storage.sync()
    voters = ",".join(f"{nid}={addr}" for nid, addr in sorted(peers.items()))
    return "\n".join(
        [
            *notes,
            f"recovered: snapshot at index {index} term {last_term} with voters {voters}; "
            f"removed members {removed} ({purged} leases purged with them)",
        ]
    )
