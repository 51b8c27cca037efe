"""The kubernetes-events notification sink: a core/v1 Event on this Pod per notice (the Kubernetes double,
or a real cluster when ``KUBECONFIG`` is set)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from daemon.config import KubernetesEventsNotifyConfig
from daemon.kit.logs import event
from daemon.notify.hub import Notifier
from sidecar.events import KubeEventsSink
from tests.fixtures.kube import KubeApi

pytestmark = pytest.mark.integration
log = logging.getLogger("tests.notify.kube")


async def _events(kube_api: KubeApi) -> list[dict[str, Any]]:
    from kubernetes_asyncio import client, config

    async with await config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        resp = await client.CoreV1Api(c).list_namespaced_event(kube_api.namespace, _preload_content=False)
        try:
            items = json.loads(await resp.read())["items"]
        finally:
            resp.release()
    return [i for i in items if i.get("involvedObject", {}).get("name") == "rotator-7f9c"]


async def test_a_notice_becomes_an_event_on_the_rotators_pod(
    kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in {
        "POD_NAME": "rotator-7f9c",
        "POD_NAMESPACE": kube_api.namespace,
        "POD_UID": "0f1e2d3c-aaaa-bbbb-cccc-000000000001",
        "NODE_NAME": "worker-1",
    }.items():
        monkeypatch.setenv(var, value)
    spec = KubernetesEventsNotifyConfig(kind="kubernetes-events", kubeconfig=kube_api.kubeconfig)
    sink = KubeEventsSink(spec)
    notifier = Notifier([(sink, spec)], node="n1", role="rotator")
    notifier.start()
    try:
        event(log, "rotation_failed", logging.ERROR, credential="db", step="apply", error="HTTP 500", token="tok-9")
        event(log, "rotated", credential="db", version="8")
        deadline = time.monotonic() + 20
        while len(found := await _events(kube_api)) < 2:
            assert time.monotonic() < deadline, "no event was created"
            await asyncio.sleep(0.05)
    finally:
        await notifier.aclose()
    by_reason = {e["reason"]: e for e in found}
    failed, rotated = by_reason["RotationFailed"], by_reason["Rotated"]
    assert failed["type"] == "Warning" and rotated["type"] == "Normal"
    assert failed["involvedObject"]["kind"] == "Pod" and failed["involvedObject"]["uid"].endswith("000000000001")
    assert failed["message"] == "baton rotator on n1: rotation_failed db (step=apply, error=HTTP 500)"
    assert failed["source"] == {"component": "baton-rotator", "host": "worker-1"}
    assert "tok-9" not in json.dumps(found)
