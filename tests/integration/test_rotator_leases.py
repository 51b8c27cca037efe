"""One rotator per credential on every store: the lease's check-and-set, and two rotators started together.

Every store runs for real where this machine can run one: SQLite, a real
OpenBao dev server, moto_server for Secrets Manager, and the Kubernetes
apiserver double. Two stores (two clients, as two processes would have) race
for one lease; then two ``Rotator``s with a short ``every`` run side by side,
and the versions in the store show one rotation per interval, never a pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import parse_config
from daemon.errors import StoreError
from daemon.model import Secret
from daemon.providers import open_provider
from daemon.report import open_reporter
from daemon.report.base import NodeReport
from daemon.rotation.leadership import CredentialLease
from daemon.rotation.service import Rotator
from daemon.rotation.workflow import CredentialRotator
from daemon.stores import open_store
from daemon.stores.lease import LeaseRecord, LeaseStore
from tests.helpers import until

pytestmark = pytest.mark.integration

EVERY = 1.0
TTL = 1.0
BACKENDS = ["local", "openbao", "aws", "kubernetes"]


@dataclass
class Backend:
    """One store kind: the ``store:`` section of a config, and the key to rotate in it."""

    kind: str
    store: dict[str, Any]
    key: str

    def config(self, tmp_path: Path, *, node: str, every: float = EVERY, ttl: float = TTL, **extra: Any) -> Any:
        rotation: dict[str, Any] = {"every": every, "lease_ttl": ttl}
        if self.kind == "kubernetes":
            rotation["max_draining"] = 1  # the kubernetes store keeps one previous version
        return parse_config(
            {
                "node_id": node,
                "store": self.store,
                "report": {"heartbeat": 0.2},
                "credentials": [
                    {"name": "db", "key": self.key, "output": {"dir": str(tmp_path / "out")}, "rotation": rotation}
                ],
                **extra,
            }
        )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    kind = request.param
    if kind == "local":
        yield Backend(kind, {"kind": "local", "path": str(tmp_path / "store.db")}, "app/db")
    elif kind == "openbao":
        bao = request.getfixturevalue("openbao")
        prefix = request.getfixturevalue("openbao_prefix")
        monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
        store = {
            "kind": "vault",
            "url": bao.url,
            "poll_interval": 0.1,
            "lease_prefix": f"{prefix}/lease",
            "auth": {"method": "token"},
        }
        yield Backend(kind, store, f"{prefix}/db")
    elif kind == "aws":
        moto = request.getfixturevalue("moto")
        yield Backend(kind, {"kind": "aws", "endpoint_url": moto.url, "poll_interval": 0.1, "timeout": 2.0}, "app/db")
    else:
        kube = request.getfixturevalue("kube_api")
        store = {"kind": "kubernetes", "namespace": kube.namespace, "kubeconfig": str(kube.kubeconfig)}
        yield Backend(kind, store, kube.name("db"))


@pytest.fixture
async def open_stores(backend: Backend, tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    """Stores of the backend, each with its own client (as two processes), closed after the test."""
    stores: list[Any] = []

    def make() -> Any:
        s = open_store(backend.config(tmp_path, node="t"))
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.aclose()


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# ---------------------------------------------------------------- the primitive


async def test_of_two_lease_writes_on_one_revision_exactly_one_wins_and_a_stale_revision_always_loses(
    open_stores: Callable[[], Any], backend: Backend
) -> None:
    a, b = open_stores(), open_stores()
    assert isinstance(a, LeaseStore)
    assert await a.read_lease(backend.key) is None

    def rec(holder: str) -> LeaseRecord:
        return LeaseRecord(holder, time.time(), 5.0)

    # Both create at once (no lease yet): one create wins.
    first = await asyncio.gather(
        a.write_lease(backend.key, rec("a"), expect=None), b.write_lease(backend.key, rec("b"), expect=None)
    )
    assert sum(r is not None for r in first) == 1, first
    won = next(r for r in first if r is not None)
    seen = await b.read_lease(backend.key)
    assert seen is not None and (seen.holder, seen.revision, seen.ttl) == (won.holder, won.revision, 5.0)

    # Both write on the revision they read, at once: one wins, and the revision moves on.
    second = await asyncio.gather(
        a.write_lease(backend.key, rec("a2"), expect=won.revision),
        b.write_lease(backend.key, rec("b2"), expect=won.revision),
    )
    assert sum(r is not None for r in second) == 1, second
    now = next(r for r in second if r is not None)
    assert now.revision != won.revision
    # A writer still holding the old revision loses, whoever it is; so does a create.
    assert await a.write_lease(backend.key, rec("late"), expect=won.revision) is None
    assert await b.write_lease(backend.key, rec("late"), expect=None) is None
    final = await a.read_lease(backend.key)
    assert final is not None and (final.holder, final.revision) == (now.holder, now.revision)
    # A release is a write like any other: holder "" on the current revision.
    released = await b.write_lease(backend.key, LeaseRecord("", time.time(), 5.0), expect=now.revision)
    assert released is not None and released.holder == ""


# ---------------------------------------------------------------- two rotators


@contextlib.asynccontextmanager
async def running(rotator: Rotator) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(rotator.serve(), name=f"rotator-under-test:{rotator.config.node_id}")
    try:
        await until(lambda: rotator.ready.is_set() or task.done(), timeout=15, what="the rotator to start")
        assert not task.done(), "the rotator ended at start"
        yield task
    finally:
        rotator.should_exit.set()
        await asyncio.wait({task}, timeout=15)
        assert task.done(), "the rotator did not stop"


class Watch:
    """Polls the store's versions from outside and notes when each id was first seen (some stores list
    only the live versions, and not every store keeps a creation time finer than a second)."""

    def __init__(self, store: Any, key: str, rotators: tuple[Rotator, ...], *, seed: str) -> None:
        self.store, self.key, self.rotators, self.seed = store, key, rotators, seed
        self.first_seen: dict[str, float] = {}
        self.most_leaders = 0

    async def run(self) -> None:
        while True:
            self.most_leaders = max(self.most_leaders, len(leaders(*self.rotators)))
            with contextlib.suppress(StoreError):
                for v in await self.store.versions(self.key):
                    if v.id != self.seed:
                        self.first_seen.setdefault(v.id, time.monotonic())
            await asyncio.sleep(0.02)

    def gaps(self) -> list[float]:
        times = sorted(self.first_seen.values())
        return [round(t2 - t1, 3) for t1, t2 in itertools.pairwise(times)]


async def node_reporting(backend: Backend, tmp_path: Path, store: Any) -> None:
    """One agent's node reports: the current version, nothing held, so each superseded version retires."""
    reporter = open_reporter(backend.config(tmp_path, node="n1"), store)
    last, sent = None, 0.0
    while True:
        with contextlib.suppress(StoreError):
            current = (await store.read(backend.key)).info.id
            if current != last or time.monotonic() - sent > 0.25:  # on change, and on a heartbeat
                report = NodeReport(node="n1", credential="db", current=current, heartbeat=time.time())
                await reporter.publish(backend.key, report)
                last, sent = current, time.monotonic()
        await asyncio.sleep(0.05)


def leaders(*rotators: Rotator) -> list[Rotator]:
    return [r for r in rotators if r.leases.is_leader]


async def test_two_rotators_started_together_make_one_version_per_interval_and_the_standby_takes_over_a_dead_leader(
    backend: Backend, tmp_path: Path, open_stores: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a = Rotator(backend.config(tmp_path, node="rot-a"), install_signals=False, serve_api=False)
    b = Rotator(backend.config(tmp_path, node="rot-b"), install_signals=False, serve_api=False)
    view = open_stores()
    # An existing credential (as an operator's first put), so the test is about rotation, not creation.
    seed = await view.create(backend.key, Secret("seed-value-0"))
    await view.promote(backend.key, seed.id)
    node = asyncio.create_task(node_reporting(backend, tmp_path, open_stores()), name="node-n1")
    watch = Watch(open_stores(), backend.key, (a, b), seed=seed.id)
    watching = asyncio.create_task(watch.run(), name="watch")
    async with running(a) as a_task, running(b) as b_task:
        await until(lambda: len(leaders(a, b)) == 1, timeout=10, what="one rotator to lead")
        await asyncio.sleep(4 * EVERY)  # four intervals (the watch looks throughout)
        assert watch.most_leaders == 1, "two rotators led one credential at once"
        leader = leaders(a, b)[0]
        standby = b if leader is a else a
        assert standby.leases.standing_by and not leader.leases.standing_by
        standbys = events(caplog, "rotator_standby")
        assert [r.holder for r in standbys] == [standby.leases.holder]  # said once, not every round
        assert standbys[0].leader == leader.leases.holder
        assert [r.holder for r in events(caplog, "rotator_leading")] == [leader.leases.holder]
        lease = standby.status()["credentials"]["db"]["lease"]
        assert lease["leading"] is False and lease["leader"] == leader.leases.holder
        assert lease["expires"] is not None and standby.status()["leadership"] == "standby"

        # One version per interval: 4 or 5 in 4 s, never 8-10 as two rotators made. Fewer when a step
        # failed once (the Kubernetes store's promote loses a race with a node report's patch now and
        # then) or the machine is busy, but the leader does rotate.
        assert 2 <= len(watch.first_seen) <= 5, watch.first_seen
        assert min(watch.gaps()) >= 0.7 * EVERY, f"two versions close together: {watch.gaps()}"

        # The leader dies holding the lease (no release): the standby takes over within a ttl or so.
        for held in leader.leases.leases.values():
            held.release = functools.partial(_dies, held)  # type: ignore[method-assign]
        leader.should_exit.set()
        died = time.monotonic()
        await until(lambda: standby.leases.is_leader, timeout=5 * TTL, what="the standby to take over")
        took = time.monotonic() - died
        assert took <= TTL + TTL / 3 + 0.5, f"took over after {took:.2f}s"
        seen = len(watch.first_seen)
        await until(lambda: len(watch.first_seen) > seen, timeout=5 * EVERY, what="the new leader to rotate")
        assert not (b_task if standby is b else a_task).done()
    watching.cancel()
    node.cancel()
    assert min(watch.gaps()) >= 0.7 * EVERY, f"two versions close together around the takeover: {watch.gaps()}"
    assert watch.most_leaders == 1


async def _dies(lease: CredentialLease) -> None:
    """A killed rotator stops leading and releases nothing."""
    lease.held.clear()


# ---------------------------------------------------------------- a leader that stalled


async def test_a_leader_whose_lease_was_taken_while_it_stalled_stops_before_it_writes_anything(
    backend: Backend, tmp_path: Path, open_stores: Callable[[], Any]
) -> None:
    config = backend.config(tmp_path, node="rot-a")
    store = open_stores()
    seed = await store.create(backend.key, Secret("seed-value-0"))
    await store.promote(backend.key, seed.id)
    lease = CredentialLease(store=store, credential="db", key=backend.key, holder="rot-a/1-aaaaaa", ttl=5.0)
    await lease.step()
    assert lease.is_leader and lease.record is not None
    await lease.verify()  # still the holder: passes
    # Another rotator took the lease meanwhile (as after a takeover); this one has not looked since.
    taken = await open_stores().write_lease(
        backend.key, LeaseRecord("rot-b/2-bbbbbb", time.time(), 5.0), expect=lease.record.revision
    )
    assert taken is not None and lease.is_leader
    cred = config.credentials[0]
    rotator = CredentialRotator(
        config=config,
        credential=cred,
        store=store,
        reporter=open_reporter(config, store),
        provider=open_provider(cred.rotation),
    )
    rotator.fence = lease.verify
    before = [v.id for v in await store.versions(backend.key)]
    meta_before = await store.read_metadata(backend.key)
    outcome = await rotator.rotate()
    assert outcome.result == "failed" and outcome.step == "write", outcome
    assert "rot-b/2-bbbbbb" in str(outcome.error)
    assert [v.id for v in await store.versions(backend.key)] == before  # no version written
    assert await store.read_metadata(backend.key) == meta_before  # nor anything recorded
