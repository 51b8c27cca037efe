"""The Kubernetes wiring end to end, against the apiserver double.

Not the sidecar classes on their own (tests/integration/test_kube_sidecar.py
does that) but the paths the daemon takes to them: an ``Agent`` configured
with ``store: {kind: kubernetes}``; ``daemon.report.open_reporter`` choosing
the pod reporter from ``reports: pod`` and the downward-API environment; the
``Reloader`` building ``rollout`` and ``container_restart`` actions through
``make_action``; and ``Rotator`` running a Lease election when
``BATON_LEASE_NAME`` is set. Every wait is a poll with a deadline on something
the double or the daemon exposes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config import kube_config as kube_config_module

import sidecar.leader
from daemon.agent.service import Agent
from daemon.clients.kube import annotation_key
from daemon.config import Config, ConsumerConfig, MatchConfig, parse_config
from daemon.errors import ConfigError
from daemon.providers import open_provider
from daemon.reload.actions import make_action
from daemon.reload.reloader import Reloader
from daemon.report import open_reporter
from daemon.report.base import REPORT_PREFIX, NodeReport
from daemon.rotation.gate import Decision, decide
from daemon.rotation.service import Rotator
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.kubernetes import CREATED, KubernetesStore
from daemon.usage.consumers import find_processes
from sidecar.identity import PodIdentity
from sidecar.podreport import PodReporter, report_annotation
from sidecar.restart import ContainerRestartAction
from sidecar.rollout import RESTARTED_AT, RolloutAction
from tests.doubles.kubernetes import KubeDouble
from tests.fixtures.kube import KubeApi
from tests.helpers import everything_logged, running_agent, until

pytestmark = pytest.mark.integration

NS = "ns"
CANARY = "kube-wiring-canary-5d1e"  # a secret value: must never reach a log line


# ---------------------------------------------------------------- helpers


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def seed_secret(double: KubeDouble, name: str, value: str, **annotations: str) -> None:
    double.put(
        "secrets",
        {"metadata": {"name": name, "namespace": NS, "annotations": annotations}, "data": {"value": b64(value)}},
    )


def secret_value(double: KubeDouble, name: str) -> str:
    obj = double.get("secrets", NS, name)
    assert obj is not None
    return base64.b64decode(obj["data"]["value"]).decode()


def seed_pod(
    double: KubeDouble, name: str, *, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> None:
    meta = {"name": name, "namespace": NS, "labels": labels, "annotations": annotations or {}}
    double.put("pods", {"metadata": meta, "status": {"phase": "Running"}})


@contextlib.asynccontextmanager
async def core_api(kube_api: KubeApi) -> AsyncIterator[Any]:
    """A plain client of the double, as kubectl or another controller would write through the API."""
    async with await kube_config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        yield client.CoreV1Api(c)


async def api_write(call: Any) -> None:
    resp = await call
    status = resp.status
    resp.release()
    assert status < 300, status


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def agent_config(tmp_path: Path, kube_api: KubeApi, *, node: str = "node-1", **store: Any) -> Config:
    return parse_config(
        {
            "node_id": node,
            "store": {"kind": "kubernetes", "namespace": NS, "kubeconfig": str(kube_api.kubeconfig), **store},
            "api": {"listen": "127.0.0.1:0"},
            "report": {"heartbeat": 1.0},
            "agent": {"scan_interval": 0.5, "fanotify": "off", "debounce": 0.05, "retry_min": 0.1, "retry_max": 0.5},
            "credentials": [
                {
                    "name": "db",
                    "key": "db",
                    "output": {"dir": str(tmp_path / "out"), "mode": "0400"},
                    "rotation": {"every": "1h", "max_draining": 1},  # the kubernetes store keeps one previous
                }
            ],
        }
    )


def on_disk(tmp_path: Path) -> str:
    return (tmp_path / "out" / "value").read_text()


# ---------------------------------------------------------------- 1. agent on the Kubernetes store


async def test_an_agent_on_the_kubernetes_store_writes_each_content_change_and_reports_on_the_secret(
    kube_api: KubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    seed_secret(double, "db", CANARY + "-1")
    config = agent_config(tmp_path, kube_api)
    async with running_agent(Agent(config, install_signals=False)) as agent:
        state = agent.credentials["db"]
        assert on_disk(tmp_path) == CANARY + "-1"
        first = state.version

        # The node report lands as this node's annotation on the Secret (reports: secret).
        node_key = annotation_key(REPORT_PREFIX + "node-1")
        assert node_key == "baton.io/node.node-1"

        def report() -> NodeReport | None:
            obj = double.get("secrets", NS, "db")
            text = ((obj or {}).get("metadata", {}).get("annotations") or {}).get(node_key)
            return NodeReport.from_json(text) if text else None

        await until(lambda: report() is not None, timeout=5, what="the node report annotation")
        got = report()
        assert got is not None and (got.node, got.credential, got.current) == ("node-1", "db", first)

        async with core_api(kube_api) as core:
            # An annotation-only change (another controller's label of the Secret) is no new version...
            await api_write(
                core.patch_namespaced_secret(
                    "db",
                    NS,
                    {"metadata": {"annotations": {"example.com/owner": "team-a"}}},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                )
            )
            # ...and a content change after it is. Watch events arrive in order, so when the
            # content change is on disk, the annotation change has been seen already.
            await api_write(
                core.patch_namespaced_secret(
                    "db",
                    NS,
                    {"data": {"value": b64(CANARY + "-2")}},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                )
            )
            took = await until(lambda: on_disk(tmp_path) == CANARY + "-2", timeout=5, what="version 2 on disk")
        assert took < 2.0, f"a content change took {took:.2f}s to reach the file"
        written = [r.version for r in events(caplog, "version_written")]  # type: ignore[attr-defined]
        assert written == [first, state.version] and state.version != first
        assert {v.version for v in state.writer.versions()} == {first, state.version}

        # The report follows the new version.
        await until(lambda: (r := report()) is not None and r.current == state.version, timeout=5, what="report v2")
    assert CANARY not in everything_logged(caplog)


# ---------------------------------------------------------------- 2. reports on the agent's own Pod


AGENT = {"baton.io/agent": "true"}  # the default pod_selector
POD_ENV = {"POD_NAME": "web-1", "POD_NAMESPACE": NS, "POD_UID": "uid-web-1", "NODE_NAME": "node-a"}


@pytest.fixture
def in_pod(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for k, v in POD_ENV.items():
        monkeypatch.setenv(k, v)
    yield monkeypatch


async def test_pod_reports_go_on_the_agents_own_pod_and_a_deleted_pod_is_gone_not_unknown(
    kube_api: KubeApi, tmp_path: Path, in_pod: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    seed_secret(double, "db", CANARY + "-1", **{CREATED: repr(time.time())})
    seed_pod(double, "web-1", labels=AGENT)
    seed_pod(double, "web-2", labels=AGENT)
    seed_pod(double, "unrelated", labels={"app": "other"})
    # The node id of a sidecar is its pod name (the pod's hostname by default).
    config = agent_config(tmp_path, kube_api, node="web-1", reports="pod")

    agent_side = open_reporter(config, None)  # type: ignore[arg-type]
    assert isinstance(agent_side, PodReporter)
    assert agent_side.identity == PodIdentity(name="web-1", namespace=NS, uid="uid-web-1", node_name="node-a")
    assert (agent_side.namespace, agent_side.selector) == (NS, "baton.io/agent=true")
    await agent_side.aclose()

    rot_store = KubernetesStore.from_config(config)
    opened: list[PodReporter] = []
    try:
        async with running_agent(Agent(config, install_signals=False)) as agent:
            state = agent.credentials["db"]
            v1 = state.version
            assert isinstance(agent.reporter, PodReporter)

            def pod_report(pod: str) -> NodeReport | None:
                obj = double.get("pods", NS, pod)
                text = ((obj or {}).get("metadata", {}).get("annotations") or {}).get(report_annotation("db"))
                return NodeReport.from_json(text) if text else None

            await until(lambda: pod_report("web-1") is not None, timeout=5, what="the report on pod web-1")
            mine = pod_report("web-1")
            assert mine is not None and (mine.node, mine.current) == ("web-1", v1)
            secret = double.get("secrets", NS, "db")
            assert secret is not None
            assert not [a for a in secret["metadata"].get("annotations") or {} if a.startswith("baton.io/node.")]
            pod_patches = {r.path for r in double.requests if r.method == "PATCH" and "/pods/" in r.path}
            assert pod_patches == {f"/api/v1/namespaces/{NS}/pods/web-1"}

            # A rotator outside the agents' pods (no POD_NAME): its reporter only collects.
            in_pod.delenv("POD_NAME")
            rotator_side = open_reporter(config, rot_store)
            assert isinstance(rotator_side, PodReporter)
            opened.append(rotator_side)
            assert rotator_side.identity is None
            with pytest.raises(ConfigError, match="POD_NAME"):
                await rotator_side.publish("db", NodeReport(node="x", credential="db", current="v"))
            rotator = CredentialRotator(
                config=config,
                credential=config.credential("db"),
                store=rot_store,
                reporter=rotator_side,
                provider=open_provider(config.credential("db").rotation),  # type: ignore[arg-type]
            )
            # web-2 runs but has not reported yet: a stale stand-in (unknown), so it blocks until it reports.
            assert [(r.node, r.current) for r in await rotator_side.collect("db", "db")] == [
                ("web-1", v1),
                ("web-2", None),
            ]

            # A rotation: the agent picks up v2; web-2 (another agent) still reports v1.
            outcome = await rotator.rotate()
            assert outcome.result == "rotated"
            v2 = outcome.version
            await until(lambda: (r := pod_report("web-1")) is not None and r.current == v2, timeout=5, what="v2")
            stale_peer = NodeReport(node="web-2", credential="db", current=v1, heartbeat=time.time())
            seed_pod(
                double,
                "web-2",
                annotations={report_annotation("db"): stale_peer.to_json()},
                labels=AGENT,
            )
            [blocked] = await rotator.evaluate()
            assert not blocked.retire and blocked.version == v1
            assert any(r.startswith("web-2: current version is") for r in blocked.reasons), blocked.reasons
            assert await rotator.known_nodes() == {"web-1", "web-2"}

            # web-2's Pod is deleted: its report is gone with it, and the gate no longer
            # waits for it (gone, not "no report (unknown)").
            async with core_api(kube_api) as core:
                await api_write(core.delete_namespaced_pod("web-2", NS, _preload_content=False))
            collected = await rotator_side.collect("db", "db")
            assert [(r.node, r.current) for r in collected] == [("web-1", v2)]
            [free] = await rotator.evaluate()
            assert free.retire, free.reasons
            assert not any("web-2" in r for r in free.reasons)
            assert await rotator.known_nodes() == {"web-1"}
            assert [r.node for r in events(caplog, "node_gone")] == ["web-2"]  # type: ignore[attr-defined]
    finally:
        for r in opened:
            await r.aclose()
        await rot_store.aclose()
    assert CANARY not in everything_logged(caplog)


async def test_a_live_pod_without_a_report_or_with_an_unreadable_one_blocks_and_a_finished_or_deleted_pod_is_gone(
    kube_api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    double = kube_api.hooks()
    now = time.time()
    good = NodeReport(node="web-1", credential="db", current="v2", heartbeat=now)
    newer_agent = json.loads(good.to_json()) | {"node": "web-5", "added_by_a_newer_agent": {"x": 1}}

    def pod(name: str, phase: str, annotations: dict[str, str] | None = None, **meta: str) -> None:
        body = {"name": name, "namespace": NS, "labels": AGENT, "annotations": annotations or {}, **meta}
        double.put("pods", {"metadata": body, "status": {"phase": phase}})

    pod("web-1", "Running", {report_annotation("db"): good.to_json()})
    pod("web-2", "Running", {report_annotation("db"): '{"node": "web-2", "credential": "db", "current": '})
    pod("web-3", "Pending")  # starting: may be about to read the old version
    pod("web-4", "Running", {report_annotation("other"): good.to_json()})  # reported, but not on this credential
    pod("web-5", "Running", {report_annotation("db"): json.dumps(newer_agent)})
    pod("web-6", "Running", deletionTimestamp="2026-01-01T00:00:00Z")  # terminating: its containers still run
    pod("done-1", "Succeeded")
    pod("done-2", "Failed", {report_annotation("db"): '{"unreadable'})
    reporter = PodReporter(namespace=NS, selector="baton.io/agent=true", kubeconfig=kube_api.kubeconfig)
    try:
        collected = {r.node: r for r in await reporter.collect("db", "db")}
        assert sorted(collected) == ["web-1", "web-2", "web-3", "web-4", "web-5", "web-6"]
        assert collected["web-1"] == good
        assert collected["web-5"].current == "v2" and collected["web-5"].heartbeat == now  # extra field ignored
        for node in ("web-2", "web-3", "web-4", "web-6"):
            assert (collected[node].current, collected[node].heartbeat) == (None, 0.0), node

        def gate(reports: list[NodeReport]) -> Decision:
            return decide(old="v1", new="v2", reports=reports, known={r.node for r in reports}, now=now, ttl=60)

        blocked = gate(list(collected.values()))
        assert not blocked.retire
        for node in ("web-2", "web-3", "web-4", "web-6"):
            assert any(r.startswith(f"{node}: report is stale") for r in blocked.reasons), (node, blocked.reasons)
        assert not any(r.startswith(("web-1", "web-5", "done-")) for r in blocked.reasons), blocked.reasons

        # Deleted pods are gone with their reports; the rest now reports v2 and the gate opens.
        for name in ("web-2", "web-4", "web-6"):
            del double.objects[("pods", NS, name)]
        pod("web-3", "Running", {report_annotation("db"): replace(good, node="web-3").to_json()})
        after = await reporter.collect("db", "db")
        assert sorted(r.node for r in after) == ["web-1", "web-3", "web-5"]
        assert gate(after).retire, gate(after).reasons
    finally:
        await reporter.aclose()
    assert "unreadable pod report" in caplog.text


# ---------------------------------------------------------------- 3. rollout reload through the Reloader


def consumer(**cfg: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate(cfg)


def use_kubeconfig_env(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """As if the agent had been started with ``KUBECONFIG=path``, outside a cluster.

    RolloutAction has no store config: in a pod it uses the in-cluster config,
    elsewhere the kubeconfig that $KUBECONFIG names. kubernetes_asyncio reads
    $KUBECONFIG once, at import, so the test sets its default as well.
    """
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kube_config_module, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def rollout_consumer(name: str = "app") -> ConsumerConfig:
    return consumer(
        name="app",
        # Nothing on this node runs it: the workload lives on other nodes.
        match={"cmdline": r"baton-absent-app-\d{12}"},
        reload={"rollout": {"kind": "Deployment", "name": name, "namespace": NS, "timeout": "10s"}},
    )


async def test_a_batch_of_two_credentials_rolls_the_deployment_once_and_waits_for_it_without_a_local_process(
    kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    double = kube_api.hooks()
    use_kubeconfig_env(monkeypatch, kube_api.kubeconfig)
    double.put(
        "deployments",
        {
            "metadata": {"name": "app", "namespace": NS},
            "spec": {"replicas": 2, "template": {"metadata": {"labels": {"app": "app"}}}},
        },
    )
    app = rollout_consumer()
    made: list[Any] = []

    def factory(c: ConsumerConfig) -> Any:
        action = make_action(c)
        action.poll_interval = 0.05  # type: ignore[attr-defined]  # the default 2 s only slows the test
        made.append(action)
        return action

    reloader = Reloader({"db": [app], "api": [app]}, debounce=0.05, action_factory=factory)
    task = asyncio.create_task(reloader.run())
    try:
        reloader.changed("db", "v2")
        reloader.changed("api", "k2")
        await until(lambda: double.count("PATCH", "/deployments/app") == 1, timeout=5, what="the rollout patch")
        [action] = made
        assert isinstance(action, RolloutAction)
        assert (action.per_consumer, action.needs_process) == (True, False)
        dep = double.get("deployments", NS, "app")
        assert dep is not None
        assert RESTARTED_AT in dep["spec"]["template"]["metadata"]["annotations"]
        assert dep["spec"]["template"]["metadata"]["labels"] == {"app": "app"}
        # It polls and keeps waiting: the rollout is not available yet.
        polls = double.count("GET", "/deployments/app")
        await until(lambda: double.count("GET", "/deployments/app") >= polls + 3, timeout=5, what="status polls")
        assert reloader.status()["app"].running and reloader.status()["app"].result is None
        double.advance_rollout(NS, "app")
        await asyncio.wait_for(reloader.wait_idle(), 5)
        st = reloader.status()["app"]
        assert (st.result, st.credentials) == ("ok", frozenset({"db", "api"}))
        assert [r.pid for r in st.reloaded] == [0]  # called with no process
        assert double.count("PATCH", "/deployments/app") == 1
        patches = [r for r in double.requests if r.method == "PATCH"]
        assert [r.content_type for r in patches] == ["application/strategic-merge-patch+json"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_rollout_without_a_usable_client_config_fails_the_roll_as_a_reload_error(
    kube_api: KubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kube_api.hooks()
    use_kubeconfig_env(monkeypatch, tmp_path / "no-such-kubeconfig")
    reloader = Reloader({"db": [rollout_consumer()]}, debounce=0.01)
    task = asyncio.create_task(reloader.run())
    try:
        reloader.changed("db", "v2")
        await asyncio.wait_for(reloader.wait_idle(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    st = reloader.status()["app"]
    assert st.result == "failure"
    assert st.error is not None and "cannot load Kubernetes client config" in st.error
    # A mapped error, not an unexpected exception with a traceback.
    assert not [r for r in caplog.records if r.exc_info]


# ---------------------------------------------------------------- 4. container_restart through make_action

# pid 1 of a new PID namespace (the pod's pause/kubelet stand-in): starts the app,
# logs how each app process ended, and starts it again, as the kubelet would.
INIT = r"""
import os, sys
marker, mode, log = sys.argv[1], sys.argv[2], sys.argv[3]
APP = '''
import signal, sys, time
log, mode = sys.argv[2], sys.argv[3]
def on_term(signum, frame):
    with open(log, "a") as f:
        f.write("TERM\\n")
    if mode != "stubborn":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(log, "a") as f:
    f.write("READY\\n")
while True:
    time.sleep(1)
'''
def spawn():
    return os.posix_spawn(sys.executable, [sys.executable, "-c", APP, marker + "-app", log, mode], os.environ)
app = spawn()
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == app:
        with open(log, "a") as f:
            f.write(f"EXIT {os.waitstatus_to_exitcode(status)}\n")
        app = spawn()
"""


def _unshare_works() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_pid_namespace = pytest.mark.skipif(
    not _unshare_works(), reason="needs root and unshare --pid: a container's main process is a child of its init"
)


class Pod:
    """A PID namespace whose init runs a python sleeper as the 'container's main process'."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.marker = f"baton-wiring-{uuid.uuid4().hex[:10]}"
        self.mode = mode
        self.log = tmp_path / f"{self.marker}.log"
        self.script = tmp_path / f"{self.marker}.py"
        self.proc: asyncio.subprocess.Process | None = None
        self.match = MatchConfig(cmdline=re.escape(self.marker + "-app") + r"(\s|$)")

    def app_pids(self) -> list[int]:
        return find_processes(self.match)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    async def start(self) -> int:
        self.script.write_text(INIT)
        self.proc = await asyncio.create_subprocess_exec(
            "unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(self.script), self.marker, self.mode,
            str(self.log),
        )  # fmt: skip
        await until(lambda: self.lines().count("READY") == 1, timeout=10, what="the app to start")
        [pid] = await asyncio.to_thread(self.app_pids)
        return pid

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.proc.pid).children(recursive=True)
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
            await asyncio.to_thread(psutil.wait_procs, tree, 5)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


@pytest.fixture
async def pods(tmp_path: Path) -> AsyncIterator[Callable[[str], Pod]]:
    made: list[Pod] = []

    def make(mode: str) -> Pod:
        made.append(Pod(tmp_path, mode))
        return made[-1]

    yield make
    for p in made:
        await p.stop()


@needs_pid_namespace
async def test_container_restart_through_the_reloader_stops_the_main_process_with_sigterm_and_sees_the_new_one(
    pods: Callable[[str], Pod],
) -> None:
    pod = pods("polite")
    old = await pod.start()
    app = consumer(
        name="app",
        match=pod.match.model_dump(exclude_none=True),
        reload={"container_restart": {"timeout": 2}},
        health={"alive_for": "0.3s", "timeout": "5s"},
        min_restart_interval=0,
    )
    reloader = Reloader({"db": [app]}, debounce=0.02)
    task = asyncio.create_task(reloader.run())
    try:
        reloader.changed("db", "v2")
        await asyncio.wait_for(reloader.wait_idle(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    st = reloader.status()["app"]
    assert st.result == "ok", st.error
    [done] = st.reloaded
    assert done.pid == old and done.new_pid not in (None, old)
    assert pod.lines()[:3] == ["READY", "TERM", "EXIT 0"]  # SIGTERM, handled, clean exit
    assert not psutil.pid_exists(old) and done.new_pid in await asyncio.to_thread(pod.app_pids)


@needs_pid_namespace
async def test_container_restart_from_make_action_kills_a_main_process_that_ignores_sigterm_after_the_timeout(
    pods: Callable[[str], Pod],
) -> None:
    pod = pods("stubborn")
    old = await pod.start()
    action = make_action(
        consumer(name="app", match={"cmdline": pod.marker}, reload={"container_restart": {"timeout": 2}})
    )
    assert isinstance(action, ContainerRestartAction)
    assert (action.stop_signal, action.timeout, action.replaces) == (signal.SIGTERM, 2.0, True)
    t0 = time.monotonic()
    try:
        await action.reload(old)  # returns no pid: the kubelet (here: the namespace's init) starts the next one
    finally:
        await action.aclose()
    took = time.monotonic() - t0
    assert 2.0 <= took < 5.0, f"{took:.2f}s"
    # The init logs how the old process ended, then starts the next one.
    await until(lambda: pod.lines().count("READY") == 2, timeout=10, what="the replacement")
    assert pod.lines()[:4] == ["READY", "TERM", f"EXIT {-signal.SIGKILL}", "READY"]


# ---------------------------------------------------------------- 5. one rotator leads (Lease)


def rotator_config(kube_api: KubeApi, tmp_path: Path) -> Config:
    return parse_config(
        {
            "store": {"kind": "kubernetes", "namespace": NS, "kubeconfig": str(kube_api.kubeconfig)},
            "api": {"listen": "127.0.0.1:0"},
            "report": {"heartbeat": 1.0},
            "credentials": [
                {
                    "name": "db",
                    "key": "db",
                    "output": {"dir": str(tmp_path / "unused")},
                    "rotation": {"every": "1h", "max_draining": 1},  # the kubernetes store keeps one previous
                }
            ],
        }
    )


@pytest.mark.parametrize("releases", [True, False], ids=["stops-cleanly", "dies-holding-the-lease"])
async def test_two_rotators_on_one_lease_only_the_leader_rotates_and_the_other_takes_over_when_it_stops(
    kube_api: KubeApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    releases: bool,
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    seed_secret(double, "db", CANARY + "-0", **{CREATED: repr(time.time())})  # not due for an hour
    elections: list[sidecar.leader.LeaderElection] = []
    real = sidecar.leader.LeaderElection

    def fast(**kw: Any) -> sidecar.leader.LeaderElection:
        # The 15 s default lease is for a cluster; the protocol is the same at 1 s.
        le = real(**kw, lease_duration=1.0, renew_deadline=0.8, retry_period=0.2)
        elections.append(le)
        return le

    monkeypatch.setattr(sidecar.leader, "LeaderElection", fast)
    monkeypatch.setenv("BATON_LEASE_NAME", "baton-rotator")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    config = rotator_config(kube_api, tmp_path)

    async def start(pod: str) -> tuple[Rotator, asyncio.Task[int]]:
        monkeypatch.setenv("POD_NAME", pod)  # read once, at serve()
        r = Rotator(config, install_signals=False, serve_api=False)
        t = asyncio.create_task(r.serve(), name=f"rotator:{pod}")
        await until(lambda: r.ready.is_set() or t.done(), timeout=5, what=f"{pod} started")
        return r, t

    def outcome(r: Rotator) -> str | None:
        last = r.rotators["db"].last_outcome
        return last.result if last is not None else None

    overlap: list[float] = []

    async def watch_leaders() -> None:
        while True:
            if sum(e.is_leader for e in elections) > 1:
                overlap.append(time.monotonic())
            await asyncio.sleep(0.01)

    monitor = asyncio.create_task(watch_leaders())
    a, a_task = await start("rotator-a")
    b: Rotator | None = None
    b_task: asyncio.Task[int] | None = None
    try:
        await until(lambda: elections[0].is_leader, timeout=5, what="rotator-a to lead")
        b, b_task = await start("rotator-b")
        le_a, le_b = elections
        assert (le_a.identity, le_b.identity, le_a.namespace) == ("rotator-a", "rotator-b", NS)

        # Both are asked to rotate now; only the leader's schedule runs.
        a.rotate_now.set()
        b.rotate_now.set()
        await until(lambda: len(events(caplog, "rotated")) == 1, timeout=5, what="the leader's rotation")
        renewals = double.count("PUT", "/leases/baton-rotator")
        await until(lambda: double.count("PUT", "/leases/baton-rotator") >= renewals + 4, timeout=5, what="renewals")
        assert len(events(caplog, "rotated")) == 1
        assert outcome(a) == "rotated" and outcome(b) is None
        assert le_a.is_leader and not le_b.is_leader
        after_a = secret_value(double, "db")
        assert after_a != CANARY + "-0"
        b.rotate_now.clear()  # its request is stale; a new one comes after the takeover

        # The leader stops: cleanly (releases the lease), or as if killed (the lease must expire).
        le_a.release_on_stop = releases
        a.should_exit.set()
        # asyncio.wait, not wait_for: a stop that hangs must fail here, not hang in the cancel.
        await asyncio.wait({a_task}, timeout=5)
        assert a_task.done() and a_task.result() == 0, "the leader did not stop"
        stopped = time.monotonic()
        took = await until(lambda: le_b.is_leader, timeout=5, what="rotator-b to take over")
        if releases:
            assert took < 0.8, f"a released lease was taken after {took:.2f}s"
        else:
            assert time.monotonic() - stopped >= 0.8, "took over before the lease expired"
        lease = double.get("leases", NS, "baton-rotator")
        assert lease is not None and lease["spec"]["holderIdentity"] == "rotator-b"

        # No agent reports here, so a's superseded version would postpone b's rotation
        # (max_draining 1): retire it by hand, as the gate would once agents drained it.
        store = b.rotators["db"].store
        for v in await store.versions("db"):
            if not v.is_current and not v.retired and "pending" not in v.stages:
                await store.retire("db", v.id)
        b.rotate_now.set()
        await until(lambda: len(events(caplog, "rotated")) == 2, timeout=5, what="the new leader's rotation")
        assert outcome(b) == "rotated"
        assert secret_value(double, "db") not in (after_a, CANARY + "-0")
        assert len(events(caplog, "rotator_leading")) == 2  # a once, then b once
    finally:
        monitor.cancel()
        a.should_exit.set()
        if b is not None:
            b.should_exit.set()
        tasks = {t for t in (a_task, b_task) if t is not None}
        await asyncio.wait(tasks, timeout=5)
        assert all(t.done() for t in tasks), "a rotator did not stop"
    assert overlap == [], "two rotators led at the same time"
    assert CANARY not in everything_logged(caplog)
