"""Benchmark: what rendering in the killable worker costs, against rendering in process.

Renders one credential's templates (a password file and a DSN from a JSON
payload) --renders times in process (``daemon.files.render.render_version``) and
through ``daemon.files.renderworker.RenderWorker`` (a child process over a pipe),
and reports per-render p50/p99 of each, the worker's start time and RSS, and
how long a runaway template (10^10 loop steps, no output) takes to be stopped
at a 1 s bound. Target: the worker adds < 5 ms at p99 (propagation's p99
budget is 200 ms).

Prints ONE JSON object; writes bench/results/render.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import emit, machine, mb, percentile, progress, sample
from daemon.errors import PayloadError
from daemon.files.render import render_version
from daemon.files.renderworker import RenderWorker
from daemon.model import Secret

NAME = "render"
TARGET_ADDED_P99_MS = 5.0
FILES = {"password": "{{ password }}", "dsn": "postgresql://{{ username }}:{{ password }}@db:5432/app"}
SPIN = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"


def ms(values: list[float], pct: float) -> float:
    return round(percentile(values, pct) * 1000, 3)


async def run(renders: int) -> dict[str, Any]:
    payload = Secret(json.dumps({"username": "app", "password": secrets.token_urlsafe(24)}))
    in_process = []
    for _ in range(renders):
        t = time.perf_counter()
        render_version(FILES, {}, payload)
        in_process.append(time.perf_counter() - t)

    worker = RenderWorker()
    try:
        t = time.perf_counter()
        await worker.render(files=FILES, env={}, payload=payload, time_limit=10, max_bytes=1 << 20)
        first = time.perf_counter() - t
        through = []
        for _ in range(renders):
            t = time.perf_counter()
            await worker.render(files=FILES, env={}, payload=payload, time_limit=10, max_bytes=1 << 20)
            through.append(time.perf_counter() - t)
        assert worker.pid is not None
        rss = sample(worker.pid).rss_bytes
        t = time.perf_counter()
        try:
            await worker.render(files={"f": SPIN}, env={}, payload=payload, time_limit=1.0, max_bytes=1 << 20)
        except PayloadError as e:
            assert e.reason == "timeout"
        stopped = time.perf_counter() - t
    finally:
        await worker.aclose()
    added = ms(through, 99) - ms(in_process, 99)
    return {
        "bench": NAME,
        "renders": renders,
        "in_process_ms": {"p50": ms(in_process, 50), "p99": ms(in_process, 99)},
        "worker_ms": {"p50": ms(through, 50), "p99": ms(through, 99)},
        "worker_added_p99_ms": round(added, 3),
        "worker_first_render_incl_start_ms": round(first * 1000, 1),
        "worker_rss_mb": mb(rss),
        "runaway_stopped_after_s": round(stopped, 3),
        "machine": machine(),
        "target": {"worker_added_p99_ms": TARGET_ADDED_P99_MS},
        "ok": added < TARGET_ADDED_P99_MS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=2000)
    args = parser.parse_args()
    progress(NAME, f"{args.renders} renders in process and through the worker")
    result = asyncio.run(run(args.renders))
    emit(NAME, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
