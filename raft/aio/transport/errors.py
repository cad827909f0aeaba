"""The cluster transport's errors, under one root: ``TransportError``.

Callers catch ``RpcError`` (from ``ClusterTransport.rpc``), ``JoinError`` (from ``join_call``)
and ``CertIdentityError`` (from the identity helpers). ``_Malformed`` (a peer's frame is not what
the protocol allows: its connection is closed and counted) and ``_DialError`` (an outgoing
connection could not be opened and authenticated) never leave the package.
"""

from __future__ import annotations


class TransportError(Exception):
    """Root of the transport's errors."""


class CertIdentityError(TransportError):
    """A certificate that is not a well-formed quorumd node certificate."""


class RpcError(TransportError):
    pass


class RpcUnreachable(RpcError):
    """The member could not be connected to, is not pinned, or the connection was lost."""


class RpcTimeout(RpcError):
    """No answer within the caller's timeout."""


class RpcRemoteError(RpcError):
    """The remote handler raised, or the method is unknown there; ``str(exc)`` is its message."""


class JoinError(TransportError):
    """The join call failed; subclasses say how."""


class JoinPinMismatch(JoinError):
    """The server's certificate is not the one pinned by the join token: nothing was sent."""


class JoinUnreachable(JoinError):
    pass


class JoinTimeout(JoinError):
    pass


class JoinRemoteError(JoinError):
    """The server refused the join request or its handler failed."""


class _Malformed(Exception):
    pass


class _DialError(Exception):
    pass
