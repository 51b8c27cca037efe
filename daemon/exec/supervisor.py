"""The child process of ``baton exec``: start it, restart it with a new environment, pass signals on.

Owns one child at a time and the signals Baton receives while it runs one.
SIGHUP, SIGUSR1 and SIGUSR2 are passed to the child; SIGTERM and SIGINT are
passed too and end supervision: ``wait()`` then returns the child's exit status
(128+N for a child killed by signal N, as a shell reports it). A child that
exits by itself ends supervision the same way. A restart (new credential
version) stops the child with ``stop_signal``, sends SIGKILL after ``grace``
seconds, and starts it again with the new environment.

Knows nothing of stores or writers: the caller renders the environment. Must
never log the environment (it carries secrets) nor the arguments (they may);
only argv[0] and pids are logged. Baton's own store tokens (``SCRUBBED_ENV``)
are not passed to the child unless the caller hands them over explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from daemon.errors import SupervisorError
from daemon.kit.logs import event

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
ENDING = (signal.SIGINT, signal.SIGTERM)
# Credentials Baton itself may have been started with: they are Baton's, not the child's.
SCRUBBED_ENV = (
    "VAULT_TOKEN",
    "VAULT_SECRET_ID",
    "VAULT_ROLE_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "KUBECONFIG",
)


def exit_status(returncode: int) -> int:
    """A shell's view of a child's end: the exit code, or 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Run ``argv`` as a child, restart it on demand, end with its exit status.

    The child runs in its own process group, so a Ctrl-C on a terminal reaches
    it once, through us, rather than twice.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stop_signal: str | signal.Signals = signal.SIGTERM,
        grace: float = 10.0,
        base_env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if not argv:
            raise SupervisorError("exec needs a command")
        self.argv = list(argv)
        self.stop_signal = stop_signal if isinstance(stop_signal, signal.Signals) else signal.Signals[stop_signal]
        self.grace = grace
        self.base_env = (
            dict(base_env) if base_env is not None else {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        )
        self.cwd = cwd
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._replaced: set[asyncio.subprocess.Process] = set()
        self._ending = False
        self._lock = asyncio.Lock()
        self._done: asyncio.Future[int] | None = None
        self._killer: asyncio.Task[None] | None = None
        self._handlers: list[signal.Signals] = []

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    @property
    def ending(self) -> bool:
        """True once supervision is ending (SIGTERM/SIGINT, ``stop()``, or the child exited)."""
        return self._ending or (self._done is not None and self._done.done())

    # ---------------------------------------------------------------- lifecycle

    async def start(self, env: Mapping[str, str]) -> int:
        """Start the child with ``base_env`` plus ``env``; return its pid."""
        async with self._lock:
            return await self._start(env)

    async def restart(self, env: Mapping[str, str]) -> int | None:
        """Stop the child (stop_signal, SIGKILL after grace) and start it with ``env``.

        Returns the new pid, or None when supervision is ending (then nothing is started).
        """
        async with self._lock:
            if self.ending:
                return None
            proc = self._proc
            if proc is not None and proc.returncode is None:
                # Marked before the signal: its exit is ours, not the end of supervision.
                self._replaced.add(proc)
                await self._stop(proc, self.stop_signal)
                if self._ending:
                    # SIGTERM arrived while the old child stopped: end with its status.
                    self._resolve(exit_status(proc.returncode or 0))
                    return None
            self.restarts += 1
            event(log, "exec_restart", pid_before=proc.pid if proc else None, restarts=self.restarts)
            return await self._start(env)

    async def stop(self) -> int:
        """End supervision: stop the child (stop_signal, SIGKILL after grace); its exit status."""
        self._ending = True
        async with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                await self._stop(proc, self.stop_signal)
        return await self.wait()

    async def wait(self) -> int:
        """Wait until supervision ends; the child's exit status."""
        if self._done is None:
            raise SupervisorError("the child was never started")
        return await asyncio.shield(self._done)

    async def aclose(self) -> None:
        """Stop the child if it still runs, and give the signals back."""
        self.remove_signal_handlers()
        if self._proc is not None and self._proc.returncode is None:
            self._ending = True
            await self._stop(self._proc, self.stop_signal)
        for task in (self._watch, self._killer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ---------------------------------------------------------------- signals

    def install_signal_handlers(self) -> None:
        """Handle SIGHUP/SIGINT/SIGTERM/SIGUSR1/SIGUSR2 on the running loop by passing them on."""
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, sig)
            self._handlers.append(sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._handlers:
            loop.remove_signal_handler(sig)
        self._handlers.clear()

    def forward(self, sig: signal.Signals) -> None:
        """Pass ``sig`` to the child; SIGTERM/SIGINT also end supervision (SIGKILL after grace)."""
        self._on_signal(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if sig in ENDING:
            self._ending = True
        if proc is None or proc.returncode is not None:
            return
        log.info("passing %s to pid %d", sig.name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if sig in ENDING and self._killer is None:
            self._killer = asyncio.get_running_loop().create_task(self._kill_after(proc), name="exec-kill")

    async def _kill_after(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(proc.wait(), self.grace)
        except TimeoutError:
            log.warning("pid %d still running %.1fs after a stop signal; sending SIGKILL", proc.pid, self.grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    # ---------------------------------------------------------------- internals

    async def _start(self, env: Mapping[str, str]) -> int:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env={**self.base_env, **env},
                cwd=self.cwd,
                process_group=0,
            )
        except OSError as e:
            raise SupervisorError(f"cannot start {self.argv[0]}: {e.strerror}") from e
        self._proc = proc
        self._watch = asyncio.get_running_loop().create_task(self._watch_child(proc), name="exec-child")
        event(log, "exec_started", pid=proc.pid, command=self.argv[0])
        return proc.pid

    async def _stop(self, proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), self.grace)
        except TimeoutError:
            log.warning("pid %d ignored %s for %.1fs; sending SIGKILL", proc.pid, sig.name, self.grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _watch_child(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc in self._replaced:
            self._replaced.discard(proc)
            return  # a restart stopped it on purpose
        event(log, "exec_exited", pid=proc.pid, status=exit_status(code))
        self._ending = True
        self._resolve(exit_status(code))

    def _resolve(self, status: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(status)
