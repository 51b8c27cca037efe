"""Per-version drain state on this node, and the node report.

Each version of a credential on this node's disk is ``current``, ``draining``
(superseded, still held by some process) or ``drained`` (superseded, held by
nobody, not yet retired); once the store marks it retired its files are
deleted. The ``Tracker`` rescans who holds what (in a thread), publishes
the node report on every change and every heartbeat, and removes retired
versions' directories. It never decides a retirement: the rotator does.

While a version drains, the holders are looked at again between full scans:
at once when one exits (a pidfd each, ``agent.exits``) or opens or closes a
credential file (fanotify, where allowed), and every ``agent.drain_rescan``
(twice as long after each look that found no change, up to scan_interval);
such a quick rescan reads just those processes, and a changed report is
published at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import psutil

from daemon import __version__
from daemon.agent.exits import ExitWatch
from daemon.agent.state import CredentialState
from daemon.config import Config
from daemon.errors import BatonError, PayloadError, StoreError
from daemon.files.renderworker import RenderWorker
from daemon.issuers.base import Issuer
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.model import CredentialName, VersionId
from daemon.reload.reloader import Reloader
from daemon.report.base import Holder, NodeReport, Reporter
from daemon.stores.base import SecretStore
from daemon.usage.attribute import Usage, attribute
from daemon.usage.consumers import START_SLACK, match_all, process_start
from daemon.usage.environ import fingerprint
from daemon.usage.scan import Sighting, VersionFiles, scan

if TYPE_CHECKING:
    from daemon.files.writer import OnDisk
    from daemon.usage.fanotify import OpenWatcher

log = logging.getLogger(__name__)


class PublishResult(StrEnum):
    """How one node report's publish ended (the report publishes metric's ``result`` label)."""

    OK = "ok"
    FAILURE = "failure"  # tried again at the next change or heartbeat


class VersionState(StrEnum):
    """A version on this node, as the status shows it (a retired one has left the disk, so it has no state here)."""

    CURRENT = "current"
    DRAINING = "draining"  # superseded, still held by some process
    DRAINED = "drained"  # superseded, held by nobody, not yet retired


class Tracker:
    """Scans usage, publishes node reports, removes retired versions. One per agent generation."""

    def __init__(
        self,
        *,
        config: Config,
        credentials: Mapping[CredentialName, CredentialState],
        store: SecretStore,
        renderer: RenderWorker,
        reporter: Reporter,
        reloader: Reloader | None,
        env_key: bytes,
        issuers: Mapping[CredentialName, Issuer] | None = None,
    ) -> None:
        self.config = config
        # Issued credentials' sources (daemon/issuers/): told after every scan who holds what.
        self.issuers: Mapping[CredentialName, Issuer] = issuers or {}
        # This generation's credentials (the agent's dict: the status API and the tracker see the same states).
        self.credentials = credentials
        self.store = store
        self.renderer = renderer
        self.reporter = reporter
        self.reloader = reloader
        self.env_key = env_key  # fingerprints are useless outside this process
        self._poke = asyncio.Event()
        self.usage: dict[CredentialName, Usage] = {}
        self._published: dict[CredentialName, NodeReport] = {}
        self._last_publish: dict[CredentialName, float] = {}
        self._retired_seen: dict[str, float] = {}
        self.consumers = {c.name: c for cred in config.credentials for c in cred.consumers}
        self.creds_of: dict[str, list[CredentialName]] = {}
        for cred in config.credentials:
            for c in cred.consumers:
                self.creds_of.setdefault(c.name, []).append(cred.name)
        self.opens: OpenWatcher | None = None
        self._on_disk: dict[CredentialName, list[OnDisk]] = {}
        self._scanned_current: dict[CredentialName, VersionId | None] = {}
        # The quick rescan of a draining version's holders, between full scans (see the module doc).
        self._let_go = asyncio.Event()  # a holder exited or opened/closed a credential file (or a poke)
        self._draining_pids: frozenset[int] = frozenset()  # holders of superseded versions (read by fanotify's thread)
        self.exits = ExitWatch(lambda pid: self._let_go.set())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._files: list[VersionFiles] = []  # the last full scan's inputs, reused by the quick rescans
        self._env_names: set[str] = set()
        self._consumer_pids: dict[str, list[int]] = {}
        self._started: dict[int, float] = {}

    def poke(self) -> None:
        """Something changed: rescan soon."""
        self._poke.set()
        self._let_go.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_open_watcher()
        try:
            last_cleanup = 0.0
            while True:
                self._poke.clear()
                await self.scan_once()
                await self.observe_issued()
                now = time.monotonic()
                if now - last_cleanup >= min(self.config.report.heartbeat, 30.0):
                    await self.cleanup_retired()
                    last_cleanup = now
                await self.publish_all()
                await self._between_scans()
        finally:
            self.exits.close()
            if self.opens is not None:
                await asyncio.to_thread(self.opens.close)

    def _start_open_watcher(self) -> None:
        if self.config.agent.fanotify == "off":
            return
        from daemon.usage.fanotify import OpenWatcher

        ok, why = OpenWatcher.available()
        if not ok:
            log.info("open events (fanotify) are off; using fd scans, env and start times", extra={"reason": why})
            return
        try:
            self.opens = OpenWatcher(on_event=self._file_event)
        except OSError as e:
            log.info("open events (fanotify) are off", extra={"reason": str(e)})

    async def _between_scans(self) -> None:
        """Wait for the next full scan (or a poke); meanwhile rescan a draining version's holders."""
        # Holders only matter while an old version is on disk; otherwise a
        # scan per heartbeat keeps the status fresh at almost no cost.
        interval = self.config.agent.scan_interval
        draining = any(len(v) > 1 for v in self._on_disk.values())
        wait = interval if draining else max(interval, self.config.report.heartbeat)
        deadline = time.monotonic() + wait
        rescan = self.config.agent.drain_rescan
        while not self._poke.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not self._draining_pids:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), left)
                return
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._let_go.wait(), min(left, rescan))
                woken = True
            if self._poke.is_set():
                return
            self._let_go.clear()
            if await self.rescan_holders():
                rescan = self.config.agent.drain_rescan
                await self.observe_issued()
                await self.publish_all()
            elif not woken:
                # Nobody let go since the last look: look half as often (up to scan_interval), so
                # a long drain with many holders stays cheap; exits and file events still wake it.
                rescan = min(rescan * 2, interval)

    def _file_event(self, pid: int) -> None:
        """fanotify's reader thread: a process opened or closed a credential file."""
        loop = self._loop
        if pid in self._draining_pids and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: the agent is stopping
                loop.call_soon_threadsafe(self._let_go.set)

    def _follow_holders(self) -> None:
        """Remember who holds a superseded version; watch those processes' exits."""
        pids = {
            h.pid
            for name, usage in self.usage.items()
            for version, holders in usage.holders.items()
            if version != self._scanned_current.get(name)
            for h in holders
            if h.pid > 0
        }
        self._draining_pids = frozenset(pids)
        self.exits.follow(pids)

    async def rescan_holders(self) -> bool:
        """Look again at just the processes that held a superseded version at the last scan.

        A process that exited (its pidfd said so) or holds nothing of it any more
        drops out; one seen holding another version moves there. Everything else
        keeps the last full scan's answer. True when the holders changed.
        """
        pids = self._draining_pids
        if not pids:
            return False
        look = pids - self.exits.exited
        started_before = self._started
        reloader = self.reloader

        def blocking() -> tuple[list[Sighting], dict[int, float]]:
            sightings = scan(
                self._files, env_key=self.env_key, env_names=self._env_names, opens=self.opens, only_pids=look
            )
            started: dict[int, float] = {}
            for pid in look:
                born = process_start(pid)
                # A recycled pid (another start time) is not the consumer process we knew.
                if born is not None and abs(born - started_before.get(pid, born)) <= 1.0:
                    started[pid] = born
            return sightings, started

        sightings, started = await asyncio.to_thread(blocking)
        reloaded = _reload_times(started, reloader)
        exes = {h.pid: h.exe for u in self.usage.values() for hs in u.holders.values() for h in hs}
        quick = attribute(
            sightings=sightings,
            consumers=self.consumers,
            consumer_pids={n: [p for p in ps if p in started] for n, ps in self._consumer_pids.items()},
            on_disk=self._on_disk,
            current={n: s.version for n, s in self.credentials.items()},
            started=started,
            reloaded=reloaded,
            exes=exes,
            creds_of=self.creds_of,
        )
        changed = False
        for name in set(self.usage) | set(quick):
            before = self.usage.get(name, Usage()).holders
            merged: dict[VersionId, list[Holder]] = {}
            for version, holders in before.items():
                kept = [h for h in holders if h.pid not in pids]
                if kept:
                    merged[version] = kept
            for version, holders in quick.get(name, Usage()).holders.items():
                merged.setdefault(version, []).extend(holders)
            merged = {v: sorted(hs, key=lambda h: h.pid) for v, hs in merged.items()}
            if merged != {v: hs for v, hs in before.items() if hs}:
                changed = True
                self.usage[name] = Usage(merged)
                for d in self._on_disk.get(name, []):
                    metrics.versions_in_use.labels(name, d.version).set(self.usage[name].count(d.version))
        self._follow_holders()
        return changed

    # ------------------------------------------------------------ scanning

    async def _env_fingerprints(self, state: CredentialState, version: VersionId) -> tuple[str, ...] | None:
        """The version's env fingerprints; None when they cannot be known (then it counts as held)."""
        cred = state.config
        if not cred.output.env:
            return ()
        if version not in state.fingerprints:
            # Written before this process started: render it again from the store.
            limits = self.config.agent
            try:
                secret = await self.source(state.config.name).read(cred.key, version)
                rendered = await self.renderer.render(
                    files={},
                    env=cred.output.env,
                    payload=secret.payload,
                    time_limit=limits.render_timeout,
                    max_bytes=limits.max_file_size,
                )
            except (StoreError, PayloadError, OSError):
                return None
            values = rendered.env
            state.fingerprints[version] = tuple(fingerprint(self.env_key, k, v) for k, v in values.items())
        return state.fingerprints[version]

    def source(self, name: CredentialName) -> SecretStore | Issuer:
        """Where a credential's versions come from: its issuer when this node issues it, else the store."""
        return self.issuers.get(name, self.store)

    async def observe_issued(self) -> None:
        """Tell each issuer what the last scan saw held (it keeps those alive and lets the rest go)."""
        for name, issuer in self.issuers.items():
            usage = self.usage.get(name, Usage())
            try:
                await issuer.observe(self._scanned_current.get(name), usage.holders)
            except Exception as e:
                # One credential's trouble never stops the tracker: the next scan tells it again.
                log.warning("issuer did not take the scan", extra={"credential": name, "error": type(e).__name__})

    def on_disk(self, name: CredentialName) -> list[str]:
        """Versions of a credential on disk as of the last scan (no I/O: for the status API)."""
        return [d.version for d in self._on_disk.get(name, [])]

    async def scan_once(self) -> None:
        states = self.credentials
        # Reports pair holders with the current version as it was when the scan
        # began: a swap during the scan must not read as "new current, no old holders".
        current_at_start = {n: s.version for n, s in states.items()}
        files: list[VersionFiles] = []
        unknown: list[tuple[CredentialName, VersionId]] = []  # versions whose env holders cannot be seen now
        env_names: set[str] = set()
        on_disk = await asyncio.to_thread(lambda: {n: s.writer.versions() for n, s in states.items()})
        for name, state in states.items():
            env_names.update(state.config.output.env)
            for d in on_disk[name]:
                fps = await self._env_fingerprints(state, d.version)
                if fps is None:
                    unknown.append((name, d.version))
                files.append(VersionFiles(name, d.version, d.inodes, fps or ()))
        if self.opens is not None:
            # Open events are marked on the directories that hold the files: each
            # version's own dir, or the output dir itself in copy layout.
            dirs = {
                os.fspath(states[name].writer.dir / d.dirname if d.dirname else states[name].writer.dir)
                for name, versions in on_disk.items()
                for d in versions
            }
            await asyncio.to_thread(self.opens.watch, sorted(dirs))
        matches = {name: c.match for name, c in self.consumers.items()}
        reloader = self.reloader

        def blocking() -> tuple[list[Sighting], dict[str, list[int]], dict[int, float], dict[int, str]]:
            sightings = scan(files, env_key=self.env_key, env_names=env_names, opens=self.opens)
            pids = match_all(matches)
            started: dict[int, float] = {}
            exes: dict[int, str] = {}
            for pid in {p for ps in pids.values() for p in ps}:
                born = process_start(pid)
                if born is not None:
                    started[pid] = born
                with contextlib.suppress(psutil.Error):
                    exes[pid] = psutil.Process(pid).exe()
            return sightings, pids, started, exes

        sightings, pids, started, exes = await asyncio.to_thread(blocking)
        self._files, self._env_names, self._consumer_pids, self._started = files, env_names, pids, started
        reloaded = _reload_times(started, reloader)
        self.usage = attribute(
            sightings=sightings,
            consumers=self.consumers,
            consumer_pids=pids,
            on_disk=on_disk,
            current={n: s.version for n, s in states.items()},
            started=started,
            reloaded=reloaded,
            exes=exes,
            creds_of=self.creds_of,
        )
        for name, version in unknown:
            if version == current_at_start.get(name):
                continue
            # Cannot tell who has it in their environment: count it as held (blocks retirement).
            holders = self.usage.setdefault(name, Usage()).holders.setdefault(version, [])
            holders.append(Holder(0, "", None, "env-unknown", version))
        self._on_disk = on_disk
        self._scanned_current = current_at_start
        self._follow_holders()
        for name in states:
            usage = self.usage.get(name, Usage())
            for d in on_disk[name]:
                metrics.versions_in_use.labels(name, d.version).set(usage.count(d.version))

    def report_for(self, name: CredentialName) -> NodeReport:
        state = self.credentials[name]
        usage = self.usage.get(name, Usage())
        holders = [h for v in sorted(usage.holders) for h in usage.holders[v]]
        return NodeReport(
            node=self.config.node_id,
            credential=name,
            current=self._scanned_current.get(name),
            in_use={v: len(h) for v, h in usage.holders.items() if h},
            holders=tuple(holders[: self.config.report.max_holders]),
            heartbeat=time.time(),
            agent_version=__version__,
            errors=(state.last_error,) if state.last_error else (),
        )

    async def publish_all(self) -> None:
        now = time.monotonic()
        for name, state in self.credentials.items():
            if not state.written or name in self.issuers:
                # An issued credential's report has no reader: no rotator's gate decides its
                # retirement, the issuer here does (observe), and the store has no key for it.
                continue
            report = self.report_for(name)
            due = now - self._last_publish.get(name, 0.0) >= self.config.report.heartbeat
            if report.same_state(self._published.get(name)) and not due:
                continue
            try:
                await self.reporter.publish(state.config.key, report)
            except BatonError as e:
                metrics.report_publishes_total.labels(PublishResult.FAILURE).inc()
                log.warning("node report not published", extra={"credential": name, "error": str(e)})
                continue
            metrics.report_publishes_total.labels(PublishResult.OK).inc()
            self._published[name] = report
            self._last_publish[name] = now

    async def cleanup_retired(self) -> None:
        """Delete the files of versions the store marks retired, and of superseded versions
        that nothing on this node holds beyond the newest ``output.keep_previous`` (an
        operator's puts retire nothing). Never the current one."""
        for name, state in self.credentials.items():
            local = [d for d in await asyncio.to_thread(state.writer.versions) if d.version != state.version]
            if not local:
                continue
            doomed = self._unheld_beyond_keep(name, local, state.config.output.keep_previous)
            try:
                known = {v.id: v for v in await self.source(name).versions(state.config.key)}
            except StoreError as e:
                metrics.store_errors_total.labels(self.config.store.kind, "versions").inc()
                log.warning("cannot check for retired versions", extra={"credential": name, "error": str(e)})
            else:
                for d in local:
                    info = known.get(d.version)
                    if info is None or info.retired:
                        doomed.add(d.version)
            for version in sorted(doomed):
                try:
                    await asyncio.to_thread(state.writer.remove, version)
                except BatonError as e:
                    log.warning("version files not removed", extra={"credential": name, "error": str(e)})
                    continue
                state.fingerprints.pop(version, None)
                with contextlib.suppress(KeyError):
                    metrics.versions_in_use.remove(name, version)
                event(log, "version_removed", credential=name, version=version)

    def _unheld_beyond_keep(self, name: CredentialName, local: list[OnDisk], keep: int) -> set[VersionId]:
        # Only versions the last scan saw superseded: their holder counts come from it.
        usage = self.usage.get(name, Usage())
        scanned = {d.version for d in self._on_disk.get(name, ()) if d.version != self._scanned_current.get(name)}
        superseded = sorted((d for d in local if d.version in scanned), key=lambda d: d.swapped_in, reverse=True)
        return {d.version for d in superseded[keep:] if usage.count(d.version) == 0}

    # ------------------------------------------------------------ status

    def version_states(self, name: CredentialName) -> dict[str, dict[str, Any]]:
        state = self.credentials[name]
        usage = self.usage.get(name, Usage())
        out: dict[str, dict[str, Any]] = {}
        for d in self._on_disk.get(name, []):
            holders = usage.holders.get(d.version, [])
            st = (
                VersionState.CURRENT
                if d.version == state.version
                else VersionState.DRAINING
                if holders
                else VersionState.DRAINED
            )
            out[d.version] = {
                "state": st,
                "swapped_in": d.swapped_in,
                "holders": [{"pid": h.pid, "exe": h.exe, "consumer": h.consumer, "how": h.how} for h in holders],
            }
        return out

    def add_status(self, out: dict[str, Any]) -> None:
        for name, cred in out["credentials"].items():
            if name in self.credentials:
                cred["versions"] = self.version_states(name)


def _reload_times(started: Mapping[int, float], reloader: Reloader | None) -> dict[int, float]:
    """When each process was last reloaded by us. A child its parent forked after one of our
    reloads (not among the children it had just before; started since) loaded what the parent
    did then: nginx's workers, each generation holding its version until it exits."""
    if reloader is None:
        return {}
    out = {p: at for p in started if (at := reloader.reloaded_at(p)) is not None}
    for pid, born in started.items():
        if pid in out:
            continue
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            continue
        for at, before in reversed(reloader.reloads_of(parent)):
            if pid not in before:
                if born >= at - START_SLACK:
                    out[pid] = at
                break
    return out
