"""The redis provider against a real redis-server 7: both strategies, bad input, and no secret anywhere."""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from pathlib import Path

import pytest

from daemon.config import RedisProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.model import Secret
from daemon.providers.redis import RedisProvider
from tests.fixtures.postgres import _free_port
from tests.fixtures.redis import RedisScratch

pytestmark = pytest.mark.integration


def provider(
    scratch: RedisScratch,
    *,
    strategy: str = "alternating-users",
    url_file: Path | None = None,
    rules: list[str] | None = None,
) -> RedisProvider:
    return RedisProvider(
        RedisProviderConfig(
            kind="redis",
            admin_url_file=url_file or scratch.admin_url_file,
            strategy=strategy,  # type: ignore[arg-type]
            username=f"{scratch.prefix}app",
            acl_rules=rules or ["~*", "&*", "+@all"],
            host="cache.example.internal",
            port=6379,
            db=0,
        )
    )


def data(payload: Secret) -> dict[str, str]:
    loaded: dict[str, str] = json.loads(payload.reveal())
    return loaded


def login(scratch: RedisScratch, payload: Secret) -> str | None:
    d = data(payload)
    return scratch.server.login_error(user=d["username"], password=d["password"])


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def rotate(p: RedisProvider, current: Secret | None) -> Secret:
    new = await p.create(current=current)
    await p.apply(new, current=current)
    await p.test(new)
    return new


# ---------------------------------------------------------------- alternating users


async def test_alternating_users_uses_a_then_b_then_a_and_the_old_user_works_until_retire_turns_it_off(
    redis_scratch: RedisScratch,
) -> None:
    s = redis_scratch
    p = provider(s)
    v1 = await rotate(p, None)
    assert set(data(v1)) == {"username", "password", "host", "port", "db"}
    v2 = await rotate(p, v1)
    assert login(s, v1) is None and login(s, v2) is None
    await p.retire(v1, keep={data(v2)["username"]})
    assert "AuthenticationError" in (login(s, v1) or "")
    await p.retire(v1)  # idempotent
    v3 = await rotate(p, v2)
    assert [data(v)["username"] for v in (v1, v2, v3)] == [f"{s.prefix}app_a", f"{s.prefix}app_b", f"{s.prefix}app_a"]
    assert login(s, v3) is None and login(s, v2) is None and login(s, v1) is not None
    assert s.users() == [f"{s.prefix}app_a", f"{s.prefix}app_b"]
    # ACL SAVE: the users outlive a restart, as hashes only.
    acl = s.server.acl_file.read_text()
    assert f"user {s.prefix}app_a on" in acl and data(v3)["password"] not in acl


async def test_sessions_come_from_client_list_and_an_off_user_with_a_client_is_never_re_passworded(
    redis_scratch: RedisScratch,
) -> None:
    s = redis_scratch
    p = provider(s)
    v1 = await rotate(p, None)
    v2 = await rotate(p, v1)
    d = data(v1)
    client = s.server.client(user=d["username"], password=d["password"])
    try:
        client.client_setname("app-worker")
        [session] = await p.sessions(v1)
        assert (session.principal, session.client, session.count) == (d["username"], "app-worker@127.0.0.1", 1)
        await p.retire(v1, keep={data(v2)["username"]})  # off; the connected client goes on
        assert client.ping()
        assert sorted(await p.live()) == [f"{s.prefix}app_a", f"{s.prefix}app_b"]
        with pytest.raises(ProviderBlocked, match=rf"will not re-password a live user: {s.prefix}app_a \(is off, 1"):
            await p.create(current=v2)
    finally:
        client.close()
    assert await p.sessions(v1) == []
    assert data(await p.create(current=v2))["username"] == f"{s.prefix}app_a"


async def test_the_configured_acl_rules_are_what_the_user_may_do(redis_scratch: RedisScratch) -> None:
    s = redis_scratch
    p = provider(s, rules=["~app:*", "+@read", "+@write", "+@connection"])
    v1 = await rotate(p, None)
    d = data(v1)
    import redis

    with s.server.client(user=d["username"], password=d["password"]) as r:
        r.set("app:x", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.set("other:x", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command("ACL", "LIST")


# ---------------------------------------------------------------- one user, two passwords


async def test_dual_password_keeps_the_old_password_beside_the_new_until_retire_removes_it(
    redis_scratch: RedisScratch,
) -> None:
    s = redis_scratch
    p = provider(s, strategy="dual-password")
    v1 = await rotate(p, None)
    v2 = await rotate(p, v1)
    assert data(v1)["username"] == data(v2)["username"] == f"{s.prefix}app"
    assert login(s, v1) is None and login(s, v2) is None
    await p.apply(v2, current=v1)  # idempotent: applied again after a crash, nothing changes
    info = s.getuser(f"{s.prefix}app")
    assert info is not None and len(info["passwords"]) == 2
    # One user for every version: keep names it, and only old's password goes.
    await p.retire(v1, keep={f"{s.prefix}app"})
    assert login(s, v1) is not None and login(s, v2) is None
    await p.retire(v1)
    info = s.getuser(f"{s.prefix}app")
    assert info is not None and info["passwords"] == [hashlib.sha256(data(v2)["password"].encode()).hexdigest()]
    assert await p.sessions(v1) == [] and await p.live() == []


async def test_dual_password_sessions_are_the_clients_that_connected_before_the_newer_password(
    redis_scratch: RedisScratch,
) -> None:
    s = redis_scratch
    p = provider(s, strategy="dual-password")
    v1 = await rotate(p, None)
    d1 = data(v1)
    old_client = s.server.client(user=d1["username"], password=d1["password"])
    try:
        old_client.client_setname("old-pool")
        # Only v1's password so far: every client of the user uses it.
        assert [x.client for x in await p.sessions(v1)] == ["old-pool@127.0.0.1"]
        v2 = await rotate(p, v1)
        [session] = await p.sessions(v1)  # connected before v2's password existed: v1's (or older)
        assert (session.principal, session.client, session.count) == (d1["username"], "old-pool@127.0.0.1", 1)
        await p.retire(v1)
        assert old_client.ping()  # removing a password leaves the connections made with it
        assert login(s, v1) is not None and login(s, v2) is None
    finally:
        old_client.close()
    assert await p.sessions(v1) == []


# ---------------------------------------------------------------- users that are not ours


@pytest.mark.parametrize("strategy", ["alternating-users", "dual-password"])
async def test_an_existing_user_that_is_not_batons_is_never_changed(redis_scratch: RedisScratch, strategy: str) -> None:
    s = redis_scratch
    p = provider(s, strategy=strategy)
    new = await p.create(current=None)
    name = data(new)["username"]
    with s.server.client() as r:
        r.execute_command("ACL", "SETUSER", name, "on", ">theirs-pw-5678", "~*", "+@all")
    with pytest.raises(ProviderError, match=rf"^user {name} exists but is not managed by Baton"):
        await p.apply(new, current=None)
    with pytest.raises(ProviderError, match=rf"^user {name} exists but is not managed by Baton"):
        await p.retire(Secret(json.dumps({**data(new), "password": "theirs-pw-5678"})))
    assert s.server.login_error(user=name, password="theirs-pw-5678") is None
    assert login(s, new) is not None


async def test_a_payload_naming_a_user_outside_this_provider_is_refused(redis_scratch: RedisScratch) -> None:
    p = provider(redis_scratch)
    with pytest.raises(ProviderError, match=r"payload names user 'baton_admin', which is not one of this provider's"):
        await p.retire(Secret(json.dumps({"username": "baton_admin", "password": "x" * 20})))
    with pytest.raises(ProviderError, match=r"^payload is not a redis credential"):
        await p.sessions(Secret("not json"))


# ---------------------------------------------------------------- bad admin credentials, refused commands


async def test_wrong_admin_credentials_unreachable_servers_and_bad_url_files_are_clear_errors(
    redis_scratch: RedisScratch, tmp_path: Path
) -> None:
    server = redis_scratch.server
    wrong = server.write_admin_url(tmp_path / "wrong.url", url=server.url(password="wrong-admin-pw-7781"))
    with pytest.raises(ProviderError, match=r"^admin: login failed \(wrong user name or password") as info:
        await provider(redis_scratch, url_file=wrong).create(current=None)
    closed = server.write_admin_url(tmp_path / "closed.url", url=server.url(port=_free_port()))
    with pytest.raises(ProviderError, match=r"^admin: cannot connect to the server \(connection refused\)$") as info2:
        await provider(redis_scratch, url_file=closed).create(current=None)
    garbage = server.write_admin_url(tmp_path / "bad.url", url="http://root:s3cr3t@host:6379")
    with pytest.raises(ProviderError, match=r"does not hold a redis://user:password@host:port URL") as info3:
        await provider(redis_scratch, url_file=garbage).create(current=None)
    with pytest.raises(ProviderError, match=r"cannot read admin_url_file .*absent\.url: No such file"):
        await provider(redis_scratch, url_file=tmp_path / "absent.url").create(current=None)
    text = full_text(info.value) + full_text(info2.value) + full_text(info3.value)
    for leak in ("wrong-admin-pw-7781", server.admin_password, "s3cr3t", str(server.port)):
        assert leak not in text


async def test_a_command_the_server_refuses_names_the_step_and_keeps_the_old_user(
    redis_scratch: RedisScratch, tmp_path: Path
) -> None:
    s = redis_scratch
    v1 = await rotate(provider(s), None)
    # An admin that may read users and clients, but not change them.
    weak, weak_pw = f"{s.prefix}weak", "weak-pw-12345678"
    with s.server.client() as r:
        r.execute_command(
            "ACL", "SETUSER", weak, "on", f">{weak_pw}", "+ping", "+acl|getuser", "+client|list", "+client|setname"
        )
    url = s.server.write_admin_url(tmp_path / "weak.url", url=s.server.url(user=weak, password=weak_pw))
    p = provider(s, url_file=url)
    v2 = await p.create(current=v1)
    with pytest.raises(ProviderError, match=rf"^setting the password of user {s.prefix}app_b: permission denied") as e:
        await p.apply(v2, current=v1)
    assert data(v2)["password"] not in full_text(e.value)
    assert hashlib.sha256(data(v2)["password"].encode()).hexdigest() not in full_text(e.value)
    assert login(s, v1) is None  # the current credential stays


# ---------------------------------------------------------------- no secret anywhere


async def test_no_admin_or_minted_password_reaches_a_log_or_an_exception(
    redis_scratch: RedisScratch, caplog: pytest.LogCaptureFixture
) -> None:
    s = redis_scratch
    caplog.set_level(logging.DEBUG)
    seen = [s.server.admin_password]
    errors: list[BaseException] = []
    for strategy in ("alternating-users", "dual-password"):
        p = provider(s, strategy=strategy)
        current: Secret | None = None
        for _ in range(3):
            new = await rotate(p, current)
            seen.append(data(new)["password"])
            if current is not None:
                await p.sessions(current)
                await p.retire(current, keep={data(new)["username"]} if strategy == "alternating-users" else ())
            current = new
        assert current is not None
        try:
            await p.test(Secret(json.dumps({**data(current), "password": "bad-" + seen[-1]})))
        except ProviderError as e:
            errors.append(e)
    assert len(errors) == 2 and all("login failed" in str(e) for e in errors)
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    exc_text = "".join(full_text(e) + repr(e) for e in errors)
    with s.server.client() as r:
        acl_log = json.dumps(r.execute_command("ACL", "LOG"), default=str)
    for secret in seen:
        assert secret not in logged and secret not in exc_text and secret not in acl_log
    assert "minted a credential" in caplog.text
