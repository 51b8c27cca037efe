"""Zero-downtime PostgreSQL rotation, end to end, on a real cluster.

An agent and a rotator (in this process, on the embedded local store, as
``baton demo`` runs them) rotate a database credential with the postgres
provider, while real consumer processes (bench/pg_consumer.py) read the JSON
credential file the agent writes and log in to PostgreSQL with it: a new
connection per request (``per-use``), a pool of long-lived connections that
Baton reloads with SIGHUP (``pool``), or one session held open (``hold``).
The CLI (``baton status --pending``) runs as a real subprocess against the
same store. Every log record and CLI output is searched for the admin password,
the admin DSN and the minted role passwords.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from daemon.agent.service import Agent
from daemon.config import Config, parse_config
from daemon.kit import metrics
from daemon.kit.logs import JsonFormatter
from daemon.rotation.service import Rotator
from daemon.stores.local import LocalStore
from tests.fixtures.postgres import PgScratch

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
CONSUMER = REPO / "bench" / "pg_consumer.py"
BATON = str(Path(sys.executable).with_name("baton"))
KEY = "e2e/pg"
CRED = "db"
TEMPLATE = (
    '{"username": {{ username|tojson }}, "password": {{ password|tojson }}, '
    '"host": {{ host|tojson }}, "port": {{ port }}, "database": {{ database|tojson }}}\n'
)
T = TypeVar("T")


async def until(fn: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``fn`` (on the loop, so the agent and rotator keep running) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- captured logs


@dataclass
class Captured:
    """Every log record of the test, as the JSON lines the daemon would write, plus CLI outputs."""

    stream: io.StringIO = field(default_factory=io.StringIO)
    records: list[logging.LogRecord] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def events(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == name]

    def text(self) -> str:
        return "\n".join([self.stream.getvalue(), *self.outputs])


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    cap = Captured()
    text = logging.StreamHandler(cap.stream)
    text.setFormatter(JsonFormatter())
    keep = _Keep(cap.records)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(text)
    root.addHandler(keep)
    try:
        yield cap
    finally:
        root.removeHandler(text)
        root.removeHandler(keep)
        root.setLevel(old_level)


# ---------------------------------------------------------------- Baton and its consumers


@dataclass
class Setup:
    scratch: PgScratch
    strategy: str
    root: Path
    every: float
    base: str = ""
    grant: str | None = None
    config_file: Path = Path()
    config: Config | None = None

    def __post_init__(self) -> None:
        self.base = f"{self.scratch.prefix}app"
        if self.strategy == "role-per-version":
            self.grant = f"{self.scratch.prefix}grp"
            self.scratch.admin_sql(f'CREATE ROLE "{self.grant}" NOLOGIN')
        provider: dict[str, Any] = {
            "kind": "postgres",
            "admin_dsn_file": str(self.scratch.admin_dsn_file),
            "strategy": self.strategy,
            "username": self.base,
            "host": self.scratch.cluster.host,
            "port": self.scratch.cluster.port,
            "database": self.scratch.dbname,
        }
        if self.grant:
            provider["grant_role"] = self.grant
        data = {
            "node_id": "e2e-node",
            "store": {"kind": "local", "path": str(self.root / "store.db")},
            "api": {"listen": "127.0.0.1:0"},
            "log": {"format": "json", "level": "info"},
            "report": {"heartbeat": 0.5},
            "agent": {"debounce": 0.1, "scan_interval": 0.2, "fanotify": "off"},
            "credentials": [
                {
                    "name": CRED,
                    "key": KEY,
                    "output": {"dir": str(self.root / "out"), "files": {"db.json": TEMPLATE}},
                    "consumers": [
                        {
                            "name": "per-use",
                            "match": {"cmdline": f"pg_consumer\\.py per-use .*{self.root}/"},
                            "loads": "per-use",
                        },
                        {
                            "name": "pool",
                            "match": {"cmdline": f"pg_consumer\\.py pool .*{self.root}/"},
                            "loads": "on-reload",
                            "reload": {"signal": "SIGHUP"},
                            "health": {"alive_for": 0.1},
                            "min_restart_interval": 0.1,
                        },
                    ],
                    "rotation": {"every": self.every, "provider": provider},
                }
            ],
        }
        self.config_file = self.root / "baton.yaml"
        self.config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = parse_config(data)

    @property
    def cred_file(self) -> Path:
        return self.root / "out" / "db.json"

    def versions(self) -> dict[int, tuple[str | None, bool]]:
        """Store versions: id -> (stage, retired)."""
        store = LocalStore(self.root / "store.db", watch_files=False)
        try:
            return {int(v.id): (next(iter(v.stages), None), v.retired) for v in store.versions_sync(KEY)}
        finally:
            store.close()

    def current_payload(self) -> dict[str, Any]:
        store = LocalStore(self.root / "store.db", watch_files=False)
        try:
            data: dict[str, Any] = json.loads(store.read_sync(KEY).payload.reveal())
            return data
        finally:
            store.close()

    def roles(self) -> dict[str, bool]:
        rows = self.scratch.admin_sql(
            f"SELECT rolname, rolcanlogin FROM pg_roles WHERE starts_with(rolname, '{self.base}_') ORDER BY 1"
        )
        return {str(r[0]): bool(r[1]) for r in rows}


@dataclass
class Consumer:
    name: str
    proc: asyncio.subprocess.Process
    stats_path: Path
    err_path: Path

    def stats(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
            return data
        except (OSError, ValueError):
            return {}


@dataclass
class Running:
    setup: Setup
    agent: Agent
    rotator: Rotator
    consumers: list[Consumer] = field(default_factory=list)

    async def start_consumer(self, mode: str, *args: str, app: str | None = None) -> Consumer:
        n = len(self.consumers)
        stats = self.setup.root / f"stats-{mode}-{n}.json"
        err = self.setup.root / f"consumer-{mode}-{n}.err"
        argv = [sys.executable, str(CONSUMER), mode, *args, "--app", app or f"e2e-{mode}-{n}"]
        argv += ["--file", str(self.setup.cred_file), "--stats", str(stats)]
        with open(err, "wb") as f:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=f
            )
        consumer = Consumer(mode, proc, stats, err)
        self.consumers.append(consumer)
        try:
            await until(
                lambda: consumer.stats().get("requests", 0) > 0, timeout=15, what=f"{mode} consumer's 1st request"
            )
        except AssertionError as e:
            said = err.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{e}; consumer exit status {proc.returncode}, stderr:\n{said}") from None
        return consumer

    async def stop_consumer(self, consumer: Consumer) -> None:
        if consumer.proc.returncode is None:
            consumer.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(consumer.proc.wait(), 10)
        except TimeoutError:
            consumer.proc.kill()
            await consumer.proc.wait()

    def rotated(self) -> int:
        """Promoted versions beyond the first."""
        versions = self.setup.versions()
        return max(0, sum(1 for stage, _ in versions.values() if stage != "pending") - 1)

    def retired(self) -> list[int]:
        return sorted(v for v, (_, retired) in self.setup.versions().items() if retired)

    def current(self) -> int:
        return next(v for v, (stage, _) in self.setup.versions().items() if stage == "current")

    async def cli_pending(self) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            BATON,
            "status",
            "--pending",
            "--json",
            "--config",
            str(self.setup.config_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return {"code": proc.returncode, "out": out.decode(), "err": err.decode()}


@contextlib.asynccontextmanager
async def baton(setup: Setup) -> AsyncIterator[Running]:
    """Rotator and agent on the same store; consumers started by the test are stopped on the way out."""
    assert setup.config is not None
    rotator = Rotator(setup.config, install_signals=False, serve_api=False)
    agent = Agent(setup.config, install_signals=False)
    rotator_task = asyncio.create_task(rotator.serve(), name="e2e-rotator")
    agent_task = asyncio.create_task(agent.serve(), name="e2e-agent")
    running = Running(setup, agent, rotator)
    try:
        # No current version yet: the rotator mints version 1 at once, and the agent writes it.
        await asyncio.wait_for(agent.ready.wait(), 20)
        yield running
    finally:
        for c in running.consumers:
            await running.stop_consumer(c)
        rotator.should_exit.set()
        agent.should_exit.set()
        # asyncio.wait, not gather: a stop that hangs fails here, naming what hung.
        _done, hung = await asyncio.wait({rotator_task, agent_task}, timeout=30)
        assert not hung, f"did not stop: {sorted(t.get_name() for t in hung)}"


async def rotate_exactly(running: Running, captured: Captured, n: int, *, timeout: float) -> None:
    """Let the schedule run until ``n`` rotations, and no more.

    The schedule is slowed down right after rotation n-1 and the n-th is asked
    for at once (the schedule may have timed it with the slowed interval). If
    that n-th one is put off (the previous version still drains) or fails, it
    would then wait an hour: it is asked for again.
    """
    slowed = False

    def check() -> bool:
        nonlocal slowed
        done = running.rotated()
        if done >= n - 1 and not slowed:
            slowed = True
            for r in running.rotator.rotators.values():
                r.reschedule(3600.0)
            # The schedule may already have timed the n-th rotation with the hour:
            # ask for it now (once; a schedule that timed it short just runs it now).
            running.rotator.rotate_now.set()
        if slowed and done < n:
            names = [getattr(r, "event", None) for r in captured.records]
            last_rotated = max((i for i, e in enumerate(names) if e == "rotated"), default=-1)
            if {"rotation_postponed", "rotation_failed"} & set(names[last_rotated + 1 :]):
                running.rotator.rotate_now.set()
        return done >= n

    await until(check, timeout=timeout, what=f"{n} rotations")


def assert_no_secrets(captured: Captured, setup: Setup, *extra: str) -> None:
    cluster = setup.scratch.cluster
    dsn = setup.scratch.admin_dsn_file.read_text().strip()
    secrets = [cluster.admin_password, cluster.admin_dsn, dsn, setup.current_payload()["password"], *extra]
    consumer_errors = [p.read_text(errors="replace") for p in sorted(setup.root.glob("consumer-*.err"))]
    text = "\n".join([captured.text(), *consumer_errors])
    assert text, "nothing was captured: the check would prove nothing"
    leaked = [i for i, s in enumerate(secrets) if s and s in text]
    assert not leaked, f"secret values (by index {leaked}) found in captured logs or CLI output"


# ---------------------------------------------------------------- (a) rotations under load


@pytest.mark.parametrize("strategy", ["alternating-users", "role-per-version"])
async def test_rotations_with_consumers_connecting_continuously_fail_no_request_and_retire_each_version_after_its_last_session(  # noqa: E501
    pg_scratch: PgScratch, tmp_path: Path, captured: Captured, strategy: str
) -> None:
    rotations = 3
    setup = Setup(pg_scratch, strategy, tmp_path, every=1.0)
    async with baton(setup) as running:
        pool = await running.start_consumer(
            # Sessions drain for a while after the reload: only the provider's session check
            # (pg_stat_activity) keeps the old version from being retired under them.
            *("pool", "--rate", "20", "--pool-size", "2", "--max-lifetime", "1.0", "--reload-drain", "0.7"),
            app="e2e-pool",
        )
        per_use = [await running.start_consumer("per-use", "--rate", "20") for _ in range(2)]
        await rotate_exactly(running, captured, rotations, timeout=25)
        await until(
            lambda: running.retired() == list(range(1, rotations + 1)),
            timeout=15,
            what="every superseded version retired",
        )
        # Keep the load on a moment after the last retirement: a retirement that broke clients shows here.
        seen = pool.stats()["requests"]
        await until(lambda: pool.stats()["requests"] >= seen + 10, timeout=5, what="requests after the last retirement")
        for c in running.consumers:
            await running.stop_consumer(c)
        stats = [c.stats() for c in [*per_use, pool]]  # per-use first, pool last
        current = running.current()

    assert all(s["failures"] == 0 for s in stats), [(s["mode"], s["reasons"]) for s in stats]
    assert all(s["requests"] >= 20 for s in stats), [s["requests"] for s in stats]
    assert sum(s["connects"] for s in stats[:2]) == sum(s["requests"] for s in stats[:2])  # truly per use
    assert running.rotated() == rotations
    assert stats[2]["reloads"] >= rotations  # Baton's SIGHUP reached the pool after each rotation
    assert current == rotations + 1
    assert running.retired() == list(range(1, current))

    # Each retirement came only after the last use of a session of that version: the provider
    # logs its lock (NOLOGIN) or drop of the role just before the rotator's `retired` event.
    locks = {}
    for i, record in enumerate(captured.records):
        if getattr(record, "event", None) == "retired":
            lock = next(
                r
                for r in reversed(captured.records[:i])
                if r.name == "daemon.providers.postgres" and str(r.msg).startswith(("role %s set NOLOGIN", "dropped"))
            )
            locks[str(record.version)] = (lock.created, lock.role)  # type: ignore[attr-defined]
    assert sorted(locks, key=int) == [str(v) for v in range(1, current)]
    used_old = 0
    for s in stats:
        for version, last_use in s["last_use"].items():
            if version in locks:
                used_old += 1
                locked_at, role = locks[version]
                assert s["roles"][version] == role
                assert last_use < locked_at, f"version {version} was used {last_use - locked_at:.3f}s after retirement"
    assert used_old >= rotations  # the consumers did use the superseded versions: the check is not empty

    roles = setup.roles()
    newest = setup.current_payload()["username"]
    if strategy == "alternating-users":
        other = next(r for r in roles if r != newest)
        assert roles == {newest: True, other: False}  # the superseded slot is NOLOGIN
    else:
        assert roles == {newest: True}  # every superseded role was dropped
    assert captured.events("rotation_failed") == []
    assert_no_secrets(captured, setup)


# ---------------------------------------------------------------- (b) a long-lived session blocks retirement


async def test_a_long_lived_session_on_the_old_role_keeps_the_version_pending_and_is_listed_by_status_until_it_ends(
    pg_scratch: PgScratch, tmp_path: Path, captured: Captured
) -> None:
    setup = Setup(pg_scratch, "role-per-version", tmp_path, every=3600.0)
    async with baton(setup) as running:
        old_role = setup.current_payload()["username"]
        # Not a declared consumer and holding no file: only pg_stat_activity can see it.
        batch = await running.start_consumer("hold", "--rate", "5", app="e2e-night-batch")
        per_use = await running.start_consumer("per-use", "--rate", "10")
        cr = running.rotator.rotators[CRED]
        outcome = await cr.rotate()
        assert outcome.result == "rotated", outcome
        await until(lambda: running.agent.credentials[CRED].version == "2", timeout=10, what="version 2 written")

        def blocked_only_by_the_batch_session() -> bool:
            d = next((d for d in cr.last_decisions if d.version == "1"), None)
            return d is not None and list(d.reasons) == ["provider: 1 session(s) still use version 1"]

        await until(blocked_only_by_the_batch_session, timeout=10, what="version 1 waiting only on the session")
        # Several gate evaluations later it is still pending, and the old role still works for that session.
        before = batch.stats()["requests"]
        await until(lambda: batch.stats()["requests"] >= before + 5, timeout=5, what="the batch keeps working")
        assert running.retired() == []
        assert setup.roles()[old_role] is True

        cli = await running.cli_pending()
        captured.outputs += [cli["out"], cli["err"]]
        assert cli["code"] == 0, cli["err"]
        pending = json.loads(cli["out"])[CRED]
        (decision,) = [d for d in pending if d["version"] == "1"]
        assert decision["retire"] is False
        assert decision["sessions"] == [{"principal": old_role, "client": "e2e-night-batch@127.0.0.1", "count": 1}]

        await running.stop_consumer(batch)
        await until(lambda: running.retired() == [1], timeout=10, what="version 1 retired once the session ended")
        assert old_role not in setup.roles()  # role-per-version drops the old role
        assert per_use.stats()["failures"] == 0
        assert batch.stats()["failures"] == 0

    assert_no_secrets(captured, setup)


# ---------------------------------------------------------------- (c) bad admin credentials


def _failures(credential: str) -> float:
    value = metrics.REGISTRY.get_sample_value("baton_rotations_total", {"credential": credential, "result": "failure"})
    return value or 0.0


async def test_a_wrong_admin_password_fails_the_rotation_clearly_keeps_the_current_credential_and_is_retried(
    pg_scratch: PgScratch, tmp_path: Path, captured: Captured
) -> None:
    setup = Setup(pg_scratch, "alternating-users", tmp_path, every=1.0)
    good_dsn = setup.scratch.admin_dsn_file.read_text()
    wrong_password = "wrong-" + os.urandom(8).hex()
    async with baton(setup) as running:
        # Version 1 is current; the next rotation is due one interval after it: break the DSN now.
        assert running.current() == 1
        failed_before = _failures(CRED)
        pg_scratch.cluster.write_admin_dsn(
            setup.scratch.admin_dsn_file,
            dsn=pg_scratch.cluster.dsn(dbname=pg_scratch.dbname, password=wrong_password),
        )
        consumer = await running.start_consumer("per-use", "--rate", "10")
        await until(lambda: len(captured.events("rotation_failed")) >= 2, timeout=10, what="two failed rotations")
        first, second = captured.events("rotation_failed")[:2]
        for record in (first, second):
            assert record.levelno == logging.ERROR
            # The provider asks PostgreSQL what is live before it mints (issue 18), so the
            # wrong password stops the rotation at create, before anything is written.
            assert record.step == "create"  # type: ignore[attr-defined]
            assert record.error == "admin: login failed (wrong user name or password)"  # type: ignore[attr-defined]
        assert list(setup.versions()) == [1], "a failed create writes no version to the store"
        # Retried at the next interval, not in a tight loop.
        assert second.created - first.created >= 0.8 * setup.every
        assert _failures(CRED) - failed_before >= 2
        # The current credential is untouched and keeps working.
        assert running.current() == 1
        assert running.agent.credentials[CRED].version == "1"
        assert running.rotated() == 0
        seen = consumer.stats()["requests"]
        await until(lambda: consumer.stats()["requests"] >= seen + 5, timeout=5, what="the consumer keeps working")
        assert consumer.stats()["failures"] == 0

        # Fixed: the next interval creates, applies and promotes version 2.
        setup.scratch.admin_dsn_file.write_text(good_dsn)
        await until(lambda: running.current() == 2, timeout=10, what="version 2 promoted after the fix")
        assert consumer.stats()["failures"] == 0

    assert_no_secrets(captured, setup, wrong_password, pg_scratch.cluster.dsn(password=wrong_password))
