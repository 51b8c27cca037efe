"""Fast drains: a holder's letting go reaches the rotator without waiting for a full scan.

A real agent and rotator on one local store; ``scan_interval`` and the
heartbeat are an hour, so only the quick paths can retire the old version
within the test's time: the holder's pidfd (its exit, as a zombie not yet
reaped), and fanotify's close/open events (``drain_rescan`` is a minute too,
so the periodic quick rescan cannot stand in for either).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.agent.service import Agent
from daemon.config import parse_config
from daemon.rotation.service import Rotator
from daemon.rotation.workflow import CredentialRotator
from daemon.usage.fanotify import OpenWatcher

pytestmark = pytest.mark.integration
T = TypeVar("T")

# Holds the file open; on a line on stdin, closes it and opens the stable path again (the new version).
HOLDER = """
import sys
held = open(sys.argv[1], "rb")
print("ready", flush=True)
for line in sys.stdin:
    held.close()
    held = open(sys.argv[1], "rb")
    print("reopened", flush=True)
"""


async def until(cond: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
    return value


def config(tmp_path: Path, *, fanotify: str) -> dict[str, Any]:
    return {
        "node_id": "n1",
        "store": {"kind": "local", "path": str(tmp_path / "store.db")},
        "api": {"listen": "127.0.0.1:0"},
        "report": {"heartbeat": "1h"},
        "agent": {"scan_interval": "1h", "drain_rescan": "60s", "fanotify": fanotify, "debounce": 0},
        "credentials": [
            {"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}, "rotation": {"every": "1d"}}
        ],
    }


@contextlib.asynccontextmanager
async def running(data: dict[str, Any]) -> AsyncIterator[tuple[Agent, Rotator, CredentialRotator]]:
    cfg = parse_config(data)
    rotator = Rotator(cfg, install_signals=False, serve_api=False)
    rtask = asyncio.create_task(rotator.serve())
    agent = Agent(cfg, install_signals=False)
    atask = asyncio.create_task(agent.serve())
    try:
        await asyncio.wait_for(agent.ready.wait(), 20)
        yield agent, rotator, rotator.rotators["db"]
    finally:
        agent.should_exit.set()
        rotator.should_exit.set()
        await asyncio.gather(atask, rtask)


def names_holder(r: CredentialRotator, pid: int) -> bool:
    return any(h.pid == pid for d in r.last_decisions for hs in d.holders.values() for h in hs)


async def rotate_and_wait_for_gate(agent: Agent, rotator: Rotator, r: CredentialRotator, pid: int) -> None:
    rotator.rotate_now.set()
    await until(lambda: agent.credentials["db"].version == "2")
    assert agent.tracker is not None
    agent.tracker.poke()  # the one full scan that finds the holder of version 1
    await until(lambda: names_holder(r, pid))


def retired(r: CredentialRotator) -> bool:
    return r.retired_total >= 1


async def test_a_holders_exit_retires_the_old_version_without_waiting_for_a_scan(tmp_path: Path) -> None:
    async with running(config(tmp_path, fanotify="off")) as (agent, rotator, r):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "out" / "value")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
            await rotate_and_wait_for_gate(agent, rotator, r, holder.pid)
            tracker = agent.tracker
            assert tracker is not None
            await until(lambda: holder.pid in tracker.exits.followed)  # its pidfd, from the scan after the swap
            assert not retired(r)
            holder.kill()  # not reaped: a zombie, which has exited all the same
            await until(lambda: retired(r))
            versions = {v.id: v for v in await rotator.store.versions("k")}
            assert versions["1"].retired and not versions["2"].retired
        finally:
            holder.kill()
            holder.wait()
            if holder.stdin is not None:
                holder.stdin.close()
            if holder.stdout is not None:
                holder.stdout.close()


ok, why = OpenWatcher.available()


@pytest.mark.skipif(not ok, reason=f"fanotify unavailable: {why}")
async def test_a_holder_that_reopens_the_new_version_lets_go_of_the_old_one_at_once(tmp_path: Path) -> None:
    async with running(config(tmp_path, fanotify="auto")) as (agent, rotator, r):
        assert agent.tracker is not None
        opens = await until(lambda: agent.tracker is not None and agent.tracker.opens)
        await until(lambda: any("..v1-" in path for path in opens._marked))
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "out" / "value")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdin is not None and holder.stdout is not None
            assert holder.stdout.readline() == b"ready\n"
            await rotate_and_wait_for_gate(agent, rotator, r, holder.pid)
            assert not retired(r)
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == b"reopened\n"
            await until(lambda: retired(r))
            assert holder.poll() is None  # it let go by reopening, not by exiting
            status = agent.status()["credentials"]["db"]["versions"]
            assert [h["pid"] for h in status["2"]["holders"]] == [holder.pid]
        finally:
            holder.kill()
            holder.wait()
            if holder.stdin is not None:
                holder.stdin.close()
            if holder.stdout is not None:
                holder.stdout.close()
