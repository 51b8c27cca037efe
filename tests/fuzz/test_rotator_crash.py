"""Crash campaign: kill -9 of a ``baton rotator`` process at random moments, every invariant kept.

Across stores (local, a real OpenBao dev server, moto_server) and strategies
(password generator, postgres alternating-users and role-per-version), the
rotator runs with ``BATON_TEST_DELAY`` (a random sleep around every store and
provider call, so a kill lands inside each of them) and is killed with SIGKILL
after a random time, again and again. A consumer in this process logs in with
the current version's payload in a loop (and reports itself as the one node, so
versions can retire). After every kill, with no rotator running: at most one
current version, never one current and retired at once, it works (logs in),
bounded pending versions and roles. At the end: 0 consumer failures, and the
rotations went on. ``make test``: a short run on three of the nine pairs;
``make fuzz`` (BATON_FUZZ=1): every pair, >= 500 kills in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import VaultAuthConfig
from daemon.errors import BatonError
from daemon.model import PENDING, Secret
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.ledger import PROMOTED, ledger
from daemon.stores.aws import AwsStore
from daemon.stores.base import SecretStore
from daemon.stores.local import LocalStore
from daemon.stores.vault import VaultStore
from tests.fixtures.moto import AWS_ENV, MotoServer
from tests.fixtures.postgres import PgScratch, login_error
from tests.fixtures.vault import VaultTarget
from tests.fuzz import FUZZ, scale

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, pytest.mark.slow]

BATON = str(Path(sys.executable).with_name("baton"))
STORES = ["local", "openbao", "moto"]
STRATEGIES = ["password", "alternating-users", "role-per-version"]
# make test: one pair per store and per strategy; make fuzz: all nine.
PAIRS = (
    [(s, t) for s in STORES for t in STRATEGIES]
    if FUZZ
    else [("local", "alternating-users"), ("openbao", "role-per-version"), ("moto", "password")]
)
# per pair: 15 under make test, 540 under make fuzz; BATON_FUZZ_KILLS picks another count (one pair with -k)
KILLS = int(os.environ.get("BATON_FUZZ_KILLS") or scale(ci=5, fuzz=60))
LEAD_BOUND = 30.0  # seconds a started rotator gets to take the lease before it is killed all the same
MAX_ROLES = {"alternating-users": 2, "role-per-version": 4}


@dataclass
class Campaign:
    root: Path
    store_kind: str
    strategy: str
    key: str
    store: SecretStore
    store_config: dict[str, Any]
    env: dict[str, str]
    scratch: PgScratch | None = None
    uses: int = 0
    failures: list[str] = field(default_factory=list)
    passwords: set[str] = field(default_factory=set)

    @property
    def base(self) -> str:
        assert self.scratch is not None
        return f"{self.scratch.prefix}app"

    def write_config(self) -> Path:
        rotation: dict[str, Any] = {
            "every": 1,
            "max_draining": 1,
            "lease_ttl": 2.0,
        }  # renewals get ttl/3 each: room on a loaded machine
        if self.strategy == "password":
            rotation["generator"] = {"kind": "password", "length": 24}
        else:
            assert self.scratch is not None
            rotation["provider"] = {
                "kind": "postgres",
                "admin_dsn_file": str(self.scratch.admin_dsn_file),
                "strategy": self.strategy,
                "username": self.base,
                "grant_role": f"{self.scratch.prefix}rw",
                "database": self.scratch.dbname,
            }
        data = {
            "node_id": "rotator",
            "store": self.store_config,
            "api": {"listen": f"unix:{self.root}/api.sock"},
            "log": {"format": "json", "level": "info"},
            "report": {"heartbeat": 0.5, "ttl": 5},
            "credentials": [
                {"name": "db", "key": self.key, "output": {"dir": str(self.root / "out")}, "rotation": rotation}
            ],
        }
        path = self.root / "baton.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    async def works(self, version: str, payload: Secret) -> str | None:
        """None when the payload is a live credential, else why not."""
        if self.scratch is None:
            try:
                got = await self.store.read(self.key, version)  # type: ignore[arg-type]
            except BatonError as e:
                return str(e)
            return None if not got.info.retired else "retired"
        data = json.loads(payload.reveal())
        self.passwords.add(data["password"])
        return await login_error(
            self.scratch.cluster, user=data["username"], password=data["password"], dbname=self.scratch.dbname
        )

    def login_roles(self) -> set[str]:
        assert self.scratch is not None
        rows = self.scratch.admin_sql(
            f"SELECT rolname FROM pg_roles WHERE starts_with(rolname, '{self.base}_') AND rolcanlogin"
        )
        return {str(r[0]) for r in rows}

    def roles(self) -> int:
        assert self.scratch is not None
        rows = self.scratch.admin_sql(f"SELECT count(*) FROM pg_roles WHERE starts_with(rolname, '{self.base}_')")
        return int(rows[0][0])  # type: ignore[call-overload]


async def consume(c: Campaign, stop: asyncio.Event) -> None:
    """Log in with the current payload in a loop, and report as the one node (current, in use)."""
    reporter = MetadataReporter(c.store)
    while not stop.is_set():
        try:
            got = await c.store.read(c.key)
            meta = await c.store.read_metadata(c.key)
        except BatonError:
            await asyncio.sleep(0.05)  # no current version yet, or a store hiccup: not a use
            continue
        vid = got.info.id
        ours = ledger(meta).get(vid)
        report = NodeReport(node="node-a", credential="db", current=vid, in_use={vid: 1}, heartbeat=time.time())
        with contextlib.suppress(BatonError):
            await reporter.publish(c.key, report)
        if ours is not None and ours.state == PROMOTED:  # a seed written before Baton is not a credential
            c.uses += 1
            why = await c.works(vid, got.payload)
            if why is not None:
                c.failures.append(f"version {vid}: {why}")
        await asyncio.sleep(0.05)


async def check_invariants(c: Campaign, kill: int) -> None:
    versions = await c.store.versions(c.key) if await _exists(c) else []
    current = [v for v in versions if v.is_current]
    where = f"after kill {kill} ({c.store_kind}, {c.strategy})"
    assert len(current) <= 1, f"{where}: {len(current)} current versions"
    assert not any(v.retired for v in current), f"{where}: version {current[0].id} is current and retired"
    pending = [v for v in versions if PENDING in v.stages and not v.retired]
    assert len(pending) <= 2, f"{where}: {len(pending)} pending versions"
    live = [v for v in versions if not v.retired]
    assert len(live) <= 5, f"{where}: {len(live)} versions not retired"
    if c.scratch is not None:
        assert c.roles() <= MAX_ROLES[c.strategy], f"{where}: {c.roles()} roles"
        # Nothing live is orphaned: a role that can log in is named by a version the store has
        # (else nothing ever retires it, and alternating-users stops rotating for good).
        orphans = c.login_roles() - await _named_roles(c, versions)
        assert not orphans, f"{where}: role(s) {sorted(orphans)} can log in and no version names them"
    if current:
        meta = await c.store.read_metadata(c.key)
        own = ledger(meta).get(current[0].id)
        if own is not None and own.state == PROMOTED:
            payload = (await c.store.read(c.key)).payload
            why = await c.works(current[0].id, payload)
            assert why is None, f"{where}: the current version {current[0].id} does not work: {why}"


async def _named_roles(c: Campaign, versions: list[Any]) -> set[str]:
    owned = ledger(await c.store.read_metadata(c.key)) if versions else {}
    named = set()
    for v in versions:
        if v.id in owned and owned[v.id].principal:
            named.add(owned[v.id].principal)
        elif not v.retired:
            with contextlib.suppress(BatonError, ValueError, KeyError, TypeError):
                named.add(json.loads((await c.store.read(c.key, v.id)).payload.reveal())["username"])
    return named


async def _exists(c: Campaign) -> bool:
    try:
        await c.store.read_metadata(c.key)
    except BatonError:
        return False
    return True


async def run_rotator(c: Campaign, config: Path, *, seconds: float, log: Path) -> bool:
    """Start ``baton rotator``, and once it leads (or after ``LEAD_BOUND``) let it run ``seconds`` more,
    then kill -9 it. Returns whether it led; asserts it did not exit by itself.

    The kill is timed from the rotator's lease, not from its spawn: on a loaded machine its start
    (imports, first store call) and the lease taken over from the killed one can outlast a whole
    run timed from spawn, and a campaign whose kills all land before the rotator leads tests nothing.
    """
    env = {**os.environ, **c.env, "BATON_TEST_DELAY": "0.05"}
    proc = await asyncio.create_subprocess_exec(
        BATON,
        "rotator",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    led = asyncio.Event()
    copier = asyncio.create_task(_copy_log(proc, log, led), name="rotator-log")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(led.wait(), LEAD_BOUND)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), seconds)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await copier
    assert proc.returncode == -signal.SIGKILL, f"the rotator exited by itself ({proc.returncode}); see {log}"
    return led.is_set()


async def _copy_log(proc: asyncio.subprocess.Process, log: Path, led: asyncio.Event) -> None:
    """The rotator's output into ``log``; ``led`` is set once it says it leads."""
    assert proc.stdout is not None
    with log.open("ab") as out:
        async for line in proc.stdout:
            out.write(line)
            if b'"rotator_leading"' in line:
                led.set()


@pytest.fixture
async def campaign(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Campaign]:
    store_kind, strategy = request.param
    scratch: PgScratch | None = None
    if strategy != "password":
        scratch = request.getfixturevalue("pg_scratch")
        scratch.admin_sql(f"CREATE ROLE {scratch.prefix}rw NOLOGIN")
    store: SecretStore
    if store_kind == "local":
        key = "app/db"
        store_config: dict[str, Any] = {"kind": "local", "path": str(tmp_path / "store.db")}
        store, env = LocalStore(tmp_path / "store.db", watch_files=False), {}
    elif store_kind == "openbao":
        bao: VaultTarget = request.getfixturevalue("openbao")
        key = f"{request.getfixturevalue('openbao_prefix')}/db"
        store_config = {"kind": "vault", "url": bao.url, "auth": {"method": "token"}, "timeout": 5}
        env = {"VAULT_TOKEN": bao.root_token}
        store = VaultStore(url=bao.url, auth=VaultAuthConfig(method="token"), env=env, timeout=5.0)
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        key = f"app/db-{random.randrange(1 << 30)}"
        store_config = {"kind": "aws", "endpoint_url": moto.url, "timeout": 5}
        env = dict(AWS_ENV)
        with moto.client("secretsmanager") as sm:
            # moto answers 500 to ListSecretVersionIds of a missing secret: make it first, as an operator does.
            sm.create_secret(Name=key, SecretString="seed-before-baton")
        store = AwsStore(endpoint_url=moto.url, timeout=5.0)
    c = Campaign(tmp_path, store_kind, strategy, key, store, store_config, env, scratch)
    try:
        yield c
    finally:
        await store.aclose()


@pytest.mark.parametrize("campaign", PAIRS, indirect=True, ids=[f"{s}-{t}" for s, t in PAIRS])
async def test_kill_9_of_the_rotator_at_random_moments_keeps_every_invariant(campaign: Campaign) -> None:
    c = campaign
    config = c.write_config()
    log = c.root / "rotator.log"
    rng = random.Random(os.environ.get("BATON_FUZZ_SEED") or None)
    stop = asyncio.Event()
    led = 0  # runs in which the rotator took the lease before its kill
    consumer = asyncio.create_task(consume(c, stop), name="consumer")
    try:
        for kill in range(KILLS):
            led += await run_rotator(c, config, seconds=rng.uniform(0.0, 3.0), log=log)
            await check_invariants(c, kill)
        # A last run, long enough to rotate and retire with no kill in the way.
        led += await run_rotator(c, config, seconds=8.0, log=log)
        await check_invariants(c, KILLS)
    finally:
        stop.set()
        await consumer
    versions = await c.store.versions(c.key)
    meta = await c.store.read_metadata(c.key)
    promoted = [v for v in versions if v.id in ledger(meta) or v.retired]
    assert c.failures == [], f"{len(c.failures)} consumer failures in {c.uses} uses: {c.failures[:5]}"
    text = log.read_text(errors="replace")
    print(f"{c.store_kind}-{c.strategy}: {KILLS} kills, led in {led}, {len(promoted)} promoted, {c.uses} uses")
    assert led > KILLS // 2, f"the rotator took the lease in only {led} of {KILLS + 1} runs; log:\n{text[-3000:]}"
    assert c.uses > 0, f"the consumer never used a credential Baton rotated; log:\n{text[-3000:]}"
    assert len(promoted) >= 2, f"rotation made no progress over {KILLS} kills: {versions}; log:\n{text[-3000:]}"
    assert not any(p in text for p in c.passwords), "a minted password reached the rotator's log"
