"""Who this sidecar is: the pod's name, namespace, uid and node from the downward API.

The node id of a sidecar is its pod name. Reads environment variables only;
never calls the API server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from daemon.errors import ConfigError
from daemon.model import NodeId

_VARS = {"name": "POD_NAME", "namespace": "POD_NAMESPACE", "uid": "POD_UID", "node_name": "NODE_NAME"}


@dataclass(frozen=True)
class PodIdentity:
    name: str
    namespace: str
    uid: str
    node_name: str

    @property
    def node_id(self) -> NodeId:
        return NodeId(self.name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PodIdentity:
        """Read the downward API variables; a missing one is a ``ConfigError`` naming it."""
        env = os.environ if environ is None else environ
        missing = [var for var in _VARS.values() if not env.get(var)]
        if missing:
            raise ConfigError(
                [
                    f"{var}: not set; expose it with the downward API (env valueFrom.fieldRef: {_FIELDS[var]})"
                    for var in missing
                ]
            )
        return cls(**{attr: env[var] for attr, var in _VARS.items()})


_FIELDS = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_UID": "metadata.uid",
    "NODE_NAME": "spec.nodeName",
}
