"""Where node reports go: store metadata (default), a status path, pod annotations.

``open_reporter`` picks the reporter from the store config's ``reports`` setting
through ``daemon.kit.plugins.REPORTERS``; a (store, setting) pair that names no
reporter of its own reports into the store's metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.config import LocalStoreConfig
from daemon.kit import plugins

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.report.base import Reporter
    from daemon.stores.base import SecretStore


def open_reporter(config: Config, store: SecretStore) -> Reporter:
    store_config = config.store
    # The local store has no reports setting: its node reports are always its metadata.
    reports = "metadata" if isinstance(store_config, LocalStoreConfig) else store_config.reports
    name = f"{store_config.kind}/{reports}"
    if name not in plugins.REPORTERS:
        name = "metadata"
    factory = plugins.load(plugins.REPORTERS, name, kind="reporter")
    reporter: Reporter = factory(config, store)
    return reporter
