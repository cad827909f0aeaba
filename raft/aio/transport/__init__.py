"""ClusterTransport: the one cluster port (TLS 1.3 only), multiplexed by ALPN into three channels.

- ``quorumd-raft/1``: Raft frames, one direction per connection. Outgoing: one persistent
  connection per peer, dialed lazily on the first ``send`` and redialed with capped exponential
  backoff. ``send`` never blocks: it appends to a bounded per-peer queue (dropping and counting
  when full; Raft tolerates loss) and the peer's writer task writes everything queued in one
  ``write`` then drains once. Incoming frames go to ``on_raft_frame(from_node_id, frame)`` from
  ``buffer_updated``: no task per frame.
- ``quorumd-rpc/1``: request/response between members, concurrent calls multiplexed over one
  connection per peer by request id; server handlers run as tasks owned by their connection.
- ``quorumd-join/1``: the join bootstrap. The client is not a member yet: it pins the server by
  the fingerprint carried in its join token, proves it holds the key of the (any) self-signed
  certificate it presents, and the server hands (payload, certificate DER) to the join handler.
  Nothing else happens on this channel, whatever certificate the client presents.

Authentication, and why it is not plain mutual TLS. Python's ``ssl`` has no verify callback, so
an OpenSSL-verified client certificate must chain to a trust anchor loaded into the context. That
does not fit here: the pins are fingerprints (a joiner knows only the fingerprints the leader sent
it, not the certificates), and the join channel shares the port and the server context yet must
accept any self-signed client certificate. So TLS 1.3 authenticates the server and encrypts; the
client authenticates inside the channel:

1. TLS 1.3 handshake (min = max = 1.3, tickets off, no hostname check: identity is the pin). The
   client verifies nothing through OpenSSL (CERT_NONE) but the handshake still checks the server's
   CertificateVerify, so the certificate the client reads afterwards is proven; the client then
   requires its fingerprint to be the pin of the node it dialed (or the join token's pin) and its
   embedded identity to match, and refuses otherwise before sending anything.
2. The server sends a fresh 32-byte nonce (``CHALLENGE``). The client answers ``PROOF``: its
   certificate DER and an ECDSA-SHA256 signature over ``"quorumd-auth/1" | ALPN | nonce | server
   fingerprint``. The nonce rules out replay and the server fingerprint rules out relaying a proof
   through another server (a client only signs for servers it pinned). On raft/rpc the server
   then requires the certificate's fingerprint to be pinned and its embedded identity (node id,
   cluster id) to match that pin, and answers ``ACCEPT``; otherwise it closes the connection,
   logs ``peer_refused`` at WARNING and counts the reason.

The certificate identity encoding (SAN URI ``quorumd://<cluster>/node/<id>`` agreeing with
``CN=quorumd-node-<id>`` and ``O=<cluster>``) is defined here because it is what the cluster
protocol authenticates; ``quorumd.node.pki`` mints certificates with it. Contexts never hold pins,
so ``update_pins`` rebuilds nothing: it swaps the maps and closes every live connection (both
directions) of a member whose pin was removed or changed; later connections from it are refused
by the pin check, and every frame is also checked against the current pin before delivery.

Framing: 4-byte big-endian length + payload, at most 32 MiB (64 KiB until authenticated, 1 MiB on
the join channel). Raft frames are raw; every other frame is a msgpack list ``[kind, ...]`` with
``FrameKind`` values that are never renumbered (RPC: ``[kind, request id, method, payload]``).
A malformed frame closes only its connection and is counted in ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import re
import secrets
import socket
import ssl
import struct
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ...codec import packb

log = logging.getLogger(__name__)

ALPN_RAFT = "quorumd-raft/1"
UNPIN_GRACE_SECONDS = 2.0  # an unpinned member's in-flight requests may still be answered this long
ALPN_RPC = "quorumd-rpc/1"
ALPN_JOIN = "quorumd-join/1"
CHANNELS = (ALPN_RAFT, ALPN_RPC, ALPN_JOIN)

MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_AUTH_FRAME_BYTES = 64 * 1024
MAX_JOIN_FRAME_BYTES = 1024 * 1024
NONCE_BYTES = 32
MAX_NODE_ID = 2**31 - 1
MAX_PENDING_HANDSHAKES = 256
MAX_JOIN_CONNECTIONS = 16
MAX_RPC_INFLIGHT_PER_CONNECTION = 256
RPC_SWEEP_SECONDS = 0.05  # how often pending RPC deadlines are checked (both sides)

_HEADER = struct.Struct(">I")
_READ_BUFFER_BYTES = 64 * 1024  # a connection's read buffer (grown for a larger frame)
_MIN_READ_BYTES = 16 * 1024  # grow the buffer when less than this is free for the next read
_PROOF_CONTEXT = b"quorumd-auth/1\x00"
_CLUSTER_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_CLUSTER_ID_RE = re.compile(_CLUSTER_ID)
_URI_RE = re.compile(rf"quorumd://({_CLUSTER_ID})/node/([1-9][0-9]{{0,9}})")
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")


class FrameKind(IntEnum):
    CHALLENGE = 1
    PROOF = 2
    ACCEPT = 3
    RPC_REQUEST = 10
    RPC_RESPONSE = 11
    RPC_ERROR = 12
    JOIN_REQUEST = 20
    JOIN_RESPONSE = 21
    JOIN_ERROR = 22


# --- errors ----------------------------------------------------------------------------------
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


# --- certificate identity --------------------------------------------------------------------
def validate_identity(node_id: int, cluster_id: str) -> None:
    """CertIdentityError unless (node_id, cluster_id) can be embedded in a node certificate."""
    if type(node_id) is not int or not 1 <= node_id <= MAX_NODE_ID:
        raise CertIdentityError(f"node id out of range: {node_id!r}")
    if type(cluster_id) is not str or not _CLUSTER_ID_RE.fullmatch(cluster_id):
        raise CertIdentityError("cluster id must be 1..64 characters of [A-Za-z0-9._-]")


def identity_uri(node_id: int, cluster_id: str) -> str:
    """The SAN URI naming a node: ``quorumd://<cluster id>/node/<node id>``."""
    validate_identity(node_id, cluster_id)
    return f"quorumd://{cluster_id}/node/{node_id}"


def cert_fingerprint(cert_der: bytes) -> str:
    """``sha256:<lowercase hex of sha256(DER)>``."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def _only(values: Sequence[Any], what: str) -> Any:
    if len(values) != 1:
        raise CertIdentityError(f"expected exactly one {what}, found {len(values)}")
    return values[0]


def cert_identity(cert_der: bytes) -> tuple[int, str]:
    """(node id, cluster id) of a node certificate; CertIdentityError on anything unexpected."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise CertIdentityError(f"not a DER certificate: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("quorumd:")
        ]
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        org = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        public_key = cert.public_key()
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CertIdentityError(f"certificate without a readable identity: {exc}") from exc
    m = _URI_RE.fullmatch(_only(uris, "quorumd SAN URI"))
    if m is None:
        raise CertIdentityError("malformed quorumd SAN URI")
    cluster_id, node_id = m.group(1), int(m.group(2))
    if not 1 <= node_id <= MAX_NODE_ID:
        raise CertIdentityError("node id out of range")
    if _only(cn, "common name") != f"quorumd-node-{node_id}" or _only(org, "organization") != cluster_id:
        raise CertIdentityError("subject does not agree with the SAN URI")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CertIdentityError("node certificates use ECDSA P-256 keys")
    return node_id, cluster_id


def _proof_message(alpn: str, nonce: bytes, server_fingerprint: str) -> bytes:
    return _PROOF_CONTEXT + alpn.encode() + b"\x00" + nonce + server_fingerprint.encode()


def _verify_proof(cert_der: bytes, signature: bytes, message: bytes) -> None:
    """Raise _Malformed unless ``signature`` is the certificate key's ECDSA-SHA256 over ``message``."""
    try:
        key = x509.load_der_x509_certificate(cert_der).public_key()
    except ValueError as exc:
        raise _Malformed("unreadable certificate") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _Malformed("certificate key is not ECDSA")
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _Malformed("bad signature") from exc


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TransportError("unreadable private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TransportError("node keys must be ECDSA")
    return key


def _load_cert_der(cert_pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise TransportError("unreadable certificate") from exc


# --- framing helpers -------------------------------------------------------------------------
def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {address!r}")
    return host, port


def _unpack(frame: bytes, kinds: tuple[FrameKind, ...], length: int) -> list[Any]:
    """A msgpack list of ``length`` items whose first is one of ``kinds`` (else _Malformed)."""
    try:
        obj = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as exc:  # peer bytes: any decoder complaint is a malformed frame
        raise _Malformed(f"undecodable frame: {type(exc).__name__}") from exc
    if not isinstance(obj, list) or len(obj) != length or type(obj[0]) is not int or obj[0] not in kinds:
        raise _Malformed("unexpected frame")
    return obj


# --- counters --------------------------------------------------------------------------------
@dataclass(slots=True)
class TransportStats:
    """Plain counters read by the metrics layer (mutable on purpose; only the loop writes).

    ``frames_*`` count Raft frames. ``refused_connections`` keys: handshake (TLS failed: not
    1.3, not TLS), handshake_aborted (closed before a hello: TCP probes; logged at DEBUG only),
    no_proof (closed after the handshake without proving its certificate: a client that refused
    our certificate, such as a joiner pinned to another one; logged at INFO), timeout, alpn,
    bad_proof, not_pinned, wrong_peer, bad_identity, identity_mismatch, no_certificate,
    join_unavailable, overload.
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


# --- one framed connection -------------------------------------------------------------------
FrameHandler = Callable[["_Conn", bytes], None]


class _Conn(asyncio.BufferedProtocol):
    """A length-prefixed frame stream over one (TLS) transport.

    Frames are dispatched from ``buffer_updated`` to a handler, or queued for ``read_frame``
    (the inbox, used during authentication and on the join channel).

    A buffered protocol: the event loop decrypts straight into this connection's read buffer.
    With a plain ``Protocol`` uvloop's TLS layer allocates a 256 KiB object per read: an mmap,
    mremap and munmap each time until the allocator raises its mmap threshold (a two-process
    TLS ping-pong on this machine: 104 us round trip as a ``Protocol``, 44 us buffered).
    The buffer grows to hold a whole frame when one is larger than a read (bounded by
    ``max_frame``) and shrinks back once it is consumed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: TransportStats | None, channel: str) -> None:
        self.loop = loop
        self.stats = stats
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.node_id = 0
        self.fingerprint = ""
        self.join_cert_der = b""
        self.max_frame = MAX_AUTH_FRAME_BYTES
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_lost: Callable[[_Conn], None] | None = None
        self.rpc_pending: dict[int, asyncio.Future[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._buf = bytearray(_READ_BUFFER_BYTES)
        self._len = 0  # bytes received and not yet parsed, at the start of _buf
        self._handler: FrameHandler | None = None
        self._inbox: deque[bytes] | None = None
        self._inbox_waiter: asyncio.Future[None] | None = None
        self.paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"

    def get_buffer(self, sizehint: int) -> memoryview:
        buf, used = self._buf, self._len
        missing = 0  # of the frame at the head of the buffer, when its header is in
        if used >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, 0)
            if size <= self.max_frame:
                missing = _HEADER.size + size - used
        if len(buf) - used < max(missing, _MIN_READ_BYTES):
            # A new buffer rather than a resize: the loop may still hold a view of the old one.
            grown = bytearray(used + max(missing, _READ_BUFFER_BYTES))
            grown[:used] = memoryview(buf)[:used]
            self._buf = buf = grown
        return memoryview(buf)[used:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.lost:
            return
        self._len += nbytes
        if self._handler is not None or self._inbox is not None:
            self._parse()
        elif self._len > self.max_frame + _HEADER.size:
            self.malformed("unauthenticated data over limit")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._buf, self._len = bytearray(), 0
        if not self.closed.done():
            self.closed.set_result(None)
        for waiter in (self._inbox_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        pending, self.rpc_pending = self.rpc_pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RpcUnreachable("connection lost"))
        for task in self.tasks:
            task.cancel()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # reading
    def _parse(self) -> None:
        buf = self._buf
        end = self._len
        if end > _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, 0)
            if end == _HEADER.size + size and size <= self.max_frame:
                # exactly one whole frame, the usual case for a request or an answer
                frame = bytes(memoryview(buf)[_HEADER.size : end])
                self._len = 0
                if len(buf) > _READ_BUFFER_BYTES:
                    self._buf = bytearray(_READ_BUFFER_BYTES)
                self._deliver(frame)
                return
        off = 0
        frames: list[bytes] = []
        with memoryview(buf) as view:
            while end - off >= _HEADER.size:
                (size,) = _HEADER.unpack_from(view, off)
                if size > self.max_frame:
                    frames.clear()
                    off = -1
                    break
                stop = off + _HEADER.size + size
                if stop > end:
                    break
                frames.append(bytes(view[off + _HEADER.size : stop]))
                off = stop
        if off < 0:
            self.malformed("frame length over limit")
            return
        if off:
            rest = end - off
            if len(buf) > _READ_BUFFER_BYTES and rest <= _READ_BUFFER_BYTES // 2:
                self._buf = bytearray(_READ_BUFFER_BYTES)  # a large frame has gone: give it back
            if rest:
                self._buf[:rest] = buf[off:end]  # same length: no resize under the loop's view
            self._len = rest
        for frame in frames:
            if self.lost:
                return
            self._deliver(frame)

    def _deliver(self, frame: bytes) -> None:
        if self._handler is not None:
            self._handler(self, frame)
        elif self._inbox is not None:
            self._inbox.append(frame)
            if self._inbox_waiter is not None and not self._inbox_waiter.done():
                self._inbox_waiter.set_result(None)

    def use_inbox(self) -> None:
        self._inbox = deque()
        self._parse()

    def use_handler(self, handler: FrameHandler) -> None:
        """Dispatch frames to ``handler`` from now on, starting with any already queued."""
        queued, self._inbox = self._inbox, None
        self._handler = handler
        while queued and not self.lost:
            handler(self, queued.popleft())
        if not self.lost:
            self._parse()

    async def read_frame(self) -> bytes:
        """The next inbox frame; ConnectionResetError once the connection is gone."""
        assert self._inbox is not None
        while not self._inbox:
            if self.lost:
                raise ConnectionResetError("connection closed by peer")
            self._inbox_waiter = self.loop.create_future()
            await self._inbox_waiter
        return self._inbox.popleft()

    # writing
    def write_frames(self, frames: Sequence[bytes]) -> bool:
        t = self.transport
        if self.lost or t is None or t.is_closing():
            return False
        if len(frames) == 1:
            frame = frames[0]
            t.write(_HEADER.pack(len(frame)) + frame)
            return True
        parts: list[bytes] = []
        for frame in frames:
            parts.append(_HEADER.pack(len(frame)))
            parts.append(frame)
        t.write(b"".join(parts))
        return True

    async def drain(self) -> None:
        while self.paused and not self.lost:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
        if self.lost:
            raise ConnectionResetError("connection lost")

    def malformed(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.malformed_frames += 1
        log.warning(
            "malformed_frame channel=%s peer=%s node=%d reason=%s",
            self.channel,
            self.peer,
            self.node_id,
            reason,
        )
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()


# --- TLS contexts ----------------------------------------------------------------------------
def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` reads only files: feed it through pipes so the key never touches disk
    (a private temporary directory where /dev/fd does not exist)."""
    if os.path.isdir("/dev/fd") and max(len(cert_pem), len(key_pem)) < 60_000:
        fds: list[int] = []
        try:
            paths = []
            for data in (cert_pem, key_pem):
                r, w = os.pipe()
                fds += [r, w]
                os.write(w, data)  # fits in the pipe buffer: never blocks
                os.close(w)
                fds.remove(w)
                paths.append(f"/dev/fd/{r}")
            ctx.load_cert_chain(paths[0], paths[1])
            return
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="quorumd-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(cert_path), str(key_path))


def _server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE  # clients prove their certificate in-band (module docstring)
    ctx.num_tickets = 0  # no resumption: every connection runs the full handshake and proof
    ctx.set_alpn_protocols(list(CHANNELS))
    _load_cert_chain(ctx, cert_pem, key_pem)
    return ctx


def _client_context(alpn: str) -> ssl.SSLContext:
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is checked on the proven certificate after the handshake
    ctx.set_alpn_protocols([alpn])
    return ctx


def _tls_facts(conn: _Conn) -> tuple[str | None, bytes | None]:
    """(selected ALPN, peer certificate DER) of an established TLS connection."""
    assert conn.transport is not None
    obj = conn.transport.get_extra_info("ssl_object")
    if obj is None or obj.version() != "TLSv1.3":
        return None, None
    return obj.selected_alpn_protocol(), obj.getpeercert(binary_form=True)


async def _client_prove(
    conn: _Conn, alpn: str, server_fp: str, cert_der: bytes, key: ec.EllipticCurvePrivateKey
) -> None:
    """Client side of the in-band proof; ConnectionResetError when the server refuses us."""
    conn.use_inbox()
    try:
        _, nonce = _unpack(await conn.read_frame(), (FrameKind.CHALLENGE,), 2)
        if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
            raise _Malformed("bad challenge")
        signature = key.sign(_proof_message(alpn, nonce, server_fp), ec.ECDSA(hashes.SHA256()))
        conn.write_frames([packb([FrameKind.PROOF, cert_der, signature])])
        _unpack(await conn.read_frame(), (FrameKind.ACCEPT,), 1)
    except _Malformed as exc:
        conn.malformed(str(exc))
        raise ConnectionResetError("malformed authentication frame") from exc


# --- per-peer outgoing state -----------------------------------------------------------------
class _RaftPeer:
    __slots__ = ("conn", "failing", "frames", "node_id", "queued_bytes", "redial", "task", "wakeup")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.frames: list[bytes] = []
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.redial = asyncio.Event()  # the peer reached us: stop backing off, dial it now
        self.conn: _Conn | None = None
        self.task: asyncio.Task[None] | None = None
        self.failing = False

    def on_conn_closed(self, _closed: asyncio.Future[None]) -> None:
        self.wakeup.set()


class _RpcPeer:
    __slots__ = ("conn", "lock")

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.lock = asyncio.Lock()


RpcHandler = Callable[[int, bytes], Awaitable[bytes]]
JoinHandler = Callable[[bytes, bytes], Awaitable[bytes]]


class ClusterTransport:
    """The cluster port of one node: Raft frames, member RPCs and the join bootstrap."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        cert_pem: bytes,
        key_pem: bytes,
        pins: Mapping[int, str],
        addresses: Mapping[int, str],
        on_raft_frame: Callable[[int, bytes], None],
        *,
        connect_timeout_seconds: float = 5.0,
        write_timeout_seconds: float = 10.0,
        rpc_handler_timeout_seconds: float = 120.0,
        join_handler_timeout_seconds: float = 60.0,
        raft_queue_frames: int = 4096,
        raft_queue_bytes: int = 64 * 1024 * 1024,
        backoff_min_seconds: float = 0.05,
        backoff_max_seconds: float = 2.0,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._cert_der = _load_cert_der(cert_pem)
        self._key = _load_key(key_pem)
        if cert_identity(self._cert_der) != (node_id, cluster_id):
            raise TransportError("own certificate does not carry this node's identity")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if self._key.public_key().public_bytes(*spki) != x509.load_der_x509_certificate(
            self._cert_der
        ).public_key().public_bytes(*spki):
            raise TransportError("private key does not match the certificate")
        self.fingerprint = cert_fingerprint(self._cert_der)
        self._server_ctx = _server_context(cert_pem, key_pem)
        self._client_ctx = {alpn: _client_context(alpn) for alpn in (ALPN_RAFT, ALPN_RPC)}
        self._on_raft_frame = on_raft_frame
        self._connect_timeout = connect_timeout_seconds
        self._write_timeout = write_timeout_seconds
        self._rpc_handler_timeout = rpc_handler_timeout_seconds
        self._join_handler_timeout = join_handler_timeout_seconds
        self._queue_frames = raft_queue_frames
        self._queue_bytes = raft_queue_bytes
        self._backoff_min = backoff_min_seconds
        self._backoff_max = backoff_max_seconds
        self.stats = TransportStats()
        self._pins: dict[int, str] = {}
        self._addresses: dict[int, str] = {}
        self._fp_to_node: dict[str, int] = {}
        self._set_maps(pins, addresses)
        self._rpc_handlers: dict[str, RpcHandler] = {}
        self._join_handler: JoinHandler | None = None
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._member_conns: dict[int, set[_Conn]] = {}
        self._raft_peers: dict[int, _RaftPeer] = {}
        self._rpc_peers: dict[int, _RpcPeer] = {}
        self._next_request_id = 0
        # RPC deadlines, both sides, checked by one sweep every RPC_SWEEP_SECONDS while any is
        # pending: the calls' futures and the handlers' tasks. A timer per call (or an
        # asyncio.timeout context) costs several microseconds on the path every forwarded API
        # call takes, twice; a dict entry costs next to nothing. Deadlines fire up to one sweep late.
        self._calls_due: dict[asyncio.Future[bytes], float] = {}
        self._handlers_due: dict[asyncio.Task[None], float] = {}
        self._overdue: set[asyncio.Task[None]] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._pending_handshakes = 0
        self._join_connections = 0
        self._closing = False
        self.on_raft_peer_lost: Callable[[int], None] | None = None
        self._random = random.Random(secrets.randbits(64))  # backoff jitter only

    # --- configuration ---------------------------------------------------------------------
    def _set_maps(self, pins: Mapping[int, str], addresses: Mapping[int, str]) -> None:
        for nid, fp in pins.items():
            if not _FINGERPRINT_RE.fullmatch(fp):
                raise ValueError(f"bad fingerprint for node {nid}")
        self._pins = dict(pins)
        self._addresses = dict(addresses)
        self._fp_to_node = {fp: nid for nid, fp in sorted(self._pins.items())}

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        """Serve ``method``: ``handler(from_node_id, payload) -> response payload``."""
        self._rpc_handlers[method] = handler

    def register_join_handler(self, handler: JoinHandler) -> None:
        """Serve the join channel: ``handler(request payload, client certificate DER) -> reply``."""
        self._join_handler = handler

    def update_pins(self, pins: Mapping[int, str], addresses: Mapping[int, str]) -> None:
        """Replace the member pins and addresses.

        A member whose pin is removed or changed has every live connection (both directions)
        closed at once and its queued frames dropped; a member whose address changed has its
        outgoing connections closed so they are redialed at the new address.
        """
        old_pins, old_addresses = self._pins, self._addresses
        self._set_maps(pins, addresses)
        unpinned = sorted(nid for nid, fp in old_pins.items() if self._pins.get(nid) != fp)
        moved = sorted(
            nid
            for nid, addr in old_addresses.items()
            if self._addresses.get(nid) != addr and nid not in unpinned
        )
        for nid in unpinned:
            log.info("peer_unpinned node=%d", nid)
            for conn in list(self._member_conns.pop(nid, ())):
                self._retire(conn)
            self._stop_raft_peer(nid)
            self._rpc_peers.pop(nid, None)
        for nid in moved:
            log.info("peer_address_changed node=%d address=%s", nid, self._addresses.get(nid))
            raft_peer = self._raft_peers.get(nid)
            if raft_peer is not None and raft_peer.conn is not None:
                raft_peer.conn.abort()
            rpc_peer = self._rpc_peers.get(nid)
            if rpc_peer is not None and rpc_peer.conn is not None:
                rpc_peer.conn.abort()
        # A new member gets its Raft channel now, not when there is first something to send: a
        # follower sends nothing to another follower until one of them campaigns, and a dial
        # (TLS handshake and proof, several ms of CPU) then sat inside the election (measured:
        # a drain's vote request reached the third member 12 ms late).
        self.connect_members()

    def _retire(self, conn: _Conn) -> None:
        """Close an unpinned member's connection. It is refused every new frame at once (the pin
        check), but requests it already has in flight get their replies first: the removal that
        unpinned it is typically one of them (a member removing itself through the leader, a
        leader removed after handing over). Closed when those finish, aborted after a grace."""
        pending = [t for t in conn.tasks if not t.done()]
        if not pending or self._loop is None:
            conn.abort()
            return
        left = len(pending)

        def one_done(_t: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                conn.close()  # flushes the replies, then FIN

        for t in pending:
            t.add_done_callback(one_done)
        self._loop.call_later(UNPIN_GRACE_SECONDS, conn.abort)

    def _stop_raft_peer(self, nid: int) -> None:
        peer = self._raft_peers.pop(nid, None)
        if peer is None:
            return
        self.stats.frames_dropped += len(peer.frames)
        peer.frames = []
        if peer.task is not None:
            peer.task.cancel()
        if peer.conn is not None:
            peer.conn.abort()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, bind_address: str) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the bound port."""
        host, port = split_host_port(bind_address)
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve bind address {bind_address!r}")
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._spawn(self._accept_loop(sock))
        bound = int(sock.getsockname()[1])
        log.info("cluster_transport_listening host=%s port=%d fingerprint=%s", host, bound, self.fingerprint)
        self.connect_members()
        return bound

    def connect_members(self) -> None:
        """Open the Raft channel to every pinned member now, before there is anything to send.
        A restarted node thereby tells its peers it is back (their redial backoff toward it is cut
        short, see ``_admit``): the leader's next heartbeat arrives at once instead of after the
        backoff or this node's first election timeout."""
        if self._loop is None or self._closing:
            return
        for nid in self._pins:
            if nid == self.node_id or nid in self._raft_peers or nid not in self._addresses:
                continue
            peer = self._raft_peers[nid] = _RaftPeer(nid)
            peer.task = self._spawn(self._raft_writer(peer))
            peer.wakeup.set()

    async def close(self, timeout_seconds: float = 3.0) -> None:
        """Stop listening, cancel every task, close every connection; bounded by the timeout."""
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        waits: list[asyncio.Future[Any]] = [*self._tasks, *(c.closed for c in conns)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_seconds)
            if pending:
                log.warning("cluster_transport_close_timeout pending=%d", len(pending))
        for conn in conns:
            conn.abort()
        if self._listener is not None:
            self._listener.close()  # after the accept task is gone: no fd closed under the selector
        self._raft_peers.clear()
        self._rpc_peers.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        log.info("cluster_transport_closed")

    def _spawn(self, coro: Coroutine[Any, Any, None], conn: _Conn | None = None) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    def _track(self, conn: _Conn) -> None:
        self._conns.add(conn)
        conn.on_lost = self._forget

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if (
            conn.channel == ALPN_RAFT
            and conn.node_id
            and conn.node_id in self._member_conns
            and not self._closing
            and self.on_raft_peer_lost is not None
        ):
            # An authenticated Raft connection closed (the peer process exited or reset it): a
            # hint for failure detection, never a decision (the engine still needs PreVote to win).
            self.on_raft_peer_lost(conn.node_id)
        members = self._member_conns.get(conn.node_id)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._member_conns[conn.node_id]

    def _admit(self, conn: _Conn, node_id: int, fingerprint: str) -> None:
        conn.node_id, conn.fingerprint = node_id, fingerprint
        conn.max_frame = MAX_FRAME_BYTES
        self._member_conns.setdefault(node_id, set()).add(conn)
        peer = self._raft_peers.get(node_id)
        if peer is not None and peer.failing:
            peer.redial.set()  # a restarted member is back: the leader's heartbeat follows at once

    def _refuse(
        self,
        reason: str,
        conn: _Conn,
        fingerprint: str = "none",
        *,
        detail: str = "",
        level: int = logging.WARNING,
    ) -> None:
        self.stats.count_refused(reason)
        log.log(
            level,
            "peer_refused reason=%s fingerprint=%s channel=%s peer=%s node=%d%s",
            reason,
            fingerprint,
            conn.channel,
            conn.peer,
            conn.node_id,
            f" error={detail}" if detail else "",
        )
        conn.abort()

    def _check_member(self, der: bytes | None, expected_node: int | None) -> tuple[int, str, str | None]:
        """(node id, fingerprint, refusal reason or None) for a peer's certificate."""
        if not der:
            return 0, "none", "no_certificate"
        fp = cert_fingerprint(der)
        nid = self._fp_to_node.get(fp)
        if nid is None:
            return 0, fp, "not_pinned"
        if expected_node is not None and nid != expected_node:
            return nid, fp, "wrong_peer"
        try:
            identity = cert_identity(der)
        except CertIdentityError:
            return nid, fp, "bad_identity"
        if identity != (nid, self.cluster_id):
            return nid, fp, "identity_mismatch"
        return nid, fp, None

    def _still_pinned(self, conn: _Conn) -> bool:
        return self._pins.get(conn.node_id) == conn.fingerprint

    # --- inbound ---------------------------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept TCP connections, one handshake task each. ``connect_accepted_socket`` reports a
        failed TLS handshake to us (counted as a refusal); ``create_server(ssl=...)`` would drop it
        silently, and ``start_tls`` after a plain accept races the ClientHello on uvloop."""
        assert self._loop is not None
        while True:
            try:
                sock, addr = await self._loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("cluster_accept_failed error=%s", exc)
                await asyncio.sleep(0.1)
                continue
            self.stats.connections_accepted += 1
            conn = _Conn(self._loop, self.stats, "handshake")
            if isinstance(addr, tuple) and len(addr) >= 2:
                conn.peer = f"{addr[0]}:{addr[1]}"
            if self._pending_handshakes >= MAX_PENDING_HANDSHAKES:
                sock.close()
                self._refuse("overload", conn)
                continue
            self._pending_handshakes += 1
            self._spawn(self._serve_inbound(conn, sock))

    async def _serve_inbound(self, conn: _Conn, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await self._loop.connect_accepted_socket(
                        lambda: conn, sock, ssl=self._server_ctx, ssl_handshake_timeout=self._connect_timeout
                    )
                except ssl.SSLError as exc:  # TLS < 1.3, not TLS at all, ...
                    self._refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    return
                except Exception as exc:  # gone before a TLS hello (a TCP probe): counted, not shouted
                    self._refuse("handshake_aborted", conn, detail=type(exc).__name__, level=logging.DEBUG)
                    return
                self._track(conn)
                ok = await self._authenticate_inbound(conn)
        except TimeoutError:
            self._refuse("timeout", conn)
            return
        finally:
            self._pending_handshakes -= 1
            if conn.transport is None:
                sock.close()
        if ok and conn.channel == ALPN_JOIN:
            await self._serve_join(conn)

    async def _authenticate_inbound(self, conn: _Conn) -> bool:
        alpn, _ = _tls_facts(conn)
        if alpn not in CHANNELS:
            self._refuse("alpn", conn)
            return False
        assert alpn is not None
        conn.channel = alpn
        if alpn == ALPN_JOIN and (
            self._join_handler is None or self._join_connections >= MAX_JOIN_CONNECTIONS
        ):
            self._refuse("join_unavailable", conn)
            return False
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.use_inbox()
        conn.write_frames([packb([FrameKind.CHALLENGE, nonce])])
        try:
            frame = await conn.read_frame()
        except ConnectionResetError:
            if not self._closing:  # e.g. a joiner whose token pins another certificate than ours
                detail = "closed before proving its identity"
                self._refuse("no_proof", conn, detail=detail, level=logging.INFO)
            return False
        try:
            _, cert_der, signature = _unpack(frame, (FrameKind.PROOF,), 3)
            if type(cert_der) is not bytes or type(signature) is not bytes:
                raise _Malformed("proof fields must be bytes")
            _verify_proof(cert_der, signature, _proof_message(alpn, nonce, self.fingerprint))
        except _Malformed as exc:
            self._refuse("bad_proof", conn)
            log.debug("bad_proof peer=%s error=%s", conn.peer, exc)
            return False
        if alpn == ALPN_JOIN:
            conn.fingerprint = cert_fingerprint(cert_der)
            conn.join_cert_der = cert_der
            conn.max_frame = MAX_JOIN_FRAME_BYTES
            conn.write_frames([packb([FrameKind.ACCEPT])])
            return True
        nid, fp, reason = self._check_member(cert_der, None)
        if reason is not None:
            self._refuse(reason, conn, fp)
            return False
        self._admit(conn, nid, fp)
        conn.write_frames([packb([FrameKind.ACCEPT])])
        log.debug("peer_connected direction=in channel=%s node=%d peer=%s", alpn, nid, conn.peer)
        conn.use_handler(self._on_raft_inbound if alpn == ALPN_RAFT else self._on_rpc_request)
        return True

    def _on_raft_inbound(self, conn: _Conn, frame: bytes) -> None:
        if not self._still_pinned(conn):
            conn.abort()
            return
        self.stats.frames_received += 1
        try:
            self._on_raft_frame(conn.node_id, frame)
        except Exception:  # a bug upstream must not take the connection or the node down
            log.exception("raft_frame_callback_failed node=%d", conn.node_id)

    # --- raft outbound ---------------------------------------------------------------------
    def send(self, node_id: int, frame: bytes) -> bool:
        """Queue one Raft frame for ``node_id``; False (and counted) when it is dropped."""
        peer = self._raft_peers.get(node_id)
        if peer is None:
            if (
                self._loop is None
                or self._closing
                or node_id not in self._pins
                or node_id not in self._addresses
            ):
                self.stats.frames_dropped += 1
                return False
            peer = self._raft_peers[node_id] = _RaftPeer(node_id)
            peer.task = self._spawn(self._raft_writer(peer))
        size = len(frame)
        if (
            len(peer.frames) >= self._queue_frames
            or peer.queued_bytes + size > self._queue_bytes
            or size > MAX_FRAME_BYTES
        ):
            self.stats.frames_dropped += 1
            return False
        conn = peer.conn
        if conn is not None and not peer.frames and not conn.paused and conn.write_frames((frame,)):
            # Fast path: connected, nothing queued, socket not backed up. Writing here saves the
            # writer task's wakeup (one loop iteration) on every message of the commit path.
            self.stats.frames_sent += 1
            if conn.paused and not peer.wakeup.is_set():
                peer.wakeup.set()  # the writer watches the drain with its stall timeout
            return True
        peer.frames.append(frame)
        peer.queued_bytes += size
        if not peer.wakeup.is_set():
            peer.wakeup.set()
        return True

    async def _raft_writer(self, peer: _RaftPeer) -> None:
        backoff = self._backoff_min
        while True:
            await peer.wakeup.wait()
            conn = peer.conn
            if conn is None or conn.lost:
                peer.conn = None
                try:
                    conn = await self._dial(peer.node_id, ALPN_RAFT)
                except Exception as exc:  # _DialError, or a bug: either way back off and retry
                    if not isinstance(exc, _DialError):
                        log.exception("raft_dial_error node=%d", peer.node_id)
                    self.stats.frames_dropped += len(peer.frames)
                    peer.frames, peer.queued_bytes = [], 0
                    peer.wakeup.clear()
                    level = logging.DEBUG if peer.failing else logging.INFO
                    log.log(
                        level, "raft_dial_failed node=%d error=%s backoff=%.2f", peer.node_id, exc, backoff
                    )
                    peer.failing = True
                    peer.redial.clear()
                    try:  # capped, jittered backoff, cut short when the peer connects to us
                        async with asyncio.timeout(backoff * (0.5 + self._random.random() / 2)):
                            await peer.redial.wait()
                        backoff = self._backoff_min
                    except TimeoutError:
                        backoff = min(backoff * 2, self._backoff_max)
                    continue
                if peer.failing:
                    log.info("raft_peer_reconnected node=%d", peer.node_id)
                peer.failing = False
                backoff = self._backoff_min
                peer.conn = conn
                conn.use_handler(self._on_unexpected_frame)
                # Keep the channel warm: when it drops, dial again at once (one attempt, then the
                # backoff above) rather than at the next send, which may be a vote request.
                conn.closed.add_done_callback(peer.on_conn_closed)
            frames = peer.frames
            peer.frames, peer.queued_bytes = [], 0
            peer.wakeup.clear()
            if frames:
                if not conn.write_frames(frames):
                    self.stats.frames_dropped += len(frames)
                    continue
                self.stats.frames_sent += len(frames)
            if not conn.paused:
                continue
            try:
                async with asyncio.timeout(self._write_timeout):
                    await conn.drain()
            except TimeoutError:
                log.warning("raft_peer_stalled node=%d", peer.node_id)
                conn.abort()
            except ConnectionResetError:
                pass  # redialed on the next frame

    def _on_unexpected_frame(self, conn: _Conn, frame: bytes) -> None:
        conn.malformed("frame on a send-only connection")

    async def _dial(self, node_id: int, alpn: str) -> _Conn:
        """An authenticated connection to a pinned member; _DialError otherwise."""
        assert self._loop is not None
        address, expected = self._addresses.get(node_id), self._pins.get(node_id)
        if address is None or expected is None or self._closing:
            raise _DialError("not a pinned member")
        try:
            host, port = split_host_port(address)
        except ValueError as exc:
            raise _DialError(str(exc)) from exc
        conn = _Conn(self._loop, self.stats, alpn)
        conn.node_id = node_id
        conn.peer = address
        self.stats.connections_dialed += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await self._loop.create_connection(
                        lambda: conn,
                        host,
                        port,
                        ssl=self._client_ctx[alpn],
                        ssl_handshake_timeout=self._connect_timeout,
                    )
                except ssl.SSLError as exc:
                    self._refuse("handshake", conn, detail=str(exc.reason or type(exc).__name__))
                    raise _DialError(f"TLS handshake failed: {exc.reason}") from exc
                self._track(conn)
                selected, der = _tls_facts(conn)
                if selected != alpn:
                    self._refuse("alpn", conn)
                    raise _DialError("peer did not select the channel")
                _, fp, reason = self._check_member(der, node_id)
                if reason is not None:
                    self._refuse(reason, conn, fp)
                    raise _DialError(f"peer refused: {reason}")
                await _client_prove(conn, alpn, fp, self._cert_der, self._key)
        except TimeoutError as exc:
            conn.abort()
            raise _DialError("timeout") from exc
        except OSError as exc:
            conn.abort()
            raise _DialError(f"{type(exc).__name__}: {exc}") from exc
        if self._closing or self._pins.get(node_id) != expected:
            conn.abort()
            raise _DialError("unpinned while dialing")
        self._admit(conn, node_id, fp)
        log.debug("peer_connected direction=out channel=%s node=%d", alpn, node_id)
        return conn

    # --- rpc -------------------------------------------------------------------------------
    async def rpc(self, node_id: int, method: str, payload: bytes, timeout: float) -> bytes:
        """Call ``method`` on member ``node_id``: RpcUnreachable, RpcTimeout or RpcRemoteError."""
        if self._loop is None:
            raise RpcUnreachable("cluster transport not started")
        self.stats.rpc_calls += 1
        deadline = self._loop.time() + timeout
        try:
            peer = self._rpc_peers.get(node_id)
            conn = peer.conn if peer is not None else None
            if conn is None or conn.lost or self._closing or node_id not in self._pins:
                conn = await self._rpc_connection(node_id, deadline)  # checks, dials when needed
            self._next_request_id += 1
            request_id = self._next_request_id
            frame = packb([FrameKind.RPC_REQUEST, request_id, method, payload])
            if len(frame) > MAX_FRAME_BYTES:
                raise RpcRemoteError("request over the frame limit")
            fut: asyncio.Future[bytes] = self._loop.create_future()
            conn.rpc_pending[request_id] = fut
            self._calls_due[fut] = deadline  # the sweep fails the future with TimeoutError
            if self._sweep_handle is None:
                self._arm_rpc_sweep()
            try:
                if not conn.write_frames([frame]):
                    raise RpcUnreachable(f"connection to node {node_id} lost")
                if conn.paused:
                    async with asyncio.timeout_at(deadline):
                        await conn.drain()
                return await fut
            except TimeoutError:
                raise RpcTimeout(f"node {node_id} did not answer {method} within {timeout:g}s") from None
            except ConnectionResetError:
                raise RpcUnreachable(f"connection to node {node_id} lost") from None
            finally:
                del self._calls_due[fut]
                conn.rpc_pending.pop(request_id, None)
        except RpcError:
            self.stats.rpc_failures += 1
            raise

    def _arm_rpc_sweep(self) -> None:
        assert self._loop is not None
        self._sweep_handle = self._loop.call_later(RPC_SWEEP_SECONDS, self._sweep_rpc_deadlines)

    def _sweep_rpc_deadlines(self) -> None:
        self._sweep_handle = None
        assert self._loop is not None
        now = self._loop.time()
        for fut, deadline in list(self._calls_due.items()):
            if deadline <= now and not fut.done():
                fut.set_exception(TimeoutError())
        for task, deadline in list(self._handlers_due.items()):
            if deadline <= now:
                del self._handlers_due[task]
                self._overdue.add(task)
                task.cancel()
        if (self._calls_due or self._handlers_due) and not self._closing:
            self._arm_rpc_sweep()

    async def _rpc_connection(self, node_id: int, deadline: float) -> _Conn:
        if self._closing or node_id not in self._pins or node_id not in self._addresses:
            raise RpcUnreachable(f"node {node_id} is not a reachable member")
        peer = self._rpc_peers.get(node_id)
        if peer is None:
            peer = self._rpc_peers[node_id] = _RpcPeer()
        conn = peer.conn
        if conn is not None and not conn.lost:
            return conn
        try:
            async with asyncio.timeout_at(deadline), peer.lock:
                conn = peer.conn
                if conn is not None and not conn.lost:
                    return conn
                conn = await self._dial(node_id, ALPN_RPC)
        except TimeoutError:
            raise RpcUnreachable(f"could not connect to node {node_id} in time") from None
        except _DialError as exc:
            raise RpcUnreachable(f"node {node_id}: {exc}") from None
        conn.use_handler(self._on_rpc_response)
        if self._rpc_peers.get(node_id) is peer:
            peer.conn = conn
        return conn

    def _on_rpc_response(self, conn: _Conn, frame: bytes) -> None:
        try:
            kind, request_id, _method, body = _unpack(frame, (FrameKind.RPC_RESPONSE, FrameKind.RPC_ERROR), 4)
            if type(request_id) is not int or type(body) is not bytes:
                raise _Malformed("bad response fields")
        except _Malformed as exc:
            conn.malformed(str(exc))
            return
        fut = conn.rpc_pending.pop(request_id, None)
        if fut is None or fut.done():
            return  # the caller gave up already
        if kind == FrameKind.RPC_RESPONSE:
            fut.set_result(body)
        else:
            fut.set_exception(RpcRemoteError(body.decode("utf-8", "replace")))

    def _on_rpc_request(self, conn: _Conn, frame: bytes) -> None:
        if self._closing or not self._still_pinned(conn):
            conn.abort()
            return
        try:
            _, request_id, method, body = _unpack(frame, (FrameKind.RPC_REQUEST,), 4)
            if type(request_id) is not int or type(method) is not str or type(body) is not bytes:
                raise _Malformed("bad request fields")
        except _Malformed as exc:
            conn.malformed(str(exc))
            return
        handler = self._rpc_handlers.get(method)
        if handler is None:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, f"unknown method {method!r}".encode())
        elif len(conn.tasks) >= MAX_RPC_INFLIGHT_PER_CONNECTION:
            self._reply(conn, request_id, method, FrameKind.RPC_ERROR, b"server busy")
        else:
            self._spawn(self._serve_rpc(conn, request_id, method, handler, body), conn)

    async def _serve_rpc(
        self, conn: _Conn, request_id: int, method: str, handler: RpcHandler, body: bytes
    ) -> None:
        task = asyncio.current_task()
        assert task is not None and self._loop is not None
        self._handlers_due[task] = self._loop.time() + self._rpc_handler_timeout  # see __init__
        if self._sweep_handle is None:
            self._arm_rpc_sweep()
        try:
            result = await handler(conn.node_id, body)
            if not isinstance(result, bytes):
                raise TypeError("rpc handler returned non-bytes")
            kind, out = FrameKind.RPC_RESPONSE, result
        except asyncio.CancelledError:
            if task not in self._overdue or conn.lost:
                raise
            task.uncancel()
            kind, out = FrameKind.RPC_ERROR, b"handler timed out"
        except Exception as exc:  # the error travels back to the caller as RpcRemoteError
            log.warning(
                "rpc_handler_failed method=%s node=%d error=%s", method, conn.node_id, type(exc).__name__
            )
            kind, out = FrameKind.RPC_ERROR, (str(exc) or type(exc).__name__).encode()
        finally:
            self._handlers_due.pop(task, None)
            self._overdue.discard(task)
        self._reply(conn, request_id, method, kind, out)
        if not conn.paused:
            return  # the usual case: nothing to wait for (no timeout context per call)
        try:
            async with asyncio.timeout(self._write_timeout):
                await conn.drain()
        except TimeoutError:
            log.warning("rpc_peer_stalled node=%d", conn.node_id)
            conn.abort()
        except ConnectionResetError:
            pass

    def _reply(self, conn: _Conn, request_id: int, method: str, kind: FrameKind, body: bytes) -> None:
        frame = packb([kind, request_id, method, body])
        if len(frame) > MAX_FRAME_BYTES:
            frame = packb([FrameKind.RPC_ERROR, request_id, method, b"response over the frame limit"])
        conn.write_frames([frame])

    # --- join (server side) ----------------------------------------------------------------
    async def _serve_join(self, conn: _Conn) -> None:
        handler = self._join_handler
        assert handler is not None
        cert_der = conn.join_cert_der
        self._join_connections += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                frame = await conn.read_frame()
            _, payload = _unpack(frame, (FrameKind.JOIN_REQUEST,), 2)
            if type(payload) is not bytes:
                raise _Malformed("join payload must be bytes")
            self.stats.join_requests += 1
            log.info("join_request peer=%s fingerprint=%s", conn.peer, conn.fingerprint)
            try:
                async with asyncio.timeout(self._join_handler_timeout):
                    reply = await handler(payload, cert_der)
                out = packb([FrameKind.JOIN_RESPONSE, reply])
            except TimeoutError:
                out = packb([FrameKind.JOIN_ERROR, "join handler timed out"])
            except Exception as exc:  # reported to the joiner, never fatal here
                log.warning("join_handler_failed peer=%s error=%s", conn.peer, type(exc).__name__)
                out = packb([FrameKind.JOIN_ERROR, str(exc) or type(exc).__name__])
            conn.write_frames([out])
            async with asyncio.timeout(self._write_timeout):
                await conn.drain()
            conn.use_handler(self._on_unexpected_frame)
            conn.close()
        except _Malformed as exc:
            conn.malformed(str(exc))
        except (TimeoutError, ConnectionResetError):
            conn.abort()
        finally:
            self._join_connections -= 1


# --- join (client side) ----------------------------------------------------------------------
async def join_call(
    address: str,
    expected_fingerprint: str,
    payload: bytes,
    client_cert_pem: bytes,
    client_key_pem: bytes,
    timeout: float = 10.0,
) -> bytes:
    """Send one join request to ``address`` and return the server's reply.

    The server's certificate must have ``expected_fingerprint`` (from the join token), checked
    right after the TLS handshake and before anything is sent (JoinPinMismatch). The client
    proves possession of ``client_key_pem`` for ``client_cert_pem``, which the server's join
    handler receives. Errors: JoinUnreachable, JoinTimeout, JoinRemoteError.
    """
    loop = asyncio.get_running_loop()
    cert_der = _load_cert_der(client_cert_pem)
    key = _load_key(client_key_pem)
    host, port = split_host_port(address)
    conn = _Conn(loop, None, ALPN_JOIN)
    conn.peer = address
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.create_connection(
                    lambda: conn, host, port, ssl=_client_context(ALPN_JOIN), ssl_handshake_timeout=timeout
                )
            except OSError as exc:
                raise JoinUnreachable(f"{address}: {type(exc).__name__}: {exc}") from exc
            selected, der = _tls_facts(conn)
            fp = cert_fingerprint(der) if der else "none"
            if not hmac.compare_digest(fp.encode(), expected_fingerprint.encode()):
                # Close cleanly (not abort): the server then sees a client that left without
                # proving anything and logs and counts it (``no_proof``); a reset would look
                # like a TCP probe to it.
                conn.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(conn.closed)
                raise JoinPinMismatch(f"{address} presented {fp}, the join token pins {expected_fingerprint}")
            if selected != ALPN_JOIN:
                raise JoinUnreachable(f"{address} does not serve the join channel")
            await _client_prove(conn, ALPN_JOIN, fp, cert_der, key)
            conn.max_frame = MAX_JOIN_FRAME_BYTES
            conn.write_frames([packb([FrameKind.JOIN_REQUEST, payload])])
            await conn.drain()
            frame = await conn.read_frame()
    except TimeoutError as exc:
        raise JoinTimeout(f"{address}: no join answer within {timeout:g}s") from exc
    except ConnectionResetError as exc:
        raise JoinUnreachable(f"{address}: connection closed: {exc}") from exc
    finally:
        conn.abort()
    try:
        kind, body = _unpack(frame, (FrameKind.JOIN_RESPONSE, FrameKind.JOIN_ERROR), 2)
    except _Malformed as exc:
        raise JoinRemoteError(f"{address}: malformed join reply") from exc
    if kind == FrameKind.JOIN_ERROR:
        raise JoinRemoteError(str(body))
    if type(body) is not bytes:
        raise JoinRemoteError(f"{address}: malformed join reply")
    return body
