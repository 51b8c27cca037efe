"""Sidecar Kubernetes calls against the apiserver double: pod reports, rollout restart, leader election."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from daemon.config import parse_config
from daemon.errors import ReloadError
from daemon.report.base import NodeReport
from sidecar.identity import PodIdentity
from sidecar.leader import LeaderElection
from sidecar.podreport import PodReporter, report_annotation
from sidecar.rollout import RESTARTED_AT, RolloutAction, RolloutRestart
from tests.doubles.kubernetes import KubeDouble
from tests.fixtures.kube import KubeApi

pytestmark = pytest.mark.integration


def seed_pod(double: KubeDouble, name: str, *, annotations: dict[str, str] | None = None, **labels: str) -> None:
    meta = {"name": name, "namespace": "default", "labels": labels, "annotations": annotations or {}}
    double.put("pods", {"metadata": meta, "status": {"phase": "Running"}})


def identity(name: str) -> PodIdentity:
    return PodIdentity(name=name, namespace="default", uid=f"uid-{name}", node_name="node-1")


@pytest.fixture
async def reporters(kube_api: KubeApi) -> AsyncIterator[list[PodReporter]]:
    double = kube_api.hooks()
    for name in ("agent-a", "agent-b"):
        seed_pod(double, name, **{"baton.io/agent": "true"})
    seed_pod(double, "unrelated", app="web")
    made = [
        PodReporter(
            namespace="default", selector="baton.io/agent=true", identity=identity(n), kubeconfig=kube_api.kubeconfig
        )
        for n in ("agent-a", "agent-b")
    ]
    yield made
    for r in made:
        await r.aclose()


async def test_pod_reporter_publishes_on_its_own_pod_and_collects_every_agent(
    kube_api: KubeApi, reporters: list[PodReporter]
) -> None:
    double = kube_api.hooks()
    a, b = reporters
    intruder = NodeReport(node="intruder", credential="db", current="x").to_json()
    seed_pod(double, "unrelated", annotations={report_annotation("db"): intruder}, app="web")
    await asyncio.gather(
        a.publish("db", NodeReport(node="agent-a", credential="db", current="v1", in_use={"v1": 2})),
        b.publish("db", NodeReport(node="agent-b", credential="db", current="v2")),
        a.publish("api", NodeReport(node="agent-a", credential="api", current="k9")),
    )
    got = {r.node: r for r in await a.collect("db", "db")}
    # The unrelated pod does not match the selector, so its annotation is not read.
    assert set(got) == {"agent-a", "agent-b"}
    assert got["agent-a"].in_use == {"v1": 2}
    pod = double.get("pods", "default", "agent-a")
    assert pod is not None
    assert set(pod["metadata"]["annotations"]) == {report_annotation("db"), report_annotation("api")}
    patches = [r for r in double.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/merge-patch+json"}
    assert {r.path.rsplit("/", 1)[-1] for r in patches} == {"agent-a", "agent-b"}


async def test_a_deleted_pod_simply_disappears_from_the_collected_reports(
    kube_api: KubeApi, reporters: list[PodReporter]
) -> None:
    double = kube_api.hooks()
    a, b = reporters
    await a.publish("db", NodeReport(node="agent-a", credential="db", current="v1"))
    await b.publish("db", NodeReport(node="agent-b", credential="db", current="v1"))
    assert len(await a.collect("db", "db")) == 2
    del double.objects[("pods", "default", "agent-b")]
    assert [r.node for r in await a.collect("db", "db")] == ["agent-a"]
    await a.forget("db", "agent-b")  # already gone: not an error
    await b.forget("db", "agent-a")
    # agent-a's report is cleared but its pod still runs: a stale stand-in (unknown), not gone.
    assert [(r.node, r.current, r.heartbeat) for r in await a.collect("db", "db")] == [("agent-a", None, 0.0)]


async def test_pod_reporter_from_config_takes_the_selector_and_namespace(kube_api: KubeApi) -> None:
    cfg = parse_config(
        {
            "store": {
                "kind": "kubernetes",
                "reports": "pod",
                "pod_selector": "team=x",
                "kubeconfig": str(kube_api.kubeconfig),
            },
            "credentials": [{"name": "db", "key": "db", "output": {"dir": "/tmp/x"}}],
        }
    )
    r = PodReporter.from_config(cfg, identity("agent-a"))
    assert (r.namespace, r.selector, r.kubeconfig) == ("default", "team=x", kube_api.kubeconfig)
    await r.aclose()


@pytest.fixture
def deployment(kube_api: KubeApi) -> KubeDouble:
    double = kube_api.hooks()
    double.put(
        "deployments",
        {
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "web"}}}},
        },
    )
    return double


async def test_rollout_patches_once_and_waits_until_the_rollout_is_available(
    kube_api: KubeApi, deployment: KubeDouble
) -> None:
    action = RolloutRestart(
        kind="Deployment",
        name="web",
        namespace="default",
        timeout=10,
        kubeconfig=kube_api.kubeconfig,
        poll_interval=0.02,
    )
    try:
        task = asyncio.ensure_future(action.reload(1234))
        await deployment.until(lambda: deployment.count("PATCH", "/deployments/web") == 1)
        dep = deployment.get("deployments", "default", "web")
        assert dep is not None
        assert dep["metadata"]["generation"] == 2
        assert RESTARTED_AT in dep["spec"]["template"]["metadata"]["annotations"]
        assert dep["spec"]["template"]["metadata"]["labels"] == {"app": "web"}  # strategic merge kept it
        # Observed but not yet rolled: still waiting.
        deployment.set_status("default", "web", observedGeneration=2, updatedReplicas=2)
        await deployment.until(lambda: deployment.count("GET", "/deployments/web") >= 3)
        assert not task.done()
        deployment.advance_rollout("default", "web")
        await asyncio.wait_for(task, 5)
        assert deployment.count("PATCH", "/deployments/web") == 1
    finally:
        await action.aclose()


async def test_the_rollout_reload_action_uses_the_consumers_kubeconfig(
    kube_api: KubeApi, deployment: KubeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No $KUBECONFIG and no in-cluster account: only reload.rollout.kubeconfig leads to the cluster.
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = parse_config(
        {
            "node_id": "vm-1",
            "store": {"kind": "local", "path": "/nonexistent/store.db"},
            "credentials": [
                {
                    "name": "db",
                    "key": "db",
                    "output": {"dir": "/nonexistent/out"},
                    "consumers": [
                        {
                            "name": "web",
                            "match": {"cmdline": "web"},
                            "reload": {
                                "rollout": {
                                    "name": "web",
                                    "namespace": "default",
                                    "timeout": "5s",
                                    "kubeconfig": str(kube_api.kubeconfig),
                                }
                            },
                        }
                    ],
                }
            ],
        }
    )
    action = RolloutAction(config.credentials[0].consumers[0])
    action.poll_interval = 0.02
    try:
        task = asyncio.ensure_future(action.reload(0))
        await deployment.until(lambda: deployment.count("PATCH", "/deployments/web") == 1)
        deployment.advance_rollout("default", "web")
        await asyncio.wait_for(task, 5)
    finally:
        await action.aclose()


async def test_rollout_that_never_becomes_available_is_a_reload_error(
    kube_api: KubeApi, deployment: KubeDouble
) -> None:
    action = RolloutRestart(
        kind="Deployment",
        name="web",
        namespace="default",
        timeout=0.3,
        kubeconfig=kube_api.kubeconfig,
        poll_interval=0.05,
    )
    try:
        with pytest.raises(ReloadError, match="not available"):
            await action.reload(0)
        assert deployment.count("PATCH", "/deployments/web") == 1
    finally:
        await action.aclose()


async def test_rollout_of_a_missing_workload_is_a_reload_error(kube_api: KubeApi) -> None:
    kube_api.hooks()
    action = RolloutRestart(
        kind="Deployment", name="nope", namespace="default", timeout=1, kubeconfig=kube_api.kubeconfig
    )
    try:
        with pytest.raises(ReloadError, match="HTTP 404"):
            await action.reload(0)
    finally:
        await action.aclose()


def contender(kube_api: KubeApi, who: str, *, release: bool = True) -> LeaderElection:
    return LeaderElection(
        name="baton-rotator",
        namespace=kube_api.namespace,
        identity=who,
        kubeconfig=kube_api.kubeconfig,
        lease_duration=1.0,
        renew_deadline=0.8,
        retry_period=0.1,
        release_on_stop=release,
    )


async def test_one_of_two_contenders_wins_and_the_other_takes_over_after_the_lease_expires(kube_api: KubeApi) -> None:
    double = kube_api.hooks()
    a, b = contender(kube_api, "a", release=False), contender(kube_api, "b")
    a.start()
    await asyncio.wait_for(a.elected.wait(), 5)
    b.start()
    try:
        # b keeps trying while a renews: it must not win within a few lease renewals.
        renewals = double.count("PUT", "/leases/baton-rotator")
        await double.until(lambda: double.count("PUT", "/leases/baton-rotator") >= renewals + 4)
        assert a.is_leader and not b.is_leader
        await a.stop()  # a dies without releasing
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(b.elected.wait(), 5)
        waited = loop.time() - t0
        assert waited >= 0.8, f"took over after {waited:.2f}s, before the lease expired"
        lease = double.get("leases", "default", "baton-rotator")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        await a.stop()
        await b.stop()


async def test_a_released_lease_is_taken_over_at_once(kube_api: KubeApi) -> None:
    double = kube_api.hooks()
    a, b = contender(kube_api, "a"), contender(kube_api, "b")
    async with a:
        await asyncio.wait_for(a.elected.wait(), 5)
        b.start()
        await double.until(lambda: double.count("GET", "/leases/baton-rotator") >= 6)
        assert not b.is_leader
    assert not a.is_leader
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        await asyncio.wait_for(b.elected.wait(), 5)
        assert loop.time() - t0 < 0.8
    finally:
        await b.stop()


async def test_a_conflicting_lease_write_never_makes_two_leaders(kube_api: KubeApi) -> None:
    double = kube_api.hooks()
    contenders = [contender(kube_api, f"c{i}") for i in range(4)]
    for c in contenders:
        c.start()
    try:
        await double.until(lambda: any(c.is_leader for c in contenders))
        for _ in range(10):
            assert sum(c.is_leader for c in contenders) == 1
            await asyncio.sleep(0.05)
    finally:
        for c in contenders:
            await c.stop()
