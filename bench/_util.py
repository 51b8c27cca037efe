"""Small helpers shared by bench/propagation.py and bench/footprint.py (not by the other benches).

Owns: progress lines on stderr, percentiles, the one-JSON-object result
convention (stdout + bench/results/<name>.json), per-process CPU and RSS
readings from /proc, and starting/stopping ``baton agent`` as a subprocess.
Never prints a secret value: the benches generate throwaway values and only
ever show digests or counts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BATON = str(Path(sys.executable).with_name("baton"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
T = TypeVar("T")


def progress(bench: str, msg: str) -> None:
    print(f"[bench/{bench}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def emit(name: str, result: dict[str, Any]) -> None:
    """Print ONE JSON object on stdout and write bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(json.dumps(result), flush=True)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": sys.version.split()[0]}


def wait_for(fn: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- /proc readings


@dataclass(frozen=True)
class ProcSample:
    at: float  # monotonic
    cpu_seconds: float  # utime + stime, the process itself (threads included)
    rss_bytes: int


def sample(pid: int) -> ProcSample:
    """CPU time and RSS of ``pid`` from /proc (raises OSError when it is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, rss 24.
    utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    return ProcSample(time.monotonic(), (utime + stime) / CLK_TCK, rss_pages * PAGE)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of ``pid``: tid -> (name, utime+stime); threads gone meanwhile are skipped."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            head, _, rest = (task / "stat").read_text().rpartition(")")
            fields = rest.split()
            name = head.split("(", 1)[1]
            out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def vm_hwm(pid: int) -> int | None:
    """The kernel's own peak RSS of ``pid`` (VmHWM), in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def mb(n: float) -> float:
    return round(n / (1024 * 1024), 1)


# ---------------------------------------------------------------- baton agent subprocess


def start_agent(config: Path, *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [BATON, "agent", "--config", str(config)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def stop(procs: Sequence[subprocess.Popen[bytes]], *, grace: float = 10.0, groups: bool = False) -> None:
    """SIGTERM every process, SIGKILL what is still there after ``grace`` seconds; reap all.

    ``groups``: each process leads its own process group (start_new_session) and
    the whole group is signalled, so that its children (a shell's ``sleep``) go too.
    """

    def send(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if groups:
                os.killpg(p.pid, sig)
            elif p.poll() is None:
                p.send_signal(sig)

    for p in procs:
        send(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if groups:
            send(p, signal.SIGKILL)  # anything of the group still left
