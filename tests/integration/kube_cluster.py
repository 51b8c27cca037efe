"""``Cluster``: what a test does to Kubernetes through the API, the same against a real cluster and the double.

Objects are made, read, patched and deleted through the API (never the
double's hooks), and the test waits for what controllers and kubelets do, as
against a real cluster (``KUBECONFIG`` set: tests/fixtures/kube.py). Against
the double, its controllers play those parts (``KubeDouble.start_controllers``).
Names are unique per run (``name``), and everything made is deleted after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.clients.kube import MERGE_PATCH, PROMOTED, KubeClient, Obj, kube_call
from daemon.errors import StoreNotFound
from tests.fixtures.kube import KubeApi

# Images a real cluster can pull: one that runs until stopped, one with a shell for a pod that exits.
PAUSE = "registry.k8s.io/pause:3.10"
BUSYBOX = "busybox:1.36"
_SUFFIX = {
    "secrets": "secret",
    "pods": "pod",
    "deployments": "deployment",
    "statefulsets": "stateful_set",
    "daemonsets": "daemon_set",
}
_ARGO = ("argoproj.io", "v1alpha1")


class Cluster:
    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.ns = api.namespace
        self.double = api.double
        self.real = api.double is None
        self.kube = KubeClient(kubeconfig=api.kubeconfig)
        self.made: list[tuple[str, str]] = []
        # A real cluster takes seconds to pull and start; the double answers at once.
        self.timeout = 180.0 if self.real else 10.0
        if self.double is not None:
            self.double.start_controllers()

    def name(self, base: str) -> str:
        return f"{base}-{uuid.uuid4().hex[:6]}"

    async def _api(self, plural: str) -> Any:
        return await (self.kube.core() if plural in ("secrets", "pods") else self.kube.apps())

    async def create(self, plural: str, obj: Obj) -> Obj:
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.ns}}
        kw: dict[str, Any] = {"_preload_content": False}
        if plural == "rollouts":
            call = (await self.kube.custom()).create_namespaced_custom_object(*_ARGO, self.ns, plural, obj, **kw)
        else:
            call = getattr(await self._api(plural), f"create_namespaced_{_SUFFIX[plural]}")(self.ns, obj, **kw)
        made = await kube_call(call, op="create", what=plural)
        self.made.append((plural, obj["metadata"]["name"]))
        return made

    async def get(self, plural: str, name: str) -> Obj | None:
        kw: dict[str, Any] = {"_preload_content": False}
        if plural == "rollouts":
            call = (await self.kube.custom()).get_namespaced_custom_object(*_ARGO, self.ns, plural, name, **kw)
        else:
            call = getattr(await self._api(plural), f"read_namespaced_{_SUFFIX[plural]}")(name, self.ns, **kw)
        try:
            return await kube_call(call, op="get", what=name)
        except StoreNotFound:
            return None

    async def patch(self, plural: str, name: str, body: Obj) -> Obj:
        kw: dict[str, Any] = {"_preload_content": False, "_content_type": MERGE_PATCH}
        if plural == "rollouts":
            call = (await self.kube.custom()).patch_namespaced_custom_object(*_ARGO, self.ns, plural, name, body, **kw)
        else:
            call = getattr(await self._api(plural), f"patch_namespaced_{_SUFFIX[plural]}")(name, self.ns, body, **kw)
        return await kube_call(call, op="patch", what=name)

    async def delete(self, plural: str, name: str) -> None:
        kw: dict[str, Any] = {"_preload_content": False}
        if plural == "rollouts":
            call = (await self.kube.custom()).delete_namespaced_custom_object(*_ARGO, self.ns, plural, name, **kw)
        else:
            call = getattr(await self._api(plural), f"delete_namespaced_{_SUFFIX[plural]}")(name, self.ns, **kw)
        with contextlib.suppress(StoreNotFound):
            await kube_call(call, op="delete", what=name)

    async def served(self, plural: str) -> bool:
        """False when the cluster does not serve the kind (Argo Rollouts not installed)."""
        try:
            call = (await self.kube.custom()).list_namespaced_custom_object(
                *_ARGO, self.ns, plural, _preload_content=False
            )
            await kube_call(call, op="list", what=plural)
        except StoreNotFound:
            return False
        return True

    async def pods(self, prefix: str) -> dict[str, Obj]:
        """The running pods whose name starts with ``prefix`` (a workload's)."""
        core = await self.kube.core()
        listing = await kube_call(core.list_namespaced_pod(self.ns, _preload_content=False), op="list", what="pods")
        return {
            p["metadata"]["name"]: p
            for p in listing.get("items") or []
            if p["metadata"]["name"].startswith(prefix)
            and (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        }

    async def until(self, check: Callable[[], Awaitable[bool]], *, what: str, timeout: float | None = None) -> float:
        """Call ``check`` until it says yes; fail naming ``what`` after the cluster's timeout."""
        limit = self.timeout if timeout is None else timeout
        started = time.monotonic()
        while not await check():
            if time.monotonic() - started > limit:
                raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}")
            await asyncio.sleep(0.02 if not self.real else 0.5)
        return time.monotonic() - started

    async def stamp(self, key: str, version: str, at: float, *, value: str = "pw-1") -> None:
        """The Secret ``key`` as the store leaves it after promoting ``version`` at ``at``."""
        annotations = {PROMOTED: f"{version} {at!r}"}
        if await self.get("secrets", key) is None:
            data = {"value": base64.b64encode(value.encode()).decode()}
            await self.create("secrets", {"metadata": {"name": key, "annotations": annotations}, "data": data})
        else:
            await self.patch("secrets", key, {"metadata": {"annotations": annotations}})

    async def run_pod(self, name: str, spec: Obj) -> Obj:
        """Create a bare pod and wait until it runs."""
        await self.create("pods", {"metadata": {"name": name}, "spec": {"restartPolicy": "Always", **spec}})
        await self.until(lambda: _has(self.pods(name), name), what=f"pod {name} running")
        pod = await self.get("pods", name)
        assert pod is not None
        return pod

    async def ended_pod(self, name: str, spec: Obj) -> None:
        """A pod that ran and ended (Succeeded), as one whose container exits does."""
        if self.double is None:
            containers = [{**c, "image": BUSYBOX, "command": ["true"]} for c in spec["containers"]]
            body = {"metadata": {"name": name}, "spec": {**spec, "containers": containers, "restartPolicy": "Never"}}
            await self.create("pods", body)
            await self.until(lambda: self._phase(name, "Succeeded"), what=f"pod {name} to end")
            return
        await self.run_pod(name, spec)
        pod = self.double.get("pods", self.ns, name)
        assert pod is not None
        pod["status"]["phase"] = "Succeeded"  # the double's kubelet never ends a container on its own
        self.double.put("pods", pod)

    async def _phase(self, name: str, phase: str) -> bool:
        pod = await self.get("pods", name)
        return pod is not None and (pod.get("status") or {}).get("phase") == phase

    async def aclose(self) -> None:
        for plural, name in reversed(self.made):
            await self.delete(plural, name)
        await self.kube.aclose()


async def _has(pods: Awaitable[dict[str, Obj]], name: str) -> bool:
    return name in await pods
