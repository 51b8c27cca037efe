"""Credential providers: mint, apply, test and retire credentials.

Chosen by ``kind`` from ``daemon.kit.plugins.PROVIDERS``, imported lazily. The
``password`` generator is a provider whose apply/test/retire do nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.kit import plugins

if TYPE_CHECKING:
    from daemon.config import RotationConfig
    from daemon.providers.base import Provider


def open_provider(rotation: RotationConfig) -> Provider:
    spec = rotation.provider or rotation.generator
    assert spec is not None  # config fills a default generator
    cls = plugins.load(plugins.PROVIDERS, spec.kind, kind="provider")
    provider: Provider = cls(spec)
    return provider
