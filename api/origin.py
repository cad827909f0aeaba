"""Who made the request being served: the audit trail's actor, receiving node and source.

``run_call`` sets ``current_origin`` once a request has authenticated, for the duration of the
route's work, so a node operation can name its actor without every ``NodeApi`` method growing
three parameters: ``token_id`` (re-checked by the node that runs the operation), ``via_node_id``
(the node that received the HTTP request, also when it forwarded the call to the leader) and
``source_address`` (the client's IP address without port, carried in the forwarded request).
None outside a request: background work (autopilot, deadline watch, join, shutdown) names its
system actor explicitly.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestOrigin:
    token_id: str
    via_node_id: int | None
    source_address: str | None


current_origin: ContextVar[RequestOrigin | None] = ContextVar("quorumd_request_origin", default=None)
