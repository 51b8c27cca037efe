"""mysql and redis providers: a crash at every step boundary is resumed, nothing live is orphaned.

The same campaign as tests/integration/test_provider_crash_steps.py (whose
rotator "processes", boundaries and Crash it uses), against a real MariaDB and
a real redis-server: the rotator dies right after a provider step (create,
apply, test, retire) or a store write (create, promote) returned; a new store
object, provider and rotator finish the rotation and the retirement. After it:
one current version, it logs in, the old one does not, and the server holds no
login (account, user, password) that no version names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.model import Secret
from daemon.rotation.workflow import RotationResult
from tests.fixtures.mariadb import MysqlScratch
from tests.fixtures.redis import RedisScratch
from tests.integration.test_provider_crash_steps import (
    BOUNDARIES,
    KEY,
    Crash,
    make_config,
    report_current,
    rotator_on,
)

pytestmark = pytest.mark.integration

SYSTEMS = ["mysql-alternating-users", "redis-alternating-users", "redis-dual-password"]


@dataclass
class System:
    provider: dict[str, Any]
    works: Callable[[Secret], bool]
    principals: Callable[[], set[str]]  # every login the server holds for this credential
    principal_of: Callable[[Secret], str]


def _d(payload: Secret) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(payload.reveal())
    return loaded


def mysql(s: MysqlScratch) -> System:
    def unlocked() -> set[str]:
        return {name for name, created in s.accounts().items() if "ACCOUNT LOCK" not in created}

    return System(
        provider={
            "kind": "mysql",
            "admin_dsn_file": str(s.admin_dsn_file),
            "username": f"{s.prefix}app",
            "grant_role": s.role,
            "database": s.database,
        },
        works=lambda p: s.server.login_error(user=_d(p)["username"], password=_d(p)["password"]) is None,
        principals=unlocked,
        principal_of=lambda p: str(_d(p)["username"]),
    )


def redis(s: RedisScratch, strategy: str) -> System:
    base = f"{s.prefix}app"

    def logins() -> set[str]:
        if strategy == "dual-password":
            info = s.getuser(base)
            return set(info["passwords"]) if info else set()
        return {u for u in s.users() if "on" in (s.getuser(u) or {}).get("flags", [])}

    def principal_of(p: Secret) -> str:
        if strategy == "dual-password":
            return hashlib.sha256(_d(p)["password"].encode()).hexdigest()
        return str(_d(p)["username"])

    return System(
        provider={"kind": "redis", "admin_url_file": str(s.admin_url_file), "username": base, "strategy": strategy},
        works=lambda p: s.server.login_error(user=_d(p)["username"], password=_d(p)["password"]) is None,
        principals=logins,
        principal_of=principal_of,
    )


@pytest.fixture(params=SYSTEMS)
def system(request: pytest.FixtureRequest) -> System:
    if request.param.startswith("mysql"):
        return mysql(request.getfixturevalue("mysql_scratch"))
    return redis(request.getfixturevalue("redis_scratch"), request.param.removeprefix("redis-"))


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=[f"{o}.{m}" for o, m in BOUNDARIES])
async def test_a_crash_right_after_each_step_is_resumed_and_leaves_no_login_unnamed(
    tmp_path: Path, system: System, boundary: tuple[str, str]
) -> None:
    config = make_config(tmp_path, system.provider)
    async with rotator_on(config) as (rotator, store):
        assert (await rotator.rotate()).result == RotationResult.ROTATED
        v1 = (await store.read(KEY)).payload
    assert await asyncio.to_thread(system.works, v1)

    async with rotator_on(config, crash=boundary) as (rotator, store):
        with pytest.raises(Crash):
            if boundary[1] == "retire":
                assert (await rotator.rotate()).result == RotationResult.ROTATED
                await report_current(store)
                await rotator.retire_ready()
            else:
                await rotator.rotate()
        standing = (await store.read(KEY)).payload
        assert await asyncio.to_thread(system.works, standing), "the current credential broke at the crash"

    async with rotator_on(config) as (rotator, store):
        if boundary[1] != "retire":
            outcome = await rotator.rotate()
            assert outcome.result == RotationResult.ROTATED, outcome
        await report_current(store)
        assert await rotator.retire_ready(), "the superseded version did not retire"
        current = (await store.read(KEY)).payload
        versions = await store.versions(KEY)

    assert [v.is_current for v in versions].count(True) == 1
    assert all(v.retired for v in versions if not v.is_current)
    assert current != v1
    assert await asyncio.to_thread(system.works, current)
    assert not await asyncio.to_thread(system.works, v1)
    assert await asyncio.to_thread(system.principals) == {system.principal_of(current)}
