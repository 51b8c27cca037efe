"""Rotation limits that protect live credentials: provider slots, and reporters whose silence means gone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.model import Secret
from daemon.providers.password import PasswordProvider
from daemon.report.base import Holder, NodeReport
from daemon.report.metadata import MetadataReporter, fit
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.local import LocalStore


def make_config(tmp_path: Path, max_draining: int = 3):
    return parse_config(
        {
            "node_id": "rotator",
            "store": {"kind": "local", "path": str(tmp_path / "s.db")},
            "report": {"heartbeat": 1},
            "credentials": [
                {
                    "name": "db",
                    "key": "k",
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": 60, "max_draining": max_draining},
                }
            ],
        }
    )


class TwoSlots(PasswordProvider):
    """A password provider that, like alternating users, has two slots."""

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.slots = 2


class Vanishing(MetadataReporter):
    """A reporter for which a missing report means the node is gone (as for Pods)."""

    absent_means_gone = True


@pytest.fixture
async def store(tmp_path: Path):
    s = LocalStore(tmp_path / "s.db", watch_files=False)
    yield s
    await s.aclose()


def rotator(config, store, *, provider=None, reporter=None) -> CredentialRotator:  # type: ignore[no-untyped-def]
    cred = config.credentials[0]
    return CredentialRotator(
        config=config,
        credential=cred,
        store=store,
        reporter=reporter or MetadataReporter(store),
        provider=provider or PasswordProvider(cred.rotation.generator),
    )


async def test_a_two_slot_provider_postpones_while_one_superseded_version_drains_even_if_max_draining_allows_more(
    tmp_path: Path, store: LocalStore
) -> None:
    config = make_config(tmp_path, max_draining=3)
    r = rotator(config, store, provider=TwoSlots(config.credentials[0].rotation.generator))
    assert r.max_draining == 1
    assert (await r.rotate()).result == "rotated"  # v1: first version
    assert (await r.rotate()).result == "rotated"  # v2: v1 now drains in the other slot
    outcome = await r.rotate()
    assert outcome.result == "postponed"  # v3 would reuse v1's slot while v1 is still in use
    unbounded = rotator(config, store)
    assert unbounded.max_draining == 3
    assert (await unbounded.rotate()).result == "rotated"


async def test_a_node_whose_report_vanishes_is_gone_for_a_pod_reporter_but_unknown_for_store_metadata(
    tmp_path: Path, store: LocalStore
) -> None:
    config = make_config(tmp_path)
    plain = rotator(config, store)
    await plain.rotate()
    await plain.rotate()
    current = next(v.id for v in await store.versions("k") if v.is_current)
    now = time.time()
    for node in ("a", "b"):
        await plain.reporter.publish("k", NodeReport(node=node, credential="db", current=current, heartbeat=now))
    assert [d.retire for d in await plain.evaluate()] == [True]
    await store.merge_metadata("k", {"baton.node.b": None})  # b's report disappears
    decisions = await plain.evaluate()
    assert [d.retire for d in decisions] == [False]
    assert any("b: no report" in reason for reason in decisions[0].reasons)
    pods = rotator(config, store, reporter=Vanishing(store))
    assert [d.retire for d in await pods.evaluate()] == [True]
    assert await pods.known_nodes() == {"a"}


def test_a_report_is_trimmed_to_the_store_value_limit_by_dropping_holder_summaries_not_counts() -> None:
    holders = tuple(
        Holder(pid=1000 + i, exe="/usr/bin/app" * 3, consumer="api", how="fd", version="7") for i in range(10)
    )
    report = NodeReport(node="n", credential="db", current="8", in_use={"7": 10}, holders=holders, heartbeat=1.0)
    assert len(report.to_json()) > 512
    text = fit(report, 512)
    assert len(text.encode()) <= 512
    back = NodeReport.from_json(text)
    assert back.in_use == {"7": 10}
    assert 0 < len(back.holders) < 10
    assert fit(report, None) == report.to_json()


async def test_a_secret_value_never_shows_in_outcomes(tmp_path: Path, store: LocalStore) -> None:
    config = make_config(tmp_path)
    r = rotator(config, store)
    outcome = await r.rotate()
    value = (await store.read("k")).payload.reveal()
    assert value not in repr(outcome)
    assert isinstance((await store.read("k")).payload, Secret)


def test_min_drain_holds_a_version_that_was_superseded_too_recently() -> None:
    from daemon.rotation.gate import decide

    report = NodeReport(node="n", credential="db", current="2", heartbeat=100.0)
    young = decide(old="1", new="2", reports=[report], known=(), now=100.0, ttl=90, superseded_for=3, min_drain=10)
    assert not young.retire and "min_drain" in young.reasons[0]
    old = decide(old="1", new="2", reports=[report], known=(), now=100.0, ttl=90, superseded_for=11, min_drain=10)
    assert old.retire
