"""The apiserver double cannot drift from the real API: its answers checked against the Kubernetes OpenAPI schemas.

kubernetes-validate ships the JSON schemas of each Kubernetes release (offline,
in the package); every object the double hands out to Baton's calls (get,
list, create, patch, replace, watch events) must validate strictly (no field
the real type does not have) against 1.37's. An Argo Rollout is a custom
resource with no schema there: its fields Baton reads are checked by hand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kubernetes_validate
import pytest

from tests.doubles.kubernetes import KubeDouble, workload_pod

pytestmark = pytest.mark.integration

K8S = "1.37.0"
NS = "default"


def valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.fixture
async def api() -> AsyncIterator[tuple[KubeDouble, aiohttp.ClientSession]]:
    double = KubeDouble()
    await double.start()
    headers = {"Authorization": f"Bearer {double.token}"}
    async with aiohttp.ClientSession(base_url=double.url, headers=headers) as session:
        yield double, session
    await double.close()


async def call(session: aiohttp.ClientSession, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    ctype = kw.pop("content_type", "application/json")
    data = json.dumps(body) if body is not None else None
    async with session.request(method, path, data=data, headers={"Content-Type": ctype}, params=kw) as resp:
        assert resp.status < 300, (method, path, resp.status, await resp.text())
        return await resp.json()


async def watch_events(session: aiohttp.ClientSession, path: str, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    params = {"watch": "true", "resourceVersion": "0", "timeoutSeconds": "5"}
    async with session.get(path, params=params) as resp:
        async for line in resp.content:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def template(app: str) -> dict[str, Any]:
    env = [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "value"}}}]
    return {
        "metadata": {"labels": {"app": app}},
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox", "envFrom": [{"secretRef": {"name": "db"}}]}],
            "containers": [
                {
                    "name": "app",
                    "image": "busybox",
                    "env": env,
                    "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "subPath": "value"}],
                }
            ],
            "volumes": [
                {"name": "creds", "secret": {"secretName": "db"}},
                {"name": "all", "projected": {"sources": [{"secret": {"name": "db"}}]}},
            ],
        },
    }


WORKLOADS = {
    "deployments": ("Deployment", {"replicas": 2}),
    "statefulsets": ("StatefulSet", {"replicas": 2, "serviceName": "db"}),
    "daemonsets": ("DaemonSet", {}),
}


async def test_secrets_pods_and_leases_the_double_answers_validate_against_the_real_schemas(
    api: tuple[KubeDouble, aiohttp.ClientSession],
) -> None:
    double, s = api
    base = f"/api/v1/namespaces/{NS}"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"value": "pw"}}
    valid(await call(s, "POST", f"{base}/secrets", secret))
    patched = await call(
        s,
        "PATCH",
        f"{base}/secrets/db",
        {"metadata": {"annotations": {"baton.io/promoted": "v1 1.5"}}},
        content_type="application/merge-patch+json",
    )
    valid(patched)
    valid(await call(s, "GET", f"{base}/secrets/db"))
    valid(await call(s, "GET", f"{base}/secrets"))

    deployment = {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"name": "web", "namespace": NS}}
    pod = workload_pod(deployment, "web-1", template("web"))
    valid({"apiVersion": "v1", "kind": "Pod", **pod})  # what the test seeds is a pod, too
    double.run_pod(pod)
    created = await call(s, "POST", f"{base}/pods", {"metadata": {"name": "bare"}, "spec": template("x")["spec"]})
    valid(created)
    assert created["status"]["phase"] == "Pending"
    got = await call(s, "GET", f"{base}/pods/web-1")
    valid(got)
    assert got["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert {c["name"] for c in got["status"]["containerStatuses"]} == {"app"}
    assert got["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    listing = await call(s, "GET", f"{base}/pods")
    valid(listing)
    assert [p["metadata"]["name"] for p in listing["items"]] == ["bare", "web-1"]
    for ev in await watch_events(s, f"{base}/pods", 2):
        assert ev["type"] == "ADDED"
        valid(ev["object"])
    valid(
        await call(
            s,
            "PATCH",
            f"{base}/pods/web-1",
            {"metadata": {"annotations": {"baton.io/report.db": "{}"}}},
            content_type="application/merge-patch+json",
        )
    )

    leases = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "baton-rotator"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"},
    }
    made = await call(s, "POST", leases, lease)
    valid(made)
    made["spec"]["holderIdentity"] = "b"
    valid(await call(s, "PUT", f"{leases}/baton-rotator", made))


@pytest.mark.parametrize("plural", sorted(WORKLOADS))
async def test_workloads_through_a_restart_and_its_rollout_validate_against_the_real_schemas(
    api: tuple[KubeDouble, aiohttp.ClientSession], plural: str
) -> None:
    double, s = api
    kind, spec = WORKLOADS[plural]
    base = f"/apis/apps/v1/namespaces/{NS}/{plural}"
    body = {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": "web", "annotations": {"baton.io/reload": "db"}},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template("web"), **spec},
    }
    created = await call(s, "POST", base, body)
    valid(created)
    assert created["metadata"]["generation"] == 1
    restart = {
        "metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
        "spec": {"template": {"metadata": {"annotations": {"baton.io/rolled-for": "db@v2"}}}},
    }
    patched = await call(s, "PATCH", f"{base}/web", restart, content_type="application/strategic-merge-patch+json")
    valid(patched)
    assert patched["metadata"]["generation"] == 2
    assert patched["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"] == "DB_PASSWORD"  # merged, kept
    made = double.roll_pods(plural, NS, "web", replicas=1)
    done = await call(s, "GET", f"{base}/web")
    valid(done)
    assert done["status"]["observedGeneration"] == 2
    valid(await call(s, "GET", f"{base}"))
    pod = await call(s, "GET", f"/api/v1/namespaces/{NS}/pods/{made[0]}")
    valid(pod)
    assert pod["metadata"]["annotations"]["baton.io/rolled-for"] == "db@v2"
    events = await watch_events(s, base, 1)
    valid(events[0]["object"])


async def test_an_argo_rollout_has_the_fields_baton_reads_and_takes_merge_patches_only(
    api: tuple[KubeDouble, aiohttp.ClientSession],
) -> None:
    double, s = api
    base = f"/apis/argoproj.io/v1alpha1/namespaces/{NS}/rollouts"
    body = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "api"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}}, "template": template("api")},
    }
    created = await call(s, "POST", base, body)
    # The Rollout's pod template is a core/v1 PodTemplateSpec.
    valid(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": created["spec"]["template"]}
    )
    async with s.patch(
        f"{base}/api",
        data=json.dumps({"spec": {"restartAt": "2026-01-01T00:00:00Z"}}),
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    ) as resp:
        assert resp.status == 415  # as the apiserver answers for a custom resource
    patched = await call(
        s,
        "PATCH",
        f"{base}/api",
        {"spec": {"restartAt": "2026-01-01T00:00:00Z"}},
        content_type="application/merge-patch+json",
    )
    assert patched["metadata"]["generation"] == 2
    double.advance_rollout(NS, "api", plural="rollouts")
    done = await call(s, "GET", f"{base}/api")
    # Argo keeps observedGeneration as a string, and restartedAt once the restart is done.
    assert done["status"]["observedGeneration"] == "2"
    assert done["status"]["restartedAt"] == "2026-01-01T00:00:00Z"
    assert done["status"]["availableReplicas"] == 2


async def test_an_error_is_a_status_object_with_the_code_and_no_body_of_the_object(
    api: tuple[KubeDouble, aiohttp.ClientSession],
) -> None:
    _, s = api
    async with s.get(f"/api/v1/namespaces/{NS}/pods/nope") as resp:
        assert resp.status == 404
        status = await resp.json()
    # metav1.Status has no schema of its own in the release's definitions: its fields by hand.
    assert set(status) == {"kind", "apiVersion", "metadata", "status", "message", "reason", "code"}
    assert (status["kind"], status["status"], status["reason"], status["code"]) == (
        "Status",
        "Failure",
        "NotFound",
        404,
    )
    await asyncio.sleep(0)
