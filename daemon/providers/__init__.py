"""Credential providers: mint, apply, test and retire credentials.

Chosen by ``kind`` from ``REGISTRY``, imported lazily. The ``password``
generator is a provider whose apply/test/retire do nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import RotationConfig
    from daemon.providers.base import Provider

REGISTRY: dict[str, str] = {
    "password": "daemon.providers.password:PasswordProvider",
    "postgres": "daemon.providers.postgres:PostgresProvider",
}


def open_provider(rotation: RotationConfig) -> Provider:
    spec = rotation.provider or rotation.generator
    assert spec is not None  # config fills a default generator
    module_name, _, cls_name = REGISTRY[spec.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    provider: Provider = cls(spec)
    return provider
