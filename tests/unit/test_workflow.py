"""daemon.rotation.workflow.CredentialRotator on a real LocalStore (SQLite in tmp_path).

Covers the first rotation, failed steps that leave the current version alone
and resume the same pending payload, a crash at every step boundary (the
rotator and the store object are thrown away in between), postponement while
versions drain, node bookkeeping (forget), retirement through the provider, and
that no secret value reaches a log record, an Outcome or a Decision.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path

import pytest

from daemon.config import Config, GeneratorConfig
from daemon.errors import ProviderError, StoreUnavailable
from daemon.kit import metrics
from daemon.model import CURRENT, PENDING, PREVIOUS, Secret, VersionId
from daemon.providers.base import Provider, Session
from daemon.providers.password import PasswordProvider
from daemon.report.base import REPORT_PREFIX, Holder, NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation import workflow
from daemon.rotation.ledger import superseded
from daemon.rotation.workflow import LAST_KEY, STATE_KEY, CredentialRotator, Outcome
from daemon.stores.local import LocalStore

KEY = "app/db"
EVERY = 3600.0


class FlakyProvider(Provider):
    """The password generator, failing chosen steps a chosen number of times, and recording calls."""

    def __init__(self, fail: Mapping[str, int] | None = None) -> None:
        self.inner = PasswordProvider(GeneratorConfig(length=24))
        self.fail = dict(fail or {})
        self.created: list[Secret] = []
        self.applied: list[tuple[Secret, Secret | None]] = []
        self.tested: list[Secret] = []
        self.retired: list[Secret] = []
        self.session_list: list[Session] = []
        self.sessions_fail = False
        self.slots: int | None = None

    def _maybe_fail(self, step: str) -> None:
        if self.fail.get(step, 0) > 0:
            self.fail[step] -= 1
            raise ProviderError(f"{step} refused by the test provider")

    async def create(self, *, current: Secret | None) -> Secret:
        self._maybe_fail("create")
        new = await self.inner.create(current=current)
        self.created.append(new)
        return new

    async def apply(self, new: Secret, *, current: Secret | None) -> None:
        self.applied.append((new, current))
        self._maybe_fail("apply")

    async def test(self, new: Secret) -> None:
        self.tested.append(new)
        self._maybe_fail("test")

    async def retire(self, old: Secret, *, keep: Collection[str] = ()) -> None:
        self._maybe_fail("retire")
        self.retired.append(old)

    async def sessions(self, old: Secret) -> list[Session]:
        if self.sessions_fail:
            raise ProviderError("cannot reach the database")
        return list(self.session_list)

    async def aclose(self) -> None:
        return None


class FlakyStore(LocalStore):
    """A real LocalStore whose promote, or the bookkeeping write after it, fails a chosen number of times."""

    fail_promote = 0
    fail_last_write = 0

    async def promote(self, key: str, version: VersionId) -> None:
        if self.fail_promote > 0:
            self.fail_promote -= 1
            raise StoreUnavailable("local store: database is locked (test)")
        await super().promote(key, version)

    async def merge_metadata(self, key: str, entries: Mapping[str, str | None]) -> None:
        if LAST_KEY in entries and self.fail_last_write > 0:
            self.fail_last_write -= 1
            raise StoreUnavailable("local store: disk I/O error (test)")
        await super().merge_metadata(key, entries)


def make_config(tmp_path: Path, *, max_draining: int = 1, name: str = "db") -> Config:
    return Config.model_validate(
        {
            "node_id": "rotator-1",
            "store": {"kind": "local", "path": str(tmp_path / "store.db")},
            "report": {"heartbeat": 10, "ttl": 30},
            "credentials": [
                {
                    "name": name,
                    "key": KEY,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": EVERY, "max_draining": max_draining},
                }
            ],
        }
    )


def make_rotator(config: Config, store: LocalStore, provider: FlakyProvider) -> CredentialRotator:
    return CredentialRotator(
        config=config,
        credential=config.credentials[0],
        store=store,
        reporter=MetadataReporter(store),
        provider=provider,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    s = FlakyStore(tmp_path / "store.db", watch_files=False)
    try:
        yield s
    finally:
        await s.aclose()


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


async def publish(
    store: LocalStore, node: str, *, current: str | None, holding: tuple[str, ...] = (), age: float = 0.0
) -> None:
    holders = tuple(Holder(1000 + i, "/usr/bin/app", "app", "fd", v) for i, v in enumerate(holding))
    in_use: dict[str, int] = {}
    for v in holding:
        in_use[v] = in_use.get(v, 0) + 1
    report = NodeReport(
        node=node,
        credential="db",
        current=current,
        in_use=in_use,
        holders=holders,
        heartbeat=time.time() - age,
        agent_version="test",
    )
    await MetadataReporter(store).publish(KEY, report)


def stages(store: LocalStore) -> dict[str, set[str]]:
    return {v.id: set(v.stages) for v in store.versions_sync(KEY)}


# ---------------------------------------------------------------- rotate


async def test_the_first_rotation_creates_and_promotes_a_version(tmp_path: Path, store: FlakyStore) -> None:
    config = make_config(tmp_path)
    provider = FlakyProvider()
    rotator = make_rotator(config, store, provider)
    before = sample("baton_rotations_total", credential="db", result="success")

    outcome = await rotator.rotate()

    assert outcome == Outcome("rotated", version="1")
    assert stages(store) == {"1": {CURRENT}}
    assert (await store.read(KEY)).payload == provider.created[0]
    assert provider.applied == [(provider.created[0], None)]
    meta = await store.read_metadata(KEY)
    assert STATE_KEY not in meta
    assert abs(float(meta[LAST_KEY]) - time.time()) < 60
    assert abs(await rotator.due_at() - (float(meta[LAST_KEY]) + EVERY)) < 1e-6
    assert sample("baton_rotations_total", credential="db", result="success") == before + 1


async def test_a_rotation_is_due_at_once_when_nothing_is_current(tmp_path: Path, store: FlakyStore) -> None:
    rotator = make_rotator(make_config(tmp_path), store, FlakyProvider())

    assert abs(await rotator.due_at() - time.time()) < 5


async def test_a_second_rotation_passes_the_current_payload_to_the_provider(tmp_path: Path, store: FlakyStore) -> None:
    await store.put(KEY, Secret("first-value-0000"))
    provider = FlakyProvider()

    outcome = await make_rotator(make_config(tmp_path), store, provider).rotate()

    assert outcome == Outcome("rotated", version="2")
    assert stages(store) == {"1": {PREVIOUS}, "2": {CURRENT}}
    assert provider.applied == [(provider.created[0], Secret("first-value-0000"))]


@pytest.mark.parametrize("step", ["apply", "test"])
async def test_a_failed_provider_step_leaves_current_alone_and_a_later_run_resumes_the_same_payload(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture, step: str
) -> None:
    caplog.set_level(logging.INFO)
    await store.put(KEY, Secret("first-value-0000"))
    provider = FlakyProvider(fail={step: 1})
    rotator = make_rotator(make_config(tmp_path), store, provider)
    failures = sample("baton_rotation_failures_total", credential="db", step=step)
    failed_total = sample("baton_rotations_total", credential="db", result="failure")

    outcome = await rotator.rotate()

    assert outcome.result == "failed"
    assert outcome.step == step
    assert outcome.error == f"{step} refused by the test provider"
    assert rotator.last_outcome == outcome
    assert (await store.read(KEY)).payload == Secret("first-value-0000")
    assert stages(store) == {"1": {CURRENT}, "2": {PENDING}}
    assert sample("baton_rotation_failures_total", credential="db", step=step) == failures + 1
    assert sample("baton_rotations_total", credential="db", result="failure") == failed_total + 1
    [failed] = events(caplog, "rotation_failed")
    assert failed.levelno == logging.ERROR
    assert failed.step == step  # type: ignore[attr-defined]

    outcome = await rotator.rotate()

    assert outcome == Outcome("rotated", version="2")
    assert len(provider.created) == 1  # resumed, not minted again
    assert stages(store) == {"1": {PREVIOUS}, "2": {CURRENT}}
    assert (await store.read(KEY)).payload == provider.created[0]
    assert [new for new, _ in provider.applied] == [provider.created[0]] * 2
    assert all(cur == Secret("first-value-0000") for _, cur in provider.applied)
    assert len(events(caplog, "rotation_resumed")) == 1


# Where a crash at each step leaves the store, and what a restarted rotator finds.
CRASHES = {
    # step: (pending left behind, recorded step)
    "create": (False, None),
    "apply": (True, "created"),
    "test": (True, "applied"),
    "promote": (True, "tested"),
}


@pytest.mark.parametrize("step", list(CRASHES))
async def test_a_crash_at_any_step_is_resumed_by_a_new_rotator_on_a_new_store_object(
    tmp_path: Path, store: FlakyStore, step: str
) -> None:
    config = make_config(tmp_path)
    await store.put(KEY, Secret("first-value-0000"))
    provider = FlakyProvider(fail={step: 1} if step != "promote" else {})
    store.fail_promote = 1 if step == "promote" else 0
    failures = sample("baton_rotation_failures_total", credential="db", step=step)

    outcome = await make_rotator(config, store, provider).rotate()

    assert (outcome.result, outcome.step) == ("failed", step)
    assert sample("baton_rotation_failures_total", credential="db", step=step) == failures + 1
    assert (await store.read(KEY)).payload == Secret("first-value-0000")
    left_pending, recorded = CRASHES[step]
    assert stages(store) == ({"1": {CURRENT}, "2": {PENDING}} if left_pending else {"1": {CURRENT}})
    meta = await store.read_metadata(KEY)
    assert LAST_KEY not in meta
    if recorded is None:
        assert STATE_KEY not in meta
    else:
        assert json.loads(meta[STATE_KEY])["step"] == recorded
        assert json.loads(meta[STATE_KEY])["version"] == "2"

    # The process dies: a new store object on the same file, a new rotator, a new provider.
    restarted_store = LocalStore(tmp_path / "store.db", watch_files=False)
    try:
        restarted = FlakyProvider()
        outcome = await make_rotator(config, restarted_store, restarted).rotate()

        assert outcome == Outcome("rotated", version="2")
        assert stages(restarted_store) == {"1": {PREVIOUS}, "2": {CURRENT}}
        promoted = (await restarted_store.read(KEY)).payload
        if left_pending:
            assert restarted.created == []  # the same pending payload, not a second one
            assert promoted == provider.created[0]
        else:
            assert promoted == restarted.created[0]
        assert restarted.applied == [(promoted, Secret("first-value-0000"))]
        assert restarted.tested == [promoted]
        assert STATE_KEY not in await restarted_store.read_metadata(KEY)
    finally:
        await restarted_store.aclose()


async def test_a_crash_after_promotion_does_not_make_the_next_rotation_due_at_once(
    tmp_path: Path, store: FlakyStore
) -> None:
    config = make_config(tmp_path)
    store.fail_last_write = 1
    rotator = make_rotator(config, store, FlakyProvider())

    outcome = await rotator.rotate()

    # The version was promoted; only the bookkeeping after it failed.
    assert (outcome.result, outcome.step) == ("failed", "promote")
    assert stages(store) == {"1": {CURRENT}}
    created = store.versions_sync(KEY)[0].created
    assert abs(await rotator.due_at() - (created + EVERY)) < 1e-6


async def test_a_provider_that_keeps_failing_never_touches_current_nor_piles_up_pending(
    tmp_path: Path, store: FlakyStore
) -> None:
    await store.put(KEY, Secret("first-value-0000"))
    provider = FlakyProvider(fail={"test": 5})
    rotator = make_rotator(make_config(tmp_path), store, provider)

    outcomes = [await rotator.rotate() for _ in range(5)]

    assert {(o.result, o.step) for o in outcomes} == {("failed", "test")}
    assert stages(store) == {"1": {CURRENT}, "2": {PENDING}}
    assert len(provider.created) == 1
    assert (await rotator.rotate()) == Outcome("rotated", version="2")


# ---------------------------------------------------------------- postponement


async def test_a_rotation_is_postponed_while_max_draining_versions_wait(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await store.put(KEY, Secret("first-value-0000"))
    provider = FlakyProvider()
    rotator = make_rotator(make_config(tmp_path), store, provider)
    assert (await rotator.rotate()).result == "rotated"
    postponed = sample("baton_rotations_total", credential="db", result="postponed")

    outcome = await rotator.rotate()

    assert outcome == Outcome("postponed", error="1 version(s) still draining")
    assert len(provider.created) == 1
    assert stages(store) == {"1": {PREVIOUS}, "2": {CURRENT}}
    assert sample("baton_rotations_total", credential="db", result="postponed") == postponed + 1
    [record] = events(caplog, "rotation_postponed")
    assert record.draining == ["1"]  # type: ignore[attr-defined]
    assert record.max_draining == 1  # type: ignore[attr-defined]

    # Once the old version is retired, the slot is free again.
    await publish(store, "node-a", current="2")
    assert await rotator.retire_ready() == ["1"]
    assert (await rotator.rotate()) == Outcome("rotated", version="3")


async def test_with_two_draining_slots_a_second_rotation_runs_and_a_third_waits(
    tmp_path: Path, store: FlakyStore
) -> None:
    await store.put(KEY, Secret("first-value-0000"))
    rotator = make_rotator(make_config(tmp_path, max_draining=2), store, FlakyProvider())

    results = [(await rotator.rotate()).result for _ in range(3)]

    assert results == ["rotated", "rotated", "postponed"]
    assert [v.id for v in superseded(store.versions_sync(KEY))] == ["1", "2"]


# ---------------------------------------------------------------- retirement and nodes


async def test_retirement_waits_for_holders_then_retires_through_the_provider(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    provider = FlakyProvider()
    rotator = make_rotator(make_config(tmp_path), store, provider)
    await rotator.rotate()
    await rotator.rotate()  # version 1, Baton's own, superseded by 2
    await publish(store, "node-a", current="2", holding=("1",))
    await publish(store, "node-b", current="2")

    assert await rotator.retire_ready() == []
    [decision] = rotator.last_decisions
    assert decision.reasons == ("node-a: 1 holder(s) of version 1",)
    assert provider.retired == []

    await publish(store, "node-a", current="2")
    assert await rotator.retire_ready() == ["1"]

    assert provider.retired == [provider.created[0]]
    assert [v.retired for v in store.versions_sync(KEY)] == [True, False]
    assert rotator.retired_event.is_set()
    assert rotator.last_decisions == []
    assert [r.version for r in events(caplog, "retired")] == ["1"]  # type: ignore[attr-defined]
    assert await rotator.retire_ready() == []  # nothing left to do


async def test_a_failed_provider_retirement_keeps_the_version(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FlakyProvider(fail={"retire": 1})
    rotator = make_rotator(make_config(tmp_path), store, provider)
    await rotator.rotate()
    await rotator.rotate()
    await publish(store, "node-a", current="2")

    assert await rotator.retire_ready() == []
    assert [v.retired for v in store.versions_sync(KEY)] == [False, False]
    assert len(events(caplog, "retirement_failed")) == 1
    assert await rotator.retire_ready() == ["1"]


async def test_provider_sessions_or_an_unreachable_provider_block_retirement(tmp_path: Path, store: FlakyStore) -> None:
    provider = FlakyProvider()
    rotator = make_rotator(make_config(tmp_path), store, provider)
    await rotator.rotate()
    await rotator.rotate()
    await publish(store, "node-a", current="2")

    provider.session_list = [Session("app_a", "10.0.0.5", 2)]
    assert await rotator.retire_ready() == []
    assert rotator.last_decisions[0].reasons == ("provider: 2 session(s) still use version 1",)

    provider.session_list = []
    provider.sessions_fail = True
    assert await rotator.retire_ready() == []
    assert rotator.last_decisions[0].reasons == ("provider: cannot list sessions (cannot reach the database)",)

    provider.sessions_fail = False
    assert await rotator.retire_ready() == ["1"]


async def seeded_rotator(tmp_path: Path, store: FlakyStore) -> CredentialRotator:
    """A rotator with a provider that never fails, over ``store`` holding a first version of KEY."""
    await store.put(KEY, Secret("first-value-0000"))
    return make_rotator(make_config(tmp_path), store, FlakyProvider())


async def test_a_node_once_seen_is_remembered_and_its_lost_report_blocks(tmp_path: Path, store: FlakyStore) -> None:
    rotator = await seeded_rotator(tmp_path, store)
    await rotator.rotate()
    await publish(store, "node-a", current="2", holding=("1",))
    await publish(store, "node-b", current="2")
    await rotator.evaluate()
    assert await rotator.known_nodes() == {"node-a", "node-b"}

    # node-a's report vanishes (not forgotten): it is unknown, and unknown blocks.
    await store.merge_metadata(KEY, {REPORT_PREFIX + "node-a": None})

    assert await rotator.retire_ready() == []
    assert rotator.last_decisions[0].reasons == ("node-a: no report (unknown)",)


async def test_an_unreadable_report_blocks_as_an_unknown_node(tmp_path: Path, store: FlakyStore) -> None:
    rotator = await seeded_rotator(tmp_path, store)
    await rotator.rotate()
    await publish(store, "node-b", current="2")
    await store.merge_metadata(KEY, {REPORT_PREFIX + "node-a": "{not json"})

    assert await rotator.retire_ready() == []
    [reason] = rotator.last_decisions[0].reasons
    assert reason.startswith("node-a: report is stale")

    await publish(store, "node-a", current="2")
    assert await rotator.retire_ready() == ["1"]


async def test_forget_removes_the_report_so_the_node_is_no_longer_known_and_logs_an_event(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rotator = await seeded_rotator(tmp_path, store)
    await rotator.rotate()
    await publish(store, "node-a", current="1", age=3600)  # gone long ago, still on version 1
    await publish(store, "node-b", current="2")
    assert await rotator.retire_ready() == []
    assert await rotator.known_nodes() == {"node-a", "node-b"}
    assert {r.node for r in events(caplog, "node_joined")} == {"node-a", "node-b"}  # type: ignore[attr-defined]

    await rotator.forget("node-a")

    meta = await store.read_metadata(KEY)
    assert REPORT_PREFIX + "node-a" not in meta
    assert REPORT_PREFIX + "node-b" in meta
    assert await rotator.known_nodes() == {"node-b"}
    [record] = events(caplog, "node_forgotten")
    assert (record.node, record.credential) == ("node-a", "db")  # type: ignore[attr-defined]
    assert await rotator.retire_ready() == ["1"]


async def test_a_forgotten_node_is_not_remembered_as_unknown_by_the_rotator_that_saw_it(
    tmp_path: Path, store: FlakyStore
) -> None:
    rotator = await seeded_rotator(tmp_path, store)
    await rotator.rotate()
    await publish(store, "node-a", current="1")
    await publish(store, "node-b", current="2")
    assert await rotator.retire_ready() == []  # the rotator has now seen node-a

    await rotator.forget("node-a")

    assert await rotator.retire_ready() == ["1"]


async def test_forgetting_an_unknown_node_changes_nothing_but_is_still_logged(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rotator = await seeded_rotator(tmp_path, store)
    await publish(store, "node-b", current="1")

    await rotator.forget("nobody")

    assert await rotator.known_nodes() == {"node-b"}
    assert len(events(caplog, "node_forgotten")) == 1


# ---------------------------------------------------------------- no secret anywhere


async def test_no_secret_value_reaches_logs_outcomes_or_decisions(
    tmp_path: Path, store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = "first-value-0000-sekrit"
    await store.put(KEY, Secret(first))
    provider = FlakyProvider(fail={"apply": 1, "test": 1, "retire": 1})
    store.fail_promote = 1
    rotator = make_rotator(make_config(tmp_path), store, provider)
    seen: list[object] = []

    for _ in range(4):
        seen.append(await rotator.rotate())
    await publish(store, "node-a", current="2", holding=("1",))
    seen.append(await rotator.retire_ready())
    seen.extend(rotator.last_decisions)
    seen.extend(d.as_dict() for d in rotator.last_decisions)
    await publish(store, "node-a", current="2")
    seen.append(await rotator.retire_ready())
    seen.append(await rotator.retire_ready())
    seen.append(rotator.last_outcome)

    assert seen[3] == Outcome("rotated", version="2")
    assert seen[-3] == ["1"]  # the seed, not Baton's: retired in the store only, at once
    assert provider.retired == []
    values = [first, *(s.reveal() for s in provider.created)]
    assert len(values) == 2
    texts = [caplog.text, *(repr(vars(r)) for r in caplog.records), *(repr(x) for x in seen)]
    for value in values:
        assert not any(value in t for t in texts)


class Later:
    """Stands in for the ``time`` module inside daemon.rotation.workflow: its monotonic clock
    ``ahead`` seconds on (wall time, which judges report ages, is left alone)."""

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


class CountingNodeReporter(MetadataReporter):
    """The metadata reporter with ``collect_nodes``, counting full and per-node collects."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self.full = 0
        self.asked: list[list[str]] = []

    async def collect(self, key: str, credential: str) -> list[NodeReport]:
        self.full += 1
        return await super().collect(key, credential)

    async def collect_nodes(self, key: str, credential: str, nodes: Sequence[str]) -> list[NodeReport]:
        self.asked.append(list(nodes))
        return [r for r in await super().collect(key, credential) if r.node in set(nodes)]


async def rotated_with_counting_reporter(
    config: Config, store: FlakyStore
) -> tuple[CredentialRotator, CountingNodeReporter]:
    """A rotator over a CountingNodeReporter, after its first rotation (version 2 current, 1 superseded)."""
    await store.put(KEY, Secret("first-value-0000"))
    reporter = CountingNodeReporter(store)
    rotator = CredentialRotator(
        config=config, credential=config.credentials[0], store=store, reporter=reporter, provider=FlakyProvider()
    )
    await rotator.rotate()
    return rotator, reporter


async def test_while_a_node_blocks_a_pass_rereads_only_the_blockers_and_decides_on_a_full_collect(
    tmp_path: Path, store: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    rotator, reporter = await rotated_with_counting_reporter(config, store)
    for node in ("node-a", "node-b", "node-c"):
        await publish(store, node, current="2")
    await publish(store, "node-b", current="2", holding=("1",))

    assert await rotator.retire_ready() == []  # the full collect: node-b blocks
    assert (reporter.full, reporter.asked) == (1, [])
    assert await rotator.retire_ready() == []  # node-b still holds: only it was read again
    assert (reporter.full, reporter.asked) == (1, [["node-b"]])

    # Within a heartbeat, a node that did not block before is not looked at by the quick check...
    await publish(store, "node-c", current="2", holding=("1",))
    assert await rotator.retire_ready() == []
    assert reporter.full == 1
    # ...but a full collect runs at least once per report TTL, and sees it.
    monkeypatch.setattr(workflow, "time", Later(config.report.report_ttl))
    assert await rotator.retire_ready() == []
    assert reporter.full == 2
    assert rotator.last_decisions[0].blocking == {"node-b", "node-c"}

    # Once the blockers have cleared, the version is retired on a full collect, never on the quick one.
    await publish(store, "node-b", current="2")
    await publish(store, "node-c", current="2")
    asked = len(reporter.asked)
    assert await rotator.retire_ready() == ["1"]
    assert reporter.asked[asked:] == [["node-b", "node-c"]]
    assert reporter.full == 3


async def test_forgetting_a_blocking_node_makes_the_next_pass_a_full_one(tmp_path: Path, store: FlakyStore) -> None:
    config = make_config(tmp_path)
    rotator, reporter = await rotated_with_counting_reporter(config, store)
    await publish(store, "node-a", current="2")
    await publish(store, "gone", current="1", holding=("1",))
    assert await rotator.retire_ready() == []
    await rotator.forget("gone")
    assert await rotator.retire_ready() == ["1"]
    assert reporter.asked == []


async def test_a_blocker_found_cleared_is_not_read_again_before_the_next_full_collect(
    tmp_path: Path, store: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workflow, "QUICK_ROUND", 1)
    config = make_config(tmp_path)
    rotator, reporter = await rotated_with_counting_reporter(config, store)
    for node in ("node-a", "node-b", "node-c"):
        await publish(store, node, current="2", holding=("1",))
    assert await rotator.retire_ready() == []
    assert reporter.full == 1

    await publish(store, "node-a", current="2")
    assert await rotator.retire_ready() == []  # node-a cleared, node-b still holds: stop there
    assert reporter.asked == [["node-a"], ["node-b"]]
    assert await rotator.retire_ready() == []  # node-a is not read again
    assert reporter.asked[2:] == [["node-b"]]

    await publish(store, "node-b", current="2")
    await publish(store, "node-c", current="2")
    assert await rotator.retire_ready() == ["1"]
    assert reporter.asked[3:] == [["node-b"], ["node-c"]]
    assert reporter.full == 2


async def test_rounds_that_find_no_blocker_hand_over_to_a_full_collect(
    tmp_path: Path, store: FlakyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workflow, "QUICK_ROUND", 1)
    monkeypatch.setattr(workflow, "QUICK_ROUNDS", 2)
    config = make_config(tmp_path)
    rotator, reporter = await rotated_with_counting_reporter(config, store)
    for node in ("node-a", "node-b", "node-c", "node-d"):
        await publish(store, node, current="2", holding=("1",))
    assert await rotator.retire_ready() == []
    for node in ("node-a", "node-b", "node-c"):
        await publish(store, node, current="2")

    assert await rotator.retire_ready() == []  # node-d still holds, but two fruitless rounds were enough
    assert reporter.asked == [["node-a"], ["node-b"]]
    assert reporter.full == 2
    assert rotator.last_decisions[0].blocking == {"node-d"}
