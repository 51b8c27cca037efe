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

from daemon.backoff import Backoff
from daemon.config import Config
from daemon.errors import BatonError, PayloadError, StoreError
from daemon.logs import bound, event
from daemon.render import render, render_env
from daemon.stores import open_store
from daemon.supervise import Supervisor
from daemon.writer import Writer

log = logging.getLogger(__name__)


async def exec_with_credential(config: Config, *, credential: str, argv: list[str]) -> int:
    cred = config.credential(credential)
    restart = next((c.reload.restart for c in cred.consumers if c.reload.restart is not None), None)
    sup = Supervisor(
        argv,
        stop_signal=restart.stop_signal if restart else "SIGTERM",
        grace=restart.timeout if restart else 10.0,
    )
    store = open_store(config)
    writer = Writer(cred.output)
    await asyncio.to_thread(writer.recover)
    backoff = Backoff(config.agent.retry_min, config.agent.retry_max)
    started = asyncio.Event()

    async def follow() -> None:
        current = None
        while True:
            try:
                async for info in store.watch(cred.key):
                    if info.id == current:
                        continue
                    try:
                        secret = await store.read(cred.key, info.id)
                        files = render(cred.output.files, secret.payload)
                        env = render_env(cred.output.env, secret.payload)
                        await asyncio.to_thread(writer.write, info.id, files)
                    except (PayloadError, BatonError, OSError) as e:
                        event(log, "version_rejected", logging.ERROR, version=info.id, error=str(e))
                        continue
                    current = info.id
                    if not started.is_set():
                        await sup.start(env)
                        sup.install_signal_handlers()
                        started.set()
                    elif await sup.restart(env) is None:
                        return
                    backoff.reset()
            except StoreError as e:
                delay = backoff.next()
                log.warning("store error; the child keeps running", extra={"error": str(e), "retry_in": delay})
                await asyncio.sleep(delay)

    with bound(credential=cred.name):
        task = asyncio.create_task(follow(), name=f"exec-follow:{cred.name}")
        try:
            waiter = asyncio.create_task(started.wait())
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                waiter.cancel()
                task.result()
                return 1
            child = asyncio.create_task(sup.wait())
            await asyncio.wait([task, child], return_when=asyncio.FIRST_COMPLETED)
            if not child.done():
                # Following the credential ended (a restart could not start the command):
                # say why, stop what runs, and fail rather than hang.
                child.cancel()
                error = task.exception() if not task.cancelled() else None
                event(log, "exec_failed", logging.ERROR, error=str(error) if error else "stopped following")
                with contextlib.suppress(BatonError, TimeoutError):
                    await asyncio.wait_for(sup.stop(), sup.grace + 5)
                return 1
            return child.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, BatonError):
                await task
            sup.remove_signal_handlers()
            await sup.aclose()
            await store.aclose()


def run_exec(config: Config, *, credential: str, argv: list[str]) -> int:
    return asyncio.run(exec_with_credential(config, credential=credential, argv=argv))
