"""Issue 18 on real servers: the rotator retires only what it applied, and never re-passwords a live role.

Each test first does what broke it (a real OpenBao dev server, moto_server,
PostgreSQL 15): an operator's ``bao kv put``/``bao kv metadata delete`` typed
as an operator types it, staging labels removed by hand with boto3, ``baton
store put`` of a seed, a slow answer through ``tests/doubles/faultproxy.py``,
a rotator that dies between the store's write and Baton's record, and a token
that may write data but not patch metadata. Then it checks the current
credential still logs in, what Baton said (events), and that nothing in use
was retired or re-passworded. No secret value may appear in the captured logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, ProviderConfig, VaultAuthConfig
from daemon.errors import StoreError
from daemon.model import Secret, VersionId
from daemon.providers.postgres import PostgresProvider
from daemon.report.base import NodeReport
from daemon.report.metadata import MetadataReporter
from daemon.rotation.ledger import OWN_PREFIX
from daemon.rotation.workflow import CredentialRotator
from daemon.stores.aws import AwsStore
from daemon.stores.base import SecretStore
from daemon.stores.local import LocalStore
from daemon.stores.vault import VaultStore
from tests.doubles.faultproxy import FaultProxy, Rule
from tests.fixtures.moto import MotoServer
from tests.fixtures.postgres import PgScratch, login_error
from tests.fixtures.vault import VaultTarget

pytestmark = pytest.mark.integration

BAO = Path(sys.executable).with_name("bao")


@dataclass
class Db:
    scratch: PgScratch
    strategy: str
    base: str
    grant: str

    def provider(self) -> PostgresProvider:
        return PostgresProvider(
            ProviderConfig(
                kind="postgres",
                admin_dsn_file=self.scratch.admin_dsn_file,
                strategy=self.strategy,  # type: ignore[arg-type]
                username=self.base,
                grant_role=self.grant,
                database=self.scratch.dbname,
            )
        )

    async def login(self, payload: Secret) -> str | None:
        data = json.loads(payload.reveal())
        return await login_error(
            self.scratch.cluster, user=data["username"], password=data["password"], dbname=self.scratch.dbname
        )

    def can_login(self, role: str) -> bool | None:
        rows = self.scratch.admin_sql(f"SELECT rolcanlogin FROM pg_roles WHERE rolname = '{role}'")
        return None if not rows else bool(rows[0][0])


def make_db(scratch: PgScratch, strategy: str) -> Db:
    db = Db(scratch=scratch, strategy=strategy, base=f"{scratch.prefix}app", grant=f"{scratch.prefix}rw")
    scratch.admin_sql(f"CREATE ROLE {db.grant} NOLOGIN")
    return db


def make_config(tmp_path: Path, key: str) -> Config:
    return Config.model_validate(
        {
            "node_id": "rotator-1",
            "store": {"kind": "local", "path": str(tmp_path / "unused.db")},
            "report": {"heartbeat": 10, "ttl": 30},
            "credentials": [
                {
                    "name": "db",
                    "key": key,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": 3600, "max_draining": 1},
                }
            ],
        }
    )


def rotator(tmp_path: Path, key: str, store: SecretStore, provider: Any) -> CredentialRotator:
    config = make_config(tmp_path, key)
    return CredentialRotator(
        config=config,
        credential=config.credentials[0],
        store=store,
        reporter=MetadataReporter(store),
        provider=provider,
    )


async def everyone_on(store: SecretStore, key: str, version: str) -> None:
    """One node, on ``version``, holding nothing else."""
    report = NodeReport(node="node-a", credential="db", current=version, heartbeat=time.time(), agent_version="t")
    await MetadataReporter(store).publish(key, report)


def role_of(payload: Secret) -> str:
    return str(json.loads(payload.reveal())["username"])


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def assert_no_secret(caplog: pytest.LogCaptureFixture, *payloads: Secret) -> None:
    texts = [caplog.text, *(repr(vars(r)) for r in caplog.records)]
    for p in payloads:
        password = json.loads(p.reveal())["password"]
        assert not any(password in t for t in texts)


# ---------------------------------------------------------------- OpenBao


@pytest.fixture
async def bao_store(openbao: VaultTarget) -> AsyncIterator[VaultStore]:
    store = VaultStore(
        url=openbao.url,
        auth=VaultAuthConfig(method="token"),
        env={"VAULT_TOKEN": openbao.root_token},
        timeout=5.0,
    )
    yield store
    await store.aclose()


def bao(openbao: VaultTarget, *argv: str) -> str:
    """The ``bao`` CLI as an operator runs it (token in the environment, never on the command line)."""
    env = {**os.environ, "BAO_ADDR": openbao.url, "BAO_TOKEN": openbao.root_token, "HOME": "/tmp"}
    done = subprocess.run([str(BAO), *argv], env=env, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def kv_versions(openbao: VaultTarget, key: str) -> int:
    c = openbao.client()
    try:
        return len(c.adapter.get(f"/v1/secret/metadata/{key}")["data"]["versions"])
    finally:
        c.adapter.close()


async def test_a_version_written_by_hand_is_retired_in_the_store_only_and_never_drops_the_current_role(
    openbao: VaultTarget,
    openbao_prefix: str,
    bao_store: VaultStore,
    pg_scratch: PgScratch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    key = f"{openbao_prefix}/db"
    db = make_db(pg_scratch, "role-per-version")
    r = rotator(tmp_path, key, bao_store, db.provider())
    assert (await r.rotate()).result == "rotated"
    await everyone_on(bao_store, key, "1")
    assert (await r.rotate()).result == "rotated"
    await everyone_on(bao_store, key, "2")
    assert await r.retire_ready() == ["1"]

    # The operator writes the next role's name by hand (finding 1).
    bao(openbao, "kv", "put", f"secret/{key}", f"username={db.base}_v3", "password=typed-by-hand")
    outcome = await r.rotate()
    assert outcome.result == "rotated" and outcome.version == "4"
    current = (await bao_store.read(key)).payload
    assert role_of(current) == f"{db.base}_v3", "no role _v3 existed: the fresh name is _v3"
    await everyone_on(bao_store, key, "4")

    assert sorted(await r.retire_ready()) == ["2", "3"]

    assert await db.login(current) is None, "the current role must still log in"
    assert db.can_login(f"{db.base}_v3") is True
    assert db.can_login(f"{db.base}_v2") is None, "Baton's own superseded role was dropped"
    [store_only] = events(caplog, "retired_in_store_only")
    assert store_only.version == "3" and store_only.found == "not applied by Baton"  # type: ignore[attr-defined]
    meta = await bao_store.read_metadata(key)
    assert {k for k in meta if k.startswith(OWN_PREFIX)} == {OWN_PREFIX + "4"}
    assert_no_secret(caplog, current)


async def test_a_slow_answer_to_the_data_write_is_resumed_not_written_again(
    openbao: VaultTarget,
    openbao_prefix: str,
    bao_store: VaultStore,
    pg_scratch: PgScratch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    key = f"{openbao_prefix}/db"
    db = make_db(pg_scratch, "alternating-users")
    host, port = openbao.url.removeprefix("http://").split(":")
    proxy = await FaultProxy(host, int(port)).start()
    slow = VaultStore(
        url=proxy.url, auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": openbao.root_token}, timeout=0.5
    )
    try:
        r = rotator(tmp_path, key, slow, db.provider())
        assert (await r.rotate()).result == "rotated"
        first = (await bao_store.read(key)).payload
        await everyone_on(bao_store, key, "1")
        # The data write lands, its answer comes after the store's timeout.
        proxy.rules.append(Rule("POST", f"/v1/secret/data/{key}", delay=1.5))

        failed = await r.rotate()

        assert (failed.result, failed.step) == ("failed", "write")
        assert kv_versions(openbao, key) == 2
        writes = [p for m, p in proxy.seen if m == "POST" and "/data/" in p]
        resumed = await r.rotate()
        assert resumed.result == "rotated" and resumed.version == "2"
        assert [p for m, p in proxy.seen if m == "POST" and "/data/" in p] == writes, "no second data write"
        assert kv_versions(openbao, key) == 2
        assert len(events(caplog, "rotation_resumed")) == 1
        second = (await bao_store.read(key)).payload
        assert role_of(second) == f"{db.base}_b" and await db.login(second) is None
        assert await db.login(first) is None, "the previous slot keeps working until retired"
        assert_no_secret(caplog, first, second)
    finally:
        await slow.aclose()
        await proxy.stop()


@pytest.mark.parametrize("operator", ["kv metadata delete", "kv delete"])
async def test_a_lost_secret_never_re_passwords_the_slot_in_use(
    openbao: VaultTarget,
    openbao_prefix: str,
    bao_store: VaultStore,
    pg_scratch: PgScratch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    operator: str,
) -> None:
    caplog.set_level(logging.INFO)
    key = f"{openbao_prefix}/db"
    db = make_db(pg_scratch, "alternating-users")
    r = rotator(tmp_path, key, bao_store, db.provider())
    for n in (1, 2, 3):  # a, b, a: slot a is current, b was retired (NOLOGIN)
        assert (await r.rotate()).result == "rotated"
        await everyone_on(bao_store, key, str(n))
        await r.retire_ready()
    live = (await bao_store.read(key)).payload
    assert role_of(live) == f"{db.base}_a" and db.can_login(f"{db.base}_b") is False

    bao(openbao, *operator.split(), f"secret/{key}")  # finding 2
    outcome = await r.rotate()

    assert outcome.result == "rotated"
    assert len(events(caplog, "current_version_lost")) == 1
    new = (await bao_store.read(key)).payload
    assert role_of(new) == f"{db.base}_b", "the live slot a is not re-passworded"
    assert await db.login(live) is None, "what consumers hold keeps working"
    assert await db.login(new) is None
    # With slot a still live and no version naming it, the next rotation stops and says why.
    await everyone_on(bao_store, key, outcome.version or "")
    await r.retire_ready()
    stopped = await r.rotate()
    if stopped.result == "failed":
        assert stopped.step == "create" and "will not re-password a live role" in (stopped.error or "")
    assert await db.login(live) is None
    assert_no_secret(caplog, live, new)


def gauge(name: str, credential: str = "db") -> float | None:
    from daemon.kit import metrics

    return metrics.REGISTRY.get_sample_value(name, {"credential": credential})


@pytest.mark.parametrize("strategy", ["alternating-users", "role-per-version"])
async def test_a_store_that_lost_the_current_version_says_what_is_live_and_never_touches_it(
    openbao: VaultTarget,
    openbao_prefix: str,
    bao_store: VaultStore,
    pg_scratch: PgScratch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    strategy: str,
) -> None:
    import asyncio

    import psycopg

    caplog.set_level(logging.INFO)
    key = f"{openbao_prefix}/db"
    db = make_db(pg_scratch, strategy)
    r = rotator(tmp_path, key, bao_store, db.provider())
    for n in (1, 2):
        assert (await r.rotate()).result == "rotated"
        await everyone_on(bao_store, key, str(n))
        await r.retire_ready()
    lost = (await bao_store.read(key)).payload
    lost_role = role_of(lost)
    data = json.loads(lost.reveal())
    # A consumer holds a session on the lost credential, and another logs in with it, or with
    # whatever the store calls current, in a loop throughout.
    held = await psycopg.AsyncConnection.connect(
        pg_scratch.cluster.dsn(dbname=pg_scratch.dbname, user=lost_role, password=data["password"])
    )
    failures: list[str] = []
    uses = 0
    stop = asyncio.Event()
    round_done = asyncio.Event()  # set after each round of logins

    async def consume() -> None:
        nonlocal uses
        while not stop.is_set():
            payloads = [lost]
            with contextlib.suppress(StoreError):  # no current version while the key is gone: it keeps what it has
                payloads.append((await bao_store.read(key)).payload)
            for p in payloads:
                why = await db.login(p)
                uses += 1
                if why is not None:
                    failures.append(f"{role_of(p)}: {why}")
            round_done.set()
            await asyncio.sleep(0.02)

    consumer = asyncio.create_task(consume())
    try:
        bao(openbao, "kv", "metadata", "delete", f"secret/{key}")  # the store lost every version
        outcome = await r.rotate()

        assert outcome.result == "rotated", "a fresh principal keeps new nodes going"
        new = (await bao_store.read(key)).payload
        assert role_of(new) != lost_role
        [said] = events(caplog, "live_credential_unrecorded")
        assert said.live == [lost_role] and "left as it is" in said.action  # type: ignore[attr-defined]
        assert gauge("baton_live_unrecorded_principals") == 1
        await everyone_on(bao_store, key, outcome.version or "")
        assert await r.retire_ready() == [], "nothing names the lost role: nothing retires it"

        follow = await r.rotate()
        if strategy == "alternating-users":
            # Its only other slot is the live one: it stops, and says what is live and what to do.
            assert (follow.result, follow.step) == ("failed", "create")
            [blocked] = events(caplog, "rotation_blocked")
            assert blocked.live == [lost_role]  # type: ignore[attr-defined]
            assert f"ALTER ROLE {lost_role} NOLOGIN" in blocked.action  # type: ignore[attr-defined]
            assert gauge("baton_rotation_blocked") == 1
        else:
            assert follow.result == "rotated", "a fresh role name every time: nothing is in the way"
            assert events(caplog, "rotation_blocked") == []
            assert gauge("baton_rotation_blocked") == 0
        assert len(events(caplog, "live_credential_unrecorded")) == 1, "said once, not at every rotation"
        assert db.can_login(lost_role) is True, "the live role is left as it is"
        await held.execute("SELECT 1")  # the session held on it goes on
        assert await db.login(lost) is None, "never re-passworded"
        round_done.clear()
        await asyncio.wait_for(round_done.wait(), 30)  # one more full round, after all of it
    finally:
        stop.set()
        await consumer
        await held.close()
    assert failures == [], failures[:5]
    assert uses >= 3

    # The operator does what the alert says, once nothing uses the lost role.
    pg_scratch.admin_sql(f"ALTER ROLE {lost_role} NOLOGIN")
    after = await r.rotate()
    assert after.result in ("rotated", "postponed")
    assert gauge("baton_live_unrecorded_principals") == 0
    if strategy == "alternating-users":
        assert after.result == "rotated" and gauge("baton_rotation_blocked") == 0
    assert_no_secret(caplog, lost, new)


async def test_a_token_that_cannot_patch_metadata_writes_no_version(
    openbao: VaultTarget, openbao_prefix: str, bao_store: VaultStore, tmp_path: Path
) -> None:
    from daemon.config import GeneratorConfig
    from daemon.providers.password import PasswordProvider

    key = f"{openbao_prefix}/db"
    c = openbao.client()
    try:
        c.sys.create_or_update_policy(
            name="write-no-patch",
            policy=(
                f'path "secret/data/{openbao_prefix}/*" {{ capabilities = ["create", "update", "read"] }}\n'
                f'path "secret/metadata/{openbao_prefix}/*" {{ capabilities = ["read", "list"] }}'
            ),
        )
        token = c.auth.token.create(policies=["write-no-patch"], ttl="1h")["auth"]["client_token"]
    finally:
        c.adapter.close()
    openbao.write(key, {"value": "seed-value-123"})
    limited = VaultStore(url=openbao.url, auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    try:
        r = rotator(tmp_path, key, limited, PasswordProvider(GeneratorConfig(length=24)))
        outcomes = [await r.rotate() for _ in range(12)]  # finding 5: more than KV's 10
    finally:
        await limited.aclose()

    assert {(o.result, o.step) for o in outcomes} == {("failed", "write")}
    assert kv_versions(openbao, key) == 1, "nothing is written while the record of it cannot be"
    assert (await bao_store.read(key)).payload == Secret("seed-value-123")


async def test_a_revoked_token_makes_the_retire_loop_back_off_not_warn_every_pass(
    openbao: VaultTarget, openbao_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from daemon.rotation.service import Rotator

    caplog.set_level(logging.INFO)
    key = f"{openbao_prefix}/db"
    c = openbao.client()
    try:
        token = c.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    finally:
        c.adapter.close()
    store = VaultStore(url=openbao.url, auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token}, timeout=5.0)
    config = Config.model_validate(
        {
            "node_id": "rotator-1",
            "store": {"kind": "local", "path": str(tmp_path / "unused.db")},
            "report": {"heartbeat": 0.2, "ttl": 30},  # a retire pass every 0.1 s
            "agent": {"retry_min": 0.4, "retry_max": 5},
            "credentials": [
                {
                    "name": "db",
                    "key": key,
                    "output": {"dir": str(tmp_path / "out")},
                    "rotation": {"every": 3600, "generator": {"kind": "password", "length": 24}},
                }
            ],
        }
    )
    service = Rotator(config, store=store, reporter=MetadataReporter(store), install_signals=False, serve_api=False)
    r = service.rotators["db"]
    r.fence = None  # this test leads alone; serve() (not run here) would take the lease
    try:
        for _ in (1, 2):
            outcome = await r.rotate()
            assert outcome.result == "rotated", outcome
            await everyone_on(store, key, "1")  # still on 1: version 1 waits to retire
        c = openbao.client()
        try:
            c.auth.token.revoke(token)  # as `bao token revoke` does
        finally:
            c.adapter.close()
        caplog.clear()
        loop = asyncio.create_task(service.retire_loop(r))
        window = 3.0  # 30 passes without backoff; with 0.4 s doubling, jittered to 50-100 %: at most 5
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(loop), window)
        service.should_exit.set()
        await asyncio.wait_for(loop, 10)
    finally:
        await store.aclose()

    failed = [rec for rec in caplog.records if rec.getMessage() == "retirement check failed"]
    assert 1 <= len(failed) <= 5, f"{len(failed)} warnings in {window} s"
    delays = [rec.retry_in for rec in failed]  # type: ignore[attr-defined]
    if len(delays) >= 3:
        assert delays[-1] > delays[0], f"the delay grows: {delays}"
    loud = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(loud) <= 2 * len(failed), [rec.getMessage() for rec in loud]
    assert token not in caplog.text


async def test_a_write_that_would_make_kv_purge_a_live_version_is_refused(
    openbao: VaultTarget, openbao_prefix: str, bao_store: VaultStore
) -> None:
    key = f"{openbao_prefix}/db"
    bao(openbao, "kv", "put", f"secret/{key}", "value=live-one")
    bao(openbao, "kv", "metadata", "put", "-max-versions=3", f"secret/{key}")
    await bao_store.promote(key, VersionId("1"))
    for n in (2, 3):
        bao(openbao, "kv", "put", f"secret/{key}", f"value=by-hand-{n}")

    with pytest.raises(StoreError, match=r"would make KV purge version\(s\) 1, which are not retired"):
        await bao_store.create(key, Secret("next-value"))

    assert kv_versions(openbao, key) == 3
    assert (await bao_store.read(key)).payload == Secret("live-one")
    await bao_store.retire(key, VersionId("2"))  # the oldest is retired: room for one more
    await bao_store.promote(key, VersionId("3"))
    await bao_store.retire(key, VersionId("1"))
    info = await bao_store.create(key, Secret("next-value"))
    assert info.id == "4"


# ---------------------------------------------------------------- moto


@pytest.fixture
async def aws_store(moto: MotoServer) -> AsyncIterator[AwsStore]:
    store = AwsStore(endpoint_url=moto.url, poll_interval=0.05, timeout=5.0)
    yield store
    await store.aclose()


@pytest.fixture
def sm(moto: MotoServer) -> Iterator[Any]:
    with moto.client("secretsmanager") as client:
        yield client


async def test_labels_removed_by_hand_do_not_end_a_drain(
    aws_store: AwsStore, sm: Any, pg_scratch: PgScratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = "app/db-labels"
    seed_secret(sm, key)
    db = make_db(pg_scratch, "alternating-users")
    r = rotator(tmp_path, key, aws_store, db.provider())
    first = (await r.rotate()).version
    assert first is not None
    await everyone_on(aws_store, key, first)
    assert len(await r.retire_ready()) == 1  # the seed
    second = (await r.rotate()).version
    draining = (await aws_store.read(key, VersionId(first))).payload

    # Finding 3: the operator strips every label from the draining version.
    for label in sm.describe_secret(SecretId=key)["VersionIdsToStages"][first]:
        sm.update_secret_version_stage(SecretId=key, VersionStage=label, RemoveFromVersionId=first)
    assert [v.retired for v in await aws_store.versions(key) if v.id == first] == [True]

    postponed = await r.rotate()
    assert postponed.result == "postponed", "the version Baton promoted still drains"
    assert await db.login(draining) is None
    assert db.can_login(role_of(draining)) is True

    await everyone_on(aws_store, key, second or "")
    assert await r.retire_ready() == [first]
    assert db.can_login(role_of(draining)) is False, "retired through the provider, by Baton"
    assert (await r.rotate()).result == "rotated"
    assert_no_secret(caplog, draining)


async def test_a_secret_scheduled_for_deletion_fails_rotation_saying_so_and_how_to_restore_it(
    aws_store: AwsStore, sm: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.config import GeneratorConfig
    from daemon.providers.password import PasswordProvider

    caplog.set_level(logging.INFO)
    key = "app/db-deleted"
    sm.create_secret(Name=key, SecretString="seed-before-baton")
    r = rotator(tmp_path, key, aws_store, PasswordProvider(GeneratorConfig(length=24)))
    assert (await r.rotate()).result == "rotated"
    live = (await aws_store.read(key)).payload
    versions_before = len(sm.list_secret_version_ids(SecretId=key)["Versions"])

    sm.delete_secret(SecretId=key, RecoveryWindowInDays=7)  # as `aws secretsmanager delete-secret` does
    outcome = await r.rotate()

    assert outcome.result == "failed"
    assert "scheduled for deletion" in (outcome.error or "") and "restore-secret" in (outcome.error or "")
    assert "InvalidRequestException" in (outcome.error or "")
    [said] = events(caplog, "rotation_failed")
    assert "scheduled for deletion" in said.error  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match="scheduled for deletion"):
        await aws_store.read(key)

    sm.restore_secret(SecretId=key)
    assert len(sm.list_secret_version_ids(SecretId=key)["Versions"]) == versions_before, "nothing was written"
    assert (await aws_store.read(key)).payload == live
    await everyone_on(aws_store, key, (await aws_store.read(key)).info.id)
    assert len(await r.retire_ready()) == 1  # the seed
    assert (await r.rotate()).result == "rotated", "restored, rotation goes on"
    assert live.reveal() not in caplog.text


def seed_secret(sm: Any, key: str) -> None:
    """The secret as an operator makes it before Baton takes over (moto answers 500, not
    ResourceNotFound, to ListSecretVersionIds of a secret that does not exist)."""
    sm.create_secret(Name=key, SecretString=json.dumps({"username": "seed"}))


class Died(BaseException):
    """The rotator process dying (not an error it could handle)."""


class DiesAfterCreate(AwsStore):
    async def create(self, key: str, payload: Secret) -> Any:
        await super().create(key, payload)
        raise Died


async def test_a_rotator_that_dies_between_the_data_write_and_its_record_resumes_that_version(
    moto: MotoServer, aws_store: AwsStore, sm: Any, pg_scratch: PgScratch, tmp_path: Path
) -> None:
    key = "app/db-died"
    seed_secret(sm, key)
    db = make_db(pg_scratch, "alternating-users")
    dying = DiesAfterCreate(endpoint_url=moto.url, timeout=5.0)
    try:
        with pytest.raises(Died):
            await rotator(tmp_path, key, dying, db.provider()).rotate()
    finally:
        await dying.aclose()
    assert len(sm.list_secret_version_ids(SecretId=key)["Versions"]) == 2

    outcome = await rotator(tmp_path, key, aws_store, db.provider()).rotate()

    assert outcome.result == "rotated"
    assert len(sm.list_secret_version_ids(SecretId=key)["Versions"]) == 2, "resumed, not written again"
    assert await db.login((await aws_store.read(key)).payload) is None
    assert OWN_PREFIX + (outcome.version or "") in await aws_store.read_metadata(key)


# ---------------------------------------------------------------- local store, the operator's CLI


def baton_store(path: Path, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("baton")), "store", "--path", str(path), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


async def test_a_seed_the_provider_did_not_make_never_stalls_rotation(
    pg_scratch: PgScratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = "app/db"
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"username": "seed"}))
    baton_store(tmp_path / "store.db", "put", key, "--value-file", str(seed))  # finding 4
    store = LocalStore(tmp_path / "store.db", watch_files=False)
    try:
        db = make_db(pg_scratch, "alternating-users")
        r = rotator(tmp_path, key, store, db.provider())
        assert (await r.rotate()).result == "rotated"
        await everyone_on(store, key, "2")

        assert await r.retire_ready() == ["1"]
        assert not any("cannot list sessions" in reason for d in r.last_decisions for reason in d.reasons)
        [warned] = events(caplog, "retired_in_store_only")
        assert warned.version == "1"  # type: ignore[attr-defined]
        assert (await r.rotate()).result == "rotated", "rotation goes on"
    finally:
        await store.aclose()


async def test_an_operators_put_in_the_middle_of_a_rotation_does_not_retire_the_version_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.config import GeneratorConfig
    from daemon.errors import ProviderError
    from daemon.providers.password import PasswordProvider

    class FailsTestOnce(PasswordProvider):
        failed = False

        async def test(self, new: Secret) -> None:
            if not self.failed:
                self.failed = True
                raise ProviderError("test refused once")

    caplog.set_level(logging.INFO)
    key = "app/db"
    path = tmp_path / "store.db"
    store = LocalStore(path, watch_files=False)
    try:
        r = rotator(tmp_path, key, store, FailsTestOnce(GeneratorConfig(length=24)))
        assert (await r.rotate()).step == "test"  # version 1 pending, in flight
        (tmp_path / "v.txt").write_text("typed-by-the-operator")
        put = baton_store(path, "put", key, "--value-file", str(tmp_path / "v.txt"))  # finding 6
        assert put.endswith("2")
        assert [sorted(v.stages) for v in store.versions_sync(key)] == [["pending"], ["current"]]
        await everyone_on(store, key, "2")
        assert await r.retire_ready() == [], "the version in flight is not superseded"

        assert (await r.rotate()).version == "1", "the rotation in flight is promoted"
        await everyone_on(store, key, "1")
        await r.retire_ready()
        assert events(caplog, "retirement_failed") == []
        assert [v.retired for v in store.versions_sync(key)] == [False, False]
        # The operator's version is newer than the current one: it is superseded by the next rotation.
        assert (await r.rotate()).version == "3"
        await everyone_on(store, key, "3")
        assert await r.retire_ready() == ["1", "2"]
        [warned] = events(caplog, "retired_in_store_only")
        assert warned.version == "2"  # type: ignore[attr-defined]
    finally:
        await store.aclose()


# ---------------------------------------------------------------- Kubernetes (the apiserver double)
#
# The Kubernetes store keeps at most three versions of a key (the Secret, its -baton-pending
# and -baton-previous companions), so a version overwritten by hand is gone, not kept: what
# Baton applied and the store no longer has is found by asking the provider what is live.


async def kubectl_edit_data(kube_api: Any, name: str, data: dict[str, str]) -> None:
    """``kubectl edit secret <name>`` changing only its data (annotations kept, as an editor leaves them)."""
    import base64

    from kubernetes_asyncio import client, config

    async with await config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        core = client.CoreV1Api(c)
        obj = await core.read_namespaced_secret(name, kube_api.namespace)
        obj.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        await core.replace_namespaced_secret(name, kube_api.namespace, obj)


async def kubectl_annotate_remove(kube_api: Any, name: str, annotation: str) -> None:
    """``kubectl annotate secret <name> <annotation>-``."""
    from kubernetes_asyncio import client, config

    async with await config.new_client_from_config(config_file=str(kube_api.kubeconfig)) as c:
        core = client.CoreV1Api(c)
        await core.patch_namespaced_secret(name, kube_api.namespace, {"metadata": {"annotations": {annotation: None}}})


async def test_kubernetes_a_hand_edit_is_retired_in_the_store_only_and_a_removed_ledger_entry_revokes_nothing(
    kube_api: Any, pg_scratch: PgScratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.clients.kube import annotation_key
    from daemon.stores.kubernetes import KubernetesStore

    caplog.set_level(logging.INFO)
    store = KubernetesStore(namespace=kube_api.namespace, kubeconfig=kube_api.kubeconfig, backoff=(0.02, 0.2))
    key = kube_api.name("db")
    db = make_db(pg_scratch, "role-per-version")
    r = rotator(tmp_path, key, store, db.provider())
    try:
        for _ in (1, 2):
            outcome = await r.rotate()
            assert outcome.result == "rotated", outcome
            await everyone_on(store, key, outcome.version or "")
            await r.retire_ready()
        baton_v2 = (await store.read(key)).payload
        assert role_of(baton_v2) == f"{db.base}_v2" and db.can_login(f"{db.base}_v1") is None

        # Finding 1 on Kubernetes: the operator writes the next role's name into the Secret by hand.
        await kubectl_edit_data(kube_api, key, {"username": f"{db.base}_v3", "password": "typed-by-hand"})
        hand = (await store.read(key)).info.id
        outcome = await r.rotate()
        assert outcome.result == "rotated", outcome
        minted = (await store.read(key)).payload
        assert role_of(minted) == f"{db.base}_v4", "a name the hand version uses is never minted"
        [said] = events(caplog, "live_credential_unrecorded")
        assert said.live == [f"{db.base}_v2"], "Baton's v2, overwritten in the store, is live: said, left"  # type: ignore[attr-defined]
        await everyone_on(store, key, outcome.version or "")
        assert await r.retire_ready() == [hand]
        [store_only] = events(caplog, "retired_in_store_only")
        assert store_only.version == hand and store_only.found == "not applied by Baton"  # type: ignore[attr-defined]
        assert db.can_login(f"{db.base}_v2") is True and await db.login(baton_v2) is None
        assert await db.login(minted) is None

        # A draining version whose ledger annotation is removed by hand: retired in the store
        # once no node holds it, and its role is never dropped by Baton (missing is unknown).
        draining = minted
        outcome = await r.rotate()
        assert outcome.result == "rotated", outcome
        drain_id = next(v.id for v in await store.versions(key) if not v.is_current and not v.retired)
        await kubectl_annotate_remove(kube_api, key, annotation_key(OWN_PREFIX + drain_id))
        await everyone_on(store, key, drain_id)  # the node still holds it
        assert await r.retire_ready() == [], "a node still holds it"
        assert await db.login(draining) is None
        await everyone_on(store, key, outcome.version or "")
        assert await r.retire_ready() == [drain_id]
        assert db.can_login(role_of(draining)) is True, "not Baton's by its record: not revoked"
        assert await db.login((await store.read(key)).payload) is None
        assert_no_secret(caplog, baton_v2, minted)
    finally:
        await store.aclose()


class DiesInRetire(PostgresProvider):
    async def retire(self, old: Secret, *, keep: Any = ()) -> None:
        raise Died


async def test_a_rotator_killed_after_recording_a_retirement_has_the_next_one_finish_it_through_the_provider(
    pg_scratch: PgScratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the crash campaign (OpenBao, alternating-users): killed between ``retiring`` and
    the provider's NOLOGIN, the version was then retired in the store only, slot _a stayed LOGIN
    with no version naming it, and every rotation after stopped: 'will not re-password a live role'."""
    caplog.set_level(logging.INFO)
    key = "app/db"
    store = LocalStore(tmp_path / "store.db", watch_files=False)
    try:
        db = make_db(pg_scratch, "alternating-users")
        r = rotator(tmp_path, key, store, db.provider())
        for n in (1, 2):
            assert (await r.rotate()).result == "rotated"
            await everyone_on(store, key, str(n))
        dying = rotator(tmp_path, key, store, DiesInRetire(db.provider().config))
        with pytest.raises(Died):
            await dying.retire_ready()
        assert (await store.read_metadata(key))[OWN_PREFIX + "1"].startswith("retiring:")
        assert db.can_login(f"{db.base}_a") is True

        after = rotator(tmp_path, key, store, db.provider())
        assert await after.retire_ready() == ["1"]

        assert db.can_login(f"{db.base}_a") is False, "the provider finished the retirement"
        assert events(caplog, "retired_in_store_only") == []
        assert OWN_PREFIX + "1" not in await store.read_metadata(key)
        outcome = await after.rotate()
        assert outcome.result == "rotated", outcome
        assert await db.login((await store.read(key)).payload) is None
    finally:
        await store.aclose()
