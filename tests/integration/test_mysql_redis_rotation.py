"""mysql and redis under the rotator: a refused step fails the rotation naming it, the current credential
stays, the next attempt goes on once the cause is fixed, and no secret reaches the rotator's logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from daemon.model import Secret
from daemon.rotation.workflow import RotationResult
from tests.fixtures.mariadb import MysqlScratch
from tests.fixtures.redis import RedisScratch
from tests.integration.test_provider_crash_steps import KEY, make_config, rotator_on

pytestmark = pytest.mark.integration


def _d(payload: Secret) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(payload.reveal())
    return loaded


@pytest.fixture(params=["mysql", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Any], Any, Path]:
    """(provider config, server, the admin credentials file) of one system."""
    if request.param == "mysql":
        s: MysqlScratch = request.getfixturevalue("mysql_scratch")
        spec = {"kind": "mysql", "admin_dsn_file": str(s.admin_dsn_file), "username": f"{s.prefix}app"}
        return spec, s.server, s.admin_dsn_file
    r: RedisScratch = request.getfixturevalue("redis_scratch")
    spec = {"kind": "redis", "admin_url_file": str(r.admin_url_file), "username": f"{r.prefix}app"}
    return spec, r.server, r.admin_url_file


async def test_wrong_admin_credentials_fail_the_rotation_at_create_and_the_next_one_goes_on(
    tmp_path: Path, target: tuple[dict[str, Any], Any, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec, server, admin_file = target
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, spec)
    async with rotator_on(config) as (rotator, store):
        assert (await rotator.rotate()).result == RotationResult.ROTATED
        v1 = (await store.read(KEY)).payload
    good = admin_file.read_text()
    wrong = "wrong-admin-" + server.admin_password
    url = server.dsn(password=wrong) if spec["kind"] == "mysql" else server.url(password=wrong)
    admin_file.write_text(url + "\n")

    async with rotator_on(config) as (rotator, store):
        outcome = await rotator.rotate()
        assert (outcome.result, outcome.step) == (RotationResult.FAILED, "create")
        assert outcome.error is not None and outcome.error.startswith("admin: login failed")
        assert (await store.read(KEY)).payload == v1
        assert len(await store.versions(KEY)) == 1
    assert server.login_error(user=_d(v1)["username"], password=_d(v1)["password"]) is None

    admin_file.write_text(good)
    async with rotator_on(config) as (rotator, store):
        assert (await rotator.rotate()).result == RotationResult.ROTATED
        v2 = (await store.read(KEY)).payload
    assert v2 != v1
    [failed] = [r for r in caplog.records if getattr(r, "event", None) == "rotation_failed"]
    assert (getattr(failed, "step", None), getattr(failed, "error", "")[:19]) == ("create", "admin: login failed")
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for secret in (server.admin_password, wrong, _d(v1)["password"], _d(v2)["password"]):
        assert secret not in logged


async def test_a_user_that_exists_and_is_not_batons_fails_the_rotation_at_apply_and_is_left_alone(
    tmp_path: Path, target: tuple[dict[str, Any], Any, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec, server, _ = target
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, spec)
    async with rotator_on(config) as (rotator, store):
        assert (await rotator.rotate()).result == RotationResult.ROTATED
        v1 = (await store.read(KEY)).payload
    other = f"{spec['username']}_b"  # the slot the next rotation would use, taken by someone else
    if spec["kind"] == "mysql":
        server.root_sql(f"CREATE USER '{other}'@'%' IDENTIFIED BY 'theirs-pw-5678' ACCOUNT LOCK")
    else:
        with server.client() as r:
            r.execute_command("ACL", "SETUSER", other, "off", ">theirs-pw-5678", "~*", "+@all")

    async with rotator_on(config) as (rotator, store):
        outcome = await rotator.rotate()
        assert (outcome.result, outcome.step) == (RotationResult.FAILED, "apply")
        assert f"{other} exists but is not managed by Baton" in (outcome.error or "")
        assert (await store.read(KEY)).payload == v1
        pending = (await store.read(KEY, (await store.versions(KEY))[-1].id)).payload
    assert server.login_error(user=_d(v1)["username"], password=_d(v1)["password"]) is None
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for secret in (server.admin_password, _d(v1)["password"], _d(pending)["password"], "theirs-pw-5678"):
        assert secret not in logged


async def test_dual_password_on_mariadb_fails_the_rotation_at_create_saying_why(
    tmp_path: Path, mysql_scratch: MysqlScratch
) -> None:
    s = mysql_scratch
    spec = {
        "kind": "mysql",
        "admin_dsn_file": str(s.admin_dsn_file),
        "username": f"{s.prefix}app",
        "strategy": "dual-password",
    }
    async with rotator_on(make_config(tmp_path, spec)) as (rotator, store):
        outcome = await rotator.rotate()
        assert (outcome.result, outcome.step) == (RotationResult.FAILED, "create")
        assert "MariaDB" in (outcome.error or "") and "RETAIN CURRENT PASSWORD" in (outcome.error or "")
        assert await store.versions(KEY) == []
    assert s.accounts() == {}
