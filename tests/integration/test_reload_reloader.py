"""The Reloader against real processes: batching, rolling with a health gate, rate limit, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.errors import ReloadGone
from daemon.kit import metrics
from daemon.reload.actions import ReloadAction, SignalAction
from daemon.reload.processes import is_alive
from daemon.reload.reloader import Reloader
from daemon.usage.consumers import find_processes
from tests.helpers import running_reloader
from tests.integration.test_reload_actions import Procs, consumer, fake_systemctl, lines, until

pytestmark = pytest.mark.integration


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        await p.close()


async def idle(reloader: Reloader, within: float = 10.0) -> None:
    await asyncio.wait_for(reloader.wait_idle(), within)


def failures(name: str) -> float:
    return metrics.REGISTRY.get_sample_value("baton_reloads_total", {"consumer": name, "result": "failure"}) or 0.0


async def test_two_credentials_changing_together_give_one_reload(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(reload={"signal": "SIGHUP"}, health={"alive_for": 0.05})
    done: list[tuple[str, frozenset[str], bool]] = []
    r = Reloader(
        {"db": [cons], "api-key": [cons]},
        debounce=0.1,
        find=lambda m: [child.pid],
        on_done=lambda c, creds, ok: done.append((c, creds, ok)),
    )
    async with running_reloader(r):
        r.changed("db", "7")
        r.changed("api-key", "3")
        await idle(r)
    assert len(lines(procs.tmp / "a.log", "hup")) == 1
    assert done == [("app", frozenset({"db", "api-key"}), True)]
    st = r.status()["app"]
    assert st.result == "ok" and st.error is None and st.credentials == {"db", "api-key"}
    assert [p.pid for p in st.reloaded] == [child.pid]
    assert r.reloaded_at(child.pid) is not None and abs(r.reloaded_at(child.pid) - time.time()) < 10
    json.dumps(st.as_dict())


async def test_processes_are_reloaded_one_at_a_time_after_the_previous_one_is_healthy(procs: Procs) -> None:
    a = await procs.child("a")
    b = await procs.child("b")
    token = procs.tmp.name
    # Both children carry the tmp dir name in their argv: the real matcher finds exactly them.
    cons = consumer(match={"cmdline": token}, reload={"signal": "HUP"}, health={"alive_for": 0.3})
    assert sorted(find_processes(cons.match)) == sorted([a.pid, b.pid])
    r = Reloader({"db": [cons]}, debounce=0.05)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    hups = sorted(t for log in ("a", "b") for _, t in lines(procs.tmp / f"{log}.log", "hup"))
    assert len(hups) == 2
    # Child-side timestamps carry a few ms of signal-delivery jitter; concurrent signals would be ~0 apart.
    assert hups[1] - hups[0] >= 0.25, "the second process was signalled before the first passed alive_for"
    assert [p.result for p in r.status()["app"].reloaded] == ["ok", "ok"]


async def test_a_failed_health_check_stops_the_roll_and_reports_the_consumer(
    procs: Procs, caplog: pytest.LogCaptureFixture
) -> None:
    a = await procs.child("a", "die-on-hup")
    b = await procs.child("b")
    cons = consumer(name="fragile", reload={"signal": "HUP"}, health={"alive_for": 1}, min_restart_interval=0.1)
    before = failures("fragile")
    done: list[bool] = []
    r = Reloader(
        {"db": [cons]}, debounce=0.05, find=lambda m: [a.pid, b.pid], on_done=lambda c, creds, ok: done.append(ok)
    )
    caplog.set_level(logging.INFO, logger="daemon.reload.reloader")
    async with running_reloader(r):
        started = time.monotonic()
        r.changed("db", "2")
        await idle(r)
        assert time.monotonic() - started < 0.8, "an early exit fails at once, not after alive_for"
        assert lines(procs.tmp / "b.log", "hup") == [], "the roll must stop at the failed process"
        st = r.status()["fragile"]
        assert st.result == "failure" and st.error is not None and "exited" in st.error
        assert failures("fragile") == before + 1
        assert done == [False]
        events = [rec for rec in caplog.records if getattr(rec, "event", None) == "reload"]
        assert [(e.pid, e.result) for e in events] == [(a.pid, "failure")]  # type: ignore[attr-defined]

        # The next change retries: the dead process is skipped, the other one is reloaded.
        r.changed("db", "3")
        await idle(r)
    assert len(lines(procs.tmp / "b.log", "hup")) == 1
    st = r.status()["fragile"]
    assert st.result == "ok" and st.error is None
    assert [(p.pid, p.result) for p in st.reloaded] == [(a.pid, "gone"), (b.pid, "ok")]


class RecordingRestart(ReloadAction):
    """A restarting action that only records when it ran (the process stays up)."""

    replaces = False

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        self.calls.append(time.monotonic())
        return None

    async def aclose(self) -> None:
        return None


async def test_a_restart_within_min_restart_interval_is_deferred_not_dropped(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(reload={"systemd": "restart"}, health={"alive_for": 0.02}, min_restart_interval=0.6)
    action = RecordingRestart()
    r = Reloader({"db": [cons]}, debounce=0.05, find=lambda m: [child.pid], action_factory=lambda c: action)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
        r.changed("db", "3")
        await asyncio.sleep(0.2)  # longer than the debounce: only the interval holds it back now
        assert r.status()["app"].pending == {"db"}
        assert len(action.calls) == 1
        await idle(r)
    assert len(action.calls) == 2
    assert action.calls[1] - action.calls[0] >= 0.6 - 0.05


async def test_a_signal_reload_is_not_held_back_by_min_restart_interval(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(reload={"signal": "HUP"}, health={"alive_for": 0.02}, min_restart_interval=30)
    r = Reloader({"db": [cons]}, debounce=0.05, find=lambda m: [child.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
        r.changed("db", "3")
        await idle(r, within=5.0)
    await until(lambda: len(lines(procs.tmp / "a.log", "hup")) == 2)
    hups = [t for _, t in lines(procs.tmp / "a.log", "hup")]
    assert hups[1] - hups[0] < 5.0


async def test_a_per_use_consumer_is_not_reloaded(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(loads="per-use", reload={"signal": "HUP"})
    r = Reloader({"db": [cons]}, debounce=0.05, find=lambda m: [child.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert r.status()["app"].result == "not_needed"
    assert lines(procs.tmp / "a.log", "hup") == []


async def test_a_consumer_without_processes_is_reported_as_such(procs: Procs) -> None:
    cons = consumer(reload={"signal": "HUP"})
    r = Reloader({"db": [cons]}, debounce=0.05)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert r.status()["app"].result == "no_processes"


async def test_a_supervised_restart_through_the_reloader_records_the_new_pid(procs: Procs) -> None:
    cmd = procs.command("svc")
    pidfile = procs.tmp / "svc.pid"
    # First start: the restart command itself, as an operator would have started it.
    first = await asyncio.create_subprocess_exec(*cmd)
    await until(lambda: pidfile.exists())
    old = int(pidfile.read_text())
    cons = consumer(
        match={"pidfile": str(pidfile)},
        reload={"restart": {"timeout": 5, "command": cmd}},
        health={"alive_for": 0.1},
    )
    r = Reloader({"db": [cons]}, debounce=0.05)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    await first.wait()
    st = r.status()["app"]
    assert st.result == "ok", st.error
    new = st.reloaded[0].new_pid
    assert new is not None and new != old and is_alive(new)
    assert int(pidfile.read_text()) == new
    assert r.reloaded_at(new) is not None


async def test_a_restart_left_to_an_outside_supervisor_waits_for_the_replacement(procs: Procs) -> None:
    await procs.keeper("svc")
    pidfile = procs.tmp / "svc.pid"
    old = int(pidfile.read_text())
    cons = consumer(match={"pidfile": str(pidfile)}, reload={"restart": {"timeout": 5}}, health={"alive_for": 0.1})
    r = Reloader({"db": [cons]}, debounce=0.05)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    st = r.status()["app"]
    assert st.result == "ok", st.error
    assert not is_alive(old)
    assert st.reloaded[0].new_pid == int(pidfile.read_text()) != old


async def test_consumers_are_reloaded_independently(procs: Procs) -> None:
    slow = await procs.child("slow")
    fast = await procs.child("fast")
    pids: dict[str, int] = {"slow": slow.pid, "fast": fast.pid}
    cons_slow = consumer(name="slow", match={"cmdline": "slow"}, reload={"signal": "HUP"}, health={"alive_for": 1.5})
    cons_fast = consumer(name="fast", match={"cmdline": "fast"}, reload={"signal": "HUP"}, health={"alive_for": 0.01})
    finished: dict[str, float] = {}

    def find(m: Any) -> list[int]:
        return [pids[m.cmdline]]

    r = Reloader(
        {"db": [cons_slow, cons_fast]},
        debounce=0.05,
        find=find,
        on_done=lambda c, creds, ok: finished.__setitem__(c, time.monotonic()),
    )
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert finished["fast"] < finished["slow"] - 1.0


async def test_a_systemd_consumer_gets_one_systemctl_call_for_all_its_processes(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await procs.child("a")
    b = await procs.child("b")
    calls = fake_systemctl(procs.tmp, monkeypatch)
    cons = consumer(match={"systemd_unit": "api.service"}, reload={"systemd": "reload"}, health={"alive_for": 0.05})
    r = Reloader({"db": [cons]}, debounce=0.05, find=lambda m: [a.pid, b.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert r.status()["app"].result == "ok", r.status()["app"].error
    assert calls.read_text().splitlines() == ["reload api.service"]


async def test_an_http_health_check_gates_the_roll(procs: Procs) -> None:
    child = await procs.child("a")
    port = await procs.http()
    good = consumer(reload={"signal": "HUP"}, health={"http": f"http://127.0.0.1:{port}/ok"})
    bad_url = f"http://127.0.0.1:{port}/bad"
    bad = consumer(name="bad", reload={"signal": "HUP"}, health={"http": bad_url, "timeout": 0.2})
    r = Reloader({"db": [good, bad]}, debounce=0.05, find=lambda m: [child.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert r.status()["app"].result == "ok"
    st = r.status()["bad"]
    assert st.result == "failure" and st.error is not None and "503" in st.error


async def test_a_process_started_after_the_change_is_not_signalled_it_loaded_the_new_version_itself(
    procs: Procs,
) -> None:
    old = await procs.child("old")
    cons = consumer(reload={"signal": "HUP"}, health={"alive_for": 0.02})
    pids: list[int] = [old.pid]
    r = Reloader({"db": [cons]}, debounce=0.3, find=lambda m: list(pids))
    async with running_reloader(r):
        r.changed("db", "2")
        await asyncio.sleep(0.1)  # the scenario: a process starts 100 ms after the change (past the clock slack)
        new = await procs.child("new")
        pids.append(new.pid)
        await idle(r)
    assert len(lines(procs.tmp / "old.log", "hup")) == 1
    assert lines(procs.tmp / "new.log", "hup") == []
    results = {p.pid: p.result for p in r.status()["app"].reloaded}
    assert results == {old.pid: "ok", new.pid: "fresh"}


class TimedSignal(ReloadAction):
    """The real signal action, noting the wall time it was called at."""

    per_consumer = False

    def __init__(self, cons: Any) -> None:
        self.inner = SignalAction(cons)
        self.called: list[float] = []

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        self.called.append(time.time())
        return await self.inner.reload(pid)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_reload_time_is_when_the_reload_was_sent_not_when_the_health_check_passed(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(reload={"signal": "HUP"}, health={"alive_for": 0.5})
    action = TimedSignal(cons)
    r = Reloader({"db": [cons]}, debounce=0.02, find=lambda m: [child.pid], action_factory=lambda c: action)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    finished = time.time()
    assert r.status()["app"].result == "ok"
    at = r.reloaded_at(child.pid)
    assert at is not None and len(action.called) == 1
    # A version swapped in during the 0.5 s health check must not be credited to this process.
    assert action.called[0] - 0.05 <= at <= action.called[0] + 0.05
    assert finished - at >= 0.5
    assert r.status()["app"].reloaded[0].at == at


async def test_a_systemd_consumer_whose_first_process_exited_is_still_reloaded_through_a_live_one(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = await procs.child("gone")
    gone.kill()
    await gone.wait()
    b = await procs.child("b")
    calls = fake_systemctl(procs.tmp, monkeypatch)
    cons = consumer(match={"systemd_unit": "api.service"}, reload={"systemd": "reload"}, health={"alive_for": 0.05})
    # The first pid found has exited by the time the roll looks at it; the unit still runs b.
    r = Reloader({"db": [cons]}, debounce=0.02, find=lambda m: [gone.pid, b.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    st = r.status()["app"]
    assert calls.exists() and calls.read_text().splitlines() == ["reload api.service"]
    assert st.result == "ok", st.error
    assert [(p.pid, p.result) for p in st.reloaded] == [(b.pid, "ok")]


async def test_a_systemd_consumer_whose_processes_all_exited_is_not_reported_reloaded(procs: Procs) -> None:
    gone = await procs.child("gone")
    gone.kill()
    await gone.wait()
    cons = consumer(match={"systemd_unit": "api.service"}, reload={"systemd": "reload"}, health={"alive_for": 0.05})
    r = Reloader({"db": [cons]}, debounce=0.02, find=lambda m: [gone.pid])
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert r.status()["app"].result == "no_processes"


async def test_reload_times_carry_over_to_the_next_reloader_without_dead_processes(procs: Procs) -> None:
    child = await procs.child("a")
    dead = await procs.child("dead")
    dead.kill()
    await dead.wait()
    cons = consumer(reload={"signal": "HUP"}, health={"alive_for": 0.02})
    first = Reloader({"db": [cons]}, debounce=0.02, find=lambda m: [child.pid])
    async with running_reloader(first):
        first.changed("db", "2")
        await idle(first)
    at = first.reloaded_at(child.pid)
    assert at is not None
    carried = first.reloaded_pids
    assert carried == {child.pid: at}
    carried[child.pid] = 0.0  # a copy: the caller cannot change the Reloader's record
    assert first.reloaded_at(child.pid) == at

    # The agent re-reads its config (SIGHUP) and builds a new Reloader from the old one's record.
    second = Reloader({"db": [cons]}, reloaded_at={**first.reloaded_pids, dead.pid: 1.0})
    assert second.reloaded_at(child.pid) == at
    assert second.reloaded_at(dead.pid) is None
    assert second.reloaded_pids == {child.pid: at}


class StartChecking(ReloadAction):
    """A checks_start action: records the start time it is given; the first pid turns out recycled."""

    per_consumer = False
    checks_start = True

    def __init__(self, recycled: int) -> None:
        self.recycled = recycled
        self.calls: list[tuple[int, float | None]] = []

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        self.calls.append((pid, started))
        if pid == self.recycled:
            raise ReloadGone(f"pid {pid} is gone")
        return None

    async def aclose(self) -> None:
        return None


async def test_the_snapshot_start_time_reaches_the_action_and_a_recycled_pid_is_skipped_as_gone(
    procs: Procs,
) -> None:
    a = await procs.child("a")
    b = await procs.child("b")
    cons = consumer(reload={"signal": "HUP"}, health={"alive_for": 0.02})
    action = StartChecking(recycled=a.pid)
    r = Reloader({"db": [cons]}, debounce=0.02, find=lambda m: [a.pid, b.pid], action_factory=lambda c: action)
    async with running_reloader(r):
        r.changed("db", "2")
        await idle(r)
    assert action.calls == [(p, psutil.Process(p).create_time()) for p in (a.pid, b.pid)]
    st = r.status()["app"]
    assert st.result == "ok", st.error
    assert [(p.pid, p.result) for p in st.reloaded] == [(a.pid, "gone"), (b.pid, "ok")]
    assert r.reloaded_at(a.pid) is None
