"""The rotator process: one schedule per rotated credential, and the retirement loop.

Rotations run at ``rotation.every`` or ``rotation.cron`` (daemon/schedule.py; ``baton
rotate`` asks for one at once through ``act_rotate``, ``baton retire --force`` is
``act_retire``; a failed or postponed one is retried at
the next interval); the retirement gate is evaluated every half heartbeat (at
most 5 s), at once after a promotion, and every ``report.drain_poll`` while a
version drains, so a version is retired within about that of its last holder
letting go (the agent publishes a changed report at once). Its
lifecycle is ``daemon.kit.service.Service``'s, shared with the agent: READY=1 once
the store answered and it leads or stands by, STATUS= says which, SIGHUP
re-reads the config.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.api import ApiServer
from daemon.config import Config, KubernetesStoreConfig
from daemon.errors import ActionRefused, BatonError, ConfigError
from daemon.files.checks import reload_config
from daemon.kit import plugins
from daemon.kit.backoff import Backoff
from daemon.kit.election import Election
from daemon.kit.logs import event
from daemon.kit.service import Service
from daemon.kit.tasks import cancel_all, close_bounded
from daemon.notify.hub import Notifier
from daemon.providers import open_provider
from daemon.report import open_reporter
from daemon.report.base import Reporter
from daemon.report.holders import open_holders
from daemon.rotation.actions import RetireRequest, credential_of, make_token, remove_token
from daemon.rotation.alarms import PendingAlarm
from daemon.rotation.leadership import Leadership, holder_id
from daemon.rotation.page import FleetPage
from daemon.rotation.workflow import CredentialRotator, Outcome, RotationResult
from daemon.stores import open_store
from daemon.stores.base import SecretStore

log = logging.getLogger(__name__)


class Standing(StrEnum):
    """Where the rotator stands (STATUS=, the status API's ``leadership``)."""

    STARTING = "starting"  # the store has not answered yet
    LEADING = "leading"  # it runs the schedules (of every credential whose lease it holds)
    STANDBY = "standby"  # another rotator leads (or holds every credential's lease)


class Rotator(Service):
    """The rotator role. ``await Rotator(config).serve()`` runs it until stopped."""

    role = "rotator"

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        store: SecretStore | None = None,
        reporter: Reporter | None = None,
        install_signals: bool = True,
        serve_api: bool = True,
    ) -> None:
        super().__init__(install_signals=install_signals)
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self._own_store = store is None
        self.store = store if store is not None else open_store(config)
        self.reporter = reporter if reporter is not None else open_reporter(config, self.store)
        # Holders that run no agent (pods reading the Secrets natively); act: it rolls annotated workloads.
        self.holders = open_holders(config, act=True)
        self.serve_api = serve_api
        self.rotators = self._rotators(config)
        self.holder = holder_id(config.node_id)  # this process's id on the credentials' leases
        self.leases = self._leases()
        self.api: ApiServer | None = None
        self.notifier: Notifier | None = None
        self.page: FleetPage | None = None  # served at / (rotation/page.py)
        self.rotate_now = asyncio.Event()
        # Per credential, what `baton rotate --wait` follows: a rotation asked for, the attempts so far,
        # whether its schedule runs here (this rotator leads it), the versions retired lately.
        self.requested: dict[str, asyncio.Event] = {}
        self.attempts: dict[str, int] = {}
        self.scheduling: set[str] = set()
        self.retired_recent: dict[str, collections.deque[str]] = {}
        self._token: tuple[Path, int] | None = None  # the action token this rotator made, and its inode
        self.election: Election | None = None
        # What STATUS= and the status API say: where it stands; the wall time each
        # credential's next rotation is due; the store's last error.
        self.leadership = Standing.STARTING
        self.next_rotation: dict[str, float] = {}
        self.store_error: str | None = None
        self._roles: asyncio.Task[None] | None = None

    def _rotators(self, config: Config) -> dict[str, CredentialRotator]:
        return {
            c.name: CredentialRotator(
                config=config,
                credential=c,
                store=self.store,
                reporter=self.reporter,
                provider=open_provider(c.rotation),
                holders=self.holders,
            )
            for c in config.credentials
            if c.rotation is not None
        }

    # ------------------------------------------------------------ lifecycle (see daemon.kit.service)

    async def startup(self) -> None:
        self.notifier = Notifier.from_config(self.config, role="rotator")
        self.notifier.start()
        if self.serve_api:
            self.page = FleetPage(self)
            self.page.start()
            self.api = ApiServer(
                self,
                token_file=self.config.api.token_file,
                max_connections=self.config.api.max_connections,
                page=self.page.html,
            )
            self._serve_actions(self.api)
            await self.api.start(self.config.api.listen)
        self.election = self._election()
        if self.election is not None:
            self.election.start()
        self._roles = self.spawn("roles", self._run_roles())
        event(log, "rotator_started", credentials=sorted(self.rotators), leader_election=self.election is not None)

    async def shutdown(self) -> None:
        await super().shutdown()
        # Each close is bounded: a stop must end in bounded time (SIGTERM, systemd).
        limit = self.close_limit
        if self.election is not None:
            await close_bounded(self.election.stop(), "leader election", limit)
        if self.api is not None:
            await close_bounded(self.api.stop(), "api", limit)
        if self._token is not None:
            remove_token(*self._token)
        if self.page is not None:
            self.page.close()
        if self.notifier is not None:
            await close_bounded(self.notifier.aclose(), "notifier", limit)
        for name, r in self.rotators.items():
            await close_bounded(r.provider.aclose(), f"provider of {name}", limit)
        await close_bounded(self.reporter.aclose(), "reporter", limit)
        if self.holders is not None:
            await close_bounded(self.holders.aclose(), "holders", limit)
        if self._own_store:
            await close_bounded(self.store.aclose(), "store", limit)

    async def reload(self) -> None:
        """SIGHUP: re-read the config; changed credentials restart the schedules, a bad config is refused."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the rotator was not started from a config file")
            return
        try:
            new = await asyncio.to_thread(reload_config, self.config_path, self.config)
        except ConfigError as e:
            event(log, "config_rejected", logging.ERROR, problems=e.problems)
            return
        changed = (new.credentials, new.report) != (self.config.credentials, self.config.report)
        if changed:
            # A rotation cut short here resumes from its recorded step on the next run.
            if self._roles is not None:
                await self.cancel_tasks([self._roles])
            for name, r in self.rotators.items():
                await close_bounded(r.provider.aclose(), f"provider of {name}", self.close_limit)
            self.config = new
            self.rotators = self._rotators(new)
            self.next_rotation = {}
            self._roles = self.spawn("roles", self._run_roles())
        else:
            self.config = new
        event(log, "config_reloaded", credentials=sorted(self.rotators), restarted_schedules=changed)

    # ------------------------------------------------------------ leading or standing by

    async def _run_roles(self) -> None:
        """Read the store once, then lead, or stand by until the lease is ours, until stopped."""
        await self._first_read()
        election = self.election
        while not self.should_exit.is_set():
            if election is not None and not election.is_leader:
                self._now(Standing.STANDBY)
                if not await self._until(election.elected.wait()):
                    return
            # With leases, leading is per credential: standby until one is taken (on_change says so).
            self._now(Standing.STANDBY if self.leases.leases else Standing.LEADING)
            if not self.leases.leases:  # with leases, each credential's lease says it (leadership.py)
                event(log, "rotator_leading", credentials=sorted(self.rotators))
            if await self._lead(election):
                # Stop the rotator so its supervisor restarts it, rather than limp on.
                self.failed = RuntimeError("a rotation task failed")
                self.should_exit.set()
                return
            if election is None:
                return  # stopped

    async def _first_read(self) -> None:
        """Wait until the store answers: each schedule read once (READY=1 means "has its store")."""
        backoff = Backoff(self.config.agent.retry_min, self.config.agent.retry_max)
        for name, r in self.rotators.items():
            while name not in self.next_rotation:
                try:
                    self.next_rotation[name] = await r.due_at()
                except BatonError as e:
                    self.store_error = str(e)
                    self.refresh_status()
                    delay = backoff.next()
                    log.warning(
                        "store not reachable yet", extra={"credential": name, "error": str(e), "retry_in": delay}
                    )
                    await asyncio.sleep(delay)
        self.store_error = None

    def _now(self, leadership: Standing) -> None:
        self.leadership = leadership
        if self.ready.is_set():
            self.refresh_status()
        else:
            self.announce_ready()

    def status_line(self) -> str:
        """What ``systemctl status baton-rotator`` shows: leading or standby, credentials, next, pending."""
        if self.store_error is not None:
            return f"{self.leadership}: waiting for the store: {self.store_error}"
        names = sorted(self.rotators)
        parts = [f"{self.leadership}: {len(names)} credentials" + (f" ({', '.join(names)})" if names else "")]
        if self.leadership == Standing.LEADING and self.next_rotation:
            name, due = min(self.next_rotation.items(), key=lambda kv: kv[1])
            parts.append(f"next rotation {name} in {_duration(due - time.time())}")
        elif self.leadership == Standing.STANDBY:
            parts.append("another rotator holds the lease")
        pending = sorted(f"{n} {d.version}" for n, r in self.rotators.items() for d in r.last_decisions)
        parts.append(f"{len(pending)} pending retirements" + (f" ({', '.join(pending)})" if pending else ""))
        return "; ".join(parts)

    def _election(self) -> Election | None:
        """A Lease-based election when BATON_LEASE_NAME is set (the rotator Deployment), else None.

        The Lease goes beside the Kubernetes store's Secrets (its namespace and kubeconfig)
        unless POD_NAMESPACE says otherwise; with another store, in-cluster config."""
        name = os.environ.get("BATON_LEASE_NAME")
        if not name:
            return None
        factory: Callable[..., Election] = plugins.load(plugins.ELECTIONS, "kubernetes", kind="leader election")
        store = self.config.store
        kube = store if isinstance(store, KubernetesStoreConfig) else None
        return factory(
            name=name,
            namespace=os.environ.get("POD_NAMESPACE") or (kube.namespace if kube else None) or "default",
            identity=os.environ.get("POD_NAME") or self.config.node_id,
            kubeconfig=kube.kubeconfig if kube else None,
        )

    def _leases(self) -> Leadership:
        def changed() -> None:
            self._now(Standing.STANDBY if self.leases.standing_by else Standing.LEADING)

        credentials = {n: (r.key, r.rotation.lease_ttl) for n, r in self.rotators.items()}
        leadership = Leadership(store=self.store, holder=self.holder, credentials=credentials, on_change=changed)
        for name, lease in leadership.leases.items():
            self.rotators[name].fence = lease.verify
        return leadership

    async def _credential(self, rotator: CredentialRotator) -> None:
        """One credential's schedule and retirement loop; either failing ends both."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.schedule(rotator), name=f"rotate:{rotator.cred.name}")
            tg.create_task(self.retire_loop(rotator), name=f"retire:{rotator.cred.name}")

    async def _lead(self, election: Election | None) -> bool:
        """Run the schedules until stopped or the lease is lost. True when a task failed."""
        # Each credential's schedule and retirement run only while this rotator holds its lease.
        self.leases = self._leases()
        tasks = [
            asyncio.create_task(self.leases.lead(n, functools.partial(self._credential, r)), name=f"lead:{n}")
            for n, r in self.rotators.items()
        ]
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
            await cancel_all([*tasks, *watchers], self.close_limit)

    async def _lost(self, election: Election) -> None:
        """Return when the lease is lost or a stop is requested."""
        # The stop check is in the loop condition, not left to cancellation: on 3.11
        # wait_for drops a cancel that races with should_exit being set, and this loop
        # then spun forever (a leading rotator never stopped). Polled no slower than the
        # election retries, so a lost lease stops the schedules before another can win.
        every = min(1.0, election.retry_period)
        while election.is_leader and not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), every)

    async def schedule(self, rotator: CredentialRotator) -> None:
        """Rotate when due (``rotation.every`` or ``cron``, see daemon/schedule.py) or when asked
        (``baton rotate``); a failed rotation is retried at the next interval or cron time, sooner if asked."""
        name = rotator.cred.name
        requested = self.requested.setdefault(name, asyncio.Event())
        self.scheduling.add(name)
        try:
            while not self.should_exit.is_set():
                try:
                    due = await rotator.due_at()
                except BatonError as e:
                    log.warning("cannot read rotation schedule", extra={"credential": name, "error": str(e)})
                    due = rotator.timing.retry_at(time.time())
                # Capped: a schedule whose times all passed (due never) looks again in a year, not at infinity.
                delay = min(max(0.0, due - time.time()), 366 * 86400.0)
                self.next_rotation[name] = time.time() + delay
                if delay > 0:
                    await _any_set([self.rotate_now, requested], delay)
                    self.rotate_now.clear()
                requested.clear()  # this attempt serves it
                outcome = await self._attempt(rotator)
                if outcome.result == RotationResult.POSTPONED:
                    # Looked at again as soon as a retirement frees a slot, at the latest next
                    # interval; never sooner than one retirement pass (no spinning).
                    await asyncio.sleep(self._retire_interval())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed(rotator), self._retry_delay(rotator))
                elif outcome.result == RotationResult.FAILED:
                    self.next_rotation[name] = time.time() + self._retry_delay(rotator)
                    await _any_set([requested], self._retry_delay(rotator))  # the next interval, or when asked
        finally:
            self.scheduling.discard(name)

    async def _attempt(self, rotator: CredentialRotator) -> Outcome:
        try:
            return await rotator.rotate()
        finally:
            rotator.step = None
            self.attempts[rotator.cred.name] = self.attempts.get(rotator.cred.name, 0) + 1

    def _retry_delay(self, rotator: CredentialRotator) -> float:
        now = time.time()
        return min(max(0.0, rotator.timing.retry_at(now) - now), 366 * 86400.0)

    async def _slot_freed(self, rotator: CredentialRotator) -> None:
        while len(rotator.last_decisions) >= rotator.max_draining:
            rotator.retired_event.clear()
            await rotator.retired_event.wait()

    def _retire_interval(self) -> float:
        return max(0.05, min(self.config.report.heartbeat / 2, 5.0))

    async def retire_loop(self, rotator: CredentialRotator) -> None:
        # A pass that fails (a revoked token, a store down) or whose every retirement failed is
        # retried with backoff, not every half heartbeat: one warning per retry, never a flood.
        backoff = Backoff(self.config.agent.retry_min, self.config.agent.retry_max)
        alarm = PendingAlarm(rotator.cred.name, rotator.rotation.max_drain)
        while not self.should_exit.is_set():
            delay = self._retire_interval()
            rotator.promoted_event.clear()
            began = time.monotonic()
            try:
                async with rotator.retiring:
                    retired = await rotator.retire_ready()
                self._retired(rotator.cred.name, retired)
            except BatonError as e:
                delay = max(delay, backoff.next())
                log.warning(
                    "retirement check failed",
                    extra={"credential": rotator.cred.name, "error": str(e), "retry_in": round(delay, 3)},
                )
            else:
                if rotator.retire_failures and not retired:
                    delay = max(delay, backoff.next())
                else:
                    backoff.reset()
                alarm.check(rotator.last_decisions)
                if rotator.last_decisions and not backoff.failures:
                    # A version drains: its last holder's letting go is seen within drain_poll, but
                    # never pausing less than the pass took (a Vault status path's full collect of a
                    # large fleet takes seconds: the store is not read back to back).
                    took = time.monotonic() - began
                    delay = min(delay, max(self.config.report.drain_poll, took))
            # A promotion supersedes a version: looked at at once, not half a heartbeat later.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rotator.promoted_event.wait(), delay)

    # ------------------------------------------------------------ actions (POST /v1/actions/NAME, daemon/api.py)

    def _serve_actions(self, api: ApiServer) -> None:
        """Rotate and retire on the endpoint, behind ``api.token_file`` or a token made in ``api.runtime_dir``."""
        if self.config.api.token_file is None:
            self._token = make_token(self.config.api.runtime_dir)
            api.token_file = self._token[0]
        api.actions.update(rotate=self.act_rotate, retire=self.act_retire)

    def _led(self, name: str) -> None:
        if name not in self.scheduling:
            raise ActionRefused(409, f"this rotator does not lead {name} ({self.leadership}): its lease is elsewhere")

    async def act_rotate(self, body: dict[str, Any]) -> dict[str, Any]:
        """``baton rotate NAME``: rotate now. Answers the current version (to retire) and the attempt to wait for."""
        name = credential_of(body, set(self.rotators))
        self._led(name)
        rotator = self.rotators[name]
        try:
            current = [v for v in await rotator.gate.versions() if v.is_current]
        except BatonError as e:
            raise ActionRefused(503, f"the store did not answer: {e}") from None
        if rotator.step is None and len(rotator.last_decisions) >= rotator.max_draining:
            # It would be postponed: say why now rather than leave the caller waiting for a slot.
            draining = ", ".join(d.version for d in rotator.last_decisions)
            raise ActionRefused(
                409,
                f"{name} cannot rotate now: version(s) {draining} still draining (max_draining "
                f"{rotator.max_draining}); see baton status --pending, or retire by force",
            )
        # A rotation under way was not asked for by this request: the one after it is.
        after = self.attempts.get(name, 0) + (1 if rotator.step is not None else 0)
        self.requested.setdefault(name, asyncio.Event()).set()
        event(log, "rotation_requested", credential=name, user=str(body.get("user", "?"))[:120], peer=body.get("peer"))
        return {"credential": name, "current": current[-1].id if current else None, "after_attempt": after}

    async def act_retire(self, body: dict[str, Any]) -> dict[str, Any]:
        """``baton retire NAME VERSION --force``: retire now despite holders (``CredentialRotator.force_retire``)."""
        req = RetireRequest.parse(body, set(self.rotators))
        self._led(req.credential)
        try:
            decision = await self.rotators[req.credential].force_retire(
                req.version, reason=req.reason, user=req.user, peer=req.peer
            )
        except ActionRefused:
            raise
        except BatonError as e:
            raise ActionRefused(502, f"the retirement failed: {e}") from None
        self._retired(req.credential, [req.version])
        shown = decision.as_dict() if decision is not None else {"holders": {}, "reasons": []}
        return {
            "credential": req.credential,
            "version": req.version,
            "retired": True,
            **{k: shown[k] for k in ("holders", "reasons")},
        }

    def _retired(self, name: str, versions: Sequence[str]) -> None:
        self.retired_recent.setdefault(name, collections.deque(maxlen=32)).extend(versions)

    def status(self) -> dict[str, Any]:
        return {
            "role": "rotator",
            "agent_version": __version__,
            "leadership": self.leadership,
            "credentials": {
                name: {
                    "next_rotation": self.next_rotation.get(name),
                    "last_outcome": vars(r.last_outcome) if r.last_outcome else None,
                    "pending": [d.as_dict() for d in r.last_decisions],
                    "retired_total": r.retired_total,
                    "schedule": r.timing.describe(),
                    "requested": name in self.requested and self.requested[name].is_set(),
                    "step": r.step,
                    "attempts": self.attempts.get(name, 0),
                    "nodes": dict(r.nodes_current),
                    "retired_recent": list(self.retired_recent.get(name, ())),
                    "lease": self.leases.status().get(name),
                }
                for name, r in self.rotators.items()
            },
        }


async def _any_set(events: list[asyncio.Event], within: float) -> None:
    """Return when one of ``events`` is set, or after ``within`` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _duration(seconds: float) -> str:
    """``3d4h``, ``23h59m``, ``5m``, ``12s``: short enough for a STATUS= line."""
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m"
    return f"{s}s"


def run_rotator(config: Config, *, config_path: str | Path | None = None) -> int:
    return asyncio.run(Rotator(config, config_path=config_path).serve())
