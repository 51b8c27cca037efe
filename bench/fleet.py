"""Benchmark: a fleet of simulated nodes reporting on ONE credential, through each store's reporting path.

Paths: ``local`` (SQLite store, ``MetadataReporter``), ``aws`` (moto_server,
``reports: dynamodb``, ``DynamoReporter``), ``vault`` (the in-repo Vault double,
``reports: status_path``, ``VaultStatusReporter``). The servers are started here
on loopback; nothing talks to a real cloud.

A simulated node is a coroutine, not an agent: it builds ``NodeReport``s and
publishes them with the agent's own rule (``daemon.drain.Tracker.publish_all``:
on a change of state, else when a heartbeat is due). All nodes share one
reporter (one client): a real fleet would have one per node, so this measures
the store's side and our client's throughput, not a fleet's network. Timeline:

1. every node reports version 1 current and held (the initial wave);
2. a ``CredentialRotator`` (password generator) creates and promotes version 2;
3. each node, after a random delay in ``--spread`` s, reports version 2 current
   while still holding version 1 (change 1), and after another random delay the
   old holder gone (change 2, the drain);
4. ``CredentialRotator.retire_ready`` runs every rotator interval (the
   ``Rotator``'s own ``min(heartbeat / 2, 5 s)``) until it retires version 1.

Counted: publishes per node per rotation beyond heartbeats (target <= 2),
heartbeats, the store's own requests where the server can count them (Vault
double counters; botocore ``before-send`` hooks for DynamoDB and Secrets
Manager; store method calls for SQLite), and the time from the last node's drain
report to the retirement decision (target <= one heartbeat).

Heartbeats: 10,000 nodes at the daemon's 30 s heartbeat write 333 reports/s for
as long as the run lasts. moto_server and the Vault double cannot take that while
the rotator collects 10,000 reports every 5 s, so ``aws`` (300 s) and ``vault``
(120 s) run with a longer heartbeat by default (``HEARTBEATS``; the reason is in
the JSON as ``heartbeat_why``; ``--heartbeat-<path>`` overrides). The rotator
interval is ``min(heartbeat / 2, 5 s)`` = 5 s either way. ``decision`` breaks the
latency down by pass; ``--also-default-heartbeat vault`` (the default) runs the
Vault path a second time at 30 s and records what that measured
(``default_heartbeat_run``). The Vault double runs in its own process
(``python -m tests.doubles.vault``) so it does not share a core with the fleet;
all simulated nodes still publish through the bench's one process, which also
runs the rotator (``cpu_busy`` shows which process was the bottleneck).

Before each HTTP path the publish throughput is probed; a path whose full fleet
would take more than ``--budget`` s (default 900) runs with fewer nodes, and the
JSON says so (``nodes_requested``, ``nodes``, ``reduced_because``). Prints ONE
JSON object on stdout, progress on stderr, writes bench/results/fleet.json and
fleet.png. It never prints a credential value (the rotator's passwords stay in
the store).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import Config, parse_config
from daemon.errors import BatonError, StoreError
from daemon.model import Secret
from daemon.providers.password import PasswordProvider
from daemon.report import open_reporter
from daemon.report.base import Holder, NodeReport, Reporter
from daemon.rotation.workflow import CredentialRotator
from daemon.stores import open_store
from daemon.stores.base import SecretStore

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "fleet/db"
CRED = "db"
TARGET_WRITES = 2.0
PATHS = ("local", "aws", "vault")
IN_RUN_FACTOR = 0.4
DEFAULT_HEARTBEAT = 30.0  # the daemon's default (daemon.config ReportConfig.heartbeat)
# Per-path default heartbeat, and why: 10,000 nodes at a heartbeat of H s make 10,000 / H writes/s
# for as long as the run lasts, on top of the rotation's 20,000 changes.
HEARTBEATS: dict[str, tuple[float, str]] = {
    "local": (DEFAULT_HEARTBEAT, "the daemon's default"),
    "aws": (
        300.0,
        "moto_server takes ~130-330 report writes/s; at 10,000 nodes a 30 s heartbeat alone is 333 writes/s, "
        "so the fleet could never catch up. 300 s leaves room for the rotation's writes",
    ),
    "vault": (
        120.0,
        "at 10,000 nodes and the default 30 s heartbeat (333 writes/s) each retire pass's 10,000 reads took "
        "27-49 s (measured: decision 47-51 s = 1.6-1.7 heartbeats after the last drain). The bottleneck is the "
        "bench's own process (cpu_busy ~1.0, the double's ~0.2): it publishes for all 10,000 nodes through hvac "
        "and runs the rotator's reads, where a real rotator only reads. At 120 s the heartbeats leave that "
        "process room for the collect",
    ),
}


# What a second run at the default heartbeat (--also-default-heartbeat) keeps in the JSON.
DEFAULT_RUN_KEYS = (
    "nodes",
    "heartbeat_s",
    "run_s",
    "decision_latency_s",
    "decision_latency_heartbeats",
    "collect_s_median",
    "collect_s_max",
    "retire_pass_s",
    "publishes",
    "publishes_per_s_in_drain_window",
    "writes_per_node_per_rotation_max",
    "cpu_busy",
    "met",
)


def progress(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- counting


@dataclass
class Counts:
    publishes: Counter[str] = field(default_factory=Counter)  # kind -> count
    per_node: Counter[str] = field(default_factory=Counter)  # node -> post-rotation change publishes
    failures: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)  # store-side request counters
    publish_seconds: list[float] = field(default_factory=list)
    publish_done_at: list[float] = field(default_factory=list)  # monotonic


class CountingReporter:
    """Wraps the path's reporter: counts and times every publish; collect passes are timed too."""

    def __init__(self, inner: Reporter, counts: Counts) -> None:
        self.inner = inner
        self.counts = counts
        self.collect_seconds: list[float] = []

    async def publish(self, key: str, report: NodeReport) -> None:
        started = time.perf_counter()
        await self.inner.publish(key, report)
        self.counts.publish_seconds.append(time.perf_counter() - started)
        self.counts.publish_done_at.append(time.monotonic())

    async def collect(self, key: str, credential: str) -> list[NodeReport]:
        started = time.perf_counter()
        try:
            return await self.inner.collect(key, credential)
        finally:
            self.collect_seconds.append(time.perf_counter() - started)

    async def forget(self, key: str, node: str) -> None:
        await self.inner.forget(key, node)

    async def aclose(self) -> None:
        await self.inner.aclose()


def count_calls(obj: Any, names: tuple[str, ...], counts: Counts, prefix: str) -> None:
    """Count calls of ``obj``'s async methods ``names`` (the store's own operations)."""
    for name in names:
        fn = getattr(obj, name)

        async def wrapped(*args: Any, __fn: Any = fn, __name: str = name, **kwargs: Any) -> Any:
            counts.requests[f"{prefix}.{__name}"] += 1
            return await __fn(*args, **kwargs)

        setattr(obj, name, wrapped)


def count_botocore(client: Any, service: str, counts: Counts) -> None:
    """Count every HTTP request the client sends (retries included), by operation."""

    def before_send(request: Any, **_: Any) -> None:
        target = request.headers.get("X-Amz-Target", b"")
        op = target.decode().rpartition(".")[2] if isinstance(target, bytes) else str(target).rpartition(".")[2]
        counts.requests[f"{service}.{op or 'request'}"] += 1

    client.meta.events.register(f"before-send.{service}", before_send)


# ---------------------------------------------------------------- one path's servers


@dataclass
class Env:
    config: Config
    store: SecretStore
    reporter: Reporter
    counts: Counts
    server_counts: Callable[[], dict[str, int]] = dict
    notes: list[str] = field(default_factory=list)
    server_pid: Callable[[], int | None] = lambda: None  # the double's own process, if it has one


def no_pid() -> int | None:
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def base_config(store: dict[str, Any], *, heartbeat: float) -> Config:
    return parse_config(
        {
            "node_id": "rotator",
            "store": store,
            "report": {"heartbeat": heartbeat},
            "credentials": [
                {
                    "name": CRED,
                    "key": KEY,
                    "output": {"dir": "/nonexistent/fleet-bench"},  # the bench never writes files
                    "rotation": {"every": "1h", "generator": {"length": 24}},
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def environment(path: str, *, heartbeat: float, workdir: Path, vault_double: str) -> AsyncIterator[Env]:
    counts = Counts()
    if path == "local":
        config = base_config({"kind": "local", "path": str(workdir / "store.db")}, heartbeat=heartbeat)
        store = open_store(config)
        count_calls(
            store,
            ("merge_metadata", "read_metadata", "versions", "read", "create", "promote", "retire"),
            counts,
            "sqlite",
        )
        reporter = open_reporter(config, store)
        try:
            yield Env(config, store, reporter, counts, notes=["MetadataReporter: one merged metadata row per node"])
        finally:
            await reporter.aclose()
            await store.aclose()
        return
    if path == "aws":
        from tests.fixtures.moto import AWS_ENV, MotoServer, _free_port

        os.environ.update(AWS_ENV)
        server = MotoServer(port=_free_port(), log_path=workdir / "moto_server.log")
        await asyncio.to_thread(server.start)
        try:
            config = base_config(
                {
                    "kind": "aws",
                    "endpoint_url": server.url,
                    "poll_interval": 5,
                    "reports": "dynamodb",
                    "dynamodb_table": "baton-fleet",
                },
                heartbeat=heartbeat,
            )
            from daemon.report.dynamodb import DynamoReporter

            store = open_store(config)
            assert isinstance(open_reporter(config, store), DynamoReporter)  # the configured path
            reporter = DynamoReporter.from_config(config, store, create_table=True)
            await reporter.ensure_table()
            count_botocore(await reporter._get_client(), "dynamodb", counts)
            count_botocore(await store._get_client(), "secretsmanager", counts)  # type: ignore[attr-defined]
            try:
                yield Env(
                    config,
                    store,
                    reporter,
                    counts,
                    notes=["DynamoReporter: one item per node, conditional PutItem"],
                    server_pid=lambda: server.proc.pid if server.proc is not None else None,
                )
            finally:
                await reporter.aclose()
                await store.aclose()
        finally:
            await asyncio.to_thread(server.stop)
        return
    if path == "vault":
        from tests.doubles.vault import VaultDouble, VaultProcess, VaultServer

        server_counts: Callable[[], dict[str, int]]
        vs: VaultProcess | VaultServer
        if vault_double == "process":
            # Its own process, so the server does not share a GIL with 10k simulated nodes.
            vp = VaultProcess()
            vs = vp
            server_counts = vp.counts
            server_pid: Callable[[], int | None] = vp.pid
        else:
            vt = VaultServer(VaultDouble())
            vs = vt
            double = vt.double
            server_pid = no_pid

            def server_counts() -> dict[str, int]:
                with double._lock:
                    return {f"{m} {k}": n for (m, k), n in sorted(double.counts.items())}

        await asyncio.to_thread(vs.start)
        os.environ["VAULT_TOKEN"] = vs.root_token
        try:
            config = base_config(
                {"kind": "vault", "url": vs.url, "poll_interval": 5, "reports": "status_path"}, heartbeat=heartbeat
            )
            store = open_store(config)
            reporter = open_reporter(config, store)
            try:
                yield Env(
                    config,
                    store,
                    reporter,
                    counts,
                    server_counts,
                    notes=[
                        "VaultStatusReporter: one KV entry per node; collect lists and reads every entry",
                        "Vault double in "
                        + ("its own process" if vault_double == "process" else "a thread of the bench"),
                    ],
                    server_pid=server_pid,
                )
            finally:
                await reporter.aclose()
                await store.aclose()
        finally:
            os.environ.pop("VAULT_TOKEN", None)
            await asyncio.to_thread(vs.stop)
        return
    raise ValueError(path)


# ---------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    env: Env
    heartbeat: float
    concurrency: int
    spread: float
    old: str = ""
    new: str = ""
    rotated: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    drained_at: list[float] = field(default_factory=list)
    initial_done: int = 0
    initial_all: asyncio.Event = field(default_factory=asyncio.Event)
    nodes: int = 0
    sem: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(32))


class SimNode:
    """One node's reporting: the agent's publish rule on a scripted holder timeline."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.name = f"node-{index:05d}"
        self.pid = 1000 + index
        self.published: NodeReport | None = None
        self.last_publish = 0.0  # monotonic
        self.rotated_seen = False

    def report(self, current: str, held: str | None) -> NodeReport:
        holders = (Holder(self.pid, "/usr/bin/app", "app", "fd", held),) if held else ()
        return NodeReport(
            node=self.name,
            credential=CRED,
            current=current,
            in_use={held: 1} if held else {},
            holders=holders,
            heartbeat=time.time(),
            agent_version="bench",
        )

    async def tick(self, current: str, held: str | None) -> None:
        """``Tracker.publish_all`` for one credential: publish on change or when a heartbeat is due."""
        report = self.report(current, held)
        now = time.monotonic()
        due = now - self.last_publish >= self.fleet.heartbeat
        changed = not report.same_state(self.published)
        if not changed and not due:
            return
        counts = self.fleet.env.counts
        async with self.fleet.sem:
            try:
                await self.fleet.env.reporter.publish(KEY, report)
            except BatonError as e:
                counts.failures[type(e).__name__] += 1
                return
        if not changed:
            kind = "heartbeat"
        elif self.published is None:
            kind = "initial"
        elif self.rotated_seen:
            kind = "rotation_change"
            counts.per_node[self.name] += 1
        else:
            kind = "other_change"
        counts.publishes[kind] += 1
        self.published = report
        self.last_publish = time.monotonic()

    async def idle(self, current: str, held: str | None, until: Callable[[], Any], *, timeout: float | None) -> None:
        """Wait for ``until()`` (an awaitable factory) or ``timeout``, publishing heartbeats meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = asyncio.ensure_future(until()) if until is not None else None
        try:
            while True:
                now = time.monotonic()
                next_hb = self.last_publish + self.fleet.heartbeat
                wake = next_hb if deadline is None else min(next_hb, deadline)
                if waiter is not None:
                    done, _ = await asyncio.wait([waiter], timeout=max(0.0, wake - now))
                    if done:
                        return
                else:
                    await asyncio.sleep(max(0.0, wake - now))
                if deadline is not None and time.monotonic() >= deadline:
                    return
                await self.tick(current, held)
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()

    async def life(self) -> None:
        f = self.fleet
        await self.tick(f.old, f.old)  # the initial wave: version 1 current and held
        f.initial_done += 1
        if f.initial_done == f.nodes:
            f.initial_all.set()
        await self.idle(f.old, f.old, f.rotated.wait, timeout=None)
        self.rotated_seen = True
        await self.idle(f.old, f.old, f.stop.wait, timeout=random.uniform(0, f.spread))  # detection delay
        await self.tick(f.new, f.old)  # change 1: the new version is current, the old one still held
        await self.idle(f.new, f.old, f.stop.wait, timeout=random.uniform(0, f.spread))  # drain delay
        await self.tick(f.new, None)  # change 2: drained
        f.drained_at.append(time.monotonic())
        await self.idle(f.new, None, f.stop.wait, timeout=None)  # heartbeats until the run ends


async def probe_throughput(env: Env, *, samples: int, concurrency: int) -> float:
    """Publishes per second through this path's reporter, on throw-away node ids."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        r = NodeReport(node=f"probe-{i:05d}", credential="probe", current="1", heartbeat=time.time())
        async with sem:
            await env.reporter.publish(KEY + "-probe", r)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(samples)))
    return samples / (time.perf_counter() - started)


async def run_path(
    path: str,
    *,
    nodes: int,
    nodes_fixed: bool,
    heartbeat: float,
    heartbeat_why: str,
    spread: float,
    concurrency: int,
    budget: float,
    workdir: Path,
    vault_double: str = "process",
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": path,
        "nodes_requested": nodes,
        "heartbeat_s": heartbeat,
        "heartbeat_why": heartbeat_why,
        "spread_s": spread,
    }
    async with environment(path, heartbeat=heartbeat, workdir=workdir, vault_double=vault_double) as env:
        out["notes"] = env.notes
        # Seed version 1 (operator put), as a rotator cannot start a key that does not exist on every store.
        seed = await env.store.create(KEY, Secret("bench-seed-" + os.urandom(8).hex()))
        await env.store.promote(KEY, seed.id)

        rate = await probe_throughput(env, samples=200 if path != "local" else 1000, concurrency=concurrency)

        # Per node: the initial publish and two changes, plus heartbeats for as long as the run lasts:
        # T = (3 N + N T / H) / rate, i.e. T = 3 N / (rate - N / H); no steady state when N / H >= rate.
        # The probe runs alone; during the run the rotator's collect passes and the server share the
        # same cores, which measured about 2.5x slower (aws: 225/s probed, ~70-90/s in the run).
        sustained = rate * IN_RUN_FACTOR

        def projected_s(n: int) -> float:
            spare = sustained - n / heartbeat
            return float("inf") if spare <= 0 else 3 * n / spare + 2 * spread

        projected = projected_s(nodes)
        out["probe_publishes_per_s"] = round(rate, 1)
        out["heartbeat_load_per_s_at_requested_nodes"] = round(nodes / heartbeat, 1)
        out["projected_s_for_requested_nodes"] = round(projected, 1) if projected != float("inf") else None
        if projected > budget and not nodes_fixed:
            fitted = nodes
            while fitted > 100 and projected_s(fitted) > budget:
                fitted -= 100
            out["reduced_because"] = (
                f"{nodes} nodes at ~{sustained:.0f} publishes/s sustained ({rate:.0f}/s probed alone; heartbeats "
                f"alone need {nodes / heartbeat:.0f}/s) "
                f"would take {'forever' if projected == float('inf') else f'~{projected:.0f}s'} "
                f"(> {budget:.0f}s budget); ran {fitted} nodes. Pass --nodes-{path} {nodes} to force the full fleet."
            )
            progress(out["reduced_because"])
            nodes = fitted
        out["nodes"] = nodes
        counts = env.counts
        counts.publishes.clear()
        counts.requests.clear()
        counts.publish_seconds.clear()
        counts.publish_done_at.clear()
        server_before = env.server_counts()

        cred = env.config.credential(CRED)
        assert cred.rotation is not None and cred.rotation.generator is not None
        counting = CountingReporter(env.reporter, counts)
        env_reporter = env.reporter
        env.reporter = counting
        rotator: CredentialRotator = CredentialRotator(
            config=env.config,
            credential=cred,
            store=env.store,
            reporter=counting,
            provider=PasswordProvider(cred.rotation.generator),
        )
        fleet = Fleet(env=env, heartbeat=heartbeat, concurrency=concurrency, spread=spread, nodes=nodes)
        fleet.sem = asyncio.Semaphore(concurrency)
        fleet.old = seed.id
        sims = [SimNode(fleet, i) for i in range(nodes)]
        t0 = time.monotonic()
        bench_cpu0 = time.process_time()
        server_cpu0 = cpu_seconds(env.server_pid())
        tasks = [asyncio.create_task(s.life(), name=s.name) for s in sims]

        async def report_progress() -> None:
            while True:
                await asyncio.sleep(5)
                progress(
                    f"{path}: {sum(counts.publishes.values())} publishes, {len(fleet.drained_at)}/{nodes} drained, "
                    f"{time.monotonic() - t0:.0f}s"
                )

        ticker = asyncio.create_task(report_progress())
        try:
            await fleet.initial_all.wait()
            out["initial_wave_s"] = round(time.monotonic() - t0, 2)
            progress(f"{path}: initial wave of {nodes} nodes in {out['initial_wave_s']}s; rotating")
            rot_before = env.server_counts()
            outcome = await rotator.rotate()
            rot_after = env.server_counts()
            rotate_requests = sum(rot_after.values()) - sum(rot_before.values())
            if outcome.result != "rotated" or outcome.version is None:
                raise RuntimeError(f"rotation failed: {outcome}")
            fleet.new = outcome.version
            rotated_at = time.monotonic()
            fleet.rotated.set()

            interval = max(0.05, min(heartbeat / 2, 5.0))  # daemon.rotation.service.Rotator._retire_interval
            out["rotator_interval_s"] = interval
            passes: list[dict[str, Any]] = []
            decided_at: float | None = None
            while decided_at is None:
                before = env.server_counts()
                req_before = sum(counts.requests.values())
                started = time.monotonic()
                try:
                    retired = await rotator.retire_ready()
                    err = None
                except StoreError as e:
                    retired, err = [], str(e)
                ended = time.monotonic()
                after = env.server_counts()
                passes.append(
                    {
                        "at_s": round(started - rotated_at, 2),
                        "took_s": round(ended - started, 3),
                        "drained": len(fleet.drained_at),
                        "reasons": len(rotator.last_decisions[0].reasons) if rotator.last_decisions else None,
                        "error": err,
                        # All requests the server saw during the pass, the fleet's publishes included.
                        "server_requests": sum(after.values()) - sum(before.values()),
                        # Reads only: the nodes never read, so these are the rotator's.
                        "server_reads": sum(
                            n - before.get(k, 0) for k, n in after.items() if k.startswith(("GET ", "LIST "))
                        ),
                        "client_requests": sum(counts.requests.values()) - req_before,
                    }
                )
                if retired == [fleet.old]:
                    decided_at = ended
                    break
                if err is not None:
                    progress(f"{path}: retire pass failed: {err}")
                if time.monotonic() - rotated_at > budget * 3:
                    raise RuntimeError(f"no retirement decision after {budget * 3:.0f}s; last pass {passes[-1]}")
                await asyncio.sleep(max(0.0, interval - (ended - started)))
            fleet.stop.set()
            await asyncio.gather(*tasks)
        finally:
            ticker.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, ticker, return_exceptions=True)
            env.reporter = env_reporter
        server_after = env.server_counts()
        wall = time.monotonic() - t0
        server_cpu1 = cpu_seconds(env.server_pid())
        out["cpu_busy"] = {
            # Share of one core used over the run: near 1.0 means that process was the bottleneck.
            "bench_process": round((time.process_time() - bench_cpu0) / wall, 2),
            "server_process": None
            if server_cpu0 is None or server_cpu1 is None
            else round((server_cpu1 - server_cpu0) / wall, 2),
        }

        last_drain = max(fleet.drained_at)
        latency = decided_at - last_drain
        per_node = [counts.per_node.get(s.name, 0) for s in sims]
        rotation_writes = counts.publishes["rotation_change"]
        out.update(
            {
                "version_old": fleet.old,
                "version_new": fleet.new,
                "run_s": round(time.monotonic() - t0, 2),
                "publishes_per_s_in_run": round(sum(counts.publishes.values()) / (time.monotonic() - t0), 1),
                "publishes_per_s_peak_5s": peak_rate(counts.publish_done_at, window=5.0),
                # While the rotator's passes collect every few seconds: what the server has left for writes.
                "publishes_per_s_in_drain_window": round(
                    sum(rotated_at <= t <= last_drain for t in counts.publish_done_at)
                    / max(1e-9, last_drain - rotated_at),
                    1,
                ),
                "publishes": dict(counts.publishes),
                "publish_failures": dict(counts.failures),
                "publish_ms": {
                    "median": round(statistics.median(counts.publish_seconds) * 1000, 2),
                    "p99": round(
                        sorted(counts.publish_seconds)[int(0.99 * (len(counts.publish_seconds) - 1))] * 1000, 2
                    ),
                },
                "writes_per_node_per_rotation": round(rotation_writes / nodes, 3),
                "writes_per_node_per_rotation_max": max(per_node),
                "heartbeat_writes_per_node": round(counts.publishes["heartbeat"] / nodes, 3),
                "heartbeat_writes_per_node_per_hour": round(3600 / heartbeat, 1),
                "client_requests": dict(sorted(counts.requests.items())),
                "server_requests": {
                    k: server_after.get(k, 0) - server_before.get(k, 0)
                    for k in sorted(server_after)
                    if server_after.get(k, 0) - server_before.get(k, 0)
                },
                "drain_window_s": round(last_drain - rotated_at, 2),
                "decision_latency_s": round(latency, 3),
                "decision_latency_heartbeats": round(latency / heartbeat, 3),
                "retire_passes": len(passes),
                "retire_pass_s": {
                    "median": round(statistics.median(p["took_s"] for p in passes), 3),
                    "max": round(max(p["took_s"] for p in passes), 3),
                },
                "collect_s_median": round(statistics.median(counting.collect_seconds), 3)
                if counting.collect_seconds
                else None,
                "collect_s_max": round(max(counting.collect_seconds), 3) if counting.collect_seconds else None,
                "collects": len(counting.collect_seconds),
                "passes": passes[-5:],
                "retire_pass_errors": sum(p["error"] is not None for p in passes),
            }
        )
        server_requests_total = sum(out["server_requests"].values())
        if server_requests_total:
            # Per-pass request counts include the fleet's publishes made meanwhile; reads are the rotator's own.
            out["server_requests_during_rotate"] = rotate_requests
            out["server_reads_per_pass_median"] = statistics.median(p["server_reads"] for p in passes)
            out["server_reads_per_node_per_pass_median"] = round(out["server_reads_per_pass_median"] / nodes, 3)
            writes = sum(n for k, n in out["server_requests"].items() if k.startswith(("POST data", "POST metadata")))
            out["server_writes_per_node"] = round(writes / nodes, 2)
        out["decision"] = latency_model(
            latency=latency,
            heartbeat=heartbeat,
            interval=interval,
            passes=passes,
            last_drain_at=last_drain - rotated_at,
            nodes=nodes,
            rate=rate,
            drain_rate=out["publishes_per_s_in_drain_window"],
        )
        out["met"] = {
            "writes_per_node_per_rotation<=2": out["writes_per_node_per_rotation_max"] <= TARGET_WRITES,
            "decision_within_one_heartbeat": latency <= heartbeat,
        }
        progress(
            f"{path}: {nodes} nodes, {out['writes_per_node_per_rotation']} writes/node/rotation, "
            f"decision {latency:.2f}s after the last drain (heartbeat {heartbeat}s)"
        )
    return out


def peak_rate(done_at: list[float], *, window: float) -> float:
    """The most publishes completed in any ``window`` s, per second."""
    times = sorted(done_at)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return round(best / window, 1)


def latency_model(
    *,
    latency: float,
    heartbeat: float,
    interval: float,
    passes: list[dict[str, Any]],
    last_drain_at: float,
    nodes: int,
    rate: float,
    drain_rate: float,
) -> dict[str, Any]:
    """How the decision latency came about, from the measured passes, and what it means for a 30 s heartbeat.

    A retire pass collects every report; the one that decides must start after the
    last drain report is stored. So the latency is at most the wait for the next
    pass (the rotator interval, or the pass before it if that runs longer) plus one
    pass: ``max(interval, pass) + pass``. The interval is ``min(heartbeat / 2, 5 s)``:
    5 s for any heartbeat of 10 s or more, so the heartbeat enters only through the
    server's load (a shorter heartbeat means more writes while the pass collects).
    """
    took = [p["took_s"] for p in passes]
    decisive = passes[-1]
    pass_max = max(took)
    bound = max(interval, pass_max) + pass_max
    default_interval = max(0.05, min(DEFAULT_HEARTBEAT / 2, 5.0))
    bound_default = max(default_interval, pass_max) + pass_max
    out: dict[str, Any] = {
        "latency_s": round(latency, 3),
        "latency_heartbeats": round(latency / heartbeat, 3),
        "rotator_interval_s": interval,
        "decisive_pass_started_s_after_last_drain": round(decisive["at_s"] - last_drain_at, 3),
        "decisive_pass_took_s": decisive["took_s"],
        "pass_s_max": pass_max,
        "bound_s": round(bound, 3),
        "within_bound": latency <= bound + 0.5,  # 0.5 s: the bench's own bookkeeping between passes
    }
    heartbeat_load = nodes / DEFAULT_HEARTBEAT
    if heartbeat == DEFAULT_HEARTBEAT:
        out["at_default_heartbeat"] = "measured: this run used the default heartbeat"
    elif heartbeat_load >= drain_rate:
        out["at_default_heartbeat"] = (
            f"not measured, and not reachable on this double: at a {DEFAULT_HEARTBEAT:g} s heartbeat {nodes} nodes "
            f"write {heartbeat_load:.0f} heartbeats/s, more than the {drain_rate:.0f} publishes/s this run got "
            f"through while the rotator's passes ran ({rate:.0f}/s probed on an idle server); the fleet would fall "
            f"behind, reports would go stale, and the latency would be set by the double, not by the rotator"
        )
    else:
        out["at_default_heartbeat"] = (
            f"not measured in this run (see default_heartbeat_run if present). The rotator interval is "
            f"{default_interval:g} s at a {DEFAULT_HEARTBEAT:g} s heartbeat too, so the latency is at most "
            f"max(interval, pass) + pass; passes here took up to {pass_max:.1f} s (bound {bound_default:.1f} s), "
            f"but at {DEFAULT_HEARTBEAT:g} s the heartbeats add {heartbeat_load - nodes / heartbeat:.0f} writes/s "
            f"during every pass, so passes would be slower and this bound does not carry over"
        )
    return out


# ---------------------------------------------------------------- plot


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if "error" not in r]
    if not names:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(names))
    changes = [results[n]["writes_per_node_per_rotation"] for n in names]
    beats = [results[n]["heartbeat_writes_per_node"] for n in names]
    ax1.bar(xs, changes, label="on change (after the rotation)", color="#4477aa")
    ax1.bar(xs, beats, bottom=changes, label="heartbeats during the run", color="#bbbbbb")
    ax1.axhline(TARGET_WRITES, color="#cc3311", linestyle="--", linewidth=1, label="target: 2 beyond heartbeats")
    ax1.set_xticks(list(xs), [f"{n}\n{results[n]['nodes']} nodes" for n in names])
    ax1.set_ylim(0, max(TARGET_WRITES, *(c + b for c, b in zip(changes, beats, strict=True))) * 1.3)
    ax1.set_ylabel("report writes per node per rotation")
    ax1.legend(fontsize=8, loc="upper right")
    ax1.set_title("writes per node")
    # Each path's run, then any second run at the default heartbeat (--also-default-heartbeat).
    runs = [(f"{n}\nheartbeat {results[n]['heartbeat_s']:.0f}s", results[n]) for n in names]
    runs += [
        (f"{n}\nheartbeat {r['heartbeat_s']:.0f}s\n(second run)", r)
        for n in names
        if "error" not in (r := results[n].get("default_heartbeat_run") or {"error": "none"})
    ]
    lat = [r["decision_latency_heartbeats"] for _, r in runs]
    bars = ax2.bar(range(len(runs)), lat, color=["#228833" if lt <= 1.0 else "#cc3311" for lt in lat])
    ax2.axhline(1.0, color="#cc3311", linestyle="--", linewidth=1, label="target: one heartbeat")
    for b, (_, r) in zip(bars, runs, strict=True):
        ax2.annotate(
            f"{r['decision_latency_s']:.1f}s",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax2.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    ax2.set_ylim(0, max(1.0, *lat) * 1.25)
    ax2.set_ylabel("last drain report to retirement, in heartbeats")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.set_title("decision latency (labels: seconds)")
    fig.text(
        0.5,
        0.01,
        "heartbeat per path: what the test setup absorbs at 10,000 nodes (aws: moto_server; vault: the bench's "
        "own client process); see heartbeat_why in fleet.json",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: local,aws,vault")
    ap.add_argument("--nodes", type=int, default=10_000, help="fleet size for every path (default 10000)")
    for p in PATHS:
        ap.add_argument(f"--nodes-{p}", type=int, default=None, help=f"fleet size for {p}, never reduced")
    ap.add_argument(
        "--heartbeat", type=float, default=None, help="report heartbeat for every path, s (default: per path, below)"
    )
    for p in PATHS:
        ap.add_argument(
            f"--heartbeat-{p}",
            type=float,
            default=None,
            help=f"report heartbeat for {p}, s (default {HEARTBEATS[p][0]:g}: {HEARTBEATS[p][1]})",
        )
    ap.add_argument(
        "--also-default-heartbeat",
        default="vault",
        metavar="PATHS",
        help="comma-separated paths to run a second time at the daemon's 30 s heartbeat (same nodes), to measure "
        "the decision latency there rather than estimate it (default: vault; '' for none; aws cannot keep up)",
    )
    ap.add_argument(
        "--vault-double",
        choices=("process", "thread"),
        default="process",
        help="run the Vault double in its own process (default) or in a thread of the bench",
    )
    ap.add_argument("--spread", type=float, default=5.0, help="nodes detect and drain within this many s")
    ap.add_argument("--concurrency", type=int, default=32, help="publishes in flight at once")
    ap.add_argument(
        "--budget", type=float, default=900.0, help="reduce a path's nodes to finish in about this many s (default 900)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = ap.parse_args()
    random.seed(args.seed)

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    also_default = {p.strip() for p in args.also_default_heartbeat.split(",") if p.strip()}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="baton-fleet-") as tmp:
        for p in paths:
            fixed = getattr(args, f"nodes_{p}")
            hb_path = getattr(args, f"heartbeat_{p}")
            if hb_path is not None:
                heartbeat, why = hb_path, f"--heartbeat-{p}"
            elif args.heartbeat is not None:
                heartbeat, why = args.heartbeat, "--heartbeat"
            else:
                heartbeat, why = HEARTBEATS[p]
            progress(f"{p}: starting")
            try:
                results[p] = asyncio.run(
                    run_path(
                        p,
                        nodes=fixed if fixed is not None else args.nodes,
                        nodes_fixed=fixed is not None,
                        heartbeat=heartbeat,
                        heartbeat_why=why,
                        spread=args.spread,
                        concurrency=args.concurrency,
                        budget=args.budget,
                        workdir=Path(tempfile.mkdtemp(dir=tmp, prefix=p + "-")),
                        vault_double=args.vault_double,
                    )
                )
            except Exception as e:  # one path failing must not hide the others' numbers
                progress(f"{p}: FAILED {type(e).__name__}: {e}")
                results[p] = {"path": p, "error": f"{type(e).__name__}: {e}"}
                continue
            if p in also_default and heartbeat != DEFAULT_HEARTBEAT:
                progress(f"{p}: again at the default {DEFAULT_HEARTBEAT:g} s heartbeat, {results[p]['nodes']} nodes")
                try:
                    again = asyncio.run(
                        run_path(
                            p,
                            nodes=results[p]["nodes"],
                            nodes_fixed=True,
                            heartbeat=DEFAULT_HEARTBEAT,
                            heartbeat_why="--also-default-heartbeat",
                            spread=args.spread,
                            concurrency=args.concurrency,
                            budget=args.budget,
                            workdir=Path(tempfile.mkdtemp(dir=tmp, prefix=p + "-default-")),
                            vault_double=args.vault_double,
                        )
                    )
                    run = {k: again[k] for k in DEFAULT_RUN_KEYS}
                    results[p]["decision"]["at_default_heartbeat"] = (
                        f"measured in a second run at {DEFAULT_HEARTBEAT:g} s ({again['nodes']} nodes): decision "
                        f"{again['decision_latency_s']:.1f} s = {again['decision_latency_heartbeats']:.2f} heartbeats "
                        f"after the last drain, collect median {again['collect_s_median']} s "
                        f"(default_heartbeat_run)"
                    )
                except Exception as e:
                    progress(f"{p}: the default-heartbeat run FAILED {type(e).__name__}: {e}")
                    run = {"heartbeat_s": DEFAULT_HEARTBEAT, "error": f"{type(e).__name__}: {e}"}
                results[p]["default_heartbeat_run"] = run
    summary = {
        "bench": "fleet",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "targets": {"writes_per_node_per_rotation_beyond_heartbeats": TARGET_WRITES, "decision_within": "1 heartbeat"},
        "paths": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with contextlib.suppress(Exception):
        plot(results, args.out.with_suffix(".png"))
    print(json.dumps(summary, sort_keys=True))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
