"""Credentials issued to this node itself (leased dynamic secrets, certificates): see base.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.kit import plugins

if TYPE_CHECKING:
    from daemon.config import Config, CredentialConfig
    from daemon.issuers.base import Issuer
    from daemon.stores.base import SecretStore


def open_issuer(config: Config, credential: CredentialConfig, store: SecretStore) -> Issuer:
    """Build the issuer of ``credential.issued_kind()`` (``Cls.from_config(config, credential, store)``); no I/O."""
    kind = credential.issued_kind()
    if kind is None:
        raise ValueError(f"credential {credential.name!r} is not issued")
    cls = plugins.load(plugins.ISSUERS, kind, kind="issuer")
    issuer: Issuer = cls.from_config(config, credential, store)
    return issuer
