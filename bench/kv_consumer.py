"""A MariaDB or Redis consumer of a Baton credential file, for the rotation benchmark's mysql and redis rows.

It owns nothing of Baton: it is the "application". It reads the JSON file the
agent writes (``username``, ``password``, ``host``, ``port``) and logs in with
it. Kinds: ``mysql`` (PyMySQL; a request is ``SELECT 1``) and ``redis``
(redis-py's Connection; a request is ``PING``).

Modes, as bench/pg_consumer.py's: ``per-use`` logs in anew for every request,
reading the file each time; ``pool`` keeps ``--pool-size`` sessions used round
robin, recycled after ``--max-lifetime`` (jittered) and dropped on an error,
reading the file whenever it logs in; SIGHUP (Baton's reload) lets the open
sessions serve ``--reload-drain`` seconds more (a graceful drain only the
server's view of sessions can see). The file is kept open while logging in:
that is when Baton's usage scan sees it in use. Counts go to ``--stats`` in
pg_consumer's shape. It never prints or records a password.
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
    stop = False
    reload = False


def _on_term(_s: int, _f: object) -> None:
    Flags.stop = True


def _on_hup(_s: int, _f: object) -> None:
    Flags.reload = True


if __name__ == "__main__":
    # Before the imports: a SIGHUP from Baton during start-up must not kill us.
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGHUP, _on_hup)

FLUSH_EVERY = 0.2
_VERSION_DIR = re.compile(r"/\.\.v([^/]+)-[0-9a-f]+/[^/]+$")


@dataclass
class Stats:
    mode: str
    requests: int = 0
    failures: int = 0
    connects: int = 0
    reloads: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    last_use: dict[str, float] = field(default_factory=dict)

    def count(self, *, ok: bool, reason: str | None = None, version: str | None = None) -> None:
        self.requests += 1
        bucket = self.buckets.setdefault(int(time.time()), [0, 0])
        bucket[0] += 1
        if ok:
            if version is not None:
                self.last_use[version] = time.time()
            return
        self.failures += 1
        bucket[1] += 1
        reason = reason or "?"
        if reason not in self.reasons:
            print(f"kv_consumer {self.mode} pid {os.getpid()}: first failure: {reason}", file=sys.stderr)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def flush(self, path: Path) -> None:
        data = {
            "mode": self.mode,
            "pid": os.getpid(),
            "requests": self.requests,
            "failures": self.failures,
            "connects": self.connects,
            "reloads": self.reloads,
            "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
            "reasons": self.reasons,
            "last_use": self.last_use,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


@dataclass
class Session:
    conn: Any
    version: str
    expires: float


class Consumer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.file = Path(args.file)
        self.stats_path = Path(args.stats)
        self.stats = Stats(mode=args.mode)
        self.pool: list[Session | None] = [None] * max(1, args.pool_size)
        if args.kind == "mysql":
            import pymysql

            self.errors: tuple[type[BaseException], ...] = (pymysql.err.MySQLError, OSError)
        else:
            import redis

            self.errors = (redis.exceptions.RedisError, OSError)

    def _login(self, cred: dict[str, Any]) -> Any:
        if self.args.kind == "mysql":
            import pymysql

            return pymysql.connect(
                host=cred["host"],
                port=int(cred["port"]),
                user=cred["username"],
                password=cred["password"],
                connect_timeout=5,
                read_timeout=5,
                program_name=self.args.app,
                ssl_disabled=True,  # loopback; PyMySQL 1.2 otherwise loads the CA store for every login
            )
        import redis

        conn = redis.Connection(
            host=cred["host"],
            port=int(cred["port"]),
            username=cred["username"],
            password=cred["password"],
            socket_timeout=5,
            client_name=self.args.app,
        )
        conn.connect()
        return conn

    def _use(self, conn: Any) -> None:
        if self.args.kind == "mysql":
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        else:
            conn.send_command("PING")
            conn.read_response()

    def _close(self, conn: Any) -> None:
        try:
            if self.args.kind == "mysql":
                conn.close()
            else:
                conn.disconnect()
        except Exception:  # a session that broke may not close cleanly
            pass

    def connect(self) -> Session:
        with open(self.file, "rb") as f:
            target = os.readlink(f"/proc/self/fd/{f.fileno()}")
            m = _VERSION_DIR.search(target)
            cred = json.loads(f.read())
            conn = self._login(cred)
        self.stats.connects += 1
        lifetime = self.args.max_lifetime
        expires = time.monotonic() + lifetime * random.uniform(0.5, 1.5) if lifetime > 0 else float("inf")
        return Session(conn=conn, version=m.group(1) if m else "?", expires=expires)

    def reason(self, e: BaseException) -> str:
        code = getattr(e, "args", (None,))[0] if getattr(e, "args", None) else None
        if self.args.kind == "mysql" and isinstance(code, int):
            return {1045: "auth-failed", 4151: "locked", 3118: "locked"}.get(code, f"mysql-{code}")
        text = str(e).lower()
        if "invalid username-password" in text or "wrongpass" in text:
            return "auth-failed"
        return type(e).__name__

    def request_per_use(self) -> None:
        try:
            s = self.connect()
        except self.errors as e:
            self.stats.count(ok=False, reason=self.reason(e))
            return
        try:
            self._use(s.conn)
            self.stats.count(ok=True, version=s.version)
        except self.errors as e:
            self.stats.count(ok=False, reason=self.reason(e))
        finally:
            self._close(s.conn)

    def request_pool(self, n: int) -> None:
        i = n % len(self.pool)
        s = self.pool[i]
        if s is not None and time.monotonic() > s.expires:
            self._close(s.conn)
            s = self.pool[i] = None
        try:
            if s is None:
                s = self.pool[i] = self.connect()
            self._use(s.conn)
            self.stats.count(ok=True, version=s.version)
        except self.errors as e:
            self.stats.count(ok=False, reason=self.reason(e))
            if s is not None:
                self._close(s.conn)
            self.pool[i] = None

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
                    Flags.reload = False
                    self.stats.reloads += 1
                    until = time.monotonic() + self.args.reload_drain
                    for s in self.pool:
                        if s is not None:
                            s.expires = min(s.expires, until)
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
                    next_at = now
                if next_at > now:
                    time.sleep(next_at - now)
        finally:
            for s in self.pool:
                if s is not None:
                    self._close(s.conn)
            self.stats.flush(self.stats_path)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("mode", choices=["per-use", "pool"])
    p.add_argument("--kind", choices=["mysql", "redis"], required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--max-lifetime", type=float, default=0.0)
    p.add_argument("--reload-drain", type=float, default=0.0)
    p.add_argument("--app", default="kv-consumer", help="a name in the command line and the session")
    return Consumer(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
