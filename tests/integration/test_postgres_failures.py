"""The postgres provider on bad input, and proof that no secret leaks into logs or errors."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest

from daemon.config import ProviderConfig
from daemon.errors import ProviderError
from daemon.model import Secret
from daemon.providers.postgres import PostgresProvider
from tests.fixtures.postgres import PgScratch, _free_port, login_error

pytestmark = pytest.mark.integration


def provider(
    scratch: PgScratch, *, strategy: str = "alternating-users", grant: bool = True, dsn_file: Path | None = None
) -> PostgresProvider:
    return PostgresProvider(
        ProviderConfig(
            kind="postgres",
            admin_dsn_file=dsn_file or scratch.admin_dsn_file,
            strategy=strategy,  # type: ignore[arg-type]
            username=f"{scratch.prefix}app",
            grant_role=f"{scratch.prefix}rw" if grant else None,
            database=scratch.dbname,
        )
    )


def with_grant_role(scratch: PgScratch) -> PgScratch:
    scratch.admin_sql(f"CREATE ROLE {scratch.prefix}rw NOLOGIN")
    return scratch


def full_text(exc: BaseException) -> str:
    """Everything a log line with exc_info would print: message, type, chained causes."""
    return "".join(traceback.format_exception(exc))


async def expect_error(coro: object, match: str) -> ProviderError:
    with pytest.raises(ProviderError, match=match) as info:
        await coro  # type: ignore[misc]
    return info.value


# ---------------------------------------------------------------- unreachable, bad login, bad DSN


async def test_an_unreachable_database_is_a_clear_error_without_host_port_or_password(
    pg_scratch: PgScratch, tmp_path: Path
) -> None:
    cluster = pg_scratch.cluster
    closed = _free_port()
    dsn = cluster.dsn(dbname=pg_scratch.dbname).replace(f"port={cluster.port}", f"port={closed}")
    dsn_file = cluster.write_admin_dsn(tmp_path / "closed.dsn", dsn=dsn)
    p = provider(pg_scratch, dsn_file=dsn_file)
    # alternating-users asks the database which slot is free already in create.
    err = await expect_error(p.create(current=None), r"^admin: cannot connect to the database \(connection refused\)$")
    text = full_text(err)
    for leak in (cluster.admin_password, str(closed), cluster.admin_user, dsn):
        assert leak not in text


async def test_a_wrong_admin_password_is_reported_as_a_failed_admin_login(
    pg_scratch: PgScratch, tmp_path: Path
) -> None:
    cluster = pg_scratch.cluster
    wrong = "wrong-admin-pw-7781"
    dsn_file = cluster.write_admin_dsn(tmp_path / "wrong.dsn", dsn=cluster.dsn(password=wrong))
    p = provider(with_grant_role(pg_scratch), strategy="role-per-version", dsn_file=dsn_file)
    err = await expect_error(p.create(current=None), r"^admin: login failed \(wrong user name or password\)$")
    text = full_text(err)
    assert wrong not in text and cluster.admin_password not in text and cluster.admin_user not in text


async def test_a_missing_admin_dsn_file_names_the_file(pg_scratch: PgScratch, tmp_path: Path) -> None:
    p = provider(pg_scratch, dsn_file=tmp_path / "absent.dsn")
    await expect_error(p.create(current=None), r"cannot read admin_dsn_file .*absent\.dsn: No such file")


async def test_an_unparsable_admin_dsn_is_rejected_without_echoing_it(pg_scratch: PgScratch, tmp_path: Path) -> None:
    garbage = "host=127.0.0.1 password='s3cr3t-unterminated"
    dsn_file = pg_scratch.cluster.write_admin_dsn(tmp_path / "bad.dsn", dsn=garbage)
    p = provider(pg_scratch, dsn_file=dsn_file)
    err = await expect_error(p.create(current=None), r"does not hold a valid connection string")
    assert "s3cr3t" not in full_text(err)


async def test_a_database_that_does_not_exist_is_a_clear_error(pg_scratch: PgScratch) -> None:
    p = PostgresProvider(
        ProviderConfig(
            kind="postgres",
            admin_dsn_file=pg_scratch.admin_dsn_file,
            username=f"{pg_scratch.prefix}app",
            database=f"{pg_scratch.dbname}_missing",
        )
    )
    await expect_error(p.create(current=None), r"^admin: cannot connect \(the database does not exist\)$")


async def test_an_admin_without_createrole_gets_permission_denied(pg_scratch: PgScratch, tmp_path: Path) -> None:
    cluster = pg_scratch.cluster
    weak = f"{pg_scratch.prefix}weak"
    pg_scratch.admin_sql(f"CREATE ROLE {weak} LOGIN PASSWORD 'weak-pw-1234'")
    dsn_file = cluster.write_admin_dsn(
        tmp_path / "weak.dsn", dsn=cluster.dsn(dbname=pg_scratch.dbname, user=weak, password="weak-pw-1234")
    )
    p = provider(pg_scratch, grant=False, dsn_file=dsn_file)
    new = await p.create(current=None)
    await expect_error(p.apply(new, current=None), r"creating role .*_app_a: permission denied")


# ---------------------------------------------------------------- roles that are not ours


async def test_a_missing_grant_role_is_named_in_the_error(pg_scratch: PgScratch) -> None:
    p = provider(pg_scratch, strategy="role-per-version")
    new = await p.create(current=None)
    await expect_error(p.apply(new, current=None), rf"^grant_role {pg_scratch.prefix}rw does not exist")
    assert pg_scratch.admin_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{pg_scratch.prefix}app_v1'") == []


@pytest.mark.parametrize("strategy", ["alternating-users", "role-per-version"])
async def test_a_pre_existing_role_that_is_not_batons_is_never_altered(pg_scratch: PgScratch, strategy: str) -> None:
    with_grant_role(pg_scratch)
    p = provider(pg_scratch, strategy=strategy)
    new = await p.create(current=None)
    name = json.loads(new.reveal())["username"]
    pg_scratch.admin_sql(f"CREATE ROLE {name} LOGIN PASSWORD 'theirs-pw-5678'")
    await expect_error(p.apply(new, current=None), rf"^role {name} exists but is not managed by Baton")
    await expect_error(p.retire(new), rf"^role {name} exists but is not managed by Baton")
    assert await login_error(pg_scratch.cluster, user=name, password="theirs-pw-5678", dbname=pg_scratch.dbname) is None


async def test_a_payload_naming_a_role_outside_this_provider_is_refused(pg_scratch: PgScratch) -> None:
    p = provider(pg_scratch)
    foreign = Secret(json.dumps({"username": "postgres", "password": "x" * 20}))
    await expect_error(p.retire(foreign), r"payload names role 'postgres', which is not one of this provider's roles")
    await expect_error(p.sessions(Secret("not json")), r"^payload is not a postgres credential")


async def test_test_raises_when_the_new_credentials_do_not_log_in(pg_scratch: PgScratch) -> None:
    p = provider(with_grant_role(pg_scratch))
    new = await p.create(current=None)
    await expect_error(p.test(new), rf"^role {pg_scratch.prefix}app_a: login failed")
    await p.apply(new, current=None)
    data = json.loads(new.reveal())
    wrong = Secret(json.dumps({**data, "password": "not-the-password-42"}))
    err = await expect_error(p.test(wrong), r"login failed \(wrong user name or password\)")
    assert "not-the-password-42" not in full_text(err)


# ---------------------------------------------------------------- no secret anywhere


async def test_no_admin_or_minted_password_appears_in_any_log_or_exception(
    pg_scratch: PgScratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = pg_scratch.cluster
    with_grant_role(pg_scratch)
    # Make the server log every admin statement in this database: the plaintext
    # must not reach the server either (only a SCRAM verifier does).
    pg_scratch.admin_sql(f"ALTER ROLE {cluster.admin_user} IN DATABASE {pg_scratch.dbname} SET log_statement = 'all'")
    log_start = cluster.log_file.stat().st_size
    secrets_seen: list[str] = [cluster.admin_password, cluster.admin_dsn]
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)

    for strategy in ("alternating-users", "role-per-version", "single-user"):
        p = provider(pg_scratch, strategy=strategy)
        current: Secret | None = None
        for _ in range(2):
            new = await p.create(current=current)
            secrets_seen.append(json.loads(new.reveal())["password"])
            await p.apply(new, current=current)
            await p.test(new)
            if current is not None:
                await p.sessions(current)
                await p.retire(current)
            current = new
        assert current is not None
        bad = Secret(json.dumps({**json.loads(current.reveal()), "password": "bad-" + secrets_seen[-1]}))
        for step in (p.test(bad), p.apply(bad, current=None) if strategy == "alternating-users" else p.test(bad)):
            try:
                await step
            except ProviderError as e:
                errors.append(e)

    wrong_file = cluster.write_admin_dsn(
        tmp_path / "wrong.dsn", dsn=cluster.dsn(password="wrong-" + cluster.admin_password)
    )
    try:
        await provider(pg_scratch, strategy="role-per-version", dsn_file=wrong_file).create(current=None)
    except ProviderError as e:
        errors.append(e)
    assert len(errors) >= 3

    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    exc_text = "".join(full_text(e) + repr(e) for e in errors)
    server_log = cluster.log_file.read_bytes()[log_start:].decode(errors="replace")
    assert "ALTER ROLE" in server_log and "SCRAM-SHA-256$" in server_log, "statement logging was on"
    assert "minted a credential" in caplog.text
    for secret in secrets_seen:
        assert secret not in logged
        assert secret not in exc_text
        assert secret not in server_log
