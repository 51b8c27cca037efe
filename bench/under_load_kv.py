"""The rotation benchmark's mysql and redis rows (bench/rotation_under_load.py runs them).

Each row: an agent and a rotator in this process on the embedded local store,
and real consumer processes (bench/kv_consumer.py: 4 per-use + 1 pool, the
same ~280 requests/s shape as the PostgreSQL rows) against a private server
(tests/fixtures/mariadb.py's MariaDb, tests/fixtures/redis.py's RedisServer):

- ``mysql-alternating-users``: the mysql provider, accounts ``_a``/``_b``;
- ``mysql-in-place``: the naive baseline, bench/naive_kv_step.py through the
  command provider (ALTER USER ... IDENTIFIED BY on the one account);
- ``redis-alternating-users`` and ``redis-dual-password``: the redis provider;
- ``redis-in-place``: the naive baseline (ACL SETUSER ... resetpass).

The zero-downtime rows must show 0 failed requests and no use of a version
after its retirement; the in-place rows must show failures. It never prints a
password or the admin credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench._phase import store_versions, summarize  # noqa: E402
from daemon.agent.service import Agent  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.rotation.service import Rotator  # noqa: E402
from tests.fixtures.mariadb import MariaDb  # noqa: E402
from tests.fixtures.redis import RedisServer  # noqa: E402

PHASES = (
    "mysql-alternating-users",
    "mysql-in-place",
    "redis-alternating-users",
    "redis-dual-password",
    "redis-in-place",
)
ZERO_DOWNTIME = {p: not p.endswith("in-place") for p in PHASES}
CONSUMER = BENCH / "kv_consumer.py"
NAIVE = BENCH / "naive_kv_step.py"
KEY = "bench/kv"
CREDENTIAL = "kv"
TEMPLATE = (
    '{"username": {{ username|tojson }}, "password": {{ password|tojson }}, '
    '"host": {{ host|tojson }}, "port": {{ port }}}\n'
)
RETIRE_DEADLINE = 60.0
_LIVE: set[int] = set()


def kill_leftovers() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _LIVE.discard(pid)


@dataclass
class Target:
    kind: str  # kv_consumer --kind
    provider: dict[str, Any]
    logins: Callable[[], list[str]]  # what can log in at the end (accounts, users, passwords)


@contextlib.contextmanager
def mysql_system(root: Path) -> Iterator[tuple[MariaDb, Path]]:
    server = MariaDb.start(prefix="baton-bench-mariadb-", max_connections=300)
    try:
        server.root_sql(
            "CREATE DATABASE bench",
            f"CREATE ROLE bench_rw WITH ADMIN '{server.admin_user}'@'127.0.0.1'",
            "GRANT ALL PRIVILEGES ON bench.* TO bench_rw",
            f"CREATE USER 'bench_naive'@'%' IDENTIFIED BY '{os.urandom(12).hex()}'",
        )
        yield server, server.write_admin_dsn(root / "admin.dsn")
    finally:
        server.stop()


@contextlib.contextmanager
def redis_system(root: Path) -> Iterator[tuple[RedisServer, Path]]:
    server = RedisServer.start(prefix="baton-bench-redis-")
    try:
        with server.client() as r:
            r.execute_command("ACL", "SETUSER", "bench_naive", "on", f">{os.urandom(12).hex()}", "~*", "+@all")
        yield server, server.write_admin_url(root / "admin.url")
    finally:
        server.stop()


def target_for(phase: str, server: Any, admin_file: Path) -> Target:
    kind = phase.split("-", 1)[0]
    where = {"host": server.host, "port": server.port}
    if phase.endswith("in-place"):
        env = {"KIND": kind, "ADMIN_FILE": str(admin_file), "USERNAME": "bench_naive"}
        env |= {"HOST": server.host, "PORT": str(server.port)}
        provider: dict[str, Any] = {"kind": "command", "command": [sys.executable, str(NAIVE)], "env": env}
    elif kind == "mysql":
        provider = {
            "kind": "mysql",
            "admin_dsn_file": str(admin_file),
            "username": "bench_app",
            "grant_role": "bench_rw",
        }
        provider |= where
    else:
        strategy = phase.removeprefix("redis-")
        provider = {"kind": "redis", "admin_url_file": str(admin_file), "username": f"bench_{strategy[:3]}"}
        provider |= where | {"strategy": strategy}

    def logins() -> list[str]:
        if kind == "mysql":
            rows = server.root_sql("SELECT User, Host FROM mysql.user WHERE User LIKE 'bench\\_%' AND is_role = 'N'")
            return [
                str(u) for u, h in rows if "ACCOUNT LOCK" not in str(server.root_sql(f"SHOW CREATE USER '{u}'@'{h}'"))
            ]
        with server.client() as r:
            out = []
            for u in r.acl_users():
                info = r.acl_getuser(u)
                if u.startswith("bench_") and "on" in info["flags"]:
                    out += [f"{u}#{i}" for i in range(len(info["passwords"]))]
            return out

    return Target(kind=kind, provider=provider, logins=logins)


def phase_config(target: Target, *, root: Path, every: float) -> dict[str, Any]:
    return {
        "node_id": "bench-node",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "info"},
        "report": {"heartbeat": 0.5},
        "agent": {"debounce": 0.1, "scan_interval": 0.25, "fanotify": "off"},
        "credentials": [
            {
                "name": CREDENTIAL,
                "key": KEY,
                "output": {"dir": str(root / "out"), "files": {"cred.json": TEMPLATE}},
                "consumers": [
                    {
                        "name": "per-use",
                        "match": {"cmdline": f"kv_consumer\\.py per-use .*{root}/"},
                        "loads": "per-use",
                    },
                    {
                        "name": "pool",
                        "match": {"cmdline": f"kv_consumer\\.py pool .*{root}/"},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": 0.1},
                        "min_restart_interval": 0.1,
                    },
                ],
                "rotation": {"every": every, "provider": target.provider},
            }
        ],
    }


@dataclass
class Consumers:
    procs: list[tuple[str, asyncio.subprocess.Process, Path]] = field(default_factory=list)

    async def start(self, *, target: Target, root: Path, load: Any) -> None:
        pool = ["pool", "--rate", str(load.pool_rate), "--pool-size", str(load.pool_size)]
        pool += ["--max-lifetime", str(load.max_lifetime), "--reload-drain", str(load.reload_drain)]
        specs = [("pool", [*pool, "--app", "bench-pool"])]
        specs += [
            ("per-use", ["per-use", "--rate", str(load.per_use_rate), "--app", f"bench-per-use-{i}"])
            for i in range(load.per_use_procs)
        ]
        for i, (variant, args) in enumerate(specs):
            stats = root / f"stats-{variant}-{i}.json"
            argv = [sys.executable, str(CONSUMER), *args, "--kind", target.kind]
            argv += ["--file", str(root / "out" / "cred.json"), "--stats", str(stats)]
            with open(root / f"consumer-{i}.log", "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stderr=err, start_new_session=True
                )
            _LIVE.add(proc.pid)
            self.procs.append((variant, proc, stats))

    async def stop(self) -> None:
        for _, proc, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            _LIVE.discard(proc.pid)

    def stats(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for variant, _, path in self.procs:
            try:
                out.append((variant, json.loads(path.read_text())))
            except (OSError, ValueError):
                out.append((variant, {}))
        return out


async def run_phase(
    phase: str, *, target: Target, rotations: int, every: float, load: Any, root: Path, events: Any, progress: TextIO
) -> dict[str, Any]:
    config = parse_config(phase_config(target, root=root, every=every))
    first_event = len(events.events)
    rotator = Rotator(config, install_signals=False, serve_api=False)
    agent = Agent(config, install_signals=False)
    tasks = [
        asyncio.create_task(rotator.serve(), name=f"bench-rotator-{phase}"),
        asyncio.create_task(agent.serve(), name=f"bench-agent-{phase}"),
    ]
    consumers = Consumers()
    timed_out = False
    t0 = time.time()
    try:
        await asyncio.wait_for(agent.ready.wait(), 60)
        t0 = time.time()
        await consumers.start(target=target, root=root, load=load)
        print(f"[{phase}] consumers started: {load.per_use_procs} per-use + 1 pool", file=progress, flush=True)
        done_at: float | None = None
        slowed_at: int | None = None
        last_line = ""
        progress_at, last_rotated = time.monotonic(), -1
        while True:
            versions = await asyncio.to_thread(store_versions, root / "store.db", KEY)
            rotated = max(0, sum(1 for v in versions if not v[2]) - 1)
            if rotated != last_rotated:
                progress_at, last_rotated = time.monotonic(), rotated
            retired = sum(1 for v in versions if v[1])
            failures = sum(s.get("failures", 0) for _, s in consumers.stats())
            line = f"[{phase}] rotations {rotated}/{rotations} retired {retired} failed requests {failures}"
            if line != last_line:
                print(f"{time.strftime('%H:%M:%S')} {line}", file=progress, flush=True)
                last_line = line
            if rotated >= rotations - 1 and slowed_at is None:
                slowed_at = len(events.events)  # the schedule timed the last rotation: it must time no more
                for r in rotator.rotators.values():
                    r.reschedule(3600.0)
            if slowed_at is not None and rotated < rotations and time.monotonic() - progress_at > every + 1.0:
                # The last rotation was put off (postponed, failed) and would now wait an hour: ask for it.
                rotator.rotate_now.set()
                progress_at = time.monotonic()
            if rotated >= rotations and done_at is None:
                done_at = time.monotonic()
                rotator.rotate_now.clear()  # a request made while the last one was put off: not one more
            if rotated >= rotations and retired >= rotated:
                break
            if done_at is not None and time.monotonic() - done_at > RETIRE_DEADLINE:
                timed_out = True
                break
            if time.time() - t0 > rotations * (every + 5) + 60:
                timed_out = True
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # a little load after the last retirement
    finally:
        await consumers.stop()
        rotator.should_exit.set()
        agent.should_exit.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return summarize(
        versions=await asyncio.to_thread(store_versions, root / "store.db", KEY),
        consumers=consumers,
        phase_events=events.events[first_event:],
        t0=t0,
        t_end=time.time(),
        timed_out=timed_out,
        load=load,
        zero_downtime=ZERO_DOWNTIME[phase],
        at_end=("logins_at_end", len(await asyncio.to_thread(target.logins))),
        counted=("requests", "failed", "connects", "reloads"),
    )


async def run_phases(
    phases: list[str], *, rotations: int, every: float, load: Any, workdir: Path, events: Any, progress: TextIO
) -> dict[str, dict[str, Any]]:
    """Every chosen row; each server started once for the rows that use it."""
    results: dict[str, dict[str, Any]] = {}
    groups: list[tuple[list[str], Any]] = [
        ([p for p in phases if p.startswith("mysql-")], mysql_system),
        ([p for p in phases if p.startswith("redis-")], redis_system),
    ]
    for chosen, system in groups:
        if not chosen:
            continue
        sysroot = workdir / f"system-{chosen[0]}"
        sysroot.mkdir()
        with system(sysroot) as (server, admin_file):
            print(f"{chosen[0].split('-')[0]} ready on {server.host}:{server.port}", file=progress, flush=True)
            for phase in chosen:
                root = workdir / phase
                root.mkdir()
                results[phase] = await run_phase(
                    phase,
                    target=target_for(phase, server, admin_file),
                    rotations=rotations,
                    every=every,
                    load=load,
                    root=root,
                    events=events,
                    progress=progress,
                )
    return results
