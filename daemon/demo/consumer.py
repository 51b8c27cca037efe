"""A demo consumer: uses a credential file and checks it against the store on every request.

Three ways of loading, as real programs do:

- ``per-use``: opens and reads the file on every request;
- ``hold``: opens the file once and keeps the fd, re-reads through it, and
  re-opens the path on SIGHUP (like nginx or a log shipper);
- ``once``: reads the file at start and never again; must be restarted.

A request "authenticates" when the value it holds is a version the store has
not retired (checked by digest, read-only). Counts go to a small JSON file.
This is demo code: it prints no value, only counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path


def valid_digests(conn: sqlite3.Connection, key: str) -> set[str]:
    rows = conn.execute("SELECT digest FROM versions WHERE key=? AND retired IS NULL", (key,)).fetchall()
    return {r[0] for r in rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["per-use", "hold", "once"])
    p.add_argument("--file", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--pidfile")
    p.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args(argv)

    if args.pidfile:
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    stats_path = Path(args.stats)
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        stats = {"requests": 0, "errors": 0, "reopens": 0, "starts": 0}
    stats["starts"] += 1
    stop = False
    reopen = False

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    def on_hup(_s: int, _f: object) -> None:
        nonlocal reopen
        reopen = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)

    conn = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True, timeout=5)
    held = open(args.file, "rb")  # noqa: SIM115 (held open on purpose)
    value = held.read()
    if args.mode != "hold":
        held.close()
    last_flush = 0.0
    while not stop:
        if args.mode == "per-use":
            with open(args.file, "rb") as f:
                value = f.read()
        elif args.mode == "hold":
            if reopen:
                reopen = False
                held.close()
                held = open(args.file, "rb")  # noqa: SIM115
                stats["reopens"] += 1
            held.seek(0)
            value = held.read()
        digest = hashlib.sha256(value).hexdigest()
        stats["requests"] += 1
        try:
            ok = digest in valid_digests(conn, args.key)
        except sqlite3.OperationalError:
            ok = True  # the store is busy, not a failed authentication; ask again next time
        if not ok:
            stats["errors"] += 1
            print(f"{args.mode}: authentication failed with a retired credential", file=sys.stderr)
        now = time.monotonic()
        if now - last_flush > 0.2:
            _flush(stats_path, stats)
            last_flush = now
        time.sleep(args.interval)
    _flush(stats_path, stats)
    return 0


def _flush(path: Path, stats: dict[str, int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
