"""LeaseIssuer: a Vault/OpenBao leased secret (a database user per lease) as a credential of this node.

Each lease read from ``lease.path`` is a version. The current lease is renewed
when ``renew_at`` of its granted duration has passed and replaced by a new lease
(a new version, written, swapped in, consumers reloaded) once less than
``rotate_before`` of its max lifetime is left. A superseded lease is kept renewed
while the tracker's scans (``observe``) see a process on this node hold it, up to
its max TTL, and revoked (``sys/leases/revoke``) at the first scan that sees none;
a failed revocation is retried with backoff and shown in ``status()``. A lease
still held close to its max TTL is an event (``lease_expiring``) and a metric
before it expires; one that expires or that Vault forgets (a restarted dev
server) while held is an event naming its holders.

The max lifetime is ``lease.max_ttl`` when given, else learned from the first
renewal Vault caps (it grants less than asked); a lease that is not renewable
ends at its first expiry. Vault ties a lease to the token that made it: a token
that expires or is revoked takes its leases with it (use a periodic or long-lived
token for the agent).

Lease ids and the lease's data (the credential itself, needed to render the
files again after a restart, as the output files hold it) are kept in a 0600
state file under ``agent.state_dir`` (``kit/statefile.py``); at start the agent
adopts its leases (lookup, renew) instead of asking for new ones. Lease ids
never reach a log line, an exception, a metric or ``status()``: a short hash does.
Every Vault call goes through ``clients/vault.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon.clients.vault import VaultClient
from daemon.config import Config, CredentialConfig, LeaseConfig, VaultStoreConfig
from daemon.errors import ConfigError, LeaseError, StateFileError, StoreError, StoreNotFound
from daemon.issuers.base import Issuer
from daemon.kit import metrics
from daemon.kit.backoff import Backoff
from daemon.kit.logs import event
from daemon.kit.statefile import load_state, save_state
from daemon.model import CURRENT, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.report.base import Holder
from daemon.stores.base import SecretStore, StatusHook
from daemon.stores.vault import VaultStore

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# Vault's TTLs are whole seconds: a grant this much below the ask is a cap, not rounding.
SLACK = 1.5
# Revoked and lost leases kept for the status and the tracker's clean-up.
KEEP_ENDED = 10
# The longest the loop sleeps without looking at its leases.
MAX_NAP = 30.0
_VERSION = re.compile(r"[0-9]{1,20}")


class Phase(StrEnum):
    CURRENT = "current"  # the newest lease: renewed, replaced at rotate_before
    HELD = "held"  # superseded, held by some process (or not yet scanned): kept renewed
    REVOKING = "revoking"  # superseded, held by nobody: revocation pending or retried
    REVOKED = "revoked"
    LOST = "lost"  # expired, or Vault no longer knows it


ENDED = (Phase.REVOKED, Phase.LOST)


def lease_tag(lease_id: str) -> str:
    """A short hash of a lease id: safe in logs, metrics and status."""
    return hashlib.sha256(lease_id.encode()).hexdigest()[:10]


def _holder_text(h: Holder) -> str:
    return f"{h.consumer or h.exe or 'unknown'}:{h.pid}"


@dataclass
class Lease:
    version: VersionId
    lease_id: str = field(repr=False)
    data: dict[str, Any] = field(repr=False)
    path: str
    issued: float  # wall clock, as everything here: the state file outlives the process
    duration: float  # the first grant, asked for again at each renewal
    expires: float
    renewable: bool
    phase: Phase = Phase.CURRENT
    renewed: float = 0.0
    max_expires: float | None = None
    attempts: int = 0  # failed renewals or revocations in a row
    next_attempt: float = 0.0
    error: str | None = None
    unheld_at: float | None = None
    holders: tuple[str, ...] = ()
    warned: bool = False

    @property
    def tag(self) -> str:
        return lease_tag(self.lease_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "lease_id": self.lease_id,
            "data": self.data,
            "path": self.path,
            "issued": self.issued,
            "duration": self.duration,
            "expires": self.expires,
            "renewable": self.renewable,
            "phase": str(self.phase),
            "renewed": self.renewed,
            "max_expires": self.max_expires,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Lease:
        """One lease of the state file; ``StateFileError`` for anything out of shape (the file is hostile)."""
        if not isinstance(raw, dict):
            raise StateFileError("a lease entry is not an object")

        def num(name: str, *, optional: bool = False) -> float | None:
            v = raw.get(name)
            if v is None and optional:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise StateFileError(f"lease entry: {name} is not a time")
            try:
                finite = math.isfinite(v)
            except OverflowError:  # an integer beyond any float
                finite = False
            if not finite or v < 0:
                raise StateFileError(f"lease entry: {name} is not a time")
            return float(v)

        version, lease_id, path, data = raw.get("version"), raw.get("lease_id"), raw.get("path"), raw.get("data")
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise StateFileError("lease entry: bad version")
        if not isinstance(lease_id, str) or not 0 < len(lease_id) <= 1024 or not lease_id.isprintable():
            raise StateFileError("lease entry: bad lease id")
        if not isinstance(path, str) or not 0 < len(path) <= 512:
            raise StateFileError("lease entry: bad path")
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise StateFileError("lease entry: bad data")
        try:
            phase = Phase(str(raw.get("phase")))
        except ValueError:
            raise StateFileError("lease entry: bad phase") from None
        issued, duration, expires, renewed = (num(n) for n in ("issued", "duration", "expires", "renewed"))
        assert issued is not None and duration is not None and expires is not None and renewed is not None
        return cls(
            version=VersionId(version),
            lease_id=lease_id,
            data=data,
            path=path,
            issued=issued,
            duration=duration,
            expires=expires,
            renewable=raw.get("renewable") is True,
            phase=phase,
            renewed=renewed,
            max_expires=num("max_expires", optional=True),
        )


class LeaseIssuer(Issuer):
    """The leases of one credential (``lease:``): issue, renew, roll over, adopt, revoke."""

    def __init__(
        self,
        *,
        credential: CredentialConfig,
        client: VaultClient,
        state_file: Path,
        retry_min: float = 1.0,
        retry_max: float = 300.0,
        own_client: bool = False,
    ) -> None:
        assert credential.lease is not None
        self.name = credential.name
        self.spec: LeaseConfig = credential.lease
        self.client = client
        self.state_file = state_file
        self._own_client = own_client
        self.leases: list[Lease] = []
        self._next = 0
        self._started = False
        self._start_lock = asyncio.Lock()
        # The watch loop (the Follower's task) and observe (the Tracker's) both change leases:
        # one at a time, so a lease being revoked is never renewed, nor revoked twice.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._issue_backoff = Backoff(retry_min, retry_max)
        self._issue_at = 0.0
        self.issue_error: str | None = None
        self._retry_min = retry_min

    @classmethod
    def from_config(cls, config: Config, credential: CredentialConfig, store: SecretStore) -> LeaseIssuer:
        sc = config.store
        if not isinstance(sc, VaultStoreConfig):
            raise ConfigError([f"credentials.{credential.name}.lease: needs store kind vault"])
        # The store's client when it is Vault's: one login (an AppRole secret_id may be limited-use).
        own = not isinstance(store, VaultStore)
        client = (
            store.client
            if isinstance(store, VaultStore)
            else VaultClient(url=sc.url, auth=sc.auth, namespace=sc.namespace, timeout=sc.timeout)
        )
        return cls(
            credential=credential,
            client=client,
            state_file=config.agent.state_dir / f"lease-{credential.name}.json",
            retry_min=config.agent.retry_min,
            retry_max=config.agent.retry_max,
            own_client=own,
        )

    # ------------------------------------------------------------ the Issuer Protocol

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        await self._start()
        yielded: VersionId | None = None
        while True:
            now = time.time()
            current = self.current()
            if (current is None or self._rotate_due(current, now) <= now) and now >= self._issue_at:
                try:
                    async with self._lock:
                        await self._issue()
                except StoreError as e:
                    delay = self._issue_backoff.next()
                    self._issue_at = time.time() + delay
                    self.issue_error = str(e)
                    metrics.lease_operations_total.labels(self.name, "issue", "failed").inc()
                    event(
                        log, "lease_issue_failed", logging.WARNING, credential=self.name, error=str(e), retry_in=delay
                    )
                    if on_status is not None:
                        on_status(e)
                else:
                    self._issue_backoff.reset()
                    self.issue_error = None
                    if on_status is not None:
                        on_status(None)
            current = self.current()
            if current is not None and current.version != yielded:
                yielded = current.version
                yield self._info(current)
            async with self._lock:
                await self._work()
            await self._nap()

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        lease = self.current() if version is None else self._find(version)
        if lease is None or lease.phase in ENDED:
            raise StoreNotFound(f"lease {self.name}: no version {version or '(current)'}")
        return SecretVersion(self._info(lease), Secret(json.dumps(lease.data)))

    async def versions(self, key: str) -> list[VersionInfo]:
        return [self._info(lease) for lease in self.leases]

    async def observe(self, current: VersionId | None, held: Mapping[VersionId, Sequence[Holder]]) -> None:
        async with self._lock:
            await self._observe(current, held)
        # Holders may have come or gone: the loop re-plans (a warning before a max TTL).
        self._wake.set()

    async def _observe(self, current: VersionId | None, held: Mapping[VersionId, Sequence[Holder]]) -> None:
        now = time.time()
        released = False
        for lease in self.leases:
            holders = held.get(lease.version, ())
            if lease.phase is not Phase.REVOKED:
                lease.holders = tuple(_holder_text(h) for h in holders)
            if lease.phase is not Phase.HELD or lease.version == current:
                continue
            if holders:
                lease.unheld_at = None
                continue
            lease.phase, lease.unheld_at, lease.next_attempt, lease.attempts = Phase.REVOKING, now, 0.0, 0
            event(log, "lease_released", credential=self.name, version=lease.version, lease=lease.tag)
            released = True
        if released:
            await self._revoke_due()
            self._save()

    def status(self) -> dict[str, Any]:
        now = time.time()
        current = self.current()
        leases: dict[str, Any] = {}
        for lease in self.leases:
            if lease.phase is Phase.REVOKED:
                continue
            max_end = self._max_end(lease)
            leases[lease.version] = {
                "state": str(lease.phase),
                "lease": lease.tag,
                "ttl_left": round(max(0.0, lease.expires - now), 1),
                "max_ttl_left": None if max_end is None else round(max(0.0, max_end - now), 1),
                "renewable": lease.renewable,
                "holders": list(lease.holders),
                "error": lease.error,
            }
        return {
            "kind": "lease",
            "path": self.spec.path,
            "current": current.version if current else None,
            "issue_error": self.issue_error,
            "leases": leases,
            "revoking": [
                {
                    "version": lease.version,
                    "lease": lease.tag,
                    "attempts": lease.attempts,
                    "next_attempt": lease.next_attempt or None,
                    "error": lease.error,
                    "holders": list(lease.holders),
                }
                for lease in self.leases
                if lease.phase is Phase.REVOKING
            ],
        }

    async def aclose(self) -> None:
        # Leases are kept, not revoked: the next start adopts them. Renewed first, so that a
        # restart slower than what was left of a short lease still finds it (the agent's
        # close_limit bounds this).
        async with self._lock:
            if self._started:
                for lease in [x for x in self.leases if x.phase in (Phase.CURRENT, Phase.HELD)]:
                    if self._renew_due(lease) < math.inf:
                        await self._renew(lease)
            self._save()
        if self._own_client:
            await self.client.aclose()

    # ------------------------------------------------------------ the leases

    def current(self) -> Lease | None:
        return next((lease for lease in reversed(self.leases) if lease.phase is Phase.CURRENT), None)

    def _find(self, version: VersionId) -> Lease | None:
        return next((lease for lease in self.leases if lease.version == version), None)

    def _info(self, lease: Lease) -> VersionInfo:
        stages = {
            Phase.CURRENT: frozenset({CURRENT}),
            Phase.HELD: frozenset({PREVIOUS}),
        }.get(lease.phase, frozenset())
        return VersionInfo(id=lease.version, stages=stages, created=lease.issued, retired=lease.phase in ENDED)

    def _max_end(self, lease: Lease) -> float | None:
        """When the lease ends for good (wall clock), if known."""
        ends = [t for t in (lease.max_expires,) if t is not None]
        if self.spec.max_ttl is not None:
            ends.append(lease.issued + self.spec.max_ttl)
        if not lease.renewable:
            ends.append(lease.expires)
        return min(ends) if ends else None

    def _rotate_due(self, lease: Lease, now: float) -> float:
        end = self._max_end(lease)
        if end is None:
            return math.inf
        return end - self.spec.rotate_before * max(0.0, end - lease.issued)

    def _renew_due(self, lease: Lease) -> float:
        end = self._max_end(lease)
        if not lease.renewable or (end is not None and end - lease.expires <= SLACK):
            return math.inf  # renewal cannot extend it any more
        due = lease.renewed + self.spec.renew_at * max(0.0, lease.expires - lease.renewed)
        return max(due, lease.next_attempt)

    async def _start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self._load()
            for lease in list(self.leases):
                if lease.phase in ENDED:
                    continue
                await self._adopt(lease)
            self._started = True
            self._save()
            self._gauges()

    def _load(self) -> None:
        try:
            raw = load_state(self.state_file)
            if raw is None:
                return
            if raw.get("format") != STATE_FORMAT or raw.get("credential") != self.name:
                raise StateFileError(f"state file {self.state_file} is not this credential's (format, name)")
            entries = raw.get("leases")
            if not isinstance(entries, list) or len(entries) > 1000:
                raise StateFileError(f"state file {self.state_file}: leases is not a list")
            leases = [Lease.from_json(e) for e in entries]
            nxt = raw.get("next")
            if isinstance(nxt, bool) or not isinstance(nxt, int) or not 0 <= nxt < 10**19:
                raise StateFileError(f"state file {self.state_file}: bad version counter")
            if len({lease.version for lease in leases}) != len(leases):
                raise StateFileError(f"state file {self.state_file}: a version appears twice")
        except StateFileError as e:
            # Start fresh: the leases it named (if any) run out at their TTL.
            event(log, "state_file_rejected", logging.ERROR, credential=self.name, error=str(e))
            return
        for lease in leases:
            if lease.phase is Phase.CURRENT and lease.path != self.spec.path:
                lease.phase = Phase.HELD  # the config names another path now: a new lease supersedes it
        currents = [lease for lease in leases if lease.phase is Phase.CURRENT]
        for lease in currents[:-1]:
            lease.phase = Phase.HELD
        self.leases, self._next = leases, nxt

    def _save(self) -> None:
        ended = [lease for lease in self.leases if lease.phase in ENDED]
        for lease in ended[:-KEEP_ENDED]:
            self.leases.remove(lease)
        data = {
            "format": STATE_FORMAT,
            "credential": self.name,
            "next": self._next,
            "leases": [lease.to_json() for lease in self.leases],
        }
        try:
            save_state(self.state_file, data)
        except (OSError, StateFileError) as e:
            # Kept in memory; a lease issued now would be orphaned by a restart: say so.
            event(log, "state_file_not_saved", logging.ERROR, credential=self.name, error=str(e))

    async def _adopt(self, lease: Lease) -> None:
        now = time.time()
        try:
            found = await self.client.lookup_lease(lease.lease_id)
        except StoreNotFound:
            self._lost(lease, "vault does not know it any more (expired, revoked, or the server lost its data)")
            return
        except StoreError as e:
            # Vault down: keep what the file says; renewal and revocation retry on their own.
            event(
                log, "lease_adopt_deferred", logging.WARNING, credential=self.name, version=lease.version, error=str(e)
            )
            lease.error = str(e)
            return
        metrics.lease_operations_total.labels(self.name, "lookup", "ok").inc()
        data = found.get("data") if isinstance(found.get("data"), Mapping) else {}
        assert isinstance(data, Mapping)
        ttl = data.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and 0 <= ttl < 10**9:
            lease.expires = now + float(ttl)
        lease.renewable = data.get("renewable") is True
        event(
            log,
            "lease_adopted",
            credential=self.name,
            version=lease.version,
            lease=lease.tag,
            state=str(lease.phase),
            ttl=round(lease.expires - now, 1),
        )
        if lease.phase is Phase.REVOKING:
            await self._revoke(lease)
        elif lease.renewable:
            await self._renew(lease)

    async def _issue(self) -> None:
        path = self.spec.path
        resp = await self.client.read_leased(path)
        lease_id, duration, data = resp.get("lease_id"), resp.get("lease_duration"), resp.get("data")
        if not isinstance(lease_id, str) or not lease_id or not lease_id.isprintable() or len(lease_id) > 1024:
            raise LeaseError(f"vault read {path}: the response carries no lease (is it a dynamic secret's path?)")
        if isinstance(duration, bool) or not isinstance(duration, int | float) or not 0 < duration < 10**9:
            # Some other lease with no duration is worth nothing to us: give it back at once.
            await self._revoke_quietly(lease_id)
            raise LeaseError(f"vault read {path}: the lease has no duration")
        if not isinstance(data, dict) or not data or not all(isinstance(k, str) for k in data):
            await self._revoke_quietly(lease_id)
            raise LeaseError(f"vault read {path}: the lease carries no data fields")
        now = time.time()
        self._next = max(self._next + 1, int(now))  # a fresh state never reuses a version id on disk
        lease = Lease(
            version=VersionId(str(self._next)),
            lease_id=lease_id,
            data=data,
            path=path,
            issued=now,
            duration=float(duration),
            expires=now + float(duration),
            renewed=now,
            renewable=resp.get("renewable") is True,
        )
        previous = self.current()
        if previous is not None:
            previous.phase = Phase.HELD  # until a scan sees nothing hold it
        self.leases.append(lease)
        self._save()
        metrics.lease_operations_total.labels(self.name, "issue", "ok").inc()
        event(
            log,
            "lease_issued",
            credential=self.name,
            version=lease.version,
            lease=lease.tag,
            ttl=lease.duration,
            renewable=lease.renewable,
            previous=previous.version if previous else None,
        )
        if not lease.renewable:
            event(
                log,
                "lease_not_renewable",
                logging.WARNING,
                credential=self.name,
                version=lease.version,
                note="replaced at rotate_before of its duration; a held old one ends at its TTL",
            )
        self._gauges()

    async def _renew(self, lease: Lease) -> None:
        now = time.time()
        try:
            resp = await self.client.renew_lease(lease.lease_id, lease.duration)
        except StoreNotFound:
            metrics.lease_operations_total.labels(self.name, "renew", "gone").inc()
            self._lost(lease, "vault refused to renew it: not found or not renewable")
            return
        except LeaseError:
            # Past its max TTL: valid until it expires, never renewed again.
            metrics.lease_operations_total.labels(self.name, "renew", "capped").inc()
            lease.max_expires = lease.expires
            return
        except StoreError as e:
            metrics.lease_operations_total.labels(self.name, "renew", "failed").inc()
            lease.attempts += 1
            left = max(0.0, lease.expires - now)
            delay = min(self._retry_min * 2 ** min(lease.attempts - 1, 10), max(left / 3, 0.5))
            lease.next_attempt, lease.error = now + delay, str(e)
            event(
                log,
                "lease_renew_failed",
                logging.WARNING,
                credential=self.name,
                version=lease.version,
                lease=lease.tag,
                error=str(e),
                ttl_left=round(left, 1),
                retry_in=round(delay, 2),
            )
            return
        granted = resp.get("lease_duration")
        if isinstance(granted, bool) or not isinstance(granted, int | float) or not 0 <= granted < 10**9:
            granted = 0
        lease.renewed, lease.expires = now, now + float(granted)
        lease.attempts, lease.next_attempt, lease.error = 0, 0.0, None
        if granted < int(lease.duration):  # whole seconds asked, whole seconds granted
            # Vault granted less than asked: the max TTL is this close.
            end = now + float(granted)
            lease.max_expires = end if lease.max_expires is None else min(lease.max_expires, end)
        metrics.lease_operations_total.labels(self.name, "renew", "ok").inc()
        log.debug("lease renewed", extra={"credential": self.name, "version": lease.version, "ttl": granted})

    async def _revoke(self, lease: Lease) -> None:
        now = time.time()
        try:
            await self.client.revoke_lease(lease.lease_id)
        except StoreError as e:
            metrics.lease_operations_total.labels(self.name, "revoke", "failed").inc()
            lease.attempts += 1
            delay = min(self.spec.revoke_retry_max, self._retry_min * 2 ** min(lease.attempts - 1, 16))
            lease.next_attempt, lease.error = now + delay, str(e)
            event(
                log,
                "lease_revoke_failed",
                logging.WARNING,
                credential=self.name,
                version=lease.version,
                lease=lease.tag,
                error=str(e),
                attempts=lease.attempts,
                retry_in=round(delay, 2),
            )
            return
        metrics.lease_operations_total.labels(self.name, "revoke", "ok").inc()
        since = now - lease.unheld_at if lease.unheld_at is not None else None
        if since is not None:
            metrics.lease_revoke_seconds.observe(since)
        lease.phase, lease.error, lease.holders = Phase.REVOKED, None, ()
        event(
            log,
            "lease_revoked",
            credential=self.name,
            version=lease.version,
            lease=lease.tag,
            after_unheld=None if since is None else round(since, 3),
        )

    async def _revoke_quietly(self, lease_id: str) -> None:
        with contextlib.suppress(StoreError):
            await self.client.revoke_lease(lease_id)

    async def _revoke_due(self) -> None:
        now = time.time()
        for lease in [x for x in self.leases if x.phase is Phase.REVOKING and x.next_attempt <= now]:
            await self._revoke(lease)
        self._gauges()

    def _lost(self, lease: Lease, why: str) -> None:
        was = lease.phase
        lease.phase = Phase.LOST
        level = logging.ERROR if was in (Phase.CURRENT, Phase.HELD) else logging.WARNING
        event(
            log,
            "lease_lost",
            level,
            credential=self.name,
            version=lease.version,
            lease=lease.tag,
            state=str(was),
            reason=why,
            holders=list(lease.holders),
        )
        if was is Phase.CURRENT:
            self._issue_at = 0.0  # a new lease now
        self._wake.set()

    async def _work(self) -> None:
        """Renew what is due, revoke what is released, expire and warn."""
        now = time.time()
        changed = False
        for lease in [x for x in self.leases if x.phase in (Phase.CURRENT, Phase.HELD)]:
            if now >= lease.expires:
                event(
                    log,
                    "lease_expired",
                    logging.ERROR,
                    credential=self.name,
                    version=lease.version,
                    lease=lease.tag,
                    state=str(lease.phase),
                    holders=list(lease.holders),
                )
                was = lease.phase
                lease.phase = Phase.LOST
                if was is Phase.CURRENT:
                    self._issue_at = 0.0
                changed = True
            elif self._renew_due(lease) <= now:
                await self._renew(lease)
                changed = True
        expiring = 0
        for lease in [x for x in self.leases if x.phase is Phase.HELD and x.holders]:
            end = self._max_end(lease)
            if end is None or end - now > self.spec.warn_before:
                continue
            expiring += 1
            if not lease.warned:
                lease.warned = True
                event(
                    log,
                    "lease_expiring",
                    logging.WARNING,
                    credential=self.name,
                    version=lease.version,
                    lease=lease.tag,
                    max_ttl_left=round(end - now, 1),
                    holders=list(lease.holders),
                )
        metrics.lease_expiring_held.labels(self.name).set(expiring)
        if any(x.phase is Phase.REVOKING and x.next_attempt <= now for x in self.leases):
            await self._revoke_due()
            changed = True
        if changed:
            self._save()
        self._gauges()

    async def _nap(self) -> None:
        now = time.time()
        due = [self._issue_at] if self.current() is None else []
        for lease in self.leases:
            if lease.phase in (Phase.CURRENT, Phase.HELD):
                due += [self._renew_due(lease), lease.expires]
                end = self._max_end(lease)
                if lease.phase is Phase.HELD and lease.holders and end is not None and not lease.warned:
                    due.append(end - self.spec.warn_before)
            if lease.phase is Phase.CURRENT:
                due.append(max(self._rotate_due(lease, now), self._issue_at))
            if lease.phase is Phase.REVOKING:
                due.append(lease.next_attempt)
        wait = min([MAX_NAP, *(d - now for d in due)])
        self._wake.clear()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _gauges(self) -> None:
        now = time.time()
        counts = {"current": 0, "held": 0, "revoking": 0}
        for lease in self.leases:
            if lease.phase in ENDED:
                for gauge in (metrics.lease_ttl_seconds, metrics.lease_max_ttl_seconds):
                    with contextlib.suppress(KeyError):
                        gauge.remove(self.name, lease.version)
                continue
            counts[str(lease.phase)] += 1
            metrics.lease_ttl_seconds.labels(self.name, lease.version).set(max(0.0, lease.expires - now))
            end = self._max_end(lease)
            metrics.lease_max_ttl_seconds.labels(self.name, lease.version).set(
                -1 if end is None else max(0.0, end - now)
            )
        for state, n in counts.items():
            metrics.leases_outstanding.labels(self.name, state).set(n)
