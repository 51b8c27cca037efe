"""The postgres provider's three strategies against a real PostgreSQL 15 cluster."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import psycopg
import pytest

from daemon.config import ProviderConfig
from daemon.errors import ProviderError
from daemon.model import Secret
from daemon.providers.postgres import PostgresProvider
from tests.fixtures.postgres import PgScratch, login_error

pytestmark = pytest.mark.integration

STRATEGIES = ["alternating-users", "role-per-version", "single-user"]


@dataclass(frozen=True)
class Env:
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
                host="db.example.internal",
                port=5432,
                database=self.scratch.dbname,
            )
        )

    async def login(self, payload: Secret) -> str | None:
        data = json.loads(payload.reveal())
        return await login_error(
            self.scratch.cluster, user=data["username"], password=data["password"], dbname=self.scratch.dbname
        )

    def role(self, name: str) -> tuple[bool, str | None] | None:
        rows = self.scratch.admin_sql(
            f"SELECT rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = '{name}'"
        )
        return None if not rows else (bool(rows[0][0]), rows[0][1])  # type: ignore[return-value]

    def roles(self) -> list[str]:
        rows = self.scratch.admin_sql(
            f"SELECT rolname FROM pg_roles WHERE starts_with(rolname, '{self.base}_') ORDER BY 1"
        )
        return [str(r[0]) for r in rows]


def make_env(scratch: PgScratch, strategy: str) -> Env:
    env = Env(scratch=scratch, strategy=strategy, base=f"{scratch.prefix}app", grant=f"{scratch.prefix}rw")
    scratch.admin_sql(f"CREATE ROLE {env.grant} NOLOGIN")
    scratch.admin_sql(f"GRANT CREATE ON SCHEMA public TO {env.grant}")
    if strategy == "single-user":
        # single-user rotates the password of a role that exists already, not Baton's.
        scratch.admin_sql(f"CREATE ROLE {env.base} LOGIN PASSWORD 'initial-pw-1'")
    return env


def username(payload: Secret) -> str:
    return str(json.loads(payload.reveal())["username"])


async def rotate(provider: PostgresProvider, current: Secret | None) -> Secret:
    new = await provider.create(current=current)
    await provider.apply(new, current=current)
    await provider.test(new)
    return new


# ---------------------------------------------------------------- payload


async def test_the_payload_carries_username_password_and_the_configured_host_port_database(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "alternating-users")
    new = await env.provider().create(current=None)
    data = json.loads(new.reveal())
    assert set(data) == {"username", "password", "host", "port", "database"}
    assert data["host"] == "db.example.internal" and data["port"] == 5432 and data["database"] == pg_scratch.dbname
    assert len(data["password"]) >= 32
    assert repr(new) == "Secret(***)"


# ---------------------------------------------------------------- alternating users


async def test_alternating_users_uses_slot_a_first_then_b_then_a_again(pg_scratch: PgScratch) -> None:
    env = make_env(pg_scratch, "alternating-users")
    p = env.provider()
    v1 = await rotate(p, None)
    v2 = await rotate(p, v1)
    await p.retire(v1)
    v3 = await rotate(p, v2)
    assert [username(v) for v in (v1, v2, v3)] == [f"{env.base}_a", f"{env.base}_b", f"{env.base}_a"]
    assert await env.login(v3) is None
    assert await env.login(v2) is None
    assert env.role(f"{env.base}_a") == (True, "managed by baton")
    member = pg_scratch.admin_sql(f"SELECT pg_has_role('{env.base}_a', '{env.grant}', 'MEMBER')")
    assert member == [(True,)]


async def test_alternating_users_old_role_keeps_working_after_apply_until_retire_sets_nologin(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "alternating-users")
    p = env.provider()
    old = await rotate(p, None)
    new = await p.create(current=old)
    await p.apply(new, current=old)
    assert await env.login(old) is None, "the current role must keep working while the new one is applied"
    await p.test(new)
    assert await env.login(old) is None
    await p.retire(old)
    error = await env.login(old)
    assert error is not None and "not permitted to log in" in error
    assert env.role(username(old)) == (False, "managed by baton"), "retire locks the slot, it does not drop it"
    assert await env.login(new) is None


async def test_alternating_users_retire_of_a_superseded_slot_does_not_lock_its_newer_password(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "alternating-users")
    p = env.provider()
    v1 = await rotate(p, None)
    v2 = await rotate(p, v1)
    await p.retire(v1)
    v3 = await rotate(p, v2)  # slot a again, new password
    await p.retire(v1)  # a stale, repeated retire of the first version
    assert await env.login(v3) is None
    assert env.role(username(v3)) == (True, "managed by baton")


async def test_sessions_lists_a_live_connection_of_the_old_role_with_its_application_name(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "alternating-users")
    p = env.provider()
    old = await rotate(p, None)
    new = await rotate(p, old)
    assert await p.sessions(old) == []
    data = json.loads(old.reveal())
    dsn = pg_scratch.cluster.dsn(dbname=pg_scratch.dbname, user=data["username"], password=data["password"])
    async with await psycopg.AsyncConnection.connect(dsn, application_name="billing-worker") as held:
        await held.execute("SELECT 1")
        sessions = await p.sessions(old)
        assert len(sessions) == 1
        assert sessions[0].principal == data["username"]
        assert sessions[0].client == "billing-worker@127.0.0.1"
        assert sessions[0].count == 1
        assert await p.sessions(new) == []
    assert await _eventually_empty(p, old)


async def _eventually_empty(p: PostgresProvider, old: Secret) -> bool:
    # A closed client's backend leaves pg_stat_activity a moment after the socket closes.
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        if await p.sessions(old) == []:
            return True
        await asyncio.sleep(0.02)
    return False


# ---------------------------------------------------------------- role per version


async def test_role_per_version_mints_a_new_role_and_retire_drops_the_old_one(pg_scratch: PgScratch) -> None:
    env = make_env(pg_scratch, "role-per-version")
    p = env.provider()
    v1 = await rotate(p, None)
    assert username(v1) == f"{env.base}_v1"
    # A table the version role creates must survive its role (REASSIGN OWNED to grant_role).
    d1 = json.loads(v1.reveal())
    dsn = pg_scratch.cluster.dsn(dbname=pg_scratch.dbname, user=d1["username"], password=d1["password"])
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await c.execute("CREATE TABLE made_by_v1 (x int)")
    v2 = await p.create(current=v1)
    assert username(v2) == f"{env.base}_v2"
    await p.apply(v2, current=v1)
    assert await env.login(v1) is None, "the old role keeps working until retire"
    await p.test(v2)
    await p.retire(v1)
    error = await env.login(v1)
    assert error is not None and "password authentication failed" in error
    assert env.role(f"{env.base}_v1") is None
    assert env.roles() == [f"{env.base}_v2"]
    owner = pg_scratch.admin_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'made_by_v1'")
    assert owner == [(env.grant,)]
    assert await env.login(v2) is None


async def test_role_per_version_first_rotation_continues_after_the_highest_existing_role(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "role-per-version")
    pg_scratch.admin_sql(f"CREATE ROLE {env.base}_v7 NOLOGIN")
    pg_scratch.admin_sql(f"COMMENT ON ROLE {env.base}_v7 IS 'managed by baton'")
    new = await env.provider().create(current=None)
    assert username(new) == f"{env.base}_v8"


async def test_role_per_version_skips_a_name_held_by_a_role_that_is_not_batons(pg_scratch: PgScratch) -> None:
    env = make_env(pg_scratch, "role-per-version")
    p = env.provider()
    v1 = await rotate(p, None)
    pg_scratch.admin_sql(f"CREATE ROLE {env.base}_v2 NOLOGIN")
    v2 = await p.create(current=v1)
    assert username(v2) == f"{env.base}_v3"


async def test_role_per_version_retire_refuses_to_drop_a_role_with_a_live_session_then_drops_it_later(
    pg_scratch: PgScratch,
) -> None:
    env = make_env(pg_scratch, "role-per-version")
    p = env.provider()
    v1 = await rotate(p, None)
    await rotate(p, v1)
    d1 = json.loads(v1.reveal())
    dsn = pg_scratch.cluster.dsn(dbname=pg_scratch.dbname, user=d1["username"], password=d1["password"])
    async with await psycopg.AsyncConnection.connect(dsn, application_name="straggler") as held:
        await held.execute("SELECT 1")
        with pytest.raises(ProviderError, match=r"still has 1 session"):
            await p.retire(v1)
        assert env.role(d1["username"]) == (False, "managed by baton"), "locked, not dropped"
        error = await env.login(v1)
        assert error is not None and "not permitted to log in" in error
    assert await _eventually_empty(p, v1)
    await p.retire(v1)
    assert env.role(d1["username"]) is None


def test_role_per_version_without_grant_role_is_a_config_error(pg_scratch: PgScratch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs grant_role"):
        ProviderConfig(
            kind="postgres",
            admin_dsn_file=pg_scratch.admin_dsn_file,
            strategy="role-per-version",
            username="app",
        )


# ---------------------------------------------------------------- single user


async def test_single_user_changes_the_password_in_place_and_warns_that_it_is_not_zero_downtime(
    pg_scratch: PgScratch, caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(pg_scratch, "single-user")
    with caplog.at_level(logging.WARNING, logger="daemon.providers.postgres"):
        p = env.provider()
    assert "not zero-downtime" in caplog.text
    v1 = await rotate(p, None)
    assert username(v1) == env.base
    v2 = await rotate(p, v1)
    assert username(v2) == env.base
    error = await env.login(v1)
    assert error is not None and "password authentication failed" in error, "in place: the old password is gone"
    assert await p.sessions(v1) == []
    await p.retire(v1)
    assert await env.login(v2) is None, "retire must not lock the one role"
    assert env.role(env.base) == (True, None), "a pre-existing role keeps its own comment"


# ---------------------------------------------------------------- idempotency and crashes


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_step_run_twice_converges_to_the_same_state(pg_scratch: PgScratch, strategy: str) -> None:
    env = make_env(pg_scratch, strategy)
    p = env.provider()
    v1 = await p.create(current=None)
    for _ in range(2):
        await p.apply(v1, current=None)
        await p.test(v1)
    v2 = await p.create(current=v1)
    assert username(v2) == username(await p.create(current=v1)), "create is stable while nothing is applied"
    for _ in range(2):
        await p.apply(v2, current=v1)
    for _ in range(2):
        await p.test(v2)
    for _ in range(2):
        await p.retire(v1)
    assert await env.login(v2) is None
    if strategy != "single-user":
        assert await env.login(v1) is not None
    expected = {
        "alternating-users": [f"{env.base}_a", f"{env.base}_b"],
        "role-per-version": [f"{env.base}_v2"],
        "single-user": [],
    }[strategy]
    assert env.roles() == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("crash_after", ["create", "apply", "test"])
async def test_a_rotation_that_crashed_between_steps_converges_when_run_again_from_the_start(
    pg_scratch: PgScratch, strategy: str, crash_after: str
) -> None:
    env = make_env(pg_scratch, strategy)
    current = await rotate(env.provider(), None)

    # First attempt, cut short: the provider object is lost with the crash.
    crashed = env.provider()
    lost = await crashed.create(current=current)
    if crash_after in ("apply", "test"):
        await crashed.apply(lost, current=current)
    if crash_after == "test":
        await crashed.test(lost)
    del crashed

    # The provider is asked again from the start, as if the store had lost the
    # pending version (the rotator resumes a recorded one instead: test_workflow).
    p = env.provider()
    if strategy == "alternating-users" and crash_after != "create":
        # The unpublished slot can log in now: it may be in use, so it is never re-passworded.
        with pytest.raises(ProviderError, match=rf"will not re-password a live role: {username(lost)} \(can log in"):
            await p.create(current=current)
        assert await env.login(current) is None and await env.login(lost) is None
        return
    new = await rotate(p, current)
    await p.retire(current)

    assert await env.login(new) is None
    if strategy == "role-per-version" and crash_after != "create":
        assert username(new) != username(lost), "a role name is never minted twice"
    else:
        assert username(new) == username(lost), "nothing was applied: the same slot or name"
    if strategy != "single-user":
        assert await env.login(current) is not None
    if strategy == "role-per-version" and crash_after != "create":
        # Left as it is, never reused: only the lost payload names it.
        assert env.roles() == [f"{env.base}_v2", f"{env.base}_v3"]
        return
    if crash_after != "create":
        assert await env.login(lost) is not None, "the never-published password was replaced"
    expected = {
        "alternating-users": [f"{env.base}_a", f"{env.base}_b"],
        "role-per-version": [f"{env.base}_v2"],
        "single-user": [],
    }[strategy]
    assert env.roles() == expected, "no orphaned role is left behind"
