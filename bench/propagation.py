"""Benchmark: store put -> every consumer reloaded, on the local store.

A ``baton agent`` subprocess follows one credential in an embedded (SQLite)
store and reloads --consumers real consumer processes by SIGHUP. Each consumer
holds the credential file open (like nginx), re-opens the stable path on
SIGHUP, and acknowledges by writing the SHA-256 of the content it now holds to
one shared pipe. For each of --rotations rotations this process takes a
monotonic timestamp, puts a new value with ``LocalStore.put_sync`` (a separate
connection, as ``baton store put`` from another process would), and stops the
clock when the LAST consumer has acknowledged the new digest. So a sample
covers: the commit, the agent noticing it (inotify on the database file), read,
render, atomic write with fsync, the reloader finding the processes, the
signal, and the consumer re-reading.

Agent settings that matter, written into the result: debounce 0 (no batching
wait), consumers' min_restart_interval 0 (the default 30 s would rate-limit
back-to-back rotations), health alive_for 0 (the health gate runs after the
signal, so it only matters when the next rotation lands inside it). Rotations
are spaced --gap seconds apart. Prints ONE JSON object; writes
bench/results/propagation.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import emit, machine, percentile, progress, start_agent, stop, wait_for
from daemon.model import Secret
from daemon.stores.local import LocalStore

NAME = "propagation"
KEY = "bench/propagation"
TARGET_P99 = 0.200

# A consumer that holds the file open and re-opens it on SIGHUP. It waits on
# select() over the signal wakeup fd and stdin (EOF: the bench died, exit too),
# so a signal is handled at once, not at the next tick of a sleep loop.
CONSUMER = r"""
import hashlib, os, select, signal, sys
path, ident, ack = sys.argv[1], sys.argv[2], int(sys.argv[3])
r, w = os.pipe()
os.set_blocking(w, False)
signal.set_wakeup_fd(w)
signal.signal(signal.SIGHUP, lambda *_: None)
signal.signal(signal.SIGTERM, lambda *_: None)
held = open(path, "rb")
def acknowledge():
    held.seek(0)
    os.write(ack, f"{ident} {hashlib.sha256(held.read()).hexdigest()}\n".encode())
acknowledge()
while True:
    ready, _, _ = select.select([r, 0], [], [])
    if 0 in ready and not os.read(0, 64):
        break
    if r in ready:
        sigs = os.read(r, 64)
        if signal.SIGTERM in sigs:
            break
        if signal.SIGHUP in sigs:
            held.close()
            held = open(path, "rb")
            acknowledge()
"""


def config(root: Path, *, consumers: list[str], alive_for: float) -> dict[str, Any]:
    return {
        "node_id": "bench-propagation",
        "store": {"kind": "local", "path": str(root / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "warning"},
        "agent": {"debounce": 0, "fanotify": "off"},
        "credentials": [
            {
                "name": "bench",
                "key": KEY,
                "output": {"dir": str(root / "out"), "files": {"value": "{{ value }}"}},
                "consumers": [
                    {
                        "name": ident,
                        # The ident is unique and ends in a random token: no consumer matches another's.
                        "match": {"cmdline": f"consumer\\.py \\S+ {ident}( |$)"},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                        "health": {"alive_for": alive_for},
                        "min_restart_interval": 0,
                    }
                    for ident in consumers
                ],
            }
        ],
    }


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Acks:
    """Reads the consumers' acknowledgements from the pipe in a thread, timestamped on arrival."""

    def __init__(self, fd: int) -> None:
        self.q: queue.Queue[tuple[float, str, str]] = queue.Queue()
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._thread = threading.Thread(target=self._read, name="acks", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while chunk := self._file.read(65536):
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ident, _, dig = line.decode().partition(" ")
                self.q.put((now, ident, dig))

    def wait_all(self, idents: set[str], want: str, *, timeout: float) -> float:
        """Monotonic time of the last of ``idents`` to acknowledge digest ``want``."""
        missing = set(idents)
        last = 0.0
        deadline = time.monotonic() + timeout
        while missing:
            try:
                at, ident, dig = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{len(missing)} consumer(s) never acknowledged: {sorted(missing)}") from None
            if dig == want and ident in missing:
                missing.discard(ident)
                last = max(last, at)
        return last

    def close(self) -> None:
        self._file.close()


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    token = secrets.token_hex(4)
    idents = [f"c{i}x{token}" for i in range(args.consumers)]
    cfg_path = root / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, consumers=idents, alive_for=args.alive_for)))
    (root / "consumer.py").write_text(CONSUMER)

    store = LocalStore(root / "store.db", watch_files=False)
    value = secrets.token_urlsafe(24)
    store.put_sync(KEY, Secret(value))
    agent = start_agent(cfg_path, cwd=root, log=root / "agent.log")
    procs: list[subprocess.Popen[bytes]] = []
    ack_r, ack_w = os.pipe()
    acks = Acks(ack_r)
    try:
        target = root / "out" / "value"
        wait_for(lambda: target.exists() or agent.poll() is not None, timeout=30, what="the first version written")
        if agent.poll() is not None:
            raise RuntimeError(
                f"baton agent exited with {agent.returncode}: {(root / 'agent.log').read_text()[-2000:]}"
            )
        for ident in idents:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(root / "consumer.py"), str(target), ident, str(ack_w)],
                    pass_fds=(ack_w,),
                    stdin=subprocess.PIPE,  # EOF when this process dies: the consumers exit too
                    start_new_session=True,
                )
            )
        acks.wait_all(set(idents), digest(value), timeout=30)
        progress(NAME, f"agent pid {agent.pid}, {len(idents)} consumers acknowledged the first version")
        time.sleep(args.gap)

        samples: list[float] = []
        puts: list[float] = []
        for i in range(args.rotations):
            value = secrets.token_urlsafe(24)
            want = digest(value)
            t0 = time.monotonic()
            store.put_sync(KEY, Secret(value))
            puts.append(time.monotonic() - t0)
            last = acks.wait_all(set(idents), want, timeout=30)
            samples.append(last - t0)
            if agent.poll() is not None:
                raise RuntimeError(f"baton agent exited with {agent.returncode}")
            if (i + 1) % 10 == 0:
                progress(NAME, f"{i + 1}/{args.rotations}: last {samples[-1] * 1000:.1f} ms")
            time.sleep(args.gap)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        stop([*procs, agent])
        os.close(ack_w)
        acks.close()
        store.close()

    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    return {
        "bench": NAME,
        "p50": round(p50, 4),
        "p99": round(p99, 4),
        "max": round(max(samples), 4),
        "min": round(min(samples), 4),
        "mean": round(statistics.fmean(samples), 4),
        "n": len(samples),
        "target": {"p99_seconds": TARGET_P99},
        "ok": p99 < TARGET_P99,
        "unit": "seconds, put start -> last consumer acknowledged the new content",
        "put_p50": round(percentile(puts, 50), 4),
        "settings": {
            "store": "local (SQLite, cross-connection put, agent notices via inotify)",
            "agent": "baton agent subprocess",
            "consumers": len(idents),
            "reload": "signal SIGHUP, re-open on SIGHUP",
            "debounce": 0,
            "min_restart_interval": 0,
            "health_alive_for": args.alive_for,
            "gap_seconds": args.gap,
        },
        "machine": machine(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or NAME).splitlines()[0])
    p.add_argument("--rotations", type=int, default=100)
    p.add_argument("--consumers", type=int, default=5)
    p.add_argument("--gap", type=float, default=0.2, help="seconds between rotations")
    p.add_argument("--alive-for", type=float, default=0.0, help="consumers' health.alive_for")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="baton-bench-prop-"))
    try:
        result = run(args, root)
    finally:
        if args.keep:
            progress(NAME, f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(NAME, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
