"""Secret stores: one module per store behind the ``SecretStore`` Protocol.

Backends are chosen by the config's ``store.kind`` from ``REGISTRY`` and
imported lazily, so a node using the local store never imports hvac, boto or
the Kubernetes client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.stores.base import SecretStore

REGISTRY: dict[str, str] = {
    "local": "daemon.stores.local:LocalStore",
    "vault": "daemon.stores.vault:VaultStore",
    "aws": "daemon.stores.aws:AwsStore",
    "kubernetes": "daemon.stores.kubernetes:KubernetesStore",
}


def open_store(config: Config) -> SecretStore:
    """Build the store named by ``config.store.kind`` (``Cls.from_config(config)``)."""
    module_name, _, cls_name = REGISTRY[config.store.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    store: SecretStore = cls.from_config(config)
    return store
