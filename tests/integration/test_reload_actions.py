"""Each reload action and health check against real processes.

Children are ``python -c`` programs that print ``ready`` when their handlers are
installed and append a line to a log file for every signal they get, so tests
synchronise on pipes and file lines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.config import ConsumerConfig
from daemon.errors import ReloadError, ReloadGone
from daemon.reload.actions import (
    ExecAction,
    NoneAction,
    RestartAction,
    SignalAction,
    SystemdAction,
    make_action,
)
from daemon.reload.health import check_health, check_http
from daemon.reload.processes import is_alive, stop_process, wait_exit

pytestmark = pytest.mark.integration

# argv: LOG PIDFILE MODE. Appends "start PID", "hup PID T", "term PID" to LOG.
CHILD = r"""
import os, signal, sys, time
log, pidfile, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {os.getpid()} {time.monotonic():.6f}\n")
def hup(*_):
    note("hup")
    if mode == "die-on-hup":
        os._exit(3)
def term(*_):
    note("term")
    os._exit(0)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else term)
if pidfile != "-":
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pidfile)
note("start")
print("ready", flush=True)
if mode == "exit-soon":
    time.sleep(0.1)
    sys.exit(0)
while True:
    signal.pause()
"""

# argv: LOG PIDFILE. Keeps one CHILD running, restarting it whenever it exits
# (stands in for systemd or a process supervisor).
KEEPER = r"""
import subprocess, sys
child = sys.argv[1]
while True:
    p = subprocess.Popen([sys.executable, "-c", child, sys.argv[2], sys.argv[3], "normal"], stdout=subprocess.DEVNULL)
    p.wait()
"""

HTTP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def lines(log: Path, kind: str) -> list[tuple[int, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        what, pid, t = line.split()
        if what == kind:
            out.append((int(pid), float(t)))
    return out


async def until(cond: Callable[[], Any], within: float = 5.0) -> Any:
    """Poll ``cond`` until truthy (for detached processes that share no pipe with us)."""
    deadline = time.monotonic() + within
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return value


class Procs:
    """Spawns children and kills whatever is left at the end, detached ones included."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[asyncio.subprocess.Process] = []
        self.pidfiles: list[Path] = []

    async def child(self, name: str, mode: str = "normal", *, pidfile: bool = False) -> asyncio.subprocess.Process:
        log = self.tmp / f"{name}.log"
        pf = self.tmp / f"{name}.pid"
        if pidfile:
            self.pidfiles.append(pf)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(log),
            str(pf) if pidfile else "-",
            mode,
            stdout=asyncio.subprocess.PIPE,
        )
        self.children.append(proc)
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
        return proc

    def command(self, name: str, mode: str = "normal") -> list[str]:
        """argv of a CHILD that writes its pid to NAME.pid (for restart commands)."""
        pf = self.tmp / f"{name}.pid"
        self.pidfiles.append(pf)
        return [sys.executable, "-c", CHILD, str(self.tmp / f"{name}.log"), str(pf), mode]

    async def keeper(self, name: str) -> asyncio.subprocess.Process:
        pf = self.tmp / f"{name}.pid"
        self.pidfiles.append(pf)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KEEPER, CHILD, str(self.tmp / f"{name}.log"), str(pf)
        )
        self.children.append(proc)
        await until(lambda: pf.exists())
        return proc

    async def http(self) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HTTP, stdout=asyncio.subprocess.PIPE)
        self.children.append(proc)
        assert proc.stdout is not None
        return int(await proc.stdout.readline())

    async def close(self) -> None:
        for proc in self.children:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for pf in self.pidfiles:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pf.read_text()), signal.SIGKILL)


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        await p.close()


def consumer(**kw: Any) -> ConsumerConfig:
    data: dict[str, Any] = {"name": "app", "match": {"cmdline": "never-matches-anything-xyz"}}
    data.update(kw)
    return ConsumerConfig.model_validate(data)


# ---------------------------------------------------------------- actions


async def test_the_signal_action_sends_the_configured_signal(procs: Procs) -> None:
    child = await procs.child("a")
    action = make_action(consumer(reload={"signal": "HUP"}))
    assert isinstance(action, SignalAction)
    assert await action.reload(child.pid) is None
    await until(lambda: lines(procs.tmp / "a.log", "hup"))
    assert is_alive(child.pid)
    await action.aclose()


async def test_the_signal_action_fails_for_a_process_that_is_gone(procs: Procs) -> None:
    child = await procs.child("a")
    child.kill()
    await child.wait()
    with pytest.raises(ReloadError, match="gone"):
        await SignalAction(consumer(reload={"signal": "HUP"})).reload(child.pid)


async def test_the_exec_action_runs_per_pid_with_a_scrubbed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hunter2-secret-token")
    out = tmp_path / "out"
    script = "import os,sys; open(sys.argv[1],'w').write(repr((sys.argv[2:], dict(os.environ))))"
    action = ExecAction(consumer(reload={"exec": [sys.executable, "-c", script, str(out), "{pid}"]}))
    assert action.per_consumer is False
    await action.reload(4242)
    argv, env = eval(out.read_text())
    assert argv == ["4242"]
    assert env["BATON_CONSUMER"] == "app" and env["BATON_PID"] == "4242"
    assert "VAULT_TOKEN" not in env
    assert "hunter2" not in out.read_text()


async def test_the_exec_action_without_a_pid_placeholder_runs_once_per_consumer() -> None:
    assert ExecAction(consumer(reload={"exec": ["true"]})).per_consumer is True


async def test_the_exec_action_reports_a_non_zero_exit_without_the_output() -> None:
    argv = [sys.executable, "-c", "print('password=hunter2'); raise SystemExit(4)"]
    with pytest.raises(ReloadError) as err:
        await ExecAction(consumer(reload={"exec": argv})).reload(1)
    assert "status 4" in str(err.value)
    assert "hunter2" not in str(err.value)


async def test_the_exec_action_kills_a_command_that_runs_too_long(tmp_path: Path) -> None:
    pidfile = tmp_path / "slow.pid"
    script = "import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(30)"
    action = ExecAction(
        consumer(reload={"exec": [sys.executable, "-c", script, str(pidfile)]}, health={"timeout": 0.5})
    )
    started = time.monotonic()
    with pytest.raises(ReloadError, match="did not finish"):
        await action.reload(1)
    assert time.monotonic() - started < 5
    assert not is_alive(int(pidfile.read_text()))


async def test_the_exec_action_reports_a_missing_program() -> None:
    with pytest.raises(ReloadError, match="cannot run"):
        await ExecAction(consumer(reload={"exec": ["/nonexistent/reloader"]})).reload(1)


async def test_a_restart_without_command_stops_the_process_and_returns_no_pid(procs: Procs) -> None:
    child = await procs.child("a")
    action = RestartAction(consumer(reload={"restart": {"timeout": 5}}))
    assert await action.reload(child.pid) is None
    assert await child.wait() == 0  # it ran its SIGTERM handler
    assert lines(procs.tmp / "a.log", "term")


async def test_a_restart_sends_sigkill_after_the_timeout_to_a_process_ignoring_sigterm(procs: Procs) -> None:
    child = await procs.child("a", "ignore-term")
    action = RestartAction(consumer(reload={"restart": {"timeout": 0.3}}))
    started = time.monotonic()
    await action.reload(child.pid)
    elapsed = time.monotonic() - started
    assert await child.wait() == -signal.SIGKILL
    assert 0.3 <= elapsed < 3


async def test_a_supervised_restart_starts_the_command_detached_and_returns_its_pid(procs: Procs) -> None:
    child = await procs.child("old")
    cmd = procs.command("new")
    action = RestartAction(consumer(reload={"restart": {"timeout": 5, "command": cmd}}))
    new_pid = await action.reload(child.pid)
    assert new_pid is not None and new_pid != child.pid
    await child.wait()
    pid_in_file = await until(lambda: (procs.tmp / "new.pid").exists() and int((procs.tmp / "new.pid").read_text()))
    assert pid_in_file == new_pid
    assert is_alive(new_pid)
    proc = psutil.Process(new_pid)
    assert os.getsid(new_pid) != os.getsid(0)  # a session of its own
    assert proc.ppid() != os.getpid()  # not our child: it outlives Baton like a service


async def test_a_restart_with_a_missing_command_leaves_the_process_running(procs: Procs) -> None:
    child = await procs.child("a")
    action = RestartAction(consumer(reload={"restart": {"command": ["/nonexistent/app"]}}))
    with pytest.raises(ReloadError, match="not found"):
        await action.reload(child.pid)
    assert is_alive(child.pid)


def fake_systemctl(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``systemctl`` first on PATH that appends its arguments, one call a line, to the file returned."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    calls = tmp / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


async def test_the_systemd_action_calls_systemctl_once_with_the_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_systemctl(tmp_path, monkeypatch)
    restart = SystemdAction(consumer(match={"systemd_unit": "api.service"}, reload={"systemd": "restart"}))
    reload_ = SystemdAction(consumer(match={"systemd_unit": "api.service"}, reload={"systemd": "reload"}))
    assert restart.per_consumer and restart.replaces and not reload_.replaces
    await restart.reload(0)
    await reload_.reload(0)
    assert calls.read_text().splitlines() == ["try-restart api.service", "reload api.service"]


async def test_the_systemd_action_without_a_unit_fails_for_a_process_outside_any_unit() -> None:
    action = SystemdAction(consumer(reload={"systemd": "reload"}))
    with pytest.raises(ReloadError, match="no systemd unit"):
        await action.reload(0)


async def test_the_none_action_does_nothing(procs: Procs) -> None:
    child = await procs.child("a")
    assert await NoneAction(consumer()).reload(child.pid) is None
    assert is_alive(child.pid)


def test_sidecar_actions_are_registered_by_name() -> None:
    from daemon.kit.plugins import ACTIONS

    assert ACTIONS["container_restart"] == "sidecar.restart:ContainerRestartAction"
    assert ACTIONS["rollout"] == "sidecar.rollout:RolloutAction"


def test_an_action_whose_module_cannot_be_imported_is_a_reload_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.kit import plugins

    monkeypatch.setitem(plugins.ACTIONS, "rollout", "sidecar.no_such_module:RolloutAction")
    with pytest.raises(ReloadError, match="not available"):
        make_action(consumer(reload={"rollout": {"name": "api"}}))


# ---------------------------------------------------------------- waiting and health


async def test_wait_exit_returns_as_soon_as_the_process_exits(procs: Procs) -> None:
    child = await procs.child("a")
    assert await wait_exit(child.pid, 0.1) is False
    child.terminate()
    started = time.monotonic()
    assert await wait_exit(child.pid, 5) is True
    assert time.monotonic() - started < 1
    await child.wait()


async def test_alive_for_passes_for_a_process_that_stays_up(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(health={"alive_for": 0.2})
    started = time.monotonic()
    got = await check_health(
        cons.health, pid=child.pid, new_pid=None, replaced=False, match=cons.match, old=set(), find=lambda m: []
    )
    assert got == child.pid
    assert time.monotonic() - started >= 0.2


async def test_alive_for_fails_early_for_a_process_that_exits(procs: Procs) -> None:
    child = await procs.child("a", "exit-soon")
    cons = consumer(health={"alive_for": 5})
    started = time.monotonic()
    with pytest.raises(ReloadError, match="exited"):
        await check_health(
            cons.health, pid=child.pid, new_pid=None, replaced=False, match=cons.match, old=set(), find=lambda m: []
        )
    assert time.monotonic() - started < 4


async def test_alive_for_follows_the_replacement_that_a_keeper_starts(procs: Procs) -> None:
    await procs.keeper("svc")
    pidfile = procs.tmp / "svc.pid"
    old = int(pidfile.read_text())
    await until(lambda: is_alive(old))
    cons = consumer(match={"pidfile": str(pidfile)}, reload={"restart": {"timeout": 5}}, health={"alive_for": 0.1})
    action = make_action(cons)
    assert await action.reload(old) is None
    from daemon.usage.consumers import find_processes

    got = await check_health(
        cons.health, pid=old, new_pid=None, replaced=True, match=cons.match, old={old}, find=find_processes
    )
    assert got is not None and got != old and is_alive(got)


async def test_a_missing_replacement_fails_the_health_check_after_the_timeout(procs: Procs) -> None:
    child = await procs.child("a")
    cons = consumer(health={"alive_for": 0.1, "timeout": 0.3})
    with pytest.raises(ReloadError, match="no replacement"):
        await check_health(
            cons.health,
            pid=child.pid,
            new_pid=None,
            replaced=True,
            match=cons.match,
            old={child.pid},
            find=lambda m: [],
        )


async def test_the_http_check_passes_on_2xx_and_fails_on_5xx_after_the_timeout(procs: Procs) -> None:
    port = await procs.http()
    await check_http(f"http://127.0.0.1:{port}/ok", within=5)
    started = time.monotonic()
    with pytest.raises(ReloadError, match="status 503") as err:
        await check_http(f"http://user:hunter2@127.0.0.1:{port}/bad", within=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert "hunter2" not in str(err.value)


async def test_the_http_check_fails_when_nothing_listens() -> None:
    with pytest.raises(ReloadError, match="failed"):
        await check_http("http://127.0.0.1:9/", within=0.2)


async def test_the_polling_fallback_of_wait_exit_sees_an_exit(procs: Procs) -> None:
    from daemon.reload.processes import poll_exit

    child = await procs.child("a")
    assert await poll_exit(child.pid, 0.1) is False
    child.terminate()
    assert await poll_exit(child.pid, 5) is True
    await child.wait()


# ---------------------------------------------------------------- pid reuse


def no_kill_by_number(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Make os.kill fail loudly: a signal by pid number could reach a recycled pid."""
    calls: list[tuple[int, int]] = []

    def refuse(pid: int, sig: int) -> None:
        calls.append((pid, sig))
        raise AssertionError(f"os.kill({pid}, {sig}) used: signals must go through a pidfd")

    monkeypatch.setattr(os, "kill", refuse)
    return calls


async def test_a_restart_signals_and_kills_through_a_pidfd_not_the_pid_number(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = await procs.child("a", "ignore-term")
    action = RestartAction(consumer(reload={"restart": {"timeout": 0.2}}))
    with monkeypatch.context() as m:
        calls = no_kill_by_number(m)
        await action.reload(child.pid)
    assert calls == []
    assert await child.wait() == -signal.SIGKILL


async def test_the_signal_action_signals_through_a_pidfd(procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    child = await procs.child("a")
    action = SignalAction(consumer(reload={"signal": "HUP"}))
    with monkeypatch.context() as m:
        calls = no_kill_by_number(m)
        await action.reload(child.pid, started=psutil.Process(child.pid).create_time())
    assert calls == []
    await until(lambda: lines(procs.tmp / "a.log", "hup"))


async def test_the_signal_action_refuses_a_pid_that_now_belongs_to_another_process(procs: Procs) -> None:
    # The child stands in for a process that got a recycled pid: its start time is not the snapshot's.
    child = await procs.child("a")
    snapshot = psutil.Process(child.pid).create_time() - 60
    action = SignalAction(consumer(reload={"signal": "HUP"}))
    with pytest.raises(ReloadGone, match="gone"):
        await action.reload(child.pid, started=snapshot)
    await action.reload(child.pid, started=snapshot + 60)  # the right process is signalled
    await until(lambda: lines(procs.tmp / "a.log", "hup"))
    assert len(lines(procs.tmp / "a.log", "hup")) == 1


async def test_a_restart_leaves_a_pid_that_now_belongs_to_another_process_running(procs: Procs) -> None:
    child = await procs.child("a")
    snapshot = psutil.Process(child.pid).create_time() - 60
    action = RestartAction(consumer(reload={"restart": {"timeout": 5}}))
    with pytest.raises(ReloadGone):
        await action.reload(child.pid, started=snapshot)
    assert is_alive(child.pid) and lines(procs.tmp / "a.log", "term") == []


async def test_stop_process_falls_back_to_pid_numbers_without_pidfd_open(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = await procs.child("a", "ignore-term")

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open not implemented")

    with monkeypatch.context() as m:
        m.setattr(os, "pidfd_open", no_pidfd)
        await stop_process(child.pid, stop_signal=signal.SIGTERM, grace=0.2)
    assert await child.wait() == -signal.SIGKILL
