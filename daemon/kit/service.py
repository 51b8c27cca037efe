"""One lifecycle for every long-running role: the agent, the rotator and ``baton exec``.

Readable top to bottom, as uvicorn's server is: ``serve() -> startup() ->
main_loop() -> shutdown()``. This base owns what every role shares: the
signals (the first SIGTERM/SIGINT asks to stop, a second forces it; SIGHUP
asks to re-read the config), the sd_notify protocol around them (``READY=1``,
``STATUS=``, ``WATCHDOG=1`` from the event loop at half ``WATCHDOG_USEC``,
``RELOADING=1``, ``STOPPING=1``), and the root tasks: each is named and
guarded, as kopf's ``run_tasks`` does it, so a task that ends or fails is
logged and the service stops cleanly instead of limping on half-alive.

Self-contained on purpose (it will move to a kit of its own): it knows nothing
of agents, rotators, stores or credentials, and imports none of them. It must
never wait without a bound on the way out, nor put a secret in ``STATUS=``
(subclasses pass names, counts and version ids only).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, ClassVar

from daemon.kit import sdnotify
from daemon.kit.tasks import cancel_all

log = logging.getLogger(__name__)


class Service:
    """Subclass and fill in ``startup()``, ``reload()``, ``shutdown()`` and ``status_line()``.

    ``await service.serve()`` runs it until stopped and returns the exit status:
    0 after a requested stop, 1 when a root task failed or ended unexpectedly
    (systemd's ``Restart=on-failure`` or the kubelet then starts it again).
    """

    #: The role's name in logs ("agent", "rotator", "exec").
    role: ClassVar[str] = "service"
    #: Seconds the root tasks get to end once cancelled, and each close in ``shutdown()``.
    stop_grace: ClassVar[float] = 5.0
    #: Seconds the whole of ``shutdown()`` may take, well inside systemd's TimeoutStopSec=15.
    stop_timeout: ClassVar[float] = 10.0
    #: Seconds between two refreshes of the STATUS= line (sent only when it changed).
    status_every: ClassVar[float] = 5.0

    def __init__(self, *, install_signals: bool = True) -> None:
        self.install_signals = install_signals
        self.should_exit = asyncio.Event()
        self.should_reload = asyncio.Event()
        # Set once READY=1 was sent: a reload before that must not announce readiness.
        self.ready = asyncio.Event()
        self.force_exit = False
        self._forced = asyncio.Event()
        self.failed: BaseException | None = None
        self.status_text: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requests = 0
        self._signals: list[signal.Signals] = []

    # ------------------------------------------------------------ lifecycle

    async def serve(self) -> int:
        """Run until stopped; the process exit status."""
        self._install_signal_handlers()
        try:
            try:
                await self.startup()
                if (interval := sdnotify.watchdog_interval()) is not None:
                    self.spawn("watchdog", self._watchdog(interval / 2))
                self.spawn("status", self._refresh_status())
                await self.main_loop()
            finally:
                sdnotify.stopping()
                await self._shutdown_bounded()
        finally:
            self._remove_signal_handlers()
        return self.exit_code()

    async def startup(self) -> None:
        """Open what the role needs and ``spawn()`` its root tasks; call ``announce_ready()`` when ready."""

    async def main_loop(self) -> None:
        """Wait for a stop; re-read the config on each SIGHUP in between."""
        while not self.should_exit.is_set():
            if not await self._until(self.should_reload.wait()):
                return
            self.should_reload.clear()
            was_ready = self.ready.is_set()
            if was_ready:
                sdnotify.reloading()
            try:
                # A stop during a reload wins: the reload is cancelled, not waited for.
                await self._until(self.reload())
            except Exception:
                log.exception("config reload failed; the old config keeps running", extra={"role": self.role})
            if was_ready and not self.should_exit.is_set():
                sdnotify.ready(self.status_line())

    async def reload(self) -> None:
        """SIGHUP: re-read the config. A bad config is refused and the old one keeps running."""
        log.warning("SIGHUP ignored: this role has no config to re-read", extra={"role": self.role})

    async def shutdown(self) -> None:
        """Close what ``startup()`` opened, each close bounded (``daemon.kit.tasks.close_bounded``).

        Runs after the root tasks were cancelled; subclasses call ``await super().shutdown()`` first.
        """
        tasks, self._tasks = self._tasks, []
        await cancel_all(tasks, self.close_limit)

    def exit_code(self) -> int:
        return 1 if self.failed is not None else 0

    # ------------------------------------------------------------ requests (signals, tests, the demo)

    def request_stop(self) -> None:
        """The first request stops gracefully; a second one forces it (root tasks cancelled now)."""
        self._stop_requests += 1
        if self._stop_requests > 1 and not self.force_exit:
            log.warning("second stop signal: exiting at once", extra={"role": self.role})
            self.force_exit = True
            self._forced.set()
            for t in self._tasks:
                t.cancel()
        self.should_exit.set()

    def request_reload(self) -> None:
        self.should_reload.set()

    @property
    def close_limit(self) -> float:
        """How long each close may take: the grace, or next to nothing once a stop was forced."""
        return 0.5 if self.force_exit else self.stop_grace

    # ------------------------------------------------------------ systemd

    def announce_ready(self) -> None:
        """``READY=1`` with the current STATUS= line; units ordered after this one start now."""
        self.ready.set()
        self.status_text = self.status_line()
        sdnotify.ready(self.status_text)

    def status_line(self) -> str:
        """One line for ``systemctl status``: what the role is doing. Names and counts only."""
        return f"{self.role} running"

    def refresh_status(self) -> None:
        """Send ``STATUS=`` when the line changed since the last one sent."""
        text = self.status_line()
        if text != self.status_text:
            self.status_text = text
            sdnotify.status(text)

    # ------------------------------------------------------------ root tasks

    def spawn(self, name: str, coro: Coroutine[Any, Any, None], *, may_end: bool = False) -> asyncio.Task[None]:
        """Start a named, guarded root task.

        A failure always stops the service (exit status 1). A task that returns stops
        it too, unless ``may_end`` (a one-shot job such as announcing readiness).
        """

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("task failed; stopping", extra={"task": name, "role": self.role})
                self.failed = e
                self.should_exit.set()
                return
            if not may_end and not self.should_exit.is_set():
                log.error("task ended unexpectedly; stopping", extra={"task": name, "role": self.role})
                self.failed = RuntimeError(f"task {name} ended")
                self.should_exit.set()

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.append(task)
        task.add_done_callback(self._forget)
        return task

    async def cancel_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel some root tasks (a config reload replacing them), bounded."""
        await cancel_all(tasks, self.close_limit)

    def _forget(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    # ------------------------------------------------------------ internals

    async def _until(self, coro: Coroutine[Any, Any, Any]) -> bool:
        """Run ``coro`` unless a stop comes first; True when it finished, False on a stop."""
        work = asyncio.create_task(coro, name=f"{self.role}-main")
        stop = asyncio.create_task(self.should_exit.wait(), name=f"{self.role}-wait-exit")
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                await cancel_all([work], self.close_limit)
        if work.done() and not work.cancelled():
            work.result()  # a reload's error reaches main_loop, which logs it
            return True
        return False

    async def _shutdown_bounded(self) -> None:
        # A second signal during shutdown ends the wait for it: forced means now.
        closing = asyncio.create_task(self.shutdown(), name=f"{self.role}-shutdown")
        forced = asyncio.create_task(self._forced.wait(), name=f"{self.role}-forced")
        try:
            done, _ = await asyncio.wait(
                [closing, forced], timeout=self.stop_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if closing not in done:
                log.error("shutdown did not finish in time; exiting anyway", extra={"role": self.role})
        finally:
            forced.cancel()
            await cancel_all([closing, forced], 0.5)
        if closing.done() and not closing.cancelled() and (e := closing.exception()) is not None:
            log.error("shutdown failed", extra={"role": self.role, "error": repr(e)})

    async def _watchdog(self, every: float) -> None:
        # A ping from a task on the event loop proves the loop still turns.
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(every)

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(self.status_every)
            self.refresh_status()

    def _install_signal_handlers(self) -> None:
        if not self.install_signals:
            return
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            loop.add_signal_handler(sig, handler)
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()
