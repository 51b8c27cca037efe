"""One credential's rotation: create -> apply -> test -> promote, then guarded retirement.

Every step is idempotent and resumable from what the store records: a version
staged ``pending`` is a rotation in progress, and the next run applies, tests
and promotes that same payload again rather than minting another. A failed step
leaves the current version untouched; the rotation is retried at the next
interval. A rotation is postponed while ``max_draining`` superseded versions
still wait for retirement, so live credentials never pile up (and a provider
with two slots never reuses a slot that is still in use).

What Baton applied is recorded in the key's metadata, never inferred from
stages or labels (which an operator or a lost answer can change):

- before the data write, ``baton.rotation`` says a write is under way, with the
  new payload's digest and the principal (role, slot) it names, so a write that
  landed unrecorded (a slow answer, a crash between the store's two writes) is
  found again and resumed, never followed by a second one;
- before ``apply``, ``baton.own.<version>`` = ``applying:<principal>``, then
  ``promoted:<principal>`` with the promotion, ``retiring:<principal>`` before
  the provider retires it; the entry goes with Baton's own retirement.

Only a version recorded ``promoted`` is retired through the provider (which
also refuses a principal that the current or a newer version names), and only
Baton's retirement ends its draining: a label or stage that vanished does not.
Any other version (written by hand, a stray write, a seed) is retired in the
store only, with a warning, once no node holds it; its sessions are not asked.

``BATON_TEST_DELAY`` (seconds; tests only, read only when set) sleeps a random
part of it before and after every store and provider call, so a crash campaign
can kill the rotator inside each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from daemon.config import Config, CredentialConfig
from daemon.errors import ActionRefused, BatonError, PayloadError, ProviderBlocked, StoreNotFound
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.model import PENDING, NodeId, Secret, VersionId, VersionInfo
from daemon.providers.base import Provider
from daemon.report.base import NodeReader, NodeReport, Reporter
from daemon.report.holders import HolderSource
from daemon.rotation.gate import Decision, decide
from daemon.rotation.ledger import (
    APPLYING,
    PROMOTED,
    RETIRING,
    Own,
    draining,
    ledger,
    own_key,
    retired_by_provider,
    superseded,
)
from daemon.rotation.reader import GateReader
from daemon.stores.base import SecretStore

log = logging.getLogger(__name__)

STATE_KEY = "baton.rotation"
LAST_KEY = "baton.rotation.last"
FORCED_PREFIX = "baton.forced."  # + version: a retirement forced through `baton retire --force`
DELAY_ENV = "BATON_TEST_DELAY"
# The quick check (``_blockers_remain``) re-reads blocking nodes this many per
# round, for at most QUICK_ROUNDS rounds that find none still blocking: past
# that, most blockers have likely cleared (a drain comes in a burst) and one
# full collect learns the rest faster than a sweep node by node.
QUICK_ROUND = 16
QUICK_ROUNDS = 4


class RotationResult(StrEnum):
    """How one rotation attempt ended (``Outcome.result``, the status API's last outcome)."""

    ROTATED = "rotated"
    POSTPONED = "postponed"  # too many versions still draining: the next interval tries again
    FAILED = "failed"  # a step failed; the current credential is untouched

    @property
    def metric(self) -> str:
        """The rotations metric's ``result`` label (older names, kept for dashboards)."""
        return {"rotated": "success", "failed": "failure"}.get(self.value, self.value)


class RotationStep(StrEnum):
    """The step a rotation failed at (``Outcome.step``, the rotation failures metric's ``step`` label)."""

    CREATE = "create"  # the provider mints the new payload
    WRITE = "write"  # the store records it pending
    APPLY = "apply"  # the provider makes it valid
    TEST = "test"  # the provider proves it works
    PROMOTE = "promote"  # the store makes it current


@dataclass(frozen=True)
class Outcome:
    result: RotationResult
    version: VersionId | None = None
    step: RotationStep | None = None
    error: str | None = None


class _Delayed:
    """Test-only (``BATON_TEST_DELAY``): a random sleep before and after every async call of ``inner``."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def delayed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(random.uniform(0, self._delay))
            result = await attr(*args, **kwargs)
            await asyncio.sleep(random.uniform(0, self._delay))
            return result

        return delayed


def _test_delay() -> float:
    try:
        return max(0.0, float(os.environ.get(DELAY_ENV, "")))
    except ValueError:
        return 0.0


def _fingerprint(payload: Secret) -> str:
    """A digest that survives a store's round trip: Vault gives a JSON object back
    with its keys sorted and no spaces, so an object is hashed in that form."""
    text = payload.reveal()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _state(meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        state = json.loads(meta.get(STATE_KEY, "") or "{}")
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


class CredentialRotator:
    def __init__(
        self,
        *,
        config: Config,
        credential: CredentialConfig,
        store: SecretStore,
        reporter: Reporter,
        provider: Provider,
        holders: HolderSource | None = None,
    ) -> None:
        assert credential.rotation is not None
        self.config = config
        self.cred = credential
        self.rotation = credential.rotation
        self.store = store
        self.reporter = reporter
        self.provider = provider
        if delay := _test_delay():
            self.store = cast(SecretStore, _Delayed(store, delay))
            self.provider = cast(Provider, _Delayed(provider, delay))
        self.gate = GateReader(
            config=config,
            credential=credential,
            store=self.store,
            reporter=reporter,
            provider=self.provider,
            holders=holders,
        )
        self.last_outcome: Outcome | None = None
        self.last_decisions: list[Decision] = []
        self.retired_total = 0
        self.retire_failures = 0  # retirements that failed in the last retire_ready pass
        self.retired_event = asyncio.Event()  # set whenever a version is retired
        self.retiring = asyncio.Lock()  # one retirement at a time: the gate's (retire_ready) or a forced one
        self.timing = credential.rotation.timing(credential.name)  # when it rotates (daemon.schedule)
        self.step: RotationStep | None = None  # the step a running rotation is at
        self.nodes_current: dict[NodeId, VersionId | None] = {}  # each node's current version, last evaluated
        self.promoted_event = asyncio.Event()  # set whenever a rotation promoted one (the retire loop looks at once)
        # The rotator's lease check (daemon.rotation.leadership), awaited before each step that
        # changes the credential: it raises once another rotator holds the lease.
        self.fence: Callable[[], Awaitable[None]] | None = None
        self._seen: set[NodeId] = set()
        self._had_current = False  # this rotator has seen a current version (so a missing one was lost)
        self._full_at: float | None = None  # monotonic time of the last full evaluate
        self._full_new = VersionId("")  # the current version that evaluate judged against
        self._blocking: dict[VersionId, set[NodeId]] = {}  # version -> nodes still to re-read (quick check)
        self._unrecorded: list[str] = []  # live principals no version names, as last said

    @property
    def key(self) -> str:
        return self.cred.key

    def reschedule(self, every: float) -> None:
        """Rotate every ``every`` seconds from now on (the demo and the benchmarks slow a schedule down).

        The schedule is timed from ``self.timing``, so replacing ``rotation`` alone changes nothing.
        """
        self.rotation = self.rotation.model_copy(update={"every": every, "cron": None})
        self.timing = self.rotation.timing(self.cred.name)

    @property
    def max_draining(self) -> int:
        """Superseded versions allowed to wait at once; a provider's slots bound it."""
        slots = self.provider.slots
        if slots is None:
            return self.rotation.max_draining
        return max(1, min(self.rotation.max_draining, slots - 1))

    # ------------------------------------------------------------ rotate

    async def due_at(self) -> float:
        """When the next rotation is due (wall time); now when there is no current version."""
        try:
            meta = await self.store.read_metadata(self.key)
        except StoreNotFound:
            return time.time()  # no such key yet: the first rotation creates it
        try:
            last = float(meta.get(LAST_KEY, ""))
        except ValueError:
            versions = await self._versions()
            current = [v for v in versions if v.is_current]
            if not current:
                return time.time()
            last = current[-1].created
        return self.timing.due(last=last, now=time.time())

    async def rotate(self) -> Outcome:
        """Run one rotation (or resume one). Never raises for a failed step: returns the outcome."""
        self.step = step = RotationStep.CREATE
        try:
            versions = await self._versions()
            meta = await self._metadata()
            owned = ledger(meta)
            await self._settle(versions, owned)
            current = await self._current_payload()
            self._had_current = self._had_current or current is not None
            await self._check_live(versions, owned)
            found = await self._in_flight(versions, owned, _state(meta))
            if found is not None:
                info, new = found
                event(log, "rotation_resumed", credential=self.cred.name, version=info.id)
            else:
                waiting = superseded(versions, owned)
                if len(waiting) >= self.max_draining:
                    outcome = Outcome(RotationResult.POSTPONED, error=f"{len(waiting)} version(s) still draining")
                    metrics.rotations_total.labels(self.cred.name, RotationResult.POSTPONED.metric).inc()
                    event(
                        log,
                        "rotation_postponed",
                        credential=self.cred.name,
                        draining=[v.id for v in waiting],
                        max_draining=self.max_draining,
                    )
                    self.last_outcome = outcome
                    return outcome
                if current is None and (versions or owned or LAST_KEY in meta or self._had_current):
                    event(
                        log,
                        "current_version_lost",
                        logging.WARNING,
                        credential=self.cred.name,
                        versions=[v.id for v in versions],
                        recorded=sorted(owned),
                        action="the provider checks what is live before minting; nothing live is reused",
                    )
                new = await self.provider.create(current=current)
                principal = self._principal(new)
                self.step = step = RotationStep.WRITE
                await self._fenced()
                # Said before the data write, so a write that lands unrecorded is found again.
                # A key that does not exist yet has no metadata to say it in (Vault, AWS);
                # its store records the first version as it makes the key.
                with contextlib.suppress(StoreNotFound):
                    await self._record(None, "creating", digest=_fingerprint(new), principal=principal)
                info = await self.store.create(self.key, new)
                await self._record(info.id, "created", digest=_fingerprint(new), principal=principal, fresh=not meta)
            self.step = step = RotationStep.APPLY
            await self._fenced()
            await self.provider.apply(new, current=current)
            await self._record(
                info.id, "applied", digest=_fingerprint(new), principal=self._principal(new), fresh=not meta
            )
            self.step = step = RotationStep.TEST
            await self.provider.test(new)
            await self._record(
                info.id, "tested", digest=_fingerprint(new), principal=self._principal(new), fresh=not meta
            )
            self.step = step = RotationStep.PROMOTE
            await self._fenced()
            await self.store.promote(self.key, info.id)
            await self.store.merge_metadata(
                self.key,
                {
                    STATE_KEY: None,
                    LAST_KEY: repr(time.time()),
                    own_key(info.id): Own(PROMOTED, self._principal(new)).encode(),
                },
            )
        except BatonError as e:
            metrics.rotations_total.labels(self.cred.name, RotationResult.FAILED.metric).inc()
            metrics.rotation_failures_total.labels(self.cred.name, step).inc()
            event(log, "rotation_failed", logging.ERROR, credential=self.cred.name, step=step, error=str(e))
            if isinstance(e, ProviderBlocked):
                metrics.rotation_blocked.labels(self.cred.name).set(1)
                event(
                    log,
                    "rotation_blocked",
                    logging.ERROR,
                    credential=self.cred.name,
                    step=step,
                    live=list(e.live),
                    action=e.action,
                )
            self.last_outcome = Outcome(RotationResult.FAILED, step=step, error=str(e))
            return self.last_outcome
        metrics.rotation_blocked.labels(self.cred.name).set(0)
        metrics.rotations_total.labels(self.cred.name, RotationResult.ROTATED.metric).inc()
        event(log, "rotated", credential=self.cred.name, version=info.id)
        self.promoted_event.set()
        self.last_outcome = Outcome(RotationResult.ROTATED, version=info.id)
        return self.last_outcome

    async def _fenced(self) -> None:
        if self.fence is not None:
            await self.fence()

    async def _in_flight(
        self, versions: list[VersionInfo], owned: Mapping[VersionId, Own], state: Mapping[str, Any]
    ) -> tuple[VersionInfo, Secret] | None:
        """The version of a rotation in progress, with its payload; None when there is none.

        Ours only: a pending version Baton recorded, or one whose payload is the
        digest ``baton.rotation`` announced before its data write (the write
        landed, its record did not). A version written by hand is never applied.
        """
        by_id = {v.id: v for v in versions}
        digest = str(state.get("digest") or "")
        newest_current = max((v.created for v in versions if v.is_current), default=0.0)
        candidates: list[VersionInfo] = []
        said = by_id.get(VersionId(str(state.get("version") or "")))
        if said is not None and not said.retired and (PENDING in said.stages or said.is_current):
            candidates.append(said)  # on a store whose first version is current at once (AWS)
        candidates += [v for v in reversed(versions) if PENDING in v.stages and not v.retired]
        if state.get("step") == "creating":
            candidates += [
                v
                for v in reversed(versions)
                if not v.retired and not v.is_current and v.id not in owned and v.created >= newest_current
            ]
        seen: set[str] = set()
        for info in candidates:
            if info.id in seen:
                continue
            seen.add(info.id)
            own = owned.get(info.id)
            if own is not None and own.state != APPLYING:
                continue  # promoted already (or retiring): not in flight
            if own is None and not digest:
                self._foreign(info.id, "pending, but not written by Baton: not applied")
                continue
            try:
                payload = (await self.store.read(self.key, info.id)).payload
            except StoreNotFound:
                continue
            if own is None:
                if _fingerprint(payload) != digest:
                    if PENDING in info.stages:
                        self._foreign(info.id, "pending, but not written by Baton: not applied")
                    continue
                event(log, "unrecorded_version_found", logging.WARNING, credential=self.cred.name, version=info.id)
                await self._record(info.id, "created", digest=digest, principal=self._principal(payload))
            return info, payload
        return None

    async def _check_live(self, versions: list[VersionInfo], owned: Mapping[VersionId, Own]) -> None:
        """Ask the provider what is live, and say (once per change) what no version names:
        the store lost the version that uses it (deleted, restored from an old backup, a
        fresh dev server). Such a principal is left exactly as it is: never re-passworded
        (the provider refuses), never retired (no version names it)."""
        live = await self.provider.live()
        # Named: what each version the store still has stands for. A ledger entry of a version
        # the store no longer has (the Secret overwritten by hand, the key deleted) names nothing:
        # nothing will ever retire that principal, so it is said.
        named: set[str] = set()
        for v in versions:
            own = owned.get(v.id)
            if own is not None and own.principal:
                named.add(own.principal)
                continue
            if v.retired and not draining(own):
                continue
            with contextlib.suppress(StoreNotFound, PayloadError):
                if principal := self._principal((await self.store.read(self.key, v.id)).payload):
                    named.add(principal)
        unrecorded = sorted(set(live) - named)
        metrics.live_unrecorded.labels(self.cred.name).set(len(unrecorded))
        if unrecorded and unrecorded != self._unrecorded:
            event(
                log,
                "live_credential_unrecorded",
                logging.WARNING,
                credential=self.cred.name,
                live=unrecorded,
                action="left as it is (never re-passworded, never retired by Baton); restore the store's "
                "version that names it, or revoke it by hand once nothing uses it",
            )
        self._unrecorded = unrecorded

    def _foreign(self, version: VersionId, what: str) -> None:
        event(log, "foreign_version", logging.WARNING, credential=self.cred.name, version=version, found=what)

    async def _settle(self, versions: list[VersionInfo], owned: Mapping[VersionId, Own]) -> None:
        """Drop the ledger entries of versions Baton was retiring and the store has retired
        (a crash between the store's retire and the entry's removal)."""
        fixes: dict[str, str | None] = {}
        for v in versions:
            own = owned.get(v.id)
            if own is not None and v.retired and own.state == RETIRING:
                fixes[own_key(v.id)] = None
        if fixes:
            await self.store.merge_metadata(self.key, fixes)

    def _principal(self, payload: Secret) -> str:
        """The provider's name for what ``payload`` stands for (role, slot); "" when it has none."""
        return self.provider.principal(payload) or ""

    async def _metadata(self) -> dict[str, str]:
        return await self.gate.metadata()

    async def _versions(self) -> list[VersionInfo]:
        """The key's versions; none when the key does not exist yet (first rotation)."""
        return await self.gate.versions()

    async def _current_payload(self) -> Secret | None:
        try:
            return (await self.store.read(self.key)).payload
        except StoreNotFound:
            return None
        except PayloadError as e:
            # A current version the store cannot hand over (too big, not UTF-8):
            # rotate it away as if there were none, rather than fail every time.
            event(log, "current_payload_unreadable", logging.WARNING, credential=self.cred.name, reason=e.reason)
            return None

    async def _record(
        self, version: VersionId | None, step: str, *, digest: str, principal: str, fresh: bool = False
    ) -> None:
        """Say how far the rotation got; from ``created`` on, the version is recorded as Baton's.

        ``fresh``: the key had no metadata before this rotation. A store that makes the key
        only at promote (Kubernetes: the first version waits in its -baton-pending companion)
        has nowhere to say it until then; the promote records it."""
        state = {"version": version, "step": step, "digest": digest, "principal": principal, "at": time.time()}
        entries: dict[str, str | None] = {STATE_KEY: json.dumps(state)}
        if version is not None:
            entries[own_key(version)] = Own(APPLYING, principal).encode()
        try:
            await self.store.merge_metadata(self.key, entries)
        except StoreNotFound:
            if not fresh:
                raise

    # ------------------------------------------------------------ retire

    async def known_nodes(self) -> set[NodeId]:
        """Nodes with a report on record. Reports persist until a node is forgotten,
        so the records themselves are the list of known nodes (no shared list to
        outgrow a store's metadata limits)."""
        return {r.node for r in await self.reporter.collect(self.key, self.cred.name)}

    def _remember(self, reports: list[NodeReport]) -> set[NodeId]:
        """Known nodes: those reporting, plus, while this rotator lives, any seen
        before whose record vanished (missing is unknown, and unknown blocks),
        unless the reporter says a missing record means gone (a deleted Pod)."""
        reporting = {r.node for r in reports}
        for node in sorted(reporting - self._seen):
            event(log, "node_joined", credential=self.cred.name, node=node)
        if self.reporter.absent_means_gone:
            for node in sorted(self._seen - reporting):
                event(log, "node_gone", credential=self.cred.name, node=node)
            self._seen = reporting
        else:
            self._seen |= reporting
        return set(self._seen)

    async def forget(self, node: NodeId) -> None:
        await self.reporter.forget(self.key, node)
        self._seen.discard(node)
        self._full_at = None  # it may have been a blocker: the next pass judges on a full collect
        event(log, "node_forgotten", credential=self.cred.name, node=node)

    async def evaluate(
        self,
        *,
        versions: list[VersionInfo] | None = None,
        owned: Mapping[VersionId, Own] | None = None,
    ) -> list[Decision]:
        """The gate's answer for every superseded version (``GateReader.decisions``), with the
        rotator's policies: the nodes it remembers count as known, and nodes silent past
        ``forget_after`` are forgotten."""
        if versions is None:
            versions = await self._versions()
        if owned is None:
            owned = ledger(await self._metadata())
        waiting = superseded(versions, owned)
        current = [v for v in versions if v.is_current]
        if not waiting or not current:
            self.last_decisions = []
            return []
        reports = await self.reporter.collect(self.key, self.cred.name)
        self._full_at, self._full_new = time.monotonic(), current[-1].id
        known = self._remember(reports)
        now = time.time()
        forget_after = self.config.report.forget_after
        if forget_after is not None:
            for r in reports:
                # A stand-in for an unreadable or missing report (heartbeat 0) is not a
                # silent node: it must keep blocking, never be forgotten by age.
                if r.heartbeat > 0 and now - r.heartbeat > forget_after:
                    await self.forget(r.node)
                    known.discard(r.node)
            reports = [r for r in reports if r.node in known]
        decisions = await self.gate.decisions(versions=versions, owned=owned, reports=reports, known=known, now=now)
        self.last_decisions = decisions
        self._blocking = {d.version: set(d.blocking) for d in decisions}
        self.nodes_current = {r.node: r.current for r in reports}
        created: dict[VersionId, float] = {v.id: v.created for v in versions}
        metrics.pending_retirements.labels(self.cred.name).set(sum(not d.retire for d in decisions))
        oldest = min((created.get(d.version, now) for d in decisions if not d.retire), default=now)
        metrics.oldest_pending_seconds.labels(self.cred.name).set(now - oldest)
        return decisions

    async def _blockers_remain(self, versions: list[VersionInfo]) -> bool:
        """True when every version the last full evaluate held back still has a node blocking it.

        For reporters that read one entry per node (``collect_nodes``, the Vault
        status path), a full collect of a large fleet takes a while. While a drain
        goes on, this re-reads the blocking nodes a round at a time and stops as
        soon as each version has one that still blocks it; a node found cleared is
        not read again before the next full collect, and QUICK_ROUNDS rounds in a
        row with no blocker hand over to the full collect. It never answers
        "retire": that is only ever decided on a full collect, which runs as soon
        as some version's blockers have (likely) cleared, when the versions
        changed, after a forget, and at least once per report TTL (new nodes,
        forget_after, the pending metrics; a node goes stale no sooner). Forcing
        it more often lands the full collect in the drain's write burst, where it
        is slowest.
        """
        reporter = self.reporter
        decisions = self.last_decisions
        if not isinstance(reporter, NodeReader) or not decisions or self._full_at is None:
            return False
        if time.monotonic() - self._full_at >= self.config.report.report_ttl:
            return False
        current = [v for v in versions if v.is_current]
        if not current or current[-1].id != self._full_new:
            return False
        if {v.id for v in superseded(versions)} != {d.version for d in decisions}:
            return False
        if any(d.retire or not d.blocking for d in decisions):
            return False  # ready, or held back by something else (sessions, min_drain): a full pass
        unproven = {d.version for d in decisions}  # not yet shown to be still blocked
        read: set[NodeId] = set()
        ttl = self.config.report.report_ttl
        fruitless = 0  # rounds in a row that showed no version still blocked
        while unproven:
            todo = sorted({n for v in unproven for n in self._blocking.get(v, ())} - read)[:QUICK_ROUND]
            if not todo or fruitless >= QUICK_ROUNDS:
                return False  # some version's blockers have (all, or likely) cleared: a full collect decides
            before = len(unproven)
            reports: dict[str, NodeReport] = {
                r.node: r for r in await reporter.collect_nodes(self.key, self.cred.name, todo)
            }
            read.update(todo)
            now = time.time()
            for version in list(unproven):
                blocking = self._blocking[version]
                for node in todo:
                    if node not in blocking:
                        continue
                    report = [reports[node]] if node in reports else []
                    judged = decide(old=version, new=self._full_new, reports=report, known=[node], now=now, ttl=ttl)
                    if judged.blocking:
                        unproven.discard(version)
                    else:
                        blocking.discard(node)
            fruitless = 0 if len(unproven) < before else fruitless + 1
        return True

    async def retire_ready(self) -> list[VersionId]:
        """Retire every superseded version whose gate holds. Returns the retired ids."""
        retired: list[VersionId] = []
        self.retire_failures = 0
        listed = await self.store.versions(self.key)
        if await self._blockers_remain(listed):
            return []
        owned = ledger(await self._metadata())
        await self._settle(listed, owned)
        newer = sorted((v.created for v in listed if v.is_current), reverse=True)
        for decision in await self.evaluate(versions=listed, owned=owned):
            if not decision.retire:
                continue
            version = decision.version
            own = owned.get(version)
            try:
                if retired_by_provider(own):
                    assert own is not None
                    await self._retire_ours(version, own, listed, owned)
                else:
                    await self.store.retire(self.key, version)
                    if own is not None:
                        await self.store.merge_metadata(self.key, {own_key(version): None})
                    event(
                        log,
                        "retired_in_store_only",
                        logging.WARNING,
                        credential=self.cred.name,
                        version=version,
                        found="applied but never promoted" if own is not None else "not applied by Baton",
                        action="retired in the store; the provider was not asked to revoke anything",
                    )
            except BatonError as e:
                self.retire_failures += 1
                event(
                    log,
                    "retirement_failed",
                    logging.ERROR,
                    credential=self.cred.name,
                    version=decision.version,
                    error=str(e),
                )
                continue
            self.retired_total += 1
            retired.append(decision.version)
            if newer:
                metrics.drain_seconds.observe(max(0.0, time.time() - newer[0]))
            event(log, "retired", credential=self.cred.name, version=decision.version)
        if retired:
            self.retired_event.set()
            self.last_decisions = [d for d in self.last_decisions if d.version not in retired]
            metrics.pending_retirements.labels(self.cred.name).set(len(self.last_decisions))
        return retired

    async def _retire_ours(
        self, version: VersionId, own: Own, listed: list[VersionInfo], owned: Mapping[VersionId, Own]
    ) -> None:
        """Retire a version Baton promoted: through the provider, which is told every
        principal the current and newer versions name (it refuses to revoke those)."""
        old = (await self.store.read(self.key, version)).payload
        keep = await self._live_principals(version, listed, owned)
        await self.store.merge_metadata(self.key, {own_key(version): Own(RETIRING, own.principal).encode()})
        await self.provider.retire(old, keep=keep)
        await self.store.retire(self.key, version)
        await self.store.merge_metadata(self.key, {own_key(version): None})

    async def _live_principals(
        self, version: VersionId, listed: list[VersionInfo], owned: Mapping[VersionId, Own]
    ) -> frozenset[str]:
        """The principals named by the current version and every non-retired version newer than ``version``."""
        mine = next((v for v in listed if v.id == version), None)
        since = mine.created if mine is not None else 0.0
        names: set[str] = set()
        for v in listed:
            live = not v.retired or draining(owned.get(v.id))
            if v.id == version or not (v.is_current or (live and v.created >= since)):
                continue
            own = owned.get(v.id)
            if own is not None and own.principal:
                names.add(own.principal)
                continue
            try:
                payload = (await self.store.read(self.key, v.id)).payload
            except StoreNotFound:
                continue
            if principal := self._principal(payload):
                names.add(principal)
        return frozenset(names)

    # ------------------------------------------------------------ forced retirement

    async def force_retire(self, version: VersionId, *, reason: str, user: str, peer: str) -> Decision | None:
        """Retire ``version`` now although nodes may still hold it (a leaked credential); returns the
        gate's last view of it (its holders and reasons), or None when nothing held it back.

        The request is recorded in the key's metadata first (``baton.forced.<version>``: who says
        they asked, who the endpoint saw asking, why, when, how many holders) and said in a
        ``force_retired`` event. A version Baton promoted is retired through the provider, as
        the gate's retirement would. The current or a pending version is refused, and so is one
        that is retired already (``ActionRefused``)."""
        async with self.retiring:
            listed = await self.store.versions(self.key)
            info = next((v for v in listed if v.id == version), None)
            if info is None:
                raise ActionRefused(404, f"{self.cred.name} has no version {version}")
            if info.is_current or PENDING in info.stages:
                stage = "current" if info.is_current else "pending"
                raise ActionRefused(409, f"version {version} of {self.cred.name} is {stage}: rotate it away first")
            owned = ledger(await self._metadata())
            own = owned.get(version)
            if info.retired and not draining(own):
                raise ActionRefused(409, f"version {version} of {self.cred.name} is retired already")
            decision = next(
                (d for d in await self.evaluate(versions=listed, owned=owned) if d.version == version), None
            )
            holders = [
                f"{node}: pid {h.pid} {h.exe}"
                for node, hs in (decision.holders if decision else {}).items()
                for h in hs
            ]
            await self._fenced()
            record = {"user": user, "peer": peer, "reason": reason, "at": time.time(), "holders": len(holders)}
            await self.store.merge_metadata(self.key, {FORCED_PREFIX + version: json.dumps(record)})
            if retired_by_provider(own):
                assert own is not None
                await self._retire_ours(version, own, listed, owned)
            else:
                await self.store.retire(self.key, version)
                if own is not None:
                    await self.store.merge_metadata(self.key, {own_key(version): None})
            event(
                log,
                "force_retired",
                logging.WARNING,
                credential=self.cred.name,
                version=version,
                user=user,
                peer=peer,
                reason=reason,
                holders=holders,
                reasons=list(decision.reasons) if decision else [],
            )
            self.retired_total += 1
            self.retired_event.set()
            self.last_decisions = [d for d in self.last_decisions if d.version != version]
            metrics.pending_retirements.labels(self.cred.name).set(len(self.last_decisions))
            return decision
