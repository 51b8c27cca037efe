"""Benchmark: an idle agent's memory and CPU with 100 credentials and 20 consumer processes.

Puts --credentials values in an embedded (SQLite) store, starts 20 cheap
consumer processes (``sh`` loops around ``sleep``, each holding one
credential file open on fd 3 and matched by a unique token in its command
line; each is declared under every 20th credential), then ``baton agent`` as a
SUBPROCESS so that its RSS is its own. Once /readyz answers, the agent is left
idle for --seconds (60) and sampled every --every seconds from /proc: RSS (max
and final) and CPU (utime+stime over the idle window, as % of one core).
Targets: RSS < 60 MB, CPU < 1 % of a core.

--profile runs the same agent under cProfile (one profile per thread, timed by
that thread's CPU clock, merged at exit) and adds the top functions by CPU to
the result, to show WHERE the idle cost goes. The profiled run's own numbers
are inflated by the profiler and are not the measurement.

Prints ONE JSON object; writes bench/results/footprint.json (or
footprint-profile.json with --profile); progress on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import ROOT, emit, machine, mb, progress, sample, start_agent, stop, thread_cpu, vm_hwm, wait_for
from daemon.model import Secret
from daemon.stores.local import LocalStore

NAME = "footprint"
TARGET_RSS_MB = 60.0
TARGET_CPU_PERCENT = 1.0

# Runs ``baton agent`` with one cProfile.Profile per thread (timer: that
# thread's CPU time), merged into one stats file when the agent exits.
PROFILED_AGENT = r"""
import cProfile, signal, sys, threading, time
out = sys.argv.pop(1)
profiles = []
def start_thread_profile(*_):
    p = cProfile.Profile(time.thread_time)
    profiles.append(p)
    p.enable()  # replaces this hook for the thread
threading.setprofile(start_thread_profile)
main = cProfile.Profile(time.thread_time)
profiles.append(main)
def reset(*_):
    # SIGUSR1 from the bench once the agent is ready: keep only the idle window.
    for p in profiles:
        p.clear()
signal.signal(signal.SIGUSR1, reset)
from daemon.cli import main as baton_main
main.enable()
try:
    baton_main(sys.argv[1:])
except SystemExit:
    pass
finally:
    main.disable()
    import pstats
    stats = None
    for p in profiles:
        try:
            p.create_stats()
        except Exception:
            continue
        if not p.stats:
            continue
        stats = pstats.Stats(p) if stats is None else (stats.add(p) or stats)
    if stats is not None:
        stats.dump_stats(out)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(root: Path, *, port: int, credentials: int, tokens: list[str]) -> dict[str, Any]:
    consumers = [
        {
            "name": f"sleeper-{j}",
            "match": {"cmdline": f"fp-sleeper-{tok}( |$)"},
            "loads": "on-reload",
            "reload": {"signal": "SIGHUP"},
        }
        for j, tok in enumerate(tokens)
    ]
    return {
        "node_id": "bench-footprint",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": f"127.0.0.1:{port}"},
        "log": {"format": "json", "level": "info"},
        "agent": {"fanotify": "off"},  # not allowed unprivileged anyway; explicit so runs compare
        "credentials": [
            {
                "name": f"cred-{i:03d}",
                "key": f"bench/footprint/{i:03d}",
                "output": {"dir": str(root / "out" / f"cred-{i:03d}"), "files": {"value": "{{ value }}"}},
                "consumers": [consumers[i % len(consumers)]],
            }
            for i in range(credentials)
        ],
    }


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def top_functions(path: Path, n: int = 25) -> list[dict[str, Any]]:
    stats = pstats.Stats(str(path), stream=io.StringIO())
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        where = file.replace(str(ROOT) + "/", "")
        for marker in ("site-packages/", "lib/python3.11/"):
            if marker in where:
                where = where.split(marker, 1)[1]
        rows.append({"function": f"{where}:{line}({func})", "calls": ncalls, "self_s": tottime, "cum_s": cumtime})
    rows.sort(key=lambda r: r["self_s"], reverse=True)
    return [{**r, "self_s": round(r["self_s"], 4), "cum_s": round(r["cum_s"], 4)} for r in rows[:n]]


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    tokens = [f"{j}x{secrets.token_hex(4)}" for j in range(args.consumers)]
    port = free_port()
    cfg = config(root, port=port, credentials=args.credentials, tokens=tokens)
    cfg_path = root / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    store = LocalStore(root / "store.db", watch_files=False)
    for cred in cfg["credentials"]:
        store.put_sync(cred["key"], Secret(secrets.token_urlsafe(24)))
    store.close()

    # Consumers first: the files they open do not exist yet, so each waits for its file.
    sleepers: list[subprocess.Popen[bytes]] = []
    agent: subprocess.Popen[bytes] | None = None
    prof_path = root / "agent.prof"
    try:
        for j, tok in enumerate(tokens):
            held = root / "out" / f"cred-{j:03d}" / "value"
            script = 'while [ ! -e "$1" ]; do sleep 0.05; done; exec 3<"$1"; while :; do sleep 3600 3<&-; done'
            sleepers.append(
                subprocess.Popen(
                    ["sh", "-c", script, f"fp-sleeper-{tok}", str(held)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        started = time.monotonic()
        if args.profile:
            boot = root / "profiled_agent.py"
            boot.write_text(PROFILED_AGENT)
            with (root / "agent.log").open("wb") as out:
                agent = subprocess.Popen(
                    [sys.executable, str(boot), str(prof_path), "agent", "--config", str(cfg_path)],
                    cwd=root,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                )
        else:
            agent = start_agent(cfg_path, cwd=root, log=root / "agent.log")
        proc = agent
        wait_for(lambda: ready(port) or proc.poll() is not None, timeout=120, what="/readyz", interval=0.05)
        if agent.poll() is not None:
            raise RuntimeError(
                f"baton agent exited with {agent.returncode}: {(root / 'agent.log').read_text()[-2000:]}"
            )
        startup = time.monotonic() - started
        at_ready = sample(agent.pid)
        threads_at_ready = thread_cpu(agent.pid)
        if args.profile:
            agent.send_signal(signal.SIGUSR1)  # the profile keeps the idle window only
        progress(
            NAME,
            f"agent pid {agent.pid} ready in {startup:.2f}s, rss {mb(at_ready.rss_bytes)} MB; idle {args.seconds}s",
        )

        samples = [at_ready]
        end = at_ready.at + args.seconds
        while (now := time.monotonic()) < end:
            time.sleep(min(args.every, end - now))
            samples.append(sample(agent.pid))
            if agent.poll() is not None:
                raise RuntimeError(f"baton agent exited with {agent.returncode}")
            if len(samples) % 10 == 0:
                s = samples[-1]
                cpu = 100 * (s.cpu_seconds - at_ready.cpu_seconds) / (s.at - at_ready.at)
                progress(NAME, f"t+{s.at - at_ready.at:.0f}s rss {mb(s.rss_bytes)} MB cpu {cpu:.2f}%")
        final = samples[-1]
        threads_at_end = thread_cpu(agent.pid)
        hwm = vm_hwm(agent.pid)
        threads = len(list(Path(f"/proc/{agent.pid}/task").iterdir()))
        log_lines = len((root / "agent.log").read_text(errors="replace").splitlines())
        holders_ok = _holders_seen(port)
    finally:
        if agent is not None:
            stop([agent])
        stop(sleepers, groups=True)

    window = final.at - at_ready.at
    cpu_percent = 100 * (final.cpu_seconds - at_ready.cpu_seconds) / window
    rss_max = max(s.rss_bytes for s in samples)
    by_thread: dict[str, float] = {}
    for tid, (tname, cpu) in threads_at_end.items():
        label = "main (event loop)" if tid == proc.pid else f"{tname} (other threads)"
        before = threads_at_ready.get(tid, (tname, 0.0))[1]
        by_thread[label] = by_thread.get(label, 0.0) + cpu - before
    result: dict[str, Any] = {
        "bench": NAME,
        "rss_max_mb": mb(rss_max),
        "rss_final_mb": mb(final.rss_bytes),
        "rss_peak_since_start_mb": mb(hwm) if hwm is not None else None,
        "cpu_percent_of_one_core": round(cpu_percent, 3),
        "idle_seconds": round(window, 1),
        "startup_seconds": round(startup, 2),
        "startup_cpu_seconds": round(at_ready.cpu_seconds, 2),
        "threads": threads,
        "cpu_percent_by_thread": {k: round(100 * v / window, 3) for k, v in sorted(by_thread.items())},
        "rss_of_imports_only_mb": imports_rss(),
        "log_lines": log_lines,
        "credentials": args.credentials,
        "consumer_processes": args.consumers,
        "holders_seen_in_status": holders_ok,
        "target": {"rss_mb": TARGET_RSS_MB, "cpu_percent": TARGET_CPU_PERCENT},
        "ok": mb(rss_max) < TARGET_RSS_MB and cpu_percent < TARGET_CPU_PERCENT,
        "settings": {"scan_interval": 5.0, "heartbeat": 30.0, "fanotify": "off", "profiled": args.profile},
        "machine": machine(),
    }
    if args.profile:
        wait_for(prof_path.exists, timeout=10, what="the profile")
        result["ok"] = None  # a profiled run measures the profiler too
        result["profile_top_by_self_cpu"] = top_functions(prof_path)
    return result


def imports_rss() -> float | None:
    """RSS of a Python that only imports what the agent imports, then exits: the floor of the agent's RSS."""
    code = (
        "import daemon.cli, daemon.agent.service, daemon.stores.local, daemon.usage.scan, sqlite3;"
        "import daemon.reload.reloader;"
        "print(open('/proc/self/status').read())"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True, cwd=ROOT)
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.stdout.decode().splitlines():
        if line.startswith("VmRSS:"):
            return mb(int(line.split()[1]) * 1024)
    return None


def _holders_seen(port: int) -> int:
    """How many consumer processes the agent attributes to a credential (proves the scan ran)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as r:
            status = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return -1
    pids = set()
    for cred in status.get("credentials", {}).values():
        for info in cred.get("versions", {}).values():
            pids.update(h["pid"] for h in info.get("holders", []))
    return len(pids)


# ---------------------------------------------------------------- --breakdown: where the idle cost goes

# Each variant switches periodic work off, so the differences attribute the idle CPU.
VARIANTS = {
    "as configured": {"fallback": None, "scan": None, "file_watch": True},
    "no store fallback recheck": {"fallback": 3600.0, "scan": None, "file_watch": True},
    "no usage scan": {"fallback": None, "scan": 3600.0, "file_watch": True},
    "no recheck, no scan": {"fallback": 3600.0, "scan": 3600.0, "file_watch": True},
    "no recheck, no scan, no file watch": {"fallback": 3600.0, "scan": 3600.0, "file_watch": False},
}


async def _variant(spec: dict[str, Any], *, seconds: float, credentials: int, consumers: int) -> dict[str, Any]:
    """Run one in-process agent idle for ``seconds`` with parts of its periodic work off; CPU and call counts."""
    import asyncio
    import collections

    import daemon.stores.local as local
    from daemon.agent import tracker
    from daemon.agent.service import Agent
    from daemon.config import parse_config
    from daemon.files import writer

    calls: collections.Counter[str] = collections.Counter()

    def count(cls: Any, name: str) -> None:
        fn = getattr(cls, name)

        def counted(*a: Any, **k: Any) -> Any:
            calls[f"{cls.__name__}.{name}"] += 1
            return fn(*a, **k)

        setattr(cls, name, counted)

    for name in ("_bump", "_current_id", "merge_metadata_sync", "versions_sync"):
        count(local.LocalStore, name)
    count(writer.Writer, "versions")
    count(tracker, "match_all")
    if spec["fallback"] is not None:
        local._FALLBACK_RECHECK = spec["fallback"]  # type: ignore[attr-defined]
    if not spec["file_watch"]:
        original = local.LocalStore.__init__
        local.LocalStore.__init__ = lambda self, path, watch_files=True: original(self, path, watch_files=False)  # type: ignore[method-assign]

    root = Path(tempfile.mkdtemp(prefix="baton-bench-fpv-"))
    try:
        cfg = config(root, port=0, credentials=credentials, tokens=[f"{j}xv" for j in range(consumers)])
        cfg["log"]["level"] = "warning"
        if spec["scan"] is not None:
            cfg["agent"]["scan_interval"] = spec["scan"]
        parsed = parse_config(cfg)
        store = LocalStore(root / "store.db", watch_files=False)
        for cred in parsed.credentials:
            store.put_sync(cred.key, Secret(secrets.token_urlsafe(24)))
        store.close()
        agent = Agent(parsed, install_signals=False)
        task = asyncio.create_task(agent.serve())
        await asyncio.wait_for(agent.ready.wait(), 60)
        await asyncio.sleep(2)  # let the first scan and report round pass
        calls.clear()
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
        agent.should_exit.set()
        await task
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"cpu_percent": round(cpu, 3), "calls_in_window": dict(sorted(calls.items()))}


IMPORT_GROUPS = [
    ("python itself", ""),
    ("pydantic + daemon.config models", "import daemon.config"),
    ("jinja2, psutil, sqlite3, yaml", "import jinja2.sandbox, psutil, sqlite3, yaml"),
    ("prometheus_client", "import prometheus_client"),
    ("aiohttp (api server, http health check)", "import aiohttp.web"),
    ("the rest of daemon (app, drain, reload, ...)", "import daemon.cli, daemon.agent.service, daemon.stores.local"),
]


def import_breakdown() -> dict[str, float]:
    """RSS added by each group of imports, in the order the agent needs them (one fresh interpreter)."""
    lines = ["def rss():", "    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])", "out = []"]
    for _label, stmt in IMPORT_GROUPS:
        lines += [stmt or "pass", "out.append(rss())"]
    lines.append("print(out)")
    res = subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], capture_output=True, timeout=60, check=True, cwd=ROOT
    )
    sizes = json.loads(res.stdout)
    out, prev = {}, 0
    for (label, _), kb in zip(IMPORT_GROUPS, sizes, strict=True):
        out[label] = mb((kb - prev) * 1024)
        prev = kb
    return out


def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    variants = {}
    for label in VARIANTS:
        progress(NAME, f"variant {label!r}: {args.seconds}s idle, in-process")
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                label,
                "--seconds",
                str(args.seconds),
                "--credentials",
                str(args.credentials),
                "--consumers",
                str(args.consumers),
            ],
            capture_output=True,
            timeout=args.seconds + 180,
            check=True,
            cwd=ROOT,
        )
        variants[label] = json.loads(res.stdout)
    return {
        "bench": NAME + "-breakdown",
        "idle_seconds_per_variant": args.seconds,
        "credentials": args.credentials,
        "consumer_processes": args.consumers,
        "note": "in-process agents (no consumer processes); the differences between variants attribute the idle CPU",
        "variants": variants,
        "rss_added_by_imports_mb": import_breakdown(),
        "machine": machine(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="idle window after ready")
    p.add_argument("--every", type=float, default=1.0, help="sampling interval")
    p.add_argument("--credentials", type=int, default=100)
    p.add_argument("--consumers", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="run the agent under cProfile and report the top functions")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--breakdown", action="store_true", help="attribute idle CPU and import RSS (in-process variants)")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant is not None:
        import asyncio

        spec = VARIANTS[args.variant]
        res = asyncio.run(_variant(spec, seconds=args.seconds, credentials=args.credentials, consumers=args.consumers))
        print(json.dumps(res))
        return 0
    if args.breakdown:
        emit(NAME + "-breakdown", breakdown(args))
        return 0
    root = Path(tempfile.mkdtemp(prefix="baton-bench-fp-"))
    try:
        result = run(args, root)
    finally:
        if args.keep:
            progress(NAME, f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(NAME + ("-profile" if args.profile else ""), result)
    return 0 if result["ok"] is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
