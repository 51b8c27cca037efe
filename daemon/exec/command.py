"""``baton exec``: run one command with a credential, restart it when the credential changes.

Like ``consul-template -exec`` or ``envconsul``: the credential's files are
written as the agent writes them, its ``output.env`` templates become the
child's environment, and a new version restarts the child (stop signal, SIGKILL
after the timeout). Signals Baton receives are passed on. The environment is
never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from daemon.config import Config
from daemon.errors import BatonError, PayloadError, RenderUnavailable, StoreError, SupervisorError
from daemon.exec.supervisor import Supervisor
from daemon.files.renderworker import RenderWorker
from daemon.files.writer import Writer
from daemon.kit import metrics
from daemon.kit.backoff import Backoff
from daemon.kit.logs import bound, event
from daemon.kit.service import Service
from daemon.kit.tasks import close_bounded
from daemon.stores import open_store

log = logging.getLogger(__name__)


class Exec(Service):
    """``baton exec`` on the shared lifecycle: one root task follows the credential, one waits for the child.

    Signals are the supervisor's, not this service's: SIGHUP, SIGUSR1/2 go to the
    child as they would without Baton in between, and SIGTERM/SIGINT go to the
    child too, whose exit (SIGKILL after the grace) ends the service with its
    status. A child that could not be started, or a restart that failed, ends
    it with status 1.
    """

    role = "exec"

    def __init__(self, config: Config, *, credential: str, argv: list[str]) -> None:
        super().__init__(install_signals=False)
        self.config = config
        self.cred = config.credential(credential)
        restart = next((c.reload.restart for c in self.cred.consumers if c.reload.restart is not None), None)
        self.sup = Supervisor(
            argv,
            stop_signal=restart.stop_signal if restart else "SIGTERM",
            grace=restart.timeout if restart else 10.0,
        )
        self.store = open_store(config)
        self.writer = Writer(self.cred.output)
        # Renders in a killable child process, as the agent does: a runaway template is killed.
        self.renderer = RenderWorker()
        self.version: str | None = None
        self.child_status: int | None = None

    async def startup(self) -> None:
        await asyncio.to_thread(self.writer.recover)
        # It ends only when supervision does (a restart found the child ending); the child's task decides then.
        self.spawn(f"exec-follow:{self.cred.name}", self.follow(), may_end=True)

    async def shutdown(self) -> None:
        if self.child_status is None and self.sup.pid is not None:
            # Following the credential ended (a restart could not start the command):
            # say why, stop what runs, and fail rather than hang.
            error = self.failed
            event(log, "exec_failed", logging.ERROR, error=str(error) if error else "stopped following")
            with contextlib.suppress(BatonError, TimeoutError):
                await asyncio.wait_for(self.sup.stop(), self.sup.grace + 5)
        await super().shutdown()
        self.sup.remove_signal_handlers()
        await close_bounded(self.sup.aclose(), "child", self.sup.grace + 5)
        await close_bounded(self.store.aclose(), "store", self.close_limit)
        await close_bounded(self.renderer.aclose(), "render worker", self.close_limit)

    def exit_code(self) -> int:
        return self.child_status if self.child_status is not None else 1

    def status_line(self) -> str:
        pid = self.sup.pid
        running = f"pid {pid}" if pid is not None else "no child running"
        return f"exec {self.cred.name} version {self.version or '-'}: {running}, {self.sup.restarts} restarts"

    async def follow(self) -> None:
        cred, store, sup = self.cred, self.store, self.sup
        backoff = Backoff(self.config.agent.retry_min, self.config.agent.retry_max)
        with bound(credential=cred.name):
            while True:
                try:
                    async for info in store.watch(cred.key):
                        if info.id == self.version:
                            continue
                        limits = self.config.agent
                        try:
                            secret = await store.read(cred.key, info.id)
                            rendered = await self.renderer.render(
                                files=cred.output.files,
                                env=cred.output.env,
                                payload=secret.payload,
                                time_limit=limits.render_timeout,
                                max_bytes=limits.max_file_size,
                            )
                            env = rendered.env
                            await asyncio.to_thread(self.writer.write, info.id, rendered.files)
                        except PayloadError as e:
                            metrics.payload_rejected_total.labels(cred.name, e.reason).inc()
                            event(
                                log, "version_rejected", logging.ERROR, version=info.id, reason=e.reason, error=str(e)
                            )
                            continue
                        except (StoreError, RenderUnavailable):
                            raise  # an outage, not this version's fault: back off and try it again
                        except (BatonError, OSError) as e:
                            event(log, "version_rejected", logging.ERROR, version=info.id, error=str(e))
                            continue
                        except Exception as e:
                            # One version's surprise must not stop the command: name the kind,
                            # never the message (it may quote the value), and follow on.
                            event(log, "version_rejected", logging.ERROR, version=info.id, error=type(e).__name__)
                            continue
                        self.version = info.id
                        if not self.ready.is_set():
                            try:
                                await sup.start(env)
                            except SupervisorError as e:
                                event(log, "exec_failed", logging.ERROR, error=str(e))
                                self.failed = e
                                self.should_exit.set()
                                return
                            sup.install_signal_handlers()
                            self.spawn("exec-child", self._child())
                            self.announce_ready()
                        elif await sup.restart(env) is None:
                            return  # supervision is ending: the child's task ends the service
                        self.refresh_status()
                        backoff.reset()
                except (StoreError, RenderUnavailable) as e:
                    delay = backoff.next()
                    log.warning(
                        "store or render worker unavailable; the child keeps running",
                        extra={"error": str(e), "retry_in": delay},
                    )
                    await asyncio.sleep(delay)

    async def _child(self) -> None:
        self.child_status = await self.sup.wait()
        self.should_exit.set()  # the child's end is the end of exec, not a failure


def run_exec(config: Config, *, credential: str, argv: list[str]) -> int:
    return asyncio.run(Exec(config, credential=credential, argv=argv).serve())
