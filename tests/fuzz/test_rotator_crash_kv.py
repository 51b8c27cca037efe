"""Crash campaign for the mysql and redis providers: kill -9 of ``baton rotator`` at random moments.

The postgres campaign's shape (tests/fuzz/test_rotator_crash.py, whose
``run_rotator`` starts and kills the rotator): on the local store, the rotator
runs with ``BATON_TEST_DELAY`` against a real MariaDB or redis-server and is
killed again and again, while a consumer here logs in with the current version
in a loop (and reports itself as the one node, so versions retire). After every
kill: at most one current version, it logs in, bounded pending versions, and
every login the server holds (an unlocked account, an ``on`` user, a password
of the one user) is named by a version the store still has. At the end: 0
consumer failures and the rotations went on. ``make test``: 2 kills of the
mysql one; ``make fuzz``: 60 kills of each of the three.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.errors import BatonError
from daemon.model import PENDING, Secret
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.ledger import PROMOTED, ledger
from daemon.stores.local import LocalStore
from tests.fixtures.mariadb import MysqlScratch
from tests.fixtures.redis import RedisScratch
from tests.fuzz import FUZZ, scale
from tests.fuzz.test_rotator_crash import run_rotator

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, pytest.mark.slow]

SYSTEMS = (
    ["mysql-alternating-users", "redis-alternating-users", "redis-dual-password"]
    if FUZZ
    else ["mysql-alternating-users"]  # every boundary of all three: test_mysql_redis_crash_steps.py
)
KILLS = int(os.environ.get("BATON_FUZZ_KILLS") or scale(ci=2, fuzz=60))
KEY = "app/kv"


@dataclass
class Campaign:
    root: Path
    provider: dict[str, Any]
    login_error: Callable[[str, str], str | None]  # (user, password) -> None when it logs in
    logins: Callable[[], set[str]]  # what the server lets log in for this credential
    login_of: Callable[[dict[str, Any]], str]  # the login a payload stands for
    store: LocalStore
    env: dict[str, str] = field(default_factory=dict)
    uses: int = 0
    failures: list[str] = field(default_factory=list)
    passwords: set[str] = field(default_factory=set)

    def write_config(self) -> Path:
        data = {
            "node_id": "rotator",
            "store": {"kind": "local", "path": str(self.root / "store.db")},
            "api": {"listen": f"unix:{self.root}/api.sock"},
            "log": {"format": "json", "level": "info"},
            "report": {"heartbeat": 0.5, "ttl": 5},
            "credentials": [
                {
                    "name": "kv",
                    "key": KEY,
                    "output": {"dir": str(self.root / "out")},
                    "rotation": {"every": 1, "max_draining": 1, "lease_ttl": 2.0, "provider": self.provider},
                }
            ],
        }
        path = self.root / "baton.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def works(self, payload: Secret) -> str | None:
        data = json.loads(payload.reveal())
        self.passwords.add(data["password"])
        return self.login_error(data["username"], data["password"])


def mysql(s: MysqlScratch) -> dict[str, Any]:
    return {
        "provider": {"kind": "mysql", "admin_dsn_file": str(s.admin_dsn_file), "username": f"{s.prefix}app"},
        "login_error": lambda u, p: s.server.login_error(user=u, password=p),
        "logins": lambda: {n for n, created in s.accounts().items() if "ACCOUNT LOCK" not in created},
        "login_of": lambda d: d["username"],
    }


def redis(s: RedisScratch, strategy: str) -> dict[str, Any]:
    base = f"{s.prefix}app"

    def logins() -> set[str]:
        if strategy == "dual-password":
            info = s.getuser(base)
            return set(info["passwords"]) if info and "on" in info["flags"] else set()
        return {u for u in s.users() if "on" in (s.getuser(u) or {}).get("flags", [])}

    def login_of(d: dict[str, Any]) -> str:
        if strategy == "dual-password":
            return hashlib.sha256(d["password"].encode()).hexdigest()
        return str(d["username"])

    return {
        "provider": {"kind": "redis", "admin_url_file": str(s.admin_url_file), "username": base, "strategy": strategy},
        "login_error": lambda u, p: s.server.login_error(user=u, password=p),
        "logins": logins,
        "login_of": login_of,
    }


@pytest.fixture(params=SYSTEMS)
async def campaign(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    name: str = request.param
    if name.startswith("mysql"):
        parts = mysql(request.getfixturevalue("mysql_scratch"))
    else:
        parts = redis(request.getfixturevalue("redis_scratch"), name.removeprefix("redis-"))
    store = LocalStore(tmp_path / "store.db", watch_files=False)
    try:
        yield Campaign(root=tmp_path, store=store, **parts)
    finally:
        await store.aclose()


async def consume(c: Campaign, stop: asyncio.Event) -> None:
    reporter = MetadataReporter(c.store)
    while not stop.is_set():
        try:
            got = await c.store.read(KEY)
            meta = await c.store.read_metadata(KEY)
        except BatonError:
            await asyncio.sleep(0.05)  # no current version yet: not a use
            continue
        vid = got.info.id
        report = NodeReport(node="node-a", credential="kv", current=vid, in_use={vid: 1}, heartbeat=time.time())
        with contextlib.suppress(BatonError):
            await reporter.publish(KEY, report)
        own = ledger(meta).get(vid)
        if own is not None and own.state == PROMOTED:
            c.uses += 1
            why = await asyncio.to_thread(c.works, got.payload)
            if why is not None:
                c.failures.append(f"version {vid}: {why}")
        await asyncio.sleep(0.05)


async def check_invariants(c: Campaign, kill: int) -> None:
    where = f"after kill {kill}"
    try:
        versions = await c.store.versions(KEY)
    except BatonError:
        return  # nothing written yet
    current = [v for v in versions if v.is_current]
    assert len(current) <= 1, f"{where}: {len(current)} current versions"
    assert not any(v.retired for v in current), f"{where}: a current version is retired"
    assert len([v for v in versions if PENDING in v.stages and not v.retired]) <= 2, f"{where}: pending versions"
    named: set[str] = set()
    for v in versions:
        with contextlib.suppress(BatonError, ValueError, KeyError):
            if not v.retired or v.is_current:
                named.add(c.login_of(json.loads((await c.store.read(KEY, v.id)).payload.reveal())))
    # A retired version's login may linger only while its retirement is under way (ledger: retiring).
    owned = ledger(await c.store.read_metadata(KEY))
    for v in versions:
        if v.retired and v.id in owned:
            with contextlib.suppress(BatonError, ValueError, KeyError):
                named.add(c.login_of(json.loads((await c.store.read(KEY, v.id)).payload.reveal())))
    orphans = await asyncio.to_thread(c.logins) - named
    assert not orphans, f"{where}: {len(orphans)} login(s) on the server that no version names"
    if current:
        own = owned.get(current[0].id)
        if own is not None and own.state == PROMOTED:
            why = await asyncio.to_thread(c.works, (await c.store.read(KEY)).payload)
            assert why is None, f"{where}: the current version {current[0].id} does not log in: {why}"


async def test_kill_9_of_the_rotator_at_random_moments_keeps_every_invariant(campaign: Campaign) -> None:
    c = campaign
    config = c.write_config()
    log = c.root / "rotator.log"
    rng = random.Random(os.environ.get("BATON_FUZZ_SEED") or None)
    stop = asyncio.Event()
    led = 0
    consumer = asyncio.create_task(consume(c, stop), name="consumer")
    try:
        for kill in range(KILLS):
            led += await run_rotator(c, config, seconds=rng.uniform(0.0, 3.0), log=log)  # type: ignore[arg-type]
            await check_invariants(c, kill)
        led += await run_rotator(c, config, seconds=8.0, log=log)  # type: ignore[arg-type]
        await check_invariants(c, KILLS)
    finally:
        stop.set()
        await consumer
    versions = await c.store.versions(KEY)
    promoted = [v for v in versions if v.id in ledger(await c.store.read_metadata(KEY)) or v.retired]
    text = log.read_text(errors="replace")
    assert c.failures == [], f"{len(c.failures)} consumer failures in {c.uses} uses: {c.failures[:5]}"
    assert led > KILLS // 2, f"the rotator took the lease in only {led} of {KILLS + 1} runs; log:\n{text[-3000:]}"
    assert c.uses > 0, f"the consumer never used a credential Baton rotated; log:\n{text[-3000:]}"
    assert len(promoted) >= 2, f"rotation made no progress over {KILLS} kills; log:\n{text[-3000:]}"
    assert not any(p in text for p in c.passwords), "a minted password reached the rotator's log"
