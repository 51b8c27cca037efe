"""The rotator's retirement, driven by hypothesis through random histories on a real LocalStore.

Rules: rotate (sometimes failing at a step), a node publishes a report, time
passes (reports go stale), a node's report disappears, a node is forgotten, the
rotator crashes and restarts on the same store file, and retire_ready() runs.
The test keeps its own model of versions, reports and remembered nodes, and
never calls the gate: after every retire_ready() the versions the rotator
retired must be exactly those the model allows (safety: never one still in use
or with a node unknown, stale or behind; liveness: every one that is free).
Wall time seen by the workflow is a fake clock, so staleness is exact.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
import time
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from daemon.config import Config
from daemon.errors import ProviderError
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret
from daemon.providers.base import Provider, Session
from daemon.providers.password import PasswordProvider
from daemon.report.base import REPORT_PREFIX, Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation import workflow
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.local import LocalStore

T = TypeVar("T")
KEY = "app/db"
NODES = ("n1", "n2")
TTL = 30.0
MAX_DRAINING = 2


class Clock:
    """Stands in for the ``time`` module inside daemon.rotation.workflow."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class NodeByNodeReporter(MetadataReporter):
    """The metadata reporter plus ``collect_nodes``, so the rotator's quick check between
    full collects (re-reading only the nodes that blocked) is part of every history."""

    async def collect_nodes(self, key: str, credential: str, nodes: Sequence[str]) -> list[NodeReport]:
        wanted = set(nodes)
        return [r for r in await self.collect(key, credential) if r.node in wanted]


class FailOnce(Provider):
    """The password provider, failing one chosen step on the next rotation only."""

    def __init__(self, inner: PasswordProvider) -> None:
        self.inner = inner
        self.fail: str | None = None
        self.slots = inner.slots

    def _check(self, step: str) -> None:
        if self.fail == step:
            raise ProviderError(f"{step} failed (test)")

    async def create(self, *, current: Secret | None) -> Secret:
        self._check("create")
        return await self.inner.create(current=current)

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        self._check("apply")

    async def test(self, new: Secret) -> None:
        self._check("test")

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        await self.inner.retire(old)

    async def sessions(self, old: Secret) -> list[Session]:
        return await self.inner.sessions(old)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Report:
    current: str | None
    in_use: dict[str, int]
    heartbeat: float


@dataclass
class Model:
    current: str = "1"
    pending: str | None = None
    superseded: list[str] = field(default_factory=list)
    retired: set[str] = field(default_factory=set)
    ever_current: list[str] = field(default_factory=lambda: ["1"])
    next_id: int = 2
    reports: dict[str, Report] = field(default_factory=dict)
    # Nodes this rotator object has seen a report from (it forgets them when it restarts;
    # after that only the report records say who is known).
    remembered: set[str] = field(default_factory=set)

    def all_ids(self) -> list[str]:
        return [str(i) for i in range(1, self.next_id)]


class RotationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="baton-gate-"))
        self.loop = asyncio.new_event_loop()
        # Ahead of the store's own (real) creation times, so "superseded for" is never negative.
        self.clock = Clock(time.time() + 3600.0)
        self.patch = mock.patch.object(workflow, "time", self.clock)
        self.patch.start()
        self.config = Config.model_validate(
            {
                "node_id": "rotator",
                "store": {"kind": "local", "path": str(self.dir / "store.db")},
                "report": {"heartbeat": 10, "ttl": TTL, "max_holders": 2},
                "credentials": [
                    {
                        "name": "db",
                        "key": KEY,
                        "output": {"dir": str(self.dir / "out")},
                        "rotation": {"every": 3600, "max_draining": MAX_DRAINING},
                    }
                ],
            }
        )
        self.model = Model()
        self._open()
        self.store.put_sync(KEY, Secret("initial-value-0123"))

    def _open(self) -> None:
        self.store = LocalStore(self.dir / "store.db", watch_files=False)
        cred = self.config.credentials[0]
        assert cred.rotation is not None and cred.rotation.generator is not None
        self.provider = FailOnce(PasswordProvider(cred.rotation.generator))
        self.rotator = CredentialRotator(
            config=self.config,
            credential=cred,
            store=self.store,
            reporter=NodeByNodeReporter(self.store),
            provider=self.provider,
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.aclose())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            self.patch.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ rules

    @initialize(nodes=st.lists(st.sampled_from(NODES), unique=True))
    def a_first_rotation_and_some_nodes_on_it(self, nodes: list[str]) -> None:
        """Start where retirement is in question: version 1 superseded by 2, some nodes already on 2."""
        self.rotate(None)
        for node in nodes:
            self.publish_up_to_date(node)

    @rule(fail=st.sampled_from([None, None, "create", "apply", "test"]))
    def rotate(self, fail: str | None) -> None:
        m = self.model
        self.provider.fail = fail
        outcome = self.run(self.rotator.rotate())
        self.provider.fail = None

        if m.pending is None and len(m.superseded) >= MAX_DRAINING:
            assert outcome.result == "postponed", outcome
            return
        if m.pending is None:
            if fail == "create":
                assert (outcome.result, outcome.step) == ("failed", "create"), outcome
                return
            m.pending = str(m.next_id)
            m.next_id += 1
        if fail in ("apply", "test"):
            # A resumed rotation never calls create, so only apply/test can fail it.
            assert (outcome.result, outcome.step, outcome.version) == ("failed", fail, None), outcome
            return
        assert (outcome.result, outcome.version) == ("rotated", m.pending), outcome
        m.superseded.append(m.current)
        m.current = m.pending
        m.ever_current.append(m.current)
        m.pending = None

    @rule(node=st.sampled_from(NODES), data=st.data())
    def publish(self, node: str, data: st.DataObject) -> None:
        m = self.model
        # Mostly the newest version: nodes catch up fast, and that is where retirement is decided.
        current = data.draw(st.sampled_from([m.current, m.current, None, *m.ever_current]), label="current")
        in_use = data.draw(st.dictionaries(st.sampled_from(m.all_ids()), st.integers(1, 3), max_size=2), label="in_use")
        self._publish(node, current, in_use)

    @rule(node=st.sampled_from(NODES))
    def publish_up_to_date(self, node: str) -> None:
        self._publish(node, self.model.current, {})

    @precondition(lambda self: bool(self.model.superseded))
    @rule(node=st.sampled_from(NODES), data=st.data())
    def publish_still_holding_an_old_version(self, node: str, data: st.DataObject) -> None:
        old = data.draw(st.sampled_from(self.model.superseded), label="old")
        self._publish(node, self.model.current, {old: data.draw(st.integers(1, 3), label="holders")})

    @precondition(lambda self: bool(self.model.reports))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        """A node publishes the same state again, with a fresh heartbeat."""
        node = data.draw(st.sampled_from(sorted(self.model.reports)), label="node")
        last = self.model.reports[node]
        self._publish(node, last.current, last.in_use)

    def _publish(self, node: str, current: str | None, in_use: dict[str, int]) -> None:
        holders = [
            Holder(pid=100 + i, exe="/usr/bin/app", consumer="app", how="fd", version=v)
            for v, n in sorted(in_use.items())
            for i in range(n)
        ]
        report = NodeReport(
            node=node,
            credential="db",
            current=current,
            in_use=in_use,
            holders=tuple(holders[: self.config.report.max_holders]),
            heartbeat=self.clock.now,
            agent_version="test",
        )
        self.run(MetadataReporter(self.store).publish(KEY, report))
        self.model.reports[node] = Report(current, dict(in_use), self.clock.now)

    @rule(seconds=st.sampled_from([1.0, 10.0, TTL - 1, TTL, TTL + 1, 100.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(seconds=st.sampled_from([1.0, TTL, TTL + 1]))
    def time_passes_and_the_rotator_looks(self, seconds: float) -> None:
        """The retire loop runs on its own schedule: right after time moves is the edge that matters."""
        self.time_passes(seconds)
        self.retire_ready()

    @precondition(lambda self: bool(self.model.reports))
    @rule(data=st.data())
    def report_disappears(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.model.reports)), label="node")
        self.run(self.store.merge_metadata(KEY, {REPORT_PREFIX + node: None}))
        del self.model.reports[node]

    @precondition(lambda self: bool(self.model.reports))
    @rule(data=st.data())
    def report_becomes_unreadable(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.model.reports)), label="node")
        self.run(self.store.merge_metadata(KEY, {REPORT_PREFIX + node: '{"node": "truncated'}))
        # The rotator reads it as a report of a node it cannot hear: stale from the start.
        self.model.reports[node] = Report(current=None, in_use={}, heartbeat=-math.inf)

    @rule(node=st.sampled_from(NODES))
    def forget(self, node: str) -> None:
        self.run(self.rotator.forget(node))
        self.model.reports.pop(node, None)
        self.model.remembered.discard(node)

    @rule()
    def rotator_crashes_and_restarts(self) -> None:
        self.run(self.store.aclose())
        self._open()
        self.model.remembered = set()

    @rule()
    def retire_ready(self) -> None:
        m = self.model
        now = self.clock.now
        if m.superseded:
            m.remembered |= set(m.reports)
        known = m.remembered | set(m.reports)
        unknown = sorted(n for n in known if n not in m.reports)
        stale = sorted(n for n, r in m.reports.items() if now - r.heartbeat > TTL)
        behind = sorted(n for n, r in m.reports.items() if r.current != m.current)

        retired = self.run(self.rotator.retire_ready())

        for v in retired:
            # Safety, one condition at a time so a failure says which one broke.
            assert v in m.superseded, f"retired {v}, which is not superseded (model {m})"
            assert m.reports, f"retired {v} with no report at all"
            assert not unknown, f"retired {v} while {unknown} are known but have no report"
            assert not stale, f"retired {v} while the reports of {stale} are stale"
            assert not behind, f"retired {v} while {behind} are not on {m.current}"
            users = sorted(n for n, r in m.reports.items() if r.in_use.get(v, 0))
            assert not users, f"retired {v} while {users} report it in use"
        free = (
            []
            if (unknown or stale or behind or not m.reports)
            else [v for v in m.superseded if not any(r.in_use.get(v, 0) for r in m.reports.values())]
        )
        # Liveness: every version the model finds free is retired now.
        assert sorted(retired) == sorted(free), f"expected {free} retired, got {retired}"
        for v in retired:
            m.superseded.remove(v)
            m.retired.add(v)

    # ------------------------------------------------------------ invariants

    @invariant()
    def the_store_agrees_with_the_model(self) -> None:
        m = self.model
        got = {v.id: (frozenset(v.stages), v.retired) for v in self.store.versions_sync(KEY)}
        expected: dict[str, tuple[frozenset[str], bool]] = {}
        for v in m.all_ids():
            if v == m.current:
                expected[v] = (frozenset([CURRENT]), False)
            elif v == m.pending:
                expected[v] = (frozenset([PENDING]), False)
            elif v in m.retired:
                expected[v] = (frozenset(), True)
            else:
                # The version superseded last is "previous"; older ones carry no stage.
                last = m.superseded and m.ever_current[-2] == v
                expected[v] = (frozenset([PREVIOUS]) if last else frozenset(), False)
        assert got == expected

    @invariant()
    def the_retired_payloads_are_gone_and_the_current_one_is_readable(self) -> None:
        assert self.store.read_sync(KEY).id == self.model.current

    @invariant()
    def the_known_nodes_are_the_report_records(self) -> None:
        assert self.run(self.rotator.known_nodes()) == set(self.model.reports)


RotationMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRetirementGateOverRandomHistories = RotationMachine.TestCase
