"""The one plug-in loader: every backend is named here by ``"module:attribute"`` and imported only when chosen.

A node that only uses the local store never imports hvac, boto or the
Kubernetes client, and the core never imports ``sidecar`` (import-linter
forbids it): the Kubernetes pieces it needs are chosen here by the names the
config gives. This is the only module that imports by string.

A name missing from its registry, or a module that cannot be imported (an
optional extra not installed), is a ``PluginError`` naming the kind and the
name; the caller maps it into its own error where it has one (``ReloadError``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from daemon.errors import PluginError

# store.kind -> the class; built as ``Cls.from_config(config)``.
STORES: dict[str, str] = {
    "local": "daemon.stores.local:LocalStore",
    "vault": "daemon.stores.vault:VaultStore",
    "aws": "daemon.stores.aws:AwsStore",
    "kubernetes": "daemon.stores.kubernetes:KubernetesStore",
}

# provider/generator kind -> the class; built as ``Cls(spec)``.
PROVIDERS: dict[str, str] = {
    "password": "daemon.providers.password:PasswordProvider",
    "certificate": "daemon.providers.certificate:CertificateProvider",
    "postgres": "daemon.providers.postgres:PostgresProvider",
    "mysql": "daemon.providers.mysql:MysqlProvider",
    "redis": "daemon.providers.redis:RedisProvider",
    "aws-iam": "daemon.providers.aws_iam:AwsIamProvider",
    "command": "daemon.providers.command:CommandProvider",
}

# "<store kind>/<reports setting>" -> a factory called as ``(config, store)``.
# A pair not named here reports into the store's own metadata ("metadata").
REPORTERS: dict[str, str] = {
    "metadata": "daemon.report.metadata:MetadataReporter.from_config",
    "vault/status_path": "daemon.report.vault_status:VaultStatusReporter.from_config",
    "aws/dynamodb": "daemon.report.dynamodb:DynamoReporter.from_config",
    "kubernetes/pod": "sidecar.podreport:open_reporter",
}

# store.kind -> a factory of its holder source (daemon/report/holders.py), called as ``(config, act=...)``;
# it may return None (turned off in the config).
HOLDERS: dict[str, str] = {
    "kubernetes": "sidecar.podholders:open_pod_holders",
}

# consumer reload action -> the class; built as ``Cls(consumer)``.
ACTIONS: dict[str, str] = {
    "signal": "daemon.reload.actions:SignalAction",
    "exec": "daemon.reload.actions:ExecAction",
    "restart": "daemon.reload.actions:RestartAction",
    "systemd": "daemon.reload.actions:SystemdAction",
    "none": "daemon.reload.actions:NoneAction",
    "container_restart": "sidecar.restart:ContainerRestartAction",
    "rollout": "sidecar.rollout:RolloutAction",
}

# CredentialConfig.issued_kind() -> the Issuer (daemon/issuers/base.py) of a credential this node
# issues itself; built as ``Cls.from_config(config, credential, store)``.
ISSUERS: dict[str, str] = {
    "lease": "daemon.issuers.lease:LeaseIssuer",
    "certificate": "daemon.issuers.certificate:CertificateIssuer",
}

# notify[].kind -> the sink class; built as ``Cls(spec)`` (daemon/notify/).
NOTIFIERS: dict[str, str] = {
    "webhook": "daemon.notify.webhook:WebhookSink",
    "kubernetes-events": "sidecar.events:KubeEventsSink",
}

# Rotator leader election (``BATON_LEASE_NAME``) -> the class, built with keyword arguments.
ELECTIONS: dict[str, str] = {
    "kubernetes": "sidecar.leader:LeaderElection",
}


def load(registry: Mapping[str, str], name: str, *, kind: str) -> Any:
    """The object ``registry[name]`` names, its module imported now; ``PluginError`` if unknown or unavailable."""
    target = registry.get(name)
    if target is None:
        raise PluginError(f"unknown {kind} {name!r}")
    module_name, _, attr_path = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            found = getattr(found, attr)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{kind} {name!r} is not available ({target})") from e
    return found
