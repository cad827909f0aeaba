"""The simulated application state machine: an applied index plus a hash chain over applied entries.

Every node's app folds each applied entry into ``digest`` (blake2b of the previous digest and the
entry), so two apps agree on their digest at an index iff they applied the same entries up to it. The
app's snapshot (handed to ``RaftCore.compact`` and shipped by InstallSnapshot) is the encoded
``(applied_index, digest)``; the safety checker compares a restored snapshot's digest with the
digest of the globally committed prefix at that index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..core.types import Entry

DIGEST_BYTES = 16
EMPTY_DIGEST = bytes(DIGEST_BYTES)


def chain_digest(prev: bytes, entry: Entry) -> bytes:
    """The digest after applying ``entry`` on top of a state whose digest is ``prev``."""
    h = hashlib.blake2b(prev, digest_size=DIGEST_BYTES)
    h.update(entry.term.to_bytes(8, "big"))
    h.update(entry.index.to_bytes(8, "big"))
    h.update(bytes((int(entry.type),)))
    h.update(entry.data)
    return h.digest()


@dataclass(frozen=True, slots=True)
class AppState:
    applied_index: int = 0
    digest: bytes = EMPTY_DIGEST

    def apply(self, entry: Entry) -> AppState:
        return AppState(entry.index, chain_digest(self.digest, entry))

    def encode(self) -> bytes:
        return self.applied_index.to_bytes(8, "big") + self.digest

    @staticmethod
    def decode(data: bytes) -> AppState:
        if len(data) != 8 + DIGEST_BYTES:
            raise ValueError(f"bad app snapshot: {len(data)} bytes")
        return AppState(int.from_bytes(data[:8], "big"), data[8:])
