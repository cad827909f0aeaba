"""Scripted interaction tests (after etcd-io/raft's testdata): tests/interaction/*.txt.

Each file is a script of ``> command`` lines, each followed by what the command printed. The
test replays the commands on a fresh in-memory network and compares the whole transcript.
Regenerate after an intended behaviour change with ``QUORUMD_REWRITE=1 make unit`` and review the
diff like code.

Commands: ``nodes 1 2 3`` (node 1 founds), ``campaign N``, ``grow N [nonvoter]``, ``propose N data``,
``conf N add|promote|demote|remove ID``, ``transfer N ID``, ``read N ctx``, ``compact N``,
``isolate N``, ``cut A B`` (one way A->B), ``heal``, ``tick K [N ...]``, ``restart N``,
``status`` (one line per node), ``applied N``, ``msgs`` (messages delivered since last ``msgs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quorumd.raft.core.ready import RaftError
from quorumd.raft.core.types import ConfChange, ConfChangeType, Entry, EntryType, MessageType
from tests.raftnet import Net, with_cfg

DATA = Path(__file__).parent / "interaction"
CC = {
    "add": ConfChangeType.ADD_NONVOTER,
    "promote": ConfChangeType.PROMOTE,
    "demote": ConfChangeType.DEMOTE,
    "remove": ConfChangeType.REMOVE,
}


def describe(e: Entry) -> str:
    if e.type == EntryType.CONF_CHANGE:
        return "conf"
    return e.data.decode() or "noop"


class Script:
    def __init__(self) -> None:
        self.net = Net(cfg=with_cfg(trailing_logs=2, snapshot_chunk_bytes=64))
        self.seen = 0

    def status(self) -> list[str]:
        out = []
        for nid, c in sorted(self.net.nodes.items()):
            cfg = c.config
            out.append(
                f"{nid}: {c.role.name.lower()} term={c.term} leader={c.leader_id} commit={c.commit_index} "
                f"applied={c.applied_index} last={c.last_index} voters={sorted(cfg.voters)} "
                f"nonvoters={sorted(cfg.nonvoters)}"
            )
        return out

    def run(self, line: str) -> list[str]:
        net = self.net
        args = line.split()
        cmd, rest = args[0], args[1:]
        n = [int(a) for a in rest if a.isdigit()]
        try:
            if cmd == "nodes":
                for i, nid in enumerate(n):
                    net.add(nid, founder=i == 0)
            elif cmd == "campaign":
                net.nodes[n[0]].campaign()
            elif cmd == "grow":
                net.grow(n[0], voters="nonvoter" not in rest)
                return []
            elif cmd == "propose":
                idx = net.nodes[n[0]].propose(rest[1].encode())
                net.pump()
                return [f"index {idx}"]
            elif cmd == "conf":
                idx = net.nodes[n[0]].propose_conf_change(ConfChange(CC[rest[1]], int(rest[2])))
                net.pump()
                return [f"index {idx}"]
            elif cmd == "transfer":
                net.nodes[n[0]].transfer_leadership(n[1])
            elif cmd == "read":
                net.nodes[n[0]].read_index(rest[1].encode())
                net.pump()
                return [f"read {r.context.decode()} index={r.index}" for r in net.read_states[n[0]]]
            elif cmd == "compact":
                c = net.nodes[n[0]]
                c.compact(c.applied_index, b"snapshot@%d" % c.applied_index)
                return [f"snapshot index={c.status().snapshot_index} first={c.status().first_index}"]
            elif cmd == "isolate":
                net.isolate(n[0])
                return []
            elif cmd == "cut":
                net.cut.add((n[0], n[1]))
                return []
            elif cmd == "heal":
                net.heal()
                return []
            elif cmd == "tick":
                net.tick(n[0], only=n[1:] or None)
                return self.status()
            elif cmd == "restart":
                net.restart(n[0])
                return []
            elif cmd == "status":
                return self.status()
            elif cmd == "applied":
                return [f"{e.index}/{e.term} {describe(e)}" for e in net.applied[n[0]]]
            elif cmd == "msgs":
                new = net.delivered[self.seen :]
                self.seen = len(net.delivered)
                return [
                    f"{m.frm}->{m.to} {m.type.name} term={m.term} index={m.index} entries={len(m.entries)}"
                    + (" reject" if m.reject else "")
                    for m in new
                    if m.type not in (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP)
                ]
            else:
                raise ValueError(f"unknown command {cmd}")
        except RaftError as exc:
            return [f"error: {type(exc).__name__}: {exc}"]
        net.pump()
        return self.status() if cmd in ("campaign", "transfer", "nodes") else []


def replay(text: str) -> str:
    script = Script()
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("> "):
            out.append(line)
            out.extend(script.run(line[2:].strip()))
        elif line.startswith("#") or (not line.strip() and (not out or out[-1].startswith("#"))):
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.stem)
def test_interaction(path: Path) -> None:
    text = path.read_text()
    got = replay(text)
    if os.environ.get("QUORUMD_REWRITE"):
        path.write_text(got)
        return
    assert got == text, f"transcript differs; rerun with QUORUMD_REWRITE=1 and review {path}"
