"""Reports in the store's own per-key metadata: one entry per node, merged server-side."""

from __future__ import annotations

import logging

from daemon.report.base import REPORT_PREFIX, NodeReport
from daemon.stores.base import SecretStore

log = logging.getLogger(__name__)


class MetadataReporter:
    def __init__(self, store: SecretStore) -> None:
        self.store = store

    async def publish(self, key: str, report: NodeReport) -> None:
        await self.store.merge_metadata(key, {REPORT_PREFIX + report.node: report.to_json()})

    async def collect(self, key: str, credential: str) -> list[NodeReport]:
        reports = []
        for k, v in (await self.store.read_metadata(key)).items():
            if not k.startswith(REPORT_PREFIX):
                continue
            try:
                report = NodeReport.from_json(v)
            except (ValueError, TypeError):
                log.warning("unreadable node report", extra={"entry": k})
                continue
            if report.credential == credential:
                reports.append(report)
        return reports

    async def forget(self, key: str, node: str) -> None:
        await self.store.merge_metadata(key, {REPORT_PREFIX + node: None})

    async def aclose(self) -> None:
        return None
