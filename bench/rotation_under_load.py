"""Benchmark: PostgreSQL credential rotation under load, for each provider strategy.

Starts a private PostgreSQL 15 cluster (``PgCluster.start`` of
tests/fixtures/postgres.py: initdb as the ``postgres`` OS user, scram-sha-256,
a free loopback port), then for each strategy in turn (alternating-users,
role-per-version, single-user) an agent and a rotator (in this process, on the
embedded local store) and real consumer processes (bench/pg_consumer.py):

- ``per-use``: 4 processes that open a NEW connection for every request,
  reading the credential file each time;
- ``pool``: 1 process with a pool of long-lived connections that reconnects on
  error and recycles connections (max lifetime), reading the file whenever it
  connects; declared to Baton with ``reload: {signal: SIGHUP}``, which makes
  it log in again with the new file (its open sessions finish within 0.3 s, a
  graceful drain that only the provider's session check can see).

Besides requests and failures, it checks each superseded version against the
consumers' record of its last use: ``uses_after_retirement`` must be 0 for the
zero-downtime strategies (single-user cannot tell old sessions from new ones).

The rotator rotates R times (``--rotations``, default 20) every ``--every``
seconds while the consumers run at >= 200 requests/s in total. The two
zero-downtime strategies must show 0 failed requests; ``single-user`` (ALTER
ROLE in place) must show failures: that is what it costs.

The mysql and redis rows (bench/under_load_kv.py: MariaDB and redis-server,
zero-downtime strategies beside a naive in-place password change of each) run
the same load shape with bench/kv_consumer.py.

Prints ONE JSON object on stdout (progress on stderr), writes
bench/results/rotation_under_load.json and a plot of requests/s and failures
over time per strategy to bench/results/rotation_under_load.png. Every process
it starts (consumers, the cluster) is stopped on exit, also on SIGTERM/SIGINT.
It never prints a password or the admin DSN.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bench import under_load_http, under_load_kv  # noqa: E402  (aws-iam and command; mysql and redis rows)
from daemon.agent.service import Agent  # noqa: E402
from daemon.config import Config, parse_config  # noqa: E402
from daemon.kit.logs import setup  # noqa: E402
from daemon.model import PENDING  # noqa: E402
from daemon.rotation.service import Rotator  # noqa: E402
from daemon.stores.local import LocalStore  # noqa: E402
from tests.fixtures.postgres import PG_BIN, PgCluster  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONSUMER = Path(__file__).resolve().parent / "pg_consumer.py"
PG_STRATEGIES = ("alternating-users", "role-per-version", "single-user")
STRATEGIES = (*PG_STRATEGIES, *under_load_http.PHASES, *under_load_kv.PHASES)
KEY = "bench/db"
CREDENTIAL = "db"
# JSON rendered by the agent: the payload's fields, quoted by Jinja's tojson.
CRED_TEMPLATE = (
    '{"username": {{ username|tojson }}, "password": {{ password|tojson }}, '
    '"host": {{ host|tojson }}, "port": {{ port }}, "database": {{ database|tojson }}}\n'
)
RETIRE_DEADLINE = 60.0  # after the last rotation, wait this long for the last retirement

log = logging.getLogger("bench.rotation_under_load")


@dataclass(frozen=True)
class Load:
    per_use_procs: int = 4
    per_use_rate: float = 40.0  # requests/s of each per-use process
    pool_rate: float = 120.0
    pool_size: int = 4
    max_lifetime: float = 3.0  # pooled connections are recycled after 1.5-4.5 s
    reload_drain: float = 0.3  # after Baton's SIGHUP, open sessions finish for this long (a graceful drain)

    @property
    def total_rate(self) -> float:
        return self.per_use_procs * self.per_use_rate + self.pool_rate


# ---------------------------------------------------------------- the cluster


@contextlib.contextmanager
def private_cluster(*, max_connections: int = 100) -> Iterator[PgCluster]:
    """The test fixtures' cluster, outside pytest, sized for the bench's load."""
    if not (PG_BIN / "initdb").exists():
        raise SystemExit(f"PostgreSQL 15 binaries not found in {PG_BIN}")
    cluster = PgCluster.start(prefix="baton-bench-pg-", max_connections=max_connections, shared_buffers="32MB")
    try:
        yield cluster
    finally:
        cluster.stop()


def admin_sql(cluster: PgCluster, query: sql.Composed | str, *, dbname: str = "postgres") -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn(dbname=dbname), autocommit=True) as conn:
        cur = conn.execute(query if isinstance(query, sql.Composed) else query.encode())
        return list(cur.fetchall()) if cur.description else []


@dataclass(frozen=True)
class Target:
    """The database side of one strategy's phase."""

    strategy: str
    dbname: str
    base: str
    grant: str | None


def prepare(cluster: PgCluster, strategy: str) -> Target:
    short = {"alternating-users": "alt", "role-per-version": "rpv", "single-user": "su"}[strategy]
    target = Target(
        strategy=strategy,
        dbname=f"bench_{short}",
        base=f"bench_{short}",
        grant=f"bench_{short}_app" if strategy == "role-per-version" else None,
    )
    admin_sql(cluster, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
    if target.grant:
        admin_sql(cluster, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(target.grant)))
    if strategy == "single-user":
        # single-user rotates a role that exists before Baton (the app's own).
        admin_sql(
            cluster,
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(target.base), sql.Literal(secrets.token_urlsafe(24))
            ),
        )
    return target


def role_states(cluster: PgCluster, base: str) -> dict[str, bool]:
    rows = admin_sql(
        cluster,
        sql.SQL("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname ~ {} ORDER BY 1").format(
            sql.Literal(f"^{base}(_[ab]|_v[0-9]+)?$")
        ),
    )
    return {str(r[0]): bool(r[1]) for r in rows}


# ---------------------------------------------------------------- Baton's side


def phase_config(
    *, cluster: PgCluster, target: Target, root: Path, admin_dsn_file: Path, every: float
) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "kind": "postgres",
        "admin_dsn_file": str(admin_dsn_file),
        "strategy": target.strategy,
        "username": target.base,
        "host": cluster.host,
        "port": cluster.port,
        "database": target.dbname,
    }
    if target.grant:
        provider["grant_role"] = target.grant
    return {
        "node_id": "bench-node",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "info"},
        # Short heartbeat: the gate sees a new report within ~0.5 s (ttl 1.5 s).
        "report": {"heartbeat": 0.5},
        "agent": {"debounce": 0.1, "scan_interval": 0.25, "fanotify": "off"},
        "credentials": [
            {
                "name": CREDENTIAL,
                "key": KEY,
                "output": {"dir": str(root / "out"), "files": {"db.json": CRED_TEMPLATE}},
                "consumers": [
                    {
                        "name": "per-use",
                        "match": {"cmdline": f"pg_consumer\\.py per-use .*{root}/"},
                        "loads": "per-use",
                    },
                    {
                        "name": "pool",
                        "match": {"cmdline": f"pg_consumer\\.py pool .*{root}/"},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": 0.1},
                        "min_restart_interval": 0.1,
                    },
                ],
                "rotation": {"every": every, "provider": provider},
            }
        ],
    }


class EventLog(logging.Handler):
    """Keeps the rotator's and agent's events (rotated, retired, rotation_failed...) with their times."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if name is None:
            return
        self.events.append(
            {
                "event": name,
                "at": record.created,
                "version": getattr(record, "version", None),
                "step": getattr(record, "step", None),
            }
        )

    def times(self, name: str) -> dict[str, float]:
        return {str(e["version"]): e["at"] for e in self.events if e["event"] == name and e["version"] is not None}

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e["event"] == name)


@dataclass
class Consumers:
    procs: list[tuple[str, asyncio.subprocess.Process, Path]] = field(default_factory=list)  # variant, proc, stats

    async def start(self, *, root: Path, load: Load, env: dict[str, str]) -> None:
        # The pool first: it is up before the next rotation's SIGHUP.
        pool = ["pool", "--rate", str(load.pool_rate), "--pool-size", str(load.pool_size)]
        pool += ["--max-lifetime", str(load.max_lifetime), "--reload-drain", str(load.reload_drain)]
        specs: list[tuple[str, list[str]]] = [("pool", [*pool, "--app", "bench-pool"])]
        for i in range(load.per_use_procs):
            specs.append(("per-use", ["per-use", "--rate", str(load.per_use_rate), "--app", f"bench-per-use-{i}"]))
        for i, (variant, args) in enumerate(specs):
            stats = root / f"stats-{variant}-{i}.json"
            argv = [
                sys.executable,
                str(CONSUMER),
                *args,
                "--file",
                str(root / "out" / "db.json"),
                "--stats",
                str(stats),
            ]
            with open(root / f"consumer-{i}.log", "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=err, start_new_session=True
                )
            _LIVE_PIDS.add(proc.pid)
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
            _LIVE_PIDS.discard(proc.pid)

    def stats(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for variant, _, path in self.procs:
            try:
                out.append((variant, json.loads(path.read_text())))
            except (OSError, ValueError):
                out.append((variant, {}))
        return out


_LIVE_PIDS: set[int] = set()  # consumer pids still to be stopped, for the last-resort cleanup


def _kill_leftovers() -> None:
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _LIVE_PIDS.discard(pid)


@dataclass(frozen=True)
class Version:
    id: int
    retired: bool
    pending: bool  # created, not promoted yet (a rotation in progress, or a failed one to resume)


def store_versions(path: Path) -> list[Version]:
    store = LocalStore(path, watch_files=False)
    try:
        return [Version(int(v.id), v.retired, PENDING in v.stages) for v in store.versions_sync(KEY)]
    finally:
        store.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------- one strategy


async def run_phase(
    *,
    cluster: PgCluster,
    strategy: str,
    rotations: int,
    every: float,
    load: Load,
    root: Path,
    events: EventLog,
    progress: TextIO,
) -> dict[str, Any]:
    target = await asyncio.to_thread(prepare, cluster, strategy)
    admin_dsn_file = cluster.write_admin_dsn(root / "admin.dsn", dbname=target.dbname)
    config: Config = parse_config(
        phase_config(cluster=cluster, target=target, root=root, admin_dsn_file=admin_dsn_file, every=every)
    )
    first_event = len(events.events)
    rotator = Rotator(config, install_signals=False, serve_api=False)
    agent = Agent(config, install_signals=False)
    rotator_task = asyncio.create_task(rotator.serve(), name=f"bench-rotator-{strategy}")
    agent_task = asyncio.create_task(agent.serve(), name=f"bench-agent-{strategy}")
    consumers = Consumers()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    timed_out = False
    try:
        # The first rotation mints version 1 (no current version yet); the agent is ready once it is written.
        await asyncio.wait_for(agent.ready.wait(), 30)
        t0 = time.time()
        await consumers.start(root=root, load=load, env=env)
        print(f"[{strategy}] consumers started: {load.per_use_procs} per-use + 1 pool", file=progress, flush=True)
        rotations_done_at: float | None = None
        slowed_at: int | None = None  # index into events.events when the schedule was slowed down
        last_line = ""
        while True:
            versions = await asyncio.to_thread(store_versions, root / "store.db")
            rotated = max(0, sum(1 for v in versions if not v.pending) - 1)
            retired = sum(1 for v in versions if v.retired)
            failures = sum(s.get("failures", 0) for _, s in consumers.stats())
            line = f"[{strategy}] rotations {rotated}/{rotations} retired {retired} failed requests {failures}"
            if line != last_line:
                print(f"{time.strftime('%H:%M:%S')} {line}", file=progress, flush=True)
                last_line = line
            if rotated >= rotations - 1 and slowed_at is None:
                # The schedule has already timed the last rotation (it times the next one as soon
                # as one completes): from now on it must time none, so exactly R rotations happen.
                slowed_at = len(events.events)
                for r in rotator.rotators.values():
                    r.reschedule(3600.0)
            if slowed_at is not None and rotated < rotations:
                since = {e["event"] for e in events.events[slowed_at:]}
                if since & {"rotation_postponed", "rotation_failed"}:
                    # The last rotation was put off, and would now wait an hour: ask for it at once.
                    rotator.rotate_now.set()
            if rotated >= rotations and rotations_done_at is None:
                rotations_done_at = time.monotonic()
            if rotated >= rotations and retired >= rotated:
                break
            if rotations_done_at is not None and time.monotonic() - rotations_done_at > RETIRE_DEADLINE:
                timed_out = True
                break
            if time.time() - t0 > rotations * (every + 5) + 60:
                timed_out = True
                break
            await asyncio.sleep(0.25)
        # A little load after the last retirement: a retirement that broke clients would show here.
        await asyncio.sleep(1.0)
    finally:
        await consumers.stop()
        rotator.should_exit.set()
        agent.should_exit.set()
        await asyncio.gather(rotator_task, agent_task, return_exceptions=True)
    t_end = time.time()
    return summarize(
        strategy=strategy,
        cluster=cluster,
        target=target,
        root=root,
        consumers=consumers,
        phase_events=_slice(events, first_event),
        t0=t0,
        t_end=t_end,
        timed_out=timed_out,
        load=load,
    )


def _slice(events: EventLog, start: int) -> EventLog:
    out = EventLog()
    out.events = events.events[start:]
    return out


def summarize(
    *,
    strategy: str,
    cluster: PgCluster,
    target: Target,
    root: Path,
    consumers: Consumers,
    phase_events: EventLog,
    t0: float,
    t_end: float,
    timed_out: bool,
    load: Load,
) -> dict[str, Any]:
    versions = store_versions(root / "store.db")
    promoted = phase_events.times("rotated")
    retired_at = phase_events.times("retired")
    ids = sorted(v.id for v in versions)
    drains = []
    for vid in ids:
        successor = next((n for n in ids if n > vid and str(n) in promoted), None)
        if str(vid) in retired_at and successor is not None:
            drains.append(retired_at[str(vid)] - promoted[str(successor)])
    duration = t_end - t0
    variants: dict[str, dict[str, Any]] = {}
    timeline: dict[str, dict[int, list[int]]] = {}
    uses_after_retirement = 0
    for variant, s in consumers.stats():
        v = variants.setdefault(
            variant, {"processes": 0, "requests": 0, "failed": 0, "connects": 0, "reloads": 0, "reasons": {}}
        )
        v["processes"] += 1
        v["requests"] += s.get("requests", 0)
        v["failed"] += s.get("failures", 0)
        v["connects"] += s.get("connects", 0)
        v["reloads"] += s.get("reloads", 0)
        for reason, n in s.get("reasons", {}).items():
            v["reasons"][reason] = v["reasons"].get(reason, 0) + n
        series = timeline.setdefault(variant, {})
        for sec, (req, fail) in s.get("buckets", {}).items():
            cur = series.setdefault(int(sec), [0, 0])
            cur[0] += req
            cur[1] += fail
        for version, last in s.get("last_use", {}).items():
            if version in retired_at and last > retired_at[version]:
                uses_after_retirement += 1
    for v in variants.values():
        v["rps"] = round(v["requests"] / duration, 1) if duration > 0 else 0.0
    roles = role_states(cluster, target.base)
    total_requests = sum(v["requests"] for v in variants.values())
    total_failed = sum(v["failed"] for v in variants.values())
    rotated = max(0, sum(1 for v in versions if not v.pending) - 1)
    retired = sum(1 for v in versions if v.retired)
    zero_downtime = strategy != "single-user"
    met = (total_failed == 0 and uses_after_retirement == 0) if zero_downtime else total_failed > 0
    return {
        "duration_s": round(duration, 1),
        "rotations": rotated,
        "retirements": retired,
        "rotation_failures": phase_events.count("rotation_failed"),
        "retirement_failures": phase_events.count("retirement_failed"),
        "promote_to_retire_s": {
            "n": len(drains),
            "max": _r(max(drains) if drains else None),
            "p99": _r(percentile(drains, 0.99)),
            "median": _r(statistics.median(drains) if drains else None),
        },
        "requests": total_requests,
        "failed": total_failed,
        "rps": round(total_requests / duration, 1) if duration > 0 else 0.0,
        "target_rps": load.total_rate,
        "consumers": variants,
        "uses_after_retirement": uses_after_retirement,
        "roles_at_end": roles,
        "timed_out": timed_out,
        "target": "0 failed requests" if zero_downtime else "> 0 failed requests (naive rotation breaks clients)",
        "met": met and not timed_out and retired >= rotated,
        "_timeline": {k: dict(sorted(series.items())) for k, series in timeline.items()},
        "_t0": t0,
        "_promotes": sorted(round(t - t0, 2) for t in promoted.values()),
    }


# ---------------------------------------------------------------- plot


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), squeeze=False)
    for ax, (strategy, res) in zip(axes[:, 0], results.items(), strict=True):
        timeline: dict[str, dict[int, list[int]]] = res["_timeline"]
        seconds = sorted({s for series in timeline.values() for s in series})
        # A bucket is one wall-clock second [s, s+1): drawn at its middle, relative to the start.
        xs = [s + 0.5 - res["_t0"] for s in seconds]
        total = [0] * len(seconds)
        fails = [0] * len(seconds)
        for variant, series in sorted(timeline.items()):
            counts = [series.get(s, [0, 0]) for s in seconds]
            ax.plot(xs, [c[0] for c in counts], label=f"{variant} requests/s", linewidth=1.2)
            for i, c in enumerate(counts):
                total[i] += c[0]
                fails[i] += c[1]
        ax.plot(xs, total, label="total requests/s", color="black", linewidth=1.6)
        for i, t in enumerate(res["_promotes"]):
            ax.axvline(t, color="grey", linestyle=":", linewidth=0.9, label="promote" if i == 0 else None)
        ax.set_ylim(0, max([*total, 1]) * 1.45)  # head room for the legend
        ax.set_ylabel("requests/s")
        # Failures on their own axis: a few per second must stay visible next to hundreds of requests.
        axf = ax.twinx()
        axf.bar(xs, fails, color="red", alpha=0.7, width=0.9, label="failed requests/s")
        axf.set_ylim(0, max([*fails, 1]) * 1.45)
        axf.set_ylabel("failed requests/s", color="red")
        axf.tick_params(axis="y", colors="red")
        d = res["promote_to_retire_s"]
        ax.set_title(
            f"{strategy}: {res['requests']} requests, {res['failed']} failed, "
            f"{res['rotations']} rotations, {res['retirements']} retired, "
            f"promote->retire max {d['max']} s / p99 {d['p99']} s",
            fontsize=10,
        )
        ax.set_xlabel("seconds since consumers started")
        ax.set_xlim(0, max(xs[-1] + 0.5, 1) if xs else 1)
        ax.grid(alpha=0.3)
        lines, labels = ax.get_legend_handles_labels()
        bars, bar_labels = axf.get_legend_handles_labels()
        ax.legend(lines + bars, labels + bar_labels, loc="upper center", fontsize=8, ncols=5)
    fig.suptitle("Baton: credential rotation under load", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


async def bench(args: argparse.Namespace, *, progress: TextIO, workdir: Path, events: EventLog) -> dict[str, Any]:
    load = Load()
    results: dict[str, dict[str, Any]] = {}
    pg = [s for s in args.strategies if s in PG_STRATEGIES]
    if pg:
        with private_cluster() as cluster:
            print(f"cluster ready on {cluster.host}:{cluster.port}", file=progress, flush=True)
            for strategy in pg:
                root = workdir / strategy
                root.mkdir()
                results[strategy] = await run_phase(
                    cluster=cluster,
                    strategy=strategy,
                    rotations=args.rotations,
                    every=args.every,
                    load=load,
                    root=root,
                    events=events,
                    progress=progress,
                )
    results |= await under_load_http.run_phases(
        [s for s in args.strategies if s in under_load_http.PHASES],
        rotations=args.rotations,
        every=args.every,
        load=load,
        workdir=workdir,
        events=events,
        progress=progress,
    )
    results |= await under_load_kv.run_phases(
        [s for s in args.strategies if s in under_load_kv.PHASES],
        rotations=args.rotations,
        every=args.every,
        load=load,
        workdir=workdir,
        events=events,
        progress=progress,
    )
    return {"load": vars(load) | {"total_rate": load.total_rate}, "strategies": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rotations", type=int, default=None, help="rotations per strategy (default 20, --quick 3)")
    p.add_argument("--every", type=float, default=1.5, help="rotation interval in seconds")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, stats)")
    args = p.parse_args(argv)
    if args.rotations is None:
        args.rotations = 3 if args.quick else 20
    if args.rotations < 1:
        p.error("--rotations must be >= 1")

    def on_term(_s: int, _f: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-rotation-"))
    events = EventLog()
    started = time.monotonic()
    with open(workdir / "baton.log", "w") as log_file:
        setup("json", "info", stream=log_file)
        logging.getLogger().addHandler(events)
        try:
            data = asyncio.run(bench(args, progress=sys.stderr, workdir=workdir, events=events))
        finally:
            _kill_leftovers()
            under_load_http.kill_leftovers()
            under_load_kv.kill_leftovers()
            logging.getLogger().handlers.clear()
    strategies = data["strategies"]
    out: dict[str, Any] = {
        "bench": "rotation_under_load",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rotations_requested": args.rotations,
        "every_s": args.every,
        "quick": args.quick,
        "load": data["load"],
        "wall_s": round(time.monotonic() - started, 1),
        "strategies": {
            name: {k: v for k, v in res.items() if not k.startswith("_")} for name, res in strategies.items()
        },
        "targets_met": all(res["met"] for res in strategies.values()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rotation_under_load.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(strategies, RESULTS / "rotation_under_load.png")
    print(json.dumps(out))
    if args.keep or not out["targets_met"]:
        print(f"work dir kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if out["targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
