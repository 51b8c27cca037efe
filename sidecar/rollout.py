"""Rolling restarts of a workload, once per change: the ``rollout`` reload action and the check it shares.

A restart is a patch of the pod template, as ``kubectl rollout restart`` does
(an Argo Rollout's is ``spec.restartAt``: a template change would be a new
revision through its canary steps). Each restart records what it was for in
``baton.io/rolled-for: <credential>@<version>[,...]`` (on the pod template; on
an Argo Rollout, its own annotations), and the patch carries the
resourceVersion it was judged on: of N replicas (sidecars, or rotators) asking
for the same change, the first patches, the others get 409, read again and
find the change already asked for. It never deletes pods itself: the
workload's controller rolls them within its own surge/unavailability limits.

The same check (``missing``) serves the rotator's Reloader-style rollouts
(``sidecar/podholders.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.clients.kube import MERGE_PATCH, ROLLED_FOR, KubeClient, Obj, default_namespace, kube_call
from daemon.config import ConsumerConfig
from daemon.errors import ReloadError, StoreConflict, StoreError
from daemon.reload.actions import ReloadAction, roll_versions

log = logging.getLogger(__name__)

RESTARTED_AT = "baton.io/restartedAt"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
_CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class Kind:
    """A workload kind: where its API is and how it is restarted and judged."""

    name: str
    plural: str
    group: str  # "" for apps/v1 (AppsV1Api), else a custom resource's group
    version: str
    desired: str | None  # status field of the desired count (None: spec.replicas)
    updated: str
    available: str

    @property
    def in_template(self) -> bool:
        """True when a restart is a pod template change (every kind but an Argo Rollout)."""
        return not self.group


KINDS: dict[str, Kind] = {
    "Deployment": Kind("Deployment", "deployments", "", "v1", None, "updatedReplicas", "availableReplicas"),
    "StatefulSet": Kind("StatefulSet", "statefulsets", "", "v1", None, "updatedReplicas", "availableReplicas"),
    "DaemonSet": Kind(
        "DaemonSet", "daemonsets", "", "v1", "desiredNumberScheduled", "updatedNumberScheduled", "numberAvailable"
    ),
    "Rollout": Kind("Rollout", "rollouts", "argoproj.io", "v1alpha1", None, "updatedReplicas", "availableReplicas"),
}
_SUFFIX = {"deployments": "deployment", "statefulsets": "stateful_set", "daemonsets": "daemon_set"}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _annotations(obj: Obj, kind: Kind) -> dict[str, Any]:
    if kind.in_template:
        template = _dict(_dict(obj.get("spec")).get("template"))
        return _dict(_dict(template.get("metadata")).get("annotations"))
    return _dict(_dict(obj.get("metadata")).get("annotations"))


def rolled_for(obj: Obj, kind: Kind) -> dict[str, str]:
    """credential -> version of the workload's ``baton.io/rolled-for`` (unreadable entries are left out)."""
    out: dict[str, str] = {}
    for entry in str(_annotations(obj, kind).get(ROLLED_FOR, "")).split(","):
        credential, at, version = entry.strip().rpartition("@")
        if at and credential and version:
            out[credential] = version
    return out


def missing(obj: Obj, kind: Kind, wanted: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``wanted`` (credential -> version) no restart of the workload was asked for yet."""
    have = rolled_for(obj, kind)
    return {c: v for c, v in wanted.items() if have.get(c) != v}


def restart_patch(obj: Obj, kind: Kind, wanted: Mapping[str, str]) -> dict[str, Any]:
    """The patch that restarts the workload for ``wanted``, conditional on the resourceVersion it was judged on."""
    entries = {**rolled_for(obj, kind), **wanted}
    value = ",".join(f"{c}@{v}" for c, v in sorted(entries.items()))
    now = now_rfc3339()
    meta: dict[str, Any] = {"resourceVersion": _dict(obj.get("metadata")).get("resourceVersion")}
    if kind.in_template:
        annotations = {ROLLED_FOR: value, RESTARTED_AT: now}
        return {"metadata": meta, "spec": {"template": {"metadata": {"annotations": annotations}}}}
    return {"metadata": {**meta, "annotations": {ROLLED_FOR: value}}, "spec": {"restartAt": now}}


def rollout_done(obj: dict[str, Any], *, generation: int | None = None, kind: str = "Deployment") -> bool:
    """True when the controller has seen ``generation`` (default: the object's own) and every
    replica is updated and available; for an Argo Rollout, also its restart (``spec.restartAt``) done."""
    k = KINDS[kind]
    meta, spec, status = _dict(obj.get("metadata")), _dict(obj.get("spec")), _dict(obj.get("status"))
    if generation is None:
        generation = _int(meta.get("generation"))
    if _int(status.get("observedGeneration")) < generation:
        return False
    desired = _int(spec.get("replicas", 1)) if k.desired is None else _int(status.get(k.desired))
    if _int(status.get(k.available)) < desired:
        return False
    if not k.in_template:
        asked, done = _time(spec.get("restartAt")), _time(status.get("restartedAt"))
        # Argo sets status.restartedAt once every pod older than spec.restartAt is replaced.
        return asked is None or (done is not None and done >= asked)
    return _int(status.get(k.updated)) >= desired


async def read_workload(kube: KubeClient, kind: Kind, namespace: str, name: str, *, request_timeout: float) -> Obj:
    what = f"{kind.name}/{namespace}/{name}"
    if kind.group:
        custom = await kube.custom()
        call = custom.get_namespaced_custom_object(
            kind.group,
            kind.version,
            namespace,
            kind.plural,
            name,
            _preload_content=False,
            _request_timeout=request_timeout,
        )
    else:
        apps = await kube.apps()
        call = getattr(apps, f"read_namespaced_{_SUFFIX[kind.plural]}")(
            name, namespace, _preload_content=False, _request_timeout=request_timeout
        )
    return await kube_call(call, op="get", what=what)


async def patch_workload(
    kube: KubeClient, kind: Kind, namespace: str, name: str, body: Obj, *, request_timeout: float
) -> Obj:
    what = f"{kind.name}/{namespace}/{name}"
    if kind.group:
        # A custom resource takes no strategic merge patch.
        custom = await kube.custom()
        call = custom.patch_namespaced_custom_object(
            kind.group,
            kind.version,
            namespace,
            kind.plural,
            name,
            body,
            _content_type=MERGE_PATCH,
            _preload_content=False,
            _request_timeout=request_timeout,
        )
    else:
        apps = await kube.apps()
        # A strategic merge patch, as kubectl sends it: the template's other fields stay.
        call = getattr(apps, f"patch_namespaced_{_SUFFIX[kind.plural]}")(
            name,
            namespace,
            body,
            _content_type=STRATEGIC_MERGE_PATCH,
            _preload_content=False,
            _request_timeout=request_timeout,
        )
    return await kube_call(call, op="patch", what=what)


def list_call(kube: KubeClient, kind: Kind, namespace: str) -> Any:
    """The list/watch call of ``kind`` in ``namespace`` for ``sidecar.informer.Informer``."""

    async def call(**kw: Any) -> Any:
        if kind.group:
            custom = await kube.custom()
            return await custom.list_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, **kw)
        apps = await kube.apps()
        return await getattr(apps, f"list_namespaced_{_SUFFIX[kind.plural]}")(namespace, **kw)

    return call


async def restart_once(
    kube: KubeClient, kind: Kind, namespace: str, name: str, wanted: Mapping[str, str], *, request_timeout: float
) -> tuple[Obj, bool]:
    """Restart the workload for ``wanted`` unless a restart for it was asked already: (object, patched).

    A 409 means another writer changed it since it was read: read again and judge again.
    """
    for _ in range(_CONFLICT_RETRIES):
        obj = await read_workload(kube, kind, namespace, name, request_timeout=request_timeout)
        todo = missing(obj, kind, wanted) if wanted else {}
        if wanted and not todo:
            return obj, False
        if wanted:
            body = restart_patch(obj, kind, todo)
        else:  # no versions known: a plain restart, as before (each call restarts)
            body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now_rfc3339()}}}}}
            if not kind.in_template:
                body = {"spec": {"restartAt": now_rfc3339()}}
        try:
            return await patch_workload(kube, kind, namespace, name, body, request_timeout=request_timeout), True
        except StoreConflict:
            continue
    raise StoreConflict(f"kubernetes patch {kind.name}/{namespace}/{name}: changed by others {_CONFLICT_RETRIES} times")


class RolloutRestart:
    """``reload(pid)`` (pid ignored) restarts the workload once per change and waits until it is available.

    The change is the roll's credential versions (``daemon.reload.actions.roll_versions``);
    a call with none known restarts unconditionally.
    """

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

    async def _client(self) -> KubeClient:
        return self._kube

    async def reload(self, pid: int, *, started: float | None = None) -> None:
        what = f"{self.kind}/{self.namespace}/{self.name}"
        kind = KINDS[self.kind]
        kube = await self._client()
        wanted = {str(c): str(v) for c, v in roll_versions.get().items()}
        try:
            obj, patched = await restart_once(
                kube, kind, self.namespace, self.name, wanted, request_timeout=self.request_timeout
            )
        except StoreError as e:
            raise ReloadError(f"rollout restart of {what} failed: {e}") from e
        generation = _int(_dict(obj.get("metadata")).get("generation"))
        if patched:
            log.info("rollout restart requested", extra={"workload": what, "generation": generation})
        else:
            log.info("rollout restart already asked for this change", extra={"workload": what, "for": wanted})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not rollout_done(obj, generation=generation, kind=self.kind):
            if loop.time() >= deadline:
                raise ReloadError(f"rollout of {what} not available after {self.timeout:g}s")
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - loop.time())))
            try:
                obj = await read_workload(kube, kind, self.namespace, self.name, request_timeout=self.request_timeout)
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

    async def _client(self) -> KubeClient:
        # The client is made on first use, inside reload(): a config that cannot be
        # loaded (no in-cluster account, no kubeconfig) is this reload's failure, a
        # ReloadError like every other, not an unexpected StoreAuthError.
        try:
            await self._kube.apps()
        except StoreError as e:
            raise ReloadError(f"rollout restart of {self.kind}/{self.namespace}/{self.name}: {e}") from e
        return self._kube
