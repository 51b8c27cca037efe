"""A real consumer of a leased database user (the lease tests, bench/leases.py): queries through PostgreSQL.

    python -m tests.integration.lease_consumer --dir OUT --host H --port P --db D --mode MODE --report FILE

``--mode pool``: one connection opened with the rendered ``user``/``password``
files; SIGHUP re-reads them and reconnects (the old connection is closed once the
new one works), as a pooled service does on reload. ``--mode per-use``: every
request reads the files and opens a new connection. ``--mode hold``: keeps the
password file open (a holder the agent sees by its fd) and one connection with
that user, until killed. Every mode runs ``SELECT 1`` every ``--interval`` and
writes its counters (ok, failed, the user in use, the last error's kind) to
``--report`` atomically every half second; never a password.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg


def _creds(out: Path) -> tuple[str, str]:
    return (out / "user").read_text().strip(), (out / "password").read_text().strip()


def _connect(args: argparse.Namespace, user: str, password: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=args.host, port=args.port, dbname=args.db, user=user, password=password, connect_timeout=5, autocommit=True
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--mode", choices=["pool", "per-use", "hold"], required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--pidfile", type=Path)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--duration", type=float, default=600.0)
    args = p.parse_args()
    if args.pidfile:
        args.pidfile.write_text(f"{os.getpid()}\n")
    counters: dict[str, Any] = {"ok": 0, "failed": 0, "reloads": 0, "user": None, "error": None, "users": []}
    reload = False

    def on_hup(signum: int, frame: object) -> None:
        nonlocal reload
        reload = True

    signal.signal(signal.SIGHUP, on_hup)
    held = None
    if args.mode == "hold":
        # Held open on purpose: the agent sees this fd.
        held = (args.dir / "password").open()
    conn = None
    if args.mode in ("pool", "hold"):
        user, password = _creds(args.dir)
        conn = _connect(args, user, password)
        counters["user"] = user
        counters["users"].append(user)
    last_report = 0.0
    ends = time.monotonic() + args.duration
    while time.monotonic() < ends:
        if reload and args.mode == "pool":
            reload = False
            try:
                user, password = _creds(args.dir)
                new = _connect(args, user, password)
            except (OSError, psycopg.Error) as e:
                counters["failed"] += 1
                counters["error"] = type(e).__name__
            else:
                old, conn = conn, new
                if old is not None:
                    old.close()
                counters["reloads"] += 1
                counters["user"] = user
                if user not in counters["users"]:
                    counters["users"].append(user)
        try:
            if args.mode == "per-use":
                user, password = _creds(args.dir)
                with _connect(args, user, password) as c:
                    c.execute("SELECT 1")
                counters["user"] = user
                if user not in counters["users"]:
                    counters["users"].append(user)
            else:
                assert conn is not None
                conn.execute("SELECT 1")
            counters["ok"] += 1
        except (OSError, psycopg.Error) as e:
            counters["failed"] += 1
            counters["error"] = type(e).__name__
        now = time.monotonic()
        if now - last_report >= 0.5:
            last_report = now
            tmp = args.report.with_suffix(".tmp")
            tmp.write_text(json.dumps(counters))
            os.replace(tmp, args.report)
        time.sleep(args.interval)
    if held is not None:
        held.close()


if __name__ == "__main__":
    main()
