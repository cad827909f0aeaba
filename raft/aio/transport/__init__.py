"""The cluster transport: one TLS 1.3 port per node, multiplexed by ALPN into three channels.

- ``quorumd-raft/1``: Raft frames, one persistent connection per peer and direction; ``send``
  never blocks and drops (counted) when a peer's queue is full.
- ``quorumd-rpc/1``: request/response calls between members, multiplexed over one connection per
  peer by request id.
- ``quorumd-join/1``: the join bootstrap of a node that is not a member yet, pinned by the
  fingerprint in its join token.

Members trust each other by pinned certificate fingerprint, not through a CA: TLS 1.3
authenticates the server and encrypts, and the client proves its certificate inside the channel.
A peer that is not pinned, or whose certificate's embedded identity does not match its pin, is
refused, logged (``peer_refused``) and counted; a malformed frame closes only its connection.

Modules, from the bottom up (each docstring says what it owns):

- ``errors``: the error hierarchy, rooted at ``TransportError``.
- ``identity``: the certificate identity encoding, fingerprints, the proof message, and loading
  a node's key and certificate (what ``quorumd.node.pki`` builds on).
- ``framing``: frame kinds, size limits and decoding; ``host:port`` addresses.
- ``stats``: ``TransportStats``, the counters the metrics layer exports.
- ``connection``: ``_Conn``, one buffered length-prefixed frame stream.
- ``tls``: the TLS contexts, why authentication is not plain mutual TLS, and the client side of
  the in-band proof.
- ``peers``: pins, addresses and member connections; dialing, checking and refusing peers.
- ``raft_channel``, ``rpc``, ``join``: the three channels (``join_call`` is the join client).
- ``listener``: accepting and authenticating inbound connections, handed to their channel.
- ``cluster``: ``ClusterTransport``, the composition of the above and the public API.

Every name other code imports from ``quorumd.raft.aio.transport`` is re-exported here.
"""

from __future__ import annotations

from .cluster import ClusterTransport
from .connection import FrameHandler
from .errors import (
    CertIdentityError,
    JoinError,
    JoinPinMismatch,
    JoinRemoteError,
    JoinTimeout,
    JoinUnreachable,
    RpcError,
    RpcRemoteError,
    RpcTimeout,
    RpcUnreachable,
    TransportError,
)
from .framing import MAX_AUTH_FRAME_BYTES, MAX_FRAME_BYTES, MAX_JOIN_FRAME_BYTES, FrameKind, split_host_port
from .identity import (
    MAX_NODE_ID,
    NONCE_BYTES,
    cert_fingerprint,
    cert_identity,
    identity_uri,
    validate_identity,
)
from .join import (
    JOIN_REQUEST_SECONDS,
    MAX_JOIN_CONNECTIONS,
    MAX_JOIN_CONNECTIONS_PER_SOURCE,
    JoinHandler,
    join_call,
)
from .listener import MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_SOURCE
from .peers import UNPIN_GRACE_SECONDS
from .rpc import MAX_RPC_INFLIGHT_PER_CONNECTION, RPC_SWEEP_SECONDS, RpcHandler
from .stats import TransportStats
from .tls import ALPN_JOIN, ALPN_RAFT, ALPN_RPC, CHANNELS

__all__ = [
    "ALPN_JOIN",
    "ALPN_RAFT",
    "ALPN_RPC",
    "CHANNELS",
    "JOIN_REQUEST_SECONDS",
    "MAX_AUTH_FRAME_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_JOIN_CONNECTIONS",
    "MAX_JOIN_CONNECTIONS_PER_SOURCE",
    "MAX_JOIN_FRAME_BYTES",
    "MAX_NODE_ID",
    "MAX_PENDING_HANDSHAKES",
    "MAX_PENDING_HANDSHAKES_PER_SOURCE",
    "MAX_RPC_INFLIGHT_PER_CONNECTION",
    "NONCE_BYTES",
    "RPC_SWEEP_SECONDS",
    "UNPIN_GRACE_SECONDS",
    "CertIdentityError",
    "ClusterTransport",
    "FrameHandler",
    "FrameKind",
    "JoinError",
    "JoinHandler",
    "JoinPinMismatch",
    "JoinRemoteError",
    "JoinTimeout",
    "JoinUnreachable",
    "RpcError",
    "RpcHandler",
    "RpcRemoteError",
    "RpcTimeout",
    "RpcUnreachable",
    "TransportError",
    "TransportStats",
    "cert_fingerprint",
    "cert_identity",
    "identity_uri",
    "join_call",
    "split_host_port",
    "validate_identity",
]
