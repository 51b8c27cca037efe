"""The rotator process: one schedule per rotated credential, and the retirement loop.

Rotations run at ``rotation.every`` (a failed or postponed one is retried at
the next interval); the retirement gate is evaluated every half heartbeat, so a
version is retired within one heartbeat of its last holder letting go.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.api import ApiServer
from daemon.config import Config
from daemon.errors import BatonError
from daemon.logs import event
from daemon.providers import open_provider
from daemon.report import open_reporter
from daemon.report.base import Reporter
from daemon.rotation.workflow import CredentialRotator
from daemon.stopping import cancel_all, close_bounded
from daemon.stores import open_store
from daemon.stores.base import SecretStore

log = logging.getLogger(__name__)


class Rotator:
    def __init__(
        self,
        config: Config,
        *,
        store: SecretStore | None = None,
        reporter: Reporter | None = None,
        install_signals: bool = True,
        serve_api: bool = True,
    ) -> None:
        self.config = config
        self._own_store = store is None
        self.store = store if store is not None else open_store(config)
        self.reporter = reporter if reporter is not None else open_reporter(config, self.store)
        self.install_signals = install_signals
        self.serve_api = serve_api
        self.rotators = {
            c.name: CredentialRotator(
                config=config,
                credential=c,
                store=self.store,
                reporter=self.reporter,
                provider=open_provider(c.rotation),
            )
            for c in config.credentials
            if c.rotation is not None
        }
        self.should_exit = asyncio.Event()
        self.ready = asyncio.Event()
        self.api: ApiServer | None = None
        self.rotate_now = asyncio.Event()

    async def serve(self) -> int:
        if self.install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.should_exit.set)
        if self.serve_api:
            self.api = ApiServer(self, token_file=self.config.api.token_file)
            await self.api.start(self.config.api.listen)
        election = self._election()
        self.ready.set()
        event(log, "rotator_started", credentials=sorted(self.rotators), leader_election=election is not None)
        failed = False
        try:
            if election is not None:
                election.start()
            while not self.should_exit.is_set() and not failed:
                if election is not None and not await self._until(election.elected):
                    break
                event(log, "rotator_leading", credentials=sorted(self.rotators))
                failed = await self._lead(election)
        finally:
            # Each close is bounded: a stop must end in bounded time (SIGTERM, systemd).
            if election is not None:
                await close_bounded(election.stop(), "leader election")
            if self.api is not None:
                await close_bounded(self.api.stop(), "api")
            for name, r in self.rotators.items():
                await close_bounded(r.provider.aclose(), f"provider of {name}")
            await close_bounded(self.reporter.aclose(), "reporter")
            if self._own_store:
                await close_bounded(self.store.aclose(), "store")
        return 1 if failed else 0

    def _election(self) -> Any:
        """A Lease-based election when BATON_LEASE_NAME is set (the rotator Deployment), else None."""
        name = os.environ.get("BATON_LEASE_NAME")
        if not name:
            return None
        leader = importlib.import_module("sidecar.leader")
        store = self.config.store
        return leader.LeaderElection(
            name=name,
            namespace=os.environ.get("POD_NAMESPACE") or getattr(store, "namespace", None) or "default",
            identity=os.environ.get("POD_NAME") or self.config.node_id,
            kubeconfig=getattr(store, "kubeconfig", None),
        )

    async def _until(self, ev: asyncio.Event) -> bool:
        """Wait for ``ev`` or a stop request; True when ``ev`` came first."""
        waiters = [asyncio.create_task(ev.wait()), asyncio.create_task(self.should_exit.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return ev.is_set() and not self.should_exit.is_set()

    async def _lead(self, election: Any) -> bool:
        """Run the schedules until stopped or the lease is lost. True when a task failed."""
        tasks = [asyncio.create_task(self.schedule(r), name=f"rotate:{n}") for n, r in self.rotators.items()]
        tasks += [asyncio.create_task(self.retire_loop(r), name=f"retire:{n}") for n, r in self.rotators.items()]
        watchers: list[asyncio.Task[Any]] = [asyncio.create_task(self.should_exit.wait(), name="wait-exit")]
        if election is not None:
            watchers.append(asyncio.create_task(self._lost(election), name="wait-lease-lost"))
        try:
            done, _ = await asyncio.wait([*watchers, *tasks], return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t in tasks and not t.cancelled() and t.exception() is not None]
            for t in failed:
                log.error("task failed", extra={"task": t.get_name(), "error": repr(t.exception())})
            if election is not None and not election.is_leader:
                event(log, "rotator_lost_lease", logging.WARNING)
            return bool(failed)
        finally:
            await cancel_all([*tasks, *watchers])

    async def _lost(self, election: Any) -> None:
        """Return when the lease is lost or a stop is requested."""
        # The stop check is in the loop condition, not left to cancellation: on 3.11
        # wait_for drops a cancel that races with should_exit being set, and this loop
        # then spun forever (a leading rotator never stopped). Polled no slower than the
        # election retries, so a lost lease stops the schedules before another can win.
        every = min(1.0, float(getattr(election, "retry_period", 1.0)))
        while election.is_leader and not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), every)

    async def schedule(self, rotator: CredentialRotator) -> None:
        every = rotator.rotation.every
        while not self.should_exit.is_set():
            try:
                delay = max(0.0, await rotator.due_at() - time.time())
            except BatonError as e:
                log.warning("cannot read rotation schedule", extra={"credential": rotator.cred.name, "error": str(e)})
                delay = every
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.rotate_now.wait(), delay)
                self.rotate_now.clear()
            outcome = await rotator.rotate()
            if outcome.result == "postponed":
                # Looked at again as soon as a retirement frees a slot, at the latest next
                # interval; never sooner than one retirement pass (no spinning).
                await asyncio.sleep(self._retire_interval())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed(rotator), every)
            elif outcome.result == "failed":
                await asyncio.sleep(every)  # retried at the next interval

    async def _slot_freed(self, rotator: CredentialRotator) -> None:
        while len(rotator.last_decisions) >= rotator.max_draining:
            rotator.retired_event.clear()
            await rotator.retired_event.wait()

    def _retire_interval(self) -> float:
        return max(0.05, min(self.config.report.heartbeat / 2, 5.0))

    async def retire_loop(self, rotator: CredentialRotator) -> None:
        while not self.should_exit.is_set():
            try:
                await rotator.retire_ready()
            except BatonError as e:
                log.warning("retirement check failed", extra={"credential": rotator.cred.name, "error": str(e)})
            await asyncio.sleep(self._retire_interval())

    def status(self) -> dict[str, Any]:
        return {
            "role": "rotator",
            "agent_version": __version__,
            "credentials": {
                name: {
                    "last_outcome": vars(r.last_outcome) if r.last_outcome else None,
                    "pending": [d.as_dict() for d in r.last_decisions],
                    "retired_total": r.retired_total,
                }
                for name, r in self.rotators.items()
            },
        }


def run_rotator(config: Config, *, config_path: str | Path | None = None) -> int:
    return asyncio.run(Rotator(config).serve())
