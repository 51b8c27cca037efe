"""Pod identity from the downward API, and the rollout availability rule."""

from __future__ import annotations

import pytest

from daemon.errors import ConfigError
from sidecar.identity import PodIdentity
from sidecar.rollout import rollout_done

ENV = {"POD_NAME": "api-7d9f", "POD_NAMESPACE": "shop", "POD_UID": "u-1", "NODE_NAME": "worker-3"}


def test_identity_reads_the_downward_api_and_the_node_id_is_the_pod_name() -> None:
    ident = PodIdentity.from_env(ENV)
    assert (ident.name, ident.namespace, ident.uid, ident.node_name) == ("api-7d9f", "shop", "u-1", "worker-3")
    assert ident.node_id == "api-7d9f"


def test_a_missing_downward_api_variable_is_a_config_error_naming_it_and_its_field() -> None:
    env = {k: v for k, v in ENV.items() if k not in ("POD_UID", "NODE_NAME")}
    with pytest.raises(ConfigError) as info:
        PodIdentity.from_env(env)
    assert len(info.value.problems) == 2
    assert "POD_UID" in info.value.problems[0] and "metadata.uid" in info.value.problems[0]
    assert "NODE_NAME" in info.value.problems[1] and "spec.nodeName" in info.value.problems[1]


def dep(
    *, gen: int = 2, observed: int = 2, replicas: int = 3, updated: int = 3, available: int = 3
) -> dict[str, object]:
    return {
        "metadata": {"generation": gen},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "updatedReplicas": updated, "availableReplicas": available},
    }


@pytest.mark.parametrize(
    ("obj", "done"),
    [
        (dep(), True),
        (dep(observed=1), False),  # the controller has not seen the patch yet
        (dep(updated=2), False),
        (dep(available=2), False),
        (dep(replicas=0, updated=0, available=0), True),
    ],
)
def test_a_rollout_is_done_when_observed_updated_and_available(obj: dict[str, object], done: bool) -> None:
    assert rollout_done(obj, generation=2) is done


def test_a_daemonset_rollout_compares_with_the_desired_number_scheduled() -> None:
    ds = {
        "status": {
            "observedGeneration": 5,
            "desiredNumberScheduled": 4,
            "updatedNumberScheduled": 4,
            "numberAvailable": 3,
        }
    }
    assert not rollout_done(ds, generation=5, kind="DaemonSet")
    ds["status"]["numberAvailable"] = 4
    assert rollout_done(ds, generation=5, kind="DaemonSet")
