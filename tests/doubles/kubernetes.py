"""An in-repo double of the kube-apiserver: exactly the endpoints Baton uses.

No kube-apiserver can be installed on the test machine, so this aiohttp app
implements the documented semantics of the calls that ``daemon.stores.kubernetes``
and ``sidecar/`` make, and nothing else:

- core/v1 Secrets: get, list, create, replace (PUT), patch, delete, watch.
- core/v1 Pods: get, list (labelSelector), watch, create (seeding), patch, delete.
- apps/v1 Deployments, StatefulSets, DaemonSets and argoproj.io/v1alpha1 Rollouts:
  get, list, watch, create (seeding), patch (a Rollout, a custom resource: merge
  patch only, 415 for a strategic one); a cluster without Argo is ``served=...``.
- coordination.k8s.io/v1 Leases: get, create, replace.

Semantics kept (from the API conventions document):

- One cluster-wide, monotonically increasing ``resourceVersion`` (a decimal
  string, opaque to clients). Every write that changes an object bumps it; a
  no-op write does not (and emits no watch event).
- PUT and PATCH carrying ``metadata.resourceVersion`` that is not the stored one
  answer ``409 Conflict``; without it they are unconditional. POST of an
  existing name answers ``409 AlreadyExists``.
- PATCH content types: ``application/merge-patch+json`` (RFC 7386: maps merge
  recursively, ``null`` deletes a key, lists are replaced) and
  ``application/strategic-merge-patch+json`` (maps as above; the lists of named
  items ``containers``, ``initContainers``, ``volumes``, ``env`` merge by
  ``name``; every other list is replaced; ``$patch`` directives are not
  supported). JSON patch and apply patch answer ``415``.
- Secrets: ``stringData`` is folded into base64 ``data`` on write, ``type``
  defaults to ``Opaque`` and is immutable (an update changing it: ``422``); a
  ``kubernetes.io/tls`` Secret must have the ``tls.crt`` and ``tls.key`` data
  keys (empty values pass, as in ValidateSecret). Annotation names are checked
  (name part at most 63).
- Watch (``?watch=true``): a stream of JSON lines ``{"type", "object"}``.
  Without ``resourceVersion`` (or ``"0"``) it starts with synthetic ``ADDED``
  events of the current objects; with one it replays every change after it. A
  ``resourceVersion`` older than the compaction point gets ``200`` with one
  ``ERROR`` event carrying a ``Status`` with ``code: 410`` (``Expired``), or an
  HTTP ``410 Gone`` when ``watch_410_as_http`` is set (some apiservers do).
  ``timeoutSeconds`` ends the stream; ``fieldSelector=metadata.name=X`` and
  ``labelSelector`` filter it; ``allowWatchBookmarks`` enables ``BOOKMARK``
  events sent by the ``bookmark()`` hook.
- A list with a ``resourceVersion`` older than the compaction point answers 410.
- Workloads: a change of ``spec`` bumps ``metadata.generation``; a change of
  the pod template sets the updated count to 0. The status fields only
  move when a test calls ``set_status``/``advance_rollout``/``roll_pods`` (there
  is no controller), so a test decides when a rollout "becomes available".
  ``run_pod`` seeds a pod as a kubelet runs it; a pod created through the API
  starts ``Pending``. tests/integration/test_kube_double.py checks responses
  against the Kubernetes OpenAPI schemas (kubernetes-validate).
- Bearer token auth on every request: ``401`` without the right token.

Test hooks (on ``KubeDouble``): ``fail(...)`` injects HTTP errors, ``delay``
slows every request, ``compact()`` forgets history, ``expire_watches()`` sends a
410 ERROR to every open watch, ``end_watches()`` closes every open stream,
``put()``/``get()`` seed and inspect objects directly, ``requests`` records
(method, path, query, content type) of every request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

# plural -> (apiVersion, kind, list kind)
RESOURCES: dict[str, tuple[str, str]] = {
    "secrets": ("v1", "Secret"),
    "pods": ("v1", "Pod"),
    "events": ("v1", "Event"),  # created by the kubernetes-events notification sink (sidecar/events.py)
    "deployments": ("apps/v1", "Deployment"),
    "statefulsets": ("apps/v1", "StatefulSet"),
    "daemonsets": ("apps/v1", "DaemonSet"),
    "leases": ("coordination.k8s.io/v1", "Lease"),
    "rollouts": ("argoproj.io/v1alpha1", "Rollout"),
}
# The workloads, and the status fields their controllers keep: (desired, updated, available, ready).
WORKLOADS: dict[str, tuple[str, str, str, str]] = {
    "deployments": ("replicas", "updatedReplicas", "availableReplicas", "readyReplicas"),
    "statefulsets": ("replicas", "updatedReplicas", "availableReplicas", "readyReplicas"),
    "daemonsets": ("desiredNumberScheduled", "updatedNumberScheduled", "numberAvailable", "numberReady"),
    "rollouts": ("replicas", "updatedReplicas", "availableReplicas", "readyReplicas"),
}


def _daemonset_required(n: int) -> dict[str, int]:
    """The fields DaemonSetStatus requires besides the counts above."""
    return {"currentNumberScheduled": n, "numberMisscheduled": 0, "desiredNumberScheduled": n, "numberReady": n}


# Custom resources take no strategic merge patch (the apiserver answers 415).
_CUSTOM = {"rollouts"}

_ANNOTATION_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
TLS_SECRET = "kubernetes.io/tls"
_MERGE_BY_NAME = {"containers", "initContainers", "volumes", "env"}


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status(code, reason, message), status=code)


def _bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, as the apiserver parses query flags."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge_patch(target: Any, patch: Any, *, key: str = "") -> Any:
    """Strategic merge patch, restricted to what the double documents."""
    if isinstance(patch, list) and key in _MERGE_BY_NAME and isinstance(target, list):
        out = [copy.deepcopy(t) for t in target]
        for item in patch:
            name = item.get("name") if isinstance(item, dict) else None
            for i, existing in enumerate(out):
                if name is not None and isinstance(existing, dict) and existing.get("name") == name:
                    out[i] = strategic_merge_patch(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = strategic_merge_patch(out.get(k), v, key=k)
    return out


def parse_label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """Equality and existence selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for raw in filter(None, (p.strip() for p in selector.split(","))):
        if "!=" in raw:
            k, v = (s.strip() for s in raw.split("!=", 1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "=" in raw:
            k, v = (s.strip() for s in raw.replace("==", "=").split("=", 1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif raw.startswith("!"):
            name = raw[1:].strip()
            tests.append(lambda labels, k=name: k not in labels)
        else:
            tests.append(lambda labels, k=raw: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def workload_pod(workload: Obj, name: str, template: Obj) -> Obj:
    """A pod as the workload's controller makes it from ``template``: owned by it (through a
    ReplicaSet <workload>-<hash> for a Deployment or a Rollout, as theirs are)."""
    kind, wname = workload["kind"], workload["metadata"]["name"]
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    owner_kind, owner_name, owner_api = kind, wname, workload["apiVersion"]
    if kind in ("Deployment", "Rollout"):
        h = uuid.uuid4().hex[:10]
        labels["rollouts-pod-template-hash" if kind == "Rollout" else "pod-template-hash"] = h
        owner_kind, owner_name, owner_api = "ReplicaSet", f"{wname}-{h}", "apps/v1"
    return {
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": owner_api,
                    "kind": owner_kind,
                    "name": owner_name,
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": copy.deepcopy(template.get("spec") or {}),
    }


@dataclass
class Fault:
    status: int
    remaining: int
    method: str | None = None
    path_contains: str | None = None

    def matches(self, request: web.Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        return self.path_contains is None or self.path_contains in request.path


@dataclass(eq=False)  # identity: a watcher is kept in a set
class _Watcher:
    plural: str
    namespace: str
    name: str | None
    labels: Callable[[dict[str, str]], bool]
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)

    def wants(self, plural: str, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return (
            plural == self.plural
            and meta.get("namespace") == self.namespace
            and (self.name is None or meta.get("name") == self.name)
            and self.labels(meta.get("labels") or {})
        )


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str


class KubeDouble:
    """The apiserver state, its HTTP app, and the test hooks."""

    def __init__(self, *, token: str | None = None, served: set[str] | None = None) -> None:
        self.token = token or uuid.uuid4().hex
        # The resources this apiserver serves (a cluster without Argo Rollouts: leave "rollouts" out, 404).
        self.served = set(RESOURCES) if served is None else served
        self.rv = 1
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[tuple[int, str, str, Obj]] = []  # (rv, plural, event type, object)
        self.compacted = 0
        self.watchers: set[_Watcher] = set()
        self.faults: list[Fault] = []
        self.delay = 0.0
        self.watch_410_as_http = False
        self.requests: list[Request] = []
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._controllers: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._rolled: dict[tuple[str, str, str], tuple[Any, ...]] = {}  # workload -> (generation, restartAt) rolled

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        for prefix, plurals in (
            ("/api/v1", ("secrets", "pods", "events")),
            ("/apis/apps/v1", ("deployments", "statefulsets", "daemonsets")),
            ("/apis/coordination.k8s.io/v1", ("leases",)),
            ("/apis/argoproj.io/v1alpha1", ("rollouts",)),
        ):
            for plural in plurals:
                if plural in self.served:
                    self._routes(app, prefix, plural)
        return app

    def _routes(self, app: web.Application, prefix: str, plural: str) -> None:
        coll = f"{prefix}/namespaces/{{ns}}/{plural}"
        item = coll + "/{name}"

        def bind(fn: Callable[[web.Request, str], Awaitable[web.StreamResponse]]) -> Any:
            async def handler(request: web.Request) -> web.StreamResponse:
                return await fn(request, plural)

            return handler

        app.router.add_get(coll, bind(self._list))
        app.router.add_post(coll, bind(self._create))
        app.router.add_get(item, bind(self._get))
        app.router.add_put(item, bind(self._replace))
        app.router.add_patch(item, bind(self._patch))
        app.router.add_delete(item, bind(self._delete))

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        if self._controllers is not None:
            self._controllers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controllers
            self._controllers = None
        self.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def kubeconfig(self, *, namespace: str = "default") -> str:
        """A kubeconfig (JSON is valid YAML) pointing at this double."""
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "double", "cluster": {"server": self.url}}],
                "users": [{"name": "baton", "user": {"token": self.token}}],
                "contexts": [
                    {"name": "double", "context": {"cluster": "double", "user": "baton", "namespace": namespace}}
                ],
                "current-context": "double",
            }
        )

    # ------------------------------------------------------------ hooks

    def fail(self, status: int = 503, *, times: int = 1, method: str | None = None, path: str | None = None) -> None:
        """Answer the next ``times`` matching requests with ``status``."""
        self.faults.append(Fault(status, times, method, path))

    def compact(self) -> None:
        """Forget history: a watch or list from an older resourceVersion gets 410."""
        self.rv += 1  # as if some other object changed: every client's rv is now too old
        self.compacted = self.rv
        self.history.clear()

    def expire_watches(self) -> None:
        """Compact and send an ERROR 410 to every open watch (then end it)."""
        self.compact()
        error = {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
        for w in list(self.watchers):
            w.queue.put_nowait(error)
            w.queue.put_nowait(None)

    def end_watches(self) -> None:
        """Close every open watch stream, as an apiserver restart or LB timeout does."""
        for w in list(self.watchers):
            w.queue.put_nowait(None)

    def bookmark(self) -> None:
        for w in list(self.watchers):
            w.queue.put_nowait({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(self.rv)}}})

    def put(self, plural: str, obj: Obj) -> Obj:
        """Create or overwrite an object directly (seeding); emits a watch event."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (plural, meta["namespace"], meta["name"])
        old = self.objects.get(key)
        return self._store(plural, key, self._normalize(plural, obj, old), "MODIFIED" if old else "ADDED")

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def set_status(self, namespace: str, name: str, *, plural: str = "deployments", **status: Any) -> None:
        obj = self.get(plural, namespace, name)
        assert obj is not None, f"no {plural} {namespace}/{name}"
        obj["status"] = {**obj.get("status", {}), **status}
        self._store(plural, (plural, namespace, name), obj, "MODIFIED")

    def advance_rollout(self, namespace: str, name: str, *, plural: str = "deployments") -> None:
        """Finish the rollout: observed the latest generation, every replica updated and available
        (an Argo Rollout's restart done: ``status.restartedAt`` = ``spec.restartAt``)."""
        obj = self.get(plural, namespace, name)
        assert obj is not None
        desired, updated, available, ready = WORKLOADS[plural]
        replicas = obj.get("spec", {}).get("replicas", 1) if desired == "replicas" else obj["status"].get(desired, 1)
        status: dict[str, Any] = {
            "observedGeneration": obj["metadata"]["generation"],
            desired: replicas,
            updated: replicas,
            available: replicas,
            ready: replicas,
        }
        if plural == "daemonsets":
            status.update(_daemonset_required(replicas))
        if plural == "rollouts":
            status["observedGeneration"] = str(obj["metadata"]["generation"])  # Argo keeps it as a string
            if obj["spec"].get("restartAt"):
                status["restartedAt"] = obj["spec"]["restartAt"]
        self.set_status(namespace, name, plural=plural, **status)

    def run_pod(self, pod: Obj, *, namespace: str = "default") -> Obj:
        """Create a pod as the kubelet would have it running: Running, every container started now."""
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        spec = pod.get("spec", {})

        def statuses(group: str) -> list[Obj]:
            return [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": group == "containers",
                    "restartCount": 0,
                    "started": group == "containers",
                    "state": {"running": {"startedAt": now}}
                    if group == "containers"
                    else {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}},
                }
                for c in spec.get(group) or []
            ]

        pod["status"] = {
            "phase": "Running",
            "startTime": now,
            "containerStatuses": statuses("containers"),
            **({"initContainerStatuses": statuses("initContainers")} if spec.get("initContainers") else {}),
        }
        return self.put("pods", pod)

    def roll_pods(self, plural: str, namespace: str, name: str, *, replicas: int | None = None) -> list[str]:
        """Play the workload's controller for its current template: delete the pods it owns, run
        ``replicas`` (default spec.replicas) new ones from the template, and finish the rollout.
        Its pods are named ``<workload>-g<generation>-...``: those are the ones it owns."""
        obj = self.get(plural, namespace, name)
        assert obj is not None, f"no {plural} {namespace}/{name}"
        for key in [k for k in self.objects if k[0] == "pods" and k[1] == namespace and k[2].startswith(name + "-g")]:
            self.delete_object(*key)
        template = obj["spec"].get("template") or {}
        n = replicas if replicas is not None else obj["spec"].get("replicas", 1)
        made = []
        generation = obj["metadata"]["generation"]
        for i in range(n):
            pod_name = f"{name}-g{generation}-{uuid.uuid4().hex[:5]}-{i}"
            self.run_pod(workload_pod(obj, pod_name, template), namespace=namespace)
            made.append(pod_name)
        self.advance_rollout(namespace, name, plural=plural)
        return made

    def start_controllers(self) -> None:
        """Play the kubelet and the workload controllers from now on, as a real cluster does: a pod
        created through the API starts running; a workload whose template changed (or is new, or
        an Argo Rollout asked to restart) gets its pods replaced and its rollout finished. For tests
        written the way they run against a real cluster (tests/integration/kube_cluster.py)."""
        if self._controllers is None:
            self._controllers = asyncio.create_task(self._control(), name="kube-double-controllers")

    async def _control(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            self._reconcile()

    def _reconcile(self) -> None:
        for (plural, ns, name), obj in list(self.objects.items()):
            if plural == "pods":
                if (obj.get("status") or {}).get("phase") == "Pending":
                    self.run_pod(obj, namespace=ns)
                continue
            if plural not in WORKLOADS:
                continue
            want = (obj["metadata"].get("generation"), obj.get("spec", {}).get("restartAt"))
            if self._rolled.get((plural, ns, name)) != want:
                self._rolled[(plural, ns, name)] = want
                self.roll_pods(plural, ns, name)
        # Garbage collection: the pods of a workload that is gone go with it.
        gone = {(ns, name) for (p, ns, name) in self._rolled if (p, ns, name) not in self.objects}
        for key in [k for k in self.objects if k[0] == "pods"]:
            if any(key[1] == ns and key[2].startswith(name + "-g") for ns, name in gone):
                self.delete_object(*key)

    def delete_object(self, plural: str, namespace: str, name: str) -> None:
        """Delete directly, with the watch event (a controller or a kubectl delete)."""
        old = self.objects.pop((plural, namespace, name))
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(plural, "DELETED", gone)

    async def until(self, predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
        """Poll ``predicate`` until true (a deadline, not a sleep standing in for a sync point)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not reached in the Kubernetes double")
            await asyncio.sleep(0.01)

    def watch_requests(self) -> list[Request]:
        return [r for r in self.requests if _bool(r.query.get("watch"))]

    def count(self, method: str, path_suffix: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.endswith(path_suffix))

    # ------------------------------------------------------------ core

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append(
            Request(request.method, request.path, dict(request.query), request.headers.get("Content-Type", ""))
        )
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "Unauthorized", "Unauthorized")
        if self.delay:
            await asyncio.sleep(self.delay)
        for fault in self.faults:
            if fault.remaining > 0 and fault.matches(request):
                fault.remaining -= 1
                return _error(fault.status, "InternalError", "injected fault")
        return await handler(request)

    def _normalize(self, plural: str, obj: Obj, old: Obj | None) -> Obj:
        api_version, kind = RESOURCES[plural]
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj.setdefault("metadata", {})
        for k in ("resourceVersion", "creationTimestamp", "uid", "generation"):
            meta.pop(k, None)
        if old is not None:
            for k in ("uid", "creationTimestamp", "generation"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if plural == "secrets":
            data = dict(obj.get("data") or {})
            for k, v in (obj.pop("stringData", None) or {}).items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data
            obj.setdefault("type", "Opaque")
        if plural in WORKLOADS:
            desired, updated, available, ready = WORKLOADS[plural]
            spec = obj.setdefault("spec", {})
            if plural != "daemonsets":
                spec.setdefault("replicas", 1)
            if old is None:
                meta["generation"] = 1
                n = spec.get("replicas", 1)
                obj["status"] = {
                    "observedGeneration": "1" if plural == "rollouts" else 1,
                    desired: n,
                    updated: n,
                    available: n,
                    ready: n,
                    **(_daemonset_required(n) if plural == "daemonsets" else {}),
                    **obj.get("status", {}),
                }
            else:
                # The status subresource: a write of the object never changes it.
                obj["status"] = copy.deepcopy(old.get("status", {}))
                if spec != old.get("spec"):
                    meta["generation"] = old["metadata"].get("generation", 1) + 1
                if spec.get("template") != old.get("spec", {}).get("template"):
                    obj["status"][updated] = 0
        if plural == "pods" and old is None:
            obj.setdefault("status", {"phase": "Pending", "qosClass": "BestEffort"})
        return obj

    def _invalid(self, obj: Obj) -> str | None:
        for name in obj.get("metadata", {}).get("annotations") or {}:
            part = name.rsplit("/", 1)[-1]
            if not _ANNOTATION_NAME.match(part):
                return f"metadata.annotations: Invalid value: {name!r}: name part must be at most 63 characters"
        for k, v in (obj.get("data") or {}).items() if obj.get("kind") == "Secret" else ():
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", k):
                return f"data[{k!r}]: Invalid value: a valid config key must consist of alphanumerics, '-', '_' or '.'"
            try:
                base64.b64decode(v, validate=True)
            except ValueError:
                return f"data[{k!r}]: Invalid value: not base64"
        if obj.get("kind") == "Secret" and obj.get("type") == TLS_SECRET:
            # ValidateSecret: the keys must exist; their values may be empty (no PEM check).
            for k in ("tls.crt", "tls.key"):
                if k not in (obj.get("data") or {}):
                    return f"data[{k}]: Required value"
        return None

    def _store(self, plural: str, key: tuple[str, str, str], obj: Obj, kind: str) -> Obj:
        old = self.objects.get(key)
        if old is not None:
            same = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}
            was = {**old, "metadata": {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}}
            if same == was:
                return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = obj
        self._emit(plural, kind, obj)
        return copy.deepcopy(obj)

    def _emit(self, plural: str, kind: str, obj: Obj) -> None:
        self._changed.set()
        rv = int(obj["metadata"]["resourceVersion"])
        self.history.append((rv, plural, kind, copy.deepcopy(obj)))
        for w in list(self.watchers):
            if w.wants(plural, obj):
                w.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    @staticmethod
    async def _body(request: web.Request) -> Obj | None:
        try:
            body = await request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    # ------------------------------------------------------------ handlers

    async def _get(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self.get(plural, ns, name)
        if obj is None:
            return _error(404, "NotFound", f'{plural} "{name}" not found')
        return web.json_response(obj)

    def _selector(self, request: web.Request) -> tuple[str | None, Callable[[dict[str, str]], bool]]:
        name = None
        for part in filter(None, request.query.get("fieldSelector", "").split(",")):
            k, _, v = part.partition("=")
            if k == "metadata.name":
                name = v
        return name, parse_label_selector(request.query.get("labelSelector", ""))

    async def _list(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns = request.match_info["ns"]
        name, labels = self._selector(request)
        rv = request.query.get("resourceVersion", "")
        too_old = rv not in ("", "0") and int(rv) < self.compacted
        if _bool(request.query.get("watch")):
            return await self._watch(request, plural, ns, name, labels, rv, too_old)
        if too_old:
            return _error(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
        api_version, kind = RESOURCES[plural]
        items = [
            copy.deepcopy(o)
            for (p, o_ns, o_name), o in sorted(self.objects.items())
            if p == plural
            and o_ns == ns
            and (name is None or o_name == name)
            and labels(o["metadata"].get("labels") or {})
        ]
        return web.json_response(
            {
                "kind": kind + "List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    async def _watch(
        self,
        request: web.Request,
        plural: str,
        ns: str,
        name: str | None,
        labels: Callable[[dict[str, str]], bool],
        rv: str,
        too_old: bool,
    ) -> web.StreamResponse:
        if too_old and self.watch_410_as_http:
            return _error(410, "Expired", f"too old resource version: {rv} ({self.compacted})")
        watcher = _Watcher(plural, ns, name, labels)
        # Fill the backlog and register in one synchronous step: no event can fall in between.
        if too_old:
            watcher.queue.put_nowait(
                {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {rv}")}
            )
            watcher.queue.put_nowait(None)
        elif rv in ("", "0"):
            for (p, _, _), obj in sorted(self.objects.items()):
                if watcher.wants(p, obj):
                    watcher.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        else:
            for ev_rv, p, kind, obj in self.history:
                if ev_rv > int(rv) and watcher.wants(p, obj):
                    watcher.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
        bookmarks = _bool(request.query.get("allowWatchBookmarks"))
        self.watchers.add(watcher)
        response = web.StreamResponse()
        response.content_type = "application/json"
        try:
            await response.prepare(request)
            timeout = float(request.query.get("timeoutSeconds", "1800"))
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), left)
                except TimeoutError:
                    break
                if event is None:
                    break
                if event["type"] == "BOOKMARK" and not bookmarks:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _create(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns = request.match_info["ns"]
        body = await self._body(request)
        if body is None or not body.get("metadata", {}).get("name"):
            return _error(422, "Invalid", "metadata.name: Required value")
        name = body["metadata"]["name"]
        if (plural, ns, name) in self.objects:
            return _error(409, "AlreadyExists", f'{plural} "{name}" already exists')
        body["metadata"]["namespace"] = ns
        obj = self._normalize(plural, body, None)
        if (problem := self._invalid(obj)) is not None:
            return _error(422, "Invalid", problem)
        return web.json_response(self._store(plural, (plural, ns, name), obj, "ADDED"), status=201)

    async def _replace(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        body = await self._body(request)
        old = self.objects.get((plural, ns, name))
        if body is None:
            return _error(400, "BadRequest", "body is not a JSON object")
        if old is None:
            return _error(404, "NotFound", f'{plural} "{name}" not found')
        return self._write(plural, ns, name, old, body)

    def _write(self, plural: str, ns: str, name: str, old: Obj, new: Obj) -> web.Response:
        want = (new.get("metadata") or {}).get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            return _error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        new.setdefault("metadata", {})
        new["metadata"]["name"], new["metadata"]["namespace"] = name, ns
        obj = self._normalize(plural, new, old)
        if plural == "secrets" and obj.get("type") != old.get("type"):
            # ValidateSecretUpdate: type is immutable (a PUT without it defaults to Opaque first).
            return _error(422, "Invalid", f"type: Invalid value: {obj.get('type')!r}: field is immutable")
        if (problem := self._invalid(obj)) is not None:
            return _error(422, "Invalid", problem)
        return web.json_response(self._store(plural, (plural, ns, name), obj, "MODIFIED"))

    async def _patch(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return _error(415, "UnsupportedMediaType", f"the double does not support {ctype!r}")
        body = await self._body(request)
        if body is None:
            return _error(400, "BadRequest", "patch is not a JSON object")
        old = self.objects.get((plural, ns, name))
        if old is None:
            return _error(404, "NotFound", f'{plural} "{name}" not found')
        if plural in _CUSTOM and ctype == "application/strategic-merge-patch+json":
            return _error(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources")
        merge = merge_patch if ctype == "application/merge-patch+json" else strategic_merge_patch
        new = merge(copy.deepcopy(old), body)
        # The precondition is what the patch says, not what the merge left.
        new.setdefault("metadata", {})["resourceVersion"] = (body.get("metadata") or {}).get("resourceVersion")
        if plural == "secrets" and "stringData" in body:
            new["stringData"] = body["stringData"]
        return self._write(plural, ns, name, old, new)

    async def _delete(self, request: web.Request, plural: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        key = (plural, ns, name)
        old = self.objects.get(key)
        if old is None:
            return _error(404, "NotFound", f'{plural} "{name}" not found')
        body = await self._body(request) if request.can_read_body else None
        want = ((body or {}).get("preconditions") or {}).get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            return _error(409, "Conflict", f'Precondition failed for {plural} "{name}"')
        del self.objects[key]
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(plural, "DELETED", gone)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}})
