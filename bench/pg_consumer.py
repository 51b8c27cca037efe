"""A PostgreSQL consumer of a Baton credential file, for the rotation benchmark and e2e tests.

It owns nothing of Baton: it is the "application" side. It reads a JSON
credential file written by the agent (``username``, ``password``, ``host``,
``port``, ``database``) and connects to PostgreSQL with it, the way a real
program would. It must never print or record a password: only counts, role
names, version labels and short error reasons.

Modes:

- ``per-use``: a NEW connection for every request, reading the file each time;
- ``pool``: ``--pool-size`` long-lived connections used round-robin; a
  connection that errors is dropped and reopened (reading the file then);
  ``--max-lifetime`` recycles connections as real pools do; SIGHUP (Baton's
  reload) closes them all, at once or after ``--reload-drain`` seconds, so the
  next requests reconnect with the new file;
- ``hold``: one session opened at start and kept until SIGTERM (a stuck
  batch job, a forgotten psql), never reloaded.

While it connects, it keeps the credential file open: that is when the
credential is in use, and an open fd is what Baton's usage scan sees. Counts go
to ``--stats`` (JSON, rewritten atomically several times a second): requests
and failures in total and per wall-clock second, error reasons, and per version
the last time a session of that version was used (the e2e test checks that no
version was retired before its last use).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Flags:
    """Set by signal handlers, read by the request loop."""

    stop = False
    reload = False


def _on_term(_s: int, _f: object) -> None:
    Flags.stop = True


def _on_hup(_s: int, _f: object) -> None:
    Flags.reload = True


if __name__ == "__main__":
    # Before the slow import of psycopg/libpq: a SIGHUP from Baton during our start-up
    # (a rotation just happened) must not kill us with the default action.
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGHUP, _on_hup)

import psycopg  # noqa: E402

FLUSH_EVERY = 0.2
_VERSION_DIR = re.compile(r"/\.\.v([^/]+)-[0-9a-f]+/[^/]+$")

_REASONS = (
    ("password authentication failed", "auth-failed"),
    ("not permitted to log in", "nologin"),
    ("does not exist", "no-such-role"),
    ("terminating connection", "terminated"),
    ("server closed the connection", "closed"),
    ("timeout", "timeout"),
    ("too many connections", "too-many-connections"),
)


def reason_of(e: BaseException) -> str:
    text = str(e).lower()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return type(e).__name__


@dataclass
class Stats:
    mode: str
    requests: int = 0
    failures: int = 0
    connects: int = 0
    reloads: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)  # wall second -> [requests, failures]
    reasons: dict[str, int] = field(default_factory=dict)
    last_use: dict[str, float] = field(default_factory=dict)  # version label -> last successful use
    roles: dict[str, str] = field(default_factory=dict)  # version label -> role name

    def count(self, *, ok: bool, reason: str | None = None) -> None:
        self.requests += 1
        bucket = self.buckets.setdefault(int(time.time()), [0, 0])
        bucket[0] += 1
        if not ok:
            self.failures += 1
            bucket[1] += 1
            assert reason is not None
            if reason not in self.reasons:
                print(f"pg_consumer {self.mode} pid {os.getpid()}: first failure: {reason}", file=sys.stderr)
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def used(self, version: str, role: str) -> None:
        self.last_use[version] = time.time()
        self.roles[version] = role

    def flush(self, path: Path) -> None:
        data: dict[str, Any] = {
            "mode": self.mode,
            "pid": os.getpid(),
            "requests": self.requests,
            "failures": self.failures,
            "connects": self.connects,
            "reloads": self.reloads,
            "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
            "reasons": self.reasons,
            "last_use": self.last_use,
            "roles": self.roles,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


@dataclass
class Session:
    conn: psycopg.Connection[Any]
    version: str
    role: str
    expires: float


class Consumer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.file = Path(args.file)
        self.stats_path = Path(args.stats)
        self.stats = Stats(mode=args.mode)
        self.pool: list[Session | None] = [None] * max(1, args.pool_size)

    # ------------------------------------------------------------ connections

    def connect(self) -> Session:
        """Read the credential file and log in with it; the file stays open until logged in."""
        with open(self.file, "rb") as f:
            target = os.readlink(f"/proc/self/fd/{f.fileno()}")
            m = _VERSION_DIR.search(target)
            version = m.group(1) if m else "?"
            cred = json.loads(f.read())
            conn = psycopg.connect(
                host=cred.get("host", "127.0.0.1"),
                port=cred.get("port", 5432),
                dbname=cred.get("database", "postgres"),
                user=cred["username"],
                password=cred["password"],
                application_name=self.args.app,
                connect_timeout=5,
                autocommit=True,
            )
        self.stats.connects += 1
        lifetime = self.args.max_lifetime
        expires = time.monotonic() + lifetime * random.uniform(0.5, 1.5) if lifetime > 0 else float("inf")
        return Session(conn=conn, version=version, role=str(cred["username"]), expires=expires)

    def close_pool(self) -> None:
        for i, s in enumerate(self.pool):
            if s is not None:
                s.conn.close()
                self.pool[i] = None

    # ------------------------------------------------------------ requests

    def request_per_use(self) -> None:
        try:
            s = self.connect()
        except psycopg.Error as e:
            self.stats.count(ok=False, reason=reason_of(e))
            return
        try:
            s.conn.execute("SELECT 1").fetchone()
            self.stats.used(s.version, s.role)
            self.stats.count(ok=True)
        except psycopg.Error as e:
            self.stats.count(ok=False, reason=reason_of(e))
        finally:
            s.conn.close()

    def request_pool(self, n: int) -> None:
        i = n % len(self.pool)
        s = self.pool[i]
        if s is not None and time.monotonic() > s.expires:
            s.conn.close()
            s = self.pool[i] = None
        try:
            if s is None:
                s = self.pool[i] = self.connect()
            s.conn.execute("SELECT 1").fetchone()
            self.stats.used(s.version, s.role)
            self.stats.count(ok=True)
        except psycopg.Error as e:
            self.stats.count(ok=False, reason=reason_of(e))
            if s is not None:
                s.conn.close()
            self.pool[i] = None

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        signal.signal(signal.SIGTERM, _on_term)
        signal.signal(signal.SIGINT, _on_term)
        signal.signal(signal.SIGHUP, _on_hup)
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        last_flush = 0.0
        n = 0
        try:
            while not Flags.stop:
                if Flags.reload and self.args.mode == "pool":
                    # Baton's reload: the next logins use the new file. Sessions already open are
                    # closed at once, or used for up to --reload-drain seconds more (a graceful
                    # pool drain): only pg_stat_activity can tell Baton they still exist.
                    Flags.reload = False
                    self.stats.reloads += 1
                    if self.args.reload_drain > 0:
                        until = time.monotonic() + self.args.reload_drain
                        for s in self.pool:
                            if s is not None:
                                s.expires = min(s.expires, until)
                    else:
                        self.close_pool()
                if self.args.mode == "per-use":
                    self.request_per_use()
                else:
                    self.request_pool(n)
                n += 1
                now = time.monotonic()
                if now - last_flush >= FLUSH_EVERY:
                    self.stats.flush(self.stats_path)
                    last_flush = now
                next_at += interval
                if next_at < now - 1.0:
                    next_at = now  # fell behind by more than a second: do not burst to catch up
                if next_at > now:
                    time.sleep(next_at - now)
        finally:
            self.close_pool()
            self.stats.flush(self.stats_path)
        return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("mode", choices=["per-use", "pool", "hold"])
    p.add_argument("--file", required=True, help="the JSON credential file written by the agent")
    p.add_argument("--stats", required=True, help="where to write counts (JSON)")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second")
    p.add_argument("--app", default="pg-consumer", help="application_name of the sessions")
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--max-lifetime", type=float, default=0.0, help="recycle pooled connections (s, jittered)")
    p.add_argument("--reload-drain", type=float, default=0.0, help="on SIGHUP, keep open sessions this long (s)")
    args = p.parse_args(argv)
    if args.mode == "hold":
        # A pool of one session, never recycled; SIGHUP is ignored (see _on_hup).
        args.pool_size, args.max_lifetime = 1, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    return Consumer(parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
