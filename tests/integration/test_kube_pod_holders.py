"""Pods that use a Secret natively as holders, and Reloader-style rollouts once per change (issue 17).

Written as they run against a real cluster (``KUBECONFIG`` set): objects made
through the API (``tests/integration/kube_cluster.py``), the test waiting for
what the controllers and kubelets do; against the apiserver double, its
controllers play those parts. The bad-input tests need the double's faults
(a refused patch or list, a pod spec no apiserver would accept) and are skipped
against a real cluster. The rotator's side is the real one: the Kubernetes
store, ``CredentialRotator`` with ``PodHolders`` (its watches), the gate,
``baton status --pending``. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.clients.kube import PROMOTED, RELOAD, ROLLED_FOR
from daemon.config import Config, parse_config
from daemon.errors import ReloadError
from daemon.model import CredentialName, VersionId
from daemon.providers import open_provider
from daemon.reload.actions import roll_versions
from daemon.report.metadata import MetadataReporter
from daemon.rotation import status
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.kubernetes import KubernetesStore
from sidecar.podholders import PodHolders
from sidecar.rollout import RolloutRestart
from tests.doubles.kubernetes import KubeDouble
from tests.fixtures.kube import KubeApi
from tests.helpers import everything_logged
from tests.integration.kube_cluster import BUSYBOX, PAUSE, Cluster

pytestmark = pytest.mark.integration

NS = "shop"  # the double-only tests' namespace
CANARY = "pod-holders-canary-8c2f"  # a literal env value in a pod spec: must never reach a log line
DB = CredentialName("db")
V1, V2 = VersionId("v1"), VersionId("v2")


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def cluster(kube_api: KubeApi) -> AsyncIterator[Cluster]:
    c = Cluster(kube_api)
    yield c
    await c.aclose()


def config(kube_api: KubeApi, tmp_path: Path, *, key: str = "db", namespace: str = NS, **pods: Any) -> Config:
    return parse_config(
        {
            "node_id": "rotator-1",
            "store": {
                "kind": "kubernetes",
                "namespace": namespace,
                "kubeconfig": str(kube_api.kubeconfig),
                "pods": pods,
            },
            "report": {"heartbeat": 1.0},
            "credentials": [
                {
                    "name": "db",
                    "key": key,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": "1h", "max_draining": 1},
                }
            ],
        }
    )


def holders(kube_api: KubeApi, namespace: str = NS, *, act: bool = True, **kw: Any) -> PodHolders:
    params: dict[str, Any] = {"start_margin": 0.01, "volume_sync_delay": 60.0, "sync_timeout": 5.0} | kw
    return PodHolders(namespace=namespace, credentials=["db"], kubeconfig=kube_api.kubeconfig, act=act, **params)


def container(name: str = "app", **kw: Any) -> dict[str, Any]:
    return {"name": name, "image": PAUSE, **kw}


def env_from(key: str) -> dict[str, Any]:
    return {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": key, "key": "value"}}}


ENV_DB = env_from("db")
LITERAL = {"name": "GREETING", "value": CANARY}


def workload(
    kind: str, name: str, spec: dict[str, Any], *, reload: str | None = "db", plural_api: str = "apps/v1"
) -> dict[str, Any]:
    annotations = {RELOAD: reload} if reload is not None else {}
    body: dict[str, Any] = {
        "apiVersion": plural_api,
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }
    if kind != "DaemonSet":
        body["spec"]["replicas"] = 2
    return body


def stamp(double: KubeDouble, version: str, at: float, *, value: str = "pw-1") -> None:
    """(The double-only tests' way of writing the Secret as the store leaves it.)"""
    double.put(
        "secrets",
        {
            "metadata": {"name": "db", "namespace": NS, "annotations": {PROMOTED: f"{version} {at!r}"}},
            "data": {"value": base64.b64encode(value.encode()).decode()},
        },
    )


def by_node(reports: list[Any]) -> dict[str, Any]:
    return {r.node: r for r in reports}


def template_of(obj: dict[str, Any] | None) -> dict[str, Any]:
    assert obj is not None
    return dict(obj["spec"]["template"]["metadata"].get("annotations") or {})


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@contextlib.asynccontextmanager
async def rotator_on(kube_api: KubeApi, cfg: Config, source: PodHolders) -> AsyncIterator[CredentialRotator]:
    store = KubernetesStore(namespace=cfg.store.namespace or NS, kubeconfig=kube_api.kubeconfig)  # type: ignore[union-attr]
    reporter = MetadataReporter.from_config(cfg, store)
    cred = cfg.credential("db")
    assert cred.rotation is not None
    rotator = CredentialRotator(
        config=cfg,
        credential=cred,
        store=store,
        reporter=reporter,
        provider=open_provider(cred.rotation),
        holders=source,
    )
    try:
        yield rotator
    finally:
        await source.aclose()
        await rotator.provider.aclose()
        await reporter.aclose()
        await store.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    """Call ``check`` until it says yes (the double-only tests: each call a real pass)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _after(step: Awaitable[Any], cond: Callable[[], Awaitable[bool]]) -> bool:
    await step
    return await cond()


# ---------------------------------------------------------------- 1. env holders and the rollout


async def test_a_pod_with_the_password_in_its_env_blocks_retirement_until_its_deployment_rolled_then_not(
    kube_api: KubeApi,
    cluster: Cluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    key, web, other = kube_api.name("db"), cluster.name("web"), cluster.name("other")
    cfg = config(kube_api, tmp_path, key=key, namespace=cluster.ns)
    async with rotator_on(kube_api, cfg, holders(kube_api, cluster.ns)) as rotator:
        assert (await rotator.rotate()).result == "rotated"  # v1: the first version
        spec = {"containers": [container(env=[env_from(key), LITERAL])]}
        await cluster.create("deployments", workload("Deployment", web, spec))
        # An unrelated workload: never rolled, its pods never holders.
        await cluster.create("deployments", workload("Deployment", other, {"containers": [container()]}, reload=None))

        async def two_running() -> bool:
            return len(await cluster.pods(web + "-")) == 2

        await cluster.until(two_running, what="web's two pods")
        old_pods = set(await cluster.pods(web + "-"))
        outcome = await rotator.rotate()
        assert outcome.result == "rotated"
        v2 = outcome.version
        secret = await cluster.get("secrets", key)
        assert secret is not None and secret["metadata"]["annotations"][PROMOTED].startswith(f"{v2} ")

        # The pods took v1 into their environment at start: they block, and so does the
        # Deployment until a rollout for db@v2 was asked and is available.
        assert await rotator.retire_ready() == []
        [blocked] = rotator.last_decisions
        assert set(blocked.holders) == {f"pod/{p}" for p in old_pods} | {f"Deployment/{web}"}
        held = blocked.holders[f"pod/{sorted(old_pods)[0]}"]
        assert [(h.exe, h.consumer, h.how) for h in held] == [(f"(Deployment/{web}) env DB_PASSWORD", "app", "env")]

        # baton status --pending says who, and how.
        assert await status.print_status(cfg, pending=True, as_json=False, url=None) == 0
        out = capsys.readouterr().out
        for p in old_pods:
            assert f"    pod/{p} (Deployment/{web}) env DB_PASSWORD" in out, out
        assert f"Deployment/{web} (rollout for db@" in out
        assert f"pod/{other}-" not in out

        # The leader's retirement pass asks for the rollout (after the Secret settled), once.
        async def rolled_for() -> bool:
            return template_of(await cluster.get("deployments", web)).get(ROLLED_FOR) == f"db@{v2}"

        await cluster.until(lambda: _after(rotator.retire_ready(), rolled_for), what="the rollout of web")

        # The controller replaces the pods: the new ones read v2 at start, and v1 retires.
        async def retired() -> bool:
            return bool(await rotator.retire_ready())

        await cluster.until(retired, what="v1 retired")
        assert set(await cluster.pods(web + "-")).isdisjoint(old_pods)
        dep, untouched = await cluster.get("deployments", web), await cluster.get("deployments", other)
        assert dep is not None and untouched is not None
        assert dep["metadata"]["generation"] == 2  # one template change: one rollout
        assert untouched["metadata"]["generation"] == 1 and ROLLED_FOR not in template_of(untouched)
        if cluster.double is not None:
            assert cluster.double.count("PATCH", f"/deployments/{web}") == 1
    logged = everything_logged(caplog)
    assert [e.workload for e in events(caplog, "rollout_requested")] == [f"Deployment/{web}"]  # type: ignore[attr-defined]
    assert CANARY not in logged and CANARY not in out


# ---------------------------------------------------------------- 2. once per change across replicas


async def test_five_sidecar_replicas_asking_for_the_same_rollout_produce_exactly_one(
    kube_api: KubeApi, cluster: Cluster
) -> None:
    web, key = cluster.name("web"), cluster.name("db")
    await cluster.create("deployments", workload("Deployment", web, {"containers": [container()]}, reload=None))
    replicas = [
        RolloutRestart(
            kind="Deployment",
            name=web,
            namespace=cluster.ns,
            timeout=cluster.timeout,
            kubeconfig=kube_api.kubeconfig,
            poll_interval=0.05,
        )
        for _ in range(5)
    ]

    async def ask(action: RolloutRestart, versions: dict[CredentialName, VersionId]) -> None:
        roll_versions.set(versions)  # what the Reloader sets around the call: this change
        await action.reload(0)

    async def generation() -> int:
        dep = await cluster.get("deployments", web)
        assert dep is not None
        return int(dep["metadata"]["generation"])

    try:
        await asyncio.wait_for(asyncio.gather(*(ask(a, {DB: V2}) for a in replicas)), cluster.timeout)
        # One template change: one rollout (a second patch would have bumped the generation again).
        assert await generation() == 2
        # (Against the double all five usually patch: one lands, four get 409, read again and stop.)
        assert template_of(await cluster.get("deployments", web))[ROLLED_FOR] == "db@v2"
        # A sidecar asking again, and a rotator judging the same change, change nothing.
        await ask(replicas[0], {DB: V2})
        await cluster.patch("deployments", web, {"metadata": {"annotations": {RELOAD: "db"}}})
        await cluster.stamp(key, "v2", time.time() - 30)
        source = holders(kube_api, cluster.ns)
        try:

            async def judged_rolled() -> bool:
                got = by_node(await source.reports(key, DB, old=[V1], new=V2, now=time.time()))
                return bool(got[f"Deployment/{web}"].current == "v2")

            await cluster.until(judged_rolled, what="the rotator to see the rollout done")
        finally:
            await source.aclose()
        assert await generation() == 2
        # The next change rolls again, keeping the first credential's entry.
        await asyncio.wait_for(ask(replicas[1], {CredentialName("api"): VersionId("k7")}), cluster.timeout)
        assert await generation() == 3
        assert template_of(await cluster.get("deployments", web))[ROLLED_FOR] == "api@k7,db@v2"
    finally:
        for a in replicas:
            await a.aclose()


# ---------------------------------------------------------------- 3. volumes follow the Secret after the kubelet's sync


async def test_a_volume_mount_stops_blocking_after_the_sync_delay_and_a_subpath_mount_does_not(
    cluster: Cluster, kube_api: KubeApi
) -> None:
    key = cluster.name("db")
    vol, proj, sub, ended = (cluster.name(n) for n in ("vol", "proj", "sub", "ended"))
    await cluster.stamp(key, "v1", time.time() - 600)  # the Secret the pods start with
    volume = {"name": "creds", "secret": {"secretName": key}}
    projected = {"name": "all", "projected": {"sources": [{"secret": {"name": key}}]}}
    init = {
        "name": "init",
        "image": BUSYBOX,
        "command": ["true"],
        "envFrom": [{"secretRef": {"name": key}, "prefix": "DB_"}],
    }
    await cluster.run_pod(
        vol,
        {"containers": [container(volumeMounts=[{"name": "creds", "mountPath": "/etc/creds"}])], "volumes": [volume]},
    )
    await cluster.run_pod(
        proj,
        {
            "initContainers": [init],
            "containers": [container(volumeMounts=[{"name": "all", "mountPath": "/etc/all"}])],
            "volumes": [projected],
        },
    )
    await cluster.run_pod(
        sub,
        {
            "containers": [container(volumeMounts=[{"name": "creds", "mountPath": "/etc/pw", "subPath": "value"}])],
            "volumes": [volume],
        },
    )
    await cluster.ended_pod(ended, {"containers": [container(env=[env_from(key)])]})
    promoted = time.time()  # the pods were set up before the Secret changed
    await cluster.stamp(key, "v2", promoted)
    delay = 1.5
    source = holders(kube_api, cluster.ns, act=False, volume_sync_delay=delay)

    async def report() -> dict[str, Any]:
        return by_node(await source.reports(key, DB, old=[V1], new=V2, now=time.time()))

    try:
        first = await report()
        # The pod that ended holds nothing: it will never run again.
        assert {n: r.current for n, r in first.items()} == {f"pod/{vol}": "v1", f"pod/{proj}": "v1", f"pod/{sub}": "v1"}
        assert [(h.exe, h.how) for h in first[f"pod/{sub}"].holders] == [("(Pod) subPath /etc/pw", "subPath")]
        assert {(h.consumer, h.how, h.exe) for h in first[f"pod/{proj}"].holders} == {
            ("init", "envFrom", "(Pod) envFrom DB_*"),
            ("app", "volume", "(Pod) volume /etc/all"),
        }

        async def volume_synced() -> bool:
            return bool((await report())[f"pod/{vol}"].current == "v2")

        await cluster.until(volume_synced, what="the volume pod to stop blocking")
        assert time.time() >= promoted + delay  # not before the kubelet's sync delay
        after = await report()
        assert after[f"pod/{vol}"].current == "v2" and after[f"pod/{vol}"].in_use == {"v2": 1}
        # subPath and the init container's envFrom were read once, at start: they still hold v1.
        assert after[f"pod/{sub}"].current == "v1"
        assert [h.how for h in after[f"pod/{proj}"].holders] == ["envFrom"]
        # A deleted pod is gone.
        await cluster.delete("pods", proj)

        async def proj_gone() -> bool:
            return f"pod/{proj}" not in await report()

        await cluster.until(proj_gone, what="the deleted pod to be gone")
    finally:
        await source.aclose()


# ---------------------------------------------------------------- 4. Argo Rollouts


async def test_an_annotated_argo_rollout_is_restarted_once_through_restart_at(
    cluster: Cluster, kube_api: KubeApi
) -> None:
    if not await cluster.served("rollouts"):
        pytest.skip("this cluster does not serve argoproj.io/v1alpha1 rollouts (Argo Rollouts not installed)")
    api, key = cluster.name("api"), cluster.name("db")
    spec = {"containers": [container()]}
    await cluster.create("rollouts", workload("Rollout", api, spec, plural_api="argoproj.io/v1alpha1"))
    await cluster.stamp(key, "v2", time.time() - 30)
    leader, second = holders(kube_api, cluster.ns), holders(kube_api, cluster.ns)

    async def current(source: PodHolders) -> Any:
        return by_node(await source.reports(key, DB, old=[V1], new=V2, now=time.time()))[f"Rollout/{api}"].current

    try:
        await current(leader)  # asks for the restart
        obj = await cluster.get("rollouts", api)
        assert obj is not None
        assert obj["metadata"]["annotations"][ROLLED_FOR] == "db@v2"
        asked = obj["spec"]["restartAt"]
        # The template is untouched (a template change would be a new revision through the canary steps).
        assert ROLLED_FOR not in template_of(obj)
        # Again, and from a second rotator: no second restart.
        for source in (leader, second, leader):
            await current(source)
        again = await cluster.get("rollouts", api)
        assert again is not None and again["spec"]["restartAt"] == asked

        async def restarted() -> bool:
            return bool(await current(leader) == "v2")

        await cluster.until(restarted, what="the restart to be done")
        done = await cluster.get("rollouts", api)
        assert done is not None and done["spec"]["restartAt"] == asked
        if cluster.double is not None:
            assert cluster.double.count("PATCH", f"/rollouts/{api}") == 1
            [patch] = [r for r in cluster.double.requests if r.method == "PATCH"]
            assert patch.content_type.startswith("application/merge-patch+json")  # a custom resource
    finally:
        await leader.aclose()
        await second.aclose()


# ---------------------------------------------------------------- 5. bad input (the double's faults)


async def test_bad_input_is_an_event_and_the_retirement_waits_never_a_crash(
    kube_api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    stamp(double, "v2", time.time() - 30)
    # A workload that may not be patched (RBAC), naming a credential this config does not have.
    double.put("statefulsets", workload("StatefulSet", "db-proxy", {"containers": [container()]}, reload="db, nosuch"))
    double.fail(403, times=1000, method="PATCH", path="/statefulsets/")
    # A pod whose spec cannot be read: unknown, so in use. Its literal env value is never logged.
    double.put(
        "pods",
        {
            "metadata": {"name": "odd", "namespace": NS},
            "spec": {"containers": "not a list", "env": [LITERAL]},
            "status": {"phase": "Running"},
        },
    )
    double.put(
        "pods",
        {
            "metadata": {"name": "odd-time", "namespace": NS},
            "spec": {"containers": [container(env=[ENV_DB])]},
            "status": {
                "phase": "Running",
                "containerStatuses": [{"name": "app", "lastState": {"terminated": {"finishedAt": "yesterday"}}}],
            },
        },
    )
    source = holders(kube_api)
    try:
        for _ in range(3):  # every pass: the same answer, each event said once
            got = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
            for node in ("pod/odd", "pod/odd-time", "StatefulSet/db-proxy"):
                assert got[node].current != "v2" and got[node].in_use == {"v1": 1}, node
        assert got["pod/odd"].holders[0].exe == "(pod spec unreadable: unknown, so in use)"
        assert "not asked yet" in got["StatefulSet/db-proxy"].holders[0].exe
        [failed] = events(caplog, "rollout_failed")
        assert "HTTP 403" in failed.error  # type: ignore[attr-defined]
        [unknown] = events(caplog, "reload_annotation_unknown_credential")
        assert (unknown.workload, unknown.named) == ("StatefulSet/db-proxy", "nosuch")  # type: ignore[attr-defined]
        assert {e.pod for e in events(caplog, "pod_spec_unreadable")} == {"odd", "odd-time"}  # type: ignore[attr-defined]
        assert len(events(caplog, "pod_spec_unreadable")) == 2
        # The RBAC is fixed: the next pass rolls it, once.
        double.faults.clear()
        got = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
        assert double.count("PATCH", "/statefulsets/db-proxy") == 4  # three refused, one that landed
        assert "rollout not available yet" in got["StatefulSet/db-proxy"].holders[0].exe
    finally:
        await source.aclose()
    assert CANARY not in everything_logged(caplog)

    # The sidecar's action on a workload that does not exist: a reload error naming it.
    missing = RolloutRestart(kind="DaemonSet", name="gone", namespace=NS, timeout=1, kubeconfig=kube_api.kubeconfig)
    try:
        roll_versions.set({DB: V2})
        with pytest.raises(ReloadError, match="DaemonSet/shop/gone"):
            await missing.reload(0)
    finally:
        await missing.aclose()


async def test_a_pod_list_that_is_refused_blocks_and_a_cluster_without_argo_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    double = KubeDouble(served={"secrets", "pods", "deployments", "statefulsets", "daemonsets", "leases"})
    await double.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(double.kubeconfig(namespace=NS))
    source = PodHolders(
        namespace=NS, credentials=["db"], kubeconfig=kubeconfig, act=True, start_margin=0.01, sync_timeout=2.0
    )
    try:
        stamp(double, "v2", time.time() - 30)
        double.run_pod(
            {"metadata": {"name": "web-1", "namespace": NS}, "spec": {"containers": [container(env=[ENV_DB])]}}
        )
        double.fail(403, times=1000, method="GET", path="/pods")
        got = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
        assert set(got) == {f"pods/{NS}"}  # the rollouts kind is simply absent
        assert got[f"pods/{NS}"].in_use == {"v1": 1}
        assert "HTTP 403" in got[f"pods/{NS}"].holders[0].exe
        double.faults.clear()

        async def listed() -> bool:
            return set(by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))) == {"pod/web-1"}

        await eventually(listed, timeout=10, what="the pod list to answer")
    finally:
        await source.aclose()
        await double.close()


async def test_the_config_turns_either_part_off_and_then_nothing_is_watched_or_rolled(
    kube_api: KubeApi, cluster: Cluster, tmp_path: Path
) -> None:
    key, web = cluster.name("db"), cluster.name("web")
    off = config(kube_api, tmp_path, holders=False, rollouts=False)
    assert PodHolders.from_config(off, act=True) is None
    only = PodHolders.from_config(
        config(kube_api, tmp_path, key=key, namespace=cluster.ns, rollouts=False, volume_sync_delay="5s"), act=True
    )
    assert only is not None
    try:
        assert (only.workloads, only.volume_sync_delay, only.act) == ({}, 5.0, True)
        await cluster.stamp(key, "v2", time.time() - 30)
        await cluster.create("deployments", workload("Deployment", web, {"containers": [container()]}))
        assert await only.reports(key, DB, old=[V1], new=V2, now=time.time()) == []
        dep = await cluster.get("deployments", web)
        assert dep is not None and ROLLED_FOR not in template_of(dep)
    finally:
        await only.aclose()
    assert json.loads(json.dumps(config(kube_api, tmp_path).store.pods.model_dump()))["volume_sync_delay"] == 120.0
