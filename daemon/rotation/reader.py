"""``GateReader``: the retirement gate's inputs for one credential, read only, and ``gate.decide`` over them.

It reads the store's versions and Baton's ledger, every node's report and (for
versions a provider retires) the provider's sessions, and changes nothing. The
rotator's ``CredentialRotator.evaluate`` runs it with its policies on top (nodes
it remembers, ``forget_after``, metrics); ``baton status --pending`` runs it bare,
with no provider when the credential has none (then no sessions are asked).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

from daemon.config import Config, CredentialConfig, RotationConfig
from daemon.errors import BatonError, StoreNotFound
from daemon.model import NodeId, VersionId, VersionInfo
from daemon.providers.base import Provider, Session
from daemon.report.base import NodeReport, Reporter
from daemon.report.holders import HolderSource
from daemon.rotation.gate import Decision, decide
from daemon.rotation.ledger import Own, ledger, retired_by_provider, superseded
from daemon.stores.base import SecretStore


class GateReader:
    """One credential's gate, read-only."""

    def __init__(
        self,
        *,
        config: Config,
        credential: CredentialConfig,
        store: SecretStore,
        reporter: Reporter,
        provider: Provider | None,
        holders: HolderSource | None = None,
    ) -> None:
        self.config = config
        self.cred = credential
        self.key = credential.key
        self.store = store
        self.reporter = reporter
        self.provider = provider
        self.holders = holders  # holders that run no agent (pods reading a Secret natively)
        rotation = credential.rotation or RotationConfig(every=86400)
        self.min_drain = rotation.min_drain

    async def versions(self) -> list[VersionInfo]:
        """The key's versions; none when the key does not exist yet (first rotation)."""
        try:
            return await self.store.versions(self.key)
        except StoreNotFound:
            return []

    async def metadata(self) -> dict[str, str]:
        try:
            return await self.store.read_metadata(self.key)
        except StoreNotFound:
            return {}

    async def decisions(
        self,
        *,
        versions: list[VersionInfo],
        owned: Mapping[VersionId, Own],
        reports: list[NodeReport],
        known: Collection[NodeId],
        now: float,
    ) -> list[Decision]:
        """``decide`` for every superseded version; the provider's sessions are asked of versions Baton promoted."""
        waiting = superseded(versions, owned)
        current = [v for v in versions if v.is_current]
        if not waiting or not current:
            return []
        new = current[-1].id
        # A version is superseded when the next one was created (promote follows at once).
        ordered = sorted(versions, key=lambda x: x.created)
        successor: dict[VersionId, float] = {a.id: b.created for a, b in itertools.pairwise(ordered)}
        if self.holders is not None:
            # Judged like nodes, but never remembered as known ones: a pod that is gone is gone.
            ids = [v.id for v in waiting]
            reports = [*reports, *await self.holders.reports(self.key, self.cred.name, old=ids, new=new, now=now)]
        decisions = []
        for v in waiting:
            sessions: list[Session] = []
            if retired_by_provider(owned.get(v.id)) and self.provider is not None:
                try:
                    old = (await self.store.read(self.key, v.id)).payload
                    sessions = await self.provider.sessions(old)
                except BatonError as e:
                    decisions.append(Decision(v.id, False, (f"provider: cannot list sessions ({e})",)))
                    continue
            decisions.append(
                decide(
                    old=v.id,
                    new=new,
                    reports=reports,
                    known=set(known),
                    now=now,
                    ttl=self.config.report.report_ttl,
                    sessions=sessions,
                    superseded_for=now - successor.get(v.id, now),
                    min_drain=self.min_drain,
                )
            )
        return decisions

    async def evaluate(self, *, now: float) -> list[Decision]:
        """The bare gate: the reporting nodes are the known ones, nothing is forgotten or recorded."""
        versions = await self.versions()
        owned = ledger(await self.metadata())
        if not superseded(versions, owned):
            return []
        reports = await self.reporter.collect(self.key, self.cred.name)
        return await self.decisions(
            versions=versions, owned=owned, reports=reports, known={r.node for r in reports}, now=now
        )
