"""Process-wide logging: one handler on the root logger, text or JSON lines, every line tagged with the node.

``configure_logging(level, fmt, node_id)`` is called once by the daemon (calling it again replaces the
handler it installed, it never stacks a second one). Modules log with ``logging.getLogger(__name__)``,
event first then ``key=value`` pairs (the logging convention)::

    2026-11-26T10:00:00.123Z INFO quorumd.raft.core node=1 became leader term=4

JSON format: one object per line ``{"ts", "level", "logger", "node", "msg", ...}`` where ``...`` are the
``extra=`` fields of the call and ``exc`` (the formatted traceback) when there is one. Text format
appends ``extra=`` fields as ``key=value`` too, and escapes line breaks inside a message (``\n``), so
one record is one line carrying the node id (only a traceback continues on the following lines) and
text from the outside (an error message, a peer's input) cannot forge log lines.

Defence in depth against leaking secrets: ``RedactingFilter`` rewrites every record's message (and
string ``extra=`` fields) so that anything that looks like a quorumd token (``qd_`` followed by 8 or
more token characters) and any registered secret value (the configured join token, via ``secrets=`` or
``add_redaction``) becomes ``[REDACTED]``; the formatters redact exception text as well. The code must
still never log secrets: this only limits the damage of a mistake.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any, Literal

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "LogLevel",
    "NodeFilter",
    "RedactingFilter",
    "TextFormatter",
    "add_redaction",
    "configure_logging",
    "redact",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
REDACTED = "[REDACTED]"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_TOKEN_RE = re.compile(r"qd_[A-Za-z0-9_\-.~+/=]{8,}")
_MIN_SECRET_CHARS = 8  # shorter "secrets" would redact ordinary words

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "node",
    "taskName",
}


def add_redaction(secret: str) -> None:
    """Redact this exact value from every future log line (ignored when shorter than 8 characters)."""
    global _secrets
    if len(secret) < _MIN_SECRET_CHARS:
        return
    with _secrets_lock:
        if secret not in _secrets:
            # longest first, so a secret containing another is redacted whole
            _secrets = tuple(sorted((*_secrets, secret), key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with token-looking substrings and registered secrets replaced by ``[REDACTED]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "qd_" in text:
        text = _TOKEN_RE.sub(REDACTED, text)
    return text


class NodeFilter(logging.Filter):
    """Stamps ``record.node`` with this process's node id."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


class RedactingFilter(logging.Filter):
    """Rewrites the rendered message and string extras of each record through ``redact``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill logging; keep the raw template
            message = f"{record.msg!s} (bad log arguments)"
        cleaned = redact(message)
        record.msg = cleaned
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _value_text(value: object) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r"})


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> node=<id> <message> [key=value ...]`` plus any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, f"node={getattr(record, 'node', 0)}"]
        parts.append(record.getMessage().translate(_LINE_BREAKS))
        parts.extend(f"{k}={_value_text(v)}" for k, v in _extras(record).items())
        line = " ".join(parts)
        trace = self._trace(record)
        return f"{line}\n{trace}" if trace else line

    def _trace(self, record: logging.LogRecord) -> str:
        chunks = []
        if record.exc_info:
            chunks.append(self.formatException(record.exc_info))
        if record.stack_info:
            chunks.append(self.formatStack(record.stack_info))
        return redact("\n".join(chunks))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts, level, logger, node, msg``, the extras, and ``exc`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": getattr(record, "node", 0),
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            obj["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


class _QuorumdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second configure replaces it."""


def configure_logging(
    level: LogLevel | str,
    fmt: LogFormat,
    node_id: int,
    *,
    stream: IO[str] | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Install the one root handler: ``level`` debug|info|warning|error, ``fmt`` text|json.

    ``stream`` defaults to stderr (journald captures it under systemd). ``secrets`` are exact values
    to redact, e.g. the configured join token.
    """
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    for secret in secrets:
        add_redaction(secret)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _QuorumdHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _QuorumdHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(NodeFilter(node_id))
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)
