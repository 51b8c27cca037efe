"""``baton demo``: the whole loop on one machine, in a temp dir, in under a minute.

An embedded store, an agent and a rotator (in this process), and three real
consumer processes that load the credential three different ways. The rotator
rotates N times; the agent writes each version, reloads each consumer the way
it needs, tracks who holds what, and reports; the rotator retires each old
version only once nothing holds it. Every consumer request checks its
credential against the store's non-retired versions: a retirement that came
too early would show up as a consumer error. Ends with one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from daemon.agent.service import Agent
from daemon.config import Config, parse_config
from daemon.kit.logs import setup
from daemon.model import Secret
from daemon.rotation.service import Rotator
from daemon.stores.local import LocalStore

KEY = "demo/db"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
TIMEOUT = 55.0


def demo_config(root: Path, *, rotations_every: float) -> tuple[Config, list[list[str]]]:
    py = sys.executable
    stable = str(root / "out" / "db" / "password")
    common = ["--file", stable, "--store", str(root / "store.db"), "--key", KEY]

    def consumer_argv(mode: str) -> list[str]:
        return [py, "-m", "daemon.demo.consumer", mode, *common, "--stats", str(root / f"{mode}.json")]

    once_argv = [*consumer_argv("once"), "--pidfile", str(root / "once.pid")]
    config = parse_config(
        {
            "node_id": "demo-node",
            "store": {"kind": "local", "path": str(root / "store.db")},
            "api": {"listen": "127.0.0.1:0"},
            "log": {"format": "json", "level": "info"},
            "report": {"heartbeat": 0.5},
            "agent": {"debounce": 0.2, "scan_interval": 0.25, "fanotify": "off"},
            "credentials": [
                {
                    "name": "db",
                    "key": KEY,
                    "output": {"dir": str(root / "out" / "db"), "files": {"password": "{{ value }}"}},
                    "consumers": [
                        {
                            "name": "per-use",
                            "match": {"cmdline": f"demo[.]consumer per-use .*{root}"},
                            "loads": "per-use",
                        },
                        {
                            "name": "hold",
                            "match": {"cmdline": f"demo[.]consumer hold .*{root}"},
                            "loads": "on-reload",
                            "reload": {"signal": "SIGHUP"},
                            "health": {"alive_for": 0.1},
                            "min_restart_interval": 0.5,
                        },
                        {
                            "name": "once",
                            "match": {"pidfile": str(root / "once.pid")},
                            "loads": "at-start",
                            "reload": {"restart": {"stop_signal": "SIGTERM", "timeout": 5, "command": once_argv}},
                            "health": {"alive_for": 0.2},
                            "min_restart_interval": 0.5,
                        },
                    ],
                    "rotation": {"every": rotations_every, "generator": {"kind": "password", "length": 32}},
                }
            ],
        }
    )
    return config, [consumer_argv("per-use"), consumer_argv("hold"), once_argv]


def _versions(db: Path) -> list[tuple[int, float, float | None]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT id, created, retired FROM versions WHERE key=? ORDER BY id", (KEY,))
        return [(int(r[0]), float(r[1]), r[2]) for r in rows.fetchall()]


def _stats(root: Path) -> dict[str, dict[str, int]]:
    out = {}
    for mode in ("per-use", "hold", "once"):
        try:
            out[mode] = json.loads((root / f"{mode}.json").read_text())
        except (OSError, ValueError):
            out[mode] = {"requests": 0, "errors": 0}
    return out


class Progress:
    def __init__(self, stream: TextIO, rotations: int) -> None:
        self.stream = stream
        self.rotations = rotations
        self.last = ""

    def show(self, agent: Agent, versions: list[tuple[int, float, float | None]], errors: int) -> None:
        cred = agent.status()["credentials"].get("db", {})
        parts = []
        for v, info in cred.get("versions", {}).items():
            holders = ",".join(sorted({h["consumer"] or "unmanaged" for h in info["holders"]})) or "-"
            parts.append(f"v{v} {info['state']} [{holders}]")
        retired = sum(1 for _, _, r in versions if r is not None)
        rotated = max(0, len(versions) - 1)
        line = f"rotations {rotated}/{self.rotations}  retired {retired}  consumer errors {errors}  | " + "  ".join(
            parts
        )
        if line != self.last:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=self.stream, flush=True)
            self.last = line


async def demo(rotations: int, *, progress: TextIO, root: Path) -> dict[str, Any]:
    config, argvs = demo_config(root, rotations_every=2.0)
    store = LocalStore(root / "store.db", watch_files=False)
    store.put_sync(KEY, Secret(secrets.token_urlsafe(24)))
    store.close()

    agent = Agent(config, install_signals=False)
    rotator = Rotator(config, install_signals=False, serve_api=False)
    agent_task = asyncio.create_task(agent.serve(), name="demo-agent")
    await asyncio.wait_for(agent.ready.wait(), 10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_PACKAGE_ROOT, *sys.path])}
    procs = [
        await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        for argv in argvs
    ]
    print(f"started consumers: per-use, hold, once (pids {[p.pid for p in procs]}) in {root}", file=progress)
    rotator_task = asyncio.create_task(rotator.serve(), name="demo-rotator")
    show = Progress(progress, rotations)
    deadline = time.monotonic() + TIMEOUT
    done = False
    try:
        while time.monotonic() < deadline:
            versions = await asyncio.to_thread(_versions, root / "store.db")
            errors = sum(s.get("errors", 0) for s in _stats(root).values())
            show.show(agent, versions, errors)
            retired = sum(1 for _, _, r in versions if r is not None)
            if retired >= rotations:
                done = True
                break
            if len(versions) - 1 >= rotations:
                # Enough rotations: stop the rotator from starting more, let retirement finish.
                for r in rotator.rotators.values():
                    r.reschedule(3600.0)
            await asyncio.sleep(0.25)
    finally:
        rotator.should_exit.set()
        agent.should_exit.set()
        await asyncio.gather(rotator_task, agent_task, return_exceptions=True)
        await _stop_consumers(procs, root / "once.pid")
    versions = await asyncio.to_thread(_versions, root / "store.db")
    stats = _stats(root)
    drains = []
    for (_vid, _created, retired_at), nxt in itertools.pairwise(versions):
        if retired_at is not None:
            drains.append(retired_at - nxt[1])
    retired_n = sum(1 for v in versions if v[2] is not None)
    return {
        "rotations": len(versions) - 1,
        "consumer_errors": sum(s.get("errors", 0) for s in stats.values()),
        "retired": retired_n,
        "max_drain_seconds": round(max(drains), 3) if drains else None,
        "requests": sum(s.get("requests", 0) for s in stats.values()),
        "restarts_of_once": max(0, stats["once"].get("starts", 1) - 1),
        "reopens_of_hold": stats["hold"].get("reopens", 0),
        "completed": done,
    }


async def _stop_consumers(procs: list[asyncio.subprocess.Process], pidfile: Path) -> None:
    pids = {p.pid for p in procs}
    with contextlib.suppress(OSError, ValueError):
        pids.add(int((await asyncio.to_thread(pidfile.read_text)).split()[0]))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.wait(), 5)
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)


def run_demo(*, rotations: int = 3, as_json: bool = False, keep: bool = False) -> int:
    progress = sys.stderr if as_json else sys.stdout
    root = Path(tempfile.mkdtemp(prefix="baton-demo-"))
    log_path = root / "baton.log"
    with open(log_path, "w") as log_file:
        setup("json", "info", stream=log_file)
        try:
            result = asyncio.run(demo(rotations, progress=progress, root=root))
        finally:
            logging.getLogger().handlers.clear()
    print(json.dumps(result))
    ok = result["consumer_errors"] == 0 and result["retired"] >= rotations and result["rotations"] >= rotations
    if keep or not ok:
        print(f"demo files kept in {root} (events in {log_path})", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1
