"""The rotator's ``certificate`` generator on the Kubernetes store: a TLS Secret pods mount.

Against the apiserver double (tests/doubles/kubernetes.py), which keeps the API's
rules for Secret types: ``type`` is immutable and a ``kubernetes.io/tls``
Secret must have the ``tls.crt`` and ``tls.key`` keys. A rotator mints a
certificate from a local CA twice; the main Secret is ``kubernetes.io/tls`` with
a matching pair, and an agent following it renders the files. The store's
staging companions stay ``Opaque`` (their data is cleared at retire), which the
double would refuse for a TLS Secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agent.service import Agent
from daemon.config import parse_config
from daemon.errors import PayloadError
from daemon.kit import x509
from daemon.model import Secret
from daemon.rotation.service import Rotator
from daemon.stores.kubernetes import PENDING_SUFFIX, PREVIOUS_SUFFIX, TLS_TYPE, KubernetesStore
from tests.doubles.kubernetes import KubeDouble
from tests.fixtures.kube import KubeApi
from tests.fixtures.pki import LocalCa
from tests.helpers import everything_logged, running_agent, until

pytestmark = pytest.mark.integration

CANARY = "kube-cert-canary-3b9e"  # a secret value: must never reach a log line


def _decoded(obj: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


def _tls(cert: str = "CERT", key: str = CANARY) -> Secret:
    return Secret(json.dumps({"tls.crt": cert, "tls.key": key, "ca.crt": "CA"}))


@pytest.fixture
async def store(kube_api: KubeApi) -> AsyncIterator[KubernetesStore]:
    s = KubernetesStore(namespace=kube_api.namespace, kubeconfig=kube_api.kubeconfig, backoff=(0.02, 0.2))
    yield s
    await s.aclose()


def _seed(double: KubeDouble, ns: str, name: str, data: dict[str, str], kind: str) -> None:
    enc = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    double.put("secrets", {"metadata": {"name": name, "namespace": ns}, "type": kind, "data": enc})


async def test_the_double_refuses_what_the_api_refuses_for_a_tls_secret(kube_api: KubeApi) -> None:
    """The rules the store's tests rely on: type immutable, both keys present (empty values pass)."""
    double = kube_api.hooks()
    from kubernetes_asyncio import client, config

    ns, name = kube_api.namespace, kube_api.name("tls")
    async with await config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        core = client.CoreV1Api(c)

        async def status(call: Any) -> int:
            resp = await call
            code = int(resp.status)
            resp.release()
            return code

        body = {"metadata": {"name": name}, "type": TLS_TYPE, "data": {"tls.crt": ""}}
        assert await status(core.create_namespaced_secret(ns, body, _preload_content=False)) == 422
        body["data"] = {"tls.crt": "", "tls.key": ""}
        assert await status(core.create_namespaced_secret(ns, body, _preload_content=False)) == 201
        cleared = {"metadata": {"name": name}, "type": TLS_TYPE, "data": {}}
        assert await status(core.replace_namespaced_secret(name, ns, cleared, _preload_content=False)) == 422
        opaque = {"metadata": {"name": name}, "type": "Opaque", "data": {"tls.crt": "", "tls.key": ""}}
        assert await status(core.replace_namespaced_secret(name, ns, opaque, _preload_content=False)) == 422
    obj = double.get("secrets", ns, name)
    assert obj is not None and obj["type"] == TLS_TYPE


async def test_a_tls_payload_makes_a_tls_secret_whose_companions_stay_opaque_and_retire_clears(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    double = kube_api.hooks()
    ns, key = kube_api.namespace, kube_api.name("web-tls")
    v1 = await store.create(key, _tls("CERT-1"))
    await store.promote(key, v1.id)
    v2 = await store.create(key, _tls("CERT-2"))
    pending = double.get("secrets", ns, key + PENDING_SUFFIX)
    assert pending is not None and pending["type"] == "Opaque"
    await store.promote(key, v2.id)
    main = double.get("secrets", ns, key)
    assert main is not None and main["type"] == TLS_TYPE
    assert _decoded(main)["tls.crt"] == "CERT-2"
    # v1 moved to the previous companion; retiring it clears the data (refused were it TLS-typed).
    await store.retire(key, v1.id)
    previous = double.get("secrets", ns, key + PREVIOUS_SUFFIX)
    assert previous is not None and previous["type"] == "Opaque" and not previous["data"]
    assert [v.id for v in await store.versions(key) if v.retired] == [v1.id]

    # A version without both keys would be refused by the API in a TLS Secret: refused before
    # anything is written, with a message naming the type and no value; the current one stays.
    with pytest.raises(PayloadError) as e:
        await store.create(key, Secret(json.dumps({"password": CANARY})))
    assert TLS_TYPE in str(e.value) and CANARY not in str(e.value)
    assert double.get("secrets", ns, key + PENDING_SUFFIX) is None
    assert (await store.read(key)).id == v2.id


async def test_an_existing_opaque_secret_keeps_its_type_through_a_tls_rotation(
    kube_api: KubeApi, store: KubernetesStore
) -> None:
    double = kube_api.hooks()
    ns, key = kube_api.namespace, kube_api.name("legacy")
    _seed(double, ns, key, {"value": "old"}, "Opaque")
    v = await store.create(key, _tls())
    await store.promote(key, v.id)  # a type change would be a 422 from the double
    main = double.get("secrets", ns, key)
    assert main is not None and main["type"] == "Opaque" and _decoded(main)["tls.key"] == CANARY


async def test_a_rotator_with_the_certificate_generator_rotates_a_tls_secret_an_agent_renders(
    kube_api: KubeApi, local_ca: LocalCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = kube_api.hooks()
    ns, key = kube_api.namespace, kube_api.name("web-tls")
    store = {"kind": "kubernetes", "namespace": ns, "kubeconfig": str(kube_api.kubeconfig)}
    generator = {
        "kind": "certificate",
        "issuer": {"kind": "local-ca", "cert_file": str(local_ca.cert_file), "key_file": str(local_ca.key_file)},
        "common_name": "web.example.test",
        "alt_names": ["localhost"],
        "ttl": "1h",
    }
    rotator = Rotator(
        parse_config(
            {
                "node_id": "rotator",
                "store": store,
                "report": {"heartbeat": 0.5},
                "credentials": [
                    {
                        "name": "web",
                        "key": key,
                        "output": {"dir": str(tmp_path / "unused")},
                        # Due at once (no Secret yet), then when asked.
                        "rotation": {"every": "1h", "max_draining": 1, "generator": generator},
                    }
                ],
            }
        ),
        install_signals=False,
        serve_api=False,
    )
    out = tmp_path / "out"
    agent_config = parse_config(
        {
            "node_id": "node-1",
            "store": store,
            "api": {"listen": "127.0.0.1:0"},
            "report": {"heartbeat": 0.5},
            "agent": {"scan_interval": 0.5, "fanotify": "off", "debounce": 0.05, "retry_min": 0.1, "retry_max": 0.5},
            "credentials": [
                {
                    "name": "web",
                    "key": key,
                    "output": {
                        "dir": str(out),
                        "files": {"tls.crt": "{{ certificate }}\n{{ ca_chain }}\n", "tls.key": "{{ private_key }}"},
                    },
                }
            ],
        }
    )

    def secret() -> dict[str, str]:
        obj = double.get("secrets", ns, key)
        assert obj is not None and obj["type"] == TLS_TYPE, obj and obj["type"]
        return _decoded(obj)

    def rotated() -> int:
        return len([r for r in caplog.records if getattr(r, "event", None) == "rotated"])

    task = asyncio.create_task(rotator.serve())
    try:
        await until(lambda: rotated() >= 1, timeout=15, what="the first rotation")
        first = secret()
        async with running_agent(Agent(agent_config, install_signals=False)):
            await until(
                lambda: (out / "tls.key").exists() and (out / "tls.key").read_text() == first["tls.key"].rstrip("\n"),
                timeout=10,
                what="the agent to render the first certificate",
            )
            rotator.rotate_now.set()
            await until(lambda: rotated() >= 2, timeout=15, what="the second rotation")
            second = secret()
            assert second["tls.key"] != first["tls.key"]
            await until(
                lambda: (out / "tls.key").read_text() == second["tls.key"].rstrip("\n"),
                timeout=10,
                what="the agent to render the second certificate",
            )
            rendered_crt, rendered_key = (out / "tls.crt").read_text(), (out / "tls.key").read_text()
    finally:
        rotator.should_exit.set()
        await asyncio.wait({task}, timeout=15)
    assert task.done(), "the rotator did not stop"

    # What pods mount: tls.crt is leaf + chain, tls.key its key, issued by the CA.
    for data in (first, second):
        leaf = data["tls.crt"][: data["tls.crt"].index("-----END CERTIFICATE-----") + 26]
        x509.check_issued(
            certificate=leaf,
            private_key=data["tls.key"],
            chain=[data["tls.crt"][len(leaf) :]],
            trust=[local_ca.pem],
            names=["web.example.test", "localhost"],
            now=time.time(),
        )
    # The rendered files are the second pair, and a matching one.
    leaf = rendered_crt[: rendered_crt.index("-----END CERTIFICATE-----") + 26]
    checked = x509.check_issued(
        certificate=leaf,
        private_key=rendered_key,
        chain=[rendered_crt[len(leaf) :]],
        trust=[local_ca.pem],
        now=time.time(),
    )
    assert second["tls.crt"].startswith(leaf) and checked.serial == second["serial_number"]
    logged = everything_logged(caplog)
    for data in (first, second):
        assert data["tls.key"].strip() not in logged
