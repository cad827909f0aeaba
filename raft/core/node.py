"""RaftCore: the deterministic Raft state machine (sans-IO, after etcd-io/raft).

Inputs are ``tick``, ``step`` (peer messages), ``propose``, ``propose_conf_change``,
``transfer_leadership``, ``read_index`` and ``compact``; output is the ``Ready`` batch (see
``ready.py`` for the driver contract). Term checks happen once in ``step``; then a per-role
handler runs. Roles change only through ``_become_*``. No clock, no randomness except the
injected ``Rng``, no I/O.

Features: PreVote and CheckQuorum (thesis 9.6), pipelined replication with per-peer flow
control (probe/replicate/snapshot), fast backtracking by term (thesis 3.5), commit only of
current-term entries by counting (paper 5.4.2), voters and nonvoters with one-at-a-time
membership changes (thesis 4.1, 4.2.1), leadership transfer (thesis 3.10), ReadIndex
(thesis 6.4) and chunked InstallSnapshot (paper 7). Pure helpers keep the bookkeeping that needs
no engine state: per-peer ``Progress`` (``progress.py``), the ReadIndex queues and ack counting
(``readindex.py``) and the reassembly of an incoming snapshot (``snapshot_assembly.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..codec import decode_conf_change, encode_conf_change
from . import membership
from .log import RaftLog
from .progress import Progress
from .readindex import ReadIndexQueue, ReadRequest
from .ready import (
    ConfChangeError,
    CoreConfig,
    InvariantError,
    NotLeaderError,
    PeerStatus,
    ProposalDroppedError,
    ReadState,
    Ready,
    Rng,
    SoftState,
    Status,
)
from .snapshot_assembly import SnapshotAssembly
from .types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    ProgressState,
    Role,
    Snapshot,
    SnapshotMeta,
)

TRANSFER_CONTEXT = b"transfer"


class RaftCore:
    def __init__(
        self,
        cfg: CoreConfig,
        rng: Rng,
        *,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
    ) -> None:
        self.cfg = cfg
        self.id: NodeId = cfg.node_id
        self._rng = rng
        meta = snapshot.meta if snapshot is not None else SnapshotMeta()
        self.snapshot: Snapshot | None = snapshot
        self.log = RaftLog(meta.index, meta.term, entries)
        self._snapshot_config = meta.config
        self.config = self._config_from_log()
        hard_state = hard_state or HardState()
        self.term = hard_state.term
        self.vote = hard_state.vote
        commit = max(hard_state.commit, meta.index)
        if commit > self.log.last_index:
            raise InvariantError(f"recovered commit {commit} beyond last index {self.log.last_index}")
        self.log.commit = commit
        self.role = Role.FOLLOWER
        self.leader_id: NodeId = NO_NODE
        self.progress: dict[NodeId, Progress] = {}
        self.pending_conf_index = self._last_conf_index()
        self.transfer_target: NodeId = NO_NODE
        self._transfer_elapsed = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomized_timeout = cfg.election_ticks
        self._votes: dict[NodeId, bool] = {}
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._reads = ReadIndexQueue()
        self._incoming_snapshot = SnapshotAssembly()
        self._pending_snapshot: Snapshot | None = None
        self._needs_broadcast = False
        self.commit_broadcast_pending = False  # see CoreConfig.lazy_commit_broadcast
        self.campaign_suppressed = False
        self._prev_hard = HardState(self.term, self.vote, self.log.commit)
        self._prev_soft = SoftState(self.leader_id, self.role)
        self._reset_randomized_timeout()

    @staticmethod
    def bootstrap_entries(node_id: NodeId, context: bytes = b"") -> tuple[HardState, list[Entry]]:
        cc = ConfChange(ConfChangeType.PROMOTE, node_id, context)
        entry = Entry(term=1, index=1, type=EntryType.CONF_CHANGE, data=encode_conf_change(cc))
        return HardState(term=1, vote=NO_NODE, commit=1), [entry]

    # --- read-only properties ---------------------------------------------------------------
    @property
    def node_id(self) -> NodeId:
        return self.id

    @property
    def commit_index(self) -> int:
        return self.log.commit

    @property
    def applied_index(self) -> int:
        return self.log.applied

    @property
    def last_index(self) -> int:
        return self.log.last_index

    def status(self) -> Status:
        peers: tuple[PeerStatus, ...] = ()
        if self.role == Role.LEADER:
            peers = tuple(
                PeerStatus(
                    node_id=nid,
                    voter=nid in self.config.voters,
                    match_index=self.log.last_index if nid == self.id else pr.match,
                    next_index=pr.next,
                    state=pr.state,
                    last_contact_ticks=0 if nid == self.id else pr.last_contact_ticks,
                    recent_active=True if nid == self.id else pr.recent_active,
                )
                for nid, pr in sorted(self.progress.items())
            )
        return Status(
            node_id=self.id,
            role=self.role,
            term=self.term,
            vote=self.vote,
            leader_id=self.leader_id,
            commit_index=self.log.commit,
            applied_index=self.log.applied,
            last_index=self.log.last_index,
            last_term=self.log.last_term,
            first_index=self.log.first_index,
            snapshot_index=self.snapshot.meta.index if self.snapshot else 0,
            config=self.config,
            pending_conf_index=self.pending_conf_index if self.pending_conf_index > self.log.commit else 0,
            transfer_target=self.transfer_target,
            peers=peers,
            campaign_suppressed=self.campaign_suppressed,
        )

    # --- configuration from the log -----------------------------------------------------------
    def _config_from_log(self) -> Configuration:
        """Snapshot configuration plus every conf change after the snapshot (committed or not)."""
        config = self._snapshot_config
        snap_index = self.snapshot.meta.index if self.snapshot else self.log.offset
        for e in self.log.entries:
            if e.index > snap_index and e.type == EntryType.CONF_CHANGE:
                config = membership.apply(config, self._decode_cc(e))
        return config

    def _config_at(self, index: int) -> Configuration:
        config = self._snapshot_config
        snap_index = self.snapshot.meta.index if self.snapshot else self.log.offset
        for e in self.log.entries:
            if e.index > index:
                break
            if e.index > snap_index and e.type == EntryType.CONF_CHANGE:
                config = membership.apply(config, self._decode_cc(e))
        return config

    def _last_conf_index(self) -> int:
        for e in reversed(self.log.entries):
            if e.type == EntryType.CONF_CHANGE:
                return e.index
        return 0

    @staticmethod
    def _decode_cc(e: Entry) -> ConfChange:
        try:
            return decode_conf_change(e.data)
        except Exception as exc:
            raise InvariantError(f"undecodable conf change at index {e.index}: {exc}") from exc

    def _append_entries_to_log(self, entries: Sequence[Entry]) -> None:
        """Append (maybe truncating) and keep the active configuration in step with the log."""
        truncates = bool(entries) and entries[0].index <= self.log.last_index
        self.log.append(entries)
        if truncates:
            self._set_config(self._config_from_log())
            self.pending_conf_index = self._last_conf_index()
            return
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                self._set_config(membership.apply(self.config, self._decode_cc(e)))
                self.pending_conf_index = e.index

    def _set_config(self, config: Configuration) -> None:
        self.config = config
        if self.role != Role.LEADER:
            return
        members = config.members()
        for nid in list(self.progress):
            if nid not in members and nid != self.id:
                del self.progress[nid]
        for nid in sorted(members):
            if nid not in self.progress:
                pr = Progress(self.log.last_index + 1, self.cfg.max_inflight_appends)
                pr.recent_active = True
                self.progress[nid] = pr
        if self.transfer_target and self.transfer_target not in config.voters:
            self._abort_transfer()

    # --- helpers ----------------------------------------------------------------------------
    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)

    def _reset_randomized_timeout(self) -> None:
        t = self.cfg.election_ticks
        self._randomized_timeout = t + self._rng.randrange(0, t)

    def _promotable(self) -> bool:
        return self.id in self.config.voters

    def _in_lease(self) -> bool:
        return (
            self.cfg.check_quorum
            and self.leader_id != NO_NODE
            and self.election_elapsed < self.cfg.election_ticks
        )

    def _quorum_size(self) -> int:
        return self.config.quorum()

    # --- role transitions ---------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NO_NODE
        self.leader_id = NO_NODE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._abort_transfer()
        self._reads.clear()
        self.progress = {}

    def _become_follower(self, term: int, leader: NodeId) -> None:
        self._reset(term)
        self.commit_broadcast_pending = False
        self.role = Role.FOLLOWER
        self.leader_id = leader

    def _become_pre_candidate(self) -> None:
        # PreVote does not change term or vote (thesis 9.6).
        self._votes = {}
        self.election_elapsed = 0
        self._reset_randomized_timeout()
        self.leader_id = NO_NODE
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        for nid in sorted(self.config.members() | {self.id}):
            pr = Progress(self.log.last_index + 1, self.cfg.max_inflight_appends)
            pr.recent_active = True
            # The voters that just elected us almost always hold our whole log: writes proposed
            # before a peer first answers follow the no-op at once (resent from the probe point,
            # so a peer that is behind loses nothing) instead of a round trip later.
            pr.optimistic = nid != self.id
            self.progress[nid] = pr
        # Raft paper 8: a no-op entry of the new term lets the leader learn what is committed.
        self._append_as_leader([Entry(self.term, self.log.last_index + 1, EntryType.NORMAL, b"")])

    # --- inputs: time -----------------------------------------------------------------------
    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if not self._promotable() or self.election_elapsed < self._randomized_timeout:
            return
        if self.campaign_suppressed and self.election_elapsed < 3 * self._randomized_timeout:
            # A draining node only campaigns when no leader was heard for a long while (also
            # after a leader-connection-lost hint cleared leader_id: healthy peers go first).
            return
        self.election_elapsed = 0
        self._campaign(pre_vote=self.cfg.pre_vote, transfer=False)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for nid, pr in self.progress.items():
            if nid != self.id:
                pr.last_contact_ticks += 1
                pr.optimistic = False  # at most one tick: a silent peer is not sent the log again and again
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._check_quorum_active():
                # CheckQuorum (thesis 6.2): a leader cut off from a quorum steps down.
                self._become_follower(self.term, NO_NODE)
                return
        if self.transfer_target:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.cfg.election_ticks:
                self._abort_transfer()  # thesis 3.10: give up after an election timeout
        if self.role == Role.LEADER and self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat(b"")

    def _check_quorum_active(self) -> bool:
        active = {self.id}
        for nid, pr in self.progress.items():
            if nid == self.id:
                continue
            if pr.recent_active:
                active.add(nid)
            pr.recent_active = False
        return membership.has_quorum(active, self.config)

    # --- elections ------------------------------------------------------------------------------
    def campaign(self) -> None:
        if self._promotable() and self.role != Role.LEADER:
            self._campaign(pre_vote=self.cfg.pre_vote, transfer=False)

    def _campaign(self, *, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            term, vote_type = self.term + 1, MessageType.PRE_VOTE
        else:
            self._become_candidate()
            term, vote_type = self.term, MessageType.VOTE
        self._votes[self.id] = True
        if membership.has_quorum(self._granted(), self.config):
            # Single voter: won at once.
            if pre_vote:
                self._campaign(pre_vote=False, transfer=transfer)
            else:
                self._become_leader()
            return
        ctx = TRANSFER_CONTEXT if transfer else b""
        for nid in sorted(self.config.voters):
            if nid != self.id:
                self._send(
                    Message(
                        vote_type,
                        to=nid,
                        frm=self.id,
                        term=term,
                        index=self.log.last_index,
                        log_term=self.log.last_term,
                        context=ctx,
                    )
                )

    def _granted(self) -> list[NodeId]:
        return [nid for nid, ok in self._votes.items() if ok]

    def _rejected(self) -> list[NodeId]:
        return [nid for nid, ok in self._votes.items() if not ok]

    # --- inputs: messages -------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.to != self.id or m.frm == self.id or m.frm <= 0:
            return
        if m.term > self.term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                if m.context != TRANSFER_CONTEXT and self._in_lease():
                    # Thesis 4.2.3: ignore disruptive votes while a leader is known to be alive.
                    return
            if m.type == MessageType.PRE_VOTE or (m.type == MessageType.PRE_VOTE_RESP and not m.reject):
                pass  # PreVote never changes our term
            elif m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NO_NODE)
        elif m.term < self.term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
                self.cfg.check_quorum or self.cfg.pre_vote
            ):
                # Tell a stale leader about the newer term so it steps down.
                self._send(Message(MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term))
            elif m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
                # §5.1: a stale candidate learns the current term from the rejection.
                resp = MessageType.PRE_VOTE_RESP if m.type == MessageType.PRE_VOTE else MessageType.VOTE_RESP
                self._send(Message(resp, to=m.frm, frm=self.id, term=self.term, reject=True))
            return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
            return
        if self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        resp_type = MessageType.PRE_VOTE_RESP if m.type == MessageType.PRE_VOTE else MessageType.VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote == NO_NODE and self.leader_id == NO_NODE)
            or (m.type == MessageType.PRE_VOTE and m.term > self.term)
            or self.cfg.bug_double_vote
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp_type, to=m.frm, frm=self.id, term=m.term))
            if m.type == MessageType.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp_type, to=m.frm, frm=self.id, term=self.term, reject=True))

    def _step_candidate(self, m: Message) -> None:
        my_resp = MessageType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif m.type == my_resp:
            if m.frm not in self.config.voters:
                return
            self._votes.setdefault(m.frm, not m.reject)
            if membership.has_quorum(self._granted(), self.config):
                if self.role == Role.PRE_CANDIDATE:
                    self._campaign(pre_vote=False, transfer=False)
                else:
                    self._become_leader()
            elif membership.has_quorum(self._rejected(), self.config):
                self._become_follower(self.term, NO_NODE)
        elif m.type == MessageType.TIMEOUT_NOW:
            pass  # already campaigning

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MessageType.APPEND:
            self.election_elapsed = 0
            self.leader_id = m.frm
            self._handle_append(m)
        elif t == MessageType.HEARTBEAT:
            self.election_elapsed = 0
            self.leader_id = m.frm
            self.log.commit_to(min(m.commit, self.log.last_index))
            self._send(
                Message(
                    MessageType.HEARTBEAT_RESP,
                    to=m.frm,
                    frm=self.id,
                    term=self.term,
                    index=self.log.last_index,
                    context=m.context,
                )
            )
        elif t == MessageType.SNAPSHOT:
            self.election_elapsed = 0
            self.leader_id = m.frm
            self._handle_snapshot_chunk(m)
        elif t == MessageType.TIMEOUT_NOW:
            if self._promotable():
                # Thesis 3.10: the transfer target campaigns at once, skipping PreVote.
                self._campaign(pre_vote=False, transfer=True)
        elif t == MessageType.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.commit:
            self._send(
                Message(MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=self.log.commit)
            )
            return
        if self.log.match_term(m.index, m.log_term):
            last_new = m.index + len(m.entries)
            conflict = self.log.find_conflict(m.entries)
            if conflict:
                self._append_entries_to_log(m.entries[conflict - m.index - 1 :])
            self.log.commit_to(min(m.commit, last_new))
            self._send(
                Message(MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=last_new)
            )
            return
        hint = self.log.find_conflict_by_term(min(m.index, self.log.last_index), m.log_term)
        self._send(
            Message(
                MessageType.APPEND_RESP,
                to=m.frm,
                frm=self.id,
                term=self.term,
                index=m.index,
                reject=True,
                reject_hint=hint,
                log_term=self.log.term(hint) or 0,
            )
        )

    def _handle_snapshot_chunk(self, m: Message) -> None:
        meta = m.snapshot_meta
        if meta is None:
            return
        if meta.index <= self.log.commit:
            self._incoming_snapshot.discard()
            self._send(
                Message(MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=self.log.commit)
            )
            return
        got = self._incoming_snapshot.receive(
            m.term, meta, m.snapshot_offset, m.snapshot_chunk, m.snapshot_done
        )
        if got.snapshot is None:
            # Acknowledge what we hold: the leader continues (or resends) from there.
            self._send(
                Message(
                    MessageType.SNAPSHOT_RESP,
                    to=m.frm,
                    frm=self.id,
                    term=self.term,
                    index=meta.index,
                    snapshot_offset=got.held_bytes,
                )
            )
            return
        self._restore(got.snapshot)
        self._send(
            Message(MessageType.APPEND_RESP, to=m.frm, frm=self.id, term=self.term, index=self.log.last_index)
        )

    def _restore(self, snap: Snapshot) -> None:
        meta = snap.meta
        if self.log.match_term(meta.index, meta.term):
            # We already have the entry: just fast-forward the commit (etcd's behaviour).
            self.log.commit_to(meta.index)
            return
        self.log.restore(meta.index, meta.term)  # applied jumps once the driver restores the app
        self.snapshot = snap
        self._snapshot_config = meta.config
        self._pending_snapshot = snap
        self._set_config(meta.config)
        self.pending_conf_index = 0

    # --- leader ---------------------------------------------------------------------------
    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MessageType.READ_INDEX:
            self._leader_read_index(m.context, m.frm)
            return
        pr = self.progress.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        pr.last_contact_ticks = 0
        if t == MessageType.APPEND_RESP:
            self._handle_append_resp(m, pr)
        elif t == MessageType.HEARTBEAT_RESP:
            if pr.state == ProgressState.PROBE:
                pr.paused = False
            elif pr.state == ProgressState.REPLICATE and pr.match < self.log.last_index:
                lost_appends = m.index + 1 < pr.next
                stalled = pr.match == pr.heartbeat_match  # no progress for a whole heartbeat
                if lost_appends or stalled:
                    # Appends (or their acks) were lost: resend from the match point.
                    pr.become_probe()
            pr.heartbeat_match = pr.match
            if pr.match < self.log.last_index or pr.state == ProgressState.SNAPSHOT:
                self._send_append(m.frm, pr)
            if m.context:
                self._ack_read(m.frm, m.context)
        elif t == MessageType.SNAPSHOT_RESP:
            if pr.state != ProgressState.SNAPSHOT or pr.snapshot is None:
                return
            if m.index != pr.snapshot.meta.index:
                return
            pr.snapshot_offset = m.snapshot_offset
            pr.snapshot_acked = True
            self._send_snapshot_chunk(m.frm, pr)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        pr.optimistic = False  # the peer answered: plain probing from here on
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decrease(m.index, hint):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm, pr)
            return
        old_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            if old_paused and not pr.is_paused():
                self._send_append(m.frm, pr)
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.snapshot is not None:
            if pr.match >= pr.snapshot.meta.index:
                pr.become_probe()
                pr.become_replicate()
        if self._maybe_commit():
            self._commit_advanced()
        if self.role != Role.LEADER:
            return
        if m.frm == self.transfer_target and pr.match == self.log.last_index:
            self._send(Message(MessageType.TIMEOUT_NOW, to=m.frm, frm=self.id, term=self.term))
        if pr.next <= self.log.last_index:
            self._send_append(m.frm, pr)

    def _maybe_commit(self) -> bool:
        members = self.config.voters
        if self.cfg.bug_nonvoter_counts:
            members = self.config.members()
        matches = [
            self.log.stable_index if nid == self.id else self.progress[nid].match
            for nid in members
            if nid in self.progress
        ]
        n = membership.quorum_index(matches, self._quorum_size())
        if n <= self.log.commit:
            return False
        if self.log.term(n) != self.term and not self.cfg.bug_commit_old_term:
            return False  # paper 5.4.2: count replicas only for current-term entries
        self.log.commit_to(n)
        self._after_commit()
        return True

    def _after_commit(self) -> None:
        if self._reads.has_deferred and self.log.term(self.log.commit) == self.term:
            for r in self._reads.take_deferred():
                self._leader_read_index(r.context, r.requester)
        if self.pending_conf_index <= self.log.commit and self.id not in self.config.voters:
            # Thesis 4.2.2: a leader removed (or demoted) by a committed change steps down.
            self._become_follower(self.term, NO_NODE)

    def _append_as_leader(self, entries: list[Entry]) -> None:
        self._append_entries_to_log(entries)
        self._maybe_commit()
        self._needs_broadcast = True

    def _send_append(self, to: NodeId, pr: Progress, *, send_empty: bool = False) -> None:
        if pr.is_paused():
            return
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None or prev < self.log.offset:
            self._start_snapshot(to, pr)
            return
        entries = self.log.slice(
            pr.next, pr.next + self.cfg.max_entries_per_append, self.cfg.max_bytes_per_append
        )
        if not entries and not send_empty and not (pr.state == ProgressState.PROBE and pr.match < prev):
            return
        self._send(
            Message(
                MessageType.APPEND,
                to=to,
                frm=self.id,
                term=self.term,
                index=prev,
                log_term=prev_term,
                entries=tuple(entries),
                commit=self.log.commit,
            )
        )
        if entries:
            pr.sent(entries[-1].index)
        elif pr.state == ProgressState.PROBE:
            pr.paused = True

    def _start_snapshot(self, to: NodeId, pr: Progress) -> None:
        snap = self.snapshot
        if snap is None:
            raise InvariantError(f"peer {to} needs compacted entries but no snapshot exists")
        pr.become_snapshot(snap)
        self._send_snapshot_chunk(to, pr)

    def _send_snapshot_chunk(self, to: NodeId, pr: Progress) -> None:
        snap = pr.snapshot
        if snap is None:
            return
        off = pr.snapshot_offset
        if off > len(snap.data):
            off = pr.snapshot_offset = 0
        if off == len(snap.data) and off > 0:
            return  # all sent; waiting for the final append response
        chunk = snap.data[off : off + self.cfg.snapshot_chunk_bytes]
        self._send(
            Message(
                MessageType.SNAPSHOT,
                to=to,
                frm=self.id,
                term=self.term,
                snapshot_meta=snap.meta,
                snapshot_offset=off,
                snapshot_chunk=chunk,
                snapshot_done=off + len(chunk) >= len(snap.data),
            )
        )
        pr.snapshot_acked = False

    def _broadcast_heartbeat(self, context: bytes) -> None:
        self.commit_broadcast_pending = False  # heartbeats carry the commit index
        for nid, pr in sorted(self.progress.items()):
            if nid == self.id:
                continue
            if pr.state == ProgressState.SNAPSHOT and not pr.snapshot_acked and not context:
                self._send_snapshot_chunk(nid, pr)  # retransmit the unacknowledged chunk
            self._send(
                Message(
                    MessageType.HEARTBEAT,
                    to=nid,
                    frm=self.id,
                    term=self.term,
                    commit=min(pr.match, self.log.commit),
                    context=context,
                )
            )

    def _commit_advanced(self) -> None:
        if self.cfg.lazy_commit_broadcast:
            self.commit_broadcast_pending = True
        else:
            self._needs_broadcast = True

    def flush_commit_broadcast(self) -> None:
        """Send a pending commit-index advance now (see CoreConfig.lazy_commit_broadcast)."""
        if self.commit_broadcast_pending:
            self.commit_broadcast_pending = False
            self._needs_broadcast = True

    def _flush_broadcast(self) -> None:
        if not self._needs_broadcast:
            return
        self._needs_broadcast = False
        if self.role != Role.LEADER:
            return
        self.commit_broadcast_pending = False  # every append below carries the commit index
        for nid, pr in sorted(self.progress.items()):
            if nid != self.id:
                self._send_append(nid, pr, send_empty=pr.match >= self.log.last_index)

    # --- inputs: client requests ----------------------------------------------------------
    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeaderError(self.leader_id)
        if self.transfer_target:
            raise ProposalDroppedError(f"leadership transfer to {self.transfer_target} in progress")
        if self.id not in self.config.voters:
            raise ProposalDroppedError("leader is being removed from the configuration")

    def propose(self, data: bytes) -> int:
        self._check_can_propose()
        index = self.log.last_index + 1
        self._append_as_leader([Entry(self.term, index, EntryType.NORMAL, data)])
        return index

    def propose_many(self, datas: Sequence[bytes]) -> int:
        """Propose several commands as one batch; returns the index of the first."""
        self._check_can_propose()
        first = self.log.last_index + 1
        entries = [Entry(self.term, first + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
        self._append_as_leader(entries)
        return first

    def propose_conf_change(self, cc: ConfChange) -> int:
        self._check_can_propose()
        if self.pending_conf_index > self.log.commit:
            raise ConfChangeError("another membership change is still uncommitted")
        if self.log.term(self.log.commit) != self.term:
            # Thesis 4.1 (bug fix 2015): no change before an entry of this term has committed.
            raise ConfChangeError("leader has not committed an entry in its term yet")
        membership.validate(self.config, cc)
        index = self.log.last_index + 1
        data = encode_conf_change(cc)
        self._append_as_leader([Entry(self.term, index, EntryType.CONF_CHANGE, data)])
        return index

    def transfer_leadership(self, target: NodeId) -> None:
        if self.role != Role.LEADER:
            raise NotLeaderError(self.leader_id)
        if target == self.id:
            return
        if target not in self.config.voters:
            raise ConfChangeError(f"transfer target {target} is not a voter")
        if self.transfer_target == target:
            return
        self._abort_transfer()
        self.transfer_target = target
        self._transfer_elapsed = 0
        pr = self.progress[target]
        if pr.state == ProgressState.REPLICATE and pr.match < self.log.last_index:
            pr.become_probe()  # catch the target up from what it is known to have
        if pr.match == self.log.last_index:
            self._send(Message(MessageType.TIMEOUT_NOW, to=target, frm=self.id, term=self.term))
        else:
            self._send_append(target, pr)

    def _abort_transfer(self) -> None:
        self.transfer_target = NO_NODE

    def read_index(self, context: bytes) -> None:
        if self.role == Role.LEADER:
            self._leader_read_index(context, self.id)
        elif self.leader_id != NO_NODE:
            self._send(
                Message(
                    MessageType.READ_INDEX, to=self.leader_id, frm=self.id, term=self.term, context=context
                )
            )
        else:
            raise NotLeaderError(NO_NODE)

    def _leader_read_index(self, context: bytes, requester: NodeId) -> None:
        if self.log.term(self.log.commit) != self.term:
            # Thesis 6.4 step 1: wait until an entry of this term is committed.
            self._reads.defer(context, requester)
            return
        req = ReadRequest(self.log.commit, context, requester, {self.id})
        if membership.has_quorum(req.acks, self.config):
            self._answer_read(req)
            return
        self._reads.push(req)
        self._broadcast_heartbeat(context)

    def _ack_read(self, frm: NodeId, context: bytes) -> None:
        if frm not in self.config.voters and not self.cfg.bug_nonvoter_counts:
            return
        counted = self.config.members() if self.cfg.bug_nonvoter_counts else self.config.voters
        # Reads are answered in order: an ack for a later read confirms earlier ones.
        for r in self._reads.ack(frm, context, counted, self._quorum_size()):
            self._answer_read(r)

    def _answer_read(self, req: ReadRequest) -> None:
        if req.requester == self.id:
            self._read_states.append(ReadState(req.index, req.context))
        else:
            self._send(
                Message(
                    MessageType.READ_INDEX_RESP,
                    to=req.requester,
                    frm=self.id,
                    term=self.term,
                    index=req.index,
                    context=req.context,
                )
            )

    def set_campaign_suppressed(self, flag: bool) -> None:
        self.campaign_suppressed = flag

    def fast_forward_election(self) -> None:
        """At process start, skip all but one tick of the base election timeout (etcd's
        initial-election-tick-advance): the randomized part still spreads the nodes, so a cluster
        started cold elects in a fraction of a second instead of one to two timeouts. Only with
        PreVote: a restarted node that campaigns early while a leader is alive is then refused by
        the peers that hear it, without a term change."""
        if self.cfg.pre_vote and self.role == Role.FOLLOWER and self.leader_id == NO_NODE:
            self.election_elapsed = max(self.election_elapsed, self.cfg.election_ticks - 1)

    def report_leader_connection_lost(self, node_id: NodeId) -> None:
        """The transport saw this node's leader close its connection (the process exited).

        A follower then stops waiting out the whole election timeout: it forgets the leader and
        campaigns after a short delay. The survivors go in turn, a heartbeat apart, in node-id
        order among the remaining voters (plus a jitter under half a heartbeat): all of them see
        the close at the same moment, and with random delays two of them often campaigned within
        one election round trip, split the vote and fell back to a full election timeout (1-2 s
        under load). If the first cannot win (its log is behind), the next one tries a heartbeat
        later. Safety is untouched: PreVote still needs a quorum, and peers that still hear a live
        leader refuse it, so a spurious close costs one failed PreVote round, not a term change."""
        if self.role != Role.FOLLOWER or node_id == NO_NODE or self.leader_id != node_id:
            return
        if not self._promotable() or self.campaign_suppressed:
            self.leader_id = NO_NODE
            return
        self.leader_id = NO_NODE
        hb = max(1, self.cfg.heartbeat_ticks)
        order = sorted(v for v in self.config.voters if v != node_id)
        rank = order.index(self.id) if self.id in order else len(order)
        delay = 1 + rank * hb + self._rng.randrange(0, max(1, hb // 2))
        self.election_elapsed = max(self.election_elapsed, self._randomized_timeout - delay)

    def report_unreachable(self, node_id: NodeId) -> None:
        if self.role != Role.LEADER:
            return
        pr = self.progress.get(node_id)
        if pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def compact(self, index: int, data: bytes) -> None:
        if index <= (self.snapshot.meta.index if self.snapshot else 0):
            return
        if index > self.log.applied:
            raise InvariantError(f"snapshot at {index} beyond applied {self.log.applied}")
        term = self.log.term(index)
        if term is None:
            raise InvariantError(f"snapshot index {index} not in the log")
        meta = SnapshotMeta(index, term, self._config_at(index))
        self.snapshot = Snapshot(meta, data)
        self._snapshot_config = meta.config
        self.log.compact_to(max(0, index - self.cfg.trailing_logs))

    # --- Ready ----------------------------------------------------------------------------
    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.commit)

    def has_ready(self) -> bool:
        self._flush_broadcast()
        if self._msgs or self._read_states or self._pending_snapshot is not None:
            return True
        log = self.log
        if log.stable_index < log.last_index or log.has_next_committed():
            return True
        # Field by field: this runs after every input, and most calls find nothing to do.
        hard = self._prev_hard
        if self.term != hard.term or self.vote != hard.vote or log.commit != hard.commit:
            return True
        soft = self._prev_soft
        return self.leader_id != soft.leader_id or self.role != soft.role

    def ready(self) -> Ready:
        self._flush_broadcast()
        prev_soft = self._prev_soft
        soft = (
            None
            if self.leader_id == prev_soft.leader_id and self.role == prev_soft.role
            else SoftState(self.leader_id, self.role)
        )
        hard = self._hard_state()
        entries = tuple(self.log.unstable_entries())
        hard_changed = hard != self._prev_hard
        must_sync = (
            bool(entries)
            or self._pending_snapshot is not None
            or (hard_changed and (hard.term != self._prev_hard.term or hard.vote != self._prev_hard.vote))
        )
        rd = Ready(
            soft_state=soft,
            hard_state=hard if hard_changed else None,
            snapshot=self._pending_snapshot,
            entries=entries,
            messages=tuple(self._msgs),
            committed_entries=tuple(self.log.next_committed()),
            read_states=tuple(self._read_states),
            must_sync=must_sync,
        )
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            if self._pending_snapshot is rd.snapshot:
                self._pending_snapshot = None
            self.log.applied = max(self.log.applied, rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
            # Thesis 10.2.1: the leader's own entries count toward commit once durable, so the
            # driver may send appends before its local fsync completes.
            if self.role == Role.LEADER and self._maybe_commit():
                self._commit_advanced()
        if rd.committed_entries:
            self.log.applied = max(self.log.applied, rd.committed_entries[-1].index)
