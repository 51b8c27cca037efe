"""Certificates issued to this node (``certificate:``): a key made here, renewed from the certificate's own lifetime.

``CertificateIssuer`` is an ``issuers.base.Issuer``. In sign mode (``pki/sign/<role>``,
and always with ``local-ca``) the private key is generated on the node and only a
CSR leaves it; ``pki/issue/<role>`` lets the CA make the key. Each certificate is a
version (``1``, ``2``, ...). Renewal is due at ``renew_at`` of its lifetime, drawn up
to ``jitter`` earlier; a failed issue is retried with backoff (and never less often
than a tenth of the time left), counted in ``baton_certificate_renewal_failures_total``,
while the current certificate stays. What the CA sends is checked before it is
used (``kit.x509.check_issued``): a truncated PEM, a key that does not match, a
chain that does not verify, a certificate not yet valid or expired is refused.

A superseded version is let go (``retired``: the tracker removes its files; with
``revoke_retired`` revoked at the CA) only when ``observe`` says no process on this
node holds it. The versions, their certificates and the keys of those not yet
retired are kept in a 0600 state file, so a restart adopts them. A key, a CSR or a
certificate body never reaches a log line, an exception or ``status()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from daemon.config import (
    CertificateConfig,
    Config,
    CredentialConfig,
    LocalCaIssuerConfig,
    VaultIssuerConfig,
    VaultStoreConfig,
)
from daemon.errors import CertificateError, ConfigError, StateFileError, StoreAuthError, StoreError, StoreUnavailable
from daemon.issuers.base import Issuer
from daemon.kit import metrics, x509
from daemon.kit.backoff import Backoff
from daemon.kit.logs import event
from daemon.kit.statefile import load_state, save_state
from daemon.model import CURRENT, PREVIOUS, Secret, SecretVersion, VersionId, VersionInfo
from daemon.report.base import Holder
from daemon.stores.base import SecretStore, StatusHook

log = logging.getLogger(__name__)

# Retired versions still listed (retired) so the tracker sees them go; older ones are forgotten.
KEEP_RETIRED = 8
# Never wait less than this between two attempts, whatever the time left.
MIN_RETRY = 0.2
STATE_FORMAT = 1
# Longest wait between two attempts to revoke a let-go certificate (the CA down or refusing).
REVOKE_RETRY_MAX = 60.0

_TEXT_FIELDS = ("serial", "subject", "certificate", "private_key", "ca_chain", "issuing_ca")
_TIME_FIELDS = ("not_before", "not_after", "issued_at", "renew_at")
_FLAGS = ("retired", "revoked", "revoke_pending")


def _version_from_json(e: Any) -> CertVersion:
    """One version of the state file; ``StateFileError`` for anything out of shape (the file is hostile)."""
    if not isinstance(e, dict) or set(e) != {"id", *_TEXT_FIELDS, *_TIME_FIELDS, *_FLAGS}:
        raise StateFileError("a certificate entry is not an object of the known fields")
    vid = e["id"]
    if not isinstance(vid, str) or not vid.isdigit() or len(vid) > 18:
        raise StateFileError("certificate entry: bad version id")
    for name in _TEXT_FIELDS:
        if not isinstance(e[name], str) or len(e[name]) > x509.MAX_PEM:
            raise StateFileError(f"certificate entry: {name} is not text")
    for name in _TIME_FIELDS:
        if isinstance(e[name], bool) or not isinstance(e[name], int | float) or not 0 <= e[name] < 1e11:
            raise StateFileError(f"certificate entry: {name} is not a time")
    for name in _FLAGS:
        if not isinstance(e[name], bool):
            raise StateFileError(f"certificate entry: {name} is not true/false")
    if not e["retired"] and not (e["certificate"] and e["private_key"]):
        raise StateFileError("certificate entry: a live version without its certificate or key")
    return CertVersion(
        id=VersionId(vid),
        serial=e["serial"],
        subject=e["subject"],
        not_before=float(e["not_before"]),
        not_after=float(e["not_after"]),
        issued_at=float(e["issued_at"]),
        renew_at=float(e["renew_at"]),
        certificate=e["certificate"],
        private_key=e["private_key"],
        ca_chain=e["ca_chain"],
        issuing_ca=e["issuing_ca"],
        retired=e["retired"],
        revoked=e["revoked"],
        revoke_pending=e["revoke_pending"],
    )


@dataclass(frozen=True)
class Issued:
    """What a CA answered: PEM texts (the key only in issue mode)."""

    certificate: str = field(repr=False)
    chain: tuple[str, ...] = field(default=(), repr=False)
    issuing_ca: str = field(default="", repr=False)
    private_key: str | None = field(default=None, repr=False)


class CertificateAuthority(Protocol):
    """Where certificates come from: the PKI engine or a local CA."""

    # True when the CA makes the key (issue mode); else a CSR is sent.
    makes_key: bool

    async def obtain(self, *, csr: str | None, spec: CertificateConfig) -> Issued: ...

    async def revoke(self, serial: str) -> bool:
        """Revoke at the CA; False when there was nothing to revoke (expired; a local CA keeps no CRL)."""
        ...

    def trust(self) -> list[str]:
        """Roots the chain must end at (empty: the chain's own links are checked only)."""
        ...

    async def aclose(self) -> None: ...


def _reason_of(e: StoreError) -> str:
    if isinstance(e, CertificateError):
        return e.reason
    if isinstance(e, StoreUnavailable):
        return "unavailable"
    if isinstance(e, StoreAuthError):
        return "denied"
    return "rejected"


class VaultCA:
    """``pki/sign/<role>`` or ``pki/issue/<role>`` and ``<mount>/revoke`` through ``clients.vault.VaultClient``."""

    def __init__(self, spec: VaultIssuerConfig, client: Any, *, own_client: bool) -> None:
        self.spec = spec
        self.client = client
        self.own_client = own_client
        self.makes_key = spec.mode == "issue"
        self._trust: list[str] = []
        if spec.ca_file is not None:
            try:
                self._trust = [Path(spec.ca_file).read_text()]
            except (OSError, UnicodeDecodeError) as e:
                raise CertificateError(f"vault issuer: cannot read ca_file {spec.ca_file}: {e}", reason="pem") from None

    async def obtain(self, *, csr: str | None, spec: CertificateConfig) -> Issued:
        got = await self.client.pki_certificate(
            self.spec.path,
            common_name=spec.common_name,
            alt_names=spec.alt_names,
            ip_sans=spec.ip_sans,
            ttl=spec.ttl,
            csr=csr,
        )
        return Issued(
            certificate=got["certificate"],
            chain=tuple(got["ca_chain"]),
            issuing_ca=got["issuing_ca"],
            private_key=got["private_key"],
        )

    async def revoke(self, serial: str) -> bool:
        data = await self.client.pki_write(f"{self.spec.mount}/revoke", {"serial_number": serial}, needs_data=False)
        # No revocation_time: the certificate had expired, and an expired one is not put on the CRL.
        return bool(data.get("revocation_time"))

    def trust(self) -> list[str]:
        return self._trust

    async def aclose(self) -> None:
        if self.own_client:
            await self.client.aclose()


class LocalCertificateAuthority:
    """Signs this node's CSRs with a CA on its disk (``kit.x509.LocalCA``), in a thread."""

    makes_key = False

    def __init__(self, spec: LocalCaIssuerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.ca = x509.LocalCA(cert_file=spec.cert_file, key_file=spec.key_file)
        self.clock = clock

    async def obtain(self, *, csr: str | None, spec: CertificateConfig) -> Issued:
        assert csr is not None
        ca = await asyncio.to_thread(self.ca.ca_pem)
        cert = await asyncio.to_thread(self.ca.sign, csr, ttl=spec.ttl, now=self.clock())
        return Issued(certificate=cert, chain=(ca,), issuing_ca=ca)

    async def revoke(self, serial: str) -> bool:
        return False  # a local CA publishes no CRL: nothing to revoke at

    def trust(self) -> list[str]:
        try:
            return [self.ca.ca_pem()]
        except CertificateError:
            return []

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- versions


@dataclass(frozen=True)
class CertVersion:
    """One certificate of this credential. The PEMs are dropped once it is retired."""

    id: VersionId
    serial: str
    subject: str
    not_before: float
    not_after: float
    issued_at: float
    renew_at: float
    certificate: str = field(default="", repr=False)
    private_key: str = field(default="", repr=False)
    ca_chain: str = field(default="", repr=False)
    issuing_ca: str = field(default="", repr=False)
    retired: bool = False
    revoked: bool = False
    revoke_pending: bool = False

    def payload(self) -> Secret:
        return Secret(
            json.dumps(
                {
                    "certificate": self.certificate.rstrip("\n"),
                    "private_key": self.private_key.rstrip("\n"),
                    "ca_chain": self.ca_chain.rstrip("\n"),
                    "issuing_ca": self.issuing_ca.rstrip("\n"),
                    "serial_number": self.serial,
                    "not_before": _iso(self.not_before),
                    "not_after": _iso(self.not_after),
                }
            )
        )


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def renewal_time(*, not_before: float, not_after: float, issued_at: float, renew_at: float, jitter: float) -> float:
    """When to renew: ``renew_at`` of the lifetime (from when it was issued, if later than
    not_before: a CA back-dates), drawn up to ``jitter`` of the lifetime earlier."""
    start = max(not_before, min(issued_at, not_after))
    life = max(0.0, not_after - start)
    return start + life * (renew_at - jitter * random.random())


class CertificateIssuer(Issuer):
    """One ``certificate:`` credential of this node. ``key`` arguments are its name (one credential per issuer)."""

    def __init__(
        self,
        *,
        name: str,
        spec: CertificateConfig,
        ca: CertificateAuthority,
        state_file: Path,
        retry_min: float = 1.0,
        retry_max: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.spec = spec
        self.ca = ca
        self.state_file = state_file
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.clock = clock
        self._versions: list[CertVersion] = []
        self._next = 1
        self._loaded = False
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self.failures = 0
        self.next_attempt: float | None = None
        # Versions whose revocation failed: (next attempt, last delay), doubling up to REVOKE_RETRY_MAX.
        self._revoke_retry: dict[VersionId, tuple[float, float]] = {}
        # Set to ask the watch for a new certificate now (tests, `baton` operators later).
        self.renew_now = asyncio.Event()

    @classmethod
    def from_config(cls, config: Config, credential: CredentialConfig, store: SecretStore) -> CertificateIssuer:
        """Built by ``issuers.open_issuer`` (no I/O): the store's Vault session when the issuer names no url."""
        spec = credential.certificate
        assert spec is not None
        sc = config.store
        store_vault = sc if isinstance(sc, VaultStoreConfig) else None
        store_client = None
        if store_vault is not None and spec.issuer.kind == "vault":
            from daemon.stores.vault import VaultStore

            store_client = store.client if isinstance(store, VaultStore) else None
        return cls(
            name=credential.name,
            spec=spec,
            ca=open_ca(spec, store_vault=store_vault, store_client=store_client),
            state_file=config.agent.state_dir / f"certificate-{credential.name}.json",
            retry_min=config.agent.retry_min,
            retry_max=config.agent.retry_max,
        )

    # ------------------------------------------------------------ state file

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            raw = load_state(self.state_file)
            if raw is None:
                return
            if raw.get("format") != STATE_FORMAT or raw.get("credential") != self.name:
                raise StateFileError(f"state file {self.state_file} is not this credential's (format, name)")
            entries = raw.get("versions")
            if not isinstance(entries, list) or len(entries) > 1000:
                raise StateFileError(f"state file {self.state_file}: versions is not a list")
            versions = [_version_from_json(e) for e in entries]
            nxt = raw.get("next")
            if isinstance(nxt, bool) or not isinstance(nxt, int) or not 0 < nxt < 10**18:
                raise StateFileError(f"state file {self.state_file}: bad version counter")
            if len({v.id for v in versions}) != len(versions) or any(int(v.id) >= nxt for v in versions):
                raise StateFileError(f"state file {self.state_file}: version ids out of order")
        except StateFileError as e:
            # Start fresh: a new certificate is issued (the old ones run out at their not_after).
            event(log, "certificate_state_distrusted", logging.WARNING, credential=self.name, error=str(e))
            return
        self._versions, self._next = versions, nxt
        for v in versions:
            if not v.retired:
                self._export(v)

    def _save(self) -> None:
        save_state(
            self.state_file,
            {
                "format": STATE_FORMAT,
                "credential": self.name,
                "next": self._next,
                "versions": [asdict(v) for v in self._versions],
            },
        )

    async def _persist(self) -> None:
        await asyncio.to_thread(self._save)

    # ------------------------------------------------------------ the Issuer side

    def _current(self) -> CertVersion | None:
        live = [v for v in self._versions if not v.retired]
        return live[-1] if live else None

    async def watch(self, key: str, *, on_status: StatusHook | None = None) -> AsyncIterator[VersionInfo]:
        await asyncio.to_thread(self._load)
        backoff = Backoff(self.retry_min, self.retry_max)
        cur = self._current()
        if cur is not None and await self._still_good(cur):
            event(log, "certificate_adopted", credential=self.name, version=cur.id, serial=cur.serial)
            yield self._info(cur)
        else:
            cur = None
        while True:
            now = self.clock()
            due = cur.renew_at if cur is not None else now
            if self.next_attempt is not None:
                due = self.next_attempt
            if due > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.renew_now.wait(), due - now)
            self.renew_now.clear()
            try:
                new = await self._obtain()
            except Exception as raised:
                # A library's surprise at a hostile answer or a damaged CA file is this
                # certificate's trouble, never the agent's; its message may quote input.
                e = (
                    raised
                    if isinstance(raised, StoreError)
                    else CertificateError(f"unexpected {type(raised).__name__}", reason="error")
                )
                reason = _reason_of(e)
                self.failures += 1
                self.last_error = str(e)
                metrics.certificate_renewal_failures_total.labels(self.name, reason).inc()
                delay = backoff.next()
                if cur is not None:
                    # However long the backoff has grown, try often enough before expiry.
                    delay = min(delay, max(MIN_RETRY, (cur.not_after - self.clock()) / 10))
                self.next_attempt = self.clock() + delay
                event(
                    log,
                    "certificate_not_renewed" if cur is not None else "certificate_not_issued",
                    logging.ERROR,
                    credential=self.name,
                    reason=reason,
                    error=str(e),
                    retry_in=round(delay, 3),
                    current=cur.id if cur is not None else None,
                    expires_in=round(cur.not_after - self.clock(), 1) if cur is not None else None,
                )
                if on_status is not None:
                    on_status(e)
                continue
            backoff.reset()
            self.next_attempt = None
            self.last_error = None
            if self.failures and on_status is not None:
                on_status(None)
            self.failures = 0
            cur = new
            yield self._info(new)

    async def _still_good(self, v: CertVersion) -> bool:
        """An adopted version passes the same checks as a new one (the state file may be stale or damaged)."""
        try:
            await asyncio.to_thread(
                x509.check_issued,
                certificate=v.certificate,
                private_key=v.private_key,
                chain=[v.ca_chain] if v.ca_chain else [],
                issuing_ca=v.issuing_ca,
                now=self.clock(),
            )
        except CertificateError as e:
            event(log, "certificate_not_adopted", logging.WARNING, credential=self.name, version=v.id, reason=e.reason)
            return False
        return True

    async def _obtain(self) -> CertVersion:
        spec = self.spec
        key_pem: str | None = None
        csr: str | None = None
        if not self.ca.makes_key:
            key = await asyncio.to_thread(x509.new_key, spec.key.type, curve=spec.key.curve, bits=spec.key.bits)
            key_pem = x509.key_pem(key)
            csr = await asyncio.to_thread(
                x509.make_csr, key, common_name=spec.common_name, alt_names=spec.alt_names, ip_sans=spec.ip_sans
            )
        issued = await self.ca.obtain(csr=csr, spec=spec)
        if key_pem is None:
            key_pem = issued.private_key or ""
        now = self.clock()
        checked = await asyncio.to_thread(
            x509.check_issued,
            certificate=issued.certificate,
            private_key=key_pem,
            chain=issued.chain,
            issuing_ca=issued.issuing_ca,
            trust=self.ca.trust(),
            names=[spec.common_name, *spec.alt_names],
            ips=spec.ip_sans,
            now=now,
        )
        async with self._lock:
            version = CertVersion(
                id=VersionId(str(self._next)),
                serial=checked.serial,
                subject=checked.subject,
                not_before=checked.not_before,
                not_after=checked.not_after,
                issued_at=now,
                renew_at=renewal_time(
                    not_before=checked.not_before,
                    not_after=checked.not_after,
                    issued_at=now,
                    renew_at=spec.renew_at,
                    jitter=spec.jitter,
                ),
                certificate=checked.certificate,
                private_key=checked.private_key,
                ca_chain=checked.ca_chain,
                issuing_ca=checked.issuing_ca,
            )
            self._next += 1
            self._versions.append(version)
            await self._persist()
        self._export(version)
        metrics.certificate_issued_total.labels(self.name).inc()
        event(
            log,
            "certificate_issued",
            credential=self.name,
            version=version.id,
            serial=version.serial,
            not_after=_iso(version.not_after),
            renew_in=round(version.renew_at - now, 3),
            key_made_here=not self.ca.makes_key,
        )
        return version

    def _export(self, v: CertVersion) -> None:
        metrics.certificate_not_after_seconds.labels(self.name, v.id).set(v.not_after)
        metrics.certificate_not_before_seconds.labels(self.name, v.id).set(v.not_before)
        cur = self._current()
        if cur is not None:
            metrics.certificate_renew_at_seconds.labels(self.name).set(cur.renew_at)

    def _unexport(self, v: CertVersion) -> None:
        for gauge in (metrics.certificate_not_after_seconds, metrics.certificate_not_before_seconds):
            with contextlib.suppress(KeyError):
                gauge.remove(self.name, v.id)

    def _info(self, v: CertVersion) -> VersionInfo:
        cur = self._current()
        stages = (
            frozenset() if v.retired else frozenset({CURRENT} if cur is not None and v.id == cur.id else {PREVIOUS})
        )
        return VersionInfo(id=v.id, stages=stages, created=v.issued_at, retired=v.retired)

    async def read(self, key: str, version: VersionId | None = None) -> SecretVersion:
        await asyncio.to_thread(self._load)
        v = self._find(version) if version is not None else self._current()
        if v is None:
            raise CertificateError(f"certificate {self.name}: no such version {version}", reason="error")
        if v.retired:
            raise CertificateError(f"certificate {self.name}: version {v.id} is retired", reason="error")
        return SecretVersion(self._info(v), v.payload())

    def _find(self, version: VersionId) -> CertVersion | None:
        return next((v for v in self._versions if v.id == version), None)

    async def versions(self, key: str) -> list[VersionInfo]:
        await asyncio.to_thread(self._load)
        return [self._info(v) for v in self._versions]

    async def observe(self, current: VersionId | None, held: Mapping[VersionId, Sequence[Holder]]) -> None:
        """Let go of the superseded versions no process holds (those older than ``current`` on disk)."""
        if current is None:
            return
        async with self._lock:
            ids = [v.id for v in self._versions]
            if current not in ids:
                return
            older = self._versions[: ids.index(current)]
            changed = False
            for v in older:
                if v.retired and not v.revoke_pending:
                    continue
                if held.get(v.id):
                    continue
                if v.revoke_pending and self.clock() < self._revoke_retry.get(v.id, (0.0, 0.0))[0]:
                    continue  # the CA refused or was down: wait out the backoff
                new = await self._let_go(v)
                if new != v:
                    self._versions[self._versions.index(v)] = new
                    changed = True
            retired = [v for v in self._versions if v.retired and not v.revoke_pending]
            if len(retired) > KEEP_RETIRED:
                drop = {v.id for v in retired[: len(retired) - KEEP_RETIRED]}
                self._versions = [v for v in self._versions if v.id not in drop]
                changed = True
            if changed:
                await self._persist()

    async def _let_go(self, v: CertVersion) -> CertVersion:
        revoked, pending = v.revoked, False
        if self.spec.revoke_retired and not v.revoked:
            try:
                revoked = await self.ca.revoke(v.serial)
            except StoreError as e:
                pending = True
                delay = min(REVOKE_RETRY_MAX, max(1.0, 2 * self._revoke_retry.get(v.id, (0.0, 0.0))[1]))
                self._revoke_retry[v.id] = (self.clock() + delay, delay)
                metrics.certificate_revocations_total.labels(self.name, "failed").inc()
                event(
                    log, "certificate_revoke_failed", logging.WARNING, credential=self.name, version=v.id, error=str(e)
                )
            else:
                self._revoke_retry.pop(v.id, None)
                metrics.certificate_revocations_total.labels(self.name, "ok" if revoked else "not_revoked").inc()
                if revoked:
                    event(log, "certificate_revoked", credential=self.name, version=v.id, serial=v.serial)
        if not v.retired:
            self._unexport(v)
            event(log, "certificate_retired", credential=self.name, version=v.id, serial=v.serial)
        # The key of a retired version is of no use to anyone: it leaves the state file.
        return replace(
            v,
            retired=True,
            revoked=revoked,
            revoke_pending=pending,
            certificate="",
            private_key="",
            ca_chain="",
            issuing_ca="",
        )

    def status(self) -> dict[str, Any]:
        cur = self._current()
        return {
            "kind": "certificate",
            "issuer": self.spec.issuer.kind,
            "path": self.spec.issuer.path if isinstance(self.spec.issuer, VaultIssuerConfig) else "local CA",
            "issue_error": self.last_error,
            "key_made_here": not self.ca.makes_key,
            "renew_at": cur.renew_at if cur is not None else None,
            "next_attempt": self.next_attempt,
            "failures": self.failures,
            "last_error": self.last_error,
            "versions": {
                v.id: {
                    "state": "retired"
                    if v.retired
                    else ("current" if cur is not None and v.id == cur.id else "superseded"),
                    "subject": v.subject,
                    "serial": v.serial,
                    "not_before": _iso(v.not_before),
                    "not_after": _iso(v.not_after),
                    "revoked": v.revoked,
                }
                for v in self._versions
            },
        }

    async def aclose(self) -> None:
        await self.ca.aclose()


# ---------------------------------------------------------------- building one


def open_ca(spec: CertificateConfig, *, store_vault: Any = None, store_client: Any = None) -> CertificateAuthority:
    """The CA of a ``certificate:`` spec. With no url of its own a vault issuer uses the store's
    Vault: ``store_client`` (its session, one login) or a client of ``store_vault``'s url and auth."""
    issuer = spec.issuer
    if isinstance(issuer, LocalCaIssuerConfig):
        return LocalCertificateAuthority(issuer)
    from daemon.clients.vault import VaultClient

    if issuer.url is None and store_client is not None and issuer.auth is None and issuer.namespace is None:
        return VaultCA(issuer, store_client, own_client=False)
    url = issuer.url or (store_vault.url if store_vault is not None else None)
    if url is None:
        raise ConfigError(["certificate.issuer.url: needed unless the store is vault"])
    client = VaultClient(
        url=url,
        auth=issuer.auth or (store_vault.auth if store_vault is not None else None),
        namespace=issuer.namespace or (store_vault.namespace if store_vault is not None else None),
        timeout=issuer.timeout,
        verify=str(issuer.verify) if isinstance(issuer.verify, Path) else issuer.verify,
    )
    return VaultCA(issuer, client, own_client=True)
