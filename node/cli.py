"""The ``quorumd`` command: ``run``, ``demo``, ``recover``, ``backup verify``, ``restore`` and
``version``.

Exit codes: 0 clean stop, 2 bad configuration or usage (the message names the key), 1 any other
fatal error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from quorumd.node.config.schema import Config, ConfigError, load_config
from quorumd.node.version import PROTOCOL_VERSION, VERSION

log = logging.getLogger(__name__)


def _config(path: str) -> Config | None:
    """The validated config, or None after printing the error that names the key (exit 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"quorumd: config error: {exc}", file=sys.stderr)
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    if cfg is None:
        return 2
    from quorumd.node.daemon.datadir import FatalError, disk_full_message
    from quorumd.node.daemon.logs import configure_logging
    from quorumd.node.daemon.root import main_async

    secrets = [cfg.cluster.join_token] if cfg.cluster.join_token else []
    configure_logging(cfg.log_level, cfg.log_format, cfg.node_id, secrets=secrets)
    try:
        import uvloop

        return int(uvloop.run(main_async(cfg)))
    except FatalError as exc:
        log.error("fatal error=%s", exc)
        print(f"quorumd: {exc}", file=sys.stderr)
        return exc.exit_code  # 2: a data dir in a newer format (nothing changed)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        # Disk full anywhere (a WAL write, a snapshot, node.json): one line naming the path, no
        # traceback. Other OS errors likewise; anything else is a bug and keeps its traceback.
        message = disk_full_message(exc)
        if message is None and not isinstance(exc, OSError):
            raise
        log.error("fatal error=%s", message or exc)
        print(f"quorumd: {message or exc}", file=sys.stderr)
        return 1


def _cmd_recover(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    if cfg is None:
        return 2
    from quorumd.node.tools.recover import RecoverError, parse_peers, recover

    try:
        peers = parse_peers(args.peers)
        summary = recover(cfg, peers)
    except RecoverError as exc:
        print(f"quorumd recover: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0


def _cmd_backup_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quorumd.node.tools.backup import BackupToolError, verify

    try:
        print(verify(Path(args.file)))
    except BackupToolError as exc:
        print(f"quorumd backup verify: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    cfg = _config(args.config)
    if cfg is None:
        return 2
    from quorumd.node.tools.backup import BackupToolError, restore

    try:
        print(restore(cfg, Path(args.archive)))
    except BackupToolError as exc:
        print(f"quorumd restore: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quorumd restore: interrupted, nothing kept in {cfg.data_dir}", file=sys.stderr)
        return 130
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from quorumd.node.tools.demo import run_demo

    return run_demo(nodes=args.nodes, base_port=args.base_port, directory=args.dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quorumd", description="Raft membership daemon with an HTTPS API")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", required=True)
    d = sub.add_parser("demo", help="start a local cluster on 127.0.0.1")
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--base-port", type=int, default=15000)
    d.add_argument("--dir", default=None)
    rc = sub.add_parser("recover", help="offline quorum-loss recovery: rewrite the stored voters")
    rc.add_argument("--config", required=True)
    rc.add_argument("--peers", required=True, help="ID=HOST:PORT,...")
    b = sub.add_parser("backup", help="offline backup tools")
    bsub = b.add_subparsers(dest="backup_cmd", required=True)
    bv = bsub.add_parser("verify", help="check a backup archive and print its summary")
    bv.add_argument("file")
    rs = sub.add_parser("restore", help="offline: found a cluster from a backup archive (empty data-dir)")
    rs.add_argument("--config", required=True)
    rs.add_argument("--from", dest="archive", required=True, help="backup archive file")
    sub.add_parser("version", help="print the version and the protocol version")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.cmd == "version":
        print(f"quorumd {VERSION} (protocol {PROTOCOL_VERSION})")
        return 0
    if args.cmd == "run":
        return _cmd_run(args)
    if args.cmd == "recover":
        return _cmd_recover(args)
    if args.cmd == "backup":
        return _cmd_backup_verify(args)
    if args.cmd == "restore":
        return _cmd_restore(args)
    return _cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
