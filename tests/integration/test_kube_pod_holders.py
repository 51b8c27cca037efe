"""Pods that use a Secret natively as holders, and Reloader-style rollouts once per change (issue 17).

Against the apiserver double: the tests play the controllers (``roll_pods``,
``advance_rollout``) and the kubelet (``run_pod``), so each decides when a
rollout "becomes available". The rotator's side is the real one: the
Kubernetes store, ``CredentialRotator`` with ``PodHolders`` (its watches), the
gate, ``baton status --pending``. Every wait is a poll with a deadline on what
the double or the rotator exposes.
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

pytestmark = pytest.mark.integration

NS = "shop"
CANARY = "pod-holders-canary-8c2f"  # a literal env value in a pod spec: must never reach a log line
DB = CredentialName("db")
V1, V2 = VersionId("v1"), VersionId("v2")


# ---------------------------------------------------------------- helpers


def config(kube_api: KubeApi, tmp_path: Path, **pods: Any) -> Config:
    return parse_config(
        {
            "node_id": "rotator-1",
            "store": {"kind": "kubernetes", "namespace": NS, "kubeconfig": str(kube_api.kubeconfig), "pods": pods},
            "report": {"heartbeat": 1.0},
            "credentials": [
                {
                    "name": "db",
                    "key": "db",
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": "1h", "max_draining": 1},
                }
            ],
        }
    )


def holders(kube_api: KubeApi, *, act: bool = True, **kw: Any) -> PodHolders:
    params: dict[str, Any] = {"start_margin": 0.01, "volume_sync_delay": 60.0, "sync_timeout": 5.0} | kw
    return PodHolders(namespace=NS, credentials=["db"], kubeconfig=kube_api.kubeconfig, act=act, **params)


def container(name: str = "app", **kw: Any) -> dict[str, Any]:
    return {"name": name, "image": "registry.example/app:1", **kw}


ENV_DB = {
    "name": "DB_PASSWORD",
    "valueFrom": {"secretKeyRef": {"name": "db", "key": "value"}},
}
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
    double.put(
        "secrets",
        {
            "metadata": {"name": "db", "namespace": NS, "annotations": {PROMOTED: f"{version} {at!r}"}},
            "data": {"value": base64.b64encode(value.encode()).decode()},
        },
    )


def by_node(reports: list[Any]) -> dict[str, Any]:
    return {r.node: r for r in reports}


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> float:
    """Call ``check`` until it says yes (each call is a real pass: watch events land in between)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@contextlib.asynccontextmanager
async def rotator_on(kube_api: KubeApi, cfg: Config, source: PodHolders) -> AsyncIterator[CredentialRotator]:
    store = KubernetesStore(namespace=NS, kubeconfig=kube_api.kubeconfig)
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


# ---------------------------------------------------------------- 1. env holders and the rollout


async def test_a_pod_with_the_password_in_its_env_blocks_retirement_until_its_deployment_rolled_then_not(
    kube_api: KubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    cfg = config(kube_api, tmp_path)
    async with rotator_on(kube_api, cfg, holders(kube_api)) as rotator:
        assert (await rotator.rotate()).result == "rotated"  # v1: the first version
        double.put("deployments", workload("Deployment", "web", {"containers": [container(env=[ENV_DB, LITERAL])]}))
        old_pods = double.roll_pods("deployments", NS, "web")
        # An unrelated workload and pod: never rolled, never holders.
        double.put("deployments", workload("Deployment", "other", {"containers": [container()]}, reload=None))
        double.roll_pods("deployments", NS, "other")
        outcome = await rotator.rotate()
        assert outcome.result == "rotated"
        v2 = outcome.version
        secret = double.get("secrets", NS, "db")
        assert secret is not None and secret["metadata"]["annotations"][PROMOTED].startswith(f"{v2} ")

        # The pods took v1 into their environment at start: they block, and so does the
        # Deployment until a rollout for db@v2 was asked and is available.
        assert await rotator.retire_ready() == []
        [blocked] = rotator.last_decisions
        assert set(blocked.holders) == {f"pod/{p}" for p in old_pods} | {"Deployment/web"}
        held = blocked.holders[f"pod/{old_pods[0]}"]
        assert [(h.exe, h.consumer, h.how) for h in held] == [("(Deployment/web) env DB_PASSWORD", "app", "env")]

        # baton status --pending says who, and how.
        assert await status.print_status(cfg, pending=True, as_json=False, url=None) == 0
        out = capsys.readouterr().out
        for p in old_pods:
            assert f"    pod/{p} (Deployment/web) env DB_PASSWORD" in out, out
        assert "Deployment/web (rollout for db@" in out
        assert "pod/other-" not in out

        # The leader's retirement pass asks for the rollout, once (after the Secret settled).
        await eventually(
            lambda: _after(rotator.retire_ready(), lambda: double.count("PATCH", "/deployments/web") == 1),
            timeout=10,
            what="the rollout of web",
        )
        dep = double.get("deployments", NS, "web")
        assert dep is not None
        assert dep["spec"]["template"]["metadata"]["annotations"][ROLLED_FOR] == f"db@{v2}"
        assert dep["metadata"]["generation"] == 2
        assert await rotator.retire_ready() == []  # asked, not available, old pods still there
        assert double.count("PATCH", "/deployments/web") == 1
        assert double.count("PATCH", "/deployments/other") == 0

        # The controller replaces the pods: the new ones read v2 at start, and v1 retires.
        new_pods = double.roll_pods("deployments", NS, "web")
        await eventually(lambda: _retired(rotator), timeout=10, what="v1 retired")
        assert double.count("PATCH", "/deployments/web") == 1
        assert set(new_pods).isdisjoint(old_pods)
    logged = everything_logged(caplog)
    assert [e.workload for e in events(caplog, "rollout_requested")] == ["Deployment/web"]  # type: ignore[attr-defined]
    assert CANARY not in logged and CANARY not in out


async def _after(step: Awaitable[Any], cond: Callable[[], bool]) -> bool:
    await step
    return cond()


async def _retired(rotator: CredentialRotator) -> bool:
    return bool(await rotator.retire_ready())


# ---------------------------------------------------------------- 2. once per change across replicas


async def test_five_sidecar_replicas_asking_for_the_same_rollout_produce_exactly_one(kube_api: KubeApi) -> None:
    double = kube_api.hooks()
    double.put("deployments", workload("Deployment", "web", {"containers": [container()]}, reload=None))
    replicas = [
        RolloutRestart(
            kind="Deployment", name="web", namespace=NS, timeout=10, kubeconfig=kube_api.kubeconfig, poll_interval=0.02
        )
        for _ in range(5)
    ]

    async def ask(action: RolloutRestart) -> None:
        roll_versions.set({DB: V2})  # what the Reloader sets around the call: this change
        await action.reload(0)

    try:
        tasks = [asyncio.create_task(ask(a)) for a in replicas]
        await double.until(lambda: (double.get("deployments", NS, "web") or {})["metadata"]["generation"] == 2)
        await double.until(lambda: double.count("GET", "/deployments/web") >= 10)  # all are waiting now
        double.advance_rollout(NS, "web")
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        dep = double.get("deployments", NS, "web")
        assert dep is not None
        # One template change: one rollout (a second patch would have bumped the generation again).
        assert dep["metadata"]["generation"] == 2
        assert dep["spec"]["template"]["metadata"]["annotations"][ROLLED_FOR] == "db@v2"
        patches = double.count("PATCH", "/deployments/web")
        # A sidecar asking again, and a rotator judging the same change, change nothing.
        await ask(replicas[0])
        source = holders(kube_api)
        try:
            stamp(double, "v2", time.time() - 30)
            dep["metadata"]["annotations"] = {RELOAD: "db"}
            double.put("deployments", dep)
            reports = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
            assert reports["Deployment/web"].current == "v2"
        finally:
            await source.aclose()
        assert double.count("PATCH", "/deployments/web") == patches
        # The next change rolls again, keeping the first credential's entry.
        roll_versions.set({CredentialName("api"): VersionId("k7")})
        task = asyncio.create_task(replicas[1].reload(0))
        await double.until(lambda: (double.get("deployments", NS, "web") or {})["metadata"]["generation"] == 3)
        double.advance_rollout(NS, "web")
        await asyncio.wait_for(task, 10)
        dep = double.get("deployments", NS, "web")
        assert dep is not None
        assert dep["spec"]["template"]["metadata"]["annotations"][ROLLED_FOR] == "api@k7,db@v2"
    finally:
        for a in replicas:
            await a.aclose()


# ---------------------------------------------------------------- 3. volumes follow the Secret after the kubelet's sync


async def test_a_volume_mount_stops_blocking_after_the_sync_delay_and_a_subpath_mount_does_not(
    kube_api: KubeApi,
) -> None:
    double = kube_api.hooks()
    volume = {"name": "creds", "secret": {"secretName": "db"}}
    projected = {"name": "all", "projected": {"sources": [{"secret": {"name": "db"}}, {"configMap": {"name": "x"}}]}}
    double.run_pod(
        {
            "metadata": {"name": "vol", "namespace": NS},
            "spec": {
                "containers": [container(volumeMounts=[{"name": "creds", "mountPath": "/etc/creds"}])],
                "volumes": [volume],
            },
        }
    )
    double.run_pod(
        {
            "metadata": {"name": "proj", "namespace": NS},
            "spec": {
                "initContainers": [container("init", envFrom=[{"secretRef": {"name": "db"}, "prefix": "DB_"}])],
                "containers": [container(volumeMounts=[{"name": "all", "mountPath": "/etc/all"}])],
                "volumes": [projected],
            },
        }
    )
    double.run_pod(
        {
            "metadata": {"name": "sub", "namespace": NS},
            "spec": {
                "containers": [container(volumeMounts=[{"name": "creds", "mountPath": "/etc/pw", "subPath": "value"}])],
                "volumes": [volume],
            },
        }
    )
    promoted = time.time()  # the pods were set up before the Secret changed
    stamp(double, "v2", promoted)
    delay = 1.5
    source = holders(kube_api, act=False, volume_sync_delay=delay)
    try:
        first = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
        assert {n: r.current for n, r in first.items()} == {"pod/vol": "v1", "pod/proj": "v1", "pod/sub": "v1"}
        assert [(h.exe, h.how) for h in first["pod/sub"].holders] == [("(Pod) subPath /etc/pw", "subPath")]
        assert {(h.consumer, h.how, h.exe) for h in first["pod/proj"].holders} == {
            ("init", "envFrom", "(Pod) envFrom DB_*"),
            ("app", "volume", "(Pod) volume /etc/all"),
        }

        async def volume_synced() -> bool:
            return by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))["pod/vol"].current == "v2"

        await eventually(volume_synced, timeout=10, what="the volume pod to stop blocking")
        assert time.time() >= promoted + delay  # not before the kubelet's sync delay
        after = by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))
        assert after["pod/vol"].current == "v2" and after["pod/vol"].in_use == {"v2": 1}
        # subPath and the init container's envFrom were read once, at start: they still hold v1.
        assert after["pod/sub"].current == "v1"
        assert [h.how for h in after["pod/proj"].holders] == ["envFrom"]
        # A finished pod holds nothing; a deleted one is gone.
        pod = double.get("pods", NS, "sub")
        assert pod is not None
        pod["status"]["phase"] = "Succeeded"
        double.put("pods", pod)
        double.delete_object("pods", NS, "proj")
        await eventually(
            lambda: _nodes(source, {"pod/vol"}), timeout=5, what="the finished and the deleted pod to be gone"
        )
    finally:
        await source.aclose()


async def _nodes(source: PodHolders, want: set[str]) -> bool:
    return set(by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))) == want


# ---------------------------------------------------------------- 4. Argo Rollouts


async def test_an_annotated_argo_rollout_is_restarted_once_through_restart_at(kube_api: KubeApi) -> None:
    double = kube_api.hooks()
    double.put(
        "rollouts",
        workload("Rollout", "api", {"containers": [container(env=[ENV_DB])]}, plural_api="argoproj.io/v1alpha1"),
    )
    stamp(double, "v2", time.time() - 30)
    leader, second = holders(kube_api), holders(kube_api)
    try:
        first = by_node(await leader.reports("db", DB, old=[V1], new=V2, now=time.time()))
        assert first["Rollout/api"].current == "v1"  # asked, not yet restarted
        assert double.count("PATCH", "/rollouts/api") == 1
        [patch] = [r for r in double.requests if r.method == "PATCH"]
        assert patch.content_type.startswith("application/merge-patch+json")  # a custom resource
        obj = double.get("rollouts", NS, "api")
        assert obj is not None
        assert obj["metadata"]["annotations"][ROLLED_FOR] == "db@v2"
        assert obj["spec"]["restartAt"]
        # The template is untouched (a template change would be a new revision through the canary steps).
        assert ROLLED_FOR not in (obj["spec"]["template"]["metadata"].get("annotations") or {})
        # Again, and from a second rotator: no second restart.
        for source in (leader, second, leader):
            assert (
                by_node(await source.reports("db", DB, old=[V1], new=V2, now=time.time()))["Rollout/api"].current
                == "v1"
            )
        assert double.count("PATCH", "/rollouts/api") == 1
        double.advance_rollout(NS, "api", plural="rollouts")

        async def restarted() -> bool:
            got = by_node(await leader.reports("db", DB, old=[V1], new=V2, now=time.time()))
            return bool(got["Rollout/api"].current == "v2")

        await eventually(restarted, timeout=5, what="the restart to be done")
        assert double.count("PATCH", "/rollouts/api") == 1
    finally:
        await leader.aclose()
        await second.aclose()


# ---------------------------------------------------------------- 5. bad input


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


async def test_the_config_turns_either_part_off_and_status_pending_then_sees_no_pods(
    kube_api: KubeApi, tmp_path: Path
) -> None:
    double = kube_api.hooks()
    off = config(kube_api, tmp_path, holders=False, rollouts=False)
    assert PodHolders.from_config(off, act=True) is None
    only = PodHolders.from_config(config(kube_api, tmp_path, rollouts=False, volume_sync_delay="5s"), act=False)
    assert only is not None
    try:
        assert (only.workloads, only.volume_sync_delay, only.act) == ({}, 5.0, False)
        stamp(double, "v2", time.time() - 30)
        double.put("deployments", workload("Deployment", "web", {"containers": [container()]}))
        assert await only.reports("db", DB, old=[V1], new=V2, now=time.time()) == []
        assert double.count("PATCH", "/deployments/web") == 0
    finally:
        await only.aclose()
    assert json.loads(json.dumps(config(kube_api, tmp_path).store.pods.model_dump()))["volume_sync_delay"] == 120.0
