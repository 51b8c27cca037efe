"""VaultStore login methods, token renewal and re-authentication.

Renewal and revocation need short TTLs and the revoke hook, so most tests here
run against the double only (``vault_double``); the AppRole and token-file
logins also run against a real server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import hvac
import pytest

from daemon.config import VaultAuthConfig
from daemon.errors import StoreAuthError
from daemon.model import Secret
from daemon.stores.vault import VaultStore
from tests.doubles.vault import VaultDouble
from tests.fixtures.vault import MakeStore, VaultTarget

pytestmark = pytest.mark.integration

LOGIN = ("POST", "auth/approle/login")
RENEW = ("POST", "auth/token/renew-self")


def approle_auth(vault_server: VaultTarget, tmp_path: Path) -> VaultAuthConfig:
    role_id, secret_id = vault_server.approle()
    sid = tmp_path / "secret_id"
    sid.write_text(secret_id + "\n")
    return VaultAuthConfig(method="approle", role_id=role_id, secret_id_file=sid)


async def approle_store_reading(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> tuple[VaultStore, str]:
    """An AppRole-authenticated store that has logged in and read ``<prefix>/db`` (value "v") once."""
    store = make_vault_store(auth=approle_auth(vault_server, tmp_path))
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    return store, key


async def wait_until_monotonic(t: float) -> None:
    # Time itself is what the test waits for (a TTL running down), not another task.
    while time.monotonic() < t:
        await asyncio.sleep(min(0.05, max(0.0, t - time.monotonic())))


async def test_approle_login_reads_and_writes(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store = make_vault_store(auth=approle_auth(vault_server, tmp_path))
    key = f"{vault_prefix}/db"
    await store.promote(key, (await store.create(key, Secret("x"))).id)
    assert (await store.read(key)).payload.reveal() == "x"


async def test_token_file_login_reads(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    tf = tmp_path / "token"
    tf.write_text(vault_server.root_token + "\n")
    store = make_vault_store(auth=VaultAuthConfig(method="token_file", token_file=tf))
    vault_server.write(f"{vault_prefix}/db", {"value": "y"})
    assert (await store.read(f"{vault_prefix}/db")).payload.reveal() == "y"


async def test_a_missing_vault_token_is_an_auth_error(make_vault_store: MakeStore, vault_prefix: str) -> None:
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={})
    with pytest.raises(StoreAuthError, match="VAULT_TOKEN"):
        await store.read(f"{vault_prefix}/db")


async def test_a_wrong_approle_secret_id_is_an_auth_error(
    vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    role_id, _ = vault_server.approle()
    sid = tmp_path / "secret_id"
    sid.write_text("not-the-secret-id")
    store = make_vault_store(auth=VaultAuthConfig(method="approle", role_id=role_id, secret_id_file=sid))
    with pytest.raises(StoreAuthError) as err:
        await store.read(f"{vault_prefix}/db")
    assert "not-the-secret-id" not in str(err.value)


async def test_kubernetes_login_uses_the_service_account_token(
    vault_double: VaultDouble, make_vault_store: MakeStore, vault_server: VaultTarget, vault_prefix: str, tmp_path: Path
) -> None:
    vault_double.add_kubernetes_role("baton", "jwt-abc")
    jwt = tmp_path / "token"
    jwt.write_text("jwt-abc")
    store = make_vault_store(auth=VaultAuthConfig(method="kubernetes", role="baton", jwt_file=jwt))
    vault_server.write(f"{vault_prefix}/db", {"value": "k"})
    assert (await store.read(f"{vault_prefix}/db")).payload.reveal() == "k"
    assert vault_double.count("POST", "auth/kubernetes/login") == 1

    jwt.write_text("jwt-wrong")
    bad = make_vault_store(auth=VaultAuthConfig(method="kubernetes", role="baton", jwt_file=jwt))
    with pytest.raises(StoreAuthError):
        await bad.read(f"{vault_prefix}/db")


async def test_the_token_is_renewed_before_its_ttl_ends(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    # 2 s: renewal at 1.33 s leaves 0.67 s of slack on a loaded machine.
    vault_double.token_ttl = 2.0
    store = make_vault_store(auth=approle_auth(vault_server, tmp_path))
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    login_at = time.monotonic()
    await store.read(key)
    assert store.client.renew_at is not None
    await wait_until_monotonic(store.client.renew_at)
    await store.read(key)
    assert vault_double.count(*RENEW) == 1
    # Past the first TTL: the original token would have expired by now.
    await wait_until_monotonic(login_at + 2.1)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_double.count(*LOGIN) == 1
    assert vault_double.count("GET", "metadata") >= 3


async def test_a_plain_token_with_a_ttl_is_renewed_too(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    vault_double.token_ttl = 2.0
    role_id, secret_id = vault_server.approle()
    c = hvac.Client(url=vault_server.url)
    try:
        token = c.auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)["auth"]["client_token"]
    finally:
        c.adapter.close()
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    assert vault_double.count("GET", "auth/token/lookup-self") == 1
    assert store.client.renew_at is not None
    await wait_until_monotonic(store.client.renew_at)
    await store.read(key)
    assert vault_double.count(*RENEW) == 1
    left = vault_double.token_ttl_left(token)
    assert left is not None and left > 1.0


async def test_a_revoked_token_is_replaced_by_a_fresh_approle_login(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    vault_double.revoke_all_tokens()
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_double.count(*LOGIN) == 2


async def test_a_revoked_static_token_fails_with_an_auth_error_after_one_retry(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str
) -> None:
    role_id, secret_id = vault_server.approle()
    c = hvac.Client(url=vault_server.url)
    try:
        token = c.auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)["auth"]["client_token"]
    finally:
        c.adapter.close()
    store = make_vault_store(auth=VaultAuthConfig(method="token"), env={"VAULT_TOKEN": token})
    key = f"{vault_prefix}/db"
    vault_server.write(key, {"value": "v"})
    await store.read(key)
    vault_double.revoke_all_tokens()
    with pytest.raises(StoreAuthError) as err:
        await store.read(key)
    assert token not in str(err.value)
    # One lookup at start, one to tell a dead token from a policy denial, one for the re-login attempt.
    assert vault_double.count("GET", "auth/token/lookup-self") == 3


async def test_concurrent_calls_after_a_revocation_log_in_once(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    vault_double.revoke_all_tokens()
    got = await asyncio.gather(*(store.read(key) for _ in range(6)))
    assert {g.payload.reveal() for g in got} == {"v"}
    assert vault_double.count(*LOGIN) == 2


async def test_a_policy_denial_on_a_live_token_never_spends_a_login(
    vault_double: VaultDouble, vault_server: VaultTarget, make_vault_store: MakeStore, vault_prefix: str, tmp_path: Path
) -> None:
    store, key = await approle_store_reading(vault_server, make_vault_store, vault_prefix, tmp_path)
    assert vault_double.count(*LOGIN) == 1
    vault_double.deny(key)
    for _ in range(3):  # e.g. three polls: a limited-use secret_id must not pay for any of them
        with pytest.raises(StoreAuthError, match="denied by policy"):
            await store.read(key)
    assert vault_double.count(*LOGIN) == 1
    vault_double.deny(None)
    assert (await store.read(key)).payload.reveal() == "v"
    assert vault_double.count(*LOGIN) == 1
