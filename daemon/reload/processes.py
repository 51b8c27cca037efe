"""Processes Baton acts on: liveness, pidfd signalling, waiting for an exit, stopping, starting.

Owns the low-level process work the reload actions (daemon/reload/reloader.py) are made
of: a signal goes through a pidfd opened before the process is checked, so a
recycled pid is never signalled; exits are awaited on the pidfd (readable on
exit), with a slow poll only where the kernel or sandbox has no pidfd_open.
Must never: signal pid 0 or a negative pid (a process group), pass Baton's own
environment (store tokens) to a command it runs, log a command's output (it may
print secrets), or block the event loop for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence

import psutil

from daemon.errors import ReloadError, ReloadGone

log = logging.getLogger(__name__)

# Only these variables of Baton's own environment reach a command Baton runs:
# Baton may hold store credentials (VAULT_TOKEN, AWS_*) in its environment.
SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")

_POLL = 0.05  # interval for the few things that cannot be awaited (/proc)


def safe_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a command Baton runs: a few harmless variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
    env.setdefault("PATH", os.defpath)
    env.update(extra or {})
    return env


def is_alive(pid: int) -> bool:
    """Running and not a zombie (a zombie has exited; it only waits to be reaped)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    except psutil.Error:  # pragma: no cover - /proc unreadable: assume alive, the kill says more
        return True


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int, started: float | None) -> bool:
    """``pid`` is still the process that had start time ``started`` (alive, and not a recycled pid)."""
    return is_alive(pid) and start_time(pid) == started


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; None where the kernel or sandbox has no pidfd_open (pid numbers then).

    ProcessLookupError when the process is gone. Refuses pid <= 0 (groups).
    """
    if pid <= 0:
        raise ReloadError(f"refusing to signal pid {pid}")
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (OSError, AttributeError):
        return None


def send_signal(pid: int, fd: int | None, sig: signal.Signals) -> bool:
    """Send ``sig`` through the pidfd (by number only without one); False when the process is gone.

    A pidfd names one process: once it has exited, its recycled pid is out of reach.
    """
    try:
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as e:
        raise ReloadError(f"not allowed to send {sig.name} to pid {pid}") from e
    return True


def _exited(fd: int) -> bool:
    """The pidfd is readable: its process has exited (a zombie included)."""
    poller = select.poll()  # not select(): a busy agent's fds can pass FD_SETSIZE
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _wait_fd(fd: int, within: float) -> bool:
    """True when the pidfd's process exits within ``within`` seconds; awaited, nothing polls."""
    if _exited(fd):
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def _ready() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, _ready)
    try:
        await asyncio.wait_for(exited, within)
        return True
    except TimeoutError:
        return _exited(fd)
    finally:
        loop.remove_reader(fd)


async def wait_exit(pid: int, within: float) -> bool:
    """True when ``pid`` exits within ``within`` seconds (or is gone already).

    Awaits the process's pidfd, which becomes readable on exit, so nothing
    polls; kernels or sandboxes without pidfd_open fall back to a slow poll.
    """
    if not is_alive(pid):
        return True
    try:
        fd = open_pidfd(pid)
    except ProcessLookupError:
        return True
    if fd is None:
        return await poll_exit(pid, within)
    try:
        return await _wait_fd(fd, within)
    finally:
        os.close(fd)


async def poll_exit(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    delay = _POLL
    while is_alive(pid):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, 0.5)
    return True


async def first_exit(pids: Iterable[int], within: float) -> int | None:
    """The first of ``pids`` to exit within ``within`` seconds, or None when all stay alive."""
    tasks = {asyncio.ensure_future(wait_exit(p, within)): p for p in pids}
    try:
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.result():
                    return tasks[t]
        return None
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def recycled(pid: int, started: float | None) -> bool | None:
    """Whether ``pid`` now names another process than the one started at ``started``; None: gone.

    Called with a pidfd open: if the start time matches, that pidfd names the
    very process that was checked, however soon its pid is recycled afterwards.
    """
    born = start_time(pid)
    if born is None:
        return None
    return started is not None and born != started


async def _wait(pid: int, fd: int | None, within: float) -> bool:
    return await (_wait_fd(fd, within) if fd is not None else poll_exit(pid, within))


async def stop_process(pid: int, *, stop_signal: signal.Signals, grace: float, started: float | None = None) -> None:
    """``stop_signal``, then SIGKILL when the process is still there after ``grace`` seconds.

    Every signal and the wait go through one pidfd opened before the first
    signal, so the SIGKILL cannot reach a process that got the pid since.
    ``started``: the start time the caller saw; a pid with another one is
    ReloadGone and is left alone. A process already gone is not an error.
    """
    try:
        fd = open_pidfd(pid)
    except ProcessLookupError:
        return
    try:
        other = recycled(pid, started)
        if other is None:
            return
        if other:
            raise ReloadGone(f"pid {pid} is gone (the number now belongs to another process)")
        if not send_signal(pid, fd, stop_signal):
            return
        if await _wait(pid, fd, grace):
            return
        log.warning("pid %d ignored %s for %.1fs; sending SIGKILL", pid, stop_signal.name, grace)
        send_signal(pid, fd, signal.SIGKILL)
        if not await _wait(pid, fd, 10.0):
            raise ReloadError(f"pid {pid} survived SIGKILL")
    finally:
        if fd is not None:
            os.close(fd)


async def spawn_detached(argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None = None) -> int:
    """Start ``argv`` in a new session, not as our child; return its pid.

    A tiny ``sh`` starts it in the background and exits, so the process is
    reparented (to init or the nearest subreaper) and outlives Baton like a
    service would. Its stdout and stderr go to Baton's stderr (the journal).
    """
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise ReloadError(f"restart command not found: {argv[0]}")
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            '"$@" </dev/null >&2 & echo $!',
            "baton-restart",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise ReloadError(f"could not start {argv[0]}: {e.strerror}") from e
    out, _ = await proc.communicate()
    try:
        return int(out.split()[0])
    except (ValueError, IndexError):
        raise ReloadError(f"could not start {argv[0]} (sh exit {proc.returncode})") from None


async def run_command(argv: Sequence[str], *, env: Mapping[str, str], limit: float) -> None:
    """Run ``argv`` to completion; ReloadError when it runs longer than ``limit`` seconds or a non-zero exit.

    The output is read and dropped: it may hold secrets, so it is never logged.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
        )
    except OSError as e:
        raise ReloadError(f"cannot run {argv[0]}: {e.strerror}") from e
    try:
        await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ReloadError(f"{argv[0]} did not finish within {limit:.1f}s") from None
    if proc.returncode != 0:
        raise ReloadError(f"{argv[0]} exited with status {proc.returncode}")
