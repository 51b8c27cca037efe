"""Benchmark: Baton's fd scan against `fuser` and `lsof -t` on the same processes.

Spawns --procs `cat` processes that each hold --files open regular files (the
parent opens a pool once and passes a different window of it to each child);
a handful of them also hold the 3 credential files. Then times, in the same
run on the same files, daemon.usage.fdscan.scan_fds (the C walk the agent uses
when built, and the pure Python fallback), `fuser <3 files>` and `lsof -t <3
files>` (median of several repeats), checks that all find the same pids, prints
ONE JSON object on stdout and writes bench/results/scan.json.

Every child reads stdin from one pipe whose write end only this process holds,
so the children also exit on EOF if this process dies without cleaning up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.usage.fdscan import NATIVE, scan_fds

RESULTS = Path(__file__).resolve().parent / "results" / "scan.json"
TARGET_BATON_OVER_FUSER = 1.5
TARGET_LSOF_OVER_BATON = 10.0
POOL = 256  # distinct regular files that the children's windows slide over


def log(msg: str) -> None:
    print(f"[bench/scan] {msg}", file=sys.stderr, flush=True)


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Children:
    """The spawned holders; ``close()`` kills and reaps them all, idempotently."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stdin_r, self.stdin_w = os.pipe()
        self.fds: list[int] = []

    def spawn(self, pass_fds: list[int]) -> int:
        proc = subprocess.Popen(
            ["cat"],
            stdin=self.stdin_r,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=pass_fds,
        )
        self.procs.append(proc)
        return proc.pid

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs.clear()
        for fd in (*self.fds, self.stdin_r, self.stdin_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.stdin_r = self.stdin_w = -1


def run_fuser(files: list[str]) -> set[int]:
    # fuser prints the pids on stdout (with access letters such as "r" or "m"
    # appended) and the file names on stderr; exit status 1 means "none".
    out = subprocess.run(["fuser", *files], capture_output=True, check=False).stdout.decode()
    return {int(m) for m in re.findall(r"\d+", out)}


def run_lsof(files: list[str]) -> set[int]:
    out = subprocess.run(["lsof", "-t", "-w", *files], capture_output=True, check=False).stdout.decode()
    return {int(line) for line in out.split()}


def bench(args: argparse.Namespace, children: Children, workdir: Path) -> dict[str, Any]:
    files_per_proc = args.files
    raise_nofile(POOL + 64 + 3)
    pool: list[int] = []
    for i in range(POOL):
        path = workdir / f"pool-{i:03d}"
        path.write_bytes(b"x")
        pool.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    children.fds.extend(pool)
    creds: list[str] = []
    cred_fds: list[int] = []
    for name in ("password", "username", "token"):
        path = workdir / "..v8-91c0" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("not-a-real-secret\n")
        creds.append(str(path))
        cred_fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    children.fds.extend(cred_fds)

    # A handful of holders spread over the pid range: one per credential file,
    # one holding all three, and one more holding the first.
    holders_at = {
        args.procs // 7: [0],
        args.procs // 3: [1],
        args.procs // 2: [2],
        (args.procs * 4) // 5: [0, 1, 2],
        args.procs - 1: [0],
    }
    expected: set[int] = set()
    t0 = time.perf_counter()
    step = max(1, args.procs // 10)
    for i in range(args.procs):
        window = [pool[(i * 7 + k) % POOL] for k in range(files_per_proc)]
        held = holders_at.get(i, [])
        if held:
            window = window[: files_per_proc - len(held)] + [cred_fds[c] for c in held]
        pid = children.spawn(window)
        if held:
            expected.add(pid)
        if (i + 1) % step == 0:
            log(f"spawned {i + 1}/{args.procs} processes")
    spawn_s = time.perf_counter() - t0
    # Only the children may hold the credential files from here on.
    for fd in cred_fds:
        os.close(fd)
        children.fds.remove(fd)
    log(f"spawned {args.procs} x {files_per_proc} fds in {spawn_s:.1f}s; {len(expected)} hold credentials")

    index: dict[tuple[int, int], str] = {}
    for path_s in creds:
        st = os.stat(path_s)
        index[(st.st_dev, st.st_ino)] = path_s

    def baton() -> set[int]:
        return set(scan_fds(index))

    def python_walk(workers: int) -> Callable[[], set[int]]:
        return lambda: set(scan_fds(index, workers=workers, native=False))

    baton()  # warm the dentry cache for everyone alike: each tool then runs warm
    # Interleaved rounds, so a burst of other load on the node hits every tool alike.
    # "baton" is what the agent runs (the C walk when built); the pure Python walk
    # (the fallback without a C compiler) is timed too, on 2 threads and on 1.
    tools: dict[str, Callable[[], set[int]]] = {"baton": baton}
    if NATIVE:
        tools["python_walk"] = python_walk(2)
    tools["python_walk_single_thread"] = python_walk(1)
    tools["fuser"] = lambda: run_fuser(creds)
    tools["lsof"] = lambda: run_lsof(creds)
    runs: dict[str, list[float]] = {name: [] for name in tools}
    pids: dict[str, set[int]] = {}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        names = [n for n in tools if n != "lsof" or r < args.lsof_repeats]
        log(f"round {r + 1}/{args.repeats}: {', '.join(names)}")
        for name in names:
            t0 = time.perf_counter()
            pids[name] = tools[name]()
            runs[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in runs.items()}

    same = all(found == expected for found in pids.values())
    if not same:
        log("pid sets differ: " + " ".join(f"{k}={sorted(v)}" for k, v in {"expected": expected, **pids}.items()))
    nprocs = len([n for n in os.listdir("/proc") if n.isdigit()])
    ratio_bf = med["baton"] / med["fuser"]
    ratio_lb = med["lsof"] / med["baton"]
    return {
        "benchmark": "scan",
        "procs_spawned": args.procs,
        "procs_on_node": nprocs,
        "files_per_proc": files_per_proc,
        "fds_scanned": sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in (p.pid for p in children.procs)),
        "credential_files": len(creds),
        "holders": len(expected),
        "repeats": args.repeats,
        "lsof_repeats": args.lsof_repeats,
        "spawn_s": round(spawn_s, 3),
        "baton_walk": "c" if NATIVE else "python",
        **{f"{name}_s": round(t, 4) for name, t in med.items()},
        **{f"{name}_runs_s": [round(t, 4) for t in ts] for name, ts in runs.items()},
        "ratio_baton_over_fuser": round(ratio_bf, 3),
        "ratio_lsof_over_baton": round(ratio_lb, 2),
        "ratio_lsof_over_python_walk": round(med["lsof"] / med.get("python_walk", med["baton"]), 2),
        "targets": {
            "baton_over_fuser_max": TARGET_BATON_OVER_FUSER,
            "lsof_over_baton_min": TARGET_LSOF_OVER_BATON,
        },
        "meets_targets": ratio_bf <= TARGET_BATON_OVER_FUSER and ratio_lb >= TARGET_LSOF_OVER_BATON,
        "same_pids": same,
        "fuser_version": subprocess.run(["fuser", "-V"], capture_output=True, check=False)
        .stderr.decode()
        .splitlines()[0],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2000, help="processes to spawn (default 2000)")
    parser.add_argument("--files", type=int, default=50, help="open files per process (default 50)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of baton and fuser (median)")
    parser.add_argument("--lsof-repeats", type=int, default=3, help="timed runs of lsof (median)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON result")
    args = parser.parse_args()
    if args.procs < 5 or not 3 <= args.files <= POOL:
        parser.error(f"need --procs >= 5 and 3 <= --files <= {POOL}")
    for tool in ("fuser", "lsof", "cat"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="baton-bench-scan-") as tmp:
            try:
                result = bench(args, children, Path(tmp))
            finally:
                log(f"stopping {len(children.procs)} processes")
                children.close()
    except KeyboardInterrupt:
        log("interrupted; all children stopped")
        return 130
    text = json.dumps(result, indent=None)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0 if result["same_pids"] else 1


if __name__ == "__main__":
    sys.exit(main())
