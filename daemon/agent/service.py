"""The agent role: wires stores -> files (agent.follow) -> reload -> usage and report (agent.tracker).

Its lifecycle is ``daemon.kit.service.Service``'s, shared with the rotator and
``baton exec``: ``serve() -> startup() -> main_loop() -> shutdown()``, guarded
root tasks (one that dies stops the agent; systemd or the kubelet restarts it),
SIGTERM/SIGINT stop in bounded time (a second forces it), SIGHUP re-reads the
config. Store errors never kill a task: the last good files stay and the task
retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.agent.follow import Follower
from daemon.agent.state import CredentialState
from daemon.agent.tracker import Tracker
from daemon.api import ApiServer
from daemon.config import Config, CredentialConfig
from daemon.errors import ConfigError
from daemon.files.checks import reload_config
from daemon.files.renderworker import RenderWorker
from daemon.files.writer import Writer
from daemon.issuers import open_issuer
from daemon.issuers.base import Issuer
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.kit.service import Service
from daemon.kit.tasks import close_bounded
from daemon.model import CredentialName, VersionId
from daemon.notify.hub import Notifier
from daemon.reload.reloader import Reloader
from daemon.report import open_reporter
from daemon.report.base import Reporter
from daemon.stores import open_store
from daemon.stores.base import SecretStore
from daemon.usage import fdscan

log = logging.getLogger(__name__)

STOP_GRACE = 5.0


class Agent(Service):
    """One node's agent. ``await Agent(config).serve()`` runs it until stopped."""

    role = "agent"
    stop_grace = STOP_GRACE

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        store: SecretStore | None = None,
        install_signals: bool = True,
    ) -> None:
        super().__init__(install_signals=install_signals)
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self._own_store = store is None
        self.store: SecretStore = store if store is not None else open_store(config)
        self.reporter: Reporter = open_reporter(config, self.store)
        self.started = time.time()
        # Key of the env fingerprints: lives as long as this process, never stored.
        self.env_key = secrets.token_bytes(32)
        # Renders every version in a child process: a runaway template is killed, not waited for.
        self.renderer = RenderWorker()
        self.credentials: dict[CredentialName, CredentialState] = {}
        # Issued credentials' sources (daemon/issuers/), kept across config reloads while their config stays.
        self.issuers: dict[CredentialName, Issuer] = {}
        self._issued_as: dict[CredentialName, CredentialConfig] = {}
        self.reloader: Reloader | None = None
        self.tracker: Tracker | None = None
        self.api: ApiServer | None = None
        self.notifier: Notifier | None = None
        # This generation's root tasks (replaced on a config reload).
        self._generation: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle (see daemon.kit.service)

    async def startup(self) -> None:
        _not_dumpable()
        # The node's own notable events (a lease or certificate about to expire) go to notify: sinks.
        self.notifier = Notifier.from_config(self.config, role="agent")
        self.notifier.start()
        self.api = ApiServer(
            self, token_file=self.config.api.token_file, max_connections=self.config.api.max_connections
        )
        await self.api.start(self.config.api.listen)
        await self._open_issuers()
        self._start_generation()
        event(
            log,
            "agent_started",
            node=self.config.node_id,
            credentials=len(self.config.credentials),
            api=self.api.address,
        )
        if not fdscan.NATIVE:
            log.info("fd scans use the pure Python walk (daemon.usage._fdscan was not built: no C compiler at install)")

    async def shutdown(self) -> None:
        await super().shutdown()
        await self._stop_generation()
        # Each close is bounded, so SIGTERM ends the agent in bounded time. Issuers keep
        # their leases (a restart adopts them): closing only saves their state.
        for name, issuer in self.issuers.items():
            await close_bounded(issuer.aclose(), f"issuer {name}", self.close_limit)
        await close_bounded(self.reporter.aclose(), "reporter", self.close_limit)
        if self.api is not None:
            await close_bounded(self.api.stop(), "api", self.close_limit)
        if self.notifier is not None:
            await close_bounded(self.notifier.aclose(), "notifier", self.close_limit)
        if self._own_store:
            await close_bounded(self.store.aclose(), "store", self.close_limit)
        await close_bounded(self.renderer.aclose(), "render worker", self.close_limit)
        event(log, "agent_stopped", node=self.config.node_id)

    async def reload(self) -> None:
        """SIGHUP: load the config again; a bad one is refused and the old one keeps running."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the agent was not started from a config file")
            return
        try:
            new = await asyncio.to_thread(reload_config, self.config_path, self.config)
        except ConfigError as e:
            event(log, "config_rejected", logging.ERROR, problems=e.problems)
            return
        await self._stop_generation()
        self.config = new
        await self._open_issuers()
        self._start_generation()
        event(log, "config_reloaded", credentials=len(new.credentials))

    # ------------------------------------------------------------ tasks

    async def _open_issuers(self) -> None:
        """An issuer per issued credential; one whose issuing config changed (or is gone) is closed and replaced."""
        wanted = {c.name: c for c in self.config.credentials if c.issued_kind() is not None}
        for name in list(self.issuers):
            before = self._issued_as.get(name)
            now = wanted.get(name)
            if now is None or before is None or _issuing(before) != _issuing(now):
                await close_bounded(self.issuers.pop(name).aclose(), f"issuer {name}", self.close_limit)
        for name, cred in wanted.items():
            if name not in self.issuers:
                self.issuers[name] = open_issuer(self.config, cred, self.store)
            self._issued_as[name] = cred

    def _start_generation(self) -> None:
        config = self.config
        old, self.credentials = self.credentials, {}
        for c in config.credentials:
            before = old.get(c.name)
            if before is not None and (before.config.key, before.config.output) == (c.key, c.output):
                # Same credential, same files: what we know of it stays true across a
                # reload, and the same Writer (its lock) keeps serving the directory, so
                # a write still running in a thread never meets a second writer.
                state = CredentialState(c, before.writer)
                state.version, state.written, state.last_change = before.version, before.written, before.last_change
                state.fingerprints = before.fingerprints
                if before.written:
                    state.swapped.set()
            else:
                state = CredentialState(c, Writer(c.output))
            self.credentials[c.name] = state
        kept = {id(s.writer) for s in self.credentials.values()}
        for before in old.values():
            if id(before.writer) not in kept:
                before.writer.close()  # its dir's lock, for a new writer there (never blocks)
        if any(c.required and not self.credentials[c.name].written for c in config.credentials):
            self.ready.clear()
        self.reloader = Reloader(
            config.credentials,
            debounce=config.agent.debounce,
            on_done=self._reloaded,
            # Who was reloaded when stays true across a config reload (start-time attribution).
            reloaded_at=self.reloader.reloaded_pids if self.reloader is not None else None,
        )
        self.tracker = Tracker(
            config=config,
            credentials=self.credentials,
            store=self.store,
            renderer=self.renderer,
            reporter=self.reporter,
            reloader=self.reloader,
            env_key=self.env_key,
            issuers=self.issuers,
        )
        self._generation = [
            self.spawn(f"follow:{name}", self.follow(state)) for name, state in self.credentials.items()
        ]
        # The reloader has one worker per consumer: with no consumers its job is done at once.
        self._generation.append(self.spawn("reloader", self.reloader.run(), may_end=not self.reloader.status()))
        self._generation.append(self.spawn("tracker", self.tracker.run()))
        if not self.ready.is_set():
            self._generation.append(self.spawn("ready", self._announce_ready(), may_end=True))

    async def _stop_generation(self) -> None:
        tasks, self._generation = self._generation, []
        await self.cancel_tasks(tasks)
        if self.reloader is not None:
            await self.reloader.aclose()

    async def _announce_ready(self) -> None:
        required = [s for s in self.credentials.values() if s.config.required]
        for state in required:
            await state.swapped.wait()
        self.announce_ready()
        event(log, "agent_ready", credentials=len(self.credentials))

    def status_line(self) -> str:
        """What ``systemctl status baton`` shows: credentials written, waiting, failing; consumers."""
        states = list(self.credentials.values())
        written = [s for s in states if s.written]
        parts = [f"{len(written)}/{len(states)} credentials written"]
        waiting = sorted(s.config.name for s in states if s.config.required and not s.written)
        if waiting:
            parts.append("waiting for " + ", ".join(waiting))
        failing = sorted(s.config.name for s in states if s.store_error or s.last_error)
        if failing:
            parts.append("errors: " + ", ".join(failing))
        consumers = sum(len(s.config.consumers) for s in states)
        parts.append(f"{consumers} consumers")
        if self.tracker is not None:
            old = sum(len([v for v in self.tracker.on_disk(s.config.name) if v != s.version]) for s in states)
            if old:
                parts.append(f"{old} old versions draining")
        return "; ".join(parts)

    # ------------------------------------------------------------ follow one credential (daemon.agent.follow)

    async def follow(self, state: CredentialState) -> None:
        # An issued credential's versions come from its issuer, every other's from the store.
        source = self.issuers.get(state.config.name, self.store)
        await Follower(
            config=self.config, store=source, renderer=self.renderer, env_key=self.env_key, on_written=self._written
        ).follow(state)

    def _written(self, state: CredentialState, previous: VersionId | None, changed: bool) -> None:
        """A version is on disk: a changed one goes to the reloader; the tracker rescans either way."""
        if changed and previous is not None and previous != state.version and self.reloader is not None:
            assert state.version is not None
            self.reloader.changed(state.config.name, state.version)
        if self.tracker is not None:
            self.tracker.poke()

    def _reloaded(self, consumer: str, credentials: Any, ok: bool) -> None:
        """Observe propagation once per change: when its last consumer is reloaded."""
        if not ok:
            return
        now = time.time()
        for name in credentials:
            state = self.credentials.get(name)
            if state is None or state.changed_at is None:
                continue
            state.waiting_for.discard(consumer)
            if not state.waiting_for:
                metrics.propagation_seconds.observe(now - state.changed_at)
                state.changed_at = None

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.config.node_id,
            "agent_version": __version__,
            "ready": self.ready.is_set(),
            "started": self.started,
            "credentials": {
                name: s.status(self.tracker.on_disk(name) if self.tracker else [])
                for name, s in self.credentials.items()
            },
        }
        for name, issuer in self.issuers.items():
            if name in out["credentials"]:
                out["credentials"][name]["issuer"] = issuer.status()
        if self.tracker is not None:
            self.tracker.add_status(out)
        if self.reloader is not None:
            out["consumers"] = {name: st.as_dict() for name, st in self.reloader.status().items()}
        return out


def _issuing(cred: CredentialConfig) -> tuple[str | None, object]:
    """What an issuer is built from: a change here needs a new issuer (outputs and consumers do not)."""
    kind = cred.issued_kind()
    return kind, getattr(cred, kind) if kind else None


def _not_dumpable() -> None:
    """Keep processes of the same uid (a sidecar's app) out of our /proc (memory, fds, root)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_dumpable = 4
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def run_agent(config: Config, *, config_path: str | Path | None = None) -> int:
    return asyncio.run(Agent(config, config_path=config_path).serve())
