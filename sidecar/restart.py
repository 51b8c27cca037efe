"""The ``container_restart`` reload action: stop a container's main process; the kubelet starts it again.

The pod shares one PID namespace (``shareProcessNamespace: true``), so the
sidecar sees the app container's processes. Given a pid found by the
consumer's match, the action climbs to the container's main process (the
highest ancestor still inside the same PID namespace whose parent is outside
it, or is the namespace's init, e.g. the pause process), sends the stop signal,
and escalates to SIGKILL after the timeout. It never signals itself, one of its
own ancestors, or a PID namespace's init.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from daemon.config import ConsumerConfig
from daemon.errors import ReloadError
from daemon.reload.actions import ReloadAction

log = logging.getLogger(__name__)


def _ns_pid(pid: int) -> int | None:
    """The pid as the process's own innermost PID namespace sees it (last field of NSpid)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def main_process(pid: int) -> int:
    """The main process of the container that holds ``pid``. Blocking (reads /proc)."""
    try:
        proc = psutil.Process(pid)
        ns = _pid_ns(pid)
        if _ns_pid(pid) == 1:
            raise ReloadError(f"pid {pid} is the init of its PID namespace; refusing to stop it")
        while True:
            ppid = proc.ppid()
            if ppid == 0:  # the parent is outside our view: a container's main process
                return proc.pid
            if ns is not None and _pid_ns(ppid) not in (ns, None):
                return proc.pid
            if _ns_pid(ppid) == 1:  # the parent is the namespace's init (pause, tini)
                return proc.pid
            proc = psutil.Process(ppid)
    except psutil.NoSuchProcess:
        raise ReloadError(f"pid {pid} exited before it could be restarted") from None
    except psutil.AccessDenied as e:
        raise ReloadError(f"no permission to inspect pid {pid}") from e


def _ancestors_of_self() -> set[int]:
    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return pids


class ContainerRestart:
    """Reload action ``container_restart``: ``reload(pid)`` stops the container's main process."""

    def __init__(self, *, stop_signal: str = "SIGTERM", timeout: float = 30.0) -> None:
        self.stop_signal = signal.Signals[stop_signal]
        self.timeout = timeout

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> ContainerRestart:
        """From ``reload.container_restart`` of a consumer: optional ``stop_signal`` and ``timeout``."""
        opts = dict(options or {})
        return cls(stop_signal=str(opts.get("stop_signal", "SIGTERM")), timeout=float(opts.get("timeout", 30.0)))

    async def reload(self, pid: int, *, started: float | None = None) -> None:
        if not await asyncio.to_thread(psutil.pid_exists, pid):
            # Gone already: most often a second pid of a container this batch just
            # restarted. The kubelet starts it again either way.
            log.info("process already gone; nothing to stop", extra={"pid": pid})
            return
        main = await asyncio.to_thread(main_process, pid)
        await asyncio.to_thread(self._stop, main)

    def _stop(self, pid: int) -> None:
        if pid in _ancestors_of_self():
            raise ReloadError(f"pid {pid} is Baton itself or its parent; refusing to stop it")
        try:
            proc = psutil.Process(pid)
            log.info("stopping container main process", extra={"pid": pid, "signal": self.stop_signal.name})
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(self.timeout)
                return
            except psutil.TimeoutExpired:
                log.warning("main process ignored the stop signal; killing it", extra={"pid": pid})
            proc.kill()
            proc.wait(10.0)
        except psutil.NoSuchProcess:
            return  # already gone: the kubelet restarts it all the same
        except psutil.AccessDenied as e:
            raise ReloadError(f"no permission to signal pid {pid}") from e
        except psutil.TimeoutExpired as e:
            raise ReloadError(f"pid {pid} did not exit after SIGKILL") from e

    async def aclose(self) -> None:
        return None


class ContainerRestartAction(ContainerRestart, ReloadAction):
    """The ``container_restart`` reload action as daemon.reload.reloader builds it: ``Cls(consumer)``."""

    replaces = True  # the kubelet starts the replacement; the health check looks for it

    def __init__(self, consumer: ConsumerConfig) -> None:
        opts = dict(consumer.reload.container_restart or {})
        super().__init__(stop_signal=str(opts.get("stop_signal", "SIGTERM")), timeout=float(opts.get("timeout", 30.0)))
