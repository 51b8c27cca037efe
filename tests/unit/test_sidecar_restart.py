"""container_restart with real processes in a real PID namespace (``unshare --pid --fork --mount-proc``).

The namespace holds an "init" (pid 1, a supervisor loop standing in for the
kubelet restarting the container) and an "app" whose main process has a worker
child. The consumer match finds the worker; the action must stop the app's
main process, and the supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from daemon.config import MatchConfig
from daemon.errors import ReloadError
from daemon.usage.consumers import find_processes
from sidecar.restart import ContainerRestart, main_process

INIT = r"""
import os, signal, sys, time
marker, mode = sys.argv[1], sys.argv[2]
APP = '''
import os, signal, sys, time
marker, mode = sys.argv[1], sys.argv[2]
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
# The app's pid comes in argv: read with getppid() at start, a worker that starts after
# the app already died would see init as its parent and never notice.
WORKER = "import os, sys, time\\nparent = int(sys.argv[2])\\nwhile os.getppid() == parent:\\n    time.sleep(0.05)\\n"
os.posix_spawn(sys.executable, [sys.executable, "-c", WORKER, marker + "-worker", str(os.getpid())], os.environ)
while True:
    time.sleep(1)
'''
def spawn():
    return os.posix_spawn(sys.executable, [sys.executable, "-c", APP, marker + "-app", mode], os.environ)
app = spawn()
while True:
    pid, _ = os.waitpid(-1, 0)  # pid 1 reaps every orphan, like a real init
    if pid == app:
        app = spawn()
"""


def _unshare_works() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --pid (a new PID namespace)")


@dataclass
class Pod:
    marker: str
    init_pid: int

    def pids(self, suffix: str) -> list[int]:
        return find_processes(MatchConfig(cmdline=re.escape(self.marker + suffix) + r"(\s|$)"))


async def until(predicate: Callable[[], list[int]], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def stop_tree(proc: asyncio.subprocess.Process) -> None:
    """Kill unshare and everything under it (killing a namespace's init alone would do; this is belt and braces)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        await asyncio.to_thread(psutil.wait_procs, tree, 5)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def start_pod(tmp_path: Path, mode: str) -> tuple[asyncio.subprocess.Process, Pod]:
    script = tmp_path / "init.py"
    script.write_text(INIT)
    marker = f"baton-test-{uuid.uuid4().hex[:10]}"
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), marker, mode
    )
    try:
        init = await until(lambda: [c.pid for c in psutil.Process(proc.pid).children()])
        pod = Pod(marker, init[0])
        await until(lambda: pod.pids("-app-worker"))
    except BaseException:
        await stop_tree(proc)
        raise
    return proc, pod


MakePod = Callable[[str], Awaitable[Pod]]


@pytest.fixture
async def make_pod(tmp_path: Path) -> AsyncIterator[MakePod]:
    started: list[tuple[asyncio.subprocess.Process, Pod]] = []

    async def make(mode: str) -> Pod:
        proc, pod = await start_pod(tmp_path, mode)
        started.append((proc, pod))
        return pod

    yield make
    for proc, _pod in started:
        await stop_tree(proc)


async def test_the_action_stops_the_apps_main_process_and_the_supervisor_starts_a_new_one(make_pod: MakePod) -> None:
    pod = await make_pod("polite")
    (worker,) = pod.pids("-app-worker")
    (app_before,) = pod.pids("-app")
    assert main_process(worker) == app_before  # the worker is matched, its container's main process is stopped
    t0 = time.monotonic()
    await ContainerRestart(timeout=5).reload(worker)
    assert time.monotonic() - t0 < 4, "SIGTERM should have been enough"
    app_after = await until(lambda: [p for p in pod.pids("-app") if p != app_before])
    assert app_after[0] != app_before
    assert not psutil.pid_exists(app_before) or psutil.Process(app_before).status() == psutil.STATUS_ZOMBIE
    assert psutil.pid_exists(pod.init_pid), "the namespace's init is never touched"


async def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(make_pod: MakePod) -> None:
    pod = await make_pod("stubborn")
    (app_before,) = pod.pids("-app")
    t0 = time.monotonic()
    await ContainerRestart.from_options({"timeout": 0.3}).reload(app_before)
    assert time.monotonic() - t0 >= 0.3
    app_after = await until(lambda: [p for p in pod.pids("-app") if p != app_before])
    assert app_after[0] != app_before


async def test_the_init_of_a_pid_namespace_is_never_stopped(make_pod: MakePod) -> None:
    pod = await make_pod("polite")
    with pytest.raises(ReloadError, match="init"):
        await ContainerRestart(timeout=1).reload(pod.init_pid)
    assert psutil.pid_exists(pod.init_pid)


async def test_baton_never_stops_itself() -> None:
    with pytest.raises(ReloadError, match="Baton itself"):
        await ContainerRestart(timeout=1).reload(os.getpid())


async def test_a_pid_that_is_already_gone_is_a_quiet_no_op(make_pod: MakePod) -> None:
    pod = await make_pod("polite")
    (worker,) = pod.pids("-app-worker")
    (app_before,) = pod.pids("-app")
    born = psutil.Process(worker).create_time()

    def worker_gone() -> list[int]:
        # Gone, a zombie waiting for init, or its pid number already reused: all "gone".
        try:
            proc = psutil.Process(worker)
            alive = proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() == born
        except psutil.NoSuchProcess:
            alive = False
        return [] if alive else [worker]

    action = ContainerRestart(timeout=5)
    await action.reload(app_before)
    # The worker of the container just stopped is the second pid of the same batch.
    await until(worker_gone)
    await action.reload(worker)
    (app_after,) = await until(lambda: [p for p in pod.pids("-app") if p != app_before])
    assert pod.pids("-app") == [app_after], "exactly one restart for the batch"
