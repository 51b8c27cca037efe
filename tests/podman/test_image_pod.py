"""The image and the Pod, for real (issue 17 item 5): the Dockerfile built with podman and run as a Pod.

A ``podman pod`` sharing the PID and IPC namespaces (the host's network, so
both containers reach the apiserver double on loopback) is the Pod of
manifests/app-deployment.yaml: the Baton sidecar from the image, with the
downward-API identity environment, non-root (10001), read-only root file
system, no capabilities; and the app, started only once the sidecar's
``/readyz`` answers (the native-sidecar order). The sidecar must see the app's
open fd across the containers, report the holder on its own Pod's annotation,
and reload the apps on a rotation: one by signal, the other by a restart of
its container (``container_restart``; podman's restart policy starts it again). The image's entrypoint, user and
healthcheck must be what the manifests expect.

Slow: the first build takes minutes (the base rootfs, then pip installs every
extra), and a change under daemon/ or sidecar/ means a new build, so only
``make test-podman`` builds; ``make test`` runs these when the image of the
very sources is built already, else they skip (tests/podman/image.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from daemon.model import Secret
from daemon.report.base import NodeReport
from daemon.stores.kubernetes import KubernetesStore, version_of
from sidecar.podreport import report_annotation
from tests.doubles.kubernetes import KubeDouble
from tests.podman.image import ROOT, CannotRun, baton_image, image_built, podman, why_not

pytestmark = [pytest.mark.podman, pytest.mark.slow]

NS = "baton-demo"
V1_VALUE = "podman-pod-canary-v1-51c9"  # secret values: never in a container's output
V2_VALUE = "podman-pod-canary-v2-a7e3"
APP = """
# MARKER: holds its credential file open; SIGHUP reopens it
import hashlib, signal, sys, time
PATH = "/run/baton/db/password"
held = [open(PATH)]
def reload(*_):
    new = open(PATH)
    held[0].close()
    held[0] = new
    print("reloaded", hashlib.sha256(new.read().encode()).hexdigest()[:8], flush=True)
signal.signal(signal.SIGHUP, reload)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("started", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image() -> str:
    if (why := why_not()) is not None:
        pytest.skip(why)
    # Building takes minutes (the pip install of every extra), and any change under daemon/ or
    # sidecar/ means a new build: only `make test-podman` (BATON_PODMAN=1) builds; otherwise the
    # tests run when the image of these very sources is already built, and skip saying so.
    if given := os.environ.get("BATON_PODMAN_IMAGE"):  # an image built already (of other sources, say)
        return given
    if not os.environ.get("BATON_PODMAN") and not image_built():
        pytest.skip("the image of these sources is not built: make test-podman builds it (minutes)")
    try:
        return baton_image()
    except CannotRun as e:
        pytest.skip(f"cannot build the image here: {e}")


def _manifest_sidecar() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "app-deployment.yaml").read_text()))
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers"] if c.get("restartPolicy") == "Always")


def test_the_image_entrypoint_user_and_healthcheck_are_what_the_manifests_expect(image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    sidecar = _manifest_sidecar()
    assert config["Entrypoint"] == ["baton"] and "command" not in sidecar
    assert config["Cmd"] == sidecar["args"] == ["agent", "--config", "/etc/baton/baton.yaml"]
    ctx = sidecar["securityContext"]
    assert config["User"] == f"{ctx['runAsUser']}:{ctx['runAsGroup']}" == "10001:10001"
    port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "baton-api")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    health = " ".join(info["Healthcheck"]["Test"])  # podman keeps it beside Config (docker format only)
    assert f"http://127.0.0.1:{port}/healthz" in health
    assert f"{port}/tcp" in config.get("ExposedPorts", {})
    # It runs read-only, as 10001, with nothing added.
    proc = podman("run", "--rm", "--read-only", "--cap-drop", "ALL", "--entrypoint", "id", image)
    assert proc.stdout.split()[0] == "uid=10001(baton)"
    proc = podman("run", "--rm", "--read-only", "--cap-drop", "ALL", image, "--help")
    assert "agent" in proc.stdout
    print(f"image {image}: {int(info['Size']) / 1e6:.0f} MB")


@pytest.fixture
async def double() -> AsyncIterator[KubeDouble]:
    d = KubeDouble()
    await d.start()
    yield d
    await d.close()


@pytest.fixture
def pod_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cfg, out = tmp_path / "etc-baton", tmp_path / "run-baton"
    cfg.mkdir()
    out.mkdir()
    os.chown(out, 10001, 10001)  # the emptyDir the sidecar writes (fsGroup in the manifests)
    tmp_path.chmod(0o755)
    yield cfg, out
    shutil.rmtree(out, ignore_errors=True)


def _pod(name: str) -> None:
    podman("pod", "create", "--name", name, "--network", "host", "--share", "pid,ipc,net")


async def _until(cond: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_a_pod_of_the_sidecar_and_the_app_sees_the_apps_fd_and_reloads_it_by_signal(
    image: str, double: KubeDouble, pod_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, out = pod_dirs
    name = f"baton-pod-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    double.put(
        "secrets",
        {
            "metadata": {"name": "app-db", "namespace": NS},
            "data": {"value": base64.b64encode(V1_VALUE.encode()).decode()},
        },
    )
    double.put(
        "pods",
        {"metadata": {"name": name, "namespace": NS, "uid": "u1", "labels": {"baton.io/agent": "true"}}},
    )
    (cfg / "kubeconfig").write_text(double.kubeconfig(namespace=NS))
    # The projected service account volume of the manifests: the sidecar's namespace comes from it.
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text(NS)
    account.chmod(0o755)
    (account / "namespace").chmod(0o644)
    config = {
        "store": {"kind": "kubernetes", "kubeconfig": "/etc/baton/kubeconfig", "reports": "pod"},
        "api": {"listen": f"127.0.0.1:{port}"},
        "report": {"heartbeat": 1.0},
        "agent": {"scan_interval": 0.5, "fanotify": "off", "debounce": 0.05, "state_dir": "/tmp/baton-state"},
        "credentials": [
            {
                "name": "db",
                "key": "app-db",
                "output": {"dir": "/run/baton/db", "mode": "0440", "files": {"password": "{{ value }}"}},
                "consumers": [
                    {
                        "name": "app",
                        "match": {"cmdline": "baton-signal-app"},
                        "loads": "on-reload",
                        "reload": {"signal": "SIGHUP"},
                    },
                    {
                        "name": "restarted",
                        "match": {"cmdline": "baton-restart-app"},
                        "loads": "at-start",
                        "reload": {"container_restart": {"timeout": 10}},
                    },
                ],
            }
        ],
    }
    (cfg / "baton.yaml").write_text(yaml.safe_dump(config))
    for f in cfg.iterdir():
        f.chmod(0o644)
    cfg.chmod(0o755)
    common = ["--pod", name, "--user", "10001:10001", "--read-only", "--cap-drop", "ALL"]
    common += ["--security-opt", "no-new-privileges"]
    identity = [f"--env=POD_NAME={name}", f"--env=POD_NAMESPACE={NS}", "--env=POD_UID=u1", "--env=NODE_NAME=node-1"]
    _pod(name)
    try:
        podman(
            "run", "-d", "--name", f"{name}-baton", *common, *identity, "--tmpfs", "/tmp",
            "-v", f"{cfg}:/etc/baton:ro", "-v", f"{out}:/run/baton",
            "-v", f"{account}:/var/run/secrets/kubernetes.io/serviceaccount:ro", image,
        )  # fmt: skip

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await _until(ready, timeout=60, what="the sidecar's /readyz")
        # Only now the app (the native sidecar's order): its credential is in place.
        podman(
            "run", "-d", "--name", f"{name}-app", *common, "-v", f"{out}:/run/baton:ro",
            "--entrypoint", "python", image, "-c", APP.replace("MARKER", "baton-signal-app"),
        )  # fmt: skip
        # A second app that reads its credential only at start: reloaded by a restart of its
        # container (the action stops the container's main process; podman starts it again).
        podman(
            "run", "-d", "--name", f"{name}-restarted", *common, "--restart", "always",
            "-v", f"{out}:/run/baton:ro", "--entrypoint", "python", image, "-c",
            APP.replace("MARKER", "baton-restart-app"),
        )  # fmt: skip
        v1, v2 = version_of(V1_VALUE), version_of(V2_VALUE)

        def report() -> NodeReport | None:
            pod = double.get("pods", NS, name)
            text = ((pod or {}).get("metadata", {}).get("annotations") or {}).get(report_annotation("db"))
            return NodeReport.from_json(text) if text else None

        async def holds(version: str, consumer: str = "app") -> bool:
            r = report()
            return r is not None and any(
                h.version == version and h.consumer == consumer and h.how == "fd" for h in r.holders
            )

        async def both_hold_v1() -> bool:
            return await holds(v1) and await holds(v1, "restarted")

        await _until(both_hold_v1, timeout=60, what="the sidecar to report both apps' fds of v1")

        # A rotation, as the rotator makes it: the sidecar writes v2 and SIGHUPs the app.
        store = KubernetesStore(namespace=NS, kubeconfig=cfg / "kubeconfig")
        try:
            info = await store.create("app-db", Secret(V2_VALUE))
            await store.promote("app-db", info.id)
        finally:
            await store.aclose()
        assert info.id == v2

        async def reloaded() -> bool:
            r = report()
            both = await holds(v2) and await holds(v2, "restarted")
            return both and r is not None and not any(h.version == v1 for h in r.holders)

        await _until(reloaded, timeout=90, what="both apps to hold v2 only")
        logs = podman("logs", f"{name}-app").stdout
        assert logs.count("started") == 1 and "reloaded" in logs  # signalled, not restarted
        restarted = podman("logs", f"{name}-restarted").stdout
        assert restarted.count("started") == 2 and "reloaded" not in restarted  # restarted, not signalled
        sidecar = podman("logs", f"{name}-baton")
        everything = logs + restarted + sidecar.stdout + sidecar.stderr
        assert V1_VALUE not in everything and V2_VALUE not in everything
    finally:
        with contextlib.suppress(OSError):
            print("--- readyz:", urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3).read()[:2000])
        for c in ("baton", "app", "restarted"):  # shown when the test fails: what each container said
            logs = podman("logs", f"{name}-{c}", check=False)
            print(f"--- {c}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        podman("pod", "rm", "-f", name, check=False, timeout=120)
