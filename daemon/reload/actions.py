"""Reload actions: how a consumer's processes learn about a new credential version.

signal, exec, restart, systemd, none here; container_restart and rollout live in
``sidecar``. An action is chosen by name from ``daemon.kit.plugins.ACTIONS``
("module:Class", imported lazily) and constructed as ``Cls(consumer: ConsumerConfig)``.
Actions whose class attribute ``per_consumer`` is true (systemd, and any that acts on a whole
workload) are called once per roll with the first of the consumer's processes
still running. When no process is found (or all have exited since) the roll is
skipped as ``no_processes``, unless the action sets ``needs_process =
False`` (a rollout of a remote workload): it is then called with pid 0, which it
must never treat as a process. ``replaces = True`` says the action stops the
process and something else starts the replacement (the health check looks for it).
``checks_start = True`` says ``reload(pid, *, started=...)`` takes the start time
seen when the pid was found and refuses (``ReloadGone``) a pid that has another
one; such actions signal through a pidfd opened before that check. Must never
signal a pid that was recycled since it was found.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import psutil

from daemon.config import ConsumerConfig
from daemon.errors import PluginError, ReloadError, ReloadGone
from daemon.kit import plugins
from daemon.model import CredentialName, VersionId
from daemon.reload.processes import (
    open_pidfd,
    recycled,
    run_command,
    safe_env,
    send_signal,
    spawn_detached,
    stop_process,
)
from daemon.usage.consumers import unit_of

log = logging.getLogger(__name__)

# systemctl waits for the job; systemd's own default stop timeout is 90 s.
SYSTEMCTL_TIMEOUT = 120.0


# What the roll being run is for (credential -> version), set by the Reloader around each
# ``reload`` call. An action on a workload that many nodes share (``rollout``) acts once per
# change across them with it; the others need not look.
roll_versions: ContextVar[Mapping[CredentialName, VersionId]] = ContextVar(
    "roll_versions", default=MappingProxyType({})
)


@runtime_checkable
class ReloadAction(Protocol):
    """A reload action; its capability flags default here (an action subclasses this to inherit them).

    The flags are plain attributes, not ClassVars: ``exec`` acts per consumer only
    when its argv has no ``{pid}``, and ``systemd`` replaces the process only for
    ``restart`` (both set theirs per instance, from the consumer's config).
    """

    per_consumer: bool = False  # called once per roll, with the first live process
    needs_process: bool = True  # False: called with pid 0 when no process is found (a remote workload)
    replaces: bool = False  # the process is stopped and something else starts its replacement
    checks_start: bool = False  # refuses (ReloadGone) a pid whose start time is not ``started``

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        """Make ``pid`` use the new version; the new pid if the action started a replacement itself.

        ``started`` is the start time seen when the pid was found (None for a per-consumer call).
        """
        ...

    async def aclose(self) -> None: ...


class SignalAction(ReloadAction):
    """Send the configured signal to each process (``nginx`` SIGHUP, ...)."""

    per_consumer = False
    checks_start = True

    def __init__(self, consumer: ConsumerConfig) -> None:
        assert consumer.reload.signal is not None
        self.signal = signal.Signals[consumer.reload.signal]

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        """Signal ``pid`` through a pidfd; ReloadGone when it exited or is no longer the one started at ``started``."""
        try:
            fd = open_pidfd(pid)
        except ProcessLookupError:
            raise ReloadGone(f"pid {pid} is gone") from None
        try:
            if recycled(pid, started) is not False or not send_signal(pid, fd, self.signal):
                raise ReloadGone(f"pid {pid} is gone")
        finally:
            if fd is not None:
                os.close(fd)
        return None

    async def aclose(self) -> None:
        pass


class ExecAction(ReloadAction):
    """Run an argv. ``{pid}`` in an argument makes it run once per process, else once per consumer.

    The command gets a scrubbed environment plus ``BATON_CONSUMER`` and
    ``BATON_PID``; it must finish within the consumer's ``health.timeout``.
    """

    def __init__(self, consumer: ConsumerConfig) -> None:
        assert consumer.reload.exec is not None
        self.argv = list(consumer.reload.exec)
        self.consumer = consumer.name
        self.timeout = consumer.health.timeout
        self.per_consumer = not any("{pid}" in a for a in self.argv)

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        argv = [a.replace("{pid}", str(pid)) for a in self.argv]
        env = safe_env({"BATON_CONSUMER": self.consumer, "BATON_PID": str(pid)})
        await run_command(argv, env=env, limit=self.timeout)
        return None

    async def aclose(self) -> None:
        pass


class RestartAction(ReloadAction):
    """Stop each process (stop_signal, SIGKILL after timeout); start it again when ``command`` is set.

    Without a command, something else (systemd, a supervisor, the kubelet)
    starts the replacement, and the health check looks for it. With a command,
    this is a supervised restart: the new process runs detached with a scrubbed
    environment in the old process's working directory, and its pid is returned.
    """

    per_consumer = False
    replaces = True
    checks_start = True

    def __init__(self, consumer: ConsumerConfig) -> None:
        cfg = consumer.reload.restart
        assert cfg is not None
        self.stop_signal = signal.Signals[cfg.stop_signal]
        self.timeout = cfg.timeout
        self.command = list(cfg.command) if cfg.command else None
        self.consumer = consumer.name

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        """Stop ``pid`` (if it is still the process started at ``started``) and start the command."""
        env = safe_env({"BATON_CONSUMER": self.consumer})
        if self.command and shutil.which(self.command[0], path=env["PATH"]) is None:
            # Checked before stopping anything: a typo must not take a service down.
            raise ReloadError(f"restart command not found: {self.command[0]}")
        cwd = await asyncio.to_thread(_cwd_of, pid)
        await stop_process(pid, stop_signal=self.stop_signal, grace=self.timeout, started=started)
        if self.command is None:
            return None
        return await spawn_detached(self.command, env=env, cwd=cwd)

    async def aclose(self) -> None:
        pass


def _cwd_of(pid: int) -> str | None:
    """The process's working directory for its replacement; None (Baton's) when unreadable or gone."""
    try:
        cwd = psutil.Process(pid).cwd()
    except psutil.Error:
        return None
    return cwd if cwd and os.path.isdir(cwd) else None


class SystemdAction(ReloadAction):
    """``systemctl try-restart|reload UNIT``, once per consumer.

    The unit is ``match.systemd_unit``, else the unit whose cgroup holds the
    first process found.
    """

    per_consumer = True

    def __init__(self, consumer: ConsumerConfig) -> None:
        assert consumer.reload.systemd is not None
        self.verb = "try-restart" if consumer.reload.systemd == "restart" else "reload"
        self.unit = consumer.match.systemd_unit
        self.timeout = SYSTEMCTL_TIMEOUT
        self.replaces = self.verb == "try-restart"

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        unit = self.unit
        if unit is None and pid > 0:
            unit = await asyncio.to_thread(unit_of, pid)
        if unit is None:
            raise ReloadError(f"no systemd unit found for pid {pid}")
        await run_command(["systemctl", self.verb, unit], env=safe_env(), limit=self.timeout)
        return None

    async def aclose(self) -> None:
        pass


class NoneAction(ReloadAction):
    """Do nothing: the consumer re-reads its files by itself."""

    per_consumer = True

    def __init__(self, consumer: ConsumerConfig) -> None:
        pass

    async def reload(self, pid: int, *, started: float | None = None) -> int | None:
        return None

    async def aclose(self) -> None:
        pass


def make_action(consumer: ConsumerConfig) -> ReloadAction:
    """Construct the consumer's action from ``daemon.kit.plugins.ACTIONS``, importing its module only now."""
    name = consumer.reload.action
    try:
        cls = plugins.load(plugins.ACTIONS, name, kind="reload action")
    except PluginError as e:
        raise ReloadError(str(e)) from e
    action: ReloadAction = cls(consumer)
    return action
