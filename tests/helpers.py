"""Helpers shared by tests of different layers: a config file, in-process runners, polls and log searches.

Server fixtures live in tests/fixtures/ and the helpers that run ``baton`` as a
real process in tests/e2e/helpers.py; what is here runs in the test's own
process and event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

    from daemon.agent.service import Agent
    from daemon.reload.reloader import Reloader

# A valid agent config file (local store, one credential with two templated files),
# the base the config tests break one field at a time.
GOOD_CONFIG = """\
node_id: node-a
store: {kind: local, path: ./store.db}
api: {listen: "127.0.0.1:8787"}
credentials:
  - name: app-db
    key: app/db
    output:
      dir: /var/lib/baton-good-config/app-db
      mode: "0440"
      files:
        password: "{{ password }}"
        dsn: "postgresql://{{ username }}:{{ password }}@db:5432/app"
"""


@contextlib.asynccontextmanager
async def running_agent(agent: Agent) -> AsyncIterator[Agent]:
    """``agent.serve()`` in a task, entered once the agent is ready; stopped (and awaited) at the block's end."""
    task = asyncio.create_task(agent.serve(), name="agent-under-test")
    try:
        async with asyncio.timeout(15):
            ready = asyncio.create_task(agent.ready.wait())
            await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
        assert agent.ready.is_set(), "the agent stopped before it was ready"
        yield agent
    finally:
        agent.request_stop()
        async with asyncio.timeout(15):
            await task


@contextlib.asynccontextmanager
async def running_reloader(reloader: Reloader) -> AsyncIterator[Reloader]:
    """``reloader.run()`` in a task for the block; cancelled (and awaited) at its end."""
    task = asyncio.create_task(reloader.run())
    try:
        yield reloader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], object], *, timeout: float, what: str, every: float = 0.02) -> float:
    """Poll ``cond`` until truthy; return the seconds it took; fail naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Messages and every ``extra`` field of the captured records (the daemon logs errors as extras)."""
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
