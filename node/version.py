"""The binary version reported in /status, the member registry and quorumd_build_info."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = "v" + metadata.version("quorumd")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "v0.0.0+unknown"
