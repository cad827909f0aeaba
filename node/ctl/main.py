"""``quorumctl``: the API client for every operation of the API.

``quorumctl [--endpoint URL] [--token T | --token-file F] [--cacert F | --insecure] [-o table|json]
[--timeout S] CMD``. The global options may also follow the command (``quorumctl members list -o json``).
Endpoint: ``--endpoint``, else ``$QUORUMD_ENDPOINT``, else ``https://127.0.0.1:5002``. Token:
``--token``, else ``--token-file`` (read and stripped), else ``$QUORUMD_TOKEN``.

Output: aligned tables (``-o table``, the default) or the envelope's ``result`` as JSON (``-o json``).
Exit codes: 0 success; 1 the API answered with an error (``error: <message> (<code>) [HTTP n]`` on
stderr); 2 usage error (bad arguments, unreadable token or CA file); 3 the endpoint cannot be
reached or does not speak the API (connection refused, DNS, TLS verification, timeout, an answer
that is not JSON or larger than ``client.MAX_ANSWER_BYTES``); 141 the output's reader went away.

The argument tree and the handlers live here; the HTTP session and error mapping in
``ctl_client``; the tables in ``ctl_format``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from quorumd.node.ctl import backup as ctl_backup
from quorumd.node.ctl import format as fmt
from quorumd.node.ctl.client import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT_SECONDS,
    ApiCallError,
    ClientSettings,
    CtlClient,
    EndpointError,
    LocalError,
    SettingsError,
)

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

LEASE_PAGE_DEFAULT = 1000
MAX_TOKEN_FILE_BYTES = 64 << 10


class UsageError(Exception):
    """Bad command-line input that argparse cannot see (conflicting options, unreadable files)."""


@dataclass(frozen=True, slots=True)
class Output:
    result: Any
    render: Callable[[Any], str]


Handler = Callable[[CtlClient, argparse.Namespace], Awaitable[Output]]


@dataclass(frozen=True, slots=True)
class Invocation:
    settings: ClientSettings
    output: str
    args: argparse.Namespace
    handler: Handler


def _seg(value: object) -> str:
    """One URL path segment."""
    return quote(str(value), safe="")


def _message(default: str) -> Callable[[Any], str]:
    def render(result: Any) -> str:
        if isinstance(result, Mapping) and isinstance(result.get("message"), str):
            return fmt.cell(result["message"])
        return default

    return render


def _consistent(args: argparse.Namespace) -> dict[str, str]:
    return {"consistent": "true"} if getattr(args, "consistent", False) else {}


# --- handlers ----------------------------------------------------------------------------------


async def _status(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", "/status"), fmt.status)


async def _members_list(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", "/cluster/members", query=_consistent(a)), fmt.members)


async def _members_remove(c: CtlClient, a: argparse.Namespace) -> Output:
    query = {"force": "true"} if a.force else {}
    result = await c.call("DELETE", f"/cluster/members/{_seg(a.id)}", query=query)
    return Output(result, _message(f"Cluster member {a.id} removed"))


async def _members_promote(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("POST", f"/cluster/members/{_seg(a.id)}/promote")
    return Output(result, _message(f"Cluster member {a.id} promoted to voter"))


async def _members_drain(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call(
        "POST", f"/cluster/members/{_seg(a.id)}/drain", body={"deadlineSeconds": a.deadline}
    )

    def render(r: Any) -> str:
        state = r.get("drainState") if isinstance(r, Mapping) else None
        return f"Cluster member {a.id} drain state: {fmt.cell(state)}"

    return Output(result, render)


async def _members_resume(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("POST", f"/cluster/members/{_seg(a.id)}/resume")
    return Output(result, _message(f"Cluster member {a.id} resumed"))


async def _members_rotate_certificate(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("POST", f"/cluster/members/{_seg(a.id)}/rotate-certificate")

    def render(r: Any) -> str:
        fp = r.get("certificateFingerprint") if isinstance(r, Mapping) else None
        until = r.get("certificateExpiresAt") if isinstance(r, Mapping) else None
        return f"Cluster member {a.id} certificate rotated: {fmt.cell(fp)} (expires {fmt.cell(until)})"

    return Output(result, render)


async def _members_set_address(c: CtlClient, a: argparse.Namespace) -> Output:
    body = {k: v for k, v in (("raftAddress", a.raft), ("apiAddress", a.api)) if v is not None}
    result = await c.call("PATCH", f"/cluster/members/{_seg(a.id)}", body=body)
    return Output(result, fmt.member)


async def _autopilot(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", "/cluster/autopilot"), fmt.autopilot)


async def _what_if(c: CtlClient, a: argparse.Namespace) -> Output:
    query = {k: v for k in ("remove", "fail", "drain", "promote") if (v := getattr(a, k))}
    return Output(await c.call("GET", "/cluster/autopilot/what-if", query=query), fmt.what_if)


async def _join_token_create(c: CtlClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"nodeID": a.node_id}
    if a.ttl is not None:
        body["ttlSeconds"] = a.ttl
    return Output(await c.call("POST", "/cluster/pki/join-tokens", body=body), fmt.join_token)


async def _tokens_create(c: CtlClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"name": a.name, "role": a.role}
    if a.ttl is not None:
        body["ttlSeconds"] = a.ttl
    return Output(await c.call("POST", "/tokens", body=body), fmt.created_token)


async def _tokens_list(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", "/tokens", query=_consistent(a)), fmt.tokens)


async def _tokens_revoke(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("DELETE", f"/tokens/{_seg(a.id)}")
    return Output(result, _message(f"Token {fmt.cell(a.id)} revoked"))


async def _pools_create(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("POST", "/pools", body={"name": a.name, "cidr": a.cidr}), fmt.pool)


async def _pools_list(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", "/pools", query=_consistent(a)), fmt.pools)


async def _pools_get(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await c.call("GET", f"/pools/{_seg(a.name)}", query=_consistent(a)), fmt.pool)


async def _pools_delete(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("DELETE", f"/pools/{_seg(a.name)}")
    return Output(result, _message(f"Pool {fmt.cell(a.name)} deleted"))


async def _leases_allocate(c: CtlClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"pool": a.pool, "holder": a.holder}
    if a.node_id is not None:
        body["nodeId"] = a.node_id
    return Output(await c.call("POST", "/leases", body=body), fmt.lease)


async def _leases_list(c: CtlClient, a: argparse.Namespace) -> Output:
    query = _consistent(a)
    if a.node_id is not None:
        query["nodeId"] = str(a.node_id)
    if a.pool is not None:
        query["pool"] = a.pool
    if not a.all:
        if a.limit is not None:
            query["limit"] = str(a.limit)
        if a.after is not None:
            query["after"] = str(a.after)
        return Output(await c.call("GET", "/leases", query=query), fmt.leases)
    # --all: follow ``after`` until a short page.
    limit = a.limit if a.limit is not None else LEASE_PAGE_DEFAULT
    after: int | None = a.after
    items: list[Any] = []
    while True:
        page_query = dict(query, limit=str(limit))
        if after is not None:
            page_query["after"] = str(after)
        page = await c.call("GET", "/leases", query=page_query)
        if not isinstance(page, list):
            raise EndpointError("GET /leases did not return a list")
        items.extend(page)
        if len(page) < limit or not page:
            break
        last = page[-1].get("id") if isinstance(page[-1], Mapping) else None
        if not isinstance(last, int) or (after is not None and last <= after):
            raise EndpointError("GET /leases pagination did not advance")
        after = last
    return Output(items, fmt.leases)


async def _leases_release(c: CtlClient, a: argparse.Namespace) -> Output:
    result = await c.call("DELETE", f"/leases/{_seg(a.id)}")
    return Output(result, _message(f"Lease {a.id} released"))


async def _audit(c: CtlClient, a: argparse.Namespace) -> Output:
    query = _consistent(a)
    for name in ("after", "action", "limit", "actor"):
        value = getattr(a, name)
        if value is not None:
            query[name] = str(value)
    return Output(await c.call("GET", "/audit", query=query), fmt.audit)


# --- arguments ---------------------------------------------------------------------------------


async def _backup_save(c: CtlClient, a: argparse.Namespace) -> Output:
    return Output(await ctl_backup.save(c, a.file), ctl_backup.render)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return value


def _id_list(text: str) -> str:
    """Comma-separated node ids (1..63), passed on as ``1,2``."""
    ids = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a node id: {part.strip()!r}") from None
        if not 1 <= value <= 63:
            raise argparse.ArgumentTypeError(f"node ids are 1..63: {value}")
        ids.append(str(value))
    return ",".join(ids)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _common_options() -> argparse.ArgumentParser:
    """Global options, accepted before or after the command (defaults resolved in ``parse``)."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    g = p.add_argument_group("connection")
    g.add_argument(
        "--endpoint", default=s, help=f"API URL (env QUORUMD_ENDPOINT, default {DEFAULT_ENDPOINT})"
    )
    g.add_argument("--token", default=s, help="API token (env QUORUMD_TOKEN)")
    g.add_argument("--token-file", default=s, help="read the API token from this file")
    g.add_argument("--cacert", default=s, help="trust this CA or self-signed certificate (PEM)")
    g.add_argument("--insecure", action="store_true", default=s, help="do not verify the TLS certificate")
    g.add_argument("-o", "--output", choices=("table", "json"), default=s, help="output format (table)")
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=s,
        help=f"request timeout in seconds ({DEFAULT_TIMEOUT_SECONDS:g})",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    p = argparse.ArgumentParser(
        prog="quorumctl", description="quorumd API client", parents=[common], allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(parent: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text, parents=[common], allow_abbrev=False
        )
        sp.set_defaults(handler=handler)
        return sp

    def group(name: str, help_text: str) -> Any:
        gp = sub.add_parser(name, help=help_text, description=help_text)
        return gp.add_subparsers(dest="action", required=True, metavar="ACTION")

    leaf(sub, "status", _status, "show this node's status")

    members = group("members", "list and manage cluster members")
    sp = leaf(members, "list", _members_list, "list cluster members")
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")
    sp = leaf(members, "remove", _members_remove, "remove a member (must be drained unless --force)")
    sp.add_argument("id", type=int, metavar="ID")
    sp.add_argument("--force", action="store_true", help="remove even when not drained")
    sp = leaf(members, "promote", _members_promote, "promote a nonvoter to voter")
    sp.add_argument("id", type=int, metavar="ID")
    sp = leaf(members, "drain", _members_drain, "drain a member")
    sp.add_argument("id", type=int, metavar="ID")
    sp.add_argument(
        "--deadline", type=_non_negative, default=0, metavar="S",
        help="seconds to wait for active leases to reach zero (0 = drain now and wait)",
    )  # fmt: skip
    sp = leaf(members, "resume", _members_resume, "resume a drained or draining member")
    sp.add_argument("id", type=int, metavar="ID")
    sp = leaf(members, "rotate-certificate", _members_rotate_certificate, "give a member a new certificate")
    sp.add_argument("id", type=int, metavar="ID")
    sp = leaf(members, "set-address", _members_set_address, "record new addresses of a member that is down")
    sp.add_argument("id", type=int, metavar="ID")
    sp.add_argument("--raft", metavar="HOST:PORT", help="its new cluster address (advertise-address)")
    sp.add_argument("--api", metavar="URL", help="its new API address, https://host:port")

    leaf(sub, "autopilot", _autopilot, "show autopilot's health view, reasons and promotion times")
    sp = leaf(sub, "what-if", _what_if, "show the cluster as it would be after a change (changes nothing)")
    for name, what in (
        ("remove", "removed"),
        ("fail", "failed"),
        ("drain", "drained"),
        ("promote", "promoted"),
    ):
        sp.add_argument(
            f"--{name}", type=_id_list, default=None, metavar="IDS", help=f"comma-separated node ids {what}"
        )

    jt = group("join-token", "mint join tokens")
    sp = leaf(jt, "create", _join_token_create, "mint a single-use join token for a node id")
    sp.add_argument("--node-id", type=int, required=True, metavar="N")
    sp.add_argument("--ttl", type=_positive, default=None, metavar="S", help="lifetime in seconds (1800)")

    tokens = group("tokens", "manage API tokens")
    sp = leaf(tokens, "create", _tokens_create, "create an API token (the secret is shown once)")
    sp.add_argument("--name", required=True)
    sp.add_argument("--role", required=True, choices=("admin", "readonly"))
    sp.add_argument("--ttl", type=_positive, default=None, metavar="S", help="lifetime in seconds")
    sp = leaf(tokens, "list", _tokens_list, "list API tokens")
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")
    sp = leaf(tokens, "revoke", _tokens_revoke, "revoke an API token")
    sp.add_argument("id", metavar="ID")

    pools = group("pools", "manage address pools")
    sp = leaf(pools, "create", _pools_create, "create an address pool")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("cidr", metavar="CIDR")
    sp = leaf(pools, "list", _pools_list, "list address pools")
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")
    sp = leaf(pools, "get", _pools_get, "show one address pool")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")
    sp = leaf(pools, "delete", _pools_delete, "delete an address pool")
    sp.add_argument("name", metavar="NAME")

    leases = group("leases", "allocate, list and release address leases")
    sp = leaf(leases, "allocate", _leases_allocate, "allocate an address (or return the holder's lease)")
    sp.add_argument("--pool", required=True)
    sp.add_argument("--holder", required=True)
    sp.add_argument(
        "--node-id", type=int, default=None, metavar="N", help="owner node (default: serving node)"
    )
    sp = leaf(leases, "list", _leases_list, "list leases, sorted by id")
    sp.add_argument("--node-id", type=int, default=None, metavar="N")
    sp.add_argument("--pool", default=None)
    sp.add_argument(
        "--limit", type=_positive, default=None, metavar="L", help="page size (server default 1000)"
    )
    sp.add_argument("--after", type=_non_negative, default=None, metavar="A", help="last lease id seen")
    sp.add_argument("--all", action="store_true", help="follow pagination to the end")
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")
    sp = leaf(leases, "release", _leases_release, "release a lease")
    sp.add_argument("id", type=int, metavar="ID")

    sp = leaf(sub, "audit", _audit, "list audit records, oldest first")
    sp.add_argument("--after", type=_non_negative, default=None, metavar="ID", help="last record id seen")
    sp.add_argument("--action", default=None, metavar="A", help="only this action (e.g. member_remove)")
    sp.add_argument("--actor", default=None, metavar="TOKEN-ID", help="only records made by this token id")
    sp.add_argument(
        "--limit", type=_positive, default=None, metavar="N", help="page size (server default 100, max 1000)"
    )
    sp.add_argument("--consistent", action="store_true", help="linearizable read through the leader")

    backup = group("backup", "download backup archives")
    sp = leaf(backup, "save", _backup_save, "save a backup archive to FILE (atomic, mode 0600)")
    sp.add_argument("file", metavar="FILE")
    return p


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if len(text) > MAX_TOKEN_FILE_BYTES:
        raise UsageError(f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token")
    token = text.strip()
    if not token:
        raise UsageError(f"token file {path} is empty")
    return token


def parse(argv: Sequence[str], env: Mapping[str, str]) -> Invocation:
    """Parse and resolve the command line. Raises ``UsageError`` or ``SystemExit`` (argparse)."""
    args = build_parser().parse_args(list(argv))
    token_arg: str | None = getattr(args, "token", None)
    token_file: str | None = getattr(args, "token_file", None)
    cacert: str | None = getattr(args, "cacert", None)
    insecure = bool(getattr(args, "insecure", False))
    if token_arg is not None and token_file is not None:
        raise UsageError("--token and --token-file are mutually exclusive")
    if cacert is not None and insecure:
        raise UsageError("--cacert and --insecure are mutually exclusive")
    if args.handler is _members_set_address and args.raft is None and args.api is None:
        raise UsageError("members set-address: give --raft HOST:PORT, --api URL or both")
    if token_arg is not None:
        token: str | None = token_arg.strip()
    elif token_file is not None:
        token = _read_token_file(token_file)
    else:
        token = env.get("QUORUMD_TOKEN", "").strip() or None
    if token is not None and (not token or any(ch.isspace() or not ch.isprintable() for ch in token)):
        raise UsageError("the API token is empty or contains whitespace or control characters")
    endpoint = getattr(args, "endpoint", None) or env.get("QUORUMD_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    settings = ClientSettings(
        endpoint=endpoint,
        token=token,
        cacert=cacert,
        insecure=insecure,
        timeout_seconds=getattr(args, "timeout", DEFAULT_TIMEOUT_SECONDS),
    )
    return Invocation(settings, getattr(args, "output", "table"), args, args.handler)


async def execute(inv: Invocation) -> int:
    """Run one parsed command, print its output, and return the exit code."""
    try:
        client = CtlClient(inv.settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        async with client:
            out = await inv.handler(client, inv.args)
    except ApiCallError as exc:
        hint = f"; retry after {exc.retry_after} s" if exc.retry_after else ""
        print(
            f"error: {fmt.cell(exc.message)} ({fmt.cell(exc.code)}) [HTTP {exc.status}]{hint}",
            file=sys.stderr,
        )
        return EXIT_API_ERROR
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except LocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    if inv.output == "json":
        print(json.dumps(out.result, indent=2))
    else:
        print(out.render(out.result))
    if inv.args.handler is _tokens_create and inv.output == "table":
        print("note: the token secret is shown only once; store it now", file=sys.stderr)
    return EXIT_OK


def _prepare(argv: Sequence[str] | None, env: Mapping[str, str] | None) -> Invocation | int:
    try:
        return parse(sys.argv[1:] if argv is None else argv, os.environ if env is None else env)
    except UsageError as exc:
        print(f"quorumctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


async def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``main`` for callers already inside an event loop (tests, embedding)."""
    inv = _prepare(argv, env)
    return inv if isinstance(inv, int) else await execute(inv)


def main(argv: list[str] | None = None) -> int:
    inv = _prepare(argv, None)
    if isinstance(inv, int):
        return inv
    try:
        code = asyncio.run(execute(inv))
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``quorumctl ... | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
