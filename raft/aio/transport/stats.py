"""The transport's plain counters (``TransportStats``), exported by the daemon's metrics layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TransportStats:
    """Plain counters read by the metrics layer (mutable on purpose; only the loop writes).

    ``frames_*`` count Raft frames. ``refused_connections`` keys: handshake (TLS failed: not
    1.3, not TLS), handshake_aborted (closed before a hello: TCP probes; logged at DEBUG only),
    no_proof (closed after the handshake without proving its certificate: a client that refused
    our certificate, such as a joiner pinned to another one; logged at INFO), timeout, alpn,
    bad_proof, not_pinned, wrong_peer, bad_identity, identity_mismatch, no_certificate,
    join_unavailable (no join handler, or every join slot busy with a request), join_source_limit
    (every slot of that source busy), join_evicted (an idle join connection displaced by a newer
    one), join_timeout (no join request in time), overload (256 handshakes pending), overload_source
    (32 pending from that source).
    """

    frames_sent: int = 0
    frames_received: int = 0
    frames_dropped: int = 0
    malformed_frames: int = 0
    connections_accepted: int = 0
    connections_dialed: int = 0
    rpc_calls: int = 0
    rpc_failures: int = 0
    join_requests: int = 0
    refused_connections: dict[str, int] = field(default_factory=dict)

    def count_refused(self, reason: str) -> None:
        self.refused_connections[reason] = self.refused_connections.get(reason, 0) + 1
