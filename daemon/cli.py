"""The ``baton`` command line: agent, rotator, demo, status, check-config, store, node, rotate, retire, exec.

Exit status: 0 ok, 1 failure at run time, 2 bad usage or bad config (one line
per problem, naming the field path; never a traceback). Only
``baton store get --reveal`` prints a secret value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.config import Config, store_path_problem
from daemon.errors import BatonError, ConfigError, ListenError
from daemon.files.checks import load_checked


def _load(path: str) -> Config:
    try:
        return load_checked(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(config: Config) -> None:
    from daemon.kit import logs

    logs.setup(config.log.format, config.log.level)


# ---------------------------------------------------------------- commands


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args.file)
    print("ok")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _setup_logging(config)
    from daemon.agent.service import run_agent
    from daemon.api import raise_open_files_limit

    raise_open_files_limit()
    return run_agent(config, config_path=args.config)


def cmd_rotator(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _setup_logging(config)
    from daemon.api import raise_open_files_limit
    from daemon.rotation.service import run_rotator

    raise_open_files_limit()
    return run_rotator(config, config_path=args.config)


def _read_value(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def cmd_store(args: argparse.Namespace) -> int:
    from daemon.model import Secret
    from daemon.stores.base import check_payload
    from daemon.stores.local import LocalStore

    if (why := store_path_problem(args.path)) is not None:
        print(f"baton store: --path: {why}", file=sys.stderr)
        return 2
    store = LocalStore(args.path, watch_files=False)
    try:
        if args.store_cmd == "put":
            try:
                text = check_payload(_read_value(args.value_file))
            except OSError as e:
                print(f"cannot read {args.value_file}: {e.strerror}", file=sys.stderr)
                return 2
            info = store.put_sync(args.key, Secret(text))
            print(info.id)
        elif args.store_cmd == "versions":
            versions = store.versions_sync(args.key)
            if args.json:
                rows = [
                    {"id": v.id, "stages": sorted(v.stages), "created": v.created, "retired": v.retired}
                    for v in versions
                ]
                print(json.dumps(rows))
            else:
                for v in versions:
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created))
                    stage = ",".join(sorted(v.stages)) or ("retired" if v.retired else "-")
                    print(f"{v.id:>6}  {stage:<10} {when}")
        elif args.store_cmd == "get":
            secret = store.read_sync(args.key, args.version)
            if not args.reveal:
                print(f"version {secret.id} ({len(secret.payload.reveal())} bytes); add --reveal to print the value")
                return 0
            sys.stdout.write(secret.payload.reveal())
            if not secret.payload.reveal().endswith("\n"):
                sys.stdout.write("\n")
        return 0
    except OSError as e:  # the database's directory cannot be made or opened
        print(f"baton store: --path {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        store.close()


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.rotation.status import print_status

    config = _load(args.config)
    return asyncio.run(print_status(config, pending=args.pending, as_json=args.json, url=args.url))


def cmd_node(args: argparse.Namespace) -> int:
    from daemon.model import NodeId
    from daemon.rotation.status import forget_node

    config = _load(args.config)
    _setup_logging(config)
    return asyncio.run(forget_node(config, NodeId(args.node)))


def cmd_rotate(args: argparse.Namespace) -> int:
    from daemon.config import parse_duration
    from daemon.rotation.control import rotate

    try:
        patience = parse_duration(args.timeout)
    except ValueError as e:
        print(f"baton: --timeout: {e}", file=sys.stderr)
        return 2
    config = _load(args.config)
    return asyncio.run(
        rotate(config, args.name, wait=args.wait, patience=patience, url=args.url, out=sys.stdout, err=sys.stderr)
    )


def cmd_retire(args: argparse.Namespace) -> int:
    from daemon.rotation.control import retire

    config = _load(args.config)
    return asyncio.run(
        retire(
            config,
            args.name,
            args.version,
            force=args.force,
            reason=args.reason or "",
            url=args.url,
            out=sys.stdout,
            err=sys.stderr,
        )
    )


def cmd_exec(args: argparse.Namespace) -> int:
    from daemon.exec.command import run_exec

    config = _load(args.config)
    _setup_logging(config)
    argv = [a for a in args.command if a != "--"] if args.command[:1] == ["--"] else args.command
    if not argv:
        print("baton exec: give a command after --", file=sys.stderr)
        return 2
    try:
        config.credential(args.credential)
    except KeyError:
        print(f"credential: no credential named {args.credential!r} in {args.config}", file=sys.stderr)
        return 2
    return run_exec(config, credential=args.credential, argv=argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo.run import run_demo

    return run_demo(rotations=args.rotations, as_json=args.json, keep=args.keep)


# ---------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Credential rotation without downtime.")
    p.add_argument("--version", action="version", version=f"baton {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("agent", help="run the node agent")
    s.add_argument("--config", required=True)
    s.set_defaults(func=cmd_agent)

    s = sub.add_parser("rotator", help="run the rotator")
    s.add_argument("--config", required=True)
    s.set_defaults(func=cmd_rotator)

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("file")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("store", help="operate the embedded store")
    s.add_argument("--path", required=True, help="SQLite file of the store")
    ss = s.add_subparsers(dest="store_cmd", required=True)
    put = ss.add_parser("put", help="put a new current version; prints its id")
    put.add_argument("key")
    put.add_argument("--value-file", required=True, help="file with the value, - for stdin")
    ver = ss.add_parser("versions", help="list versions (never values)")
    ver.add_argument("key")
    ver.add_argument("--json", action="store_true")
    get = ss.add_parser("get", help="show a version; --reveal prints the value")
    get.add_argument("key")
    get.add_argument("--version", default=None)
    get.add_argument("--reveal", action="store_true", help="print the secret value")
    s.set_defaults(func=cmd_store)

    s = sub.add_parser("status", help="show credentials, versions, holders, pending retirements")
    s.add_argument("--config", required=True)
    s.add_argument("--pending", action="store_true", help="versions waiting for retirement and why")
    s.add_argument("--json", action="store_true")
    s.add_argument("--url", default=None, help="agent endpoint (default: from the config)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("node", help="manage nodes known to the rotator")
    ns = s.add_subparsers(dest="node_cmd", required=True)
    f = ns.add_parser("forget", help="forget a node that is gone")
    f.add_argument("node")
    f.add_argument("--config", required=True)
    s.set_defaults(func=cmd_node)

    s = sub.add_parser("rotate", help="ask the rotator to rotate a credential now")
    s.add_argument("name", help="the credential")
    s.add_argument("--config", required=True)
    s.add_argument("--wait", action="store_true", help="follow it until the old version is retired")
    s.add_argument("--timeout", default="10m", help="with --wait: give up after this long (default 10m)")
    s.add_argument("--url", default=None, help="rotator endpoint (default: api.listen of the config)")
    s.set_defaults(func=cmd_rotate)

    s = sub.add_parser("retire", help="retire a version now although it is still held (a leaked credential)")
    s.add_argument("name", help="the credential")
    s.add_argument("version", help="the version id to retire (never the current one)")
    s.add_argument("--config", required=True)
    s.add_argument("--force", action="store_true", help="required: retire even though holders remain")
    s.add_argument("--reason", default=None, help="required: why (recorded in the store and an event)")
    s.add_argument("--url", default=None, help="rotator endpoint (default: api.listen of the config)")
    s.set_defaults(func=cmd_retire)

    s = sub.add_parser("exec", help="run a command with a credential; restart it on change")
    s.add_argument("--config", required=True)
    s.add_argument("--credential", required=True)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("demo", help="end-to-end demo on the embedded store")
    s.add_argument("--rotations", type=int, default=3)
    s.add_argument("--json", action="store_true", help="only the final JSON line on stdout")
    s.add_argument("--keep", action="store_true", help="keep the temp dir")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> Any:
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
    except ListenError as e:  # api.listen is taken or not a socket: a config problem
        print(f"baton: {e}", file=sys.stderr)
        code = 2
    except ConfigError as e:  # found at start, not at load (the rotator's api.runtime_dir)
        for line in e.problems:
            print(line, file=sys.stderr)
        code = 2
    except BatonError as e:
        print(f"baton: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
