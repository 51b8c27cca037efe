"""The ``kubernetes-events`` notification sink: a core/v1 Event on this Pod per notice.

The Pod is the one the downward API names (POD_NAME, POD_NAMESPACE, POD_UID,
NODE_NAME): the rotator's Pod for rotations and retirements, the agent's for
what its node sees. ``kubectl describe pod`` and ``kubectl get events`` then
show them. Loaded by name (``kit.plugins.NOTIFIERS``); goes through
``clients/kube.py``. A message is the notice's one line (names, ids, counts),
never a secret value; an API error is mapped to ``NotifyError`` without its
response body.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from daemon.clients.kube import KubeClient, kube_call
from daemon.config import KubernetesEventsNotifyConfig
from daemon.errors import NotifyError, StoreError
from daemon.notify.base import Notice
from sidecar.identity import PodIdentity

MAX_MESSAGE = 1024  # the apiserver's limit on an Event's message


def reason_of(event: str) -> str:
    """``rotation_failed`` -> ``RotationFailed`` (Events' reasons are CamelCase)."""
    return "".join(part.capitalize() for part in event.split("_"))[:128]


def event_body(notice: Notice, pod: PodIdentity) -> dict[str, Any]:
    now = datetime.datetime.fromtimestamp(notice.at, tz=datetime.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        # A name of our own, as kubectl's events have (<object>.<unique>): no generateName round trip.
        "metadata": {"name": f"{pod.name[:200]}.baton-{uuid.uuid4().hex[:12]}", "namespace": pod.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        },
        "reason": reason_of(notice.event),
        "message": notice.text()[:MAX_MESSAGE],
        "type": "Warning" if notice.level in ("warning", "error", "critical") else "Normal",
        "source": {"component": f"baton-{notice.role}", "host": pod.node_name},
        "reportingComponent": "baton.io/" + notice.role,
        "reportingInstance": pod.name[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class KubeEventsSink:
    name = "kubernetes-events"

    def __init__(self, spec: KubernetesEventsNotifyConfig) -> None:
        self.pod = PodIdentity.from_env()  # a missing downward API variable is a ConfigError naming it
        self.kube = KubeClient(kubeconfig=spec.kubeconfig)

    async def send(self, notice: Notice) -> None:
        core = await self.kube.core()
        try:
            await kube_call(
                core.create_namespaced_event(self.pod.namespace, event_body(notice, self.pod), _preload_content=False),
                op="create",
                what=f"event on pod {self.pod.name}",
            )
        except StoreError as e:
            raise NotifyError(str(e)) from None

    async def aclose(self) -> None:
        await self.kube.aclose()
