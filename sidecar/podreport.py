"""Node reports as annotations on the agents' own Pods (``store.reports: pod``).

The agent writes ``baton.io/report.<credential>`` on its own Pod with a merge
patch of that one key; the rotator lists the agent Pods by label selector and
reads them. A deleted Pod is simply absent from the list, so its report is
gone (known gone, not unknown). Never reads-modifies-writes a Pod.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.clients.kube import MERGE_PATCH, KubeClient, annotation_key, default_namespace, kube_call
from daemon.errors import ConfigError, StoreNotFound
from daemon.model import CredentialName, NodeId
from daemon.report.base import NodeReport
from sidecar.identity import PodIdentity

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)

# Pods that will never run again: their reports are gone with them.
_FINISHED = {"Succeeded", "Failed"}


def report_annotation(credential: str) -> str:
    return annotation_key("baton.report." + credential)


class PodReporter:
    """``Reporter`` on Pod annotations.

    ``collect`` returns one report per live agent pod: a pod with no (or an
    unreadable) report for the credential gets a stale stand-in, so it blocks.
    """

    # A node (pod) missing from the collected reports is a deleted or finished pod: gone, not unknown.
    absent_means_gone = True

    def __init__(
        self,
        *,
        namespace: str,
        selector: str,
        identity: PodIdentity | None = None,
        kubeconfig: Path | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        self.identity = identity
        self.kubeconfig = kubeconfig
        self.request_timeout = request_timeout
        self._kube = KubeClient(kubeconfig=kubeconfig)

    @classmethod
    def from_config(cls, config: Config, identity: PodIdentity | None = None) -> PodReporter:
        """``identity`` is needed to publish (agents); the rotator only collects and may pass None."""
        store = config.store
        if store.kind != "kubernetes":
            raise ConfigError(["store.kind: pod reports need the kubernetes store"])
        namespace = store.namespace or (identity.namespace if identity else None)
        return cls(
            namespace=default_namespace(namespace),
            selector=store.pod_selector,
            identity=identity,
            kubeconfig=store.kubeconfig,
        )

    async def _core(self) -> Any:  # raw calls (dict bodies, _preload_content=False)
        return await self._kube.core()

    async def _patch_pod(self, namespace: str, pod: str, annotations: dict[str, str | None]) -> None:
        core = await self._core()
        await kube_call(
            core.patch_namespaced_pod(
                pod,
                namespace,
                {"metadata": {"annotations": annotations}},
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            ),
            op="patch pod annotations",
            what=pod,
        )

    async def publish(self, key: str, report: NodeReport) -> None:
        if self.identity is None:
            raise ConfigError(["POD_NAME: publishing a pod report needs the pod identity"])
        await self._patch_pod(
            self.identity.namespace, self.identity.name, {report_annotation(report.credential): report.to_json()}
        )

    async def collect(self, key: str, credential: CredentialName) -> list[NodeReport]:
        core = await self._core()
        listing = await kube_call(
            core.list_namespaced_pod(
                self.namespace,
                label_selector=self.selector,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            ),
            op="list pods",
            what=self.selector,
        )
        wanted = report_annotation(credential)
        reports: list[NodeReport] = []
        for pod in listing.get("items") or []:
            meta = pod.get("metadata") or {}
            name = meta.get("name")
            if (pod.get("status") or {}).get("phase") in _FINISHED or not isinstance(name, str):
                continue  # will never run again: gone with its report
            text = (meta.get("annotations") or {}).get(wanted)
            if text is None:
                # A live pod (pending, running, or terminating with its containers
                # still up) with no report yet may be about to read, or already
                # hold, the old version: unknown, and unknown blocks until it reports.
                reports.append(NodeReport(node=NodeId(name), credential=credential, current=None))
                continue
            try:
                report = NodeReport.from_json(text)
                if report.credential != credential:  # the annotation key says otherwise
                    raise ValueError("report for another credential")
            except (KeyError, ValueError, TypeError):
                # An unreadable report is an unknown node, and unknown blocks:
                # stand in a report that is stale from the start (node id = pod name).
                log.warning("unreadable pod report", extra={"pod": name})
                report = NodeReport(node=NodeId(name), credential=credential, current=None)
            reports.append(report)
        return reports

    async def forget(self, key: str, node: NodeId) -> None:
        """Clear every Baton report annotation of the node's pod (a node id is its pod name)."""
        # The credential is not part of the call, so every report key of that pod
        # goes; the merge patch touches only those keys.
        core = await self._core()
        try:
            pod = await kube_call(
                core.read_namespaced_pod(
                    node, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="get pod",
                what=node,
            )
        except StoreNotFound:
            return  # the pod is gone, and its reports with it
        prefix = report_annotation("")
        names = [a for a in (pod.get("metadata", {}).get("annotations") or {}) if a.startswith(prefix)]
        if names:
            try:
                await self._patch_pod(self.namespace, node, dict.fromkeys(names))
            except StoreNotFound:
                return

    async def aclose(self) -> None:
        await self._kube.aclose()


def open_reporter(config: Config, store: object = None) -> PodReporter:
    """For ``daemon.report.open_reporter``: an agent in a Pod publishes on its own Pod
    (identity from the downward API); a rotator, with no POD_NAME, only collects."""
    identity = PodIdentity.from_env() if "POD_NAME" in os.environ else None
    return PodReporter.from_config(config, identity)
