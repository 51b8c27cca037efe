"""Packaging lint: Kubernetes manifests, the Dockerfile, and the configs they ship.

The linters (kubernetes-validate, checkov, hadolint) live in their own venv,
.venv-tools (``make tools``; ``make test`` creates it), because their pinned
dependencies clash with the main venv's. The tests skip, saying so, only when
that venv is missing. checkov runs with --skip-download and its platform
calls off, so nothing leaves this machine. No Docker engine is available:
the Dockerfile is linted, never built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import parse_config
from daemon.kit import metrics

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
TOOLS = REPO / ".venv-tools" / "bin"
# Kinds with no schema in kubernetes-validate: a CRD, and kustomize's own files.
SCHEMALESS = {"PrometheusRule", "Kustomization", "Component"}

needs_tools = pytest.mark.skipif(
    not (TOOLS / "checkov").exists(),
    reason=".venv-tools is missing: run `make tools` (make test creates it) to install checkov, hadolint, "
    "kubernetes-validate",
)


def _yaml_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def _docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in _yaml_files():
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _tool(name: str, *args: str, cwd: Path = REPO, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # checkov: no calls to its vendor's platform, no PyPI version check.
        "BC_SKIP_MAPPING": "TRUE",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE",
    }
    if tmp is not None:
        env["CKV_CACHE_DIR"] = str(tmp)
    return subprocess.run(
        [str(TOOLS / name), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False
    )


# ---------------------------------------------------------------- kubernetes-validate


@needs_tools
@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_every_manifest_validates_strictly_and_only_crds_lack_a_schema(version: str) -> None:
    # 1.29 is the first release with native sidecars (initContainers restartPolicy: Always) on by default.
    files = [str(p.relative_to(REPO)) for p in _yaml_files()]
    proc = _tool("kubernetes-validate", "--strict", "-k", version, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))], proc.stdout
    skipped = {m.group(1) for line in lines if (m := re.search(r"Couldn't find schema for kind (\w+)", line))}
    assert skipped == SCHEMALESS, proc.stdout
    passed = [line for line in lines if " passed for resource " in line]
    assert len(passed) == len([d for d in _docs() if d["kind"] not in SCHEMALESS])


# ---------------------------------------------------------------- checkov / hadolint


def _checkov_reports(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


@needs_tools
@pytest.mark.slow
def test_checkov_finds_no_failed_check_in_the_manifests_and_every_skip_gives_a_reason(tmp_path: Path) -> None:
    proc = _tool("checkov", "-d", "manifests", "--skip-download", "-o", "json", tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = _checkov_reports(proc)
    assert {r["check_type"] for r in reports} >= {"kubernetes"}
    for report in reports:
        assert report["summary"]["failed"] == 0, report["results"]["failed_checks"]
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 100
        for skip in report["results"]["skipped_checks"]:
            # The only accepted skip: digests cannot be known before the image is built.
            assert skip["check_id"] == "CKV_K8S_43"
            assert len(skip["check_result"].get("suppress_comment", "")) > 20


@needs_tools
@pytest.mark.slow
def test_checkov_finds_no_failed_check_in_the_dockerfile(tmp_path: Path) -> None:
    proc = _tool("checkov", "-f", "Dockerfile", "--skip-download", "-o", "json", tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = _checkov_reports(proc)
    assert report["check_type"] == "dockerfile"
    assert report["summary"]["failed"] == 0
    assert report["summary"]["skipped"] == 0
    assert report["summary"]["passed"] > 10


@needs_tools
def test_hadolint_is_clean_down_to_style_level() -> None:
    proc = _tool("hadolint", "--failure-threshold", "style", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_dockerfile_pins_its_base_runs_as_non_root_and_checks_healthz() -> None:
    text = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(bases) == 2
    assert len(set(bases)) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", bases[0])
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, flags=re.M)
    assert "'.[all]'" in text
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    # Deny by default: a new top-level directory (a venv, a store.db) never leaks into the image.
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*"


# ---------------------------------------------------------------- kustomize


KUBECTL = shutil.which("kubectl")


def _kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomization_builds_every_manifest_but_the_optional_component(tmp_path: Path) -> None:
    built = {(d["kind"], d["metadata"]["name"]) for d in _kustomize(MANIFESTS)}
    on_disk = {(d["kind"], d["metadata"]["name"]) for d in _docs() if d["kind"] not in {"Kustomization", "Component"}}
    base = {k for k in on_disk if not k[1].endswith("-rollout")}
    assert built == base
    assert ("Role", "baton-agent-rollout") not in built

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, overlay)],
                "components": [os.path.relpath(MANIFESTS / "components" / "rollout", overlay)],
            }
        )
    )
    with_rollout = {(d["kind"], d["metadata"]["name"]) for d in _kustomize(overlay)}
    assert with_rollout - built == {("Role", "baton-agent-rollout"), ("RoleBinding", "baton-agent-rollout")}


# ---------------------------------------------------------------- what the manifests promise


def _pod(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment", name)["spec"]["template"]["spec"]
    return spec


def _all_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name in ("example-app", "baton-rotator"):
        pod = _pod(name)
        out += [(f"{name}/{c['name']}", c) for c in pod.get("initContainers", []) + pod["containers"]]
    return out


def test_the_sidecar_is_native_and_gates_the_app_on_readyz() -> None:
    pod = _pod("example-app")
    assert pod["shareProcessNamespace"] is True
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["args"][:1] == ["agent"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_UID": "metadata.uid",
        "NODE_NAME": "spec.nodeName",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["credentials"]["emptyDir"]["medium"] == "Memory"
    (app,) = pod["containers"]
    mounts = {m["name"]: m for m in app["volumeMounts"]}
    assert mounts["credentials"]["readOnly"] is True
    # Only the sidecar gets an API token.
    assert pod["automountServiceAccountToken"] is False
    assert "baton-token" not in mounts
    # Same UID: what lets the sidecar see and signal the app without capabilities.
    assert sidecar["securityContext"]["runAsUser"] == app["securityContext"]["runAsUser"]


@pytest.mark.parametrize("where", [name for name, _ in _all_containers()])
def test_every_container_is_locked_down_and_sized(where: str) -> None:
    container = dict(_all_containers())[where]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert "livenessProbe" in container
    assert "readinessProbe" in container
    image = container["image"]
    assert not image.endswith(":latest")
    assert re.search(r":\d+\.\d+\.\d+", image) or "@sha256:" in image


def test_rbac_names_every_secret_it_may_read_or_change() -> None:
    for role in (_one("Role", "baton-agent"), _one("Role", "baton-rotator")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            if "secrets" in rule["resources"] and rule["verbs"] != ["create"]:
                assert rule["resourceNames"], rule
    agent = _one("Role", "baton-agent")
    secret_verbs = {v for r in agent["rules"] if "secrets" in r["resources"] for v in r["verbs"]}
    assert secret_verbs == {"get", "list", "watch"}
    assert not [r for r in agent["rules"] if "deployments" in r["resources"]]
    rollout = _one("Role", "baton-agent-rollout")
    assert rollout["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["example-app"],
            "verbs": ["get", "patch"],
        }
    ]
    rotator = _one("Role", "baton-rotator")
    lease_verbs = {v for r in rotator["rules"] if "leases" in r["resources"] for v in r["verbs"]}
    assert lease_verbs == {"get", "create", "update"}
    assert _one("Deployment", "baton-rotator")["spec"]["replicas"] == 2


def test_the_shipped_baton_configs_load_with_daemon_config() -> None:
    app = parse_config(yaml.safe_load(_one("ConfigMap", "example-app-baton")["data"]["baton.yaml"]))
    assert app.store.kind == "kubernetes"
    assert app.api.listen == "0.0.0.0:8787"
    assert [c.name for c in app.credentials] == ["db"]
    rotator = parse_config(yaml.safe_load(_one("ConfigMap", "baton-rotator")["data"]["rotator.yaml"]))
    (cred,) = rotator.credentials
    assert cred.rotation is not None
    # The alert threshold and max_drain must agree.
    expr = next(
        r["expr"]
        for g in _one("PrometheusRule", "baton")["spec"]["groups"]
        for r in g["rules"]
        if r["alert"] == "BatonRetirementPendingTooLong"
    )
    assert f"> {int(cred.rotation.max_drain)}" in expr


def test_every_alert_uses_metrics_that_baton_exports() -> None:
    exported: set[str] = set()
    for family in metrics.REGISTRY.collect():
        exported.add(family.name)
        if family.type == "counter":
            exported.add(family.name + "_total")
    rules = [r for g in _one("PrometheusRule", "baton")["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"BatonRotationFailing", "BatonRetirementPendingTooLong", "BatonStoreErrors"}
    for rule in rules:
        used = set(re.findall(r"\b(baton_[a-z_]+)", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
