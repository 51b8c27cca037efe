"""The mysql provider against a real MariaDB 10.11: both strategies, bad input, and no secret anywhere."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pymysql
import pytest

from daemon.config import MysqlProviderConfig
from daemon.errors import ProviderBlocked, ProviderError
from daemon.model import Secret
from daemon.providers.mysql import MysqlProvider, native_hash
from tests.fixtures.mariadb import MysqlScratch
from tests.fixtures.postgres import _free_port

pytestmark = pytest.mark.integration


def provider(
    scratch: MysqlScratch, *, strategy: str = "alternating-users", dsn_file: Path | None = None, grant: bool = True
) -> MysqlProvider:
    return MysqlProvider(
        MysqlProviderConfig(
            kind="mysql",
            admin_dsn_file=dsn_file or scratch.admin_dsn_file,
            strategy=strategy,  # type: ignore[arg-type]
            username=f"{scratch.prefix}app",
            grant_role=scratch.role if grant else None,
            host="db.example.internal",
            port=3306,
            database=scratch.database,
        )
    )


def data(payload: Secret) -> dict[str, str]:
    loaded: dict[str, str] = json.loads(payload.reveal())
    return loaded


def login(scratch: MysqlScratch, payload: Secret) -> str | None:
    d = data(payload)
    return scratch.server.login_error(user=d["username"], password=d["password"], database=scratch.database)


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def rotate(p: MysqlProvider, current: Secret | None) -> Secret:
    new = await p.create(current=current)
    await p.apply(new, current=current)
    await p.test(new)
    return new


# ---------------------------------------------------------------- alternating users


async def test_alternating_users_uses_a_then_b_then_a_and_the_old_account_works_until_retire_locks_it(
    mysql_scratch: MysqlScratch,
) -> None:
    s = mysql_scratch
    p = provider(s)
    v1 = await rotate(p, None)
    assert set(data(v1)) == {"username", "password", "host", "port", "database"}
    v2 = await rotate(p, v1)
    assert login(s, v1) is None and login(s, v2) is None  # both valid while v1 drains
    await p.retire(v1, keep={data(v2)["username"]})
    assert "locked" in (login(s, v1) or "")
    assert login(s, v2) is None
    await p.retire(v1)  # idempotent
    v3 = await rotate(p, v2)
    assert [data(v)["username"] for v in (v1, v2, v3)] == [f"{s.prefix}app_a", f"{s.prefix}app_b", f"{s.prefix}app_a"]
    assert login(s, v3) is None and login(s, v1) is not None
    # grant_role is the accounts' default role: the app can work in its database.
    d = data(v3)
    conn = pymysql.connect(
        host=s.server.host, port=s.server.port, user=d["username"], password=d["password"], database=s.database
    )
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x INT)")
    assert sorted(s.accounts()) == [f"{s.prefix}app_a", f"{s.prefix}app_b"]


async def test_sessions_come_from_processlist_and_a_locked_account_with_a_thread_is_never_re_passworded(
    mysql_scratch: MysqlScratch,
) -> None:
    s = mysql_scratch
    p = provider(s)
    v1 = await rotate(p, None)
    v2 = await rotate(p, v1)
    d = data(v1)
    conn = pymysql.connect(host=s.server.host, port=s.server.port, user=d["username"], password=d["password"])
    try:
        [session] = await p.sessions(v1)
        assert (session.principal, session.client, session.count) == (d["username"], "-@127.0.0.1", 1)
        await p.retire(v1, keep={data(v2)["username"]})  # locked; the open thread goes on
        assert sorted(await p.live()) == [f"{s.prefix}app_a", f"{s.prefix}app_b"]
        with pytest.raises(ProviderBlocked, match=rf"will not re-password a live account: {s.prefix}app_a \(is locked"):
            await p.create(current=v2)
    finally:
        conn.close()
    assert await p.sessions(v1) == []
    assert data(await p.create(current=v2))["username"] == f"{s.prefix}app_a"


async def test_retire_refuses_an_account_a_newer_version_names_and_skips_one_re_passworded_since(
    mysql_scratch: MysqlScratch,
) -> None:
    s = mysql_scratch
    p = provider(s)
    v1 = await rotate(p, None)
    with pytest.raises(ProviderError, match=r"refusing to retire account .*app_a: the current or a newer version"):
        await p.retire(v1, keep={data(v1)["username"]})
    v2 = await rotate(p, v1)
    await p.retire(v1)
    v3 = await rotate(p, v2)  # app_a again, a new password
    await p.retire(v1)  # v1's password is gone from app_a: nothing to lock
    assert login(s, v3) is None


# ---------------------------------------------------------------- dual-password on MariaDB


async def test_dual_password_is_refused_by_mariadb_with_an_error_that_says_why(mysql_scratch: MysqlScratch) -> None:
    p = provider(mysql_scratch, strategy="dual-password")
    with pytest.raises(ProviderError) as info:
        await p.create(current=None)
    msg = str(info.value)
    assert "dual-password needs MySQL 8.0.14" in msg and "RETAIN CURRENT PASSWORD" in msg
    assert "this server is MariaDB 10.11" in msg and "use strategy alternating-users" in msg
    # apply refuses too (a payload minted before the server was swapped for MariaDB).
    stray = Secret(json.dumps({"username": f"{mysql_scratch.prefix}app", "password": "p" * 40}))
    with pytest.raises(ProviderError, match=r"dual-password needs MySQL 8\.0\.14"):
        await p.apply(stray, current=None)
    assert mysql_scratch.accounts() == {}


# ---------------------------------------------------------------- accounts that are not ours


async def test_an_existing_account_that_is_not_batons_is_never_altered_or_locked(mysql_scratch: MysqlScratch) -> None:
    s = mysql_scratch
    p = provider(s)
    new = await p.create(current=None)
    name = data(new)["username"]
    s.sql(f"CREATE USER '{name}'@'%' IDENTIFIED BY 'theirs-pw-5678'")
    with pytest.raises(ProviderError, match=rf"^account {name} exists but is not managed by Baton"):
        await p.apply(new, current=None)
    with pytest.raises(ProviderError, match=rf"account {name} exists but is not managed by Baton"):
        await p.retire(new)
    assert s.server.login_error(user=name, password="theirs-pw-5678") is None


async def test_an_account_created_by_a_crashed_apply_of_the_same_payload_is_adopted(
    mysql_scratch: MysqlScratch,
) -> None:
    s = mysql_scratch
    p = provider(s)
    new = await p.create(current=None)
    name = data(new)["username"]
    # The crash: CREATE USER ran, the GRANT that marks the account did not.
    s.sql(f"CREATE USER '{name}'@'%' IDENTIFIED BY PASSWORD '{native_hash(data(new)['password'])}'")
    await p.apply(new, current=None)
    await p.test(new)
    assert "baton_managed" in str(s.sql(f"SHOW GRANTS FOR '{name}'@'%'"))


async def test_a_payload_naming_an_account_outside_this_provider_is_refused(mysql_scratch: MysqlScratch) -> None:
    p = provider(mysql_scratch)
    with pytest.raises(ProviderError, match=r"payload names account 'root', which is not one of this provider's"):
        await p.retire(Secret(json.dumps({"username": "root", "password": "x" * 20})))
    with pytest.raises(ProviderError, match=r"^payload is not a mysql credential"):
        await p.sessions(Secret("not json"))


# ---------------------------------------------------------------- bad admin credentials, refused statements


async def test_wrong_admin_credentials_unreachable_servers_and_bad_dsn_files_are_clear_errors(
    mysql_scratch: MysqlScratch, tmp_path: Path
) -> None:
    server = mysql_scratch.server
    wrong = server.write_admin_dsn(tmp_path / "wrong.dsn", dsn=server.dsn(password="wrong-admin-pw-7781"))
    with pytest.raises(ProviderError, match=r"^admin: login failed \(wrong user name or password\)$") as info:
        await provider(mysql_scratch, dsn_file=wrong).create(current=None)
    closed = server.write_admin_dsn(tmp_path / "closed.dsn", dsn=server.dsn(port=_free_port()))
    with pytest.raises(ProviderError, match=r"^admin: cannot connect to the server \(connection refused\)$") as info2:
        await provider(mysql_scratch, dsn_file=closed).create(current=None)
    garbage = server.write_admin_dsn(tmp_path / "bad.dsn", dsn="mysql://root:s3cr3t@host:notaport")
    with pytest.raises(ProviderError, match=r"does not hold a mysql://user:password@host:port URL") as info3:
        await provider(mysql_scratch, dsn_file=garbage).create(current=None)
    with pytest.raises(ProviderError, match=r"cannot read admin_dsn_file .*absent\.dsn: No such file"):
        await provider(mysql_scratch, dsn_file=tmp_path / "absent.dsn").create(current=None)
    text = full_text(info.value) + full_text(info2.value) + full_text(info3.value)
    for leak in ("wrong-admin-pw-7781", server.admin_password, "s3cr3t", server.admin_user, str(server.port)):
        assert leak not in text


async def test_a_statement_the_server_refuses_names_the_step_and_keeps_the_old_account(
    mysql_scratch: MysqlScratch, tmp_path: Path
) -> None:
    s = mysql_scratch
    good = provider(s)
    v1 = await rotate(good, None)
    # An admin that may read the grant tables and the process list, but not CREATE USER.
    weak, weak_pw = f"{s.prefix}weak", "weak-pw-12345678"
    s.sql(
        f"CREATE USER '{weak}'@'127.0.0.1' IDENTIFIED BY '{weak_pw}'",
        f"GRANT SELECT ON mysql.* TO '{weak}'@'127.0.0.1'",
        f"GRANT PROCESS ON *.* TO '{weak}'@'127.0.0.1'",
    )
    dsn = s.server.write_admin_dsn(tmp_path / "weak.dsn", dsn=s.server.dsn(user=weak, password=weak_pw))
    p = provider(s, dsn_file=dsn)
    v2 = await p.create(current=v1)
    with pytest.raises(ProviderError, match=rf"^creating account {s.prefix}app_b: permission denied") as info:
        await p.apply(v2, current=v1)
    assert data(v2)["password"] not in full_text(info.value) and native_hash(data(v2)["password"]) not in full_text(
        info.value
    )
    assert login(s, v1) is None  # the current credential stays


# ---------------------------------------------------------------- no secret anywhere


async def test_no_admin_or_minted_password_reaches_a_log_an_exception_or_the_servers_general_log(
    mysql_scratch: MysqlScratch, caplog: pytest.LogCaptureFixture
) -> None:
    s = mysql_scratch
    general = s.server.root / "general.log"
    s.sql(f"SET GLOBAL general_log_file = '{general}'", "SET GLOBAL general_log = 1")
    caplog.set_level(logging.DEBUG)
    seen = [s.server.admin_password]
    errors: list[BaseException] = []
    try:
        p = provider(s)
        current: Secret | None = None
        for _ in range(3):
            new = await rotate(p, current)
            seen.append(data(new)["password"])
            if current is not None:
                await p.sessions(current)
                await p.retire(current, keep={data(new)["username"]})
            current = new
        assert current is not None
        bad = Secret(json.dumps({**data(current), "password": "bad-" + seen[-1]}))
        try:
            await p.test(bad)
        except ProviderError as e:
            errors.append(e)
    finally:
        s.sql("SET GLOBAL general_log = 0")
    assert errors and "login failed" in str(errors[0])
    server_log = general.read_text(errors="replace")
    assert "IDENTIFIED WITH mysql_native_password AS" in server_log, "the general log was on"
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    exc_text = "".join(full_text(e) + repr(e) for e in errors)
    for secret in seen:
        assert secret not in logged and secret not in exc_text and secret not in server_log
    assert "minted a credential" in caplog.text
