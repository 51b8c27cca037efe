"""Pods that use a credential's Secret natively, as holders; Reloader-style rollouts (the rotator's side).

Most pods run no Baton agent: they read the Secret as environment variables or
a mounted volume. The rotator watches the namespace's pods (``Informer``: one
list, then a watch) and finds those whose spec references the Secret:
``env[].valueFrom.secretKeyRef``, ``envFrom[].secretRef``, ``volumes[].secret``
and ``volumes[].projected.sources[].secret``, in containers, init containers
and ephemeral containers. What each one holds, judged against ``since`` (the
store's ``baton.io/promoted`` stamp, an upper bound of when the Secret began to
hold the new version; else when this process first saw it current):

- env, envFrom and ``subPath`` mounts are read once, when the container starts,
  and never again: a container set up before ``since + start_margin`` (its pod's
  creation, or its last restart) holds the old version until it is replaced;
- a plain secret (or projected) volume follows the Secret once the kubelet has
  synced it: it holds the old version until ``since + volume_sync_delay``;
- a pod that finished (Succeeded, Failed) or was deleted holds nothing; a pod
  whose spec cannot be read holds the old version (unknown is in use), and so
  does every pod while the watch does not follow the API.

Workloads annotated ``baton.io/reload: <credential>[,...]`` (Deployment,
StatefulSet, DaemonSet, Argo Rollout) hold the old version until a restart for
``<credential>@<new>`` was asked (``baton.io/rolled-for``) and is available. A
source opened with ``act=True`` (the leading rotator's retirement pass, after
the new version is in the Secret) asks for it, once per version
(``sidecar.rollout.restart_once``). A workload whose rollout is not available
within ``rollout_timeout`` is an event and ``baton_rollout_stuck``.

Every entry is a ``NodeReport`` (``pod/<name>``, ``Deployment/<name>``, ...)
that ``rotation.gate.decide`` judges like an agent's. Reads pod specs only
for references: an env value written literally in a spec is never read out.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.clients.kube import RELOAD, KubeClient, Obj, default_namespace, kube_call, promoted_at
from daemon.errors import StoreError, StoreNotFound
from daemon.kit import metrics
from daemon.kit.logs import event
from daemon.model import CredentialName, NodeId, VersionId
from daemon.report.base import Holder, NodeReport
from daemon.report.holders import HolderSource
from sidecar.informer import Informer
from sidecar.rollout import KINDS, Kind, list_call, missing, restart_once, rollout_done

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)

_FINISHED = {"Succeeded", "Failed"}
_CONTAINERS = (
    ("initContainers", "initContainerStatuses"),
    ("containers", "containerStatuses"),
    ("ephemeralContainers", "ephemeralContainerStatuses"),
)
READ_ONCE = {"env", "envFrom", "subPath"}  # set up at container start, never updated


class Unreadable(ValueError):
    """A pod spec (or status) that does not have the shape the API gives it."""


@dataclass(frozen=True)
class Use:
    """One place a container takes the Secret from."""

    container: str
    how: str  # env, envFrom, subPath, volume
    what: str  # the variable, the prefix, the mount path
    set_up: float  # when it was read: the pod's creation or the container's last restart (a lower bound)


def _obj(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Unreadable(f"expected an object, not {type(value).__name__}")
    return value


def _list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unreadable(f"expected a list, not {type(value).__name__}")
    return [_obj(v) for v in value]


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise Unreadable("expected a string")
    return value


def _time(value: Any) -> float:
    try:
        return datetime.fromisoformat(_str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise Unreadable("not an RFC 3339 time") from None


def uses(pod: Obj, secret: str) -> list[Use]:
    """Every use of the Secret named ``secret`` by the pod's containers; ``Unreadable`` if the spec cannot be read."""
    meta, spec, status = _obj(pod.get("metadata")), _obj(pod.get("spec")), _obj(pod.get("status"))
    created = _time(meta.get("creationTimestamp"))
    volumes: set[str] = set()
    for v in _list(spec.get("volumes")):
        name = _str(v.get("name"))
        if _obj(v.get("secret")).get("secretName") == secret:
            volumes.add(name)
        for source in _list(_obj(v.get("projected")).get("sources")):
            if _obj(source.get("secret")).get("name") == secret:
                volumes.add(name)
    if not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise Unreadable("a pod has containers")
    found: list[Use] = []
    for group, statuses in _CONTAINERS:
        restarted: dict[str, float] = {}
        for st in _list(status.get(statuses)):
            finished = _obj(_obj(st.get("lastState")).get("terminated")).get("finishedAt")
            if finished is not None:
                restarted[_str(st.get("name"))] = _time(finished)
        for c in _list(spec.get(group)):
            name = _str(c.get("name"))
            set_up = max(created, restarted.get(name, created))
            for e in _list(c.get("env")):
                if _obj(_obj(e.get("valueFrom")).get("secretKeyRef")).get("name") == secret:
                    found.append(Use(name, "env", _str(e.get("name")), set_up))
            for e in _list(c.get("envFrom")):
                if _obj(e.get("secretRef")).get("name") == secret:
                    found.append(Use(name, "envFrom", str(e.get("prefix") or "") + "*", set_up))
            for m in _list(c.get("volumeMounts")):
                if m.get("name") in volumes:
                    sub = m.get("subPath") or m.get("subPathExpr")
                    # A subPath mount is a bind of the file as it was at container start.
                    how, at = ("subPath", set_up) if sub else ("volume", created)
                    found.append(Use(name, how, _str(m.get("mountPath")), at))
    return found


def owner(pod: Obj) -> str:
    """``Deployment/web``, ``StatefulSet/db``, ... from the controller reference; ``Pod`` for a bare pod."""
    meta = _obj(pod.get("metadata"))
    refs = [r for r in _list(meta.get("ownerReferences")) if r.get("controller")] or _list(meta.get("ownerReferences"))
    if not refs:
        return "Pod"
    kind, name = str(refs[0].get("kind")), str(refs[0].get("name"))
    labels = _obj(meta.get("labels"))
    if kind == "ReplicaSet":
        # A Deployment names its ReplicaSets <deployment>-<pod-template-hash>; an Argo Rollout likewise.
        for label, parent in (("pod-template-hash", "Deployment"), ("rollouts-pod-template-hash", "Rollout")):
            h = labels.get(label)
            if isinstance(h, str) and h and name.endswith("-" + h):
                return f"{parent}/{name[: -len(h) - 1]}"
    return f"{kind}/{name}"


def reload_names(obj: Obj) -> list[str]:
    """The credentials a workload's ``baton.io/reload`` annotation names."""
    text = _obj(_obj(obj.get("metadata")).get("annotations")).get(RELOAD)
    return [n.strip() for n in text.split(",") if n.strip()] if isinstance(text, str) else []


class PodHolders(HolderSource):
    """The ``HolderSource`` of the kubernetes store (see the module docstring)."""

    def __init__(
        self,
        *,
        namespace: str,
        credentials: Collection[str],
        kubeconfig: Path | None = None,
        act: bool = False,
        holders: bool = True,
        rollouts: bool = True,
        volume_sync_delay: float = 120.0,
        start_margin: float = 5.0,
        rollout_timeout: float = 600.0,
        request_timeout: float = 10.0,
        sync_timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.credentials = frozenset(credentials)
        self.act = act
        self.volume_sync_delay = volume_sync_delay
        self.start_margin = start_margin
        self.rollout_timeout = rollout_timeout
        self.request_timeout = request_timeout
        self.sync_timeout = sync_timeout
        self._kube = KubeClient(kubeconfig=kubeconfig)
        self.pods: Informer | None = None
        if holders:

            async def list_pods(**kw: Any) -> Any:
                core = await self._kube.core()
                return await core.list_namespaced_pod(namespace, **kw)

            self.pods = Informer(f"pods/{namespace}", list_pods, request_timeout=request_timeout)
        self.workloads: dict[str, Informer] = {}
        if rollouts:
            self.workloads = {
                k.name: Informer(f"{k.plural}/{namespace}", list_call(self._kube, k, namespace)) for k in KINDS.values()
            }
        self._first_seen: dict[tuple[str, str], float] = {}
        self._asked: dict[tuple[str, str, str], float] = {}  # (credential, workload, version) -> when asked
        self._said: set[tuple[str, ...]] = set()  # events said once

    @classmethod
    def from_config(cls, config: Config, *, act: bool) -> PodHolders | None:
        store = config.store
        if store.kind != "kubernetes" or not (store.pods.holders or store.pods.rollouts):
            return None
        pods = store.pods
        return cls(
            namespace=default_namespace(store.namespace),
            credentials=[c.name for c in config.credentials],
            kubeconfig=store.kubeconfig,
            act=act,
            holders=pods.holders,
            rollouts=pods.rollouts,
            volume_sync_delay=pods.volume_sync_delay,
            start_margin=pods.start_margin,
            rollout_timeout=pods.rollout_timeout,
        )

    def start(self) -> None:
        for inf in self._informers():
            inf.start()

    def _informers(self) -> Iterator[Informer]:
        if self.pods is not None:
            yield self.pods
        yield from self.workloads.values()

    async def aclose(self) -> None:
        for inf in self._informers():
            await inf.aclose()
        await self._kube.aclose()

    def _once(self, *key: str) -> bool:
        if key in self._said:
            return False
        self._said.add(key)
        return True

    # ------------------------------------------------------------ the source

    async def reports(
        self, key: str, credential: CredentialName, *, old: Sequence[VersionId], new: VersionId, now: float
    ) -> list[NodeReport]:
        if not old:
            return []
        self.start()  # every watch at once: a cluster that does not answer costs one sync_timeout, not five
        since = await self.since(key, new, now)
        out: list[NodeReport] = []
        if self.pods is not None:
            out += await self._pod_reports(key, credential, old=old, new=new, since=since, now=now)
        if self.workloads:
            out += await self._workload_reports(credential, old=old, new=new, since=since, now=now)
        return out

    async def since(self, key: str, new: str, now: float) -> float:
        """An upper bound of when the Secret began to hold ``new``: its stamp, else when first seen here."""
        first = self._first_seen.setdefault((key, new), now)
        try:
            core = await self._kube.core()
            secret = await kube_call(
                core.read_namespaced_secret(
                    key, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
                ),
                op="get secret",
                what=key,
            )
        except StoreError:
            return first  # the first sighting is an upper bound all the same
        stamped = promoted_at(secret, new)
        return min(first, stamped) if stamped is not None else first

    def _unknown(
        self, node: str, credential: CredentialName, old: Sequence[VersionId], why: str, now: float
    ) -> NodeReport:
        """An entry that blocks: what it holds is not known."""
        return NodeReport(
            node=NodeId(node),
            credential=credential,
            current=None,
            in_use={v: 1 for v in old},
            holders=tuple(Holder(pid=0, exe=f"({why})", consumer=None, how="unknown", version=v) for v in old),
            heartbeat=now,
        )

    async def _synced(self, inf: Informer) -> str | None:
        """None when the informer follows the API, else why not."""
        if not await inf.wait_synced(self.sync_timeout):
            return f"{inf.what}: not listed yet" + (f": {inf.error}" if inf.error else "")
        return f"{inf.what}: watch failing: {inf.error}" if inf.error else None

    async def _pod_reports(
        self,
        key: str,
        credential: CredentialName,
        *,
        old: Sequence[VersionId],
        new: VersionId,
        since: float,
        now: float,
    ) -> list[NodeReport]:
        assert self.pods is not None
        if (why := await self._synced(self.pods)) is not None:
            return [self._unknown(f"pods/{self.namespace}", credential, old, why, now)]
        out: list[NodeReport] = []
        for name, pod in sorted(self.pods.objects.items()):
            node = f"pod/{name}"
            try:
                if _obj(pod.get("status")).get("phase") in _FINISHED:
                    continue  # will never run again: holds nothing
                found = uses(pod, key)
                who = owner(pod)
            except Unreadable as e:
                uid = str(_obj(pod.get("metadata")).get("uid"))
                if self._once("unreadable", uid):
                    event(log, "pod_spec_unreadable", logging.WARNING, pod=name, credential=credential, error=str(e))
                out.append(self._unknown(node, credential, old, "pod spec unreadable: unknown, so in use", now))
                continue
            if not found:
                continue
            stale = [u for u in found if self._holds_old(u, since, now)]
            holders = tuple(
                Holder(pid=0, exe=f"({who}) {u.how} {u.what}", consumer=u.container, how=u.how, version=v)
                for u in stale
                for v in old
            )
            out.append(
                NodeReport(
                    node=NodeId(node),
                    credential=credential,
                    current=old[-1] if stale else new,
                    in_use={v: len(stale) for v in old} if stale else {new: len(found)},
                    holders=holders,
                    heartbeat=now,
                )
            )
        return out

    def _holds_old(self, use: Use, since: float, now: float) -> bool:
        fresh = use.set_up >= since + self.start_margin
        if use.how in READ_ONCE:
            return not fresh
        return not fresh and now < since + self.volume_sync_delay

    # ------------------------------------------------------------ workloads

    async def _workload_reports(
        self, credential: CredentialName, *, old: Sequence[VersionId], new: VersionId, since: float, now: float
    ) -> list[NodeReport]:
        out: list[NodeReport] = []
        for kind_name, inf in self.workloads.items():
            kind = KINDS[kind_name]
            if (why := await self._synced(inf)) is not None:
                out.append(self._unknown(f"{kind.plural}/{self.namespace}", credential, old, why, now))
                continue
            for name, obj in sorted(inf.objects.items()):
                names = reload_names(obj)
                for unknown in sorted(set(names) - self.credentials):
                    if self._once("unknown-credential", kind.name, name, unknown):
                        event(
                            log,
                            "reload_annotation_unknown_credential",
                            logging.WARNING,
                            workload=f"{kind.name}/{name}",
                            named=unknown,
                            action="no credential of this config has that name: nothing rolls it for that name",
                        )
                if credential in names:
                    out.append(
                        await self._workload(kind, name, obj, credential, old=old, new=new, since=since, now=now)
                    )
        return out

    async def _workload(
        self,
        kind: Kind,
        name: str,
        obj: Obj,
        credential: CredentialName,
        *,
        old: Sequence[VersionId],
        new: VersionId,
        since: float,
        now: float,
    ) -> NodeReport:
        workload = f"{kind.name}/{name}"
        wanted = {str(credential): str(new)}
        state = "not asked yet"
        if missing(obj, kind, wanted) and self.act:
            # Pods it starts must read the new version: not before the Secret has settled
            # (start_margin, plus the second that creation times are rounded to).
            if now < since + self.start_margin + 1:
                state = "waits for the Secret to settle"
            else:
                obj = await self._restart(kind, name, obj, credential, wanted, now)
        asked = not missing(obj, kind, wanted)
        done = asked and rollout_done(obj, kind=kind.name)
        stuck = metrics.rollout_stuck.labels(credential, workload)
        if done:
            stuck.set(0)
            if self._asked.pop((credential, workload, new), None) is not None:
                event(log, "rollout_available", credential=credential, workload=workload, version=new)
            return NodeReport(node=NodeId(workload), credential=credential, current=new, heartbeat=now)
        if asked:
            state = "rollout not available yet"
            began = self._asked.setdefault((credential, workload, new), now)
            if now - began > self.rollout_timeout:
                stuck.set(1)
                if self._once("stuck", credential, workload, new):
                    event(
                        log,
                        "rollout_not_available",
                        logging.ERROR,
                        credential=credential,
                        workload=workload,
                        version=new,
                        waited=round(now - began),
                        action="retirement of the old version waits for it; see kubectl rollout status",
                    )
        holders = tuple(
            Holder(pid=0, exe=f"(rollout for {credential}@{new} {state})", consumer=None, how="rollout", version=v)
            for v in old
        )
        return NodeReport(
            node=NodeId(workload),
            credential=credential,
            current=old[-1],
            in_use={v: 1 for v in old},
            holders=holders,
            heartbeat=now,
        )

    async def _restart(
        self, kind: Kind, name: str, obj: Obj, credential: CredentialName, wanted: dict[str, str], now: float
    ) -> Obj:
        workload = f"{kind.name}/{name}"
        try:
            obj, patched = await restart_once(
                self._kube, kind, self.namespace, name, wanted, request_timeout=self.request_timeout
            )
        except StoreNotFound:
            return obj  # deleted since it was listed: the watch removes it
        except StoreError as e:
            metrics.rollouts_total.labels(credential, kind.name, "failed").inc()
            if self._once("restart-failed", credential, workload, str(e)):
                event(
                    log,
                    "rollout_failed",
                    logging.ERROR,
                    credential=credential,
                    workload=workload,
                    error=str(e),
                    action="retirement waits; grant patch on it (manifests/rotator-rbac.yaml) or remove "
                    "its baton.io/reload annotation",
                )
            return obj
        if patched:
            metrics.rollouts_total.labels(credential, kind.name, "requested").inc()
            self._asked[(credential, workload, wanted[str(credential)])] = now
            event(log, "rollout_requested", credential=credential, workload=workload, version=wanted[str(credential)])
        return obj


def open_pod_holders(config: Config, *, act: bool) -> PodHolders | None:
    """For ``daemon.report.holders.open_holders`` (``plugins.HOLDERS["kubernetes"]``)."""
    # Its watches start on first use, inside the running loop.
    return PodHolders.from_config(config, act=act)
