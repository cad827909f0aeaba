"""The HTTP side of ``quorumctl``: one aiohttp session, the API's envelope, and error mapping.

``CtlClient.call`` sends one request under ``/api/v1`` with the bearer token and returns the
``result`` of a success envelope. Failures become one of two exceptions, which ``quorumctl`` maps to
its exit codes: ``ApiCallError`` (the server answered with an error: status, stable code, message,
Retry-After) and ``EndpointError`` (nothing usable came back: connection refused, DNS, TLS
verification, timeout, a body that is not an API envelope). Every request runs under one total
timeout. The token is only ever put in the Authorization header, never in a message.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

API_PREFIX = "/api/v1"
DEFAULT_ENDPOINT = "https://127.0.0.1:5002"
DEFAULT_TIMEOUT_SECONDS = 60.0
# The largest JSON answer read (a page of 10,000 leases is a few MiB): beyond it is not the API.
MAX_ANSWER_BYTES = 64 << 20


class CtlError(Exception):
    """Root of the client's errors."""


class ApiCallError(CtlError):
    """The API answered with an error envelope (or at least an error status)."""

    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class EndpointError(CtlError):
    """The endpoint could not be reached or did not speak the API."""


class SettingsError(CtlError):
    """A local setting is unusable (bad endpoint URL, unreadable CA file)."""


class LocalError(CtlError):
    """A local step after a successful answer failed (writing a file, a digest check)."""


@dataclass(frozen=True, slots=True)
class ClientSettings:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    cacert: str | None = None
    insecure: bool = False
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS


def normalize_endpoint(endpoint: str) -> URL:
    """``https://host:port`` (a trailing ``/`` or ``/api/v1`` is accepted and dropped)."""
    try:
        url = URL(endpoint.strip())
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"invalid endpoint {endpoint!r}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"invalid endpoint {endpoint!r}: expected http(s)://HOST:PORT")
    if url.user is not None or url.password is not None:
        raise SettingsError(f"invalid endpoint {endpoint!r}: no user or password in the URL (use --token)")
    try:
        url.host.encode("idna")  # what name resolution does with it
    except UnicodeError:
        raise SettingsError(f"invalid endpoint {endpoint!r}: {url.host!r} is not a valid host name") from None
    path = url.path.rstrip("/")
    if path.endswith(API_PREFIX):
        path = path[: -len(API_PREFIX)]
    return url.with_path(path or "/").with_query(None).with_fragment(None)


def build_ssl_context(cacert: str | None, insecure: bool) -> ssl.SSLContext | bool:
    """The ``ssl`` argument for aiohttp: system trust, a CA/cert file, or no verification."""
    if insecure:
        return False
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load CA file {cacert}: {exc}") from exc
    if cacert is not None:
        # Trust the given certificate itself, so the daemon's self-signed API cert works as-is.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class CtlClient:
    """One session against one endpoint; use as an async context manager."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.base = normalize_endpoint(settings.endpoint)
        self._ssl = (
            build_ssl_context(settings.cacert, settings.insecure) if self.base.scheme == "https" else True
        )
        self._session: aiohttp.ClientSession | None = None
        self.display = str(self.base).rstrip("/")

    async def __aenter__(self) -> CtlClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
            headers={"User-Agent": "quorumctl", "Accept": "application/json"},
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str, query: Mapping[str, str] | None = None) -> URL:
        """``path`` is already percent-encoded (see ``ctl._seg``)."""
        base_path = self.base.raw_path.rstrip("/")
        url = self.base.with_path(f"{base_path}{API_PREFIX}{path}", encoded=True)
        return url.with_query(dict(query)) if query else url

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """Send one request; return the envelope's ``result``."""
        return await self._request(method, path, query, body, None)

    async def download(self, path: str, sink: Callable[[bytes], None]) -> Mapping[str, str]:
        """GET a binary body, passing it to ``sink`` in chunks; returns the response headers.
        An error status raises as ``call`` does."""
        headers = await self._request("GET", path, None, None, sink)
        assert isinstance(headers, Mapping)
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        sink: Callable[[bytes], None] | None,
    ) -> Any:
        assert self._session is not None, "use CtlClient as an async context manager"
        url = self.url(path, query)
        headers: dict[str, str] = {}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        try:
            async with self._session.request(
                method, url, json=body, headers=headers, ssl=self._ssl, allow_redirects=False
            ) as resp:
                if sink is not None and 200 <= resp.status < 300:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        sink(chunk)
                    return dict(resp.headers)
                raw = await _read_bounded(resp)
                return _unwrap(resp.status, resp.reason, resp.headers.get("Retry-After"), raw)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise EndpointError(
                f"TLS certificate verification failed for {self.display}: {exc.certificate_error}; "
                "pass --cacert FILE (the daemon's API certificate) or --insecure"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise EndpointError(f"TLS handshake with {self.display} failed: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise EndpointError(f"cannot connect to {self.display}: {_os_reason(exc.os_error)}") from exc
        except TimeoutError as exc:
            raise EndpointError(
                f"no answer from {self.display} within {self.settings.timeout_seconds:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise EndpointError(f"request to {self.display} failed: {type(exc).__name__}: {exc}") from exc


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    """The body of a JSON answer; ``EndpointError`` beyond ``MAX_ANSWER_BYTES``."""
    limit = MAX_ANSWER_BYTES
    if resp.content_length is not None and resp.content_length > limit:
        raise EndpointError(f"HTTP {resp.status}: the answer is larger than {limit} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 20):
        body += chunk
        if len(body) > limit:
            raise EndpointError(f"HTTP {resp.status}: the answer is larger than {limit} bytes")
    return bytes(body)


def _os_reason(err: OSError) -> str:
    if isinstance(err, socket.gaierror):
        return err.strerror or str(err)
    if err.errno:
        return os.strerror(err.errno)
    return err.strerror or str(err) or type(err).__name__


def _unwrap(status: int, reason: str | None, retry_after: str | None, raw: bytes) -> Any:
    try:
        doc = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        doc = None
    if 200 <= status < 300:
        if isinstance(doc, dict) and "result" in doc:
            return doc["result"]
        if not raw:
            return None
        raise EndpointError(f"HTTP {status}: the response is not an API envelope")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        code = doc.get("code")
        raise ApiCallError(status, code if isinstance(code, str) else "unknown", doc["error"], retry_after)
    raise ApiCallError(status, f"http_{status}", f"HTTP {status} {reason or ''}".strip(), retry_after)
