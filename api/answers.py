"""How a ``Reply`` goes out on an aiohttp connection.

Most answers are an HTTP/1.1 keep-alive answer with a body in memory and no header of their own:
``answer`` writes those itself, status line, headers and body in one ``bytes`` and one writer call
(``WholeAnswer``). aiohttp's ``web.Response`` builds the same bytes through a header multidict, a
preparation step per header rule and two writer calls; at 64 clients that was ~10% of the
leader's CPU (bench/notes.md). Every other answer (HEAD, HTTP/1.0, a client that asked to close,
a connection being closed, a status without a body, a reply carrying headers of its own) is a
``web.Response``, so aiohttp's rules apply to it unchanged. Both carry the same headers:
``Content-Type``, ``Content-Length``, ``Date``, ``Server: quorumd`` and ``Cache-Control:
no-store``.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time  # the Date web.Response writes (cached a second)
from aiohttp.http import HttpVersion11

from .pipeline import Reply

BASE_HEADERS = {"Cache-Control": "no-store", "Server": "quorumd"}
_BASE_LINES = "".join(f"{name}: {value}\r\n" for name, value in BASE_HEADERS.items())
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_NO_BODY_STATUSES = frozenset((204, 304))


def headers_of(reply: Reply) -> dict[str, str]:
    headers = {"Content-Type": reply.content_type, **BASE_HEADERS}
    for name, value in reply.headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue  # never split the header section (values come from our own code)
        headers[name] = value
    return headers


def response(reply: Reply, *, close: bool = False) -> web.Response:
    """``reply`` as aiohttp's response (its rules for HEAD, HTTP/1.0, keep-alive and statuses
    without a body); ``close`` adds ``Connection: close`` and closes after the answer."""
    answer = web.Response(status=reply.status, body=reply.encoded(), headers=headers_of(reply))
    if close:
        answer.force_close()
    return answer


class WholeAnswer:
    """A complete answer in one ``bytes``, written by the connection's writer as the end of the
    message. aiohttp's protocol takes it where it takes a response: it calls ``prepare`` and
    ``write_eof`` and reads ``keep_alive`` (always true: ``answer`` only builds one for a
    keep-alive request)."""

    __slots__ = ("_data", "_writer")
    keep_alive = True

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._writer: AbstractStreamWriter | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._writer = request.writer
        return self._writer

    async def write_eof(self, data: bytes = b"") -> None:
        assert self._writer is not None and not data
        writer, self._writer = self._writer, None
        await writer.write_eof(self._data)


def whole(reply: Reply) -> bytes:
    """``reply`` as one HTTP/1.1 keep-alive message (no headers of its own, a status with a body)."""
    body = reply.encoded()
    head = (
        f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
        f"Content-Type: {reply.content_type}\r\n{_BASE_LINES}"
        f"Date: {rfc822_formatted_time()}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def answer(request: web.BaseRequest, reply: Reply, *, close: bool = False) -> web.StreamResponse:
    """What the handler returns for ``reply`` to ``request`` (see the module docstring)."""
    if (
        close
        or reply.headers
        or request.version is not HttpVersion11
        or request.method == "HEAD"
        or reply.status in _NO_BODY_STATUSES
        or reply.status < 200
        or not request.keep_alive
    ):
        return response(reply, close=close)
    return WholeAnswer(whole(reply))  # type: ignore[return-value]  # see WholeAnswer
