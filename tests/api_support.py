"""Shared fixtures for the API tests: two FakeNodes (leader 1, follower 2) behind real API servers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession
from prometheus_client import CollectorRegistry

from quorumd.api.app import Api, build_app
from quorumd.api.ports import DrainState, TokenRole
from quorumd.api.server import ApiServer
from tests.fakes.node import FakeCluster, FakeNode


@dataclass
class ManualClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]
    raw: bytes

    @property
    def result(self) -> Any:
        assert isinstance(self.body, dict) and "result" in self.body, self.body
        return self.body["result"]

    @property
    def code(self) -> str:
        assert isinstance(self.body, dict) and "code" in self.body, self.body
        assert isinstance(self.body["error"], str) and self.body["error"]
        return str(self.body["code"])


class Client:
    """An ``ApiServer`` for ``api`` on a loopback port and an aiohttp session against it."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.server: ApiServer | None = None
        self.session: ClientSession | None = None

    async def start(self) -> Client:
        self.server = ApiServer(self.api)
        port = await self.server.start("127.0.0.1", 0, ssl_context=None)
        self.session = ClientSession(base_url=f"http://127.0.0.1:{port}")
        return self

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.session is not None
        return self.session.request(method, path, **kwargs)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await self.server.close()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class Env:
    cluster: FakeCluster
    leader: FakeNode
    follower: FakeNode
    lc: Client
    fc: Client
    admin: str
    readonly: str
    clock: ManualClock
    registries: dict[int, CollectorRegistry] = field(default_factory=dict)

    def client(self, via: str) -> Client:
        return self.lc if via == "leader" else self.fc

    def node(self, via: str) -> FakeNode:
        return self.leader if via == "leader" else self.follower


async def request(
    client: Client,
    method: str,
    path: str,
    token: str | None = None,
    *,
    json_body: Any = None,
    data: bytes | str | None = None,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        data = json.dumps(json_body)
        hdrs.setdefault("Content-Type", "application/json")
    async with client.request(method, path, data=data, params=params, headers=hdrs) as resp:
        raw = await resp.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return Reply(resp.status, body, dict(resp.headers), raw)


def seed(cluster: FakeCluster) -> None:
    cluster.add_member(1)
    cluster.add_member(2)
    cluster.add_member(3)
    cluster.add_member(4, voter=False)
    cluster.add_member(5, voter=False, caught_up=False)
    cluster.add_member(6, voter=False, drain=DrainState.DRAINED)
    cluster.leader_id = 1


async def make_env(*, forward_timeout_seconds: float = 5.0) -> Env:
    cluster = FakeCluster()
    seed(cluster)
    clock = ManualClock()
    leader, follower = FakeNode(cluster, 1), FakeNode(cluster, 2)
    registries = {1: CollectorRegistry(), 2: CollectorRegistry()}
    clients = {}
    for node in (leader, follower):
        app = build_app(
            node,
            node_id=node.node_id,
            registry=registries[node.node_id],
            forward_timeout_seconds=forward_timeout_seconds,
            propose_timeout_seconds=5.0,
            clock=clock,
        )
        cluster.apps[node.node_id] = app
        clients[node.node_id] = await Client(app).start()
    _, admin = cluster.add_token(TokenRole.ADMIN, name="admin")
    _, readonly = cluster.add_token(TokenRole.READONLY, name="reader")
    return Env(cluster, leader, follower, clients[1], clients[2], admin, readonly, clock, registries)


async def close_env(env: Env) -> None:
    await env.lc.close()
    await env.fc.close()


def sample_path(template: str, doc: dict[str, Any], method: str) -> str:
    """A syntactically valid concrete path for an OpenAPI operation."""
    op = doc["paths"][template][method]
    path = template
    for p in op.get("parameters", []):
        if p["in"] != "path":
            continue
        schema = p["schema"]
        if schema.get("type") == "integer":
            value = "2" if "members" in template else "1"
        elif schema.get("pattern") == "^[0-9a-f]{12}$":
            value = "000000000001"
        else:
            value = "pool-a"
        path = path.replace("{" + p["name"] + "}", value)
    return path


def resolve_refs(node: Any, doc: dict[str, Any]) -> Any:
    """``node`` with every ``#/components/...`` reference inlined (the API's schemas are acyclic)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
            return resolve_refs(target, doc)
        return {k: resolve_refs(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_refs(v, doc) for v in node]
    return node


def check_response(doc: dict[str, Any], method: str, template: str, r: Reply) -> None:
    """The response is documented for the operation and its body matches the documented schema."""
    from jsonschema import Draft202012Validator

    op = doc["paths"][template][method.lower()]
    documented = op["responses"].get(str(r.status))
    assert documented is not None, f"{method} {template}: undocumented status {r.status}: {r.body!r}"
    content = documented.get("content", {})
    if "application/json" in content:
        assert r.headers["Content-Type"].startswith("application/json"), r.headers
        schema = resolve_refs(content["application/json"]["schema"], doc)
        errors = sorted(Draft202012Validator(schema).iter_errors(r.body), key=str)
        assert not errors, f"{method} {template} {r.status}: {errors[0].message} in {r.body!r}"
        if r.status >= 400:
            assert r.body["code"] in documented["x-error-codes"], (method, template, r.status, r.body)
    else:
        assert r.headers["Content-Type"].split(";")[0] in content, (list(content), r.headers)
        if r.status < 300:
            missing = set(documented.get("headers", {})) - set(r.headers)
            assert not missing, f"{method} {template}: documented headers missing: {missing}"
