"""Reloader pacing with a recording action: debounce, max wait, batching, errors, status.

The "process" is the test runner itself (always alive, never signalled: the
action only records), so these tests exercise the timing logic alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest

from daemon.config import ConsumerConfig, CredentialConfig
from daemon.errors import ReloadError
from daemon.reload.actions import ReloadAction
from daemon.reload.reloader import Reloader
from tests.helpers import running_reloader


class Recorder(ReloadAction):
    """A ReloadAction that records when it was called, and can fail."""

    per_consumer = False

    def __init__(self, *, fail_with: BaseException | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[int, float]] = []
        self.fail_with = fail_with
        self.delay = delay
        self.closed = False

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        self.calls.append((pid, time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        return None

    async def aclose(self) -> None:
        self.closed = True


def consumer(name: str = "app", **kw: Any) -> ConsumerConfig:
    data: dict[str, Any] = {
        "name": name,
        "match": {"cmdline": name},
        "reload": {"signal": "HUP"},
        "health": {"alive_for": 0.01},
        "min_restart_interval": 0,
    }
    data.update(kw)
    return ConsumerConfig.model_validate(data)


def me(_: Any) -> list[int]:
    return [os.getpid()]


async def test_a_change_resets_the_debounce_timer() -> None:
    rec = Recorder()
    r = Reloader({"db": [consumer()]}, debounce=0.2, find=me, action_factory=lambda c: rec)
    async with running_reloader(r):
        t0 = time.monotonic()
        r.changed("db", "1")
        await asyncio.sleep(0.12)
        r.changed("db", "2")
        await asyncio.wait_for(r.wait_idle(), 5)
    assert len(rec.calls) == 1
    assert rec.calls[0][1] - t0 >= 0.12 + 0.2 - 0.01


async def test_a_stream_of_changes_is_reloaded_after_the_max_wait() -> None:
    rec = Recorder()
    r = Reloader({"db": [consumer()]}, debounce=0.1, max_wait=0.3, find=me, action_factory=lambda c: rec)
    async with running_reloader(r):
        t0 = time.monotonic()
        for i in range(15):  # 0.6 s of changes, each within the debounce of the last
            r.changed("db", str(i))
            await asyncio.sleep(0.04)
        await asyncio.wait_for(r.wait_idle(), 5)
    assert len(rec.calls) >= 2
    assert 0.3 - 0.01 <= rec.calls[0][1] - t0 < 0.5


async def test_a_consumer_declared_under_two_credentials_is_one_consumer() -> None:
    rec = Recorder()
    creds = [
        CredentialConfig.model_validate(
            {"name": n, "key": n, "output": {"dir": f"/tmp/x-{n}"}, "consumers": [consumer().model_dump()]}
        )
        for n in ("db", "cache")
    ]
    got: list[frozenset[str]] = []
    r = Reloader(creds, debounce=0.05, find=me, action_factory=lambda c: rec, on_done=lambda c, cr, ok: got.append(cr))
    assert list(r.status()) == ["app"]
    async with running_reloader(r):
        r.changed("db", "1")
        r.changed("cache", "9")
        await asyncio.wait_for(r.wait_idle(), 5)
    assert len(rec.calls) == 1
    assert got == [frozenset({"db", "cache"})]


async def test_a_change_of_a_credential_without_consumers_is_ignored() -> None:
    r = Reloader({"db": [consumer()]}, debounce=0.05, find=me, action_factory=lambda c: Recorder())
    r.changed("other", "1")
    await asyncio.wait_for(r.wait_idle(), 1)
    assert r.status()["app"].result is None


async def test_an_unexpected_exception_in_an_action_is_a_reported_failure_not_a_crash() -> None:
    rec = Recorder(fail_with=RuntimeError("boom"))
    r = Reloader({"db": [consumer()]}, debounce=0.02, find=me, action_factory=lambda c: rec)
    async with running_reloader(r) as rr:
        r.changed("db", "1")
        await asyncio.wait_for(r.wait_idle(), 5)
        st = rr.status()["app"]
        assert st.result == "failure" and st.error == "RuntimeError during reload"
        r.changed("db", "2")  # the worker is still alive
        await asyncio.wait_for(r.wait_idle(), 5)
    assert len(rec.calls) == 2
    assert rec.closed, "run() closes the actions on the way out"


async def test_a_reload_error_is_kept_in_the_status_and_as_dict_is_json() -> None:
    rec = Recorder(fail_with=ReloadError("nginx -s reload exited with status 1"))
    r = Reloader({"db": [consumer()]}, debounce=0.02, find=me, action_factory=lambda c: rec)
    async with running_reloader(r):
        r.changed("db", "1")
        await asyncio.wait_for(r.wait_idle(), 5)
    d = r.status()["app"].as_dict()
    assert d["result"] == "failure" and "status 1" in d["error"]
    assert d["reloaded"][0]["pid"] == os.getpid()
    json.dumps(d)


async def test_status_shows_pending_and_running_while_a_roll_is_in_progress() -> None:
    rec = Recorder(delay=0.3)
    r = Reloader({"db": [consumer()]}, debounce=0.02, find=me, action_factory=lambda c: rec)
    async with running_reloader(r):
        r.changed("db", "1")
        assert r.status()["app"].pending == {"db"}
        while not rec.calls:
            await asyncio.sleep(0.01)
        st = r.status()["app"]
        assert st.running and st.pending == frozenset()
        await asyncio.wait_for(r.wait_idle(), 5)
    assert not r.status()["app"].running


async def test_an_async_on_done_callback_is_awaited() -> None:
    seen: list[bool] = []

    async def done(consumer: str, creds: frozenset[str], ok: bool) -> None:
        await asyncio.sleep(0)
        seen.append(ok)

    r = Reloader({"db": [consumer()]}, debounce=0.02, find=me, action_factory=lambda c: Recorder(), on_done=done)
    async with running_reloader(r):
        r.changed("db", "1")
        await asyncio.wait_for(r.wait_idle(), 5)
    assert seen == [True]


def test_the_recorder_satisfies_the_protocol() -> None:
    assert isinstance(Recorder(), ReloadAction)


@pytest.mark.parametrize("action", ["signal", "exec", "restart", "systemd", "none"])
def test_every_builtin_action_can_be_constructed_from_config(action: str) -> None:
    from daemon.reload.actions import make_action

    reload_cfg: Any = {
        "signal": {"signal": "HUP"},
        "exec": {"exec": ["true"]},
        "restart": {"restart": {}},
        "systemd": {"systemd": "reload"},
        "none": "none",
    }[action]
    assert isinstance(make_action(consumer(reload=reload_cfg)), ReloadAction)


async def test_an_action_that_cannot_be_built_fails_its_consumer_only() -> None:
    rec = Recorder()

    def factory(c: ConsumerConfig) -> ReloadAction:
        if c.name == "broken":
            raise TypeError("bad constructor")
        return rec

    r = Reloader({"db": [consumer("broken"), consumer("fine")]}, debounce=0.02, find=me, action_factory=factory)
    async with running_reloader(r):
        r.changed("db", "1")
        await asyncio.wait_for(r.wait_idle(), 5)
    assert r.status()["broken"].result == "failure"
    assert r.status()["fine"].result == "ok"
    assert r.status()["fine"].reloaded[0].new_pid is None  # a signal reload keeps its pid
