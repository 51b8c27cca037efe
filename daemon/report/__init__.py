"""Where node reports go: store metadata (default), a status path, pod annotations.

``open_reporter`` picks the reporter from the store config's ``reports``
setting; reporters that need a store's client library live beside it and are
imported lazily by name, as stores are.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.report.base import Reporter
    from daemon.stores.base import SecretStore

# (store kind, reports setting) -> "module:callable", called as (config, store).
REGISTRY: dict[tuple[str, str], str] = {
    ("vault", "status_path"): "daemon.report.vault_status:VaultStatusReporter.from_config",
    ("aws", "dynamodb"): "daemon.report.dynamodb:DynamoReporter.from_config",
    ("kubernetes", "pod"): "sidecar.podreport:open_reporter",
}


def open_reporter(config: Config, store: SecretStore) -> Reporter:
    mode = getattr(config.store, "reports", "metadata")
    target = REGISTRY.get((config.store.kind, mode))
    if target is None:
        from daemon.report.metadata import MetadataReporter

        return MetadataReporter(store)
    module_name, _, attr_path = target.partition(":")
    factory: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        factory = getattr(factory, attr)
    reporter: Reporter = factory(config, store)
    return reporter
