"""Store outages seen from a running agent and a rotator, on real servers.

Owns the agent-level outage scenarios: moto_server stopped and started again
(AWS), OpenBao behind a fault proxy answering 503 or too slowly, the Kubernetes
double answering 5xx. During an outage the agent's files must stay exactly as
they were (same inodes, same bytes), and once the store is back a new version
must land within a few poll intervals. A rotator that evaluates retirement
while the store or the reporter fails must retire nothing. The ``Backoff``
sequence is checked at unit level. Outages are real (a stopped process, an
injected status code); durations of an outage are the scenario, never a
stand-in for synchronisation, which is always a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest

from daemon.agent.service import Agent
from daemon.config import Config, parse_config
from daemon.errors import StoreError, StoreUnavailable
from daemon.kit import metrics
from daemon.kit.backoff import Backoff
from daemon.model import Secret, VersionId
from daemon.providers.password import PasswordProvider
from daemon.report import open_reporter
from daemon.report.base import NodeReport, Reporter
from daemon.report.dynamodb import DynamoReporter
from daemon.report.metadata import MetadataReporter
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.aws import AwsStore
from daemon.stores.base import SecretStore
from daemon.stores.local import LocalStore
from daemon.stores.vault import VaultStore
from tests.fixtures.moto import MotoServer, _free_port
from tests.fixtures.vault import VaultTarget
from tests.helpers import everything_logged, running_agent, until

pytestmark = pytest.mark.integration

POLL = 0.3
# "About one poll interval": a few of them, plus the request in flight when the store healed.
PICKUP_DEADLINE = 4 * POLL + 1.0
KEY = "app/db"
CANARY = "outage-S3cr3t-5b1d0c"

# The agent does not yet learn about outages that a store's watch polls through
# (see the report of this test module); these tests state what it should do.


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: symlink targets, file inodes and bytes, dir inodes."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path), st.st_ino)
        elif path.is_file():
            out[rel] = ("file", st.st_ino, st.st_mtime_ns, path.read_bytes())
        else:
            out[rel] = ("dir", st.st_ino)
    return out


def store_errors(kind: str) -> float:
    """baton_store_errors_total summed over operations for one store kind."""
    total = 0.0
    for family in metrics.REGISTRY.collect():
        if family.name != "baton_store_errors":
            continue
        for sample in family.samples:
            if sample.name == "baton_store_errors_total" and sample.labels.get("store") == kind:
                total += sample.value
    return total


def agent_config(tmp_path: Path, store: Mapping[str, Any], *, key: str = KEY) -> Config:
    return parse_config(
        {
            "node_id": "node-outage",
            "store": dict(store),
            "api": {"listen": "127.0.0.1:0"},
            "report": {"heartbeat": 1.0},
            "agent": {
                "scan_interval": 0.5,
                "fanotify": "off",
                "debounce": 0.05,
                "retry_min": 0.1,
                "retry_max": 0.5,
            },
            "credentials": [{"name": "db", "key": key, "output": {"dir": str(tmp_path / "out"), "mode": "0400"}}],
        }
    )


def stable_value(tmp_path: Path) -> str:
    return (tmp_path / "out" / "value").read_text()


# ---------------------------------------------------------------- AWS (moto_server stopped and started)


async def test_an_aws_outage_keeps_the_files_and_a_restarted_store_delivers_the_next_version_within_a_poll(
    moto_outage: MotoServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_outage.url)
    v1 = str(uuid.uuid4())
    try:
        sm.create_secret(Name=KEY, SecretString=CANARY + "-1", ClientRequestToken=v1)
        config = agent_config(
            tmp_path,
            {
                "kind": "aws",
                "endpoint_url": moto_outage.url,
                "poll_interval": POLL,
                "timeout": 0.5,
                "max_attempts": 1,
            },
        )
        async with running_agent(Agent(config, install_signals=False)) as agent:
            state = agent.credentials["db"]
            assert state.version == v1 and stable_value(tmp_path) == CANARY + "-1"
            before = snapshot(tmp_path / "out")

            moto_outage.stop()
            await until(lambda: "store unreachable" in caplog.text, timeout=5, what="a failed poll")
            await asyncio.sleep(3 * POLL)  # the outage lasts a few more polls
            assert snapshot(tmp_path / "out") == before
            assert state.version == v1 and agent.ready.is_set()

            # A restarted moto_server is empty: put back the very same version
            # (same VersionId, same bytes), as a restored backup would.
            moto_outage.start()
            sm.create_secret(Name=KEY, SecretString=CANARY + "-1", ClientRequestToken=v1)
            await asyncio.sleep(2 * POLL)  # a few polls of the restored store
            assert snapshot(tmp_path / "out") == before, "the same version came back: nothing is rewritten"

            healed = time.monotonic()
            v2 = sm.put_secret_value(SecretId=KEY, SecretString=CANARY + "-2")["VersionId"]
            took = await until(lambda: state.version == v2, timeout=PICKUP_DEADLINE, what="version 2 on disk")
            assert stable_value(tmp_path) == CANARY + "-2"
            assert time.monotonic() - healed <= PICKUP_DEADLINE
            assert took <= PICKUP_DEADLINE
    finally:
        sm.close()
    assert CANARY not in everything_logged(caplog)


async def test_an_aws_outage_shows_in_the_status_and_the_store_error_counter(
    moto_outage: MotoServer, tmp_path: Path
) -> None:
    sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_outage.url)
    try:
        sm.create_secret(Name=KEY, SecretString=CANARY)
    finally:
        sm.close()
    config = agent_config(
        tmp_path,
        {"kind": "aws", "endpoint_url": moto_outage.url, "poll_interval": POLL, "timeout": 0.5, "max_attempts": 1},
    )
    async with running_agent(Agent(config, install_signals=False)) as agent:
        errors_before = store_errors("aws")
        moto_outage.stop()
        state = agent.credentials["db"]
        await until(lambda: state.store_error, timeout=6 * POLL + 2, what="the outage in the status")
        assert agent.status()["credentials"]["db"]["last_error"]
        assert CANARY not in str(agent.status())
        assert store_errors("aws") > errors_before
        moto_outage.start()  # a restarted moto_server is empty: put the same secret back
        sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_outage.url)
        try:
            sm.create_secret(Name=KEY, SecretString=CANARY)
        finally:
            sm.close()
        await until(lambda: state.store_error is None, timeout=6 * POLL + 2, what="the outage cleared")
        assert agent.status()["credentials"]["db"]["last_error"] is None


# ---------------------------------------------------------------- Vault (OpenBao, a fault proxy: 503, slow)


@pytest.fixture
def vault_env(vault_server: VaultTarget, vault_faults: object, monkeypatch: pytest.MonkeyPatch) -> VaultTarget:
    # vault_faults: the agent's and the rotator's stores go through the fault proxy.
    monkeypatch.setenv("VAULT_TOKEN", vault_server.baton_token())
    return vault_server


def vault_store_config(target: VaultTarget, **extra: Any) -> dict[str, Any]:
    return {"kind": "vault", "url": target.url, "mount": target.mount, "poll_interval": POLL, "timeout": 1.0, **extra}


async def test_a_vault_503_then_a_slow_vault_keep_the_files_and_the_next_version_lands_within_a_poll(
    vault_env: VaultTarget, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vault_env.write(KEY, {"value": CANARY + "-1"})
    config = agent_config(tmp_path, vault_store_config(vault_env))
    async with running_agent(Agent(config, install_signals=False)) as agent:
        state = agent.credentials["db"]
        assert state.version == "1" and stable_value(tmp_path) == CANARY + "-1"
        before = snapshot(tmp_path / "out")

        # Sealed: every request answers 503.
        vault_env.faults.fail_with(503)
        polls = vault_env.faults.count("GET", "metadata")
        faults = vault_env.faults
        await until(lambda: faults.count("GET", "metadata") >= polls + 3, timeout=5, what="three failed polls")
        assert snapshot(tmp_path / "out") == before

        # Slow: answers take 10 s, the client gives up after 1 s.
        vault_env.faults.clear()
        vault_env.faults.slow(10.0)
        polls = vault_env.faults.count("GET", "metadata")
        await until(lambda: faults.count("GET", "metadata") >= polls + 2, timeout=6, what="two timed-out polls")
        await until(lambda: "timed out" in everything_logged(caplog), timeout=3, what="a timeout in the log")
        assert snapshot(tmp_path / "out") == before
        assert state.version == "1" and agent.ready.is_set()

        # A new version written behind the outage (by another writer), then healthy again.
        vault_env.write(KEY, {"value": CANARY + "-2"})
        vault_env.faults.clear()  # healthy: the polls still held in the proxy are answered at once
        took = await until(lambda: state.version == "2", timeout=PICKUP_DEADLINE, what="version 2 on disk")
        assert stable_value(tmp_path) == CANARY + "-2"
        assert took <= PICKUP_DEADLINE
    assert CANARY not in everything_logged(caplog)


async def test_a_vault_outage_shows_in_the_status_and_the_store_error_counter(
    vault_env: VaultTarget, tmp_path: Path
) -> None:
    vault_env.write(KEY, {"value": CANARY})
    config = agent_config(tmp_path, vault_store_config(vault_env))
    async with running_agent(Agent(config, install_signals=False)) as agent:
        errors_before = store_errors("vault")
        vault_env.faults.fail_with(503)
        state = agent.credentials["db"]
        await until(lambda: state.store_error, timeout=6 * POLL + 2, what="the outage in the status")
        assert agent.status()["credentials"]["db"]["last_error"]
        assert CANARY not in str(agent.status())
        assert store_errors("vault") > errors_before
        vault_env.faults.clear()
        await until(lambda: state.store_error is None, timeout=6 * POLL + 2, what="the outage cleared")
        assert agent.status()["credentials"]["db"]["last_error"] is None


# ---------------------------------------------------------------- rotator during an outage


def rotation_config(store: Mapping[str, Any], tmp_path: Path) -> Config:
    return parse_config(
        {
            "node_id": "rotator",
            "store": dict(store),
            "report": {"heartbeat": 1.0},
            "credentials": [
                {
                    "name": "db",
                    "key": KEY,
                    "output": {"dir": str(tmp_path / "rot")},
                    "rotation": {"every": "1h", "generator": {"length": 16}},
                }
            ],
        }
    )


def rotator_for(config: Config, store: SecretStore, reporter: Reporter) -> CredentialRotator:
    cred = config.credential("db")
    assert cred.rotation is not None and cred.rotation.generator is not None
    return CredentialRotator(
        config=config,
        credential=cred,
        store=store,
        reporter=reporter,
        provider=PasswordProvider(cred.rotation.generator),
    )


async def heartbeat(reporter: Reporter, current: str, *, nodes: int = 2) -> None:
    for n in range(nodes):
        report = NodeReport(node=f"node-{n}", credential="db", current=current, heartbeat=time.time())
        await reporter.publish(KEY, report)


async def rotated_and_drained(rotator: CredentialRotator, reporter: Reporter, *, nodes: int = 2) -> tuple[str, str]:
    """v1 superseded by v2, every node reporting v2 current and nothing held: the gate is open."""
    # Seeded by hand: rotate() cannot start a key that does not exist on Vault or AWS yet
    # (store.versions raises StoreNotFound there; see the module's report).
    seed = await rotator.store.create(KEY, Secret(CANARY + "-seed"))
    await rotator.store.promote(KEY, seed.id)
    second = await rotator.rotate()
    assert second.result == "rotated" and second.version is not None, second
    first = seed.id
    await heartbeat(reporter, second.version, nodes=nodes)
    decisions = await rotator.evaluate()
    assert [(d.version, d.retire) for d in decisions] == [(first, True)], decisions
    return first, second.version


async def retire_during_outage(rotator: CredentialRotator) -> list[str]:
    """What one retirement pass does while something fails: it may raise, but retires nothing."""
    try:
        return await rotator.retire_ready()
    except StoreError:
        return []


class FailingAt:
    """Wraps a store and a reporter; the ``fail_at``-th call (0-based) raises StoreUnavailable."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls: list[str] = []

    def tick(self, name: str) -> None:
        self.calls.append(name)
        if len(self.calls) - 1 == self.fail_at:
            raise StoreUnavailable(f"injected outage at call {self.fail_at} ({name})")

    def wrap(self, target: Any, prefix: str) -> Any:
        outer = self

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(target, name)
                if not callable(attr) or name.startswith("_") or name == "watch":
                    return attr

                async def call(*args: Any, **kwargs: Any) -> Any:
                    outer.tick(f"{prefix}.{name}")
                    return await attr(*args, **kwargs)

                return call

        return Proxy()


async def test_a_store_or_reporter_error_at_any_call_of_a_retirement_pass_retires_nothing(tmp_path: Path) -> None:
    config = rotation_config({"kind": "local", "path": str(tmp_path / "store.db")}, tmp_path)
    real = LocalStore(tmp_path / "store.db")
    try:
        reporter = MetadataReporter(real)
        old, _new = await rotated_and_drained(rotator_for(config, real, reporter), reporter)
        faulted: list[str] = []
        for k in range(100):
            fault = FailingAt(fail_at=k)
            rotator = rotator_for(config, fault.wrap(real, "store"), fault.wrap(reporter, "reporter"))
            retired = await retire_during_outage(rotator)
            if k < len(fault.calls):  # the fault fired at call k of this pass
                faulted.append(fault.calls[k])
                assert retired == [], (k, fault.calls)
                assert not {v.id: v for v in await real.versions(KEY)}[VersionId(old)].retired, (k, fault.calls)
            else:
                assert retired == [old], "the control: the same pass without a fault retires"
                break
        else:
            raise AssertionError("every pass met a fault: the control never ran")
        assert "reporter.collect" in faulted and "store.retire" in faulted and "store.versions" in faulted
    finally:
        await real.aclose()


async def test_a_rotator_during_a_vault_outage_retires_nothing_and_retires_once_healthy(
    vault_env: VaultTarget, tmp_path: Path
) -> None:
    config = rotation_config(vault_store_config(vault_env, reports="status_path"), tmp_path)
    store = VaultStore.from_config(config)
    impatient = VaultStore(
        url=vault_env.url, mount=vault_env.mount, timeout=0.3, env={"VAULT_TOKEN": vault_env.baton_token()}
    )
    try:
        reporter = open_reporter(config, store)
        old, new = await rotated_and_drained(rotator_for(config, store, reporter), reporter)
        rotator = rotator_for(config, store, reporter)
        # Sealed for the whole pass, or for only its first one, two, three requests.
        for times in (None, 1, 2, 3):
            vault_env.faults.fail_with(503, times=times)
            assert await retire_during_outage(rotator) == []
            vault_env.faults.clear()
            assert not {v.id: v for v in await store.versions(KEY)}[VersionId(old)].retired, times
        # Slow: a rotator with a short client timeout gives up and retires nothing.
        slow = rotator_for(config, impatient, open_reporter(config, impatient))
        await impatient.versions(KEY)  # logged in while the server is fast
        vault_env.faults.slow(10.0)
        assert await retire_during_outage(slow) == []
        vault_env.faults.clear()
        assert not {v.id: v for v in await store.versions(KEY)}[VersionId(old)].retired
        assert rotator.retired_total == slow.retired_total == 0
        await heartbeat(reporter, new)  # the nodes kept heart-beating through the outage
        assert await rotator.retire_ready() == [old], rotator.last_decisions  # healthy again: retired
    finally:
        await impatient.aclose()
        await store.aclose()


async def test_a_rotator_whose_dynamodb_reporter_is_unreachable_retires_nothing(
    moto: MotoServer, tmp_path: Path
) -> None:
    config = rotation_config({"kind": "aws", "endpoint_url": moto.url, "poll_interval": POLL}, tmp_path)
    store = AwsStore(endpoint_url=moto.url, timeout=1.0, max_attempts=1)
    good = DynamoReporter(table="baton-reports", endpoint_url=moto.url, create_table=True, timeout=1.0)
    down = DynamoReporter(
        table="baton-reports", endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout=0.5, max_attempts=1
    )
    try:
        old, new = await rotated_and_drained(rotator_for(config, store, good), good)
        rotator = rotator_for(config, store, down)
        for _ in range(3):
            assert await retire_during_outage(rotator) == []
        assert rotator.retired_total == 0
        versions = {v.id: v for v in await store.versions(KEY)}
        assert not versions[VersionId(old)].retired and "draining" in versions[VersionId(old)].stages
        # The same pass with the reporter reachable (nodes still heart-beating) retires it.
        await heartbeat(good, new)
        healthy = rotator_for(config, store, good)
        assert await healthy.retire_ready() == [old], healthy.last_decisions
    finally:
        for closing in (store, good, down):
            await closing.aclose()


# ---------------------------------------------------------------- Backoff (unit level)


def test_backoff_delays_double_from_the_minimum_each_jittered_to_half_or_more() -> None:
    b = Backoff(0.1, 100.0)
    for n in range(8):
        base = 0.1 * 2**n
        delay = b.next()
        assert base * 0.5 <= delay <= base, (n, delay)


def test_backoff_caps_at_the_maximum_and_reset_starts_over() -> None:
    b = Backoff(1.0, 5.0)
    delays = [b.next() for _ in range(40)]
    assert all(d <= 5.0 for d in delays)
    assert all(d >= 2.5 for d in delays[3:])  # 1, 2, 4, then the cap of 5
    b.reset()
    assert 0.5 <= b.next() <= 1.0


def test_backoff_jitter_spreads_the_delays_of_many_agents() -> None:
    # Many agents failing at once must not retry in lock-step.
    delays = [Backoff(1.0, 300.0).next() for _ in range(200)]
    assert statistics.pstdev(delays) > 0.05
    assert min(delays) >= 0.5 and max(delays) <= 1.0


def test_backoff_uses_the_agents_retry_settings(tmp_path: Path) -> None:
    config = agent_config(tmp_path, {"kind": "local", "path": str(tmp_path / "s.db")})
    b = Backoff(config.agent.retry_min, config.agent.retry_max)
    seq = [b.next() for _ in range(10)]
    assert seq[0] <= 0.1 and max(seq) <= 0.5


# ---------------------------------------------------------------- Kubernetes double (5xx)


def kube_secret(name: str, value: str) -> dict[str, Any]:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"value": base64.b64encode(value.encode()).decode()},
    }


async def test_a_kubernetes_api_answering_5xx_keeps_the_files_and_the_next_version_lands_after_it(
    kube_api: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    double = kube_api.hooks()
    double.put("secrets", kube_secret("db", CANARY + "-1"))
    config = agent_config(
        tmp_path, {"kind": "kubernetes", "kubeconfig": str(kube_api.kubeconfig), "namespace": "default"}, key="db"
    )
    async with running_agent(Agent(config, install_signals=False)) as agent:
        state = agent.credentials["db"]
        first = state.version
        assert stable_value(tmp_path) == CANARY + "-1"
        before = snapshot(tmp_path / "out")

        # The API server drops every watch and answers the next requests with 503/500.
        double.fail(503, times=2)
        double.fail(500, times=1)
        double.end_watches()
        await until(
            lambda: all(f.remaining == 0 for f in double.faults),
            timeout=10,
            what="the injected 5xx answers to be used up",
        )
        assert snapshot(tmp_path / "out") == before and state.version == first
        assert "watch failed; retrying" in everything_logged(caplog)

        double.put("secrets", kube_secret("db", CANARY + "-2"))
        # The store's own backoff (0.5 s doubling, three failures) is what bounds the pickup here.
        await until(lambda: state.version != first, timeout=10, what="version 2 on disk")
        assert stable_value(tmp_path) == CANARY + "-2"
    assert CANARY not in everything_logged(caplog)
