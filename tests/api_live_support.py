"""Helpers for the real-daemon API tests (tests/test_api_live.py, tests/integration/test_ctl_live.py).

- ``DOC``/``OPS``: the OpenAPI document the code builds, and its operations; tests walk these so a
  new route without a live test fails.
- ``request``: one HTTPS request with full control over method, raw body, headers and the client's
  *source address*. Every 127.x.y.z address reaches a node listening on 127.0.0.1, and each node
  rate-limits failed authentications per client address (20 a minute), so tests that present bad
  tokens use a fresh source address (``fresh_source``) and never lock the other tests out.
- ``check_documented``: a response is documented for its operation, its body matches the schema
  of that status, error bodies are the ``{"error", "code"}`` envelope with a documented code.
- ``form_with_manual_promotion``: a cluster whose autopilot never promotes on its own (long
  stabilization time), so nonvoters stay nonvoters until a test promotes them.
- ``LoadThread``: a bounded background writer (lease allocate/release) for the fuzz.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jsonschema import Draft202012Validator

from quorumd.api.app import all_routes
from quorumd.api.openapi import build_document
from quorumd.api.pipeline import Route
from tests import api_support
from tests.cluster import Cluster, wait_for

DOC: dict[str, Any] = build_document(all_routes())
ROUTES: dict[tuple[str, str], Route] = {(r.method.upper(), r.path): r for r in all_routes()}


def _op_rank(op: tuple[str, str]) -> tuple[int, str, str]:
    """Creations first, reads next, deletions last (so a walk in this order reuses what it made)."""
    method, path = op
    return ({"POST": 0, "GET": 1, "DELETE": 2}.get(method, 3), path, method)


OPS: list[tuple[str, str]] = sorted(
    ((m.upper(), p) for p, ops in DOC["paths"].items() for m in ops), key=_op_rank
)
PROXY_STATUSES = frozenset({502, 503, 504})
BAD_TOKEN = "qd_0123456789ab_" + "A" * 43  # well-formed, never issued


def bad_token() -> str:
    """A well-formed token never issued, with a token id of its own: the failed-authentication
    limiter counts per presented token id too, so tests that expect 401 must not share one."""
    return f"qd_{secrets.token_hex(6)}_" + "A" * 43


MANUAL_PROMOTION: dict[str, Any] = {
    # Autopilot never promotes by itself during a test run, so joined nodes stay nonvoters until
    # a test promotes them; a small trailing-logs bound makes "not caught up" cheap to provoke.
    "autopilot": {"server-stabilization-time": "1h", "max-trailing-logs": 20},
}

_SSL = ssl.create_default_context()
_SSL.check_hostname = False
_SSL.verify_mode = ssl.CERT_NONE


def op_doc(method: str, template: str) -> dict[str, Any]:
    return dict(DOC["paths"][template][method.lower()])


def op_role(method: str, template: str) -> str:
    return str(op_doc(method, template)["x-quorumd-role"])


def is_cluster_route(template: str) -> bool:
    return template.startswith("/api/v1/cluster/")


# --- source addresses -------------------------------------------------------------------------
_SOURCE_COUNTER = itertools.count(1)
_SOURCE_LOCK = threading.Lock()


def fresh_source() -> str:
    """A loopback client address no other request used (127.1.0.1, 127.1.0.2, ...)."""
    with _SOURCE_LOCK:
        n = next(_SOURCE_COUNTER)
    return f"127.{1 + n // 65025 % 254}.{1 + n // 255 % 255}.{1 + n % 255}"


# --- requests ---------------------------------------------------------------------------------
@dataclass
class LiveReply:
    status: int
    body: Any
    headers: dict[str, str]  # keys lower-cased
    raw: bytes
    method: str = ""
    path: str = ""

    @property
    def result(self) -> Any:
        assert isinstance(self.body, dict) and "result" in self.body, (self.status, self.body)
        return self.body["result"]

    @property
    def code(self) -> str:
        assert isinstance(self.body, dict) and "code" in self.body, (self.status, self.body)
        return str(self.body["code"])

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status} {self.raw[:300]!r}"


_NO_BODY: Any = object()


def request(
    base: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = _NO_BODY,
    raw: bytes | None = None,
    query: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
    source: str | None = None,
    timeout: float = 15.0,
    headers: Mapping[str, str] | None = None,
) -> LiveReply:
    """One HTTPS request to ``base`` (``https://host:port``); ``path`` is already encoded."""
    url = urlsplit(base)
    assert url.hostname is not None and url.port is not None, base
    data = raw if raw is not None else (None if body is _NO_BODY else json.dumps(body).encode())
    target = path
    if query:
        pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
        target += "?" + urlencode(pairs)
    hdrs = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPSConnection(
        url.hostname,
        url.port,
        context=_SSL,
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    try:
        conn.request(method, target, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
        status = resp.status
    finally:
        conn.close()
    parsed: Any
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload.decode("utf-8", "replace")
    return LiveReply(status, parsed, got, payload, method, target)


def fill(template: str, values: Mapping[str, Any] | None = None) -> str:
    """The template with each ``{name}`` replaced by the percent-encoded value."""
    path = template
    for name, value in (values or {}).items():
        path = path.replace("{" + name + "}", quote(str(value), safe=""))
    assert "{" not in path, f"unfilled path parameter in {path}"
    return path


# --- documentation checks -----------------------------------------------------------------------
def resolve_refs(node: Any) -> Any:
    """``node`` with the served document's references inlined."""
    return api_support.resolve_refs(node, DOC)


_VALIDATORS: dict[tuple[str, str, int], Draft202012Validator] = {}
_TRACE = re.compile(r"Traceback|File \"|\.py\", line")


def check_envelope(r: LiveReply) -> None:
    """Any JSON error answer (documented route or not) is the API's envelope, no stack trace."""
    assert r.status < 500 or r.status in PROXY_STATUSES, f"server error: {r}"
    assert not _TRACE.search(r.raw.decode("utf-8", "replace")), f"stack trace in body: {r}"
    if r.status >= 400:
        assert isinstance(r.body, dict), r
        assert set(r.body) == {"error", "code"}, r
        assert isinstance(r.body["error"], str) and r.body["error"], r
        assert re.fullmatch(r"[a-z][a-z0-9_]*", r.body["code"]), r
        if r.status in (429, 503):
            assert (r.header("Retry-After") or "").isdigit(), f"{r} without Retry-After"
        if r.status == 401:
            assert (r.header("WWW-Authenticate") or "").startswith("Bearer"), r


def check_documented(method: str, template: str, r: LiveReply) -> None:
    """``r`` is a documented answer of the operation and matches its schema."""
    check_envelope(r)
    op = op_doc(method, template)
    documented = op["responses"].get(str(r.status))
    assert documented is not None, f"{method} {template}: undocumented status: {r}"
    content = documented.get("content", {})
    ctype = r.header("Content-Type") or ""
    if "application/json" in content:
        assert ctype.startswith("application/json"), (ctype, str(r))
        key = (method, template, r.status)
        validator = _VALIDATORS.get(key)
        if validator is None:
            schema = resolve_refs(content["application/json"]["schema"])
            validator = _VALIDATORS[key] = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(r.body), key=str)
        assert not errors, f"{method} {template} {r.status}: {errors[0].message}: {r}"
        if r.status >= 400:
            assert r.body["code"] in documented["x-error-codes"], f"undocumented code: {r}"
    else:
        assert ctype.split(";")[0] in content, (ctype, str(r))
        if r.status < 300:
            missing = {h for h in documented.get("headers", {}) if r.header(h) is None}
            assert not missing, f"{method} {template}: documented headers missing: {missing}"


# --- cluster helpers ----------------------------------------------------------------------------
def admin_request(c: Cluster, node_id: int, method: str, path: str, **kw: Any) -> LiveReply:
    return request(c.nodes[node_id].api, method, path, token=c.token, **kw)


def voters(c: Cluster, via: int | None = None) -> set[int]:
    return {m["nodeId"] for m in c.members(via) if m["suffrage"] == "voter"}


def promote_when_caught_up(c: Cluster, node_id: int, timeout: float = 60.0) -> None:
    """Promote ``node_id`` through the leader, retrying while it is not caught up yet."""

    def attempt() -> bool:
        lead = c.wait_leader()
        r = admin_request(c, lead, "POST", f"/api/v1/cluster/members/{node_id}/promote")
        if r.status == 409 and r.code == "already_voter":
            return True
        if (r.status == 409 and r.code == "not_caught_up") or r.status in PROXY_STATUSES:
            return False
        assert r.status == 200, str(r)
        return True

    wait_for(f"node {node_id} promoted", attempt, timeout, interval=0.2)


def form_with_manual_promotion(c: Cluster) -> Cluster:
    """``c.form()`` for a cluster built with ``MANUAL_PROMOTION``: joiners are promoted here."""
    c.form(voters=False)
    for nid in range(2, c.n + 1):
        c.wait_member(nid)
    for nid in range(2, c.n + 1):
        c.wait_ready(nid, 60)  # caught up, so the promotion does not wait
        promote_when_caught_up(c, nid)
    c.wait_voters(set(range(1, c.n + 1)))
    for nid in range(1, c.n + 1):
        c.wait_ready(nid)
    return c


def join_nonvoters(c: Cluster, node_ids: Sequence[int]) -> None:
    """Join ``node_ids`` together (nonvoters under ``MANUAL_PROMOTION``); wait until each caught up."""
    for nid in node_ids:
        c.add_node(nid, start_only=True)
    for nid in node_ids:
        c.wait_member(nid)
    lead = c.wait_leader()
    for nid in node_ids:
        c.wait_ready(nid, 60)
        wait_for(f"node {nid} caught up", lambda nid=nid: c.applied(nid) >= c.applied(lead) - 2, 30)


def retire(c: Cluster, node_id: int) -> None:
    """Force-remove ``node_id`` (if still a member) and stop its process."""
    if node_id in {m["nodeId"] for m in c.members()}:

        def removed() -> bool:
            r = admin_request(
                c, c.wait_leader(), "DELETE", f"/api/v1/cluster/members/{node_id}", query={"force": "true"}
            )
            return r.status in (200, 404)

        wait_for(f"node {node_id} removed", removed, 30, interval=0.2)
    c.stop(node_id, timeout=15)
    c.nodes.pop(node_id, None)


def shutdown(c: Cluster, grace_seconds: float = 2.0) -> None:
    """Stop every node at once: SIGTERM to all, then SIGKILL whatever is still running after
    ``grace_seconds`` (a test cluster's teardown; ``Cluster.close`` stops them one by one, and
    the last ones each wait out a propose timeout trying to announce their leave)."""
    procs = [n.proc for n in c.nodes.values() if n.proc is not None and n.proc.poll() is None]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    c.close()  # nothing left to stop; keeps the harness's own bookkeeping


@contextlib.contextmanager
def paused(c: Cluster, node_id: int) -> Iterator[None]:
    """SIGSTOP the node for the block; SIGCONT always."""
    proc = c.nodes[node_id].proc
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def create_token(c: Cluster, role: str, name: str, via: int | None = None) -> dict[str, Any]:
    nid = via or c.wait_leader()
    r = admin_request(c, nid, "POST", "/api/v1/tokens", body={"name": name, "role": role})
    assert r.status == 201, str(r)
    return dict(r.result)


def wait_token_everywhere(c: Cluster, token: str, accepted: bool = True, timeout: float = 30.0) -> None:
    """Wait until every live node accepts (or refuses with 401) ``token`` on a readonly route."""

    def check() -> bool:
        for node in c.nodes.values():
            if not node.alive():
                continue
            r = request(node.api, "GET", "/api/v1/pools", token=token, source=fresh_source())
            if (r.status == 200) != accepted or (not accepted and r.status != 401):
                return False
        return True

    wait_for(f"token {'accepted' if accepted else 'refused'} on every node", check, timeout)


# --- background write load ----------------------------------------------------------------------
@dataclass
class LoadThread:
    """Allocates and releases leases in ``pool`` round-robin over ``node_ids`` until stopped.

    Bounded in operations and in time. Every answer is checked against the document by the caller
    after ``stop()`` (the thread only records them, so a failure is reported in the test thread).
    """

    cluster: Cluster
    node_ids: Sequence[int]
    pool: str
    max_ops: int = 4000
    max_seconds: float = 90.0
    replies: list[tuple[str, str, LiveReply]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="api-live-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "load thread did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            for i in range(self.max_ops):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                nid = self.node_ids[i % len(self.node_ids)]
                base = self.cluster.nodes[nid].api
                tok = self.cluster.token
                r = request(
                    base, "POST", "/api/v1/leases", token=tok, body={"pool": self.pool, "holder": f"ld{i}"}
                )
                self.replies.append(("POST", "/api/v1/leases", r))
                if r.status in (200, 201):
                    lease_id = r.result["id"]
                    r = request(base, "DELETE", f"/api/v1/leases/{lease_id}", token=tok)
                    self.replies.append(("DELETE", "/api/v1/leases/{id}", r))
        except BaseException as exc:  # reported by the test thread
            self.errors.append(exc)

    def successes(self) -> int:
        return sum(1 for _, _, r in self.replies if r.status < 300)


# --- the shared cluster of tests/integration/api ---------------------------------------------------
VIAS = ("leader", "follower")
WALK_POOL = "walk"
LOAD_POOL = "load"
NOT_A_MEMBER = 42
MESSAGES = {
    ("DELETE", "/api/v1/cluster/members/{id}"): "Cluster member removed",
    ("POST", "/api/v1/cluster/members/{id}/promote"): "Cluster member promoted to voter",
    ("POST", "/api/v1/cluster/members/{id}/resume"): "Cluster member resumed",
}


def op_id(op: tuple[str, str]) -> str:
    return f"{op[0]} {op[1]}"


@dataclass
class Live:
    """The shared cluster, its readonly token, and the calls made through it."""

    c: Cluster
    readonly: str
    spares: dict[str, int] = field(default_factory=dict)
    next_spare: int = 10
    log: list[tuple[int, str, str, int]] = field(default_factory=list)

    def leader(self) -> int:
        return self.c.wait_leader()

    def followers(self) -> list[int]:
        lead = self.leader()
        ms = self.c.members(lead)
        return sorted(
            m["nodeId"]
            for m in ms
            if m["nodeId"] != lead
            and m["suffrage"] == "voter"
            and m["drainState"] == "active"
            and self.c.nodes[m["nodeId"]].alive()
        )

    def node(self, via: str) -> int:
        return self.leader() if via == "leader" else self.followers()[0]

    def token_for(self, kind: str | None) -> str | None:
        return {"admin": self.c.token, "readonly": self.readonly}.get(kind or "", kind)

    def call(
        self,
        nid: int,
        method: str,
        template: str,
        values: dict[str, Any] | None = None,
        *,
        token: str | None = "admin",
        body: Any = _NO_BODY,
        raw: bytes | None = None,
        query: Any = None,
        source: str | None = None,
        timeout: float = 20.0,
    ) -> LiveReply:
        """One request of a documented operation on node ``nid``; the answer is checked."""
        tok = self.token_for(token)
        if source is None and tok not in (None, self.c.token, self.readonly):
            source = fresh_source()  # a wrong token: keep the failed-auth limiter away from others
        r = request(
            self.c.nodes[nid].api,
            method,
            fill(template, values),
            token=tok,
            body=body,
            raw=raw,
            query=query,
            source=source,
            timeout=timeout,
        )
        check_documented(method, template, r)
        self.log.append((nid, method, template, r.status))
        return r

    def members(self, nid: int, *, consistent: bool = False) -> dict[int, dict[str, Any]]:
        """The member list served by ``nid``. Its local replica sees ``nid``'s own writes at once
        (read-your-writes); for writes made through other nodes, read with ``consistent``."""
        query = {"consistent": "true"} if consistent else None
        r = self.call(nid, "GET", "/api/v1/cluster/members", query=query)
        return {m["nodeId"]: m for m in r.result}

    def spare(self, role: str) -> int:
        """A joined, caught-up member for one test (``role``: leader, follower, lagging); the
        first call joins one for every role at once. Ids are never reused (a removed node's data
        directory stays behind)."""
        sid = self.spares.get(role)
        if sid is None or sid not in self.c.nodes:
            # the first call joins all of them in parallel; later calls just the missing one
            wanted = [role] if self.spares else list(dict.fromkeys([role, *SPARE_ROLES]))
            for r in wanted:
                self.spares[r] = self.next_spare
                self.next_spare += 1
            join_nonvoters(self.c, [self.spares[r] for r in wanted])
            sid = self.spares[role]
        return sid


SPARE_ROLES = ("leader", "follower", "lagging")


def drain_target(live: Live, nid: int) -> int:
    return next(f for f in live.followers() if f != nid)


def path_values(template: str) -> dict[str, str]:
    if "{name}" in template:
        return {"name": "nope"}
    if template.startswith("/api/v1/tokens/"):
        return {"id": "000000000000"}
    if "{id}" in template:
        return {"id": str(NOT_A_MEMBER)}
    return {}


def auth_probe(method: str, template: str) -> tuple[dict[str, str], Any]:
    values = path_values(template)
    if template == "/api/v1/cluster/members/{id}" or "/members/{id}/" in template:
        values = {"id": "2"}
    if template == "/api/v1/pools/{name}":
        values = {"name": WALK_POOL}
    body = {"deadlineSeconds": 0} if template.endswith("/drain") else _NO_BODY
    return values, body
