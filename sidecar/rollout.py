"""The ``rollout`` reload action: a rolling restart of a workload, as ``kubectl rollout restart`` does.

One call patches the pod template annotation ``baton.io/restartedAt`` to now
(RFC 3339), once, then polls the workload until the rollout is available or the
timeout passes. It never deletes pods itself: the workload controller rolls
them within its own surge/unavailability limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.clients.kube import KubeClient, default_namespace, kube_call
from daemon.config import ConsumerConfig
from daemon.errors import ReloadError, StoreError
from daemon.reload.actions import ReloadAction

log = logging.getLogger(__name__)

RESTARTED_AT = "baton.io/restartedAt"

# kind -> (method suffix of AppsV1Api, status fields: desired, updated, available)
_KINDS = {
    "Deployment": ("deployment", None, "updatedReplicas", "availableReplicas"),
    "StatefulSet": ("stateful_set", None, "updatedReplicas", "availableReplicas"),
    "DaemonSet": ("daemon_set", "desiredNumberScheduled", "updatedNumberScheduled", "numberAvailable"),
}


def rollout_done(obj: dict[str, Any], *, generation: int, kind: str = "Deployment") -> bool:
    """True when the controller has seen ``generation`` and every replica is updated and available."""
    _, desired_field, updated_field, available_field = _KINDS[kind]
    status = obj.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return False
    if desired_field is None:
        desired = int((obj.get("spec") or {}).get("replicas", 1))
    else:
        desired = int(status.get(desired_field) or 0)
    return int(status.get(updated_field) or 0) == desired and int(status.get(available_field) or 0) == desired


class RolloutRestart:
    """Reload action ``rollout``: ``reload(pid)`` (pid ignored) restarts the workload and waits."""

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        namespace: str,
        timeout: float,
        kubeconfig: Path | None = None,
        poll_interval: float = 2.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.kind = kind
        self.name = name
        self.namespace = namespace
        self.timeout = timeout
        self.kubeconfig = kubeconfig
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._kube = KubeClient(kubeconfig=kubeconfig)

    async def _apps(self) -> Any:  # raw calls (dict bodies, _preload_content=False)
        return await self._kube.apps()

    async def reload(self, pid: int, *, started: float | None = None) -> None:
        what = f"{self.kind}/{self.namespace}/{self.name}"
        apps = await self._apps()
        suffix = _KINDS[self.kind][0]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        try:
            # A dict body goes out as a strategic merge patch, as kubectl sends it.
            patched = await kube_call(
                getattr(apps, f"patch_namespaced_{suffix}")(
                    self.name, self.namespace, patch, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="patch",
                what=what,
            )
        except StoreError as e:
            raise ReloadError(f"rollout restart of {what} failed: {e}") from e
        generation = int((patched.get("metadata") or {}).get("generation") or 0)
        log.info("rollout restart requested", extra={"workload": what, "generation": generation})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        obj = patched
        while not rollout_done(obj, generation=generation, kind=self.kind):
            if loop.time() >= deadline:
                raise ReloadError(f"rollout of {what} not available after {self.timeout:g}s")
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - loop.time())))
            try:
                obj = await kube_call(
                    getattr(apps, f"read_namespaced_{suffix}")(
                        self.name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                    ),
                    op="get",
                    what=what,
                )
            except StoreError as e:
                # A transient read error does not undo the restart: keep waiting until the deadline.
                log.warning("rollout status read failed", extra={"workload": what, "error": str(e)})
        log.info("rollout available", extra={"workload": what})

    async def aclose(self) -> None:
        await self._kube.aclose()


class RolloutAction(RolloutRestart, ReloadAction):
    """The ``rollout`` reload action as daemon.reload.reloader builds it: ``Cls(consumer)``.

    Called once per batch (``per_consumer``), even when no local process matches
    (``needs_process = False``): the workload may live on other nodes.
    """

    per_consumer = True
    needs_process = False

    def __init__(self, consumer: ConsumerConfig) -> None:
        rollout = consumer.reload.rollout
        assert rollout is not None
        super().__init__(
            kind=rollout.kind,
            name=rollout.name,
            namespace=default_namespace(rollout.namespace or os.environ.get("POD_NAMESPACE")),
            timeout=rollout.timeout,
            kubeconfig=rollout.kubeconfig,
        )

    async def _apps(self) -> Any:
        # The client is made on first use, inside reload(): a config that cannot be
        # loaded (no in-cluster account, no kubeconfig) is this reload's failure, a
        # ReloadError like every other, not an unexpected StoreAuthError.
        try:
            return await super()._apps()
        except StoreError as e:
            raise ReloadError(f"rollout restart of {self.kind}/{self.namespace}/{self.name}: {e}") from e
