"""Reports in the store's own per-key metadata: one entry per node, merged server-side."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from daemon.model import CredentialName, NodeId
from daemon.report.base import REPORT_PREFIX, NodeReport
from daemon.stores.base import SecretStore

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)


def fit(report: NodeReport, limit: int | None) -> str:
    """The report as JSON within ``limit`` bytes: holder summaries are dropped first.

    Holder counts per version stay exact (the gate decides on them); the
    summaries are only there to tell people who holds what.
    """
    text = report.to_json()
    holders = list(report.holders)
    while limit is not None and len(text.encode()) > limit and holders:
        holders.pop()
        text = replace(report, holders=tuple(holders)).to_json()
    if limit is not None and len(text.encode()) > limit and report.errors:
        short = tuple(e[:60] for e in report.errors[:1])
        text = replace(report, holders=(), errors=short).to_json()
    return text


class MetadataReporter:
    absent_means_gone = False

    @classmethod
    def from_config(cls, config: Config, store: SecretStore) -> MetadataReporter:
        """For ``daemon.report.open_reporter``: reports ride in the store's own key metadata."""
        return cls(store)

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        # Stores with a small per-value limit (Vault: 512 bytes) say so.
        self.limit = store.metadata_value_limit
        # Stores that rename long entries (Kubernetes: annotation names of at most
        # 63 characters) say what name an entry comes back under.
        self.entry_of = store.metadata_entry

    async def publish(self, key: str, report: NodeReport) -> None:
        await self.store.merge_metadata(key, {REPORT_PREFIX + report.node: fit(report, self.limit)})

    async def collect(self, key: str, credential: CredentialName) -> list[NodeReport]:
        reports = []
        for k, v in (await self.store.read_metadata(key)).items():
            if not k.startswith(REPORT_PREFIX):
                continue
            try:
                report = NodeReport.from_json(v)
                if self.entry_of(REPORT_PREFIX + report.node) != k:
                    # Filed under another node's entry: it cannot speak for that node.
                    raise ValueError("a node report names another node than its entry")
            except (ValueError, TypeError, KeyError):
                # An unreadable report is an unknown node, and unknown blocks:
                # stand in a report that is stale from the start.
                log.warning("unreadable node report", extra={"entry": k})
                report = NodeReport(node=NodeId(k.removeprefix(REPORT_PREFIX)), credential=credential, current=None)
            if report.credential == credential:
                reports.append(report)
        return reports

    async def forget(self, key: str, node: NodeId) -> None:
        await self.store.merge_metadata(key, {REPORT_PREFIX + node: None})

    async def aclose(self) -> None:
        return None
