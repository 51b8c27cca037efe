"""Secret stores: one module per store behind the ``SecretStore`` Protocol.

Backends are chosen by the config's ``store.kind`` from ``daemon.kit.plugins.STORES``
and imported lazily, so a node using the local store never imports hvac, boto or
the Kubernetes client. A store never imports another store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.kit import plugins

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.stores.base import SecretStore


def open_store(config: Config) -> SecretStore:
    """Build the store named by ``config.store.kind`` (``Cls.from_config(config)``)."""
    cls = plugins.load(plugins.STORES, config.store.kind, kind="store")
    store: SecretStore = cls.from_config(config)
    return store
