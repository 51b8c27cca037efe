"""ExitWatch: a pidfd per followed process, its exit reported once, at most MAX_FOLLOWED descriptors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from daemon.agent import exits
from daemon.agent.exits import ExitWatch


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_exit_is_reported_once_and_its_pidfd_closed() -> None:
    heard: list[int] = []
    woke = asyncio.Event()

    def on_exit(pid: int) -> None:
        heard.append(pid)
        woke.set()

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    before = _fds()
    watch = ExitWatch(on_exit)
    try:
        watch.follow([child.pid, 0, -1])  # pid 0 (an env-unknown stand-in) and groups are skipped
        assert watch.followed == {child.pid} and _fds() == before + 1
        child.kill()  # not reaped: a zombie has exited all the same
        await asyncio.wait_for(woke.wait(), 10)
        assert heard == [child.pid] and watch.exited == {child.pid} and _fds() == before
        watch.follow([child.pid])  # still a holder at the last scan: not reported again
        assert heard == [child.pid] and not watch.followed
    finally:
        watch.close()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


async def test_no_more_than_max_followed_pidfds_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exits, "MAX_FOLLOWED", 2)
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    watch = ExitWatch(lambda pid: None)
    try:
        watch.follow([c.pid for c in children])
        assert len(watch.followed) == 2
        watch.follow([children[3].pid])  # the others are dropped and their pidfds closed
        assert watch.followed == {children[3].pid}
    finally:
        watch.close()
        for c in children:
            c.kill()
            c.wait()
    assert not watch.followed
