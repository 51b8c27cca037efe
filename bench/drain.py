"""Benchmark: how fast a superseded version is retired once nothing holds it, and what the agent costs idle.

Three phases, each with DEFAULT tuning (heartbeat 30 s, scan_interval 5 s,
debounce 2 s, fanotify auto); only the listen address and log level are set:

- ``local``: the embedded (SQLite) store, a ``baton agent`` subprocess and a
  rotator in this process (generator). For each sample a holder process opens
  the credential file and keeps it open (``loads: at-start``, ``reload: none``:
  nothing makes it let go); the rotator rotates (``rotate_now``, what ``baton
  rotate`` asks for), and once the rotator's gate names the holder, the clock
  starts and the holder is killed. It stops when the rotator has retired the
  old version. Target p99 < 1 s.
- ``postgres``: a private PostgreSQL 15 cluster (tests/fixtures/postgres.py),
  the postgres provider (alternating-users) and 2 per-use clients
  (bench/pg_consumer.py: a new connection per request, reading the file each
  time, 20 requests/s each). From ``rotate_now`` to the old version retired.
  Target p99 < 3 s.
- ``idle``: 2,000 ``sleep`` processes on the node, the agent following one
  credential with one consumer (nothing draining): the agent's CPU over
  ``--idle-seconds``. Target < 1 % of one core.

Prints ONE JSON object; writes bench/results/drain.json and a plot of every
sample against the targets, beside bench/results/drain-before.json (the same
bench before fast drains) when it is there: bench/results/drain.png; progress
on stderr.
Never prints a secret value (generated throwaway values, digests only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import RESULTS, emit, machine, percentile, progress, sample, start_agent, stop
from daemon.config import Config, parse_config
from daemon.rotation.service import Rotator
from daemon.rotation.workflow import CredentialRotator

NAME = "drain"
KEY = "bench/drain"
CONSUMER = Path(__file__).resolve().parent / "pg_consumer.py"
TARGET_LOCAL_P99 = 1.0
TARGET_PG_P99 = 3.0
TARGET_IDLE_CPU = 1.0  # percent of one core

# Holds the credential file open until killed; says "ready" once it has it open.
HOLDER = r"""
import sys, time
held = open(sys.argv[1], "rb")
print("ready", flush=True)
sys.stdin.read()
"""

PG_TEMPLATE = (
    '{"username": {{ username|tojson }}, "password": {{ password|tojson }}, '
    '"host": {{ host|tojson }}, "port": {{ port }}, "database": {{ database|tojson }}}\n'
)


def base_config(root: Path, ident: str) -> dict[str, Any]:
    return {
        "node_id": "bench-drain",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "warning"},
        "credentials": [
            {
                "name": "bench",
                "key": KEY,
                "output": {"dir": str(root / "out")},
                "consumers": [
                    {
                        "name": "holder",
                        "match": {"cmdline": f"drain-holder-{ident}"},
                        "loads": "at-start",
                        "reload": "none",
                    }
                ],
                "rotation": {"every": "1d"},
            }
        ],
    }


def write_config(root: Path, data: dict[str, Any]) -> tuple[Path, Config]:
    path = root / "baton.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_config(data)


async def wait_until(fn: Any, *, timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def names_holder(r: CredentialRotator, pid: int) -> bool:
    return any(h.pid == pid for d in r.last_decisions for hs in d.holders.values() for h in hs)


def retired_past(r: CredentialRotator, count: int) -> bool:
    return r.retired_total > count


def only(rotator: Rotator) -> CredentialRotator:
    return next(iter(rotator.rotators.values()))


async def start_rotator(config: Config) -> tuple[Rotator, asyncio.Task[int]]:
    rotator = Rotator(config, install_signals=False, serve_api=False)
    task = asyncio.create_task(rotator.serve(), name="bench-rotator")
    await wait_until(lambda: only(rotator).last_outcome is not None, timeout=30, what="the first rotation")
    return rotator, task


async def stop_rotator(rotator: Rotator, task: asyncio.Task[int]) -> None:
    rotator.should_exit.set()
    await asyncio.gather(task, return_exceptions=True)


async def rotate(rotator: Rotator) -> None:
    """rotate_now, and wait for the rotation to be done (the old version superseded)."""
    r = only(rotator)
    before = r.last_outcome
    rotator.rotate_now.set()
    await wait_until(lambda: r.last_outcome is not before, timeout=30, what="the rotation")
    if r.last_outcome is None or r.last_outcome.result != "rotated":
        raise RuntimeError(f"rotation did not succeed: {r.last_outcome}")


# ---------------------------------------------------------------- local: last holder exits -> retired


async def phase_local(root: Path, samples: int) -> dict[str, Any]:
    ident = secrets.token_hex(4)
    path, config = write_config(root, base_config(root, ident))
    rotator, task = await start_rotator(config)
    agent = start_agent(path, cwd=root, log=root / "agent-local.log")
    r = only(rotator)
    times: list[float] = []
    try:
        await wait_until(lambda: (root / "out" / "value").exists(), timeout=30, what="the agent's first write")
        for i in range(samples):
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(root / "out" / "value"), f"drain-holder-{ident}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert holder.stdout is not None
                await asyncio.to_thread(holder.stdout.readline)
                await rotate(rotator)

                await wait_until(
                    functools.partial(names_holder, r, holder.pid), timeout=60, what="the gate to name the holder"
                )
                retired = r.retired_total
                t0 = time.monotonic()
                holder.kill()
                await asyncio.to_thread(holder.wait)  # reaped, as its supervisor would
                await wait_until(
                    functools.partial(retired_past, r, retired), timeout=60, what="the old version retired"
                )
                times.append(time.monotonic() - t0)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    holder.kill()
                holder.wait()
            progress(NAME, f"local {i + 1}/{samples}: {times[-1]:.3f}s")
    finally:
        stop([agent])
        await stop_rotator(rotator, task)
    return summary(times, TARGET_LOCAL_P99, "seconds, last holder killed -> old version retired in the store")


# ---------------------------------------------------------------- postgres: rotate_now -> retired


async def phase_postgres(root: Path, samples: int) -> dict[str, Any]:
    from tests.fixtures.postgres import PG_BIN, PgCluster

    if not (PG_BIN / "initdb").exists():
        return {"skipped": f"no PostgreSQL 15 in {PG_BIN}"}
    cluster = await asyncio.to_thread(PgCluster.start, prefix="baton-bench-drain-")
    consumers: list[subprocess.Popen[bytes]] = []
    agent = None
    rotator = task = None
    times: list[float] = []
    rotated_in: list[float] = []  # of which the rotation itself (create, apply, test, promote)
    try:
        dsn = cluster.write_admin_dsn(root / "admin.dsn")
        data = base_config(root, secrets.token_hex(4))
        cred = data["credentials"][0]
        cred["output"]["files"] = {"db.json": PG_TEMPLATE}
        cred["consumers"] = [
            {"name": "per-use", "match": {"cmdline": f"pg_consumer\\.py per-use .*{root}/"}, "loads": "per-use"}
        ]
        cred["rotation"] = {
            "every": "1d",
            "provider": {
                "kind": "postgres",
                "admin_dsn_file": str(dsn),
                "strategy": "alternating-users",
                "username": "bench_drain",
                "host": cluster.host,
                "port": cluster.port,
                "database": "postgres",
            },
        }
        path, config = write_config(root, data)
        rotator, task = await start_rotator(config)
        agent = start_agent(path, cwd=root, log=root / "agent-pg.log")
        r = only(rotator)
        await wait_until(lambda: (root / "out" / "db.json").exists(), timeout=30, what="the agent's first write")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for i in range(2):
            argv = [sys.executable, str(CONSUMER), "per-use", "--rate", "20", "--app", f"bench-drain-{i}"]
            argv += ["--file", str(root / "out" / "db.json"), "--stats", str(root / f"stats-{i}.json")]
            consumers.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(1.0)  # the clients are connecting with version 1
        for i in range(samples):
            retired = r.retired_total
            t0 = time.monotonic()
            await rotate(rotator)
            rotated_in.append(time.monotonic() - t0)
            await wait_until(functools.partial(retired_past, r, retired), timeout=60, what="the old version retired")
            times.append(time.monotonic() - t0)
            progress(NAME, f"postgres {i + 1}/{samples}: {times[-1]:.3f}s")
    finally:
        stop(consumers)
        if agent is not None:
            stop([agent])
        if rotator is not None and task is not None:
            await stop_rotator(rotator, task)
        await asyncio.to_thread(cluster.stop)
    out = summary(times, TARGET_PG_P99, "seconds, rotate_now -> old version retired (per-use PostgreSQL clients)")
    out["rotation_p50"] = round(percentile(rotated_in, 50), 4)  # rotate_now -> promoted, part of the above
    out["rotation_p99"] = round(percentile(rotated_in, 99), 4)
    return out


# ---------------------------------------------------------------- idle CPU


async def phase_idle(root: Path, seconds: float, others: int) -> dict[str, Any]:
    ident = secrets.token_hex(4)
    path, config = write_config(root, base_config(root, ident))
    sleepers = [
        subprocess.Popen(["sleep", "86400"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) for _ in range(others)
    ]
    rotator, task = await start_rotator(config)
    agent = start_agent(path, cwd=root, log=root / "agent-idle.log")
    holder = None
    try:
        await wait_until(lambda: (root / "out" / "value").exists(), timeout=30, what="the agent's first write")
        # A consumer holding the current version: scanned, matched, nothing draining.
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(root / "out" / "value"), f"drain-holder-{ident}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        await asyncio.sleep(3.0)  # past start-up (first scans, imports)
        a = sample(agent.pid)
        await asyncio.sleep(seconds)
        b = sample(agent.pid)
    finally:
        others_and_holder = [*sleepers, *([holder] if holder is not None else [])]
        for p in others_and_holder:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in others_and_holder:
            p.wait()
        stop([agent])
        await stop_rotator(rotator, task)
    cpu = 100.0 * (b.cpu_seconds - a.cpu_seconds) / (b.at - a.at)
    return {
        "cpu_percent_of_core": round(cpu, 3),
        "seconds": seconds,
        "other_processes": others,
        "target_percent": TARGET_IDLE_CPU,
        "ok": cpu < TARGET_IDLE_CPU,
    }


def summary(times: list[float], target: float, unit: str) -> dict[str, Any]:
    p99 = percentile(times, 99)
    return {
        "p50": round(percentile(times, 50), 4),
        "p99": round(p99, 4),
        "max": round(max(times), 4),
        "min": round(min(times), 4),
        "n": len(times),
        "target_p99_seconds": target,
        "ok": p99 < target,
        "unit": unit,
        "samples": [round(t, 4) for t in times],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": NAME}
    with tempfile.TemporaryDirectory(prefix="baton-bench-drain-") as tmp:
        base = Path(tmp)
        for phase in args.phases:
            root = base / phase
            root.mkdir()
            progress(NAME, f"phase {phase}")
            if phase == "local":
                out["local"] = await phase_local(root, args.samples)
            elif phase == "postgres":
                out["postgres"] = await phase_postgres(root, args.samples)
            else:
                out["idle"] = await phase_idle(root, args.idle_seconds, args.others)
    out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict))
    out["settings"] = {"tuning": "defaults (heartbeat 30s, scan_interval 5s, debounce 2s, fanotify auto)"}
    out["machine"] = machine()
    return out


def plot(after: dict[str, Any], before: dict[str, Any] | None, path: Path) -> None:
    """Each sample of both latency phases, before and after fast drains, against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("local", "local store: last holder exits -> retired"), ("postgres", "PostgreSQL: rotate -> retired")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (phase, title) in zip(axes, phases, strict=True):
        runs = [("before", before), ("after", after)] if before else [("after", after)]
        data = [(label, run[phase]) for label, run in runs if run and "samples" in run.get(phase, {})]
        for i, (label, res) in enumerate(data):
            ys = res["samples"]
            xs = [i + (j % 7 - 3) * 0.04 for j in range(len(ys))]  # a little spread, no randomness
            ax.scatter(xs, ys, s=14, alpha=0.7, color="#b45309" if label == "before" else "#0a7d32")
            ax.text(i, max(ys) * 1.08 + 0.05, f"p99 {res['p99']:.2f} s", ha="center")
        target = after[phase]["target_p99_seconds"]
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target p99 < {target:g} s")
        ax.set_xticks(range(len(data)), [label for label, _ in data])
        ax.set_xlim(-0.6, len(data) - 0.4)
        ax.set_ylim(0, max(max(r["samples"]) for _, r in data) * 1.25 + 0.2)
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    idle = after.get("idle", {})
    if idle:
        fig.suptitle(
            f"bench/drain.py, default tuning; agent idle CPU {idle['cpu_percent_of_core']:.2f} % of a core "
            f"with {idle['other_processes']} other processes",
            fontsize=10,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--others", type=int, default=2000, help="sleep processes on the node in the idle phase")
    p.add_argument("--phases", nargs="+", default=["local", "postgres", "idle"], choices=["local", "postgres", "idle"])
    p.add_argument("--out", default=NAME, help="result name under bench/results/")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from bench/results/ and exit")
    args = p.parse_args()
    before_path, png = RESULTS / f"{NAME}-before.json", RESULTS / f"{NAME}.png"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    if args.plot_only:
        plot(json.loads((RESULTS / f"{NAME}.json").read_text()), before, png)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    result = asyncio.run(run(args))
    emit(args.out, result)
    if args.out == NAME and {"local", "postgres"} <= set(result):
        plot(result, before, png)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
