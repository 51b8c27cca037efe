"""The ``Reloader``: the pacing of consumer reloads (debounce, batching per consumer, one process at a time
behind a health gate, a minimum interval between restarts) and their status.

Actions are ``daemon.reload.actions``, health gates ``daemon.reload.health``, the
process work itself (pidfd signals, waiting for exits, stopping, starting,
running commands) ``daemon.reload.processes``. It must never block the event
loop (/proc reads and pidfile polls run in threads; process exits are awaited on a pidfd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import psutil

from daemon.config import ConsumerConfig, CredentialConfig, MatchConfig
from daemon.errors import ReloadError, ReloadGone
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.model import CredentialName, VersionId
from daemon.reload.actions import ReloadAction, make_action, roll_versions
from daemon.reload.health import check_consumer_health, check_health
from daemon.reload.processes import (
    is_alive,
    same_process,
    start_time,
)
from daemon.usage.consumers import START_SLACK, find_processes, process_start

log = logging.getLogger(__name__)


class ReloadResult(StrEnum):
    """The result of one consumer's roll, or of one process in it (the reloads metric's ``result`` label)."""

    OK = "ok"
    FAILURE = "failure"
    NOT_NEEDED = "not_needed"  # nothing of the consumer needed the new version
    NO_PROCESSES = "no_processes"
    GONE = "gone"  # the process exited (or its pid was reused) before it was reloaded
    FRESH = "fresh"  # started after the change: it loaded the new version by itself


OK, FAILURE, NOT_NEEDED = ReloadResult.OK, ReloadResult.FAILURE, ReloadResult.NOT_NEEDED
NO_PROCESSES, GONE, FRESH = ReloadResult.NO_PROCESSES, ReloadResult.GONE, ReloadResult.FRESH


@dataclass(frozen=True)
class PidReload:
    """One process handled by a roll."""

    pid: int
    at: float  # wall time: when the reload was sent (ok), found gone, or started (fresh)
    result: ReloadResult
    new_pid: int | None = None


@dataclass(frozen=True)
class ConsumerStatus:
    """What the Reloader knows about one consumer; names and pids only."""

    name: str
    action: str
    result: ReloadResult | None = None  # None before the first roll
    error: str | None = None
    last_reload: float | None = None  # wall time the last roll finished
    credentials: frozenset[str] = frozenset()  # what the last roll was for
    reloaded: tuple[PidReload, ...] = ()  # the processes of the last roll, in order
    pending: frozenset[str] = frozenset()
    running: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the status API (names, pids and times only)."""
        return {
            "name": self.name,
            "action": self.action,
            "result": self.result,
            "error": self.error,
            "last_reload": self.last_reload,
            "credentials": sorted(self.credentials),
            "reloaded": [asdict(r) for r in self.reloaded],
            "pending": sorted(self.pending),
            "running": self.running,
        }


@dataclass
class _State:
    consumer: ConsumerConfig
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[CredentialName, VersionId] = field(default_factory=dict)  # credential -> version
    first_at: float = 0.0
    last_wall: float = 0.0  # wall time of the latest change in the batch
    batch_wall: float = 0.0  # last_wall of the batch being rolled
    last_at: float = 0.0
    last_roll: float | None = None  # monotonic start of the last roll that acted
    running: bool = False
    status: ConsumerStatus | None = None


@dataclass
class _Roll:
    """One roll of one consumer: what it is for, and each process handled so far, in order."""

    st: _State
    creds: frozenset[CredentialName]
    versions: dict[CredentialName, VersionId]
    reloaded: list[PidReload] = field(default_factory=list)


OnDone = Callable[[str, frozenset[str], bool], Awaitable[None] | None]


class Reloader:
    """Reloads consumers after their credentials change: debounced, batched, rolling, rate-limited.

    ``credentials`` is the config's credential list, or a mapping credential
    name -> consumers. A consumer (by name) may appear under several
    credentials; it is one consumer, reloaded once per batch.
    ``changed()`` and ``status()`` are called from the event loop's thread.
    ``reloaded_at`` carries the reload times of a previous Reloader
    (its ``reloaded_pids``) over a config reload.
    """

    def __init__(
        self,
        credentials: Sequence[CredentialConfig] | Mapping[str, Sequence[ConsumerConfig]],
        *,
        debounce: float = 2.0,
        max_wait: float | None = None,
        find: Callable[[MatchConfig], list[int]] = find_processes,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_done: OnDone | None = None,
        action_factory: Callable[[ConsumerConfig], ReloadAction] = make_action,
        reloaded_at: Mapping[int, float] | None = None,
    ) -> None:
        mapping: Mapping[str, Sequence[ConsumerConfig]] = (
            credentials if isinstance(credentials, Mapping) else {c.name: c.consumers for c in credentials}
        )
        self._by_credential: dict[str, list[str]] = {}
        self._states: dict[str, _State] = {}
        for cred, consumers in mapping.items():
            names = self._by_credential.setdefault(cred, [])
            for cons in consumers:
                self._states.setdefault(cons.name, _State(cons))
                if cons.name not in names:
                    names.append(cons.name)
        self.debounce = debounce
        self.max_wait = max_wait if max_wait is not None else 4 * debounce
        self._find = find
        self._clock = clock
        self._wall = wall
        self._on_done = on_done
        self._make = action_factory
        self._actions: dict[str, ReloadAction] = {}
        # Carried over from the Reloader this one replaces (config reload): without it,
        # the tracker would date every process reloaded so far by its start time alone
        # and count it as holding a version it has dropped. Dead pids are left behind.
        self._reloaded_at: dict[int, float] = {p: t for p, t in (reloaded_at or {}).items() if is_alive(p)}
        self._children_before: dict[int, list[tuple[float, frozenset[int]]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the agent's side

    def changed(self, credential: CredentialName, version: VersionId) -> None:
        """A new version of ``credential`` was written. Never blocks."""
        names = self._by_credential.get(credential, [])
        now = self._clock()
        for name in names:
            st = self._states[name]
            if not st.pending:
                st.first_at = now
            st.last_at = now
            st.last_wall = self._wall()
            st.pending[credential] = version
            st.wake.set()
        if names:
            self._idle.clear()
        else:
            log.debug("no consumer declared for credential %s", credential)

    def status(self) -> dict[str, ConsumerStatus]:
        out: dict[str, ConsumerStatus] = {}
        for name, st in self._states.items():
            base = st.status or ConsumerStatus(name=name, action=st.consumer.reload.action)
            out[name] = replace(base, pending=frozenset(st.pending), running=st.running)
        return out

    def reloaded_at(self, pid: int) -> float | None:
        """Wall time the last reload was sent to this pid (or to the process it replaced)."""
        return self._reloaded_at.get(pid)

    def reloads_of(self, pid: int) -> list[tuple[float, frozenset[int]]]:
        """``pid``'s last reloads by us (``match.children`` consumers): when, and the children it had just before."""
        return list(self._children_before.get(pid, ()))

    @property
    def reloaded_pids(self) -> dict[int, float]:
        """A copy of every pid -> reload time known, to pass as ``reloaded_at`` to the next Reloader."""
        return dict(self._reloaded_at)

    async def wait_idle(self) -> None:
        """Return when no consumer has a pending change or a roll in progress."""
        await self._idle.wait()

    async def run(self) -> None:
        """One worker per consumer until cancelled; the actions are closed on the way out."""
        try:
            async with asyncio.TaskGroup() as tg:
                for name, st in self._states.items():
                    tg.create_task(self._worker(st), name=f"reload:{name}")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the actions made so far. Idempotent; ``run`` does it on the way out."""
        actions, self._actions = list(self._actions.values()), {}
        for action in actions:
            try:
                await action.aclose()
            except Exception:
                log.exception("closing a reload action failed")

    # -- internals

    def _update_idle(self) -> None:
        if all(not st.pending and not st.running for st in self._states.values()):
            self._idle.set()
        else:
            self._idle.clear()

    async def _worker(self, st: _State) -> None:
        while True:
            await st.wake.wait()
            st.wake.clear()
            if not st.pending:
                continue
            if st.consumer.loads == "per-use" or st.consumer.reload.action == "none":
                # Nothing to do: the consumer reads the files on its own.
                creds, versions = self._take(st)
                await self._finish(st, creds, versions, result=NOT_NEEDED, error=None, reloaded=())
                continue
            await self._wait_due(st)
            creds, versions = self._take(st)
            st.running = True
            try:
                await self._roll(st, creds, versions)
            finally:
                st.running = False
                self._update_idle()

    def _take(self, st: _State) -> tuple[frozenset[CredentialName], dict[CredentialName, VersionId]]:
        versions = dict(st.pending)
        st.pending.clear()
        st.batch_wall = st.last_wall
        return frozenset(versions), versions

    def _due(self, st: _State) -> float:
        due = min(st.last_at + self.debounce, st.first_at + self.max_wait)
        if st.last_roll is not None and st.consumer.reload.restarts:
            # A restart costs the consumer its warm state: at most one per interval.
            # A signal or a reload command is cheap and is not held back.
            due = max(due, st.last_roll + st.consumer.min_restart_interval)
        return due

    async def _wait_due(self, st: _State) -> None:
        """Sleep until the batch is due; a new change wakes us to recompute the deadline."""
        while (left := self._due(st) - self._clock()) > 0:
            st.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.wake.wait(), left)
        st.wake.clear()

    def _remember(self, at: float, *pids: int | None) -> None:
        for p in pids:
            if p:
                self._reloaded_at[p] = at
        if len(self._reloaded_at) > 4096:
            # Forget processes that are gone, so a long-lived agent does not grow without bound.
            self._reloaded_at = {p: t for p, t in self._reloaded_at.items() if is_alive(p)}
            self._children_before = {p: c for p, c in self._children_before.items() if p in self._reloaded_at}

    def _snapshot(self, match: MatchConfig) -> tuple[list[int], dict[int, float | None]]:
        """The consumer's pids and their start times (to notice a recycled pid later). Blocking."""
        pids = self._find(match)
        return pids, {p: start_time(p) for p in pids}

    def _action(self, consumer: ConsumerConfig) -> ReloadAction:
        action = self._actions.get(consumer.name)
        if action is None:
            action = self._actions[consumer.name] = self._make(consumer)
        return action

    async def _roll(
        self, st: _State, creds: frozenset[CredentialName], versions: dict[CredentialName, VersionId]
    ) -> None:
        """Reload the consumer's processes one at a time, each behind its health gate; a failure stops the roll."""
        roll = _Roll(st, creds, versions)
        prepared = await self._prepare(roll)
        if prepared is None:
            return
        action, pids, started = prepared
        targets = self._targets(action, pids, started)
        if not targets and action.needs_process:
            self._event(st.consumer.name, None, NO_PROCESSES, creds, versions)
            await self._end(roll, NO_PROCESSES)
            return
        st.last_roll = self._clock()
        for pid in targets:
            if self._skipped(roll, action, pid, started):
                continue
            error = await self._reload_one(roll, action, pid, pids, started)
            if error is not None:
                # The roll stops here: the remaining processes keep the old version.
                await self._end(roll, FAILURE, error=error)
                return
        await self._end(roll, OK)

    async def _prepare(self, roll: _Roll) -> tuple[ReloadAction, list[int], dict[int, float | None]] | None:
        """The consumer's action, pids and start times; None (the roll failed and is finished) if they cannot be had."""
        cons = roll.st.consumer
        try:
            pids, started = await asyncio.to_thread(self._snapshot, cons.match)
            action = self._action(cons)
        except Exception as e:
            # A broken action (or matcher) fails this consumer, never the other consumers' workers.
            if not isinstance(e, ReloadError):
                log.exception("preparing the reload of %s failed", cons.name)
            error = str(e) if isinstance(e, ReloadError) else f"{type(e).__name__} preparing the reload"
            self._event(cons.name, None, FAILURE, roll.creds, roll.versions, error=error)
            await self._end(roll, FAILURE, error=error)
            return None
        return action, pids, started

    @staticmethod
    def _targets(action: ReloadAction, pids: list[int], started: Mapping[int, float | None]) -> list[int]:
        """The pids to reload; for a per-consumer action, one live process of it (0: none needed)."""
        if not action.per_consumer:
            return pids
        # The action acts on the whole consumer: any live process of it will do
        # (the first one found may have exited since; the others still hold the old version).
        live = next((p for p in pids if same_process(p, started.get(p))), None)
        return [live] if live is not None else ([] if action.needs_process else [0])

    def _skipped(self, roll: _Roll, action: ReloadAction, pid: int, started: Mapping[int, float | None]) -> bool:
        """True (and noted) when the process needs no reload: gone since it was seen, or started after the change."""
        if not pid or action.per_consumer:
            return False
        if not same_process(pid, started.get(pid)):
            # Exited (or the pid was recycled) since we looked: nothing holds the old version there.
            self._note(roll, PidReload(pid, self._wall(), GONE))
            return True
        born = process_start(pid)
        if born is not None and born >= roll.st.batch_wall + START_SLACK:
            # Started after the new files were in place: it read them at start. A
            # signal now could reach it before it installs its handler, and kill it.
            self._note(roll, PidReload(pid, born, FRESH))
            return True
        return False

    async def _reload_one(
        self,
        roll: _Roll,
        action: ReloadAction,
        pid: int,
        pids: list[int],
        started: Mapping[int, float | None],
    ) -> str | None:
        """Reload one process and wait for its health gate; the error if it failed (then the roll stops)."""
        # The tracker credits a process with the newest version swapped in before
        # this time: it must be when the reload went out, not when the health
        # check passed (a version swapped in during the check was never loaded).
        # A server that reads at reload (nginx) forks new workers after it: the ones alive
        # now are the old generation, which keeps the old version until it exits.
        before = await asyncio.to_thread(_children, pid) if pid and roll.st.consumer.match.children else None
        sent = self._wall()
        roll_versions.set(roll.versions)  # this worker task's own context: what the roll is for
        try:
            new_pid, serving = await self._send(roll.st.consumer, action, pid, pids, started)
        except ReloadGone:
            # Exited (or recycled) between the check above and the signal: as above.
            self._note(roll, PidReload(pid, self._wall(), GONE))
            return None
        except Exception as e:
            if not isinstance(e, ReloadError):
                log.exception("reload of %s pid %d raised", roll.st.consumer.name, pid)
            error = str(e) if isinstance(e, ReloadError) else f"{type(e).__name__} during reload"
            self._note(roll, PidReload(pid, self._wall(), FAILURE), error=error)
            return error
        self._remember(sent, pid, new_pid, serving)
        if before is not None:
            history = self._children_before.setdefault(pid, [])
            history.append((sent, before))
            del history[:-8]  # a worker outliving eight reloads is credited conservatively
        replacement = new_pid or (serving if serving != pid else None)
        self._note(roll, PidReload(pid, sent, OK, new_pid=replacement))
        return None

    async def _send(
        self,
        cons: ConsumerConfig,
        action: ReloadAction,
        pid: int,
        pids: list[int],
        started: Mapping[int, float | None],
    ) -> tuple[int | None, int | None]:
        """The action's reload, then its health gate: the new pid (if the action made one) and the serving pid."""
        per_consumer = action.per_consumer
        # A checks_start action signals through a pidfd, after checking the pid is still the process seen here.
        checks_start = action.checks_start and not per_consumer
        new_pid = await action.reload(pid, started=started.get(pid) if checks_start else None)
        if per_consumer:
            await check_consumer_health(cons.health, match=cons.match, had_processes=bool(pids), find=self._find)
            return new_pid, None
        serving = await check_health(
            cons.health,
            pid=pid,
            new_pid=new_pid,
            replaced=action.replaces,
            match=cons.match,
            old=set(pids),
            find=self._find,
        )
        return new_pid, serving

    def _note(self, roll: _Roll, done: PidReload, *, error: str | None = None) -> None:
        """One process handled: into the roll's record, the reloads metric and the log."""
        roll.reloaded.append(done)
        self._event(
            roll.st.consumer.name,
            done.pid or None,
            done.result,
            roll.creds,
            roll.versions,
            new_pid=done.new_pid,
            error=error,
        )

    async def _end(self, roll: _Roll, result: ReloadResult, *, error: str | None = None) -> None:
        await self._finish(
            roll.st, roll.creds, roll.versions, result=result, error=error, reloaded=tuple(roll.reloaded)
        )

    def _event(
        self,
        consumer: str,
        pid: int | None,
        result: ReloadResult,
        creds: frozenset[CredentialName],
        versions: Mapping[CredentialName, VersionId],
        **extra: Any,
    ) -> None:
        metrics.reloads_total.labels(consumer=consumer, result=result).inc()
        level = logging.WARNING if result == FAILURE else logging.INFO
        fields = {k: v for k, v in extra.items() if v is not None}
        event(
            log,
            "reload",
            level,
            consumer=consumer,
            pid=pid,
            result=result,
            credentials=sorted(creds),
            versions=dict(versions),
            **fields,
        )

    async def _finish(
        self,
        st: _State,
        creds: frozenset[CredentialName],
        versions: Mapping[CredentialName, VersionId],
        *,
        result: ReloadResult,
        error: str | None,
        reloaded: tuple[PidReload, ...],
    ) -> None:
        if result == NOT_NEEDED:
            self._event(st.consumer.name, None, NOT_NEEDED, creds, versions)
        st.status = ConsumerStatus(
            name=st.consumer.name,
            action=st.consumer.reload.action,
            result=result,
            error=error,
            last_reload=self._wall(),
            credentials=creds,
            reloaded=reloaded,
        )
        if self._on_done is not None:
            try:
                maybe = self._on_done(st.consumer.name, creds, result != FAILURE)
                if maybe is not None:
                    await maybe
            except Exception:
                log.exception("on_done callback failed for %s", st.consumer.name)
        self._update_idle()


def _children(pid: int) -> frozenset[int]:
    """The pids of ``pid``'s descendants now (blocking: reads /proc)."""
    try:
        return frozenset(p.pid for p in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return frozenset()
