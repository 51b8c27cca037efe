"""The agent sees a process that read a credential file and closed it at once (fanotify open events).

Needs CAP_SYS_ADMIN (the tests run as root here); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.agent.service import Agent
from daemon.config import parse_config
from daemon.model import Secret
from daemon.stores.local import LocalStore
from daemon.usage.fanotify import OpenWatcher

ok, why = OpenWatcher.available()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not ok, reason=f"fanotify unavailable: {why}")]

READ_ONCE = """
import sys
open(sys.argv[1]).read()        # read, close at once: no fd is left to find
print("read", flush=True)
sys.stdin.read()                # keep living (holding the value in memory) until told
"""


async def until(cond, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)
    return value


async def test_a_process_that_read_the_file_and_closed_it_holds_that_version_until_it_exits(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = LocalStore(db, watch_files=False)
    store.put_sync("k", Secret("first-secret-value"))
    config = parse_config(
        {
            "node_id": "n1",
            "store": {"kind": "local", "path": str(db)},
            "api": {"listen": "127.0.0.1:0"},
            "report": {"heartbeat": 0.5},
            "agent": {"scan_interval": 0.2, "fanotify": "auto"},
            "credentials": [{"name": "db", "key": "k", "output": {"dir": str(tmp_path / "out")}}],
        }
    )
    agent = Agent(config, install_signals=False)
    task = asyncio.create_task(agent.serve())
    reader = None
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        assert agent.tracker is not None
        opens = await until(lambda: agent.tracker is not None and agent.tracker.opens)
        await until(lambda: any("..v1-" in path for path in opens._marked))  # the version dir is marked
        reader = subprocess.Popen(
            [sys.executable, "-c", READ_ONCE, str(tmp_path / "out" / "value")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert reader.stdout is not None and reader.stdout.readline() == b"read\n"
        store.put_sync("k", Secret("second-secret-value"))
        await until(lambda: agent.credentials["db"].version == "2")
        agent.tracker.poke()

        def holders_of_1() -> list[dict[str, object]]:
            versions = agent.status()["credentials"]["db"].get("versions", {})
            return list(versions.get("1", {}).get("holders", []))

        held = await until(lambda: [h for h in holders_of_1() if h["pid"] == reader.pid])
        assert held[0]["how"] == "fanotify" and held[0]["consumer"] is None  # an unmanaged holder
        assert agent.status()["credentials"]["db"]["versions"]["1"]["state"] == "draining"
        reader.stdin.close()  # type: ignore[union-attr]
        reader.wait(5)
        agent.tracker.poke()
        await until(lambda: not holders_of_1())
        assert "first-secret-value" not in str(agent.status())
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        if reader is not None and reader.stdout is not None:
            reader.stdout.close()
        agent.should_exit.set()
        await task
        store.close()
