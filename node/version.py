"""The binary version reported in /status, the member registry and quorumd_build_info, and the
protocol version this build speaks (defined in ``quorumd.node.registry.protocol``)."""

from __future__ import annotations

from importlib import metadata

from quorumd.node.registry.protocol import BASELINE_PROTOCOL_VERSION, PROTOCOL_VERSION

try:
    VERSION = "v" + metadata.version("quorumd")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "v0.0.0+unknown"

__all__ = ["BASELINE_PROTOCOL_VERSION", "PROTOCOL_VERSION", "VERSION"]
