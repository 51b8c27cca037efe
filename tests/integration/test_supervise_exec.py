"""The ``baton exec`` Supervisor with real child processes and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.exec.supervisor import Supervisor, exit_status

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# argv: LOG MODE. Writes "start PID $DB_PASSWORD" once its handlers are in place,
# "sig PID NAME" for every signal; exits 3 on SIGTERM/SIGINT.
CHILD = r"""
import os, signal, sys
log, mode = sys.argv[1], sys.argv[2]
def note(s):
    with open(log, "a") as f:
        f.write(s + "\n")
def on(sig, frame):
    note(f"sig {os.getpid()} {signal.Signals(sig).name}")
    if sig in (signal.SIGTERM, signal.SIGINT):
        sys.exit(3)
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(s, on)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "default-term":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
note(f"start {os.getpid()} {os.environ.get('DB_PASSWORD', '')}")
if mode == "exit7":
    sys.exit(7)
while True:
    signal.pause()
"""

# What `baton exec` does around the Supervisor. argv: GRACE CMD...
DRIVER = r"""
import asyncio, sys
from daemon.exec.supervisor import Supervisor
async def main():
    sup = Supervisor(sys.argv[2:], grace=float(sys.argv[1]))
    sup.install_signal_handlers()
    await sup.start({"DB_PASSWORD": "s3cret-v1"})
    print("started", sup.pid, flush=True)
    try:
        return await sup.wait()
    finally:
        await sup.aclose()
sys.exit(asyncio.run(main()))
"""

SECRET_1 = "s3cret-v1"
SECRET_2 = "s3cret-v2"


def entries(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


async def until(cond: Callable[[], Any], within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return value


def started(log: Path) -> list[list[str]]:
    return [e for e in entries(log) if e[0] == "start"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def sup_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(mode: str = "normal", *, grace: float = 5.0) -> Supervisor:
        s = Supervisor([sys.executable, "-c", CHILD, str(tmp_path / "log"), mode], grace=grace)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.aclose()


async def test_a_restart_starts_the_child_again_with_the_new_environment(
    tmp_path: Path, sup_factory: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = tmp_path / "log"
    sup = sup_factory()
    first = await sup.start({"DB_PASSWORD": SECRET_1})
    await until(lambda: started(log))
    new = await sup.restart({"DB_PASSWORD": SECRET_2})
    assert new is not None and new != first and sup.pid == new
    await until(lambda: len(started(log)) == 2)
    assert started(log) == [["start", str(first), SECRET_1], ["start", str(new), SECRET_2]]
    assert ["sig", str(first), "SIGTERM"] in entries(log)
    assert not alive(first)
    assert not sup.ending, "a restart must not end supervision"
    assert await sup.stop() == 3
    for rec in caplog.records:
        text = rec.getMessage() + repr(vars(rec))
        assert SECRET_1 not in text and SECRET_2 not in text


async def test_a_restart_kills_a_child_that_ignores_the_stop_signal(
    tmp_path: Path, sup_factory: Callable[..., Supervisor]
) -> None:
    log = tmp_path / "log"
    sup = sup_factory("ignore-term", grace=0.3)
    first = await sup.start({})
    await until(lambda: started(log))
    t0 = time.monotonic()
    new = await sup.restart({})
    assert 0.3 <= time.monotonic() - t0 < 3
    assert not alive(first) and new is not None and alive(new)


async def test_received_signals_are_passed_to_the_child(tmp_path: Path, sup_factory: Callable[..., Supervisor]) -> None:
    log = tmp_path / "log"
    sup = sup_factory()
    sup.install_signal_handlers()
    pid = await sup.start({})
    await until(lambda: started(log))
    os.kill(os.getpid(), signal.SIGHUP)  # to ourselves: the loop's handler passes it on
    await until(lambda: ["sig", str(pid), "SIGHUP"] in entries(log))
    os.kill(os.getpid(), signal.SIGUSR1)
    await until(lambda: ["sig", str(pid), "SIGUSR1"] in entries(log))
    assert not sup.ending and alive(pid)
    sup.remove_signal_handlers()


async def test_stop_returns_the_shell_style_status_of_a_child_killed_by_a_signal(
    tmp_path: Path, sup_factory: Callable[..., Supervisor]
) -> None:
    sup = sup_factory("default-term")
    await sup.start({})
    await until(lambda: started(tmp_path / "log"))
    assert await sup.stop() == 128 + signal.SIGTERM
    assert exit_status(-9) == 137 and exit_status(5) == 5


async def driver(tmp_path: Path, mode: str, grace: float = 5.0) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DRIVER,
        str(grace),
        sys.executable,
        "-c",
        CHILD,
        str(tmp_path / "log"),
        mode,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).split()
    assert line[0] == b"started"
    return proc, int(line[1])


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_sigterm_ends_exec_with_the_childs_exit_status(tmp_path: Path) -> None:
    proc, child = await driver(tmp_path, "normal")
    async with reaped(proc):
        await until(lambda: started(tmp_path / "log"))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 3
    assert ["sig", str(child), "SIGTERM"] in entries(tmp_path / "log")
    assert not alive(child)


async def test_exec_exits_with_the_childs_code_when_the_child_exits_by_itself(tmp_path: Path) -> None:
    proc, _ = await driver(tmp_path, "exit7")
    async with reaped(proc):
        assert await asyncio.wait_for(proc.wait(), 10) == 7


async def test_sigterm_kills_a_child_that_ignores_it_after_the_grace(tmp_path: Path) -> None:
    proc, child = await driver(tmp_path, "ignore-term", grace=0.3)
    async with reaped(proc):
        await until(lambda: started(tmp_path / "log"))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 128 + signal.SIGKILL
        assert 0.3 <= time.monotonic() - t0 < 5
    assert not alive(child)
