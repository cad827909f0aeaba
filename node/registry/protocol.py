"""The cluster protocol version this build speaks.

The protocol version numbers what a build can read: the kinds of log entries (commands and
member contexts), the replicated-state snapshot format and the internal RPCs. It is not the
binary version: many builds share one protocol version. The build at commit ``017d9cc`` is
protocol 1 (it reports none); protocol 2 added protocol versions, address changes and the audit
trail; this build is 3 (certificate rotation). Pure: the state machine imports it, and
``quorumd.node.version`` re-exports it beside the binary version.
"""

from __future__ import annotations

PROTOCOL_VERSION = 3
BASELINE_PROTOCOL_VERSION = 1  # what a member that reports no protocol version speaks
